"""Labeling: request masks, sparse labels, the oracle, manifest export and label import.

Known answers on hand-made selections, a local temp store and real PNG files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _rejects import assert_rejected_whole
from PIL import Image

from segrl.data.labels import DataError
from segrl.labeling import (
    LabelImportError,
    export_manifest,
    import_labels,
    merge_sparse,
    oracle_label,
    requested_mask,
    selection_table,
    sparse_label,
)
from segrl.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
IGNORE = 255
H, W = 4, 6


# --------------------------------------------------------------------------- helpers


def row(image_id: str = "a", unit: str = "image", **overrides) -> dict:
    """A selection row of an HxW image; unit "image" covers it whole."""
    base = {
        "id": image_id,
        "uri": f"/data/{image_id}.jpg",
        "unit": unit,
        "height": H,
        "width": W,
        "y0": 0,
        "x0": 0,
        "y1": H,
        "x1": W,
        "mask_key": "",
        "points": [],
        "cost_pixels": H * W,
        "cost_clicks": 0,
    }
    base.update(overrides)
    return base


def region(image_id: str, y0: int, x0: int, y1: int, x1: int) -> dict:
    return row(image_id, "region", y0=y0, x0=x0, y1=y1, x1=x1, cost_pixels=(y1 - y0) * (x1 - x0))


def points(image_id: str, pts: list[list[int]]) -> dict:
    ys, xs = [p[0] for p in pts], [p[1] for p in pts]
    return row(
        image_id,
        "points",
        y0=min(ys),
        x0=min(xs),
        y1=max(ys) + 1,
        x1=max(xs) + 1,
        points=pts,
        cost_pixels=0,
        cost_clicks=len(pts),
    )


def pixels(image_id: str, mask_key: str, box=(0, 0, H, W), cost: int = 0) -> dict:
    y0, x0, y1, x1 = box
    return row(image_id, "pixels", y0=y0, x0=x0, y1=y1, x1=x1, mask_key=mask_key, cost_pixels=cost)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(store: ArtifactStore, key: str) -> np.ndarray:
    with Image.open(io.BytesIO(store.read_bytes(key))) as img:
        assert img.mode == "L"
        return np.asarray(img)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def truth_of(image_id: str) -> np.ndarray:
    """A distinct HxW truth per image: class (y + x + len(id)) % 3."""
    y, x = np.mgrid[0:H, 0:W]
    return ((y + x + len(image_id)) % 3).astype(np.uint8)


def no_mask(key: str) -> np.ndarray:
    raise AssertionError(f"no pixel mask expected, asked for {key}")


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


# --------------------------------------------------------------------------- selection tables


def test_selection_table_keeps_rows_and_schema():
    table = selection_table([row("a"), points("b", [[1, 2]])])
    assert table.num_rows == 2
    assert table.column("points").to_pylist() == [[], [[1, 2]]]
    assert table.schema.field("cost_clicks").type == "int64"


@pytest.mark.parametrize(
    "bad, words",
    [
        (row(unit="box"), ["'a'", "unit 'box'"]),
        ({**row(), "mask": ""}, ["unknown columns ['mask']"]),
        ({k: v for k, v in row().items() if k != "width"}, ["missing columns ['width']"]),
        (region("a", 0, 0, 5, 2), ["'a'", "outside", "4x6"]),
        (region("a", 2, 2, 2, 3), ["empty"]),
        (row(y1=2), ["full-image box"]),
        (row(unit="region", points=[[0, 0]]), ["points"]),
        (pixels("a", ""), ["mask_key"]),
        ({**points("a", [[1, 1]]), "x0": 2, "x1": 4}, ["point [1, 1]"]),
        (row("../x"), ["'../x'"]),
    ],
)
def test_selection_table_rejects_bad_rows(bad, words):
    with pytest.raises(DataError) as err:
        selection_table([bad])
    for word in words:
        assert word in str(err.value)


# --------------------------------------------------------------------------- requested_mask


def test_requested_mask_image_is_everything():
    assert requested_mask([row()], no_mask).all()


def test_requested_mask_region_is_the_box():
    mask = requested_mask([region("a", 1, 2, 3, 5)], no_mask)
    expected = np.zeros((H, W), bool)
    expected[1:3, 2:5] = True
    np.testing.assert_array_equal(mask, expected)


def test_requested_mask_pixels_are_the_nonzero_mask_pixels():
    pixel_mask = np.zeros((H, W), np.uint8)
    pixel_mask[0, 0], pixel_mask[3, 5], pixel_mask[2, 1] = 255, 1, 7
    mask = requested_mask([pixels("a", "m.png")], {"m.png": pixel_mask}.__getitem__)
    np.testing.assert_array_equal(mask, pixel_mask != 0)


def test_requested_mask_points_are_single_pixels():
    mask = requested_mask([points("a", [[0, 1], [3, 4]])], no_mask)
    assert sorted(zip(*np.nonzero(mask), strict=True)) == [(0, 1), (3, 4)]


def test_requested_mask_is_the_union_of_rows():
    mask = requested_mask([region("a", 0, 0, 1, 2), points("a", [[3, 5], [0, 1]])], no_mask)
    assert sorted(zip(*np.nonzero(mask), strict=True)) == [(0, 0), (0, 1), (3, 5)]


def test_requested_mask_rejects_a_wrong_size_pixel_mask_and_mixed_images():
    with pytest.raises(DataError, match=r"m\.png.*3x6.*4x6"):
        requested_mask([pixels("a", "m.png")], lambda key: np.ones((3, W), np.uint8))
    with pytest.raises(DataError, match="different images"):
        requested_mask([row("a"), row("b")], no_mask)


# --------------------------------------------------------------------------- sparse_label, merge_sparse


def test_sparse_label_keeps_truth_only_where_requested():
    truth = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    requested = np.array([[True, False, True], [False, True, True]])
    expected = np.array([[0, 255, 2], [255, 4, 255]], np.uint8)
    out = sparse_label(truth, requested)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(sparse_label(truth, requested, ignore_index=9)[0], [0, 9, 2])


def test_merge_sparse_fills_new_pixels_and_never_loses_old_ones():
    old = np.array([[1, 255, 255], [2, 255, 0]], np.uint8)
    new = np.array([[4, 5, 255], [255, 6, 3]], np.uint8)
    np.testing.assert_array_equal(merge_sparse(old, new, 255), [[1, 5, 255], [2, 6, 0]])
    np.testing.assert_array_equal(merge_sparse(None, new, 255), new)


def test_merge_sparse_keeps_every_label_on_random_maps():
    rng = np.random.default_rng(0)
    for _ in range(20):
        old = np.where(rng.random((5, 7)) < 0.5, rng.integers(0, 4, (5, 7)), 255).astype(np.uint8)
        new = np.where(rng.random((5, 7)) < 0.5, rng.integers(0, 4, (5, 7)), 255).astype(np.uint8)
        merged = merge_sparse(old, new, 255)
        was_labeled = old != 255
        np.testing.assert_array_equal(merged[was_labeled], old[was_labeled])
        np.testing.assert_array_equal(merged[~was_labeled], new[~was_labeled])
        assert (merged != 255).sum() == ((old != 255) | (new != 255)).sum()


def test_merge_sparse_rejects_shape_mismatch():
    with pytest.raises(DataError, match="shapes"):
        merge_sparse(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 255)


# --------------------------------------------------------------------------- oracle


def mixed_selection(store: ArtifactStore):
    """Images a (region), b (two points), c (pixel mask in the store), d (whole image)."""
    pixel_mask = np.zeros((H, W), np.uint8)
    pixel_mask[1, 1:4] = 255
    store.write_bytes("masks/c.png", png_bytes(pixel_mask))
    return selection_table(
        [
            region("a", 1, 1, 3, 3),
            points("b", [[0, 0], [2, 5]]),
            pixels("c", "masks/c.png", box=(1, 1, 2, 4), cost=3),
            row("d"),
        ]
    )


def test_oracle_writes_exactly_the_requested_truth(store):
    selection = mixed_selection(store)
    truth = {i: truth_of(i) for i in "abcd"}
    truth["d"][0, 0] = IGNORE  # an unlabeled truth pixel: requested but not a label
    counts = oracle_label(selection, truth.__getitem__, store, "rounds/00/labels")
    requested = {
        "a": (slice(1, 3), slice(1, 3)),
        "b": ([0, 2], [0, 5]),
        "c": (1, slice(1, 4)),
        "d": (slice(None), slice(None)),
    }
    for image_id, where in requested.items():
        expected = np.full((H, W), IGNORE, np.uint8)
        expected[where] = truth[image_id][where]
        np.testing.assert_array_equal(read_png(store, f"rounds/00/labels/{image_id}.png"), expected)
    assert counts == {
        "images": 4,
        "requested_pixels": 4 + 2 + 3 + H * W,
        "labeled_pixels": 4 + 2 + 3 + H * W - 1,
        "clicks": 2,
    }


def test_oracle_rejects_a_wrong_truth_shape_and_writes_nothing(store):
    selection = mixed_selection(store)
    before = store.list(recursive=True)

    def truth(image_id):
        return truth_of(image_id)[:, :5] if image_id == "c" else truth_of(image_id)

    with pytest.raises(DataError, match=r"'c'.*4x5.*4x6"):
        oracle_label(selection, truth, store, "labels")
    assert store.list(recursive=True) == before


def test_oracle_failed_truth_lookup_writes_nothing(store):
    selection = mixed_selection(store)
    before = store.list(recursive=True)
    with pytest.raises(DataError, match="'d'"):
        oracle_label(selection, {i: truth_of(i) for i in "abc"}.__getitem__, store, "labels")
    assert store.list(recursive=True) == before


# --------------------------------------------------------------------------- export


def test_export_writes_csv_json_masks_and_readme(store):
    selection = mixed_selection(store)
    result = export_manifest(selection, store, "rounds/00/export", class_names=["x", "y", "z"])
    assert result["images"] == 4
    assert result["requested_pixels"] == 4 + 2 + 3 + H * W

    manifest = store.read_json("rounds/00/export/manifest.json")
    entries = {e["id"]: e for e in manifest["images"]}
    assert list(entries) == ["a", "b", "c", "d"]
    assert entries["a"]["unit"] == "region" and entries["a"]["boxes"] == [[1, 1, 3, 3]]
    assert entries["b"]["points"] == [[0, 0], [2, 5]] and entries["b"]["boxes"] == []
    assert entries["c"]["mask"] == "rounds/00/export/masks/c.png"
    assert entries["d"]["boxes"] == [[0, 0, H, W]]
    a = entries["a"]
    assert (a["height"], a["width"], a["uri"]) == (H, W, "/data/a.jpg")
    assert manifest["classes"] == ["x", "y", "z"] and manifest["ignore_index"] == 255

    rows = list(csv.DictReader(io.StringIO(store.read_text("rounds/00/export/manifest.csv"))))
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert json.loads(rows[1]["points"]) == [[0, 0], [2, 5]]
    assert rows[2]["unit"] == "pixels" and rows[2]["requested_pixels"] == "3"
    assert rows[0]["answer_file"] == "a.png"

    mask_b = read_png(store, "rounds/00/export/masks/b.png")
    assert sorted(np.unique(mask_b).tolist()) == [0, 255]
    assert sorted(zip(*np.nonzero(mask_b), strict=True)) == [(0, 0), (2, 5)]
    mask_a = read_png(store, "rounds/00/export/masks/a.png")
    assert (mask_a[1:3, 1:3] == 255).all() and (mask_a == 255).sum() == 4

    readme = store.read_text("rounds/00/export/README.md")
    for phrase in ("<id>.png", "Single-channel", "original image size", "255", "ignored", "2  z"):
        assert phrase in readme


def test_export_mixed_units_of_one_image(store):
    selection = selection_table([region("a", 0, 0, 1, 1), points("a", [[3, 3]])])
    export_manifest(selection, store, "")  # "" = the store root itself
    (entry,) = store.read_json("manifest.json")["images"]
    assert entry["unit"] == "region+points" and entry["requested_pixels"] == 2
    assert entry["mask"] == "masks/a.png" and store.exists("masks/a.png")


# --------------------------------------------------------------------------- import


NUM_CLASSES = 3


def write_answers(folder: Path, ids="abcd", **replace: np.ndarray) -> Path:
    """Full truth maps as annotators' PNGs, ``replace`` overriding some ids."""
    for image_id in ids:
        save_png(folder / f"{image_id}.png", replace.get(image_id, truth_of(image_id)))
    return folder


