"""Optional loss terms any recipe can add: STAL's pixel contrastive loss with its tail-class
confidence bank, and output-space adversarial alignment (AdaptSegNet, as LabOR uses it).

A recipe runs its forward pass once and hands the results (:class:`StepOutputs`) to
every enabled term; each term returns its weighted scalar. Terms that own parameters
(projection head, discriminator) keep them outside the DDP-wrapped model, so they
average their own gradients across ranks (:func:`all_reduce_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segrl.config import MethodConfig
from segrl.losses import (
    adversarial_generator_loss,
    discriminator_loss,
    pixel_contrastive_loss,
    sample_contrastive_pairs,
    tail_anchor_counts,
)
from segrl.methods.banks import ClassConfidenceBank, FeatureMemoryBank
from segrl.models.heads import OutputDiscriminator, ProjectionHead


@dataclass
class StepOutputs:
    """One step's student outputs. ``_x`` labeled, ``_u`` unlabeled (student view).

    logits ``B x C x H x W``, features ``B x D x h x w``, mask/pseudo ``B x H x W`` (255 =
    none), conf_u ``B x H x W`` the confidence of each pseudo label, probs_u the
    teacher's ``B x C x H x W`` when the recipe has one.
    """

    logits_x: torch.Tensor
    feats_x: torch.Tensor
    mask_x: torch.Tensor
    logits_u: torch.Tensor | None = None
    feats_u: torch.Tensor | None = None
    pseudo_u: torch.Tensor | None = None
    conf_u: torch.Tensor | None = None
    probs_u: torch.Tensor | None = None
    pred_u: torch.Tensor | None = None  # the model's own argmax on the unlabeled batch (a probe's)


def all_reduce_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over DDP ranks (it lives outside the DDP wrapper)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters to every rank, so gradient averaging keeps them equal."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def to_feature_grid(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Labels or confidences ``B x H x W`` resized (nearest) to the feature grid ``size``."""
    resized = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    return resized.to(labels.dtype)


class ContrastiveTerm:
    """STAL's pixel contrastive loss over a projection head, anchors biased to tail classes.

    Anchors: labeled pixels (confidence 1) and pseudo-labeled pixels whose confidence
    reaches ``contrastive_threshold``; positive: the class mean in the memory bank;
    negatives: other classes' bank entries. With ``tail_sampling`` the anchors of a
    step are shared among classes by ``softmax(1 - class confidence)`` from a
    :class:`ClassConfidenceBank` (EMA ``confidence_bank_alpha``) of the model's
    probability of the ground-truth class on labeled pixels.
    """

    name = "loss_contrastive"

    def __init__(self, cfg: MethodConfig, feature_channels: int, num_classes: int,
                 ignore_index: int = 255, seed: int = 0) -> None:
        self.cfg, self.ignore_index, self.num_classes = cfg, ignore_index, num_classes
        self.module = ProjectionHead(feature_channels, cfg.projection_dim)
        self.synced = self.module
        self.memory = FeatureMemoryBank(num_classes, cfg.projection_dim, cfg.contrastive_memory, seed)
        self.confidence = ClassConfidenceBank(num_classes, cfg.confidence_bank_alpha)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        self.module.to(out.feats_x.device)
        grid = tuple(out.feats_x.shape[-2:])
        embeddings = [self.module(out.feats_x)]
        labels = [to_feature_grid(out.mask_x, grid)]
        confidence = [torch.ones_like(labels[0], dtype=torch.float)]
        if out.feats_u is not None and out.pseudo_u is not None:
            embeddings.append(self.module(out.feats_u))
            labels.append(to_feature_grid(out.pseudo_u, grid))
            confidence.append(to_feature_grid(out.conf_u.float(), grid))
        emb, lab, conf = torch.cat(embeddings), torch.cat(labels), torch.cat(confidence)
        # STAL's class-wise confidence: the model's probability of the true class on labeled
        # pixels (pseudo labels would score a class by how sure the model is of its own guesses)
        self.confidence.update(out.logits_x.detach().float().softmax(1), out.mask_x, self.ignore_index)
        per_class = None
        if self.cfg.tail_sampling:
            reliable = (conf >= self.cfg.contrastive_threshold) & (lab != self.ignore_index)
            present = torch.bincount(lab[reliable].flatten().cpu(), minlength=self.num_classes)[: self.num_classes] > 0
            per_class = tail_anchor_counts(self.confidence.sampling_probabilities(), present,
                                           self.cfg.contrastive_anchors)
        anchors, positives, negatives = sample_contrastive_pairs(
            emb, lab, conf, self.memory, self.cfg.contrastive_anchors, self.cfg.contrastive_negatives,
            self.cfg.contrastive_threshold, self.generator, self.ignore_index, per_class,
        )
        loss = pixel_contrastive_loss(anchors, positives, negatives, self.cfg.contrastive_temperature)
        self._remember(emb, lab, conf)
        return self.cfg.lambda_contrastive * loss

    @torch.no_grad()
    def _remember(self, emb: torch.Tensor, lab: torch.Tensor, conf: torch.Tensor) -> None:
        flat = emb.detach().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        keep = (conf.reshape(-1) >= self.cfg.contrastive_threshold) & (lab.reshape(-1) != self.ignore_index)
        self.memory.push(flat[keep], lab.reshape(-1)[keep], self.ignore_index)

    def after_step(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.module.state_dict(), "memory": self.memory.state_dict(),
                "confidence": self.confidence.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["head"])
        self.memory.load_state_dict(state["memory"])
        self.confidence.load_state_dict(state["confidence"])


