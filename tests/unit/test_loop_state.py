"""The loop's state and inputs without Ray: lost labels rebuilt, damaged state named, bad pools refused.

The select and label steps of a loop run here for real (synthetic pool, oracle); the
train and score steps need Ray and are left to tests/integration/test_loop_ray.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from segrl.config import ConfigError, load_config
from segrl.data.labels import DataError
from segrl.labeling import import_labels, selection_table
from segrl.loop.run import ActiveLearningLoop, check_rounds_kept, native_scoring_size
from segrl.loop.select import image_row
from segrl.loop.state import read_state
from segrl.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic_train_images=8", "data.synthetic_val_images=2", "data.synthetic_size=[24,32]",
        "data.crop_size=[24,32]", "al.initial_labeled=3", "al.rounds=2"]


def loop_of(root: Path, *extra: str) -> ActiveLearningLoop:
    cfg = load_config(str(REPO / "configs" / "stal_synthetic.yaml"), [*TINY, f"store.root={root}", "run=r", *extra])
    loop = ActiveLearningLoop(cfg)
    loop.state = read_state(loop.store)
    loop._write_pool(loop._pool_frames())
    return loop


def label_two_rounds(loop: ActiveLearningLoop) -> None:
    """Round 0 (three whole images, oracle) and a round 1 of regions: one on a round-0
    image (merged onto its labels), one on a new image."""
    assert loop._step(0, "select", loop._select) and loop._step(0, "label", loop._label)
    pool = loop.store.read_table("pool.parquet").to_pylist()
    first = loop.store.read_table("rounds/00/selection.parquet").column("id").to_pylist()
    new = next(row for row in pool if row["id"] not in first)
    old = next(row for row in pool if row["id"] == first[0])
    rows = [dict(image_row(r["id"], r["image_uri"], 24, 32, 96), unit="region", y1=8, x1=12)
            for r in (old, new)]
    loop.store.write_table("rounds/01/selection.parquet", selection_table(rows))
    loop.state["done"].append("01/select")
    assert loop._step(1, "label", loop._label)


def files(store: ArtifactStore, prefix: str) -> dict[str, bytes]:
    return {key: store.read_bytes(key) for key in store.list(prefix, recursive=True)}


# --------------------------------------------------------------------------- lost labels/


@pytest.mark.parametrize("lost", ["labels/index.parquet", "labels"])
def test_lost_merged_labels_are_rebuilt_byte_for_byte_from_the_rounds(tmp_path, lost):
    """Before: with the index gone, the next round trained on the current round's images
    only and offered round 0's again. Now labels/ is replayed from rounds/NN/labels/."""
    loop = loop_of(tmp_path)
    label_two_rounds(loop)
    before = files(loop.store, "labels")
    assert loop._index().num_rows == 4  # 3 images of round 0, one new in round 1
    loop.store.delete(lost)
    loop._restore_labels()
    assert files(loop.store, "labels") == before
    assert loop._index().num_rows == 4  # what round 2 trains on: every labeled image
    loop._restore_labels()  # intact: nothing to do, nothing rewritten
    assert files(loop.store, "labels") == before


def test_lost_oracle_answers_are_answered_again_and_the_labels_rebuilt(tmp_path):
    loop = loop_of(tmp_path)
    label_two_rounds(loop)
    before_labels, before_round = files(loop.store, "labels"), files(loop.store, "rounds/00/labels")
    loop.store.delete("labels")
    loop.store.delete("rounds/00/labels")
    loop._restore_labels()
    assert files(loop.store, "rounds/00/labels") == before_round  # the same truth, the same answers
    assert files(loop.store, "labels") == before_labels


def test_lost_imported_answers_stop_the_run_naming_the_round_and_how_to_recover(tmp_path):
    loop = loop_of(tmp_path, "al.labeling=external")
    assert loop._step(0, "select", loop._select)
    selection = loop.store.read_table("rounds/00/selection.parquet")
    answers = tmp_path / "answers"
    answers.mkdir()
    for image_id in selection.column("id").to_pylist():
        Image.fromarray(loop._truth(image_id)).save(answers / f"{image_id}.png")
    import_labels(selection, str(answers), loop.store, "rounds/00/labels", num_classes=11)
    assert loop._step(0, "label", loop._label)
    before = files(loop.store, "labels")
    loop.store.delete("labels/index.parquet")
    loop._restore_labels()  # the answers are there: rebuilt
    assert files(loop.store, "labels") == before

    loop.store.delete("labels")
    gone = selection.column("id")[0].as_py()
    loop.store.delete(f"rounds/00/labels/{gone}.png")
    with pytest.raises(DataError) as err:
        loop._restore_labels()
    for words in ("round 0's imported answers are gone", "rounds/00/labels", repr(gone), "import_labels.py",
                  "--round 0"):
        assert words in str(err.value), str(err.value)
    assert not loop.store.exists("labels")  # nothing half-rebuilt


