"""Running per-class state that self-training recipes carry from step to step.

* :class:`ClassConfidenceBank`: STAL's class-wise confidence, to favour tail classes.
* :class:`FeatureMemoryBank`: per-class queues of pixel embeddings, the negatives of
  the pixel contrastive loss (STAL, ReCo).
* :class:`PrototypeBank`: ProDA's moving-average class prototypes.

Each holds plain tensors, updates under ``no_grad`` and saves with
``state_dict`` / ``load_state_dict`` so a resumed run continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _class_sums(
    values: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of ``values`` ``N x D`` and pixel counts for ``labels`` ``N``,
    leaving out ignored labels: ``(C x D, C)``."""
    keep = labels != ignore_index
    values, labels = values[keep], labels[keep].long()
    sums = values.new_zeros(num_classes, values.shape[1]).index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums, counts


class ClassConfidenceBank:
    """Per-class EMA of the model's mean confidence (STAL, Guan et al.; after AEL).

    ``update(probs, pred)``: for each class predicted somewhere in the batch, its mean
    probability over those pixels, ``c_k <- alpha c_k + (1 - alpha) mean_k``; the first
    observation of a class sets ``c_k`` directly (no bias toward the initial value).
    Classes never seen keep confidence 0, i.e. the strongest preference.
    """

    def __init__(self, num_classes: int, alpha: float = 0.999) -> None:
        self.num_classes = num_classes
        self.alpha = alpha
        self.confidence = torch.zeros(num_classes)
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, pred: torch.Tensor, ignore_index: int = 255) -> None:
        """probs ``B x C x H x W`` (softmax), pred ``B x H x W`` (argmax or labels)."""
        safe = pred.clamp(0, self.num_classes - 1).unsqueeze(1)
        conf = probs.float().gather(1, safe).reshape(-1, 1)
        sums, counts = _class_sums(conf, pred.reshape(-1), self.num_classes, ignore_index)
        sums, counts = sums.squeeze(1).cpu(), counts.cpu()
        present = counts > 0
        mean = sums[present] / counts[present]
        old = self.confidence[present]
        blended = self.alpha * old + (1.0 - self.alpha) * mean
        self.confidence[present] = torch.where(self.seen[present], blended, mean)
        self.seen |= present

    def sampling_probabilities(self, temperature: float = 1.0) -> torch.Tensor:
        """``softmax((1 - c) / temperature)`` over classes: low confidence, drawn more."""
        return ((1.0 - self.confidence) / temperature).softmax(dim=0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence.clone(),
            "seen": self.seen.clone(),
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.confidence = state["confidence"].clone().float()
        self.seen = state["seen"].clone().bool()
        self.alpha = float(state["alpha"])


class FeatureMemoryBank:
    """Per-class FIFO queues of at most ``size_per_class`` vectors of ``dim`` (ReCo, STAL).

    Entries are detached CPU float32 copies; the newest ones are kept.
    """

    def __init__(self, num_classes: int, dim: int, size_per_class: int, seed: int = 0) -> None:
        self.num_classes, self.dim, self.size_per_class = num_classes, dim, size_per_class
        self._queues = [torch.zeros(0, dim) for _ in range(num_classes)]
        self._generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        """Append features ``N x D`` to the queue of their label ``N``, oldest evicted."""
        features = features.detach().float().cpu()
        labels = labels.detach().reshape(-1).cpu()
        for c in labels[labels != ignore_index].unique().tolist():
            grown = torch.cat([self._queues[c], features[labels == c]])
            self._queues[c] = grown[-self.size_per_class :].clone()

    def get(self, c: int) -> torch.Tensor:
        """Class ``c``'s entries, oldest first: ``n_c x D``."""
        return self._queues[c]

    def counts(self) -> torch.Tensor:
        """``C`` int64: entries per class; 0 flags a class :meth:`means` knows nothing of."""
        return torch.tensor([q.shape[0] for q in self._queues], dtype=torch.long)

    def means(self) -> torch.Tensor:
        """``C x D`` per-class means; classes with no entry get a zero row (never NaN),
        see :meth:`counts`."""
        return torch.stack(
            [q.mean(0) if q.shape[0] else torch.zeros(self.dim) for q in self._queues]
        )

    def sample_negatives(
        self, exclude_class: int, m: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``m x D`` vectors of classes other than ``exclude_class``, or ``0 x D`` if none.

        Class-balanced: each draw picks one non-empty other class uniformly, then one of
        its entries uniformly (with replacement), so head classes do not crowd out tail
        classes among the negatives. Uses the bank's own seeded generator by default.
        """
        generator = generator or self._generator
        others = [c for c, q in enumerate(self._queues) if c != exclude_class and q.shape[0]]
        if not others or m <= 0:
            return torch.zeros(0, self.dim)
        which = torch.randint(len(others), (m,), generator=generator)
        out = torch.empty(m, self.dim)
        for i, c in enumerate(others):
            rows = (which == i).nonzero().squeeze(1)
            if rows.numel():
                queue = self._queues[c]
                out[rows] = queue[
                    torch.randint(queue.shape[0], (rows.numel(),), generator=generator)
                ]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "queues": [q.clone() for q in self._queues],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._queues = [q.clone().float() for q in state["queues"]]
        self._generator.set_state(state["generator"])


class PrototypeBank:
    """ProDA class prototypes (Zhang et al., CVPR 2021, eq. 6).

    ``update``: per-class centroid of this batch's features, ``eta_k <- m_k eta_k +
    (1 - m_k) centroid_k`` for classes present in the batch, with
    ``m_k = min(n_k / (n_k + 1), m)`` after ``n_k`` earlier batches of class k: a plain
    mean of the batches seen until the momentum takes over. ProDA starts from centroids
    over the whole target set; one first batch would pin a class's prototype to a few
    images for thousands of steps. ``prototypes`` is ``C x D``; ``initialized`` ``C``
    bool flags the classes seen so far (others are zero rows, no prototype at all).
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9999) -> None:
        self.num_classes, self.dim, self.momentum = num_classes, dim, momentum
        self.prototypes = torch.zeros(num_classes, dim)
        self.initialized = torch.zeros(num_classes, dtype=torch.bool)
        self.batches = torch.zeros(num_classes, dtype=torch.int64)  # n_k

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> None:
        """features ``B x D x h x w``, labels ``B x h x w`` on the same grid (resize labels
        with ``mode="nearest"`` first)."""
        if features.shape[-2:] != labels.shape[-2:]:
            raise ValueError(
                f"features {tuple(features.shape)} and labels {tuple(labels.shape)} must share "
                "one grid; resize labels with mode='nearest'"
            )
        flat = features.detach().float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        sums, counts = _class_sums(flat, labels.reshape(-1), self.num_classes, ignore_index)
        sums, counts = sums.cpu(), counts.cpu()
        present = counts > 0
        centroid = sums[present] / counts[present].unsqueeze(1)
        seen = self.batches[present].double()
        m = (seen / (seen + 1)).clamp(max=self.momentum).float().unsqueeze(1)
        self.prototypes[present] = m * self.prototypes[present] + (1.0 - m) * centroid
        self.batches[present] += 1
        self.initialized |= present

    def state_dict(self) -> dict[str, Any]:
        return {
            "prototypes": self.prototypes.clone(),
            "initialized": self.initialized.clone(),
            "batches": self.batches.clone(),
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.prototypes = state["prototypes"].clone().float()
        self.initialized = state["initialized"].clone().bool()
        # a checkpoint from before the warm-up counted batches: its prototypes are past it
        past = torch.where(self.initialized, torch.iinfo(torch.int64).max // 2, 0)
        self.batches = state["batches"].clone().long() if "batches" in state else past
        self.momentum = float(state["momentum"])
