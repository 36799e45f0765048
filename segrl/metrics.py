"""Segmentation metrics over confusion matrices: mIoU, per-class IoU, pixel accuracy.

A confusion matrix ``conf`` is ``C x C`` int64 with rows = ground truth, columns =
prediction. It is additive over images and over Ray Train workers
(:func:`all_reduce_confusion`), so every metric is computed once, at the end, from
the summed matrix. Classes that appear in neither truth nor prediction have an
undefined IoU (NaN) and are left out of the mean, as in the Cityscapes protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IGNORE_INDEX = 255


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``C x C`` int64 counts of (truth, prediction) over pixels whose truth is not ignored.

    ``pred`` and ``target`` are integer tensors of the same shape (any, e.g. B x H x W).
    Truth values outside ``0..C-1`` other than ``ignore_index`` raise ``ValueError``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    if target.numel() and (target.min() < 0 or target.max() >= num_classes):
        bad = target[(target < 0) | (target >= num_classes)].unique()[:10].tolist()
        raise ValueError(f"target holds class id(s) {bad} outside 0..{num_classes - 1}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds class ids outside 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_per_class(conf: torch.Tensor) -> torch.Tensor:
    """IoU of each class (float64, length C); NaN where a class is absent from truth and prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(conf: torch.Tensor) -> float:
    """Mean of the defined per-class IoUs; NaN if no class is defined at all."""
    ious = iou_per_class(conf)
    defined = ious[~ious.isnan()]
    return float(defined.mean()) if defined.numel() else math.nan


def pixel_accuracy(conf: torch.Tensor) -> float:
    """Share of counted pixels predicted correctly; NaN for an empty matrix."""
    total = conf.sum()
    return float(conf.diag().sum().double() / total) if total > 0 else math.nan


def prediction_miou(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """mIoU of prediction ``a`` against prediction ``b`` (both H x W class ids).

    The agreement measure ST++ uses between checkpoints: identical maps give 1.
    Classes present in neither map are left out.
    """
    return mean_iou(confusion_matrix(a, b, num_classes, ignore_index=-1))


def all_reduce_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Sum ``conf`` over all ranks of the default process group (a no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        conf = conf.clone()
        dist.all_reduce(conf, op=dist.ReduceOp.SUM)
    return conf


def format_iou_table(conf: torch.Tensor, classes: Sequence[str]) -> str:
    """Markdown table of per-class IoU (in %), then mIoU and pixel accuracy."""
    if len(classes) != conf.shape[0]:
        raise ValueError(f"{len(classes)} class names for a {conf.shape[0]}-class matrix")
    ious = iou_per_class(conf).tolist()
    truth_pixels = conf.sum(1).tolist()
    lines = ["| class | IoU % | truth pixels |", "| --- | ---: | ---: |"]
    for name, iou, pixels in zip(classes, ious, truth_pixels, strict=True):
        shown = "n/a" if math.isnan(iou) else f"{100 * iou:.2f}"
        lines.append(f"| {name} | {shown} | {int(pixels)} |")
    lines.append(f"| **mIoU** | **{100 * mean_iou(conf):.2f}** | |")
    lines.append(f"| pixel accuracy | {100 * pixel_accuracy(conf):.2f} | |")
    return "\n".join(lines)
