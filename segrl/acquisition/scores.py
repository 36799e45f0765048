"""Acquisition scores: pure functions over softmax probabilities and label maps.

Every score follows one convention: higher means "label this first". The one
exception is :func:`stability`, a *reliability* score (ST++) where higher means
"trust this pseudo label"; :func:`instability` is its selection-side mirror.

Shapes: ``probs`` is ``B x C x H x W`` softmax output, a label map (``pred``) is
``B x H x W`` int64 class ids, a pixel score map is ``B x H x W`` float, an image
score is ``B`` and a region score map is ``B x Rh x Rw`` with
``Rh = ceil(H / rh)``, ``Rw = ceil(W / rw)`` for a region size ``(rh, rw)``.
Pixel scores, reductions and region scores all lie in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from segrl.metrics import IGNORE_INDEX

PixelScore = Callable[[torch.Tensor], torch.Tensor]
Reduction = Callable[..., torch.Tensor]
RegionSize = int | tuple[int, int]

# ---------------------------------------------------------------------------
# helpers


def _check_probs(probs: torch.Tensor) -> None:
    if probs.dim() != 4:
        raise ValueError(f"probs must be B x C x H x W, got shape {tuple(probs.shape)}")


def _check_labels(pred: torch.Tensor, num_classes: int, name: str = "pred") -> None:
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"{name} holds class ids outside 0..{num_classes - 1}")


def _pair(region_size: RegionSize) -> tuple[int, int]:
    rh, rw = (region_size, region_size) if isinstance(region_size, int) else region_size
    if rh <= 0 or rw <= 0:
        raise ValueError(f"region_size must be positive, got {region_size}")
    return int(rh), int(rw)


def _normalised_entropy(p: torch.Tensor, dim: int, num_classes: int) -> torch.Tensor:
    """Entropy of distributions ``p`` along ``dim`` divided by log(C), clamped to [0, 1]."""
    if num_classes <= 1:
        # One class carries no uncertainty; log(1) = 0 would divide by zero.
        return torch.zeros_like(p.sum(dim))
    # xlogy gives exactly 0 for p = 0, so one-hot inputs score 0 without an epsilon;
    # the clamp removes tiny negative values that float softmax can produce.
    ent = -torch.special.xlogy(p.clamp(min=0), p.clamp(min=0)).sum(dim)
    return (ent / math.log(num_classes)).clamp(0.0, 1.0)


def _lookup(registry: dict[str, Callable], name: str, kind: str) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(
            f"unknown {kind} {name!r}; valid names: {', '.join(sorted(registry))}"
        ) from None


# ---------------------------------------------------------------------------
# pixel scores: B x C x H x W -> B x H x W


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each pixel's class distribution, normalised by log(C).

    ``B x C x H x W -> B x H x W`` in ``[0, 1]``: uniform -> 1, one-hot -> 0.
    The entropy criterion of STAL's image-level selection and of RIPU's
    uncertainty term.
    """
    _check_probs(probs)
    return _normalised_entropy(probs, dim=1, num_classes=probs.shape[1])


def least_confidence(probs: torch.Tensor) -> torch.Tensor:
    """``1 - max_c p``: ``B x C x H x W -> B x H x W``. One-hot -> 0, uniform -> 1 - 1/C."""
    _check_probs(probs)
    return (1.0 - probs.amax(dim=1)).clamp(0.0, 1.0)


