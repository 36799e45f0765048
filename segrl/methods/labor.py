"""LabOR's pixel selector (Shin et al., "LabOR: Labeling Only if Required for Domain
Adaptive Semantic Segmentation", ICCV 2021), after MCD (Saito et al., CVPR 2018).

Two 1x1-conv classifiers sit on the segmentation network's decoder features. They learn
the labeled pixels and, at the same time, are pushed apart on unlabeled pixels: where
they still disagree after that is where the network's decision is ambiguous, and those
pixels are what LabOR sends to the annotator (segments: SPL, or points: PPL, see
:mod:`segrl.acquisition.labor`).

The selector trains only its heads, on DETACHED features: it is a probe on the
segmentation net, not part of its loss, so it lives beside the recipes, not among them.

Each :meth:`LaborSelector.step` is two optimiser steps, as in MCD:

(a) both heads minimise pixel CE on labeled pixels;
(b) both heads minimise ``CE_a + CE_b + CE_pseudo - lambda_discrepancy * discrepancy(unlabeled)``
    (:func:`labor_head_loss`), so they spread apart where there are no labels while the
    CE terms keep them right on the labeled pixels and, with the segmentation model's
    pseudo labels on the unlabeled ones (LabOR's pseudo-label training loss L_pt), in
    agreement wherever the model is not ambiguous: the disagreement mask stays selective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from segrl.losses import classifier_discrepancy, classifier_discrepancy_map, cross_entropy
from segrl.models.heads import TwoHeadClassifier

OPTIMIZERS = ("adam", "sgd")


def labor_head_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    labels: torch.Tensor,
    unlabeled_probs_a: torch.Tensor,
    unlabeled_probs_b: torch.Tensor,
    lambda_discrepancy: float,
    ignore_index: int = 255,
    unlabeled_valid: torch.Tensor | None = None,
    unlabeled_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
    pseudo_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step (b) of the selector: ``CE(a) + CE(b) [+ CE_u(a) + CE_u(b)] - lambda * discrepancy``.

    logits ``B x C x H x W`` of the two heads on labeled images, labels ``B x H x W``
    (int64, ``ignore_index`` = no label); unlabeled_probs ``B' x C x h x w`` softmax
    outputs of the heads on unlabeled images; unlabeled_valid ``B' x h x w`` bool or None
    (all pixels count). With ``unlabeled_logits`` (the heads' ``B' x C x h x w``) and
    ``pseudo_labels`` ``B' x h x w`` (``ignore_index`` = none), both heads also learn the
    pseudo labels. Minimising it maximises the discrepancy.
    """
    ce = cross_entropy(logits_a, labels, ignore_index) + cross_entropy(
        logits_b, labels, ignore_index
    )
    if unlabeled_logits is not None and pseudo_labels is not None:
        ce = ce + sum(cross_entropy(u, pseudo_labels, ignore_index) for u in unlabeled_logits)
    discrepancy = classifier_discrepancy(unlabeled_probs_a, unlabeled_probs_b, unlabeled_valid)
    return ce - lambda_discrepancy * discrepancy


