"""Training recipes: one optimiser step's losses, assembled from the pure terms.

A recipe is what changes between methods inside the same Ray Train loop: which batches
it needs, which loss terms it adds (weights from ``MethodConfig``), what it does after
the optimiser step, and what extra state goes into checkpoints. The loop itself (DDP,
schedules, checkpoints, evaluation) is shared, in ``segrl.engine.train``.

* ``supervised``: pixel cross-entropy on the labeled batch.
* ``mean_teacher`` (S4AL, Rangnekar et al., WACV 2023): an EMA teacher labels the weak
  view of unlabeled images; the student learns them on a strong view, each pixel
  weighted by the teacher's confidence and each image by its share of confident pixels;
  optional Balanced ClassMix (tail classes pasted more often) with a replay buffer of
  earlier unlabeled images, whose loss is added beside the in-batch one. Supervised-only
  for ``cold_start_epochs``.

Labeled and unlabeled images go through the network in one forward pass (as UniMatch
does): one DDP forward per step, and BatchNorm sees both domains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segrl.config import MethodConfig
from segrl.data.classmix import (
    ReplayBuffer,
    balanced_class_probabilities,
    classmix,
    sample_mix_classes,
)
from segrl.data.transforms import strong_transform
from segrl.losses import confidence_weighted_ce, cross_entropy, image_confidence_weight
from segrl.models.ema import EMATeacher

RECIPES = ("supervised", "mean_teacher")


class SupervisedRecipe:
    """Cross-entropy on labeled pixels only."""

    needs_unlabeled = False

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = ignore_index

    def losses(self, model: nn.Module, batch_x: dict, batch_u: dict | None, epoch: int) -> dict:
        logits = model(batch_x["image"])
        loss = cross_entropy(logits, batch_x["mask"], ignore_index=self.ignore_index)
        return {"loss": loss, "loss_x": loss.detach()}

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def strong_views(images: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Strong views ``B x 3 x H x W`` of weak images and their cutout masks ``B x H x W``
    (True where cutout blanked the pixel: no pseudo label may be learned there)."""
    strong = strong_transform()
    blank = torch.zeros(images.shape[-2:], dtype=torch.int64)
    views, ignored = [], []
    for image in images.cpu():
        out = strong({"image": image, "mask": blank})
        views.append(out["image"])
        ignored.append(out["mask"] == ignore_index)
    return torch.stack(views).to(images.device), torch.stack(ignored).to(images.device)


class MeanTeacherRecipe:
    """S4AL mean teacher with confidence weighting and optional Balanced ClassMix."""

    needs_unlabeled = True

    def __init__(
        self,
        model: nn.Module,
        cfg: MethodConfig,
        class_pixel_counts: torch.Tensor | None = None,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.teacher = EMATeacher(model, cfg.ema_momentum)
        self.buffer = ReplayBuffer(cfg.replay_buffer, seed) if cfg.classmix and cfg.replay_buffer else None
        counts = class_pixel_counts if class_pixel_counts is not None else torch.ones(1)
        self.mix_probs = balanced_class_probabilities(counts, cfg.classmix_temperature)
        self.generator = torch.Generator().manual_seed(seed)

    def _teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images).float().softmax(1)

    def _mix(self, images: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced ClassMix: paste tail-biased classes of a source image onto each image.

        Sources are the batch rolled by one and, with a replay buffer, earlier images.
        Returns mixed images ``B' x 3 x H x W`` and mixed teacher probabilities.
        """
        pseudo = probs.argmax(1)
        sources = [(images.roll(1, 0), probs.roll(1, 0))]
        if self.buffer is not None and len(self.buffer):
            old_images, _ = self.buffer.sample(images.shape[0])
            old_images = old_images.to(images.device)
            sources.append((old_images, self._teacher_probs(old_images)))
        mixed_images, mixed_probs = [], []
        for src_images, src_probs in sources:
            src_pseudo = src_probs.argmax(1)
            for i in range(images.shape[0]):
                classes = sample_mix_classes(src_pseudo[i].unique(), self.mix_probs, generator=self.generator)
                image, _, paste = classmix(src_images[i], src_pseudo[i], images[i], pseudo[i], classes.to(pseudo.device))
                mixed_images.append(image)
                mixed_probs.append(torch.where(paste.unsqueeze(0), src_probs[i], probs[i]))
        if self.buffer is not None:
            self.buffer.add((images.detach().cpu(), pseudo.detach().cpu()))
        return torch.stack(mixed_images), torch.stack(mixed_probs)

    def losses(self, model: nn.Module, batch_x: dict, batch_u: dict | None, epoch: int) -> dict:
        images_x, masks_x = batch_x["image"], batch_x["mask"]
        if batch_u is None or epoch < self.cfg.cold_start_epochs:
            logits = model(images_x)
            loss = cross_entropy(logits, masks_x, ignore_index=self.ignore_index)
            return {"loss": loss, "loss_x": loss.detach()}
        images_u = batch_u["image"]
        probs_u = self._teacher_probs(images_u)
        strong_u, cut_u = strong_views(images_u, self.ignore_index)
        parts = [images_x, strong_u]
        mixed = None
        if self.cfg.classmix:
            mixed = self._mix(strong_u, probs_u)
            parts.append(mixed[0])
        logits = model(torch.cat(parts))
        n_x, n_u = images_x.shape[0], images_u.shape[0]
        loss_x = cross_entropy(logits[:n_x], masks_x, ignore_index=self.ignore_index)
        loss_u = self._pseudo_loss(logits[n_x : n_x + n_u], probs_u, cut_u)
        total = loss_x + self.cfg.lambda_u * loss_u
        out = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}
        if mixed is not None:
            loss_mix = self._pseudo_loss(logits[n_x + n_u :], mixed[1], None)
            total = total + self.cfg.lambda_mix * loss_mix
            out["loss_mix"] = loss_mix.detach()
        out["loss"] = total
        return out

    def _pseudo_loss(self, logits: torch.Tensor, probs: torch.Tensor, ignore: torch.Tensor | None) -> torch.Tensor:
        image_weight = None
        if self.cfg.confidence_weighting:
            image_weight = image_confidence_weight(probs, self.cfg.image_weight_tau, ignore_mask=ignore)
            return confidence_weighted_ce(logits, probs, ignore_mask=ignore, image_weight=image_weight)
        # Without confidence weighting every pseudo-labeled pixel counts fully.
        pseudo = probs.argmax(1)
        if ignore is not None:
            pseudo = pseudo.masked_fill(ignore, self.ignore_index)
        return cross_entropy(logits, pseudo, ignore_index=self.ignore_index)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.teacher.update(model, step)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The teacher: an average of students, and what S4AL evaluates and deploys."""
        return self.teacher.model

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher": self.teacher.state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        if self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])


def build_recipe(
    cfg: MethodConfig, model: nn.Module, class_pixel_counts: torch.Tensor | None, ignore_index: int, seed: int
) -> SupervisedRecipe | MeanTeacherRecipe:
    """The recipe ``cfg.name`` names (see ``RECIPES``)."""
    if cfg.name == "supervised":
        return SupervisedRecipe(ignore_index)
    if cfg.name == "mean_teacher":
        return MeanTeacherRecipe(model, cfg, class_pixel_counts, ignore_index, seed)
    raise ValueError(f"unknown method.name {cfg.name!r}; valid names: {', '.join(RECIPES)}")