class AdversarialTerm:
    """Output-space adversarial alignment: labeled (source) softmax maps vs unlabeled
    (target) ones. The segmentation net is pushed (``lambda_adv``) to make target maps
    look like source maps; after each optimiser step the discriminator takes one step of
    its own (Adam, ``discriminator_lr``) on the detached maps of that step.
    """

    name = "loss_adv"
    needs_unlabeled = True  # target maps: without them there is nothing to align

    def __init__(self, cfg: MethodConfig, num_classes: int, ndf: int = 32) -> None:
        self.cfg = cfg
        self.discriminator = OutputDiscriminator(num_classes, ndf)
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.discriminator_lr,
                                          betas=(0.9, 0.99))
        self.module = None  # trained by its own optimiser, not the segmentation one
        self.synced = self.discriminator
        self._maps: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        if out.logits_u is None:
            return out.logits_x.sum() * 0.0
        self.discriminator.to(out.logits_u.device)
        source, target = out.logits_x.float().softmax(1), out.logits_u.float().softmax(1)
        self.discriminator.requires_grad_(False)
        loss = adversarial_generator_loss(self.discriminator(target))
        self.discriminator.requires_grad_(True)
        self._maps = (source.detach(), target.detach())
        return self.cfg.lambda_adv * loss

    def discriminator_step(self) -> float:
        """One discriminator update on the last step's maps; returns its loss."""
        if self._maps is None:
            return 0.0
        source, target = self._maps
        self._maps = None
        loss = discriminator_loss(self.discriminator(source), self.discriminator(target))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(self.discriminator)
        self.optimizer.step()
        return float(loss.detach())

    def after_step(self) -> None:
        self.discriminator_step()

    def state_dict(self) -> dict[str, Any]:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


class LaborTerm:
    """LabOR's two-head pixel selector trained beside the recipe on detached features.

    It adds nothing to the segmentation loss (the selector is a probe, see
    ``segrl.methods.labor``); its heads go into the round's snapshots so scoring can
    measure where they disagree.
    """

    name = "labor_discrepancy"
    needs_unlabeled = True

    def __init__(self, feature_channels: int, num_classes: int, ignore_index: int = 255, seed: int = 0) -> None:
        from segrl.methods.labor import LaborSelector

        self.selector = LaborSelector(feature_channels, num_classes, seed=seed)
        self.ignore_index = ignore_index
        self.module = None
        self.synced = nn.Module()  # the selector broadcasts and averages its own heads

    def __call__(self, out: StepOutputs) -> torch.Tensor:
        zero = out.logits_x.sum() * 0.0
        if out.feats_u is None:
            return zero
        self.selector.heads.to(out.feats_x.device)
        # LabOR's L_pt: the heads also learn the model's pseudo labels on unlabeled pixels
        pseudo = out.pseudo_u if out.pseudo_u is not None else out.pred_u
        if pseudo is not None:
            pseudo = to_feature_grid(pseudo, tuple(out.feats_u.shape[-2:]))
        stats = self.selector.step(out.feats_x.detach(), out.mask_x, out.feats_u.detach(), self.ignore_index,
                                   pseudo_unlabeled=pseudo)
        return zero.detach() + stats["discrepancy"]

    def after_step(self) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"labor_heads": self.selector.heads.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {"selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selector.load_state_dict(state["selector"])


def terms_need_unlabeled(cfg: MethodConfig) -> bool:
    """Whether a term ``build_terms`` builds for ``cfg`` has ``needs_unlabeled``, known before
    it is built (LabOR's selector, adversarial alignment)."""
    return cfg.labor_selector or cfg.lambda_adv > 0


def build_terms(cfg: MethodConfig, feature_channels: int, num_classes: int, ignore_index: int,
                seed: int) -> list[ContrastiveTerm | AdversarialTerm | LaborTerm]:
    """The optional terms ``cfg`` switches on (weight > 0)."""
    terms: list[ContrastiveTerm | AdversarialTerm | LaborTerm] = []
    if cfg.labor_selector:
        terms.append(LaborTerm(feature_channels, num_classes, ignore_index, seed))
    if cfg.lambda_contrastive > 0:
        terms.append(ContrastiveTerm(cfg, feature_channels, num_classes, ignore_index, seed))
    if cfg.lambda_adv > 0:
        terms.append(AdversarialTerm(cfg, num_classes))
    return terms
