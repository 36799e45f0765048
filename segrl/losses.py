"""Loss terms: small pure functions over tensors, registered by name.

Each term takes logits ``B x C x H x W`` and targets ``B x H x W`` (int64, with
``ignore_index`` marking pixels that carry no label) and returns a scalar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register_loss(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


@register_loss("cross_entropy")
def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = 255,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel cross-entropy averaged over labeled pixels.

    A batch whose pixels are all ignored gives 0 with a gradient path (not NaN), which
    happens with sparse labels and with heavy crops of mostly-void frames.
    """
    labeled = (target != ignore_index).sum()
    if labeled == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target, weight=class_weight, ignore_index=ignore_index)