def test_import_round_trip(store, tmp_path):
    selection = mixed_selection(store)
    export_manifest(selection, store, "rounds/01/export")
    answers = write_answers(tmp_path / "answers")
    (answers / "notes.txt").write_text("done")  # not an answer: skipped, not an error

    result = import_labels(selection, str(answers), store, "rounds/01/labels", NUM_CLASSES)

    oracle_store = ArtifactStore(str(tmp_path / "oracle"))
    oracle_store.write_bytes("masks/c.png", store.read_bytes("masks/c.png"))
    oracle_label(selection, truth_of, oracle_store, "labels")
    for image_id in "abcd":
        np.testing.assert_array_equal(
            read_png(store, f"rounds/01/labels/{image_id}.png"),
            read_png(oracle_store, f"labels/{image_id}.png"),
        )
    requested = 4 + 2 + 3 + H * W
    assert result["images"] == 4
    assert result["requested_pixels"] == result["labeled_pixels"] == requested
    assert result["skipped_files"] == ["notes.txt"]
    marker = store.read_json("rounds/01/labels/_IMPORTED.json")
    assert marker["source"] == str(answers) and marker["labeled_pixels"] == requested
    assert marker["imported_at"]


def test_import_keeps_only_requested_pixels_and_counts_unlabeled(store, tmp_path):
    selection = selection_table([region("a", 0, 0, 2, 2), region("b", 0, 0, 1, 1)])
    answer_a = np.full((H, W), 1, np.uint8)
    answer_a[0, 0] = IGNORE
    answer_b = np.full((H, W), IGNORE, np.uint8)
    answer_b[3, 5] = 2  # labeled, but not where asked
    answers = write_answers(tmp_path / "ans", "ab", a=answer_a, b=answer_b)
    result = import_labels(selection, str(answers), store, "labels", NUM_CLASSES)
    expected_a = np.full((H, W), IGNORE, np.uint8)
    expected_a[0:2, 0:2] = [[IGNORE, 1], [1, 1]]
    np.testing.assert_array_equal(read_png(store, "labels/a.png"), expected_a)
    assert (read_png(store, "labels/b.png") == IGNORE).all()
    assert (result["labeled_pixels"], result["requested_pixels"]) == (3, 5)
    assert result["unlabeled_images"] == ["b"]


