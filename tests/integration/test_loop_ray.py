"""The active-learning loop end to end on a local Ray cluster, synthetic data."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segrl.config import load_config
from segrl.labeling import LabelImportError, import_labels
from segrl.loop.run import ActiveLearningLoop, run_loop
from segrl.storage import open_store

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

TINY = [
    "data.synthetic_train_images=16",
    "data.synthetic_val_images=4",
    "data.synthetic_size=[48,64]",
    "data.crop_size=[48,64]",
    "train.steps=2",
    "train.batch_size=4",
    "train.log_every_steps=1000",
    "compute.num_workers=1",
    "compute.cpus_per_worker=0.5",
    "compute.threads_per_worker=1",
    "al.initial_labeled=4",
    "al.budget_per_round=0.25",
    "al.region_size=[16,16]",
    "al.regions_top_r=4",
]


def tiny(root: Path, run: str, *extra: str):
    return load_config(str(REPO / "configs" / "stal_synthetic.yaml"),
                       [*TINY, f"store.root={root}", f"run={run}", *extra])


def steps_logged(run: Path) -> list[str]:
    return [entry["step"] for entry in json.loads((run / "state.json").read_text())["log"]]


def labeled_set(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "labels" / "requested").glob("*.png"))}


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


ROUND_STEPS = ["00/select", "00/label", "00/train", "00/score", "01/select", "01/label", "01/train"]
RAY_NOISE = re.compile(r"Reporting training result|Checkpoint successfully created|PreemptionWatcher|\sINFO\s"
                       r"|constructor arguments in the object store")


def test_killed_labor_loop_resumes_without_repeating_a_step_and_asks_disagreement_pixels(tmp_path: Path, ray_cluster):
    """One LabOR SPL loop (two rounds), its driver killed while round 1 trains, then resumed.

    The same run answers three questions: the kill/resume contract of the loop (no step
    twice, none lost, the labels asked before the kill kept), LabOR's selection within the
    pixel budget, and what the console shows a user (each progress line once, no Ray noise).
    """
    # the driver joins the module's cluster: a cluster start per driver would double the test's time
    address = ray_cluster.get_runtime_context().gcs_address
    args = [*TINY, f"store.root={tmp_path}", "run=labor", "al.rounds=1", "al.acquisition=labor_spl",
            "al.budget_per_round=0.05", f"compute.ray_address={address}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("SEGRL_VERBOSE", None)
    command = [sys.executable, str(REPO / "jobs" / "stal_loop.py"), *args]
    run = tmp_path / "labor"

    victim_log = (tmp_path / "victim.log").open("w")
    victim = subprocess.Popen(command, cwd=REPO, env=env, stdout=victim_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    state = run / "state.json"
    deadline = time.time() + 540  # generous: a loaded 2-core machine runs Ray start-up slowly
    try:
        while time.time() < deadline:  # kill while round 1 (the second round) trains
            if state.exists() and "01/label" in json.loads(state.read_text())["done"]:
                break
            assert victim.poll() is None, "the loop ended before it could be killed: " + _tail(tmp_path / "victim.log")
            time.sleep(0.2)
        else:
            pytest.fail("round 1 never started: " + _tail(tmp_path / "victim.log"))
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        victim_log.close()
    assert "01/train" not in json.loads(state.read_text())["done"]
    asked_before_kill = labeled_set(run)
    selection_before_kill = (run / "rounds/01/selection.parquet").read_bytes()

    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert steps_logged(run) == ROUND_STEPS  # each step once, in order: none repeated, none lost
    assert labeled_set(run) == asked_before_kill  # nothing selected or labeled again
    assert (run / "rounds/01/selection.parquet").read_bytes() == selection_before_kill
    assert "status:  finished" in resumed.stdout
    assert (run / "miou_vs_labeled.png").read_bytes()[:4] == b"\x89PNG"
    assert "| round |" in (run / "report.md").read_text()
    # the review page, rewritten after each step: both rounds, round 1's LabOR segments tinted
    # and predicted by round 0's model; every picture it shows is a file of the run folder
    review = json.loads((run / "review.json").read_text())
    assert review["last_step"] == "01/train" and [rd["round"] for rd in review["rounds"]] == [1, 0]
    assert all(f["prediction"] and f["truth"] and f["units"] == ["pixels"] for f in review["rounds"][0]["frames"])
    assert review["rounds"][0]["frames"] and review["rounds"][0]["frames"][0]["score_name"] == "disagree_pixels"
    html = (run / "review.html").read_text()
    assert html.count('<section class="round"') == 2
    assert all((run / src).is_file() for src in re.findall(r'<img[^>]* src="([^"]+)"', html))

    # the console: the resumed driver trained round 1 only, each epoch line once, no Ray INFO records
    console = (resumed.stdout + resumed.stderr).splitlines()
    epoch_lines = [line.split("[segrl] ", 1)[1] for line in console if "[segrl] epoch" in line]
    assert epoch_lines and len(epoch_lines) == len(set(epoch_lines)), "\n".join(epoch_lines)
    assert [line for line in console if "[segrl] round 1: train" in line] == [
        "[segrl] round 1: train ...", next(line for line in console if "round 1: train done in" in line)]
    noise = [line for line in console if RAY_NOISE.search(line)]
    assert not noise, "\n".join(noise[:10])

    # LabOR SPL: disagreement pixels within the round's budget, never on fully labeled images
    selection = pq.read_table(run / "rounds/01/selection.parquet").to_pylist()
    budget = int(0.05 * 16 * 48 * 64)
    assert selection and all(row["unit"] == "pixels" for row in selection)
    assert sum(row["cost_pixels"] for row in selection) <= budget
    initial = {row["id"] for row in pq.read_table(run / "rounds/00/selection.parquet").to_pylist()}
    assert not initial & {row["id"] for row in selection}
    for row in selection:
        mask = np.array(Image.open(run / row["mask_key"])) > 0
        assert mask.sum() == row["cost_pixels"]
    assert "disagree_pixels" in pq.read_table(run / "rounds/00/scores.parquet").column_names

    # Point acquisitions from the same run's round-0 model and scores (no training of their
    # own): the loop's select dispatch, clicks within budget, labeled pixels never asked again.
    for acquisition in ("margin_points", "random_points"):
        points_loop = ActiveLearningLoop(load_config(str(REPO / "configs" / "stal_synthetic.yaml"), [
            *args, f"al.acquisition={acquisition}", "al.budget_unit=clicks", "al.budget_per_round=40",
            "al.points_per_image=5"]))
        with (run / "rounds/00/scores.parquet").open("rb") as f:
            rows = points_loop._acquire(1, pq.ParquetFile(f), 40)
        assert len(rows) == 8 and all(r["unit"] == "points" and r["cost_clicks"] == 5 for r in rows)
        for row in rows:
            asked = points_loop._labeled_mask(row["id"])
            assert asked is None or not any(asked[y, x] for y, x in row["points"])


def test_external_labeling_round_trip_rejects_a_bad_import_whole(tmp_path: Path, ray_cluster):
    cfg = tiny(tmp_path, "external", "al.rounds=0", "al.labeling=external", "al.initial_labeled=3",
               "annotation.tools=[cvat]")
    waiting = run_loop(cfg)
    assert waiting.status == "waiting_for_labels" and "import_labels.py" in waiting.message
    run = tmp_path / "external"
    manifest = json.loads((run / "rounds/00/labeling/manifest.json").read_text())
    entries = manifest["images"]
    assert len(entries) == 3
    assert "labeling/cvat/" in waiting.message  # the tool's task is written beside the manifest
    assert len((run / "rounds/00/labeling/cvat/images.txt").read_text().splitlines()) == 3
    selection = pq.read_table(run / "rounds/00/selection.parquet")
    store = open_store(str(run))
    from segrl.data.pool import synthetic_label

    answers = tmp_path / "answers"
    answers.mkdir()
    truth = {}
    for image_id, uri in zip(selection.column("id").to_pylist(), selection.column("uri").to_pylist(), strict=True):
        truth[image_id] = synthetic_label(uri)
        Image.fromarray(truth[image_id]).save(answers / f"{image_id}.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    for image_id in truth:
        Image.fromarray(np.full((10, 10), 1, np.uint8)).save(bad / f"{image_id}.png")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(LabelImportError, match="size"):
        import_labels(selection, str(bad), store, "rounds/00/labels", num_classes=11)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing imported

    import_labels(selection, str(answers), store, "rounds/00/labels", num_classes=11)
    finished = run_loop(cfg)
    assert finished.status == "finished" and len(finished.rounds) == 1
    for image_id, label in truth.items():
        merged = np.array(Image.open(run / "labels" / f"{image_id}.png"))
        assert (merged == label).all()  # whole images were asked for: every pixel came back

    # labels/ lost after the run: the rerun rebuilds it from the round's answers, byte for byte
    # (before: an empty index, and the next round would train on its own answers only)
    def merged_labels(folder: Path) -> dict[Path, bytes]:
        return {p.relative_to(folder): p.read_bytes() for p in sorted((folder / "labels").rglob("*")) if p.is_file()}

    before = merged_labels(run)
    shutil.rmtree(run / "labels")
    assert run_loop(cfg).status == "finished" and merged_labels(run) == before

    # the finished run copied to another store.root resumes there: nothing run again, same report
    # (before: refused, "'store.root' was ..., now ...")
    shutil.copytree(run, tmp_path / "elsewhere" / "external")
    moved = run_loop(tiny(tmp_path / "elsewhere", "external", "al.rounds=0", "al.labeling=external",
                          "al.initial_labeled=3", "annotation.tools=[cvat]"))
    moved_run = tmp_path / "elsewhere" / "external"
    assert moved.status == "finished" and steps_logged(moved_run) == steps_logged(run)
    assert (moved_run / "report.md").read_text() == (run / "report.md").read_text()
