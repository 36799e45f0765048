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

* ``pseudo_label`` (the student stages of ST / ST++, Yang et al., CVPR 2022): offline
  hard pseudo labels of unlabeled images, learned on a strong view beside the labeled
  batch. ``segrl.engine.selftrain`` runs the teacher, the pseudo labeling and the stages.
* ``proda`` (Zhang et al., CVPR 2021): the starting (source-only) model's soft labels,
  fixed, re-weighted online by the distance of EMA features to class prototypes; the
  student learns their argmax on a strong view, plus target structure learning (KL of
  prototype assignments between weak and strong views).
* ``distill`` (ProDA's last stage): a fresh student learns a trained teacher's soft
  labels on unlabeled images beside the labeled batch.

Any recipe can add the optional terms of ``segrl.methods.terms`` (STAL's pixel
contrastive loss with tail-class sampling, output-space adversarial alignment).

Labeled and unlabeled images go through the network in one forward pass (as UniMatch
does): one DDP forward per step, and BatchNorm sees both domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from segrl.config import MethodConfig
from segrl.data.batch_augment import BatchStrongView
from segrl.data.classmix import ReplayBuffer, balanced_class_probabilities, batch_mix_masks
from segrl.losses import (
    confidence_weighted_ce,
    cross_entropy,
    image_confidence_weight,
    proda_rectified_pseudo_labels,
    structure_consistency_kl,
)
from segrl.methods.banks import PrototypeBank
from segrl.methods.terms import (
    StepOutputs,
    broadcast_parameters,
    build_terms,
    terms_need_unlabeled,
    to_feature_grid,
)
from segrl.models.ema import EMATeacher, unwrap

RECIPES = ("supervised", "mean_teacher", "pseudo_label", "proda", "distill")


def valid_pixels(batch: dict) -> torch.Tensor:
    """``B x H x W`` bool: the frames' own pixels, False on crop padding (``ToTensors``'s
    ``valid``; a batch without it counts every pixel)."""
    if "valid" in batch:
        return batch["valid"].bool()
    image = batch["image"]
    return torch.ones(image.shape[0], *image.shape[-2:], dtype=torch.bool, device=image.device)


STRONG_VIEW = BatchStrongView()  # strong_transform's augmentation, on whole batches


def strong_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Strong views ``B x 3 x H x W`` of weak images and their cutout masks ``B x H x W``
    (True where cutout blanked the pixel: no pseudo label may be learned there), made on
    the images' own device, each image with its own random draw. In float32 even under
    autocast: they are inputs, not activations."""
    with torch.autocast(device_type=images.device.type, enabled=False):
        return STRONG_VIEW(images)


class Recipe:
    """What every recipe shares: the optional terms, their state and their modules.

    Subclasses implement ``compute(model, batch_x, batch_u, epoch) -> (losses, outputs)``
    with ``losses["loss"]`` the recipe's own total; the enabled terms are added to it.
    """

    uses_unlabeled = False
    needs_pseudo = False  # unlabeled batches come with offline pseudo labels ("mask")
    class_weight: torch.Tensor | None = None  # ``C`` weights of the labeled CE (train.class_weighting)

    def __init__(self, model: nn.Module, cfg: MethodConfig, ignore_index: int = 255, seed: int = 0) -> None:
        self.cfg, self.ignore_index = cfg, ignore_index
        bare = unwrap(model)
        self.terms = build_terms(cfg, bare.feature_channels, bare.num_classes, ignore_index, seed)

    @property
    def needs_unlabeled(self) -> bool:
        return self.uses_unlabeled or any(getattr(term, "needs_unlabeled", False) for term in self.terms)

    def snapshot_extras(self) -> dict[str, Any]:
        """What snapshots carry besides the model (LabOR's heads, for scoring)."""
        extras: dict[str, Any] = {}
        for term in self.terms:
            if hasattr(term, "snapshot"):
                extras.update(term.snapshot())
        return extras

    def compute(self, model: nn.Module, batch_x: dict, batch_u: dict | None,
                epoch: int) -> tuple[dict, StepOutputs]:
        raise NotImplementedError

    def losses(self, model: nn.Module, batch_x: dict, batch_u: dict | None, epoch: int) -> dict:
        out, outputs = self.compute(model, batch_x, batch_u, epoch)
        for term in self.terms:
            value = term(outputs)
            out["loss"] = out["loss"] + value
            out[term.name] = value.detach()
        return out

    def trainable_modules(self) -> list[nn.Module]:
        """Modules outside the model trained by the main optimiser (projection heads)."""
        return [term.module for term in self.terms if term.module is not None]

    def broadcast(self) -> None:
        """Start every rank from rank 0's term parameters (they live outside DDP)."""
        for term in self.terms:
            broadcast_parameters(term.synced)

    def after_step(self, model: nn.Module, step: int) -> None:
        for term in self.terms:
            term.after_step()

    def eval_model(self, model: nn.Module) -> nn.Module:
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"terms": [term.state_dict() for term in self.terms]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for term, saved in zip(self.terms, state.get("terms", []), strict=False):
            term.load_state_dict(saved)

    def _labeled_ce(self, logits: torch.Tensor, batch_x: dict) -> torch.Tensor:
        """CE on the labeled batch; images drawn by their labeled pixels carry ``label_weight``
        (``segrl.training.label_weights``), which keeps every labeled pixel's weight equal."""
        return cross_entropy(logits, batch_x["mask"], ignore_index=self.ignore_index,
                             class_weight=self.class_weight, image_weight=batch_x.get("label_weight"))

    def _supervised(self, model: nn.Module, batch_x: dict) -> tuple[dict, StepOutputs]:
        logits, feats = model(batch_x["image"], return_features=True)
        loss = self._labeled_ce(logits, batch_x)
        return {"loss": loss, "loss_x": loss.detach()}, StepOutputs(logits, feats, batch_x["mask"])


class SupervisedRecipe(Recipe):
    """Cross-entropy on labeled pixels only (unlabeled features only feed probes like LabOR's).

    With ``method.lambda_adv > 0`` this is AdaptSegNet (source-only training plus output-space
    alignment, ProDA's warm-up): the unlabeled weak view then goes through the same train-mode
    forward as the labeled batch, with gradients, so the adversarial term can move the model.
    """

    def compute(self, model, batch_x, batch_u, epoch):
        if batch_u is not None and self.cfg.lambda_adv > 0:
            return self._aligned(model, batch_x, batch_u)
        out, outputs = self._supervised(model, batch_x)
        if batch_u is not None:
            logits_u, outputs.feats_u = probe_forward(model, batch_u["image"])
            outputs.pred_u = logits_u.argmax(1).masked_fill(~valid_pixels(batch_u), self.ignore_index)
        return out, outputs

    def _aligned(self, model: nn.Module, batch_x: dict, batch_u: dict) -> tuple[dict, StepOutputs]:
        f = _joint_forward(self, model, batch_x, batch_u["image"], ~valid_pixels(batch_u))
        pred_u = f.logits_u.detach().argmax(1).masked_fill(f.unseen_u, self.ignore_index)
        return {"loss": f.loss_x, "loss_x": f.loss_x.detach()}, StepOutputs(
            f.logits_x, f.feats_x, batch_x["mask"], f.logits_u, f.feats_u, pred_u=pred_u)


@torch.no_grad()
def probe_forward(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``B x C x H x W`` and features ``B x D x h x w`` of ``images`` from a forward
    that leaves the model as it was.

    Eval mode: a train-mode forward would move BatchNorm's running statistics toward these
    images (a probe must not change the model it measures), and it gives the features that
    scoring sees. The random stream is restored, so a run with a probe draws what one
    without it draws.
    """
    bare = unwrap(model)
    was_training = bare.training
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        bare.eval()
        try:
            logits, feats = bare(images, return_features=True)
        finally:
            bare.train(was_training)
    return logits, feats


class MeanTeacherRecipe(Recipe):
    """S4AL mean teacher with confidence weighting and optional Balanced ClassMix."""

    uses_unlabeled = True

    def __init__(
        self,
        model: nn.Module,
        cfg: MethodConfig,
        class_pixel_counts: torch.Tensor | None = None,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        super().__init__(model, cfg, ignore_index, seed)
        self.teacher = EMATeacher(model, cfg.ema_momentum)
        self.buffer = ReplayBuffer(cfg.replay_buffer, seed) if cfg.classmix and cfg.replay_buffer else None
        counts = class_pixel_counts if class_pixel_counts is not None else torch.ones(1)
        self.mix_probs = balanced_class_probabilities(counts, cfg.classmix_temperature)
        self.generator = torch.Generator().manual_seed(seed)
        self._teacher_has_own_statistics = False  # set by the first step with unlabeled images

    def _teacher_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher softmax on weak views. Its BatchNorm keeps statistics of weak views of
        its own (see ``after_step``): the student's come mostly from strong, mixed views,
        while the teacher is the model that is evaluated and deployed."""
        return self.teacher.with_batch_statistics(images).float().softmax(1)

    def _mix(self, images: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor,
             sources: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Balanced ClassMix on weak views: paste tail-biased classes of a source image
        (the teacher's pseudo labels on its own pixels) onto each image, one mix per image.

        images ``B x 3 x H x W``, probs ``B x C x H x W``, valid ``B x H x W`` (False on crop
        padding); sources the same three for the source images. Returns the mixed images,
        probabilities and valid maps; a source's padding is never pasted.
        """
        src_images, src_probs, src_valid = sources
        src_pseudo = src_probs.argmax(1).masked_fill(~src_valid, self.ignore_index)
        paste = batch_mix_masks(src_pseudo, self.mix_probs, self.ignore_index, self.generator).unsqueeze(1)
        return (torch.where(paste, src_images, images), torch.where(paste, src_probs, probs),
                paste.squeeze(1) | valid)

    def compute(self, model, batch_x, batch_u, epoch):
        images_x, masks_x = batch_x["image"], batch_x["mask"]
        if batch_u is None or epoch < self.cfg.cold_start_epochs:
            return self._supervised(model, batch_x)
        self._teacher_has_own_statistics = True
        images_u, valid_u = batch_u["image"], valid_pixels(batch_u)
        n_x, n_u = images_x.shape[0], images_u.shape[0]
        replayed = self.buffer is not None and len(self.buffer) > 0
        if replayed:  # earlier weak views, labeled by the teacher in the same forward
            old_images, old_valid = (t.to(images_u.device) for t in self.buffer.sample(n_u))
            probs = self._teacher_probs(torch.cat([images_u, old_images]))
            probs_u, sources = probs[:n_u], (old_images, probs[n_u:], old_valid.bool())
        else:
            probs_u = self._teacher_probs(images_u)
            sources = (images_u.roll(1, 0), probs_u.roll(1, 0), valid_u.roll(1, 0))
        if self.buffer is not None:
            self.buffer.add((images_u.detach().cpu(), valid_u.long().cpu()))
        if self.cfg.classmix:
            # S4AL: the student learns the mixed images only, one per unlabeled image
            images_u, probs_u, valid_u = self._mix(images_u, probs_u, valid_u, sources)
        strong_u, cut_u = strong_views(images_u)
        ignore_u = cut_u | ~valid_u  # cutout boxes and crop padding: nothing to see there
        logits, feats = model(torch.cat([images_x, strong_u]), return_features=True)
        loss_x = self._labeled_ce(logits[:n_x], batch_x)
        loss_u = self._pseudo_loss(logits[n_x:], probs_u, ignore_u)
        name, weight = ("loss_mix", self.cfg.lambda_mix) if self.cfg.classmix else ("loss_u", self.cfg.lambda_u)
        out = {"loss": loss_x + weight * loss_u, "loss_x": loss_x.detach(), name: loss_u.detach()}
        conf_u, pseudo_u = probs_u.max(1)
        outputs = StepOutputs(logits[:n_x], feats[:n_x], masks_x, logits[n_x:], feats[n_x:],
                              pseudo_u.masked_fill(ignore_u, self.ignore_index), conf_u, probs_u)
        return out, outputs

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
        # Supervised-only (cold start) steps give the teacher no forward: copy the student's
        # statistics, which then come from weak labeled views alone.
        self.teacher.update(model, step, copy_buffers=not self._teacher_has_own_statistics)
        super().after_step(model, step)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The teacher: an average of students, and what S4AL evaluates and deploys."""
        return self.teacher.model

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"teacher": self.teacher.state_dict(), **super().state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        if self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        super().load_state_dict(state)


@dataclass
class JointForward:
    """One forward pass of labeled images and views of unlabeled ones (strong views for
    the self-training recipes, the weak view for AdaptSegNet)."""

    loss_x: torch.Tensor
    logits_x: torch.Tensor
    feats_x: torch.Tensor
    logits_u: torch.Tensor
    feats_u: torch.Tensor
    unseen_u: torch.Tensor  # cutout boxes of strong views and crop padding: no pseudo label there


def _student_on_strong_view(recipe: Recipe, model: nn.Module, batch_x: dict, batch_u: dict) -> JointForward:
    strong_u, cut_u = strong_views(batch_u["image"])
    return _joint_forward(recipe, model, batch_x, strong_u, cut_u | ~valid_pixels(batch_u))


def _joint_forward(recipe: Recipe, model: nn.Module, batch_x: dict, images_u: torch.Tensor,
                   unseen_u: torch.Tensor) -> JointForward:
    """The labeled batch and ``images_u`` in one forward, the labeled cross-entropy on the
    first part; ``unseen_u`` (cutout, crop padding) travels along."""
    n_x = batch_x["image"].shape[0]
    logits, feats = model(torch.cat([batch_x["image"], images_u]), return_features=True)
    loss_x = recipe._labeled_ce(logits[:n_x], batch_x)
    return JointForward(loss_x, logits[:n_x], feats[:n_x], logits[n_x:], feats[n_x:], unseen_u)


class PseudoLabelRecipe(Recipe):
    """ST / ST++ student: offline hard pseudo labels learned on a strong view."""

    uses_unlabeled = True
    needs_pseudo = True

    def compute(self, model, batch_x, batch_u, epoch):
        if batch_u is None:
            return self._supervised(model, batch_x)
        f = _student_on_strong_view(self, model, batch_x, batch_u)
        pseudo = batch_u["mask"].masked_fill(f.unseen_u, self.ignore_index)
        loss_u = cross_entropy(f.logits_u, pseudo, ignore_index=self.ignore_index)
        outputs = StepOutputs(f.logits_x, f.feats_x, batch_x["mask"], f.logits_u, f.feats_u, pseudo,
                              torch.ones_like(pseudo, dtype=torch.float))
        total = f.loss_x + self.cfg.lambda_u * loss_u
        return {"loss": total, "loss_x": f.loss_x.detach(), "loss_u": loss_u.detach()}, outputs


class ProdaRecipe(Recipe):
    """ProDA: prototype-rectified pseudo labels and target structure learning.

    The model starts from source-only weights (``model.weights``); a frozen copy of it
    gives the fixed initial soft labels (ProDA computes them once, offline; a frozen
    model on the same weak view gives the same), an EMA copy gives the features that
    place pixels relative to the class prototypes.
    """

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: MethodConfig, ignore_index: int = 255, seed: int = 0) -> None:
        super().__init__(model, cfg, ignore_index, seed)
        bare = unwrap(model)
        self.initial = EMATeacher(bare, 1.0)  # momentum 1: never moves
        self.teacher = EMATeacher(bare, cfg.ema_momentum)
        self.prototypes = PrototypeBank(bare.num_classes, bare.feature_channels, cfg.prototype_momentum)

    def compute(self, model, batch_x, batch_u, epoch):
        if batch_u is None:
            return self._supervised(model, batch_x)
        images_u = batch_u["image"]
        initial_soft = self.initial(images_u).float().softmax(1)
        _, feats_w = self.teacher(images_u, return_features=True)
        grid = tuple(feats_w.shape[-2:])
        protos = self.prototypes.prototypes.to(feats_w.device)
        known = self.prototypes.initialized.to(feats_w.device)  # no zero row enters a softmax
        rectified, hard = proda_rectified_pseudo_labels(initial_soft, feats_w, protos, self.cfg.proda_temperature,
                                                        known)
        f = _student_on_strong_view(self, model, batch_x, batch_u)
        pseudo = hard.masked_fill(f.unseen_u, self.ignore_index)
        loss_u = cross_entropy(f.logits_u, pseudo, ignore_index=self.ignore_index)
        loss_kl = structure_consistency_kl(feats_w, f.feats_u, protos, self.cfg.proda_temperature, known)
        # prototypes follow the rectified labels of the EMA features on the frames' own pixels
        # (ProDA eq. 6); before any prototype exists these are the initial model's labels
        own = hard.masked_fill(~valid_pixels(batch_u), self.ignore_index)
        self.prototypes.update(feats_w, to_feature_grid(own, grid), self.ignore_index)
        outputs = StepOutputs(f.logits_x, f.feats_x, batch_x["mask"], f.logits_u, f.feats_u, pseudo,
                              rectified.max(1).values, rectified)
        total = f.loss_x + self.cfg.lambda_u * loss_u + self.cfg.lambda_structure * loss_kl
        return {"loss": total, "loss_x": f.loss_x.detach(), "loss_u": loss_u.detach(),
                "loss_structure": loss_kl.detach()}, outputs

    def after_step(self, model: nn.Module, step: int) -> None:
        self.teacher.update(model, step)
        super().after_step(model, step)

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial.state_dict(), "teacher": self.teacher.state_dict(),
                "prototypes": self.prototypes.state_dict(), **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial.load_state_dict(state["initial"])
        self.teacher.load_state_dict(state["teacher"])
        self.prototypes.load_state_dict(state["prototypes"])
        super().load_state_dict(state)


class DistillRecipe(Recipe):
    """Knowledge distillation into a fresh student (ProDA stage 3): KL from a frozen
    teacher's soft labels on the weak view to the student's strong view."""

    uses_unlabeled = True

    def __init__(self, model: nn.Module, cfg: MethodConfig, ignore_index: int = 255, seed: int = 0,
                 endpoint_url: str | None = None) -> None:
        from segrl.models import build_model

        super().__init__(model, cfg, ignore_index, seed)
        bare = unwrap(model)
        teacher = build_model(bare.arch, bare.num_classes, weights=cfg.teacher_weights, endpoint_url=endpoint_url)
        self.teacher = EMATeacher(teacher, 1.0)
        self.teacher.model.to(next(bare.parameters()).device)

    def compute(self, model, batch_x, batch_u, epoch):
        if batch_u is None:
            return self._supervised(model, batch_x)
        images_u = batch_u["image"]
        soft = self.teacher(images_u).float().softmax(1)
        f = _student_on_strong_view(self, model, batch_x, batch_u)
        keep = (~f.unseen_u).unsqueeze(1).float()
        log_student = f.logits_u.float().log_softmax(1)
        kl = (soft * (soft.clamp(min=1e-8).log() - log_student) * keep).sum(1).sum() / keep.sum().clamp(min=1)
        conf, pseudo = soft.max(1)
        outputs = StepOutputs(f.logits_x, f.feats_x, batch_x["mask"], f.logits_u, f.feats_u,
                              pseudo.masked_fill(f.unseen_u, self.ignore_index), conf, soft)
        total = f.loss_x + self.cfg.lambda_u * kl
        return {"loss": total, "loss_x": f.loss_x.detach(), "loss_u": kl.detach()}, outputs


def unlabeled_draws(cfg: MethodConfig) -> str | None:
    """Which set the recipe ``cfg`` names draws unlabeled batches from, known before it is
    built (the driver plans the stream of that set): ``"pseudo"`` (offline pseudo labels),
    ``"unlabeled"``, or None. What the built recipe's ``needs_unlabeled`` says."""
    recipe = {"supervised": SupervisedRecipe, "mean_teacher": MeanTeacherRecipe, "pseudo_label": PseudoLabelRecipe,
              "proda": ProdaRecipe, "distill": DistillRecipe}[cfg.name]
    if not (recipe.uses_unlabeled or terms_need_unlabeled(cfg)):
        return None
    return "pseudo" if recipe.needs_pseudo else "unlabeled"


def build_recipe(
    cfg: MethodConfig, model: nn.Module, class_pixel_counts: torch.Tensor | None, ignore_index: int, seed: int,
    endpoint_url: str | None = None, class_weight: torch.Tensor | None = None,
) -> Recipe:
    """The recipe ``cfg.name`` names (see ``RECIPES``); ``class_weight`` ``C`` weighs the
    classes of its labeled cross-entropy."""
    recipe = _new_recipe(cfg, model, class_pixel_counts, ignore_index, seed, endpoint_url)
    recipe.class_weight = class_weight
    return recipe


def _new_recipe(cfg: MethodConfig, model: nn.Module, class_pixel_counts: torch.Tensor | None, ignore_index: int,
                seed: int, endpoint_url: str | None) -> Recipe:
    if cfg.name == "supervised":
        return SupervisedRecipe(model, cfg, ignore_index, seed)
    if cfg.name == "mean_teacher":
        return MeanTeacherRecipe(model, cfg, class_pixel_counts, ignore_index, seed)
    if cfg.name == "pseudo_label":
        return PseudoLabelRecipe(model, cfg, ignore_index, seed)
    if cfg.name == "proda":
        return ProdaRecipe(model, cfg, ignore_index, seed)
    if cfg.name == "distill":
        return DistillRecipe(model, cfg, ignore_index, seed, endpoint_url)
    raise ValueError(
        f"method.name {cfg.name!r} is not a single-run recipe; valid names: {', '.join(RECIPES)} "
        "(st and st_pp run through segrl.engine.selftrain)"
    )
