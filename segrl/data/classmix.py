"""ClassMix and S4AL's Balanced ClassMix with a replay buffer.

ClassMix (Olsson et al., WACV 2021) pastes the pixels of some classes of one image
onto another, with the labels (or pseudo labels) following the same mask, so image
and mask stay aligned. S4AL (Rangnekar et al., WACV 2023) biases the choice of
classes toward tail classes and draws the source images from a replay buffer of
labeled samples, so rare classes are pasted far more often than they occur.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def classmix(
    image_a: torch.Tensor,
    mask_a: torch.Tensor,
    image_b: torch.Tensor,
    mask_b: torch.Tensor,
    classes: torch.Tensor | Sequence[int],
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the pixels of ``image_a`` whose label is in ``classes`` onto ``image_b``.

    images ``[B x] 3 x H x W``, masks ``[B x] H x W`` (int64; ``mask_a`` may be a pseudo
    label). Returns ``(mixed_image, mixed_mask, paste)`` with ``paste`` ``[B x] H x W``
    bool, True where a pixel came from ``a``. Ignored pixels of ``a`` are never pasted
    (even if ``ignore_index`` is listed), so ``b``'s ignored pixels stay ignored unless
    covered by a real labeled pixel of ``a``.

    segrl's recipes mix whole batches on their device (:func:`batch_mix_masks`); this
    one-pair form is for pipelines that mix in a DataLoader.
    """
    classes = torch.as_tensor(classes, dtype=mask_a.dtype, device=mask_a.device)
    paste = torch.isin(mask_a, classes) & (mask_a != ignore_index)
    mixed_image = torch.where(paste.unsqueeze(-3), image_a, image_b)
    mixed_mask = torch.where(paste, mask_a, mask_b)
    return mixed_image, mixed_mask, paste


def balanced_class_probabilities(
    class_pixel_counts: torch.Tensor, temperature: float = 0.5, uniform_mix: float = 0.1
) -> torch.Tensor:
    """Class sampling probabilities biased toward tail classes (S4AL Balanced ClassMix).

    class_pixel_counts ``C``: labeled pixels per class. With add-one smoothed
    frequencies ``f_c = (n_c + 1) / sum_k (n_k + 1)``::

        p_c = (1 - uniform_mix) * f_c^-T / sum_k f_k^-T + uniform_mix / C

    ``T = 0`` is uniform, ``T = 1`` inverse frequency; the uniform share keeps head
    classes from vanishing. The smoothing keeps unseen classes finite.
    """
    counts = class_pixel_counts.double().clamp(min=0) + 1.0
    freq = counts / counts.sum()
    inv = freq.pow(-temperature)
    probs = (1.0 - uniform_mix) * inv / inv.sum() + uniform_mix / counts.numel()
    return probs.float()


def sample_mix_classes(
    present_classes: torch.Tensor,
    probabilities: torch.Tensor,
    k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``k`` of the ``present_classes`` without replacement, weighted by
    ``probabilities[c]`` (``C``, e.g. from :func:`balanced_class_probabilities`).

    ``k`` defaults to half of the present classes, at least one (ClassMix's rule).
    Returns a 1-D int64 tensor, empty when no class is present. The one-image form of
    :func:`batch_mix_masks`' draw, which its tests compare against.
    """
    present = present_classes.flatten().long().cpu()
    if present.numel() == 0:
        return present
    if k is None:
        k = max(1, present.numel() // 2)
    weights = probabilities.detach().float().cpu()[present]
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)  # no preference known: ClassMix's uniform draw
    order = torch.multinomial(weights, min(k, present.numel()), generator=generator)
    return present[order]


def batch_mix_masks(
    labels: torch.Tensor,
    probabilities: torch.Tensor,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Balanced ClassMix's paste masks of a whole batch: for each source label map
    (``labels`` ``B x H x W``, e.g. pseudo labels), half of its present classes (at least
    one) drawn without replacement weighted by ``probabilities[c]`` (``C``), and the pixels
    of those classes (``B x H x W`` bool, on ``labels``' device). Ignored pixels are never
    pasted. The same draw as :func:`sample_mix_classes` image by image, made for all
    images at once (Gumbel top-k: sorting ``log w + Gumbel noise`` orders the classes as
    successive weighted draws without replacement would).
    """
    b, c = labels.shape[0], probabilities.numel()
    keys = torch.where(labels == ignore_index, c, labels).reshape(b, -1)  # ignore -> column c
    present = torch.zeros(b, c + 1, dtype=torch.bool, device=labels.device).scatter_(1, keys, True)
    present = present[:, :c].cpu()  # B x C: drawn on the CPU, from ``generator``
    weights = probabilities.detach().float().cpu().expand(b, c) * present
    # no preference known (no present class weighs anything): ClassMix's uniform draw
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, present.float())
    gumbel = -torch.log(-torch.log(torch.rand(b, c, generator=generator).clamp(min=1e-20)))
    score = torch.where(weights > 0, weights.log() + gumbel, float("-inf"))
    rank = score.argsort(dim=1, descending=True).argsort(dim=1)
    k = (present.sum(1, keepdim=True) // 2).clamp(min=1)
    chosen = (rank < k) & present
    chosen = torch.cat([chosen, torch.zeros(b, 1, dtype=torch.bool)], dim=1).to(labels.device)
    return chosen.gather(1, keys).view_as(labels)


Sample = tuple[torch.Tensor, torch.Tensor]


class ReplayBuffer:
    """Fixed-capacity FIFO of ``(image 3 x H x W, mask H x W)`` CPU tensors (S4AL).

    ``add`` copies each sample of a batch to the CPU (detached), evicting the oldest
    beyond ``capacity``; ``sample(n)`` draws uniformly without replacement (with
    replacement when ``n`` exceeds the stored count) from a generator seeded with
    ``seed``, so a restored buffer draws the same samples.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[Sample] = deque(maxlen=capacity)
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, batch: Mapping[str, torch.Tensor] | Sample) -> None:
        """Store every sample of ``batch``: ``{"image": B x 3 x H x W, "mask": B x H x W}``
        (a dataset batch) or the pair ``(images, masks)``."""
        images, masks = (batch["image"], batch["mask"]) if isinstance(batch, Mapping) else batch
        for image, mask in zip(images.detach().cpu(), masks.detach().cpu(), strict=True):
            self._items.append((image.clone(), mask.clone()))

    def sample(self, n: int) -> Sample:
        """``(images n x 3 x H x W, masks n x H x W)`` drawn uniformly."""
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        size = len(self._items)
        if n <= size:
            idx = torch.randperm(size, generator=self._generator)[:n]
        else:
            idx = torch.randint(size, (n,), generator=self._generator)
        picked = [self._items[i] for i in idx.tolist()]
        return torch.stack([p[0] for p in picked]), torch.stack([p[1] for p in picked])

    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "images": [item[0] for item in self._items],
            "masks": [item[1] for item in self._items],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.capacity = int(state["capacity"])
        self._items = deque(zip(state["images"], state["masks"], strict=True), maxlen=self.capacity)
        self._generator.set_state(state["generator"])
