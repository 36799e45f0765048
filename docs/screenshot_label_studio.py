"""Screenshot of a segrl task on Label Studio's labeling page (for the README; not a test).

    python docs/screenshot_label_studio.py --camvid ../shared/data/camvid --out docs/label_studio_task.png

Starts ``label-studio`` (dev extras) on 127.0.0.1 with a throwaway data folder, exports one
CamVid frame's request (a region and three points) with segrl, creates a project with its
config and tasks, logs in with headless Chromium and saves the labeling page. Needs
playwright (dev extras) and a Chromium binary (``apt-get install chromium``; no
``playwright install``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from label_studio_sdk import LabelStudio
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' server helper: one way to start Label Studio

from _label_studio import PASSWORD, USERNAME, migrated_template, start_label_studio  # noqa: E402

from segrl.data.labels import CAMVID_CLASSES  # noqa: E402
from segrl.labeling import selection_table  # noqa: E402
from segrl.labeling.label_studio import export_label_studio  # noqa: E402
from segrl.labeling.urls import image_url_maker  # noqa: E402
from segrl.storage import ArtifactStore  # noqa: E402

FRAME = "0016E5_01560"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def request_rows(camvid: Path) -> list[dict]:
    base = {"id": FRAME, "uri": str(camvid / "train" / f"{FRAME}.png"), "height": 360, "width": 480,
            "mask_key": "", "points": [], "cost_clicks": 0}
    region = {**base, "unit": "region", "y0": 180, "x0": 160, "y1": 300, "x1": 360, "cost_pixels": 120 * 200}
    points = [[100, 60], [150, 420], [320, 80]]
    clicks = {**base, "unit": "points", "y0": 100, "x0": 60, "y1": 321, "x1": 421, "points": points,
              "cost_pixels": 0, "cost_clicks": len(points)}
    return [region, clicks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camvid", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--out", default=str(REPO / "docs" / "label_studio_task.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    camvid = Path(args.camvid).resolve()
    work = Path(tempfile.mkdtemp(prefix="segrl-ls-shot-"))
    template, _ = migrated_template(REPO / ".pytest_cache" / "d" / "label-studio", camvid)
    shutil.copytree(template, work / "data")
    server = start_label_studio(work / "data", camvid)
    try:
        store = ArtifactStore(str(work / "run"))
        exported = export_label_studio(selection_table(request_rows(camvid)), store, "label_studio",
                                       list(CAMVID_CLASSES), image_url_maker("local", url_root=str(camvid)))
        client = LabelStudio(base_url=server.url, api_key=server.token)
        project = client.projects.create(title="segrl round 1", label_config=store.read_text(exported["config"]),
                                         model_version="segrl-request", show_collab_predictions=True)
        # Label Studio serves a local file only below a project's local storage
        client.import_storage.local.create(project=project.id, path=str(camvid / "train"), title="CamVid")
        client.projects.import_tasks(project.id, request=store.read_json(exported["tasks"]))
        task = next(iter(client.tasks.list(project=project.id)))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{server.url}/user/login")
            page.fill("input[name=email]", USERNAME)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{server.url}/projects/{project.id}/data?task={task.id}")
            page.wait_for_selector("canvas", timeout=60_000)
            page.wait_for_timeout(5000)  # the image and the brush/keypoint layers draw after the canvas
            page.screenshot(path=args.out)
            browser.close()
        print(f"screenshot: {args.out} (task {task.id} of project {project.id})")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
