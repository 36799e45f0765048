"""Augmentation of whole batches on the training device, every image with its own draw.

The per-sample transforms of :mod:`segrl.data.transforms` run one image at a time in the
DataLoader; a recipe that augments the batch it already holds on its device (the strong
view of a mean teacher's unlabeled images, after the teacher labeled the weak view) would
have to move it to the CPU and back, image by image. These act on ``B x 3 x H x W``
tensors wherever they are, with the same code on CPU and GPU: the random parameters are
drawn on the CPU (from ``generator``, else the global torch stream) as ``B``-long vectors,
and the pixels are touched by batched tensor ops.

:class:`BatchStrongView` draws what :func:`segrl.data.transforms.strong_transform` draws
for each image (torchvision v2's ColorJitter in a random order of its four adjustments,
RandomGrayscale, GaussianBlur with v2's kernel, and a cutout box that becomes ignore), so
the strong views are the same in distribution. :func:`batch_weak_views` is a batched
random scale / crop / flip of uint8 frames held in memory (one ``grid_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F

# torchvision's own batched RGB <-> HSV conversions (what v2.ColorJitter's hue uses); the
# public adjust_hue takes one hue shift per call, these take the whole batch at once.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from segrl.data.labels import IGNORE_INDEX
from segrl.data.transforms import StrongAugmentation, denormalize, normalize

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # v2.ColorJitter's order of its adjustments


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + torch.rand(n, generator=generator) * (high - low)


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B`` values shaped ``B x 1 x 1 x 1`` on ``like``'s device and dtype."""
    return values.to(like.device, like.dtype).view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """v2's ``_blend`` with one ratio per image: ``ratio * image + (1 - ratio) * other`` in [0, 1]."""
    ratio = _per_image(ratio, image)
    return (image * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(image, torch.zeros_like(image), factor)


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = F.rgb_to_grayscale(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(image, F.rgb_to_grayscale(image), factor)


def adjust_hue(image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Hue moved by ``shift`` (``B``, in turns, within [-0.5, 0.5]) as v2's adjust_hue does."""
    hsv = _rgb_to_hsv(image)
    hue = (hsv[:, 0] + _per_image(shift, image).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


ADJUSTMENTS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
               SATURATION: adjust_saturation, HUE: adjust_hue}


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Each image blurred with its own ``sigma`` (``B``), with v2's kernel and reflect padding.

    The separable blur along each axis is a matrix product with a banded ``n x n`` matrix
    per image (the reflect padding folded in): batched matmuls, where a depthwise
    convolution with a different kernel per image runs many times slower on CPUs.
    """
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, dtype=image.dtype, device=image.device)
    kernel = torch.softmax(-(x / sigma.to(image.device, image.dtype).view(-1, 1)).pow(2), dim=1)  # B x k
    rows = _blur_matrix(kernel, image.shape[-2])  # B x H x H
    cols = _blur_matrix(kernel, image.shape[-1])  # B x W x W
    return rows.unsqueeze(1) @ image @ cols.transpose(1, 2).unsqueeze(1)


def _blur_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """``B x n x n`` matrices ``M`` with ``(M @ v)[i] = sum_t kernel[t] v[reflect(i + t - k // 2)]``."""
    b, k = kernel.shape
    if n <= k // 2:
        raise ValueError(f"cannot blur a side of {n} pixels with a {k}-tap kernel (reflect padding needs more)")
    taps = torch.arange(n, device=kernel.device).view(n, 1) + torch.arange(k, device=kernel.device) - k // 2
    taps = taps.abs()  # reflect at the start: -1 -> 1
    taps = torch.where(taps > n - 1, 2 * (n - 1) - taps, taps)  # and at the end: n -> n - 2
    matrix = torch.zeros(b, n, n, dtype=kernel.dtype, device=kernel.device)
    return matrix.scatter_add_(2, taps.expand(b, n, k), kernel.view(b, 1, k).expand(b, n, k))


@dataclass
class StrongParams:
    """One batch's draw: per image (``B``-long CPU tensors) whether each step applies, its
    factors, the jitter order and the cutout box."""

    jitter: torch.Tensor  # bool
    order: torch.Tensor  # B x 4: the adjustments (BRIGHTNESS...) in the order they apply
    factors: torch.Tensor  # B x 4: brightness, contrast, saturation factors; hue shift
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor
    cutout: torch.Tensor  # bool
    box: torch.Tensor  # B x 4: top, left, height, width


class BatchStrongView:
    """Strong views of a batch of normalized images ``B x 3 x H x W`` and the pixels its
    cutout boxes blanked (``B x H x W`` bool: no label may be learned there).

    Its settings are :func:`segrl.data.transforms.strong_transform`'s (one StrongAugmentation). The photometric
    steps work on [0, 1] images (undone and redone around them); geometry never changes,
    so the weak view's labels stay aligned. The input is not modified.
    """

    def __init__(self, **settings: Any) -> None:
        """``settings`` override :class:`~segrl.data.transforms.StrongAugmentation`'s defaults by name."""
        self.aug = replace(StrongAugmentation(), **settings)
        if not 0.0 <= self.aug.jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {self.aug.jitter[3]}")

    def draw(self, n: int, h: int, w: int, generator: torch.Generator | None = None) -> StrongParams:
        """The random parameters of ``n`` images of ``h x w``."""
        aug = self.aug
        b, c, s, hue = aug.jitter
        factors = torch.stack([_uniform(n, max(0.0, 1 - b), 1 + b, generator),
                               _uniform(n, max(0.0, 1 - c), 1 + c, generator),
                               _uniform(n, max(0.0, 1 - s), 1 + s, generator),
                               _uniform(n, -hue, hue, generator)], dim=1)
        area = h * w * _uniform(n, *aug.cutout_scale, generator)
        aspect = torch.exp(_uniform(n, math.log(aug.cutout_ratio[0]), math.log(aug.cutout_ratio[1]), generator))
        box_h = (area / aspect).sqrt().round().clamp(1, h).long()
        box_w = (area * aspect).sqrt().round().clamp(1, w).long()
        # a uniform integer offset in [0, size - box] for each image's own box
        top = (torch.rand(n, generator=generator) * (h - box_h + 1)).long().clamp(max=h - box_h)
        left = (torch.rand(n, generator=generator) * (w - box_w + 1)).long().clamp(max=w - box_w)
        return StrongParams(
            jitter=torch.rand(n, generator=generator) < aug.jitter_p,
            order=torch.rand(n, 4, generator=generator).argsort(dim=1),  # a random permutation each
            factors=factors,
            grayscale=torch.rand(n, generator=generator) < aug.grayscale_p,
            blur=torch.rand(n, generator=generator) < aug.blur_p,
            sigma=_uniform(n, *aug.blur_sigma, generator),
            cutout=torch.rand(n, generator=generator) < aug.cutout_p,
            box=torch.stack([top, left, box_h, box_w], dim=1),
        )

    def __call__(self, images: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        params = self.draw(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)

    def apply(self, images: torch.Tensor, params: StrongParams) -> tuple[torch.Tensor, torch.Tensor]:
        image = denormalize(images.float()).clamp_(0.0, 1.0)
        for position in range(4):
            for kind, adjust in ADJUSTMENTS.items():
                image = _on_subset(image, params.jitter & (params.order[:, position] == kind),
                                   lambda sub, idx, k=kind, f=adjust: f(sub, params.factors[idx, k]))
        image = _on_subset(image, params.grayscale, lambda sub, idx: F.rgb_to_grayscale(sub, 3))
        image = _on_subset(image, params.blur,
                           lambda sub, idx: gaussian_blur(sub, self.aug.blur_kernel, params.sigma[idx]))
        image = normalize(image)
        cut = box_masks(params.box, params.cutout, image.shape[-2], image.shape[-1], image.device)
        return image.masked_fill_(cut.unsqueeze(1), self.aug.cutout_value).contiguous(), cut


def _on_subset(image: torch.Tensor, chosen: torch.Tensor, step) -> torch.Tensor:
    """``image`` with ``step(image[idx], idx)`` written into the chosen images (a CPU
    bool ``B``) only; the others are not computed at all."""
    idx = chosen.nonzero().flatten()
    if idx.numel() == 0:
        return image
    if idx.numel() == image.shape[0]:
        return step(image, idx)
    out = image.clone()
    out[idx.to(image.device)] = step(image[idx.to(image.device)], idx)
    return out


def box_masks(box: torch.Tensor, enabled: torch.Tensor, h: int, w: int, device: torch.device) -> torch.Tensor:
    """``B x H x W`` bool, True inside each enabled image's ``(top, left, height, width)`` box."""
    box, enabled = box.to(device), enabled.to(device)
    rows = torch.arange(h, device=device).view(1, h)
    cols = torch.arange(w, device=device).view(1, w)
    top, left, bh, bw = box.unbind(1)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + bh).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + bw).view(-1, 1))
    return (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)) & enabled.view(-1, 1, 1)


def batch_weak_views(
    images: torch.Tensor,
    masks: torch.Tensor,
    crop_size: Sequence[int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Weak views of frames ``B x 3 x H x W`` uint8 and labels ``B x H x W``: each image
    rescaled by its own factor from ``scale_range``, cropped to ``crop_size`` at a random
    place (padded where the rescaled frame is smaller, the padding ignore in the mask and
    0 in the image) and flipped with probability 1/2.

    One ``grid_sample`` per batch, bilinear for images and nearest for labels (labels are
    never interpolated). Returns the final batch: ``image`` float32 normalized, ``mask``
    int64, ``valid`` bool (False on padding), on the input's device.
    """
    b, _, h, w = images.shape
    ch, cw = (int(s) for s in crop_size)
    scale = _uniform(b, *scale_range, generator)
    # the crop's top-left corner in rescaled pixels: anywhere the crop overlaps the frame
    # fully, or (frame smaller than the crop) anywhere that keeps the frame inside it
    span_h, span_w = h * scale - ch, w * scale - cw
    top = torch.rand(b, generator=generator) * span_h
    left = torch.rand(b, generator=generator) * span_w
    flip = torch.rand(b, generator=generator) < 0.5 if hflip else torch.zeros(b, dtype=torch.bool)
    # output pixel (y, x) samples input pixel ((top + y + 0.5) / scale - 0.5, ...), in the
    # normalized coordinates of grid_sample(align_corners=False)
    ys = (torch.arange(ch) + 0.5).view(1, ch)
    xs = (torch.arange(cw) + 0.5).view(1, cw)
    src_y = (top.view(-1, 1) + ys) / scale.view(-1, 1) / h * 2 - 1  # B x ch
    src_x = (left.view(-1, 1) + xs) / scale.view(-1, 1) / w * 2 - 1  # B x cw
    src_x = torch.where(flip.view(-1, 1), src_x.flip(1), src_x)
    grid = torch.stack(torch.broadcast_tensors(src_x.view(b, 1, cw), src_y.view(b, ch, 1)), dim=-1)
    grid = grid.to(images.device)
    # labels + 1 so that the zeros grid_sample pads with mark the padding
    label = nnf.grid_sample((masks.float() + 1).unsqueeze(1), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False).squeeze(1).long()
    valid = label > 0
    # border: the frame's edge pixels are not blended with the black outside; the padding
    # is then black exactly where the mask says ignore
    image = nnf.grid_sample(images.float() / 255.0, grid, mode="bilinear", padding_mode="border", align_corners=False)
    image = image * valid.unsqueeze(1)
    return {"image": normalize(image).contiguous(),
            "mask": torch.where(valid, label - 1, torch.full_like(label, ignore_index)),
            "valid": valid}
