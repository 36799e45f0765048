"""LabOR's pixel labeling (Shin et al., "LabOR: Labeling Only if Required for Domain
Adaptive Semantic Segmentation", ICCV 2021), from the two-head disagreement of
:class:`segrl.methods.labor.LaborSelector`.

* SPL, Segment-based Pixel Labeling: label the pixels where the heads disagree, in every
  image of the pool, the masks shrunk together to the budget (:func:`spl_image_budgets`).
* PPL, Point-based Pixel Labeling: one click per predicted class, at the uncertain pixel
  nearest its class prototype, the most representative pixel of that class's ambiguity.

Per-image functions take numpy arrays (CPU torch tensors work too) and return numpy or
plain Python values; pool-level functions pick images under a budget, on top of
:func:`segrl.acquisition.selectors.select_images`. Pure and deterministic, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from segrl.acquisition.selectors import select_images

IGNORE_INDEX = 255


def _numpy(array: object) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _unlabeled(mask: np.ndarray, labeled: object | None) -> np.ndarray:
    """``mask`` without already-labeled pixels, both ``H x W`` bool."""
    mask = _numpy(mask).astype(bool)
    if labeled is None:
        return mask
    labeled = _numpy(labeled).astype(bool)
    if labeled.shape != mask.shape:
        raise ValueError(f"labeled {labeled.shape} != mask {mask.shape}")
    return mask & ~labeled


# --------------------------------------------------------------------------------------
# per image


def spl_pixels(
    discrepancy: np.ndarray,
    mask: np.ndarray,
    budget_pixels: int,
    labeled: np.ndarray | None = None,
) -> np.ndarray:
    """SPL: the disagreement mask's pixels to label, ``H x W`` bool.

    discrepancy ``H x W`` float (e.g. the heads' L1 distance), mask ``H x W`` bool (heads'
    argmax differ), labeled ``H x W`` bool or None. Already-labeled pixels are never
    chosen. At most ``budget_pixels`` pixels: when more are candidates, the highest
    discrepancy wins, ties by raster order.
    """
    if budget_pixels < 0:
        raise ValueError(f"budget_pixels must be >= 0, got {budget_pixels}")
    discrepancy = _numpy(discrepancy).astype(np.float64)
    candidates = _unlabeled(mask, labeled)
    if discrepancy.shape != candidates.shape:
        raise ValueError(f"discrepancy {discrepancy.shape} != mask {candidates.shape}")
    flat = np.flatnonzero(candidates)
    if flat.size <= budget_pixels:
        return candidates
    scores = discrepancy.reshape(-1)[flat]
    if np.isnan(scores).any():
        raise ValueError("discrepancy contains NaN on candidate pixels")
    # lexsort's last key is the primary one; flat (raster index) breaks ties
    keep = flat[np.lexsort((flat, -scores))[:budget_pixels]]
    chosen = np.zeros(candidates.size, dtype=bool)
    chosen[keep] = True
    return chosen.reshape(candidates.shape)


def _nearest_to_prototype(features: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Raster indices ``flat`` of one class, nearest (L2) to their mean feature first.

    features ``D x (H*W)``; ties by raster order.
    """
    feats = features[:, flat]  # D x n
    prototype = feats.mean(axis=1, keepdims=True)
    distance = ((feats - prototype) ** 2).sum(axis=0)
    return flat[np.lexsort((flat, distance))]


