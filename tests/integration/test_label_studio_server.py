"""segrl <-> a real Label Studio server: tasks in, annotations posted as an annotator would, export out.

The server is ``label-studio`` from the dev extras, started on 127.0.0.1 with a throwaway
data folder (sqlite), a known user and API token (tests/_label_studio.py), and stopped
after the module: only its own process group.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _label_studio import (
    LabelStudioServer,
    migrated_template,
    start_label_studio,
    template_cache_dir,
)
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter import brush
from PIL import Image

from segrl.data.labels import CAMVID_CLASSES
from segrl.labeling import encode_label_png, selection_table
from segrl.labeling.label_studio import export_label_studio, import_label_studio, keypoint_value
from segrl.labeling.urls import image_url_maker
from segrl.storage import ArtifactStore

pytestmark = pytest.mark.integration
# ../shared/data/camvid beside the checkout, as in CI; SEGRL_CAMVID points elsewhere.
CAMVID = Path(os.environ.get("SEGRL_CAMVID", Path(__file__).resolve().parents[3] / "shared/data/camvid"))
CLASSES = list(CAMVID_CLASSES)
IGNORE = 255
H, W = 360, 480
FRAMES = {"region": "0001TP_006690", "segment": "0001TP_006720", "points": "0001TP_006750"}
POINTS = [[40, 60], [200, 300], [350, 470]]


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudioServer]:
    if not (CAMVID / "train").is_dir():
        pytest.skip(f"CamVid frames not found under {CAMVID}")
    template, migrate_seconds = migrated_template(template_cache_dir(), CAMVID)
    data_dir = tmp_path_factory.mktemp("label-studio") / "data"
    shutil.copytree(template, data_dir)
    server = start_label_studio(data_dir, CAMVID)
    print(f"\nLabel Studio: migrations {migrate_seconds:.1f} s (0 = cached template), "
          f"server start {server.start_seconds:.1f} s at {server.url}")
    try:
        yield server
    finally:
        server.stop()


def truth(frame: str) -> np.ndarray:
    return np.asarray(Image.open(CAMVID / "trainannot" / f"{frame}.png"))


def row(frame: str, unit: str, box=(0, 0, H, W), mask_key: str = "", points=(), cost: int = 0) -> dict:
    y0, x0, y1, x1 = box
    return {"id": frame, "uri": str(CAMVID / "train" / f"{frame}.png"), "unit": unit, "height": H,
            "width": W, "y0": y0, "x0": x0, "y1": y1, "x1": x1, "mask_key": mask_key,
            "points": [list(p) for p in points], "cost_pixels": cost, "cost_clicks": len(points)}


def annotator_result(frame: str, unit: str) -> list[dict]:
    """What an annotator sends: class brushes over a box wider than any request, or keypoints.

    Brushes cover rows 50..250, columns 80..400 of the truth (void left unpainted);
    keypoints sit one pixel off each requested point, where a click lands.
    """
    label = truth(frame)
    common = {"to_name": "image", "original_width": W, "original_height": H, "image_rotation": 0}
    if unit == "points":
        return [{**common, "id": f"k{i}", "from_name": "point", "type": "keypointlabels",
                 "value": {**keypoint_value(min(y + 1, H - 1), max(x - 1, 0), H, W),
                           "keypointlabels": [CLASSES[label[y, x]]]}}
                for i, (y, x) in enumerate(POINTS) if label[y, x] < len(CLASSES)]
    painted = np.zeros((H, W), bool)
    painted[50:250, 80:400] = True
    results = []
    for class_id in np.unique(label[painted]):
        if class_id >= len(CLASSES):
            continue
        mask = ((label == class_id) & painted).astype(np.uint8) * 255
        results.append({**common, "id": f"b{class_id}", "from_name": "label", "type": "brushlabels",
                        "value": {"format": "rle", "rle": brush.mask2rle(mask),
                                  "brushlabels": [CLASSES[class_id]]}})
    return results


def posted_label(frame: str, unit: str) -> np.ndarray:
    """The HxW label map the posted annotation means (ignore where nothing was given)."""
    label = np.full((H, W), IGNORE, np.uint8)
    full = truth(frame)
    if unit == "points":
        for y, x in POINTS:
            label[y, x] = full[y, x] if full[y, x] < len(CLASSES) else IGNORE
        return label
    label[50:250, 80:400] = np.where(full[50:250, 80:400] < len(CLASSES), full[50:250, 80:400], IGNORE)
    return label


def test_label_studio_round_trip_keeps_only_the_requested_pixels(label_studio: LabelStudioServer, tmp_path):
    started = time.monotonic()
    store = ArtifactStore(str(tmp_path / "run"))
    segment = np.zeros((H, W), np.uint8)
    segment[100:200, 50:150] = 255  # a segment that sticks out of the painted box on the left
    store.write_bytes("rounds/01/masks/seg.png", encode_label_png(segment))
    selection = selection_table([
        row(FRAMES["region"], "region", box=(200, 300, 300, 450), cost=100 * 150),
        row(FRAMES["segment"], "pixels", box=(100, 50, 200, 150), mask_key="rounds/01/masks/seg.png",
            cost=100 * 100),
        row(FRAMES["points"], "points", box=(40, 60, 351, 471), points=POINTS),
    ])
    exported = export_label_studio(selection, store, "rounds/01/labeling/label_studio", CLASSES,
                                   image_url_maker("local", url_root=str(CAMVID)))
    tasks = store.read_json(exported["tasks"])
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=train/{FRAMES['region']}.png"

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project = client.projects.create(title="segrl round 1",
                                     label_config=store.read_text(exported["config"]))
    imported = client.projects.import_tasks(project.id, request=tasks, return_task_ids=True)
    assert (imported.task_count, imported.prediction_count) == (3, 3)
    print(f"tasks imported: {imported.task_count}, with {imported.prediction_count} request pre-annotations")

    units = {FRAMES[u]: u for u in FRAMES}
    for task in client.tasks.list(project=project.id):  # as an annotator submits, through the API
        client.annotations.create(id=task.id, result=annotator_result(task.data["segrl_id"],
                                                                      units[task.data["segrl_id"]]))
    export = tmp_path / "export.json"
    export.write_bytes(b"".join(client.projects.exports.download_sync(project.id, export_type="JSON")))
    exported_tasks = json.loads(export.read_text())
    assert sorted(len(t["annotations"]) for t in exported_tasks) == [1, 1, 1]
    print(f"annotations exported: {sum(len(t['annotations']) for t in exported_tasks)} "
          f"({export.stat().st_size} bytes of JSON)")

    summary = import_label_studio(selection, str(export), store, "rounds/01/labels", CLASSES)

    requested = {FRAMES["region"]: np.zeros((H, W), bool), FRAMES["segment"]: segment > 0,
                 FRAMES["points"]: np.zeros((H, W), bool)}
    requested[FRAMES["region"]][200:300, 300:450] = True
    for y, x in POINTS:
        requested[FRAMES["points"]][y, x] = True
    compared = 0
    for frame, unit in units.items():
        got = np.asarray(Image.open(tmp_path / "run" / "rounds/01/labels" / f"{frame}.png"))
        posted = posted_label(frame, unit)
        expected = np.where(requested[frame], posted, IGNORE)
        np.testing.assert_array_equal(got, expected)
        assert (expected != IGNORE).any()
        dropped = int(((posted != IGNORE) & ~requested[frame]).sum())
        assert summary["dropped_pixels_per_image"][frame] == dropped
        compared += int(requested[frame].sum())
    assert summary["dropped_pixels_per_image"][FRAMES["points"]] == 0
    assert summary["dropped_pixels_per_image"][FRAMES["region"]] > 0  # strokes outside: not taken
    assert summary["clicks"] == len(POINTS)
    print(f"pixels compared: {compared} requested pixels over 3 images equal what was posted; "
          f"dropped outside the request: {summary['dropped_pixels_per_image']}; "
          f"test body {time.monotonic() - started:.1f} s")
