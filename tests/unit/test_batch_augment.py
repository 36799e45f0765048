"""Batched augmentation (segrl.data.batch_augment): known answers against torchvision's
per-image kernels, per-image draws, cutout as ignore, seeds, masks moving with images."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from segrl.data.batch_augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    BatchStrongView,
    StrongParams,
    batch_weak_views,
    gaussian_blur,
)
from segrl.data.transforms import denormalize, normalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TORCHVISION_ADJUST = {BRIGHTNESS: F.adjust_brightness, CONTRAST: F.adjust_contrast,
                      SATURATION: F.adjust_saturation, HUE: F.adjust_hue}


def frames(n: int = 4, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Normalized images, as the DataLoader gives them."""
    return normalize(torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)))


def per_image_reference(image: torch.Tensor, params: StrongParams, i: int, kernel: int, value: float):
    """One image through torchvision's own per-image kernels with the batch's draw for it."""
    out = denormalize(image).clamp(0, 1)
    if params.jitter[i]:
        for kind in params.order[i].tolist():
            out = TORCHVISION_ADJUST[kind](out, float(params.factors[i, kind]))
    if params.grayscale[i]:
        out = F.rgb_to_grayscale(out, 3)
    if params.blur[i]:
        out = F.gaussian_blur(out, [kernel, kernel], [float(params.sigma[i])] * 2)
    out = normalize(out)
    if params.cutout[i]:
        top, left, bh, bw = params.box[i].tolist()
        out[:, top:top + bh, left:left + bw] = value
    return out


def test_each_image_gets_what_torchvision_gives_it_with_its_own_parameters():
    view = BatchStrongView(jitter_p=0.5, grayscale_p=0.5, cutout_value=-1.5)
    images = frames(n=12)
    params = view.draw(12, 24, 32, torch.Generator().manual_seed(0))
    # the draw exercises every branch somewhere in the batch, and not everywhere
    for flags in (params.jitter, params.grayscale, params.blur, params.cutout):
        assert 0 < int(flags.sum()) < 12
    strong, cut = view.apply(images, params)
    for i in range(12):
        expected = per_image_reference(images[i], params, i, view.aug.blur_kernel, -1.5)
        torch.testing.assert_close(strong[i], expected, atol=2e-5, rtol=0)


def test_parameters_differ_within_a_batch():
    """The same image eight times gives eight different strong views."""
    view = BatchStrongView(jitter_p=1.0, grayscale_p=0.0, cutout_p=0.0)
    strong, _ = view(frames(n=1).expand(8, -1, -1, -1), torch.Generator().manual_seed(0))
    flat = strong.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(8) for j in range(i + 1, 8))


def test_cutout_boxes_are_reported_and_painted_and_nothing_else_changes():
    view = BatchStrongView(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutout_p=1.0)
    images = frames(n=6)
    params = view.draw(6, 24, 32, torch.Generator().manual_seed(1))
    strong, cut = view.apply(images, params)
    assert cut.shape == (6, 24, 32) and cut.dtype == torch.bool
    for i in range(6):
        top, left, bh, bw = params.box[i].tolist()
        expected = torch.zeros(24, 32, dtype=torch.bool)
        expected[top:top + bh, left:left + bw] = True
        assert torch.equal(cut[i], expected)
    assert (strong.permute(0, 2, 3, 1)[cut] == 0).all()  # the normalized mean colour
    torch.testing.assert_close(strong.permute(0, 2, 3, 1)[~cut], images.permute(0, 2, 3, 1)[~cut],
                               atol=1e-5, rtol=0)


def test_a_fixed_seed_gives_the_same_views_and_another_seed_others():
    view, images = BatchStrongView(), frames(n=4)
    a = view(images, torch.Generator().manual_seed(5))
    b = view(images, torch.Generator().manual_seed(5))
    c = view(images, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_views_are_float32_normalized_images_in_range_and_the_input_is_untouched():
    images = frames(n=4)
    before = images.clone()
    strong, cut = BatchStrongView(cutout_p=0.0)(images, torch.Generator().manual_seed(0))
    assert strong.dtype == torch.float32 and strong.shape == images.shape and not cut.any()
    pixels = denormalize(strong)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert torch.equal(images, before)


@pytest.mark.parametrize("sigma", [0.1, 0.9, 2.0])
def test_blur_with_a_sigma_per_image_matches_torchvision(sigma):
    images = torch.rand(2, 3, 20, 26, generator=torch.Generator().manual_seed(0))
    out = gaussian_blur(images, 13, torch.tensor([sigma, 0.5]))
    torch.testing.assert_close(out[0], F.gaussian_blur(images[0], [13, 13], [sigma, sigma]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], F.gaussian_blur(images[1], [13, 13], [0.5, 0.5]), atol=1e-6, rtol=0)


def block_frames(n: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels of 4 x 4 blocks of random classes, and uint8 images whose colour is class x 20."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 11, (n, h // 4, w // 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    return (masks * 20).to(torch.uint8).unsqueeze(1).expand(n, 3, h, w).contiguous(), masks


def test_weak_views_move_masks_with_images():
    images, masks = block_frames(8, 48, 64)
    out = batch_weak_views(images, masks, (40, 56), (0.75, 1.5), generator=torch.Generator().manual_seed(0))
    assert out["image"].shape == (8, 3, 40, 56) and out["image"].dtype == torch.float32
    assert out["mask"].dtype == torch.int64 and out["valid"].dtype == torch.bool
    colour = denormalize(out["image"])[:, 0] * 255
    # inside a block (its 3 x 3 neighbourhood one class) the colour is the label's; the
    # crop's outer ring is left out (its neighbours outside the crop are not seen)
    label = out["mask"].float().unsqueeze(1)
    flat = (nnf_max(label) == -nnf_max(-label)).squeeze(1) & out["valid"]
    flat[:, [0, -1]] = False
    flat[:, :, [0, -1]] = False
    assert flat.float().mean() > 0.3
    torch.testing.assert_close(colour[flat], out["mask"][flat].float() * 20, atol=0.5, rtol=0)


def nnf_max(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)


def test_weak_views_pad_a_shrunk_frame_with_ignore_and_black():
    images, masks = block_frames(4, 32, 32)
    out = batch_weak_views(images, masks, (32, 32), (0.5, 0.5), hflip=False,
                           generator=torch.Generator().manual_seed(0))
    assert out["valid"].float().mean().item() == pytest.approx(0.25, abs=0.02)  # a 16 x 16 frame in 32 x 32
    assert (out["mask"][~out["valid"]] == 255).all() and (out["mask"][out["valid"]] != 255).all()
    black = normalize(torch.zeros(3, 1, 1)).view(3)
    torch.testing.assert_close(out["image"].permute(0, 2, 3, 1)[~out["valid"]],
                               black.expand(int((~out["valid"]).sum()), 3), atol=1e-5, rtol=0)


def test_weak_views_at_scale_one_are_the_frame_or_its_mirror_and_both_occur():
    images, masks = block_frames(16, 24, 32)
    out = batch_weak_views(images, masks, (24, 32), (1.0, 1.0), generator=torch.Generator().manual_seed(0))
    flipped = []
    for i in range(16):
        if torch.equal(out["mask"][i], masks[i]):
            flipped.append(False)
        else:
            assert torch.equal(out["mask"][i], masks[i].flip(-1))
            flipped.append(True)
        expected = normalize(images[i].flip(-1).float() / 255 if flipped[-1] else images[i].float() / 255)
        torch.testing.assert_close(out["image"][i], expected, atol=1e-5, rtol=0)
    assert 0 < sum(flipped) < 16