def ppl_points(
    pred: np.ndarray,
    uncertain: np.ndarray,
    features: np.ndarray,
    points_per_image: int,
    labeled: np.ndarray | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> list[tuple[int, int, int]]:
    """PPL: points to click, as ``(y, x, predicted class)``.

    pred ``H x W`` int (predicted classes; ``ignore_index`` pixels are skipped),
    uncertain ``H x W`` bool (e.g. the heads disagree), features ``D x H x W`` float on
    the same grid, labeled ``H x W`` bool or None. Among uncertain, unlabeled pixels each
    predicted class gets a prototype (mean feature of its pixels) and offers them nearest
    first. Classes take turns, the one with most uncertain pixels first (ties by class
    id): round 1 gives each class its nearest pixel, round 2 its second nearest, ... until
    ``points_per_image`` points or no pixel is left. A pixel has one class, so no pixel
    comes twice.
    """
    if points_per_image < 0:
        raise ValueError(f"points_per_image must be >= 0, got {points_per_image}")
    pred = _numpy(pred).astype(np.int64)
    candidates = _unlabeled(uncertain, labeled) & (pred != ignore_index)
    features = _numpy(features).astype(np.float64)
    if pred.shape != candidates.shape or features.shape[1:] != pred.shape:
        raise ValueError(
            f"pred {pred.shape}, uncertain {candidates.shape} and features "
            f"{features.shape} must share one H x W grid"
        )
    width = pred.shape[1]
    flat_pred = pred.reshape(-1)
    flat = np.flatnonzero(candidates)
    classes, counts = np.unique(flat_pred[flat], return_counts=True)
    features = features.reshape(features.shape[0], -1)
    ranked = [
        _nearest_to_prototype(features, flat[flat_pred[flat] == c])
        for c in classes[np.lexsort((classes, -counts))]
    ]
    points: list[tuple[int, int, int]] = []
    for round_ in range(max((r.size for r in ranked), default=0)):
        for order in ranked:
            if len(points) == points_per_image:
                return points
            if round_ < order.size:
                idx = int(order[round_])
                points.append((idx // width, idx % width, int(flat_pred[idx])))
    return points


# --------------------------------------------------------------------------------------
# pool level


def _counts(values: Sequence | np.ndarray, n: int, name: str) -> np.ndarray:
    counts = _numpy(values).astype(np.int64).reshape(-1)
    if counts.size != n:
        raise ValueError(f"{n} ids but {counts.size} {name}")
    if (counts < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return counts


def select_spl_images(
    ids: Sequence | np.ndarray,
    disagree_pixels: Sequence | np.ndarray,
    budget_pixels: int,
    exclude: Collection = (),
) -> list:
    """Images for SPL under a pixel budget.

    ids (N,), disagree_pixels (N,) each image's disagreement-mask size, which is also
    what labeling it costs. Most disagreement first (ties by id ascending); an image
    that does not fit what is left is skipped and the next tried. Ids in ``exclude``
    and images without disagreement (nothing to label) are never chosen. Returns the
    chosen ids in pick order.
    """
    ids = np.asarray(ids)
    counts = _counts(disagree_pixels, ids.size, "disagree_pixels")
    some = counts > 0
    return select_images(ids[some], counts[some], counts[some], budget_pixels, exclude)


def spl_image_budgets(
    disagree_pixels: Sequence | np.ndarray, pixel_scale: Sequence | np.ndarray, budget_pixels: int
) -> np.ndarray:
    """SPL over the whole pool (LabOR): every image gets its disagreement mask, all masks
    shrunk by one factor when together they exceed the budget.

    disagree_pixels (N,) each image's mask size on the scoring grid, pixel_scale (N,)
    original pixels per scoring pixel. Returns (N,) int64 pixel caps, in original pixels:
    ``floor(mask x scale x min(1, budget / total))``. Whole masks of the few most
    disagreeing images would instead spend the budget on a handful of images.
    """
    counts = _counts(disagree_pixels, len(pixel_scale), "disagree_pixels").astype(np.float64)
    whole = counts * _numpy(pixel_scale).astype(np.float64)
    total = whole.sum()
    factor = 1.0 if total <= budget_pixels else budget_pixels / total
    return np.floor(whole * factor).astype(np.int64)


def select_ppl_images(
    ids: Sequence | np.ndarray,
    uncertain_pixels: Sequence | np.ndarray,
    points_per_image: int,
    budget_clicks: int,
    exclude: Collection = (),
) -> list:
    """Images for PPL under a click budget.

    ids (N,), uncertain_pixels (N,) each image's uncertain-pixel count. Most uncertain
    first (ties by id ascending); an image costs ``points_per_image`` clicks, or its
    uncertain-pixel count when smaller (:func:`ppl_points` cannot click more). Same
    skip-and-continue, exclusion and no-uncertainty rules as :func:`select_spl_images`.
    """
    if points_per_image <= 0:
        raise ValueError(f"points_per_image must be > 0, got {points_per_image}")
    ids = np.asarray(ids)
    counts = _counts(uncertain_pixels, ids.size, "uncertain_pixels")
    some = counts > 0
    clicks = np.minimum(counts[some], points_per_image)
    return select_images(ids[some], counts[some], clicks, budget_clicks, exclude)