def test_import_ids_with_folders(store, tmp_path):
    selection = selection_table([row("seq1/f001")])
    save_png(tmp_path / "ans" / "seq1" / "f001.png", truth_of("seq1/f001"))
    import_labels(selection, str(tmp_path / "ans"), store, "labels", NUM_CLASSES)
    np.testing.assert_array_equal(read_png(store, "labels/seq1/f001.png"), truth_of("seq1/f001"))


def bad_case(name: str, folder: Path) -> list[str]:
    """Write one bad answer set into ``folder``; the words its error must contain."""
    if name == "wrong_size":
        write_answers(folder, b=np.zeros((H, W + 1), np.uint8))
        return [str(folder / "b.png"), "7x4 (WxH)", "expected 6x4 (WxH)"]
    if name == "unknown_class":
        bad = truth_of("c")
        bad[0, 0], bad[3, 3] = 7, 200  # outside the request too: still a wrong class scheme
        write_answers(folder, c=bad)
        return [str(folder / "c.png"), "[7, 200]", "outside 0..2"]
    if name == "not_selected":
        write_answers(folder)
        save_png(folder / "zz.png", np.zeros((H, W)))
        return [str(folder / "zz.png"), "'zz'", "not", "selected"]
    if name == "missing":
        write_answers(folder, ids="abd")
        return ["c.png", "'c'", "missing"]
    if name == "all_unlabeled":
        write_answers(folder, **{i: np.full((H, W), IGNORE) for i in "abcd"})
        return ["requested pixels are unlabeled"]
    if name == "not_single_channel":
        write_answers(folder)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(folder / "a.png")
        return [str(folder / "a.png"), "single-channel"]
    if name == "no_folder":
        return [str(folder), "does not exist"]
    raise AssertionError(name)


