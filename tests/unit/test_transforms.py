"""Joint transforms: image/mask alignment, ignore padding, cutout, shapes, normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segrl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScale,
    denormalize,
    eval_transform,
    normalize,
    strong_transform,
    to_raw_sample,
    train_transform,
)

H, W = 48, 64
BLOCK_X, BLOCK_Y = 8, 12


def coordinate_sample() -> dict:
    """Image encodes each pixel's coordinates (R = 4x, G = 5y, B = 128); the mask is the
    index of the 8x12 block containing the pixel, so both can be checked after warping."""
    y, x = np.mgrid[0:H, 0:W]
    image = np.stack([4 * x, 5 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    mask = (x // BLOCK_X + (W // BLOCK_X) * (y // BLOCK_Y)).astype(np.uint8)
    return to_raw_sample(image, mask, "coords")


def decode_coordinates(image: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source x, y (pixel index units) and the blue channel of a normalized image."""
    rgb = denormalize(image).numpy() * 255
    return rgb[0] / 4, rgb[1] / 5, rgb[2]


def test_mask_stays_aligned_with_image_after_scale_crop_flip():
    transform = train_transform((40, 56), scale_range=(0.5, 2.0), hflip=True)
    flipped = unflipped = checked = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out = transform(coordinate_sample())
        x, y, blue = decode_coordinates(out["image"])
        mask = out["mask"].numpy()
        real = blue > 64  # not padding
        # A frame is mirrored iff source x decreases along a row of real pixels.
        row = x[real.any(1).argmax()][real[real.any(1).argmax()]]
        if len(row) > 4:
            flipped += row[0] > row[-1]
            unflipped += row[0] < row[-1]
        # NEAREST picks source pixel round(x); skip pixels on block edges and image
        # borders, where the bilinear ramp and nearest pick may legitimately disagree.
        sx, sy = np.floor(x + 0.5), np.floor(y + 0.5)
        safe = (
            real
            & (np.abs((x + 0.5) % BLOCK_X - BLOCK_X / 2) < BLOCK_X / 2 - 1)
            & (np.abs((y + 0.5) % BLOCK_Y - BLOCK_Y / 2) < BLOCK_Y / 2 - 1)
            & (x > 3)
            & (x < W - 4)
            & (y > 3)
            & (y < H - 4)
        )
        expected = sx // BLOCK_X + (W // BLOCK_X) * (sy // BLOCK_Y)
        np.testing.assert_array_equal(mask[safe], expected[safe])
        checked += safe.sum()
    assert flipped > 3 and unflipped > 3
    assert checked > 10_000


def test_padding_is_ignore_in_mask_and_zero_in_image():
    out = train_transform((40, 50), scale_range=(1.0, 1.0), hflip=False)(
        to_raw_sample(np.full((20, 30, 3), 200, np.uint8), np.full((20, 30), 3, np.uint8), "p")
    )
    mask, image = out["mask"], denormalize(out["image"])
    assert (mask == 255).sum() == 40 * 50 - 20 * 30
    assert (mask == 3).sum() == 20 * 30
    padded = mask == 255
    torch.testing.assert_close(
        image[:, padded], torch.zeros(3, int(padded.sum())), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        image[:, ~padded], torch.full((3, 600), 200 / 255), atol=1e-5, rtol=0
    )


def test_resize_never_interpolates_labels():
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 7, 255], np.uint8), size=(33, 41))
    sample = to_raw_sample(rng.integers(0, 255, (33, 41, 3), dtype=np.uint8), mask, "m")
    for base in ((50, 77), (17, 20)):
        out = eval_transform(base)(sample)
        assert out["mask"].shape == base and out["image"].shape == (3, *base)
        assert set(out["mask"].unique().tolist()) <= {0, 7, 255}
    for seed in range(5):
        torch.manual_seed(seed)
        out = train_transform((30, 30), base_size=(40, 40), scale_range=(0.7, 1.6))(sample)
        assert set(out["mask"].unique().tolist()) <= {0, 7, 255}


def test_cutout_box_is_ignore_and_constant():
    torch.manual_seed(0)
    weak = eval_transform()(coordinate_sample())
    before = {k: v.clone() for k, v in weak.items() if torch.is_tensor(v)}
    strong = strong_transform(jitter_p=0, grayscale_p=0, blur_p=0, cutout_p=1.0)(weak)
    box = strong["mask"] == 255
    assert box.any() and not (weak["mask"] == 255).any()
    rows, cols = torch.nonzero(box, as_tuple=True)
    # The ignored pixels form exactly one filled rectangle.
    assert box.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert (strong["image"][:, box] == 0.0).all()
    torch.testing.assert_close(strong["image"][:, ~box], weak["image"][:, ~box], atol=1e-5, rtol=0)
    torch.testing.assert_close(strong["mask"][~box], weak["mask"][~box])
    for key, value in before.items():  # the weak view is not modified in place
        torch.testing.assert_close(weak[key], value)
    assert strong["id"] == "coords"


def test_strong_view_changes_colours_not_geometry():
    torch.manual_seed(1)
    weak = eval_transform()(coordinate_sample())
    strong = strong_transform(jitter_p=1.0, cutout_p=0.0)(weak)
    assert strong["image"].shape == weak["image"].shape
    assert strong["image"].dtype == torch.float32
    assert not torch.allclose(strong["image"], weak["image"])
    torch.testing.assert_close(strong["mask"], weak["mask"])


@settings(max_examples=20, deadline=None)
@given(
    h=st.integers(10, 90),
    w=st.integers(10, 90),
    crop=st.tuples(st.integers(8, 64), st.integers(8, 64)),
    seed=st.integers(0, 1000),
)
def test_train_transform_output_shapes_and_dtypes(h, w, crop, seed):
    torch.manual_seed(seed)
    sample = to_raw_sample(np.zeros((h, w, 3), np.uint8), np.ones((h, w), np.uint8), "s")
    out = train_transform(crop)(sample)
    assert out["image"].shape == (3, *crop) and out["image"].dtype == torch.float32
    assert out["mask"].shape == crop and out["mask"].dtype == torch.int64
    assert type(out["image"]) is torch.Tensor and type(out["mask"]) is torch.Tensor
    assert set(out["mask"].unique().tolist()) <= {1, 255}


def test_normalize_denormalize_round_trip():
    image = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(denormalize(normalize(image)), image)
    mean_colour = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(normalize(mean_colour), torch.zeros(3, 4, 4))
    ones = normalize(torch.ones(3, 1, 1)).flatten()
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(ones, torch.tensor(expected))


def test_eval_transform_converts_uint8_to_normalized_float():
    sample = to_raw_sample(np.full((4, 5, 3), 255, np.uint8), np.zeros((4, 5), np.uint8), "e")
    out = eval_transform()(sample)
    torch.testing.assert_close(denormalize(out["image"]), torch.ones(3, 4, 5))
    assert out["mask"].dtype == torch.int64


def test_bad_scale_range_is_rejected():
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale((2.0, 1.0))


def test_valid_marks_the_frame_and_not_the_crop_padding_of_an_unlabeled_image():
    """An unlabeled frame's mask is all ignore, so only ``valid`` tells padding from content."""
    sample = train_transform((40, 50), scale_range=(1.0, 1.0), hflip=False)(
        to_raw_sample(np.zeros((30, 50, 3), np.uint8), np.full((30, 50), 255, np.uint8), "u"))
    assert sample["valid"].dtype == torch.bool and int(sample["valid"].sum()) == 30 * 50
    assert (sample["mask"] == 255).all()
