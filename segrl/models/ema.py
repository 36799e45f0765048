"""Mean teacher: an exponential moving average of the student's weights.

Used by S4AL (Rangnekar et al., WACV 2023), after Tarvainen & Valpola (NeurIPS 2017),
and as ProDA's momentum model. The teacher never trains: it has no gradients and
stays in eval mode, so its BatchNorm uses the running statistics copied from the
student.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def ema_momentum(step: int, momentum: float) -> float:
    """``m_t = min(1 - 1 / (t + 1), m)``.

    The warm-up makes the first teacher an exact copy (``m_0 = 0``) and then a plain
    running mean of the student, so early teachers are not anchored to random init.
    """
    return min(1.0 - 1.0 / (step + 1), momentum)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper, else itself."""
    return getattr(module, "module", module)


class EMATeacher:
    """A frozen deep copy of a student, updated as ``θ' <- m θ' + (1 - m) θ``.

    ``teacher(x)`` runs the teacher without building a graph. ``teacher.model`` is the
    copy itself (for ``state_dict`` or feature access).
    """

    def __init__(self, student: nn.Module, momentum: float = 0.999) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ema momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(unwrap(student))
        self.model.requires_grad_(False)
        self.model.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int, copy_buffers: bool = True) -> float:
        """Move the teacher toward ``student`` (DDP-wrapped or not); returns ``m_t``.

        ``copy_buffers=False`` keeps the teacher's own BatchNorm statistics (gathered by
        :meth:`with_batch_statistics` forwards) instead of copying the student's.
        """
        m = ema_momentum(step, self.momentum)
        student = unwrap(student)
        own = dict(self.model.named_parameters())
        pairs = [(own[name], param.detach()) for name, param in student.named_parameters()]
        targets = [mine for mine, _ in pairs]
        sources = [theirs.to(mine.dtype) for mine, theirs in pairs]
        # one fused multiply-add over all tensors (a few kernels, not two per parameter)
        if targets:  # the foreach ops refuse empty lists
            torch._foreach_mul_(targets, m)
            torch._foreach_add_(targets, sources, alpha=1.0 - m)
        if copy_buffers:
            own_buffers = dict(self.model.named_buffers())
            # running stats are already averages; num_batches_tracked is an integer
            buffers = list(student.named_buffers())
            if buffers:
                torch._foreach_copy_([own_buffers[name] for name, _ in buffers], [buf for _, buf in buffers])
        return m

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def with_batch_statistics(self, *args: Any, **kwargs: Any) -> Any:
        """The teacher's output with its BatchNorm layers in train mode (everything else,
        dropout included, in eval): they normalise with this batch and move the teacher's
        running statistics toward it."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.train()
        try:
            return self(*args, **kwargs)
        finally:
            for norm in norms:
                norm.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "momentum": self.momentum}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.momentum = float(state["momentum"])