BAD_CASES = [
    "wrong_size",
    "unknown_class",
    "not_selected",
    "missing",
    "all_unlabeled",
    "not_single_channel",
    "no_folder",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_import_is_rejected_and_writes_nothing(store, tmp_path, case):
    selection = mixed_selection(store)
    folder = tmp_path / "answers"
    words = bad_case(case, folder)
    assert_rejected_whole(store, lambda: import_labels(selection, str(folder), store, "rounds/02/labels", NUM_CLASSES), words)


def test_bad_import_lists_every_problem_at_once(store, tmp_path):
    selection = mixed_selection(store)
    folder = write_answers(tmp_path / "ans", ids="abc", a=np.zeros((2, 2)), b=np.full((H, W), 9))
    with pytest.raises(LabelImportError) as err:
        import_labels(selection, str(folder), store, "labels", NUM_CLASSES)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "a.png" in message and "[9]" in message and "'d'" in message


def test_reimport_is_refused_and_changes_nothing(store, tmp_path):
    selection = mixed_selection(store)
    answers = write_answers(tmp_path / "answers")
    import_labels(selection, str(answers), store, "rounds/03/labels", NUM_CLASSES)
    before = {k: store.read_bytes(k) for k in store.list(recursive=True)}
    with pytest.raises(LabelImportError, match="already imported"):
        import_labels(selection, str(answers), store, "rounds/03/labels", NUM_CLASSES)
    assert {k: store.read_bytes(k) for k in store.list(recursive=True)} == before


def test_import_rejects_an_ignore_index_inside_the_classes(store, tmp_path):
    selection = mixed_selection(store)
    with pytest.raises(DataError, match="ignore index 2"):
        import_labels(selection, str(tmp_path), store, "labels", 3, ignore_index=2)


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "import_labels.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_imports_a_round_and_exits_2_on_bad_labels(tmp_path):
    run = ArtifactStore(str(tmp_path / "run"))
    run.write_json("state.json", {"num_classes": NUM_CLASSES, "round": 7})
    selection = selection_table([region("a", 0, 0, 2, 3), points("b", [[1, 1]])])
    run.write_table("rounds/07/selection.parquet", selection)

    bad = write_answers(tmp_path / "bad", ids="ab", b=np.zeros((H + 1, W)))
    failed = run_cli("--run", run.root, "--round", "7", "--labels", str(bad))
    assert failed.returncode == 2, failed.stderr
    assert "b.png" in failed.stderr and "expected 6x4 (WxH)" in failed.stderr
    assert run.list("rounds/07/labels", recursive=True) == []

    good = write_answers(tmp_path / "good", ids="ab")
    done = run_cli("--run", run.root, "--round", "7", "--labels", str(good))
    assert done.returncode == 0, done.stderr
    assert "imported 2 label map(s): 7 of 7 requested pixels labeled" in done.stdout
    assert run.list("rounds/07/labels") == [
        "rounds/07/labels/_IMPORTED.json",
        "rounds/07/labels/a.png",
        "rounds/07/labels/b.png",
    ]
    expected_b = np.full((H, W), IGNORE, np.uint8)
    expected_b[1, 1] = truth_of("b")[1, 1]
    np.testing.assert_array_equal(read_png(run, "rounds/07/labels/b.png"), expected_b)


def test_cli_error_path_exits_with_status_2_every_time(tmp_path):
    """Issue 18 saw rc 134 ("terminate called without an active exception") in 3 of 40 runs:
    native threads torn down at interpreter exit. The job now ends with os._exit after
    flushing, so the status is the job's own. (Not reproduced here: 0 of 210 runs before the
    change; this guards the contract, it cannot force the race.)"""
    run = ArtifactStore(str(tmp_path / "run"))
    run.write_json("state.json", {"num_classes": NUM_CLASSES})
    run.write_table("rounds/00/selection.parquet", selection_table([region("a", 0, 0, 2, 3)]))
    bad = write_answers(tmp_path / "bad", ids="a", a=np.zeros((H + 1, W)))
    for _ in range(3):
        failed = run_cli("--run", run.root, "--round", "0", "--labels", str(bad))
        assert failed.returncode == 2 and failed.stderr.rstrip().endswith("expected 6x4 (WxH) for image 'a'"), (
            failed.returncode, failed.stderr[-500:])
