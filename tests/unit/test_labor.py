"""LabOR: the two-head selector's training step and SPL / PPL pixel labeling."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from segrl.acquisition import ppl_points, select_ppl_images, select_spl_images, spl_pixels
from segrl.methods import labor as labor_module
from segrl.methods.labor import LaborSelector, labor_head_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# selector training


def _toy_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled pixels live on channels 0/1 (class 0/1), unlabeled ones on channels 2/3.

    Features 1 x 4 x 2 x 2, labels 1 x 4 x 4 (2x upsampled grid), so the heads can pull
    apart on the unlabeled directions without touching the labeled ones.
    """
    labeled = torch.zeros(1, 4, 2, 2)
    labeled[0, 0, :, 0] = 2.0  # left column: class 0
    labeled[0, 1, :, 1] = 2.0  # right column: class 1
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :, 2:] = 1
    unlabeled = torch.zeros(1, 4, 2, 2)
    unlabeled[0, 2] = 1.0
    unlabeled[0, 3] = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    return labeled, labels, unlabeled


def _labeled_ce(selector: LaborSelector, feats: torch.Tensor, labels: torch.Tensor) -> float:
    probs_a, probs_b = selector.predict(feats, tuple(labels.shape[-2:]))
    picked = [p.gather(1, labels[:, None]).clamp_min(1e-12).log() for p in (probs_a, probs_b)]
    return -float(sum(p.mean() for p in picked))


def test_discrepancy_step_pulls_heads_apart_and_keeps_labeled_ce_low():
    feats_x, labels, feats_u = _toy_batches()
    selector = LaborSelector(4, 2, lr=0.05, lambda_discrepancy=1.0, seed=0)
    size = tuple(labels.shape[-2:])
    _, start_map = selector.disagreement(feats_u, (2, 2))
    start_ce = _labeled_ce(selector, feats_x, labels)
    for _ in range(60):
        stats = selector.step(feats_x, labels, feats_u)
    mask, end_map = selector.disagreement(feats_u, (2, 2))
    assert set(stats) == {"ce_a", "ce_b", "discrepancy", "loss_b"}
    assert end_map.mean() > start_map.mean() + 0.5  # L1 in [0, 2]: clearly apart
    assert mask.any()  # the heads now predict different classes on unlabeled pixels
    assert _labeled_ce(selector, feats_x, labels) < min(start_ce, 0.1)
    # both heads still agree (and are right) on the labeled pixels
    probs_a, probs_b = selector.predict(feats_x, size)
    assert torch.equal(probs_a.argmax(1), labels) and torch.equal(probs_b.argmax(1), labels)


def test_step_does_not_touch_the_feature_graph():
    feats_x, labels, feats_u = _toy_batches()
    feats_x.requires_grad_(True)
    LaborSelector(4, 2, seed=0).step(feats_x, labels, feats_u)
    assert feats_x.grad is None


def test_labor_head_loss_equals_hand_computation():
    logits_a = torch.tensor([[[[2.0, 5.0]], [[0.0, -1.0]]]])  # 1 x 2 x 1 x 2
    logits_b = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])  # only the first pixel is labeled
    probs_a = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    probs_b = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1)
    loss = labor_head_loss(logits_a, logits_b, labels, probs_a, probs_b, 0.5, 255)
    ce_a = math.log(1 + math.exp(-2.0))  # -log softmax([2, 0])[0]
    ce_b = math.log(2.0)
    discrepancy = (0.6 + 0.6) / 2  # (|0.9 - 0.3| + |0.1 - 0.7|) / C, MCD's class mean
    assert loss.item() == pytest.approx(ce_a + ce_b - 0.5 * discrepancy, abs=1e-6)
    # LabOR's L_pt: with the heads' unlabeled logits and pseudo labels, both learn them too
    u_a = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)
    u_b = torch.zeros(1, 2, 1, 1)
    with_pseudo = labor_head_loss(logits_a, logits_b, labels, probs_a, probs_b, 0.5, 255,
                                  unlabeled_logits=(u_a, u_b), pseudo_labels=torch.tensor([[[1]]]))
    pseudo_ce = math.log(1 + math.exp(2.0)) + math.log(2.0)  # -log softmax([2, 0])[1], -log 1/2
    assert with_pseudo.item() == pytest.approx(ce_a + ce_b + pseudo_ce - 0.5 * discrepancy, abs=1e-6)


