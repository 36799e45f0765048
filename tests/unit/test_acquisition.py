"""Acquisition scores and selectors on hand-made inputs with known answers, plus properties."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segrl.acquisition import (
    IMAGE_REDUCTIONS,
    PIXEL_SCORES,
    StreamingTopK,
    class_histogram,
    confident_share,
    disagreement,
    disagreement_mask,
    get_pixel_score,
    get_reduction,
    image_embedding,
    instability,
    least_confidence,
    margin,
    mean_max_prob,
    pixel_entropy,
    reduce_mean,
    reduce_top_q,
    region_grid,
    region_impurity,
    region_impurity_uncertainty,
    region_mean,
    select_images,
    select_random,
    select_regions,
    spread_images,
    stability,
)
from segrl.metrics import prediction_miou

FAST = settings(max_examples=25, deadline=None)


def random_probs(b: int, c: int, h: int, w: int, seed: int = 0, sharp: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(sharp * torch.randn(b, c, h, w, generator=gen), dim=1)


def one_hot_probs(labels: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------------------
# pixel scores


def test_uniform_probs_give_entropy_one_and_margin_one():
    probs = torch.full((2, 5, 3, 4), 1 / 5)
    assert torch.allclose(pixel_entropy(probs), torch.ones(2, 3, 4))
    assert torch.allclose(margin(probs), torch.ones(2, 3, 4))
    assert torch.allclose(least_confidence(probs), torch.full((2, 3, 4), 0.8))


def test_one_hot_probs_give_zero_entropy_and_zero_least_confidence():
    probs = one_hot_probs(torch.tensor([[[0, 3], [2, 1]]]), 4)
    assert torch.equal(pixel_entropy(probs), torch.zeros(1, 2, 2))
    assert torch.equal(least_confidence(probs), torch.zeros(1, 2, 2))
    assert torch.equal(margin(probs), torch.zeros(1, 2, 2))


def test_two_class_entropy_margin_and_least_confidence_by_hand():
    probs = torch.tensor([0.25, 0.75]).reshape(1, 2, 1, 1)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert pixel_entropy(probs).item() == pytest.approx(expected, abs=1e-6)  # 0.8113
    assert least_confidence(probs).item() == pytest.approx(0.25)
    assert margin(probs).item() == pytest.approx(0.5)


def test_registry_lookups_name_the_valid_choices():
    assert get_pixel_score("margin") is margin
    assert get_reduction("top_q") is reduce_top_q
    with pytest.raises(KeyError, match="entropy, least_confidence, margin"):
        get_pixel_score("bald")
    with pytest.raises(KeyError, match="mean, top_q"):
        get_reduction("max")


@given(
    seed=st.integers(0, 2**16),
    perm=st.permutations(range(4)),
    sharp=st.floats(0.1, 10.0),
)
@FAST
def test_pixel_scores_do_not_depend_on_class_order(seed: int, perm: list[int], sharp: float):
    probs = random_probs(2, 4, 3, 5, seed=seed, sharp=sharp)
    permuted = probs[:, list(perm)]
    for score in PIXEL_SCORES.values():
        assert torch.allclose(score(probs), score(permuted), atol=1e-6)


@pytest.mark.parametrize(
    ("score_name", "reduction_name"), list(itertools.product(PIXEL_SCORES, IMAGE_REDUCTIONS))
)
@pytest.mark.parametrize("masked", [False, True])
def test_every_score_and_reduction_gives_b_finite_values_in_unit_interval(
    score_name: str, reduction_name: str, masked: bool
):
    score, reduce = get_pixel_score(score_name), get_reduction(reduction_name)
    soft = random_probs(3, 6, 7, 9, seed=1)
    sharp = random_probs(3, 6, 7, 9, seed=2, sharp=60.0)  # near one-hot: log 0 territory
    hard = one_hot_probs(torch.randint(0, 6, (3, 7, 9)), 6)
    valid = None
    if masked:
        valid = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(3)) > 0.5
        valid[1] = False  # an image with no valid pixel must still give a number
    for probs in (soft, sharp, hard):
        pixel = score(probs)
        assert pixel.shape == (3, 7, 9)
        image = reduce(pixel, valid=valid)
        assert image.shape == (3,)
        assert torch.isfinite(image).all()
        assert ((image >= 0) & (image <= 1)).all()
        if masked:
            assert image[1] == 0


# ---------------------------------------------------------------------------
# reductions


def test_reduce_mean_counts_only_valid_pixels():
    scores = torch.tensor([[[0.2, 0.4], [0.6, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    valid = torch.tensor([[[True, True], [False, False]], [[False, False], [False, False]]])
    assert reduce_mean(scores).tolist() == pytest.approx([0.55, 1.0])
    assert reduce_mean(scores, valid).tolist() == pytest.approx([0.3, 0.0])


def test_reduce_top_q_averages_the_top_ceil_q_n_pixels():
    scores = torch.arange(1, 11, dtype=torch.float32).reshape(1, 2, 5) / 10  # 0.1 .. 1.0
    assert reduce_top_q(scores, q=0.3).item() == pytest.approx(0.9)  # (1.0 + 0.9 + 0.8) / 3
    assert reduce_top_q(scores, q=0.25).item() == pytest.approx(0.9)  # ceil(2.5) = 3
    assert reduce_top_q(scores, q=1.0).item() == pytest.approx(0.55)
    valid = scores < 0.95  # drop the 1.0: n = 9, ceil(2.7) = 3 -> (0.9 + 0.8 + 0.7) / 3
    assert reduce_top_q(scores, q=0.3, valid=valid).item() == pytest.approx(0.8)
    # 0.1 * 30 is 3.0000000000000004 in floats; still exactly 3 pixels.
    thirty = torch.tensor([1.0, 1.0, 1.0, 0.0] + [0.0] * 26).reshape(1, 5, 6)
    assert reduce_top_q(thirty, q=0.1).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# regions


def test_region_grid_tiles_row_major_with_clipped_edges():
    boxes = region_grid(5, 5, (2, 2))
    assert len(boxes) == 9
    assert boxes[:3] == [(0, 0, 2, 2), (0, 2, 2, 4), (0, 4, 2, 5)]
    assert boxes[-1] == (4, 4, 5, 5)
    assert sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes) == 25
    assert region_grid(4, 6, 3) == [(0, 0, 3, 3), (0, 3, 3, 6), (3, 0, 4, 3), (3, 3, 4, 6)]


def test_region_mean_on_4x4_with_2x2_cells():
    scores = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    assert region_mean(scores, (2, 2)).tolist() == [[[2.5, 4.5], [10.5, 12.5]]]


def test_region_mean_averages_partial_edge_cells_over_their_own_pixels():
    scores = torch.arange(25, dtype=torch.float32).reshape(1, 5, 5)
    out = region_mean(scores, (2, 2))
    assert out.shape == (1, 3, 3)
    assert out[0, 0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)
    assert out[0, 0, 2] == pytest.approx((4 + 9) / 2)
    assert out[0, 1, 2] == pytest.approx((14 + 19) / 2)
    assert out[0, 2, 0] == pytest.approx((20 + 21) / 2)
    assert out[0, 2, 2] == pytest.approx(24.0)


@given(seed=st.integers(0, 2**16), h=st.integers(1, 9), w=st.integers(1, 9), rh=st.integers(1, 4))
@FAST
def test_region_mean_matches_the_mean_of_each_grid_box(seed: int, h: int, w: int, rh: int):
    scores = torch.rand(2, h, w, generator=torch.Generator().manual_seed(seed))
    out = region_mean(scores, (rh, 3))
    boxes = region_grid(h, w, (rh, 3))
    flat = out.reshape(2, -1)
    assert flat.shape[1] == len(boxes)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        assert torch.allclose(flat[:, i], scores[:, y0:y1, x0:x1].mean(dim=(1, 2)), atol=1e-6)


def test_region_impurity_on_4x4_with_2x2_cells():
    pred = torch.tensor([[[0, 0, 1, 2], [0, 0, 3, 1], [2, 2, 0, 1], [2, 2, 1, 0]]])
    out = region_impurity(pred, num_classes=4, region_size=2)
    # top-right cell {1, 2, 3, 1}: H = 1.5 ln 2, / ln 4 = 0.75; bottom-right {0, 1, 1, 0}: 0.5
    assert out.tolist() == [[[0.0, pytest.approx(0.75)], [0.0, pytest.approx(0.5)]]]


def test_region_impurity_on_partial_edge_cells_of_5x5():
    pred = torch.zeros(1, 5, 5, dtype=torch.long)
    pred[0, 0, 4], pred[0, 1, 4] = 1, 2  # right edge cell {1, 2}: 0.5 of log(4)
    pred[0, 4, 0] = 3  # bottom edge cell {3, 0}: 0.5
    out = region_impurity(pred, num_classes=4, region_size=(2, 2))
    expected = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    assert torch.allclose(out, expected, atol=1e-6)


def test_region_impurity_uncertainty_is_the_product_and_zero_on_pure_cells():
    probs = random_probs(2, 3, 6, 6, seed=4)
    expected = region_impurity(probs.argmax(1), 3, 3) * region_mean(pixel_entropy(probs), 3)
    assert torch.allclose(region_impurity_uncertainty(probs, 3), expected)
    uniform = torch.full((1, 3, 4, 4), 1 / 3)  # uncertain but pure: argmax is class 0 everywhere
    assert torch.equal(region_impurity_uncertainty(uniform, 2), torch.zeros(1, 2, 2))


# ---------------------------------------------------------------------------
# stability (ST++) and disagreement (LabOR)


FINAL = torch.tensor([[0, 0], [1, 1]])
EARLIER = torch.tensor([[0, 0], [0, 1]])  # class 0: 2/3, class 1: 1/2 -> mIoU 7/12


def test_stability_identical_predictions_give_one_and_k1_gives_one():
    preds = torch.randint(0, 5, (3, 2, 6, 7), generator=torch.Generator().manual_seed(5))
    assert torch.equal(stability(preds[[0, 0, 0]], 5), torch.ones(2))
    assert torch.equal(stability(preds[:1], 5), torch.ones(2))
    assert torch.equal(instability(preds[[1, 1]], 5), torch.zeros(2))


def test_stability_k2_known_iou_per_image():
    preds = torch.stack([torch.stack([EARLIER, FINAL]), torch.stack([FINAL, FINAL])], dim=1)
    assert preds.shape == (2, 2, 2, 2)  # K x B x H x W
    assert stability(preds, 2).tolist() == pytest.approx([7 / 12, 1.0])
    assert instability(preds, 2).tolist() == pytest.approx([5 / 12, 0.0])


def test_stability_k3_averages_over_earlier_checkpoints():
    preds = torch.stack([FINAL, EARLIER, FINAL])[:, None]  # K=3, B=1
    assert stability(preds, 3).item() == pytest.approx((1.0 + 7 / 12) / 2)


def test_stability_matches_prediction_miou_image_by_image():
    preds = torch.randint(0, 4, (3, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    got = stability(preds, 4)
    for b in range(4):
        expected = np.mean([prediction_miou(preds[k, b], preds[-1, b], 4) for k in range(2)])
        assert got[b].item() == pytest.approx(expected, abs=1e-6)


@given(seed=st.integers(0, 2**16), perm=st.permutations(range(5)), k=st.integers(1, 4))
@FAST
def test_stability_does_not_depend_on_label_ids(seed: int, perm: list[int], k: int):
    preds = torch.randint(0, 5, (k, 2, 5, 6), generator=torch.Generator().manual_seed(seed))
    relabeled = torch.tensor(perm)[preds]
    assert torch.allclose(stability(preds, 5), stability(relabeled, 5), atol=1e-6)


def test_disagreement_identical_is_zero_and_hand_case():
    a = torch.tensor([[[0, 1], [2, 3]]])
    b = torch.tensor([[[0, 1], [2, 0]]])
    assert disagreement(a, a).item() == 0.0
    assert disagreement(a, b).item() == pytest.approx(0.25)
    assert disagreement_mask(a, b).tolist() == [[[False, False], [False, True]]]
    only_agreeing = torch.tensor([[[True, True], [True, False]]])
    assert disagreement(a, b, only_agreeing).item() == 0.0
    assert disagreement(a, b, ~only_agreeing).item() == 1.0


def test_class_histogram_skips_ignore_and_confidence_summaries():
    pred = torch.tensor([[[0, 2], [2, 255]], [[1, 1], [1, 1]]])
    assert class_histogram(pred, 3).tolist() == [[1, 0, 2], [0, 4, 0]]
    assert class_histogram(pred, 3).dtype == torch.int64
    with pytest.raises(ValueError, match="outside"):
        class_histogram(torch.tensor([[[3]]]), 3)
    probs = torch.tensor([[0.9, 0.6], [0.1, 0.4]]).reshape(1, 2, 1, 2)
    assert mean_max_prob(probs).item() == pytest.approx(0.75)
    assert confident_share(probs, 0.8).item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# selectors


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(0, 40),
    n=st.integers(0, 300),
    largest=st.booleans(),
)
@FAST
def test_streaming_topk_equals_a_full_sort_with_ties(seed: int, k: int, n: int, largest: bool):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 8, n).astype(np.float64)  # few values: many ties
    keys = rng.permutation(n * 3)[:n]
    topk = StreamingTopK(k, largest=largest)
    start = 0
    while start < n:
        stop = start + int(rng.integers(1, 50))
        topk.push(scores[start:stop], keys[start:stop])
        start = stop
    order = np.lexsort((keys, -scores if largest else scores))[:k]
    got_scores, got_keys = topk.result()
    assert got_scores.tolist() == scores[order].tolist()
    assert got_keys.tolist() == keys[order].tolist()


def test_streaming_topk_breaks_ties_by_string_key():
    topk = StreamingTopK(3)
    topk.push(np.array([0.5, 0.9, 0.5]), np.array(["img_c", "img_z", "img_b"]))
    topk.push(np.array([0.5, 0.1]), np.array(["img_a", "img_d"]))
    scores, keys = topk.result()
    assert keys.tolist() == ["img_z", "img_a", "img_b"]
    assert scores.tolist() == [0.9, 0.5, 0.5]


def test_select_images_greedy_skips_what_does_not_fit():
    ids = ["a", "b", "c", "d"]
    picked = select_images(ids, np.array([0.9, 0.8, 0.7, 0.1]), np.array([5, 10, 3, 2]), 9)
    assert picked == ["a", "c"]  # b (10) does not fit after a; d (2) no longer fits after c
    tied = select_images(["d", "b", "c", "a"], np.array([0.5, 0.5, 0.5, 0.9]), 1, 3)
    assert tied == ["a", "b", "c"]
    assert select_images(ids, np.ones(4), 1, 10, exclude={"a", "c"}) == ["b", "d"]
    assert select_images(ids, np.ones(4), 1, 0) == []


def test_spread_images_skips_near_copies_of_a_pick_for_the_farthest_uncertain_image():
    # a and b are neighbouring frames (the same place in feature space), c and d elsewhere
    ids = ["a", "b", "c", "d", "e"]
    scores = np.array([0.9, 0.85, 0.6, 0.5, 0.1])
    points = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]])
    assert select_images(ids, scores, 1, 2) == ["a", "b"]
    # shortlist a, b, c, d (2 x the budget of 2): a first, then c, the farthest from a
    assert spread_images(ids, scores, points, 1, 2, candidates_factor=2) == ["a", "c"]
    # then d (0.76 from a and from c) before b (0.01 from a); e, farther than all, is not shortlisted
    assert spread_images(ids, scores, points, 1, 3, candidates_factor=4 / 3) == ["a", "c", "d"]
    # a factor of 1 is top-K
    assert spread_images(ids, scores, points, 1, 2, candidates_factor=1) == ["a", "b"]
    # costs: c (3) no longer fits after a (1) in a budget of 3, so d does
    assert spread_images(ids, scores, points, np.array([1, 1, 3, 1, 1]), 3, candidates_factor=2) == ["a", "d", "b"]
    # what is labeled already is a center too: with c's copy labeled, d comes after a, not c;
    # with a's copy labeled, the first pick is c, not the best-scored a
    labeled = np.array([[0.0, 0.99]])
    assert spread_images(ids, scores, points, 1, 2, candidates_factor=2, labeled=labeled) == ["a", "d"]
    assert spread_images(ids, scores, points, 1, 1, candidates_factor=4, labeled=np.array([[1.0, 0.0]])) == ["c"]


def test_spread_images_refuses_what_it_cannot_rank():
    with pytest.raises(ValueError, match="embeddings contain NaN"):
        spread_images(["a", "b"], np.ones(2), np.array([[0.0], [np.nan]]), 1, 1, 2)
    with pytest.raises(ValueError, match="N x D"):
        spread_images(["a", "b"], np.ones(2), np.zeros((3, 2)), 1, 1, 2)
    with pytest.raises(ValueError, match="candidates_factor"):
        spread_images(["a"], np.ones(1), np.zeros((1, 2)), 1, 1, 0.5)


def test_image_embedding_is_the_unit_length_mean_feature():
    features = torch.zeros(2, 2, 3, 4)
    features[0, 0] = 3.0
    features[1, 0], features[1, 1] = 1.0, 1.0
    got = image_embedding(features)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]]))


@given(seed=st.integers(0, 2**16), budget=st.integers(0, 400))
@FAST
def test_select_images_budget_exclusion_and_determinism(seed: int, budget: int):
    rng = np.random.default_rng(seed)
    n = 60
    ids = np.array([f"img_{i:03d}" for i in range(n)])
    scores = rng.integers(0, 5, n) / 4  # ties
    costs = rng.integers(1, 40, n)
    exclude = set(rng.choice(ids, 10, replace=False).tolist())
    picked = select_images(ids, scores, costs, budget, exclude=exclude)
    cost_of = dict(zip(ids.tolist(), costs.tolist(), strict=True))
    spent = sum(cost_of[i] for i in picked)
    assert spent <= budget
    assert not exclude & set(picked)
    assert len(set(picked)) == len(picked)
    # Greedy skip-and-continue: nothing left out would still have fit.
    left = [i for i in ids.tolist() if i not in exclude and i not in picked]
    assert all(cost_of[i] > budget - spent for i in left)
    shuffle = rng.permutation(n)
    assert select_images(ids[shuffle], scores[shuffle], costs[shuffle], budget, exclude) == picked


def test_select_images_balance_round_robins_over_rarest_class_groups():
    ids = [0, 1, 2, 3, 4]
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    hist = np.array([[100, 0, 0], [90, 10, 0], [50, 0, 5], [100, 0, 0], [80, 0, 20]])
    # Pool: class 1 = 10 px, class 2 = 25, class 0 = 420. Groups: {1}, {2, 4}, {0, 3}.
    picked = select_images(ids, scores, 1, 100, class_hist=hist, balance=True)
    assert picked == [1, 2, 0, 4, 3]
    assert select_images(ids, scores, 1, 3, class_hist=hist, balance=True) == [1, 2, 0]
    assert select_images(ids, scores, 1, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="class_hist"):
        select_images(ids, scores, 1, 3, balance=True)


def test_select_random_is_deterministic_and_respects_budget_and_exclusion():
    ids = np.arange(100)
    costs = np.random.default_rng(0).integers(1, 20, 100)
    picked = select_random(ids, costs, 200, exclude=range(50), seed=7)
    assert picked == select_random(ids, costs, 200, exclude=range(50), seed=7)
    assert sum(costs[picked]) <= 200
    assert min(picked) >= 50
    order = np.random.default_rng(1).permutation(100)
    assert select_random(ids[order], costs[order], 200, exclude=range(50), seed=7) == picked
    assert select_random(ids, costs, 200, exclude=range(50), seed=8) != picked


def test_select_regions_hand_case():
    image_ids = np.array(["a", "a", "a", "b", "b"])
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [2, 2, 4, 4], [0, 0, 2, 2], [2, 0, 4, 2]])
    scores = np.array([0.9, 0.8, 0.7, 0.85, 0.95])
    labeled_b = np.zeros((4, 4), dtype=bool)
    labeled_b[0:2, 0:2] = [[True, True], [True, False]]  # 3 of box 3's pixels: cost 1
    labeled_b[2:4, 0:2] = True  # box 4 fully labeled: cost 0, skipped
    idx, spent = select_regions(image_ids, boxes, scores, 6, labeled_pixels={"b": labeled_b})
    # a0 (4 px), b0 (1 px); a1 overlaps a0; a2 costs 4 > 1 left.
    assert idx.tolist() == [0, 3]
    assert spent == 5
    idx, spent = select_regions(image_ids, boxes, scores, 100, labeled_pixels=lambda i: None)
    assert idx.tolist() == [4, 0, 3, 2]  # box 1 overlaps box 0; boxes 0 and 2 only touch a corner
    assert spent == 16


@given(seed=st.integers(0, 2**16), budget=st.integers(0, 300))
@FAST
def test_select_regions_no_overlap_no_double_charge_within_budget(seed: int, budget: int):
    rng = np.random.default_rng(seed)
    n, size = 80, 12
    image_ids = rng.integers(0, 3, n)
    y0, x0 = rng.integers(0, size - 1, n), rng.integers(0, size - 1, n)
    y1 = np.minimum(y0 + rng.integers(1, 6, n), size)
    x1 = np.minimum(x0 + rng.integers(1, 6, n), size)
    boxes = np.stack([y0, x0, y1, x1], axis=1)
    labeled = {i: rng.random((size, size)) < 0.3 for i in range(3)}
    idx, spent = select_regions(image_ids, boxes, rng.random(n), budget, labeled_pixels=labeled)
    assert spent <= budget
    charged = {i: labeled[i].astype(int) for i in range(3)}
    total = 0
    for i in idx.tolist():
        a, b, c, d = boxes[i]
        region = charged[image_ids[i]][a:c, b:d]
        assert (region < 2).all()  # never overlaps an earlier pick of the same image
        total += int((region == 0).sum())  # only pixels neither labeled nor picked cost
        region[region == 0] = 2
        region[region == 1] = 3  # labeled pixels inside a pick: mark as seen but uncharged
    assert total == spent
