"""File datasets on real PNGs: CamVid, Cityscapes, manifests, and the errors bad data raises."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segrl.data.datasets import CamVid, Cityscapes, ManifestDataset
from segrl.data.labels import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN,
    DataError,
)
from segrl.data.manifest import iter_manifest_batches, resolve_uri, write_manifest
from segrl.data.transforms import denormalize

# ../shared/data/camvid beside the checkout, as in CI; SEGRL_CAMVID points elsewhere.
CAMVID_ROOT = Path(
    os.environ.get("SEGRL_CAMVID", Path(__file__).resolve().parents[3] / "shared/data/camvid")
)
needs_camvid = pytest.mark.skipif(
    not (CAMVID_ROOT / "train.txt").is_file(),
    reason=f"real CamVid not found at {CAMVID_ROOT} (set SEGRL_CAMVID to its folder)",
)
rng = np.random.default_rng(0)


def png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(h: int = 6, w: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def tiny_camvid(root: Path, labels: dict[str, np.ndarray], split: str = "train") -> Path:
    """A SegNet-layout folder (no list file): <split>/<name>.png + <split>annot/<name>.png."""
    for name, label in labels.items():
        png(root / split / f"{name}.png", rgb(*label.shape))
        png(root / f"{split}annot" / f"{name}.png", label)
    return root


# --- CamVid (real data) -------------------------------------------------------------


@needs_camvid
def test_real_camvid_splits_shapes_and_void_mapping():
    train, val = CamVid(str(CAMVID_ROOT), "train"), CamVid(str(CAMVID_ROOT), "val")
    assert (len(train), len(val)) == (367, 101)
    assert train.classes == CAMVID_CLASSES and len(train.classes) == 11
    assert train.ignore_index == 255
    sample = train[0]
    assert sample["id"] == "0001TP_006690"
    assert sample["image"].shape == (3, 360, 480) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (360, 480) and sample["mask"].dtype == torch.int64
    raw = np.array(Image.open(CAMVID_ROOT / "trainannot" / "0001TP_006690.png"))
    mask = sample["mask"].numpy()
    assert (raw == 11).any()
    np.testing.assert_array_equal(mask == 255, raw == 11)
    np.testing.assert_array_equal(mask[raw != 11], raw[raw != 11])
    assert len(train.indices(dusk=True)) == 62 and CamVid.sequence(sample["id"]) == "0001TP"
    assert train.indices(dusk=False) and not val.indices(dusk=True)


# --- CamVid layout on tiny folders --------------------------------------------------


def test_camvid_folder_fallback_pairs_by_name_and_maps_void(tmp_path):
    label = np.array([[0, 3, 10, 11], [11, 5, 255, 1]], np.uint8)
    root = tiny_camvid(tmp_path, {"0006R0_b": label, "0001TP_a": label})
    ds = CamVid(str(root), "train")
    assert ds.ids == ["0001TP_a", "0006R0_b"]  # sorted, file stems
    assert ds.sequences == ["0001TP", "0006R0"] and ds.indices(dusk=True) == [0]
    expected = np.where(label == 11, 255, label)
    np.testing.assert_array_equal(ds[1]["mask"].numpy(), expected)
    image = np.array(Image.open(root / "train" / "0006R0_b.png"))
    torch.testing.assert_close(
        denormalize(ds[1]["image"]), torch.from_numpy(image).permute(2, 0, 1) / 255.0
    )


def test_camvid_list_file_strips_segnet_prefix(tmp_path):
    root = tiny_camvid(tmp_path, {"x": np.zeros((6, 8), np.uint8)}, split="val")
    (root / "val.txt").write_text("/SegNet/CamVid/val/x.png /SegNet/CamVid/valannot/x.png\n\n")
    ds = CamVid(str(root), "val")
    assert ds.ids == ["x"] and ds[0]["mask"].shape == (6, 8)


def test_camvid_label_with_unknown_class_names_file_and_value(tmp_path):
    root = tiny_camvid(tmp_path, {"bad": np.array([[0, 12], [12, 3]], np.uint8)})
    ds = CamVid(str(root), "train")
    with pytest.raises(DataError, match=r"bad\.png.*\[12\]"):
        ds[0]


def test_camvid_image_without_label_names_the_image(tmp_path):
    root = tiny_camvid(tmp_path, {"ok": np.zeros((6, 8), np.uint8)})
    png(root / "train" / "lonely.png", rgb())
    with pytest.raises(DataError, match=r"lonely\.png has no label"):
        CamVid(str(root), "train")


def test_camvid_list_entry_without_label_names_the_image(tmp_path):
    root = tiny_camvid(tmp_path, {"x": np.zeros((6, 8), np.uint8)})
    (root / "train.txt").write_text("/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/y.png\n")
    with pytest.raises(DataError, match=r"x\.png has no label"):
        CamVid(str(root), "train")


def test_truncated_png_is_an_error_naming_the_file(tmp_path):
    root = tiny_camvid(tmp_path, {"cut": np.zeros((64, 64), np.uint8)})
    whole = png_bytes(rgb(64, 64))
    (root / "train" / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        CamVid(str(root), "train")[0]


def test_non_image_bytes_are_an_error_naming_the_file(tmp_path):
    root = tiny_camvid(tmp_path, {"junk": np.zeros((6, 8), np.uint8)})
    (root / "trainannot" / "junk.png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"trainannot/junk\.png"):
        CamVid(str(root), "train")[0]


def test_image_label_size_mismatch_names_both_sizes(tmp_path):
    root = tiny_camvid(tmp_path, {"m": np.zeros((6, 8), np.uint8)})
    png(root / "train" / "m.png", rgb(12, 16))
    with pytest.raises(DataError, match=r"16x12.*8x6"):
        CamVid(str(root), "train")[0]


def test_rgb_label_is_rejected(tmp_path):
    root = tiny_camvid(tmp_path, {"c": np.zeros((6, 8), np.uint8)})
    png(root / "trainannot" / "c.png", rgb())
    with pytest.raises(DataError, match=r"c\.png.*single-channel"):
        CamVid(str(root), "train")[0]


def test_missing_root_and_split_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{missing}.*does not exist.*expected"):
        CamVid(str(missing), "train")
    tiny_camvid(tmp_path, {"x": np.zeros((6, 8), np.uint8)})
    with pytest.raises(DataError, match=r"split 'test'.*test\.txt"):
        CamVid(str(tmp_path), "test")
    with pytest.raises(DataError, match=rf"{missing}.*does not exist"):
        Cityscapes(str(missing), "train")


# --- Cityscapes ---------------------------------------------------------------------


def tiny_cityscapes(root: Path, label: np.ndarray, split: str = "train") -> Path:
    stem = "aachen_000000_000019"
    png(root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png", rgb(*label.shape))
    png(root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelIds.png", label)
    return root


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    label = np.array([[7, 26, 0, 33], [24, 8, 11, 23]], np.uint8)
    ds = Cityscapes(str(tiny_cityscapes(tmp_path, label)), "train")
    assert len(ds) == 1 and ds.ids == ["aachen_000000_000019"]
    assert ds.classes == CITYSCAPES_CLASSES and len(ds.classes) == 19
    expected = [[0, 13, 255, 18], [11, 1, 2, 10]]  # road, car, void, bicycle / person, ...
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expected)


def test_cityscapes_full_label_table(tmp_path):
    label = np.arange(34, dtype=np.uint8).reshape(2, 17)
    ds = Cityscapes(str(tiny_cityscapes(tmp_path, label)), "train")
    mapped = ds[0]["mask"].numpy().ravel()
    for label_id in range(34):
        assert mapped[label_id] == CITYSCAPES_LABEL_TO_TRAIN.get(label_id, 255)
    assert sorted(CITYSCAPES_LABEL_TO_TRAIN.values()) == list(range(19))


def test_cityscapes_errors(tmp_path):
    root = tiny_cityscapes(tmp_path, np.array([[7, 34]], np.uint8))
    with pytest.raises(DataError, match=r"labelIds\.png.*\[34\]"):
        Cityscapes(str(root), "train")[0]
    png(root / "leftImg8bit" / "train" / "bonn" / "bonn_000001_000002_leftImg8bit.png", rgb())
    with pytest.raises(DataError, match=r"bonn_000001_000002_leftImg8bit\.png has no label"):
        Cityscapes(str(root), "train")
    with pytest.raises(DataError, match=r"leftImg8bit/val"):
        Cityscapes(str(root), "val")


# --- Manifests ----------------------------------------------------------------------

CLASSES = ("a", "b", "c")


def pool(root: Path, n: int = 4) -> list[dict]:
    """n frames under root/img and root/lbl; rows with relative URIs; odd rows unlabeled."""
    rows = []
    for i in range(n):
        png(root / "img" / f"{i:04d}.png", rgb(5, 7))
        row = {
            "id": f"{i:04d}",
            "image_uri": f"img/{i:04d}.png",
            "label_uri": None,
            "domain": "day" if i < 2 else "dusk",
        }
        if i % 2 == 0:
            png(root / "lbl" / f"{i:04d}.png", np.full((5, 7), i % 3, np.uint8))
            row["label_uri"] = f"lbl/{i:04d}.png"
        rows.append(row)
    return rows


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_manifest_relative_uris_labeled_and_unlabeled(tmp_path, fmt):
    rows = pool(tmp_path)
    uri = write_manifest(rows, str(tmp_path / f"m.{fmt}"), classes=CLASSES)
    ds = ManifestDataset(uri, classes=CLASSES)
    assert len(ds) == 4 and ds.classes == CLASSES and ds.ignore_index == 255
    assert [ds[i]["id"] for i in range(4)] == ["0000", "0001", "0002", "0003"]  # zeros kept
    np.testing.assert_array_equal(ds[2]["mask"].numpy(), np.full((5, 7), 2))
    assert (ds[1]["mask"] == 255).all() and ds[1]["mask"].shape == (5, 7)
    assert [ds.is_labeled(i) for i in range(4)] == [True, False, True, False]
    assert ds.image_uri(0) == str(tmp_path / "img" / "0000.png")
    image = np.array(Image.open(tmp_path / "img" / "0003.png"))
    torch.testing.assert_close(
        denormalize(ds[3]["image"]), torch.from_numpy(image).permute(2, 0, 1) / 255.0
    )
    assert "domain" not in ds[0]  # metadata only on request
    assert ManifestDataset(uri, classes=CLASSES, metadata_columns=["domain"])[3]["domain"] == "dusk"


def test_manifest_without_label_column_and_absolute_file_uris(tmp_path):
    rows = [{"image_uri": f"file://{tmp_path}/img/{i:04d}.png"} for i in range(2)]
    pool(tmp_path, 2)
    uri = write_manifest(rows, str(tmp_path / "sub" / "m.csv"))
    ds = ManifestDataset(f"file://{uri}", classes=CLASSES)
    assert ds[1]["id"] == "0001"  # no id column: the image file stem
    assert (ds[0]["mask"] == 255).all()


def test_write_manifest_requires_image_column(tmp_path):
    with pytest.raises(DataError, match="'image_uri'"):
        write_manifest([{"id": "a", "path": "x.png"}], str(tmp_path / "m.parquet"))


def test_manifest_classes_from_parquet_metadata_and_required_otherwise(tmp_path):
    rows = pool(tmp_path, 2)
    assert (
        ManifestDataset(write_manifest(rows, str(tmp_path / "m.parquet"), CLASSES)).classes
        == CLASSES
    )
    csv = write_manifest(rows, str(tmp_path / "m.csv"), CLASSES)
    with pytest.raises(DataError, match="class names"):
        ManifestDataset(csv)


def test_manifest_missing_image_column_names_column_and_file(tmp_path):
    uri = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"id": ["a"], "path": ["x.png"]}), uri)
    with pytest.raises(DataError, match=r"m\.parquet.*'image_uri'"):
        ManifestDataset(uri, classes=CLASSES)
    ds = ManifestDataset(uri, classes=CLASSES, image_column="path")  # renamed column is fine
    assert len(ds) == 1


def test_manifest_is_lazy_and_bad_rows_fail_on_access(tmp_path):
    rows = pool(tmp_path, 2) + [
        {"id": "ghost", "image_uri": "img/ghost.png"},
        {"id": "bad", "image_uri": "img/0000.png", "label_uri": "lbl/bad.png"},
    ]
    bad = np.zeros((5, 7), np.uint8)
    bad[0, 0], bad[1, 1] = 7, 3  # classes are 0..2
    png(tmp_path / "lbl" / "bad.png", bad)
    ds = ManifestDataset(write_manifest(rows, str(tmp_path / "m.parquet")), classes=CLASSES)
    assert len(ds) == 4  # no image was opened to build the dataset
    with pytest.raises(DataError, match=r"ghost\.png"):
        ds[2]
    with pytest.raises(DataError, match=r"bad\.png.*\[3, 7\]"):
        ds[3]
    with pytest.raises(DataError, match=r"missing\.parquet does not exist"):
        ManifestDataset(str(tmp_path / "missing.parquet"), classes=CLASSES)


def test_manifest_dataset_pickles_and_collates(tmp_path):
    ds = ManifestDataset(
        write_manifest(pool(tmp_path), str(tmp_path / "m.parquet")), classes=CLASSES
    )
    clone = pickle.loads(pickle.dumps(ds))
    batch = next(iter(torch.utils.data.DataLoader(clone, batch_size=4)))
    assert batch["image"].shape == (4, 3, 5, 7) and batch["mask"].shape == (4, 5, 7)
    assert batch["id"] == ["0000", "0001", "0002", "0003"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_iter_manifest_batches_streams_all_rows(tmp_path, fmt):
    rows = [{"id": str(i), "image_uri": f"img/{i}.png", "label_uri": None} for i in range(1000)]
    uri = write_manifest(rows, str(tmp_path / f"big.{fmt}"))
    batches = list(iter_manifest_batches(uri, 128))
    assert all(0 < b.num_rows <= 128 for b in batches) and len(batches) >= 8
    assert sum(b.num_rows for b in batches) == 1000
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    assert ids == [str(i) for i in range(1000)]
    only = next(iter_manifest_batches(uri, 10, columns=["image_uri"]))
    assert only.schema.names == ["image_uri"]
    with pytest.raises(DataError, match="'nope'"):
        next(iter_manifest_batches(uri, 10, columns=["nope"]))


def test_resolve_uri():
    assert resolve_uri("s3://bucket/pools", "a/../img/x.png") == "s3://bucket/pools/img/x.png"
    assert resolve_uri("s3://bucket/pools", "s3://other/y.png") == "s3://other/y.png"
    assert resolve_uri("/data/pools", "/abs/z.png") == "/abs/z.png"
    assert resolve_uri("/data/pools", "img/z.png") == "/data/pools/img/z.png"