def test_labor_head_loss_counts_only_valid_unlabeled_pixels():
    logits = torch.zeros(1, 2, 1, 1)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    probs_a = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 1, 2)
    probs_b = torch.tensor([[0.0, 0.5], [1.0, 0.5]]).view(1, 2, 1, 2)
    valid = torch.tensor([[[True, False]]])
    loss = labor_head_loss(logits, logits, labels, probs_a, probs_b, 1.0, unlabeled_valid=valid)
    assert loss.item() == pytest.approx(2 * math.log(2.0) - 1.0, abs=1e-6)  # discrepancy 2 / C


def test_disagreement_matches_predict():
    feats = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    selector = LaborSelector(4, 3, seed=2)
    mask, dist = selector.disagreement(feats, (6, 6))
    probs_a, probs_b = selector.predict(feats, (6, 6))
    assert mask.shape == dist.shape == (2, 6, 6) and mask.dtype == torch.bool
    assert torch.equal(mask, probs_a.argmax(1) != probs_b.argmax(1))
    assert torch.allclose(dist, (probs_a - probs_b).abs().sum(1))


def test_seed_fixes_the_heads_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    one, two = LaborSelector(4, 2, seed=7), LaborSelector(4, 2, seed=7)
    assert torch.rand(1).item() == expected.item()
    for key, value in one.heads.state_dict().items():
        assert torch.equal(value, two.heads.state_dict()[key])


def test_state_dict_round_trip_restores_heads_and_optimizer():
    feats_x, labels, feats_u = _toy_batches()
    trained = LaborSelector(4, 2, lr=0.05, seed=0)
    for _ in range(3):
        trained.step(feats_x, labels, feats_u)
    restored = LaborSelector(4, 2, lr=0.05, seed=99)
    restored.load_state_dict(copy.deepcopy(trained.state_dict()))
    for a, b in zip(
        trained.predict(feats_u, (4, 4)), restored.predict(feats_u, (4, 4)), strict=True
    ):
        assert torch.equal(a, b)
    # Adam moments came back too: the next step is identical
    assert trained.step(feats_x, labels, feats_u) == restored.step(feats_x, labels, feats_u)


def test_gradients_are_averaged_across_ranks(monkeypatch: pytest.MonkeyPatch):
    """A fake 2-rank world where the other rank has the same gradient: the average must
    equal the local gradient, so the step matches a single-process one exactly."""
    feats_x, labels, feats_u = _toy_batches()
    single = LaborSelector(4, 2, lr=0.05, seed=0, optimizer="sgd")
    expected = single.step(feats_x, labels, feats_u)

    calls = {"all_reduce": 0, "broadcast": 0}

    def fake_all_reduce(tensor, op=None):
        calls["all_reduce"] += 1
        tensor.mul_(2)  # sum of two equal gradients

    def fake_broadcast(tensor, src):
        calls["broadcast"] += 1

    dist = labor_module.torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "broadcast", fake_broadcast)
    ranked = LaborSelector(4, 2, lr=0.05, seed=0, optimizer="sgd")
    assert ranked.step(feats_x, labels, feats_u) == expected
    n_params = len(list(ranked.heads.parameters()))
    assert calls == {"all_reduce": 2 * n_params, "broadcast": n_params}
    for a, b in zip(single.heads.parameters(), ranked.heads.parameters(), strict=True):
        assert torch.equal(a, b)


def test_unknown_optimizer_is_rejected():
    with pytest.raises(ValueError, match="optimizer"):
        LaborSelector(4, 2, optimizer="lbfgs")


# --------------------------------------------------------------------------------------
# SPL


