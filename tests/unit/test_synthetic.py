"""Synthetic scenes: determinism, label range, long tail, domain shift, splits, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segrl.data.datasets import ManifestDataset
from segrl.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticScenes,
    render_scene,
    split_offset,
    write_synthetic_dataset,
)
from segrl.data.transforms import train_transform

SIZE = (96, 128)
NUM_CLASSES = len(SYNTHETIC_CLASSES)


def class_histogram(domain: str, frames: int = 50, seed: int = 0) -> np.ndarray:
    """Pixel count per class (index 0..C-1) and ignore (index C) over ``frames`` frames."""
    counts = np.zeros(256, dtype=np.int64)
    for i in range(frames):
        _, label = render_scene(seed, i, SIZE, domain)
        counts += np.bincount(label.ravel(), minlength=256)
    return np.append(counts[:NUM_CLASSES], counts[255])


def test_same_seed_and_index_give_identical_frames_regardless_of_order_or_count():
    first = render_scene(3, 17, SIZE, "target")
    for i in (5, 1, 40):  # render others in between: no hidden global state
        render_scene(3, i, SIZE, "target")
    again = render_scene(3, 17, SIZE, "target")
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])

    small, large = SyntheticScenes(5, SIZE, seed=2), SyntheticScenes(500, SIZE, seed=2)
    for i in reversed(range(5)):
        np.testing.assert_array_equal(small.render(i)[0], large.render(i)[0])
        np.testing.assert_array_equal(small.render(i)[1], large.render(i)[1])


def test_different_seeds_and_indices_give_different_frames():
    base_image, base_label = render_scene(0, 0, SIZE)
    for seed, index in ((1, 0), (0, 1)):
        image, label = render_scene(seed, index, SIZE)
        assert not np.array_equal(image, base_image)
        assert not np.array_equal(label, base_label)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    index=st.integers(0, 2**40),
    h=st.integers(8, 200),
    w=st.integers(8, 200),
    domain=st.sampled_from(["source", "target"]),
)
def test_any_size_gives_uint8_frames_with_labels_in_range(seed, index, h, w, domain):
    image, label = render_scene(seed, index, (h, w), domain)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert label.shape == (h, w) and label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= set(range(NUM_CLASSES)) | {255}


def test_class_frequencies_are_long_tailed_and_all_classes_appear():
    hist = class_histogram("source")
    per_class = hist[:NUM_CLASSES]
    assert (per_class > 0).all(), dict(zip(SYNTHETIC_CLASSES, per_class, strict=True))
    assert per_class.max() > 10 * per_class.min()
    # Rare classes appear in only some frames, and some ignore pixels exist.
    has_bicycle = [
        (render_scene(0, i, SIZE)[1] == SYNTHETIC_CLASSES.index("bicycle")).any() for i in range(50)
    ]
    assert 0 < sum(has_bicycle) < 25
    assert hist[NUM_CLASSES] > 0


def test_target_domain_differs_in_colour_but_not_in_label_statistics():
    source_mean = np.mean(
        [render_scene(0, i, SIZE, "source")[0].mean((0, 1)) for i in range(30)], 0
    )
    target_mean = np.mean(
        [render_scene(0, i, SIZE, "target")[0].mean((0, 1)) for i in range(30)], 0
    )
    assert np.abs(source_mean - target_mean).max() > 40  # dusk: much darker, shifted hue
    assert target_mean.mean() < 0.7 * source_mean.mean()

    source_freq = class_histogram("source") / class_histogram("source").sum()
    target_freq = class_histogram("target") / class_histogram("target").sum()
    assert np.abs(source_freq - target_freq).sum() < 0.1  # total variation x2


def test_splits_use_disjoint_frames_and_ids():
    offsets = {split_offset(s) for s in ("train", "val", "test", "pool", "extra")}
    assert len(offsets) == 5
    train, val = SyntheticScenes(4, SIZE, split="train"), SyntheticScenes(4, SIZE, split="val")
    assert not set(train[i]["id"] for i in range(4)) & set(val[i]["id"] for i in range(4))
    for i in range(4):
        assert not np.array_equal(train.render(i)[0], val.render(i)[0])


def test_dataset_yields_normalized_samples_and_applies_transform():
    ds = SyntheticScenes(3, SIZE, domain="target", seed=1, split="val")
    assert len(ds) == 3 and ds.classes == SYNTHETIC_CLASSES and ds.ignore_index == 255
    sample = ds[2]
    assert sample["image"].shape == (3, *SIZE) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == SIZE and sample["mask"].dtype == torch.int64
    assert -3 < float(sample["image"].mean()) < 3
    torch.testing.assert_close(sample["mask"], torch.from_numpy(ds.render(2)[1]).long())

    cropped = SyntheticScenes(2, SIZE, transform=train_transform((64, 64)))[0]
    assert cropped["image"].shape == (3, 64, 64) and cropped["mask"].shape == (64, 64)
    with pytest.raises(IndexError):
        ds.render(3)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        render_scene(0, 0, SIZE, "night")
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 0, (4, 100))
    with pytest.raises(ValueError, match="seed"):
        SyntheticScenes(3, SIZE, seed=-1)


def test_write_synthetic_dataset_round_trips_through_manifest(tmp_path):
    manifest = write_synthetic_dataset(str(tmp_path), 4, (48, 64), "target", 5, "pool")
    assert manifest == str(tmp_path / "pool.parquet")
    ds = ManifestDataset(manifest, metadata_columns=["domain", "index"])
    scenes = SyntheticScenes(4, (48, 64), "target", 5, "pool")
    assert ds.classes == SYNTHETIC_CLASSES and len(ds) == 4
    for i in range(4):
        image, mask = ds.load(i)
        expected_image, expected_mask = scenes.render(i)
        np.testing.assert_array_equal(image, expected_image)  # PNG is lossless
        np.testing.assert_array_equal(mask, expected_mask)
        sample = ds[i]
        assert sample["id"] == scenes[i]["id"] and sample["domain"] == "target"
        assert sample["index"] == i
    assert (tmp_path / "pool" / "images" / f"{ds.sample_id(0)}.png").is_file()
