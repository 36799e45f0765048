"""Loss terms: small pure functions over tensors, registered by name.

Every registered term returns a scalar. Segmentation terms take logits
``B x C x H x W`` and targets ``B x H x W`` (int64, ``ignore_index`` = 255 marks
pixels with no label) or teacher probabilities ``B x C x H x W``. Suffixes follow
UniMatch: ``_x`` labeled, ``_u_w`` weak view, ``_u_s`` strong view.

==========================  ==================================================
term                        paper
==========================  ==================================================
cross_entropy               supervised
confidence_weighted_ce      S4AL (Rangnekar et al., WACV 2023)
thresholded_pseudo_ce       FixMatch / UniMatch, ST++ (Yang et al.)
pixel_contrastive_loss      STAL (Guan et al.) on ReCo (Liu et al., ICLR 2022)
structure_consistency_kl    ProDA (Zhang et al., CVPR 2021)
classifier_discrepancy      LabOR (Shin et al., ICCV 2021) / MCD
adversarial_generator_loss  AdaptSegNet (Tsai et al., CVPR 2018)
discriminator_loss          AdaptSegNet
==========================  ==================================================

Unregistered helpers build the targets these terms need: image_confidence_weight,
sample_contrastive_pairs, prototype_soft_labels, proda_rectified_pseudo_labels,
classifier_discrepancy_map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

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
    image_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel cross-entropy averaged over labeled pixels.

    ``image_weight`` ``B`` weighs every pixel of image b by ``image_weight[b]`` in the
    (weighted) mean, e.g. importance weights of images drawn by their labeled pixels.
    A batch whose pixels are all ignored gives 0 with a gradient path (not NaN), which
    happens with sparse labels and with heavy crops of mostly-void frames.
    """
    labeled = target != ignore_index
    if labeled.sum() == 0:
        return logits.sum() * 0.0
    if class_weight is not None:
        class_weight = class_weight.to(device=logits.device, dtype=torch.float32)
    if image_weight is None:
        return F.cross_entropy(logits.float(), target, weight=class_weight, ignore_index=ignore_index)
    per_pixel = F.cross_entropy(logits.float(), target, weight=class_weight, ignore_index=ignore_index,
                                reduction="none")
    weight = image_weight.to(per_pixel).view(-1, 1, 1) * labeled
    if class_weight is not None:  # as F.cross_entropy's mean: divided by the class weights too
        weight = weight * class_weight.to(per_pixel)[target.clamp(max=len(class_weight) - 1)]
    return (per_pixel * image_weight.to(per_pixel).view(-1, 1, 1)).sum() / weight.sum().clamp(min=1e-12)


def inverse_sqrt_frequency_weights(class_pixel_counts: torch.Tensor) -> torch.Tensor:
    """Class weights ``C`` for :func:`cross_entropy`: ``w_c ~ f_c^-1/2`` for the labeled
    pixel frequencies ``f_c``, scaled so the mean weight of a labeled pixel is 1 (the loss
    keeps its scale). A class with no labeled pixel counts as one pixel: it never is a
    target, and the weight stays finite."""
    counts = class_pixel_counts.double().clamp(min=1)
    freq = counts / counts.sum()
    weights = freq.rsqrt()
    return (weights / (freq * weights).sum()).float()


# --------------------------------------------------------------------------------------
# Shared pieces. The confidence-masked CE is written once here and every pseudo-label
# loss is a choice of per-pixel weight on top of it.


def _valid_pixels(
    ignore_mask: torch.Tensor | None, like: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Bool ``B x H x W``: pixels that count.

    ``ignore_mask`` follows UniMatch: an integer map where ``ignore_index`` marks padding
    from crops, or a bool map where True means ignored. None means every pixel counts.
    """
    if ignore_mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if ignore_mask.dtype == torch.bool:
        return ~ignore_mask
    return ignore_mask != ignore_index


def _weighted_pixel_ce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """``sum(weight * CE)`` over valid pixels divided by the number of valid pixels.

    logits ``B x C x H x W``; target, weight, valid ``B x H x W``. Dividing by the valid
    count (not the weight sum) is what makes low confidence shrink the loss. No valid
    pixel gives 0 with a gradient path, and the clamp avoids a host sync on GPU.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weight * valid).sum() / valid.sum().clamp(min=1)