def test_spl_takes_the_mask_when_it_fits_minus_labeled():
    mask = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    labeled = np.array([[0, 1, 0], [0, 0, 0]], dtype=bool)
    chosen = spl_pixels(np.zeros((2, 3)), mask, budget_pixels=10, labeled=labeled)
    np.testing.assert_array_equal(chosen, mask & ~labeled)


def test_spl_takes_highest_discrepancy_first_within_budget_exactly():
    discrepancy = np.array([[0.9, 0.8, 0.1], [0.5, 0.95, 0.7]])
    mask = np.array([[1, 1, 1], [0, 1, 1]], dtype=bool)
    labeled = np.array([[0, 0, 0], [0, 1, 0]], dtype=bool)  # hides the 0.95 pixel
    chosen = spl_pixels(discrepancy, mask, budget_pixels=2, labeled=labeled)
    expected = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)  # 0.9, 0.8; 0.5 is outside the mask
    np.testing.assert_array_equal(chosen, expected)
    for budget in range(5):
        assert spl_pixels(discrepancy, mask, budget, labeled).sum() == min(budget, 4)


def test_spl_breaks_ties_by_raster_order_and_accepts_tensors():
    chosen = spl_pixels(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), budget_pixels=4)
    expected = np.array([[1, 1, 1], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(chosen, expected)


def test_spl_rejects_bad_input():
    with pytest.raises(ValueError, match="budget"):
        spl_pixels(np.zeros((2, 2)), np.ones((2, 2), bool), -1)
    with pytest.raises(ValueError, match="NaN"):
        spl_pixels(np.full((2, 2), np.nan), np.ones((2, 2), bool), 1)


# --------------------------------------------------------------------------------------
# PPL

# Class 1 has 5 uncertain pixels with 1-d features 0, 10, 4, 6, 5: prototype 5, so (1,1)
# is nearest, then (0,2) and (1,0) tie at distance 1 (raster order: (0,2) first).
# Class 2 has 2 (features 1, 3: prototype 2, a tie broken by raster order), class 0 has
# one uncertain pixel; row 2 is certain and must never be picked.
PRED = np.array([[1, 1, 1, 2], [1, 1, 0, 2], [0, 0, 0, 0]])
UNCERTAIN = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
FEATURES = np.array([[[0.0, 10.0, 4.0, 1.0], [6.0, 5.0, 7.0, 3.0], [5.0, 5.0, 5.0, 5.0]]])


def test_ppl_picks_nearest_to_prototype_class_by_class():
    points = ppl_points(PRED, UNCERTAIN, FEATURES, points_per_image=3)
    assert points == [(1, 1, 1), (0, 3, 2), (1, 2, 0)]


def test_ppl_round_robin_never_repeats_and_stops_when_pixels_run_out():
    points = ppl_points(PRED, UNCERTAIN, FEATURES, points_per_image=5)
    assert points == [(1, 1, 1), (0, 3, 2), (1, 2, 0), (0, 2, 1), (1, 3, 2)]
    every = ppl_points(PRED, UNCERTAIN, FEATURES, points_per_image=100)
    assert len(every) == len(set(every)) == int(UNCERTAIN.sum())
    assert all(y < 2 for y, _, _ in every)  # never a certain pixel


def test_ppl_skips_labeled_pixels_and_recomputes_the_prototype():
    labeled = np.zeros_like(UNCERTAIN)
    labeled[1, 1] = True  # class 1 left: 0, 10, 4, 6 -> prototype 5, tie 4/6 -> (0,2)
    labeled[1, 2] = True  # class 0 has nothing uncertain left
    points = ppl_points(PRED, UNCERTAIN, FEATURES, points_per_image=10, labeled=labeled)
    assert points[:2] == [(0, 2, 1), (0, 3, 2)]
    assert (1, 1, 1) not in points and all(c != 0 for _, _, c in points)


def test_ppl_is_deterministic_and_accepts_tensors():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(8, 8))
    uncertain = rng.random((8, 8)) < 0.5
    features = rng.normal(size=(3, 8, 8)).astype(np.float32)
    first = ppl_points(pred, uncertain, features, points_per_image=6)
    again = ppl_points(
        torch.from_numpy(pred),
        torch.from_numpy(uncertain),
        torch.from_numpy(features),
        points_per_image=6,
    )
    assert first == again and len(first) == 6
    assert all(uncertain[y, x] and pred[y, x] == c for y, x, c in first)


def test_ppl_edge_cases():
    assert ppl_points(PRED, np.zeros_like(UNCERTAIN), FEATURES, 3) == []
    assert ppl_points(PRED, UNCERTAIN, FEATURES, 0) == []
    with pytest.raises(ValueError, match="grid"):
        ppl_points(PRED, UNCERTAIN, FEATURES[:, :2], 3)


# --------------------------------------------------------------------------------------
# pool level


def test_select_spl_images_spends_budget_skip_and_continue():
    ids, counts = [10, 11, 12, 13], [50, 80, 0, 30]
    assert select_spl_images(ids, counts, 110) == [11, 13]  # 10 (50) no longer fits
    assert select_spl_images(ids, counts, 1000) == [11, 10, 13]  # 12 has nothing to label
    assert select_spl_images(ids, counts, 110, exclude={11}) == [10, 13]
    assert select_spl_images(ids, counts, 29) == []
    assert select_spl_images([3, 1], [5, 5], 5) == [1]  # tie by id


def test_select_ppl_images_charges_clicks():
    ids, uncertain = ["a", "b", "c", "d"], [100, 3, 0, 50]
    assert select_ppl_images(ids, uncertain, 5, 12) == ["a", "d"]  # "b" costs 3 > 2 left
    assert select_ppl_images(ids, uncertain, 5, 13) == ["a", "d", "b"]
    assert select_ppl_images(ids, uncertain, 5, 100, exclude=["a"]) == ["d", "b"]
    with pytest.raises(ValueError, match="points_per_image"):
        select_ppl_images(ids, uncertain, 0, 10)


def test_spl_labels_every_disagreeing_image_with_masks_shrunk_together_to_the_budget():
    """LabOR SPL: masks of 100, 50 and 50 scoring pixels (the second image at twice the
    resolution: 100 original pixels), 250 in all, and a budget of 125: all three images get
    half of their mask, instead of the first image its whole mask and the second a part of
    its own. A budget that fits them all keeps them whole."""
    from segrl.acquisition.labor import spl_image_budgets

    assert spl_image_budgets([100, 50, 50], [1.0, 2.0, 1.0], 125).tolist() == [50, 50, 25]
    assert spl_image_budgets([100, 50, 50], [1.0, 2.0, 1.0], 10_000).tolist() == [100, 100, 50]
    assert spl_image_budgets([0, 10], [1.0, 1.0], 4).tolist() == [0, 4]


def test_pseudo_labels_keep_the_heads_in_agreement_where_the_model_is_sure():
    """Heads pushed apart on unlabeled pixels (MCD) disagree on fewer pixels when they also
    learn the model's pseudo labels there (LabOR's L_pt): the mask stays selective."""
    g = torch.Generator().manual_seed(0)
    feats_x, feats_u = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    labels = torch.randint(0, 3, (2, 4, 4), generator=g)
    pseudo = torch.randint(0, 3, (2, 4, 4), generator=g)
    plain = LaborSelector(8, 3, lr=0.05, lambda_discrepancy=1.0, seed=0)
    anchored = LaborSelector(8, 3, lr=0.05, lambda_discrepancy=1.0, seed=0)
    for _ in range(60):
        plain.step(feats_x, labels, feats_u)
        anchored.step(feats_x, labels, feats_u, pseudo_unlabeled=pseudo)
    plain_mask, _ = plain.disagreement(feats_u, (4, 4))
    anchored_mask, _ = anchored.disagreement(feats_u, (4, 4))
    assert anchored_mask.float().mean() < plain_mask.float().mean()