# --------------------------------------------------------------------------- damaged state.json

DAMAGED = {"empty": (b"", "empty (0 bytes)"), "truncated": (b'{"status": "running", "done": ["00/se', "not valid JSON"),
           "a list": (b"[]", "a JSON list, not an object"), "no steps": (b"{}", "key 'done' is missing")}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_state_file_is_named_with_what_is_wrong_and_how_to_recover(tmp_path, case):
    store = ArtifactStore(str(tmp_path / "run"))
    store.write_bytes("state.json", DAMAGED[case][0])
    with pytest.raises(DataError) as err:
        read_state(store)
    message = str(err.value)
    assert store.uri("state.json") in message and DAMAGED[case][1] in message
    assert "restore it from a backup" in message and "run=" in message


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["truncated", "a list"])
def test_the_loop_job_exits_2_on_a_damaged_state_and_writes_nothing(tmp_path, capsys, case):
    run = tmp_path / "r"
    run.mkdir()
    (run / "state.json").write_bytes(DAMAGED[case][0])
    rc = _job("stal_loop").main([*TINY, f"store.root={tmp_path}", "run=r"])
    err = capsys.readouterr().err
    assert rc == 2 and "state.json is damaged" in err and DAMAGED[case][1] in err and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["state.json"]  # not even config.yaml


@pytest.mark.parametrize("case", list(DAMAGED))
def test_the_import_job_exits_2_on_a_damaged_state(tmp_path, capsys, case):
    store = ArtifactStore(str(tmp_path / "run"))
    store.write_bytes("state.json", DAMAGED[case][0])
    rc = _job("import_labels").main(["--run", store.root, "--round", "0", "--labels", str(tmp_path)])
    err = capsys.readouterr().err
    expected = "positive integer 'num_classes'" if case == "no steps" else DAMAGED[case][1]
    assert rc == 2 and "state.json is damaged" in err and expected in err, err


# --------------------------------------------------------------------------- config of a resumed run


def test_fewer_rounds_than_the_run_has_started_are_refused():
    state = {"done": ["00/select", "00/label", "00/train", "00/score", "01/select", "01/label"], "log": []}
    check_rounds_kept(state, 1)
    check_rounds_kept(state, 3)
    with pytest.raises(ConfigError, match=r"'al.rounds' = 0, but this run has already started round 1"):
        check_rounds_kept(state, 0)


def test_a_run_refuses_fewer_rounds_before_rewriting_its_config(tmp_path):
    loop = loop_of(tmp_path)
    label_two_rounds(loop)
    loop.store.write_yaml("config.yaml", {"placeholder": True})
    loop._save_state()
    shrunk = ActiveLearningLoop(load_config(str(REPO / "configs" / "stal_synthetic.yaml"),
                                            [*TINY, f"store.root={tmp_path}", "run=r", "al.rounds=0"]))
    with pytest.raises(ConfigError, match="al.rounds >= 1"):
        shrunk.run()
    assert loop.store.read_yaml("config.yaml") == {"placeholder": True}


# --------------------------------------------------------------------------- manifest datasets