def _teacher_targets(teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, hard pseudo label), both ``B x H x W``, from ``B x C x H x W`` probs."""
    return teacher_probs.detach().max(dim=1)


# --------------------------------------------------------------------------------------
# Pseudo-label cross-entropy: S4AL (confidence weighted) and FixMatch/UniMatch (threshold).


def image_confidence_weight(
    teacher_probs: torch.Tensor,
    tau: float = 0.97,
    ignore_mask: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """S4AL image weight (Rangnekar et al., WACV 2023): share of an image's pixels the
    teacher is sure of.

    teacher_probs ``B x C x H x W`` -> ``B``: count(max prob >= tau) / count(valid pixels).
    An image with no valid pixel gets 0.
    """
    conf, _ = _teacher_targets(teacher_probs)
    valid = _valid_pixels(ignore_mask, conf, ignore_index)
    sure = ((conf >= tau) & valid).flatten(1).sum(1)
    return sure.float() / valid.flatten(1).sum(1).clamp(min=1)


@register_loss("confidence_weighted_ce")
def confidence_weighted_ce(
    logits_s: torch.Tensor,
    teacher_probs: torch.Tensor,
    ignore_mask: torch.Tensor | None = None,
    ignore_index: int = 255,
    image_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """S4AL pseudo-label loss (Rangnekar et al., WACV 2023).

    logits_s ``B x C x H x W`` (student, strong view); teacher_probs ``B x C x H x W``
    (EMA teacher softmax on the weak view, same geometry). The pseudo label is the
    teacher's argmax; each pixel's CE is weighted by the teacher's max probability and,
    if given, by ``image_weight`` ``B`` (see :func:`image_confidence_weight`). Returns
    the mean over non-ignored pixels. Teacher tensors are treated as constants.
    """
    conf, pseudo = _teacher_targets(teacher_probs)
    weight = conf
    if image_weight is not None:
        weight = weight * image_weight.detach().view(-1, 1, 1)
    valid = _valid_pixels(ignore_mask, pseudo, ignore_index)
    return _weighted_pixel_ce(logits_s, pseudo, weight, valid)


@register_loss("thresholded_pseudo_ce")
def thresholded_pseudo_ce(
    logits_s: torch.Tensor,
    teacher_probs: torch.Tensor,
    threshold: float,
    ignore_mask: torch.Tensor | None = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """FixMatch / UniMatch unsupervised loss (Sohn et al. 2020; Yang et al. CVPR 2023).

    CE against the teacher's argmax on pixels whose teacher confidence >= threshold,
    summed and divided by all non-ignored pixels: fewer confident pixels, smaller loss.
    Shapes as in :func:`confidence_weighted_ce`.
    """
    conf, pseudo = _teacher_targets(teacher_probs)
    valid = _valid_pixels(ignore_mask, pseudo, ignore_index)
    return _weighted_pixel_ce(logits_s, pseudo, (conf >= threshold).float(), valid)


# --------------------------------------------------------------------------------------
# Pixel contrastive learning: STAL (Guan et al.) on top of ReCo (Liu et al., ICLR 2022).


class NegativeBank(Protocol):
    """What :func:`sample_contrastive_pairs` needs of a memory bank
    (``segrl.methods.banks.FeatureMemoryBank`` is one)."""

    def means(self) -> torch.Tensor: ...

    def counts(self) -> torch.Tensor: ...

    def sample_negatives(
        self, exclude_class: int, m: int, generator: torch.Generator | None = None
    ) -> torch.Tensor: ...


@register_loss("pixel_contrastive_loss")
def pixel_contrastive_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.5,
) -> torch.Tensor:
    """InfoNCE over pixel embeddings (ReCo; STAL's contrastive term).

    anchors ``N x D``, positives ``N x D`` (one per anchor), negatives ``N x M x D``.
    Similarities are cosine / temperature; the loss is the mean over anchors of
    ``-log softmax`` of the positive among ``[positive, negatives]``. ``N = 0`` gives 0
    with a gradient path.
    """
    if anchors.shape[0] == 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors.float(), dim=-1)
    pos = (a * F.normalize(positives.float(), dim=-1)).sum(-1, keepdim=True)  # N x 1
    neg = torch.einsum("nd,nmd->nm", a, F.normalize(negatives.float(), dim=-1))  # N x M
    logits = torch.cat([pos, neg], dim=1) / temperature
    # the positive sits at column 0 of every row
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def _flatten_pixels(
    features: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``B x D x h x w`` maps (or already ``N x D``) -> ``N x D``, ``N``, ``N``."""
    if features.dim() == 4:
        if features.shape[-2:] != labels.shape[-2:] or labels.shape != confidence.shape:
            raise ValueError(
                f"features {tuple(features.shape)}, labels {tuple(labels.shape)} and confidence "
                f"{tuple(confidence.shape)} must share one grid; resize labels with mode='nearest'"
            )
        features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return features, labels.reshape(-1), confidence.reshape(-1)


def sample_contrastive_pairs(
    features: torch.Tensor,
    labels: torch.Tensor,
    confidence: torch.Tensor,
    memory_bank: NegativeBank,
    num_anchors: int,
    num_negatives: int,
    threshold: float,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
    anchors_per_class: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors, positives and negatives for :func:`pixel_contrastive_loss` (ReCo / STAL).

    features ``B x D x h x w`` (student embeddings, e.g. a ProjectionHead output) with
    labels and confidence ``B x h x w`` on the same grid (ground truth with confidence 1,
    or pseudo labels with teacher max prob); ``N x D`` / ``N`` / ``N`` also accepted.

    For every class ``c`` among reliable pixels (confidence >= threshold, label not
    ignored) whose negatives exist in the bank: up to ``num_anchors`` reliable pixels
    of ``c`` drawn without replacement are anchors (they keep their gradient); their
    positive is ``c``'s prototype, the bank mean of ``c`` or, while the bank holds none,
    the detached mean of this batch's reliable ``c`` pixels; their ``num_negatives``
    negatives come from other classes' bank entries. Returns ``(A x D, A x D,
    A x num_negatives x D)`` with ``A`` the anchors over all classes (possibly 0).
    ``anchors_per_class`` (``C`` ints, e.g. from :func:`tail_anchor_counts`) replaces
    ``num_anchors`` class by class, so tail classes can get more anchors (STAL).
    """
    feats, labs, conf = _flatten_pixels(features, labels, confidence)
    reliable = (conf >= threshold) & (labs != ignore_index)
    bank_means, bank_counts = memory_bank.means(), memory_bank.counts()
    anchors, positives, negatives = [], [], []
    for c in labs[reliable].unique().tolist():
        idx = torch.nonzero(reliable & (labs == c)).squeeze(1)
        wanted = num_anchors if anchors_per_class is None else int(anchors_per_class[c])
        if wanted <= 0:
            continue
        pick = idx[torch.randperm(idx.numel(), generator=generator)[:wanted].to(idx.device)]
        # every anchor gets its own negatives, as in ReCo
        negs = memory_bank.sample_negatives(c, pick.numel() * num_negatives, generator)
        if negs.shape[0] == 0:
            continue  # the bank holds no other class yet: nothing to contrast against
        if bank_counts[c] > 0:
            proto = bank_means[c].to(feats)
        else:
            proto = feats[idx].detach().mean(0)
        anchors.append(feats[pick])
        positives.append(proto.expand(pick.numel(), -1))
        negatives.append(negs.to(feats).view(pick.numel(), num_negatives, -1))
    dim = feats.shape[1]
    if not anchors:
        empty = feats.new_zeros(0, dim)
        return empty, empty, feats.new_zeros(0, num_negatives, dim)
    return torch.cat(anchors), torch.cat(positives), torch.cat(negatives)


def tail_anchor_counts(class_probs: torch.Tensor, present: torch.Tensor, per_class: int) -> torch.Tensor:
    """Anchors per class for STAL's tail-class sampling: ``C`` int64.

    ``class_probs`` ``C`` (e.g. ``ClassConfidenceBank.sampling_probabilities()``),
    ``present`` ``C`` bool. The ``per_class x n_present`` anchors of a step are shared
    among the present classes in proportion to their probability (renormalised over
    them), at least one each; absent classes get 0.
    """
    present = present.bool()
    counts = torch.zeros_like(class_probs, dtype=torch.long)
    if not present.any():
        return counts
    p = class_probs.float() * present
    p = p / p.sum().clamp(min=1e-12)
    total = per_class * int(present.sum())
    counts[present] = (p[present] * total).round().long().clamp(min=1)
    return counts


# --------------------------------------------------------------------------------------
# ProDA (Zhang et al., CVPR 2021): prototypical pseudo-label denoising and target
# structure learning.


def _prototype_logits(features_flat: torch.Tensor, prototypes: torch.Tensor, temperature: float,
                      known: torch.Tensor | None) -> torch.Tensor:
    """``B x N x C`` logits ``-||f - proto_c|| / T``; classes without a prototype (``known``
    False) get -inf: a zero row is no prototype, only a distance to the origin."""
    protos = prototypes.float().to(features_flat.device).unsqueeze(0).expand(features_flat.shape[0], -1, -1)
    logits = -torch.cdist(features_flat, protos) / temperature
    if known is not None:
        logits = logits.masked_fill(~known.to(logits.device).view(1, 1, -1), float("-inf"))
    return logits


def prototype_soft_labels(
    features: torch.Tensor, prototypes: torch.Tensor, temperature: float, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft assignment of each pixel feature to the class prototypes (ProDA eq. 4).

    features ``B x D x h x w``, prototypes ``C x D`` -> ``B x C x h x w``:
    ``softmax_c(-||f - proto_c||_2 / temperature)`` over the ``known`` classes (``C``
    bool, None = all; at least one); the others get 0.
    """
    b, d, h, w = features.shape
    flat = features.float().permute(0, 2, 3, 1).reshape(b, h * w, d)
    logits = _prototype_logits(flat, prototypes, temperature, known).view(b, h, w, -1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


def proda_rectified_pseudo_labels(
    initial_soft: torch.Tensor,
    features: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float,
    known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProDA online pseudo-label rectification (ProDA eq. 3-5).

    initial_soft ``B x C x H x W``: the (EMA) model's softmax, fixed or online;
    features ``B x D x h x w`` from the same model. The prototype weights
    (:func:`prototype_soft_labels`) are upsampled bilinearly to ``H x W`` when the
    grids differ. Returns ``(rectified, hard)``: ``rectified`` ``B x C x H x W`` is
    ``initial_soft * weights`` renormalised over classes, ``hard`` ``B x H x W`` its
    argmax. A class without a prototype (``known`` ``C`` bool False) gets the neutral
    weight ``1 / (known classes)``: its pseudo labels rest on ``initial_soft`` alone,
    and can still appear (and so found its prototype). No gradient flows: these are targets.
    """
    with torch.no_grad():
        if known is not None and not known.any():
            weights = torch.ones_like(initial_soft.float())
        else:
            weights = prototype_soft_labels(features, prototypes, temperature, known)
            if known is not None:
                unknown = ~known.to(weights.device)
                weights[:, unknown] = 1.0 / int(known.sum())
        if weights.shape[-2:] != initial_soft.shape[-2:]:
            weights = F.interpolate(
                weights, size=initial_soft.shape[-2:], mode="bilinear", align_corners=False
            )
        rectified = initial_soft.float() * weights
        # an all-zero row (both factors ~0) falls back to uniform instead of NaN
        rectified = rectified / rectified.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return rectified, rectified.argmax(dim=1)


@register_loss("structure_consistency_kl")
def structure_consistency_kl(
    features_u_w: torch.Tensor,
    features_u_s: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """ProDA target structure learning: ``KL(z_u_w || z_u_s)`` per pixel, averaged.

    features ``B x D x h x w`` of the weak view (EMA teacher; a detached target) and of
    the strong view (student); ``z`` is the soft prototype assignment of
    :func:`prototype_soft_labels` over the ``known`` classes (``C`` bool, None = all).
    Zero when both views embed alike, and with no prototype yet.
    """
    if known is not None:
        if not known.any():
            return features_u_s.sum() * 0.0
        prototypes, known = prototypes[known.to(prototypes.device)], None
    b, d, h, w = features_u_s.shape
    flat_w = features_u_w.detach().float().permute(0, 2, 3, 1).reshape(b, h * w, d)
    flat_s = features_u_s.float().permute(0, 2, 3, 1).reshape(b, h * w, d)
    log_z_w = _prototype_logits(flat_w, prototypes.detach(), temperature, known).log_softmax(dim=-1)
    log_z_s = _prototype_logits(flat_s, prototypes.detach(), temperature, known).log_softmax(dim=-1)
    # written out (not F.kl_div) so identical views give exactly 0
    return (log_z_w.exp() * (log_z_w - log_z_s)).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------
# LabOR (Shin et al., ICCV 2021) on top of MCD (Saito et al., CVPR 2018).


def classifier_discrepancy_map(probs_a: torch.Tensor, probs_b: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 distance between two heads' probabilities: ``B x C x H x W`` -> ``B x H x W``.

    This is LabOR's disagreement score (higher = label this pixel first). MCD divides
    by ``C``; the sum keeps the score in ``[0, 2]`` whatever the class count.
    """
    return (probs_a.float() - probs_b.float()).abs().sum(dim=1)


@register_loss("classifier_discrepancy")
def classifier_discrepancy(
    probs_a: torch.Tensor, probs_b: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """LabOR / MCD discrepancy: ``|p_a - p_b|`` averaged over classes and pixels (MCD).

    probs ``B x C x H x W``; valid ``B x H x W`` bool (True = counted), None = all.
    The heads maximise it and the feature extractor minimises it. The class mean (not
    the sum of :func:`classifier_discrepancy_map`) keeps MCD's scale for its weight: a
    sum is C times larger and drives the heads apart on every pixel.
    """
    dist = classifier_discrepancy_map(probs_a, probs_b) / probs_a.shape[1]
    if valid is None:
        return dist.mean()
    return (dist * valid).sum() / valid.sum().clamp(min=1)


# --------------------------------------------------------------------------------------
# AdaptSegNet (Tsai et al., CVPR 2018): adversarial alignment in output space.
# A discriminator (models.heads.OutputDiscriminator) sees softmax maps: source -> 1, target -> 0.

SOURCE_LABEL = 1.0
TARGET_LABEL = 0.0


@register_loss("adversarial_generator_loss")
def adversarial_generator_loss(d_logits_target: torch.Tensor) -> torch.Tensor:
    """Segmentation net's adversarial term: the discriminator should take target
    outputs for source. d_logits_target ``B x 1 x h x w`` -> scalar BCE-with-logits."""
    return F.binary_cross_entropy_with_logits(
        d_logits_target.float(), torch.full_like(d_logits_target, SOURCE_LABEL, dtype=torch.float)
    )


@register_loss("discriminator_loss")
def discriminator_loss(
    d_logits_source: torch.Tensor, d_logits_target: torch.Tensor
) -> torch.Tensor:
    """Discriminator term: source maps -> 1, target maps -> 0; the two BCE halves are
    averaged as in AdaptSegNet. Feed it detached segmentation outputs."""
    source = F.binary_cross_entropy_with_logits(
        d_logits_source.float(), torch.full_like(d_logits_source, SOURCE_LABEL, dtype=torch.float)
    )
    target = F.binary_cross_entropy_with_logits(
        d_logits_target.float(), torch.full_like(d_logits_target, TARGET_LABEL, dtype=torch.float)
    )
    return (source + target) / 2