def _distributed_world() -> int:
    """Number of DDP ranks, 1 when torch.distributed is not in use."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class LaborSelector:
    """Two heads over detached decoder features, with their own optimiser.

    ``in_channels`` is the feature width ``C`` of the ``B x C x h x w`` features, and
    ``num_classes`` the head output width. ``optimizer`` is ``"adam"`` or ``"sgd"``
    (momentum 0.9); ``seed`` fixes the heads' initialisation. Under torch.distributed the
    heads are broadcast from rank 0 at construction and gradients are averaged before
    every optimiser step, so all ranks hold the same heads.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        lr: float = 1e-3,
        lambda_discrepancy: float = 1.0,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.lambda_discrepancy = lambda_discrepancy
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self.heads = TwoHeadClassifier(in_channels, num_classes).to(device)
        self._broadcast_heads()
        params = self.heads.parameters()
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=lr, weight_decay=weight_decay
            )
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)

    # ----------------------------------------------------------------------------------
    # training

    def step(
        self,
        features_labeled: torch.Tensor,
        labels: torch.Tensor,
        features_unlabeled: torch.Tensor,
        ignore_index: int = 255,
        unlabeled_valid: torch.Tensor | None = None,
        pseudo_unlabeled: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One round of steps (a) and (b) (see the module docstring).

        features_labeled ``B x C x h x w`` and labels ``B x H x W`` (full resolution:
        head logits are upsampled bilinearly to it); features_unlabeled ``B' x C x h' x w'``
        with optional unlabeled_valid ``B' x h' x w'`` bool (e.g. crop padding = False) and
        pseudo_unlabeled ``B' x h' x w'`` int64, the segmentation model's pseudo labels on
        the same grid (``ignore_index`` = none).
        The discrepancy is measured on the feature grid: no labels to match there, and
        upsampling would only cost memory. Returns floats: ``ce_a``, ``ce_b`` (before
        the round), ``discrepancy`` and ``loss_b`` (step (b)'s inputs).
        """
        self.heads.train()
        feats_x, feats_u = self._as_input(features_labeled), self._as_input(features_unlabeled)
        size = tuple(labels.shape[-2:])

        # (a) supervised step: both heads learn the labeled pixels
        logits_a, logits_b = self.heads(feats_x, size)
        ce_a = cross_entropy(logits_a, labels, ignore_index)
        ce_b = cross_entropy(logits_b, labels, ignore_index)
        self._optimise(ce_a + ce_b)

        # (b) discrepancy step: spread apart on unlabeled pixels, CE keeps labeled ones right
        logits_a2, logits_b2 = self.heads(feats_x, size)
        u_a, u_b = self.heads(feats_u)
        probs_a, probs_b = F.softmax(u_a.float(), dim=1), F.softmax(u_b.float(), dim=1)
        loss_b = labor_head_loss(
            logits_a2,
            logits_b2,
            labels,
            probs_a,
            probs_b,
            self.lambda_discrepancy,
            ignore_index,
            unlabeled_valid,
            (u_a, u_b),
            None if pseudo_unlabeled is None else pseudo_unlabeled.to(u_a.device),
        )
        self._optimise(loss_b)
        discrepancy = classifier_discrepancy(probs_a.detach(), probs_b.detach(), unlabeled_valid)
        return {
            "ce_a": ce_a.item(),
            "ce_b": ce_b.item(),
            "discrepancy": discrepancy.item(),
            "loss_b": loss_b.item(),
        }

    def _as_input(self, features: torch.Tensor) -> torch.Tensor:
        """Detached, on the heads' device and dtype: no gradient reaches the segmentation net."""
        weight = self.heads.head_a.weight
        return features.detach().to(device=weight.device, dtype=weight.dtype)

    def _optimise(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        self.optimizer.step()

    def _average_gradients(self) -> None:
        """Average head gradients over DDP ranks (a no-op on one process)."""
        world = _distributed_world()
        if world == 1:
            return
        for param in self.heads.parameters():
            if param.grad is None:
                # every rank must join every all-reduce, even with nothing to add
                param.grad = torch.zeros_like(param)
            torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
            param.grad.div_(world)

    def _broadcast_heads(self) -> None:
        """Start every rank from rank 0's heads, so equal gradients keep them equal."""
        if _distributed_world() == 1:
            return
        for tensor in self.heads.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)

    # ----------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def predict(
        self, features: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax of both heads: ``B x C x h x w`` features -> two ``B x K x H x W`` maps."""
        self.heads.eval()
        logits_a, logits_b = self.heads(self._as_input(features), tuple(size))
        return F.softmax(logits_a.float(), dim=1), F.softmax(logits_b.float(), dim=1)

    @torch.no_grad()
    def disagreement(
        self, features: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the heads disagree: ``B x C x h x w`` -> (``B x H x W`` bool, argmax
        differs; ``B x H x W`` float, L1 distance of the probabilities in ``[0, 2]``)."""
        probs_a, probs_b = self.predict(features, size)
        mask = probs_a.argmax(dim=1) != probs_b.argmax(dim=1)
        return mask, classifier_discrepancy_map(probs_a, probs_b)

    # ----------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