def write_manifest_dataset(root: Path, train_rows: str, size=(20, 28)) -> None:
    """A manifest dataset: train.csv as given (frames f0.. written), val.csv with labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"f{i}.png")
        Image.fromarray((rng.integers(0, 3, size)).astype(np.uint8)).save(root / f"f{i}_label.png")
    (root / "train.csv").write_text(train_rows)
    (root / "val.csv").write_text("id,image_uri,label_uri\nv,f5.png,f5_label.png\n")


def manifest_loop(tmp_path: Path, data: Path) -> ActiveLearningLoop:
    cfg = load_config(str(REPO / "configs" / "stal_synthetic.yaml"), [
        "data.dataset=manifest", f"data.root={data}", "data.classes=[a,b,c]", "data.crop_size=[16,16]",
        "al.initial_labeled=2", f"store.root={tmp_path / 'runs'}", "run=m"])
    return ActiveLearningLoop(cfg)


def test_oracle_labeling_without_ground_truth_is_refused_before_anything_is_written(tmp_path):
    """Before: no label_uri column -> the oracle revealed nothing, loss 0.0, mIoU NaN, 'finished'."""
    data = tmp_path / "data"
    write_manifest_dataset(data, "id,image_uri\n" + "".join(f"f{i},f{i}.png\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"5 of the 5 pool frames .* have none \(no 'label_uri'; first: 'f0'\)"):
        manifest_loop(tmp_path, data).run()
    assert not (tmp_path / "runs").exists()


def test_repeated_ids_in_the_loop_pool_are_refused_before_anything_is_written(tmp_path):
    data = tmp_path / "data"
    rows = "id,image_uri,label_uri\n" + "".join(f"f{i % 3},f{i}.png,f{i}_label.png\n" for i in range(5))
    write_manifest_dataset(data, rows)
    with pytest.raises(DataError, match=r"repeats 2 id\(s\): 'f0' \(2x\), 'f1' \(2x\)"):
        manifest_loop(tmp_path, data).run()
    assert not (tmp_path / "runs").exists()


def test_a_path_traversal_id_in_the_loop_pool_is_refused(tmp_path):
    data = tmp_path / "data"
    write_manifest_dataset(data, "id,image_uri,label_uri\n../x,f0.png,f0_label.png\nf1,f1.png,f1_label.png\n")
    with pytest.raises(DataError, match=r"id '\.\./x' cannot name a file"):
        manifest_loop(tmp_path, data).run()


def test_excluded_frames_are_not_in_the_pool_and_the_oracle_answers_the_others(tmp_path):
    whole = loop_of(tmp_path / "whole")
    ids = whole.store.read_table("pool.parquet").column("id").to_pylist()
    (tmp_path / "near_val.txt").write_text(f"{ids[0]}\n{ids[5]}\n")
    loop = loop_of(tmp_path / "part", f"data.exclude_ids={tmp_path / 'near_val.txt'}")
    assert loop.store.read_table("pool.parquet").column("id").to_pylist() == [i for i in ids if i not in (ids[0], ids[5])]
    for image_id in (ids[1], ids[6], ids[7]):  # the truth of the same frame, past the excluded ones
        assert np.array_equal(loop._truth(image_id), whole._truth(image_id))
    assert loop._step(0, "select", loop._select) and loop._step(0, "label", loop._label)
    labeled = set(loop.store.read_table("rounds/00/selection.parquet").column("id").to_pylist())
    assert len(labeled) == 3 and not labeled & {ids[0], ids[5]}


def test_native_size_frames_are_scored_at_the_labeled_frames_size(tmp_path):
    """Before: round 0 trained, then scoring failed with 'set image_size=[H,W]', a key the
    loop has no way to set. Now the loop scores at the frames' own size."""
    data = tmp_path / "data"
    write_manifest_dataset(data, "id,image_uri,label_uri\n" + "".join(f"f{i},f{i}.png,f{i}_label.png\n"
                                                                      for i in range(5)))
    loop = manifest_loop(tmp_path, data)
    index = pa.table({"height": [20, 20, 30], "width": [28, 28, 40]})
    assert native_scoring_size(loop.cfg.data, index) == (20, 28)  # the most common size
    assert native_scoring_size(loop.cfg.data, index.slice(2)) == (30, 40)
    synthetic = load_config(str(REPO / "configs" / "stal_synthetic.yaml"), TINY)
    assert native_scoring_size(synthetic.data, index) == ()  # the checkpoint knows synthetic_size
    fixed = load_config(str(REPO / "configs" / "stal_synthetic.yaml"), [*TINY, "data.base_size=[24,32]"])
    assert native_scoring_size(fixed.data, index) == ()  # base_size is in the checkpoint's config


# --------------------------------------------------------------------------- JSON


def test_nan_and_infinity_are_stored_as_null_never_as_invalid_json(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write_json("metrics.json", {"val_miou": math.nan, "rounds": [{"x": math.inf}, (1.5, -math.inf)]})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {
        "val_miou": None, "rounds": [{"x": None}, [1.5, None]]}


def test_a_moved_run_folder_is_not_refused_for_its_new_store_root(tmp_path):
    from segrl.engine.train import record_config

    loop = loop_of(tmp_path / "old")
    record_config(loop.store, loop.cfg)
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    moved = ActiveLearningLoop(load_config(str(REPO / "configs" / "stal_synthetic.yaml"),
                                           [*TINY, f"store.root={tmp_path / 'new'}", "run=r"]))
    record_config(moved.store, moved.cfg)  # before: "'store.root' was ..., now ..."
    assert moved.store.read_yaml("config.yaml")["store"]["root"] == str(tmp_path / "new")
