"""Joint image/mask transforms on sample dicts (torchvision.transforms.v2).

A *raw* sample, as datasets build it before any transform, is
``{"image": tv_tensors.Image uint8 3xHxW, "mask": tv_tensors.Mask uint8 HxW, "id": str}``.
Wrapping image and mask in ``tv_tensors`` is what keeps them aligned: every v2 geometric
transform draws its random parameters once per call and applies them to both, resizing
masks with NEAREST (labels are never interpolated). The pipeline ends with
:class:`ToTensors`, giving the *final* sample
``{"image": float32 3xHxW normalized with ImageNet mean/std, "mask": int64 HxW, "id": str}``
as plain tensors (plain tensors collate and pickle like any other).

Padding and cutout write the ignore index (255) into the mask, so the loss skips pixels
that were invented by augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from segrl.data.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Sample = dict[str, Any]
SampleTransform = Callable[[Sample], Sample]


def to_raw_sample(image: np.ndarray, mask: np.ndarray, sample_id: str) -> Sample:
    """Wrap an HxWx3 uint8 image and HxW uint8 mask as a raw sample of tv_tensors."""
    # np.require copies read-only (PIL-backed) or strided arrays; torch needs writable memory.
    image = np.require(image, dtype=np.uint8, requirements=["C", "W"])
    mask = np.require(mask, requirements=["C", "W"])
    return {
        "image": tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()),
        "mask": tv_tensors.Mask(torch.from_numpy(mask)),
        # 1 on the frame's own pixels; the crop pads it with ignore like the mask, so an
        # unlabeled image (mask all ignore) still tells its padding from its content
        "valid": tv_tensors.Mask(torch.ones(mask.shape[:2], dtype=torch.uint8)),
        "id": sample_id,
    }


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) from an int (square) or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (H, W), got {tuple(size)}")
    return h, w


def _channel_stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std shaped (3, 1, 1) on the image's device and dtype."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return mean, std


def normalize(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float image (..., 3, H, W) -> ImageNet-normalized image of the same shape."""
    mean, std = _channel_stats(image)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: (..., 3, H, W) normalized -> [0, 1] float (unclamped).

    Not clamped so that ``denormalize(normalize(x)) == x``; clamp before saving a picture.
    """
    mean, std = _channel_stats(image)
    return image * std + mean


class ToTensors:
    """Raw sample -> final sample: image float32 normalized 3xHxW, mask int64 HxW, and
    valid bool HxW (False on crop padding) where the raw sample has it."""

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"].as_subclass(torch.Tensor)
        if image.dtype == torch.uint8:
            image = image.to(torch.float32) / 255.0
        out = dict(sample)
        out["image"] = normalize(image.to(torch.float32)).contiguous()
        out["mask"] = sample["mask"].as_subclass(torch.Tensor).to(torch.int64).contiguous()
        if "valid" in sample:
            out["valid"] = (sample["valid"].as_subclass(torch.Tensor) == 1).contiguous()
        return out

    def __repr__(self) -> str:
        return "ToTensors()"


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (relative to the input size).

    Images use bilinear (antialiased) interpolation; masks NEAREST via the v2 kernels.
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        low, high = (float(s) for s in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (low, high)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        low, high = self.scale_range
        scale = low + float(torch.rand(())) * (high - low)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize,
            inpt,
            size=params["size"],
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=True,
        )


class RandomCropPad(v2.Transform):
    """Random crop to ``size`` (H, W); inputs smaller than that are padded first.

    Padding is placed at a random offset so every original pixel stays in the crop.
    Padded image pixels are ``image_fill`` (0), padded mask pixels ``ignore_index``.
    """

    def __init__(
        self, size: int | Sequence[int], image_fill: float = 0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.size = _hw(size)
        self.image_fill = image_fill
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = self.size
        pad_h, pad_w = max(0, ch - h), max(0, cw - w)
        top_pad = int(torch.randint(0, pad_h + 1, ()))
        left_pad = int(torch.randint(0, pad_w + 1, ()))
        padding = [left_pad, top_pad, pad_w - left_pad, pad_h - top_pad]  # l, t, r, b
        top = int(torch.randint(0, h + pad_h - ch + 1, ()))
        left = int(torch.randint(0, w + pad_w - cw + 1, ()))
        return {"padding": padding, "top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if any(params["padding"]):
            fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else self.image_fill
            inpt = self._call_kernel(F.pad, inpt, padding=params["padding"], fill=fill)
        ch, cw = self.size
        return self._call_kernel(
            F.crop, inpt, top=params["top"], left=params["left"], height=ch, width=cw
        )


class Cutout:
    """With probability ``p``, blank one random box: image := ``value``, mask := ignore.

    Works on a final sample (normalized float image 3xHxW, int64 mask HxW); ``value`` is
    in normalized units, so the default 0 paints the ImageNet mean colour. The box area
    is a fraction ``scale`` of the image with aspect ratio (w/h) in ``ratio``.
    """

    def __init__(
        self,
        p: float = 0.5,
        scale: tuple[float, float] = (0.02, 0.4),
        ratio: tuple[float, float] = (0.3, 3.3),
        value: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.p, self.scale, self.ratio = p, scale, ratio
        self.value, self.ignore_index = value, ignore_index

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """A random (top, left, height, width) box inside an HxW image."""
        area = h * w * (self.scale[0] + float(torch.rand(())) * (self.scale[1] - self.scale[0]))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = math.exp(log_lo + float(torch.rand(())) * (log_hi - log_lo))
        bh = min(h, max(1, round(math.sqrt(area / aspect))))
        bw = min(w, max(1, round(math.sqrt(area * aspect))))
        top = int(torch.randint(0, h - bh + 1, ()))
        left = int(torch.randint(0, w - bw + 1, ()))
        return top, left, bh, bw

    def __call__(self, sample: Sample) -> Sample:
        if float(torch.rand(())) >= self.p:
            return sample
        image, mask = sample["image"].clone(), sample["mask"].clone()
        top, left, bh, bw = self.box(image.shape[-2], image.shape[-1])
        image[..., top : top + bh, left : left + bw] = self.value
        mask[..., top : top + bh, left : left + bw] = self.ignore_index
        return {**sample, "image": image, "mask": mask}


class StrongView:
    """Photometric strong augmentation of a final (already weak-augmented) sample.

    Input and output are final samples (normalized float 3xHxW image, int64 HxW mask).
    Colour jitter, grayscale and blur act on the image only (geometry unchanged, so the
    weak view's mask still lines up); cutout then blanks a box and ignores it in the mask.
    The input sample is not modified.
    """

    def __init__(self, photometric: v2.Transform, cutout: Cutout) -> None:
        self.photometric = photometric
        self.cutout = cutout

    def __call__(self, sample: Sample) -> Sample:
        # Jitter is defined on [0, 1] images, so undo the normalization around it.
        image = denormalize(sample["image"].as_subclass(torch.Tensor)).clamp_(0.0, 1.0)
        image = self.photometric(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        out = {**sample, "image": normalize(image).contiguous()}
        return self.cutout(out)


def resize(size: int | Sequence[int]) -> v2.Transform:
    """Resize a raw sample to ``size`` (H, W): image bilinear (antialiased), mask NEAREST."""
    return v2.Resize(_hw(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def weak_transform(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
) -> v2.Compose:
    """Weak view on a raw sample: random scale, random crop (with ignore padding), flip."""
    steps: list[Callable] = [RandomScale(scale_range), RandomCropPad(crop_size)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


class TwoStage:
    """``post(pre(sample))``. ``pre`` is the deterministic part (the resize to
    ``data.base_size``), so a frame's ``pre`` output can be decoded and kept once
    (:class:`segrl.data.cache.CachedFrames`); ``post`` is the random augmentation and the
    conversion, drawn afresh every time."""

    def __init__(self, pre: Callable[[Sample], Sample], post: Callable[[Sample], Sample]) -> None:
        self.pre, self.post = pre, post

    def __call__(self, sample: Sample) -> Sample:
        return self.post(self.pre(sample))


def _unchanged(sample: Sample) -> Sample:
    return sample


def train_transform(
    crop_size: int | Sequence[int],
    base_size: int | Sequence[int] | None = None,
    scale_range: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
) -> TwoStage:
    """Raw sample -> final weak-augmented sample with image 3 x crop_h x crop_w.

    ``base_size`` (H, W), if given, first resizes every frame to a common resolution;
    the random scale is relative to that.
    """
    return TwoStage(resize(base_size) if base_size else _unchanged,
                    v2.Compose([weak_transform(crop_size, scale_range, hflip), ToTensors()]))


def eval_transform(base_size: int | Sequence[int] | None = None) -> TwoStage:
    """Raw sample -> final sample, optionally resized to ``base_size`` (H, W)."""
    return TwoStage(resize(base_size) if base_size else _unchanged, ToTensors())


@dataclass(frozen=True)
class StrongAugmentation:
    """What a strong view draws (FixMatch / S4AL style), shared by the per-sample
    :func:`strong_transform` and the batched ``segrl.data.batch_augment.BatchStrongView``.

    ``jitter`` is (brightness, contrast, saturation, hue) for ``v2.ColorJitter``; each step
    is applied with its probability; cutout blanks a box of ``cutout_scale`` of the image
    with aspect ratio (w/h) in ``cutout_ratio``.
    """

    jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutout_p: float = 0.5
    cutout_scale: tuple[float, float] = (0.02, 0.4)
    cutout_ratio: tuple[float, float] = (0.3, 3.3)
    cutout_value: float = 0.0

    @property
    def blur_kernel(self) -> int:
        """2*ceil(3*sigma)+1 covers the largest sigma; GaussianBlur needs an odd size."""
        return 2 * math.ceil(3 * self.blur_sigma[1]) + 1


def strong_transform(**settings: Any) -> StrongView:
    """Strong view for a final weak sample: returns ``{"image": strong 3xHxW, "mask": HxW}``
    with the cutout box set to the ignore index (other keys copied). ``settings`` override
    :class:`StrongAugmentation`'s defaults by name. One sample at a time, for DataLoader
    pipelines; segrl's recipes use the batched ``BatchStrongView`` on the training device,
    which is tested to draw the same."""
    aug = replace(StrongAugmentation(), **settings)
    photometric = v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(*aug.jitter)], p=aug.jitter_p),
            v2.RandomGrayscale(p=aug.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(aug.blur_kernel, sigma=aug.blur_sigma)], p=aug.blur_p),
        ]
    )
    cutout = Cutout(aug.cutout_p, aug.cutout_scale, aug.cutout_ratio, aug.cutout_value)
    return StrongView(photometric, cutout)
