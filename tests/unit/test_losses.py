"""Self-training loss terms on hand-built inputs whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segrl.losses import (
    LOSSES,
    adversarial_generator_loss,
    classifier_discrepancy,
    classifier_discrepancy_map,
    confidence_weighted_ce,
    cross_entropy,
    discriminator_loss,
    get_loss,
    image_confidence_weight,
    inverse_sqrt_frequency_weights,
    pixel_contrastive_loss,
    proda_rectified_pseudo_labels,
    prototype_soft_labels,
    sample_contrastive_pairs,
    structure_consistency_kl,
    thresholded_pseudo_ce,
)
from segrl.methods.banks import FeatureMemoryBank
from segrl.models.heads import OutputDiscriminator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A 1 x 2 x 2 x 2 teacher map: (class-0 prob, class-1 prob) per pixel.
TEACHER = torch.tensor([[[[0.9, 0.2], [0.6, 0.99]], [[0.1, 0.8], [0.4, 0.01]]]])


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="none")


# ---- registry ------------------------------------------------------------------------


def test_registry_keeps_cross_entropy_and_lists_names_on_a_miss():
    assert get_loss("cross_entropy") is cross_entropy
    with pytest.raises(KeyError, match="confidence_weighted_ce"):
        get_loss("nope")


def _cases() -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    probs = torch.randn(2, 3, 4, 4, generator=g).softmax(1)
    feats = torch.randn(2, 5, 4, 4, generator=g, requires_grad=True)
    protos = torch.randn(3, 5, generator=g)
    d_out = torch.randn(2, 1, 2, 2, generator=g, requires_grad=True)
    emb = torch.randn(6, 8, generator=g, requires_grad=True)
    return {
        "cross_entropy": ((logits, torch.randint(0, 3, (2, 4, 4), generator=g)), logits),
        "confidence_weighted_ce": ((logits, probs), logits),
        "thresholded_pseudo_ce": ((logits, probs, 0.5), logits),
        "pixel_contrastive_loss": ((emb, torch.randn(6, 8), torch.randn(6, 4, 8)), emb),
        "structure_consistency_kl": ((feats.detach() + 0.1, feats, protos, 1.0), feats),
        "classifier_discrepancy": ((logits.softmax(1), probs), logits),
        "adversarial_generator_loss": ((d_out,), d_out),
        "discriminator_loss": ((d_out, torch.randn(2, 1, 2, 2)), d_out),
    }


def test_every_registered_loss_has_a_contract_case():
    assert set(_cases()) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_registered_loss_is_a_finite_scalar_with_a_gradient(name):
    args, leaf = _cases()[name]
    loss = get_loss(name)(*args)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# ---- S4AL / FixMatch pseudo-label CE -------------------------------------------------


def test_confidence_weighted_ce_matches_hand_computation():
    logits = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 1.0], [0.5, 0.0]]]])
    pseudo = torch.tensor([[[0, 1], [0, 0]]])
    conf = torch.tensor([[[0.9, 0.8], [0.6, 0.99]]])
    expected = (_ce(logits, pseudo) * conf).mean()
    assert confidence_weighted_ce(logits, TEACHER).item() == pytest.approx(expected.item())
    # one ignored pixel (UniMatch's 255 map): the mean runs over the other three
    ignore = torch.tensor([[[0, 0], [255, 0]]])
    keep = ignore != 255
    expected = (_ce(logits, pseudo) * conf)[keep].sum() / 3
    got = confidence_weighted_ce(logits, TEACHER, ignore_mask=ignore)
    assert got.item() == pytest.approx(expected.item())
    assert confidence_weighted_ce(logits, TEACHER, ignore_mask=~keep).item() == pytest.approx(
        expected.item()
    )


def test_image_weight_share_and_scaling():
    probs = torch.cat([TEACHER, TEACHER.flip(1)])  # flipping classes keeps the max probs
    weight = image_confidence_weight(probs, tau=0.85)
    assert weight.tolist() == pytest.approx([0.5, 0.5])  # 0.9 and 0.99 of 4 pixels
    assert image_confidence_weight(TEACHER, tau=0.97).tolist() == pytest.approx([0.25])
    logits = torch.randn(2, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    base = confidence_weighted_ce(logits[:1], TEACHER)
    half = confidence_weighted_ce(logits, probs, image_weight=torch.tensor([1.0, 0.0]))
    assert half.item() == pytest.approx(base.item() / 2)  # image 2 adds pixels, not loss


def test_thresholded_ce_averages_over_all_pixels():
    logits = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    pseudo = torch.tensor([[[0, 1], [0, 0]]])
    ce = _ce(logits, pseudo)
    got = thresholded_pseudo_ce(logits, TEACHER, threshold=0.85)
    assert got.item() == pytest.approx((ce[0, 0, 0] + ce[0, 1, 1]).item() / 4)
    assert thresholded_pseudo_ce(logits, TEACHER, threshold=1.1).item() == 0.0


# ---- contrastive (STAL / ReCo) -------------------------------------------------------


def test_contrastive_known_value_and_lower_for_matching_positives():
    a = torch.tensor([[1.0, 0.0]])
    loss = pixel_contrastive_loss(a, torch.tensor([[2.0, 0.0]]), torch.tensor([[[0.0, 1.0]]]), 0.5)
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(64, 16, generator=g)
    positives = anchors + 0.1 * torch.randn(64, 16, generator=g)
    negatives = torch.randn(64, 8, 16, generator=g)
    matched = pixel_contrastive_loss(anchors, positives, negatives)
    shuffled = pixel_contrastive_loss(anchors, positives.roll(1, dims=0), negatives)
    assert matched < shuffled


def test_sample_contrastive_pairs_shapes_reliability_and_prototypes():
    bank = FeatureMemoryBank(num_classes=3, dim=2, size_per_class=10, seed=0)
    bank.push(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]))
    # 1 x 2 x 2 x 2 features: pixels (class, confidence): (0, .9) (0, .2) (1, .95) (255, 1)
    features = torch.arange(8.0).view(1, 2, 2, 2).requires_grad_(True)
    labels = torch.tensor([[[0, 0], [1, 255]]])
    conf = torch.tensor([[[0.9, 0.2], [0.95, 1.0]]])
    g = torch.Generator().manual_seed(0)
    anchors, positives, negatives = sample_contrastive_pairs(
        features, labels, conf, bank, num_anchors=4, num_negatives=3, threshold=0.5, generator=g
    )
    assert anchors.shape == (2, 2) and positives.shape == (2, 2) and negatives.shape == (2, 3, 2)
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.equal(anchors.detach(), flat[[0, 2]])  # only the two reliable labeled pixels
    assert torch.equal(positives[0], torch.tensor([2.0, 0.0]))  # class 0 bank mean
    assert torch.equal(positives[1], torch.tensor([0.0, 5.0]))  # class 1 bank mean
    assert (negatives[0] == torch.tensor([0.0, 5.0])).all()  # class 0's only negatives: class 1
    assert all((n[0] == 0) == (n[1] != 0) for n in negatives[1])  # class 1's: from class 0
    anchors.sum().backward()
    assert features.grad is not None


def test_sample_contrastive_pairs_empty_bank_gives_no_pairs():
    bank = FeatureMemoryBank(num_classes=2, dim=2, size_per_class=4)
    out = sample_contrastive_pairs(
        torch.randn(5, 2), torch.zeros(5, dtype=torch.long), torch.ones(5), bank, 2, 3, 0.5
    )
    assert [t.shape for t in out] == [(0, 2), (0, 2), (0, 3, 2)]
    assert pixel_contrastive_loss(*out).item() == 0.0


# ---- ProDA -----------------------------------------------------------------------------

PROTOS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])


def _grid(*vectors: list[float]) -> torch.Tensor:
    """Pixel vectors -> 1 x D x 1 x N features."""
    return torch.tensor(vectors).T.reshape(1, -1, 1, len(vectors))


def test_prototype_soft_labels_known_values():
    feats = _grid([0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [1.0, 0.0])
    soft = prototype_soft_labels(feats, PROTOS, temperature=1.0)
    assert soft.shape == (1, 3, 1, 4)
    assert soft.argmax(1).flatten().tolist() == [0, 1, 2, 0]
    d = torch.tensor([0.0, 4.0, 4.0])  # pixel 0 to each prototype
    assert soft[0, :, 0, 0] == pytest.approx((-d).softmax(0).tolist(), abs=1e-5)
    assert soft.sum(1).flatten().tolist() == pytest.approx([1.0] * 4)


def test_rectified_labels_flip_when_prototypes_disagree():
    feats = _grid([0.0, 4.0], [4.0, 0.0])  # both pixels sit on a prototype
    initial = torch.tensor([[0.2, 0.5, 0.3], [0.2, 0.5, 0.3]]).T.reshape(1, 3, 1, 2)
    soft, hard = proda_rectified_pseudo_labels(initial, feats, PROTOS, temperature=1.0)
    assert hard.flatten().tolist() == [2, 1]  # pixel 0 flips from 1 to its prototype's class 2
    w = (-torch.tensor([4.0, 32**0.5, 0.0])).softmax(0)
    expected = initial[0, :, 0, 0] * w / (initial[0, :, 0, 0] * w).sum()
    assert soft[0, :, 0, 0] == pytest.approx(expected.tolist(), abs=1e-5)
    # prototype weights are upsampled to the soft labels' grid
    big = F.interpolate(initial, size=(2, 4), mode="nearest")
    soft_big, hard_big = proda_rectified_pseudo_labels(big, feats, PROTOS, temperature=1.0)
    assert soft_big.shape == (1, 3, 2, 4) and hard_big.shape == (1, 2, 4)


def test_classes_without_a_prototype_take_no_share_of_the_prototype_softmax():
    """Class 2 has no prototype yet (a zero row). It must not attract pixels by their
    distance to the origin: pixel 0 sits at the origin, nearest the zero row."""
    feats = _grid([0.0, 0.0], [4.0, 0.0])
    known = torch.tensor([True, True, False])
    soft = prototype_soft_labels(feats, PROTOS * torch.tensor([[1.0], [1.0], [0.0]]), 1.0, known)
    assert soft[0, 2].abs().max().item() == 0.0
    assert soft[0, :2, 0, 0] == pytest.approx((-torch.tensor([0.0, 4.0])).softmax(0).tolist(), abs=1e-5)
    # rectification: the unknown class keeps a neutral weight 1/2, so the initial model's
    # confident class 2 survives and can found its prototype
    initial = torch.tensor([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 2)
    _, hard = proda_rectified_pseudo_labels(initial, feats, PROTOS, 1.0, known)
    assert hard.flatten().tolist() == [2, 2]
    none = torch.zeros(3, dtype=torch.bool)
    soft_none, hard_none = proda_rectified_pseudo_labels(initial, feats, PROTOS, 1.0, none)
    assert torch.allclose(soft_none, initial) and hard_none.flatten().tolist() == [2, 2]
    assert structure_consistency_kl(feats, feats + 1.0, PROTOS, 1.0, none).item() == 0.0
    only = structure_consistency_kl(feats, feats + 1.0, PROTOS, 1.0, known)
    assert only.item() == pytest.approx(structure_consistency_kl(feats, feats + 1.0, PROTOS[:2], 1.0).item())


def test_inverse_sqrt_frequency_weights_known_values():
    """Frequencies 0.9 / 0.1: weights in ratio sqrt(9) = 3, mean weight of a pixel 1."""
    weights = inverse_sqrt_frequency_weights(torch.tensor([900, 100]))
    assert weights.tolist() == pytest.approx([5 / 6, 5 / 2])
    assert torch.isfinite(inverse_sqrt_frequency_weights(torch.tensor([10, 0]))).all()


def test_structure_kl_zero_for_identical_views_and_positive_otherwise():
    feats = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    assert structure_consistency_kl(feats, feats.clone(), PROTOS, 1.0).item() == 0.0
    assert structure_consistency_kl(feats, feats + 2.0, PROTOS, 1.0).item() > 0.01


# ---- LabOR discrepancy -------------------------------------------------------------------


def test_classifier_discrepancy_known_values():
    p = torch.randn(2, 4, 3, 3).softmax(1)
    assert classifier_discrepancy(p, p).item() == 0.0
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    b = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).view(1, 2, 1, 2)
    assert classifier_discrepancy_map(a, b).flatten().tolist() == [1.0, 0.0]
    # MCD's scale: the class mean of |p_a - p_b| (the map's sum over C = 2 classes, halved)
    assert classifier_discrepancy(a, b).item() == 0.25
    valid = torch.tensor([[[True, False]]])
    assert classifier_discrepancy(a, b, valid).item() == 0.5
    many = torch.eye(19).view(1, 19, 19, 1)  # one-hot heads that disagree everywhere
    assert classifier_discrepancy(many, many.roll(1, 1)).item() == pytest.approx(2 / 19)


# ---- AdaptSegNet ---------------------------------------------------------------------------


def test_generator_steps_move_target_output_toward_source():
    torch.manual_seed(0)
    source = F.one_hot(torch.zeros(1, 32, 32, dtype=torch.long), 2).permute(0, 3, 1, 2).float()
    # the "segmentation net" is a single learnable logit bias pair on the target
    gen_bias = torch.tensor([-2.0, 2.0], requires_grad=True)

    def target_probs() -> torch.Tensor:
        return gen_bias.view(1, 2, 1, 1).expand(1, 2, 32, 32).softmax(1)

    disc = OutputDiscriminator(num_classes=2, ndf=4)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
    for _ in range(10):  # D learns: source (all class 0) vs target (mostly class 1)
        opt_d.zero_grad()
        discriminator_loss(disc(source), disc(target_probs().detach())).backward()
        opt_d.step()
    disc.requires_grad_(False)
    before = torch.sigmoid(disc(target_probs())).mean().item()
    assert before < 0.5  # D calls target "target"
    opt_g = torch.optim.SGD([gen_bias], lr=1.0)
    for _ in range(5):
        opt_g.zero_grad()
        adversarial_generator_loss(disc(target_probs())).backward()
        opt_g.step()
    after = torch.sigmoid(disc(target_probs())).mean().item()
    assert after > before
    assert gen_bias[0] - gen_bias[1] > -4.0  # the target moved toward the source's class


def test_discriminator_loss_halves_and_generator_label():
    zeros = torch.zeros(1, 1, 2, 2)
    assert adversarial_generator_loss(zeros).item() == pytest.approx(math.log(2))
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    big = torch.full((1, 1, 2, 2), 20.0)
    assert discriminator_loss(big, -big).item() == pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_image_weight_is_a_weighted_mean_over_labeled_pixels():
    """Image 0: one labeled pixel of loss log 2; image 1: two labeled pixels of loss
    log(1 + e^-2) each (one pixel unlabeled). Weights 1 and 3 give (1*a + 3*2b) / (1 + 3*2)."""
    from segrl.losses import cross_entropy

    logits = torch.zeros(2, 2, 1, 3)
    logits[1, 0] = 2.0  # image 1 predicts class 0 with margin 2
    target = torch.tensor([[[0, 255, 255]], [[0, 0, 255]]])
    a, b = math.log(2.0), math.log(1 + math.exp(-2.0))
    weighted = cross_entropy(logits, target, image_weight=torch.tensor([1.0, 3.0]))
    assert weighted.item() == pytest.approx((a + 3 * 2 * b) / 7)
    plain = cross_entropy(logits, target)
    assert cross_entropy(logits, target, image_weight=torch.ones(2)).item() == pytest.approx(plain.item())
    assert plain.item() == pytest.approx((a + 2 * b) / 3)