def margin(probs: torch.Tensor) -> torch.Tensor:
    """``1 - (p1 - p2)`` with p1, p2 the two largest probabilities: ``B x C x H x W -> B x H x W``.

    Uniform -> 1 (a tie between the top two), one-hot -> 0. With a single class
    p2 is taken as 0.
    """
    _check_probs(probs)
    top = probs.topk(min(2, probs.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return (1.0 - (top[:, 0] - second)).clamp(0.0, 1.0)


PIXEL_SCORES: dict[str, PixelScore] = {
    "entropy": pixel_entropy,
    "least_confidence": least_confidence,
    "margin": margin,
}


def get_pixel_score(name: str) -> PixelScore:
    """The pixel score registered under ``name``; KeyError lists the valid names."""
    return _lookup(PIXEL_SCORES, name, "pixel score")


# ---------------------------------------------------------------------------
# reductions: B x H x W pixel scores -> B image scores


def _valid_mask(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 3:
        raise ValueError(f"scores must be B x H x W, got shape {tuple(scores.shape)}")
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} != scores shape {tuple(scores.shape)}")
    return valid.bool()


def reduce_mean(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pixel score per image: ``B x H x W`` (+ bool mask ``B x H x W``) -> ``B``.

    Only pixels where ``valid`` is true count; an image with none scores 0.
    """
    mask = _valid_mask(scores, valid)
    total = scores.masked_fill(~mask, 0).sum(dim=(1, 2))
    count = mask.sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def reduce_top_q(
    scores: torch.Tensor, q: float = 0.1, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the top ``ceil(q * n_valid)`` pixel scores per image: ``B x H x W`` -> ``B``.

    Focuses on the most uncertain part of an image, so a small hard object is not
    averaged away by a large easy background. An image with no valid pixel scores 0.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    mask = _valid_mask(scores, valid)
    flat = scores.reshape(scores.shape[0], -1)
    n = mask.reshape(mask.shape[0], -1).sum(dim=1)
    # Shave a hair off q * n so float error (0.1 * 30 = 3.0000000000000004) cannot add a pixel.
    k = torch.ceil(n.double() * q * (1.0 - 1e-12)).long().clamp(min=1)
    k = torch.where(n > 0, torch.minimum(k, n), torch.zeros_like(k))
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    masked = flat.masked_fill(~mask.reshape_as(flat), -math.inf)
    top = masked.topk(k_max, dim=1).values
    take = torch.arange(k_max, device=scores.device)[None, :] < k[:, None]
    return top.masked_fill(~take, 0).sum(dim=1) / k.clamp(min=1).to(scores.dtype)


IMAGE_REDUCTIONS: dict[str, Reduction] = {"mean": reduce_mean, "top_q": reduce_top_q}


def get_reduction(name: str) -> Reduction:
    """The image reduction registered under ``name``; KeyError lists the valid names."""
    return _lookup(IMAGE_REDUCTIONS, name, "reduction")


# ---------------------------------------------------------------------------
# region scores: B x H x W -> B x Rh x Rw


def region_grid(
    height: int, width: int, region_size: RegionSize
) -> list[tuple[int, int, int, int]]:
    """Boxes ``(y0, x0, y1, x1)`` (end-exclusive), row-major, tiling an ``height x width`` image.

    Cells are ``region_size = (rh, rw)``; the last row/column is clipped to the image,
    so its cells may be smaller. Box ``i`` matches cell ``(i // Rw, i % Rw)`` of the
    region score maps.
    """
    rh, rw = _pair(region_size)
    return [
        (y0, x0, min(y0 + rh, height), min(x0 + rw, width))
        for y0 in range(0, height, rh)
        for x0 in range(0, width, rw)
    ]


def region_mean(scores: torch.Tensor, region_size: RegionSize) -> torch.Tensor:
    """Mean pixel score of each grid cell: ``B x H x W -> B x Rh x Rw``.

    Partial edge cells are averaged over their own pixels only (the zero padding is
    summed but not counted).
    """
    rh, rw = _pair(region_size)
    b, h, w = scores.shape
    n_rows, n_cols = -(-h // rh), -(-w // rw)
    padded = F.pad(scores, (0, n_cols * rw - w, 0, n_rows * rh - h))
    sums = padded.reshape(b, n_rows, rh, n_cols, rw).sum(dim=(2, 4))
    dev = scores.device
    rows = (h - torch.arange(n_rows, device=dev) * rh).clamp(max=rh)
    cols = (w - torch.arange(n_cols, device=dev) * rw).clamp(max=rw)
    return sums / (rows[:, None] * cols[None, :]).to(scores.dtype)


def region_impurity(pred: torch.Tensor, num_classes: int, region_size: RegionSize) -> torch.Tensor:
    """Entropy of the predicted-class distribution in each cell / log(C): ``B x H x W -> B x Rh x Rw``.

    "Region impurity" of RIPU (Xie et al., "Towards Fewer Annotations: Active
    Learning via Region Impurity and Prediction Uncertainty for Domain Adaptive
    Semantic Segmentation", CVPR 2022): cells where several classes meet hold
    boundaries and small objects. A one-class cell scores 0.
    """
    _check_labels(pred, num_classes)
    rh, rw = _pair(region_size)
    b, h, w = pred.shape
    n_rows, n_cols = -(-h // rh), -(-w // rw)
    n_regions = n_rows * n_cols
    dev = pred.device
    cell = (torch.arange(h, device=dev) // rh)[:, None] * n_cols + (
        torch.arange(w, device=dev) // rw
    )[None, :]
    # One bincount over (image, cell, class) avoids a B x C x H x W one-hot.
    image = torch.arange(b, device=dev)[:, None, None] * n_regions
    index = ((image + cell[None]) * num_classes + pred.long()).reshape(-1)
    counts = torch.bincount(index, minlength=b * n_regions * num_classes)
    counts = counts.reshape(b, n_regions, num_classes).double()
    p = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    impurity = _normalised_entropy(p, dim=-1, num_classes=num_classes)
    return impurity.reshape(b, n_rows, n_cols).float()


def region_impurity_uncertainty(probs: torch.Tensor, region_size: RegionSize) -> torch.Tensor:
    """RIPU's combined region score: impurity of argmax x mean pixel entropy, ``B x C x H x W -> B x Rh x Rw``.

    Xie et al., CVPR 2022: a cell is worth labeling when it is both mixed (several
    predicted classes) and uncertain; either factor alone being 0 gives 0.
    """
    _check_probs(probs)
    impurity = region_impurity(probs.argmax(dim=1), probs.shape[1], region_size)
    uncertainty = region_mean(pixel_entropy(probs), region_size)
    return impurity.to(uncertainty.dtype) * uncertainty


# ---------------------------------------------------------------------------
# checkpoint stability (ST++) and two-head disagreement (LabOR)


def _batched_confusion(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image ``B x C x C`` counts of (a, b) label pairs for ``B x H x W`` maps."""
    n = a.shape[0]
    offset = torch.arange(n, device=a.device)[:, None, None] * num_classes
    index = ((offset + a.long()) * num_classes + b.long()).reshape(-1)
    counts = torch.bincount(index, minlength=n * num_classes * num_classes)
    return counts.reshape(n, num_classes, num_classes)


def _batched_miou(conf: torch.Tensor) -> torch.Tensor:
    """mIoU per image over classes present in either map; 1 for an empty image."""
    conf = conf.double()
    tp = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(dim=1) + conf.sum(dim=2) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    n_present = present.sum(dim=1)
    return torch.where(
        n_present > 0, iou.sum(dim=1) / n_present.clamp(min=1), torch.ones_like(tp[:, 0])
    )


def stability(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Agreement of earlier checkpoints with the final one: ``K x B x H x W`` long -> ``B`` float.

    ST++ (Yang et al., "ST++: Make Self-training Work Better for Semi-supervised
    Semantic Segmentation", CVPR 2022): for each image, the mean over k < K-1 of
    mIoU(preds[k], preds[-1]), where mIoU averages per-class IoU over the classes
    present in either map. Higher = more reliable pseudo label. K = 1 -> 1.
    """
    if preds.dim() != 4:
        raise ValueError(f"preds must be K x B x H x W, got shape {tuple(preds.shape)}")
    _check_labels(preds, num_classes, "preds")
    k, b = preds.shape[:2]
    total = torch.zeros(b, dtype=torch.float64, device=preds.device)
    # One bincount per earlier checkpoint, not one over all K: peak memory stays at
    # one B x H x W index map, which matters for full-resolution batches.
    for ckpt in range(k - 1):
        total += _batched_miou(_batched_confusion(preds[ckpt], preds[-1], num_classes))
    result = total / (k - 1) if k > 1 else torch.ones_like(total)
    return result.float()


def instability(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``1 - stability``: ``K x B x H x W -> B``; the ST++ measure turned into a labeling score."""
    return 1.0 - stability(preds, num_classes)


def disagreement_mask(pred_a: torch.Tensor, pred_b: torch.Tensor) -> torch.Tensor:
    """Pixels where two label maps differ: ``B x H x W`` x2 -> ``B x H x W`` bool.

    LabOR (Shin et al., "LabOR: Labeling Only if Required for Domain Adaptive
    Semantic Segmentation", ICCV 2021): where its two heads disagree is where a
    label is required.
    """
    if pred_a.shape != pred_b.shape:
        raise ValueError(
            f"pred_a shape {tuple(pred_a.shape)} != pred_b shape {tuple(pred_b.shape)}"
        )
    return pred_a != pred_b


def disagreement(
    pred_a: torch.Tensor, pred_b: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of (valid) pixels where two heads' label maps differ: ``B x H x W`` x2 -> ``B``.

    LabOR (Shin et al., ICCV 2021). An image with no valid pixel scores 0.
    """
    return reduce_mean(disagreement_mask(pred_a, pred_b).float(), valid)


# ---------------------------------------------------------------------------
# per-image summaries stored next to the scores


def class_histogram(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixel count of each class per image: ``B x H x W`` long -> ``B x C`` int64.

    Pixels equal to the ignore index (255) are not counted.
    """
    keep = pred != IGNORE_INDEX
    _check_labels(pred[keep], num_classes)
    offset = torch.arange(pred.shape[0], device=pred.device)[:, None, None] * num_classes
    index = (offset + pred.long())[keep]
    counts = torch.bincount(index, minlength=pred.shape[0] * num_classes)
    return counts.reshape(pred.shape[0], num_classes)


def mean_max_prob(probs: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the top class probability: ``B x C x H x W -> B``."""
    _check_probs(probs)
    return probs.amax(dim=1).mean(dim=(1, 2))


def confident_share(probs: torch.Tensor, tau: float) -> torch.Tensor:
    """Share of pixels whose top probability is at least ``tau``: ``B x C x H x W -> B``.

    The fraction of an image a confidence-thresholded pseudo label (S4AL, UniMatch)
    would keep.
    """
    _check_probs(probs)
    return (probs.amax(dim=1) >= tau).to(probs.dtype).mean(dim=(1, 2))


def image_embedding(features: torch.Tensor) -> torch.Tensor:
    """An image's place in the model's feature space: ``B x D x h x w -> B x D``, the
    features averaged over the image and scaled to unit length (so that distances compare
    what images show, not how strongly they activate the network)."""
    if features.ndim != 4:
        raise ValueError(f"features must be B x D x h x w, got shape {tuple(features.shape)}")
    return F.normalize(features.float().mean(dim=(2, 3)), dim=1)
