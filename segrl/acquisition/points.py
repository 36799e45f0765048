"""Point labeling: which pixels of one image to click (PixelPick, Shin, Xie and Albanie,
"All you need are a few pixels: semantic segmentation with PixelPick", ICCVW 2021,
arXiv 2104.06394).

PixelPick asks for a few single pixels in every image of the pool instead of whole
frames; its baseline is random pixels, its best query margin sampling. Top-k pixels
of an uncertainty map sit side by side on one object boundary, so each rule spreads
its points:

* :func:`random_points`: uniform over the unlabeled pixels (the baseline).
* :func:`spread_top_points` (``margin_points``, ``entropy_points``): the most uncertain
  pixels with a grid-cell cap: the image is cut into about ``count`` square cells and a
  cell gives its second point only after every cell with a candidate gave its first.
* :func:`top_share_points` (``pixelpick_points``): PixelPick's query, points drawn at
  random from the ``share`` most uncertain pixels (its ``top_n_percent``, 5%).

All take an ``H x W`` candidate mask (True = may be asked: not labeled yet) and return
``k x 2`` int64 ``[y, x]`` rows in pick order, ``k = min(count, candidates)``; no pixel
comes twice. Pure numpy; the random ones are deterministic given the generator.
"""

from __future__ import annotations

import math
import zlib

import numpy as np


def point_rng(seed: int, image_id: str) -> np.random.Generator:
    """The generator of one image's points: fixed by (seed, id), so an image's points do
    not depend on which other images a round picks or in what order."""
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def _check(candidates: np.ndarray, count: int, score: np.ndarray | None = None) -> np.ndarray:
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    candidates = np.asarray(candidates, dtype=bool)
    if candidates.ndim != 2:
        raise ValueError(f"candidates must be H x W, got shape {candidates.shape}")
    if score is not None:
        if score.shape != candidates.shape:
            raise ValueError(f"score {score.shape} != candidates {candidates.shape}")
        if np.isnan(score[candidates]).any():
            raise ValueError("score contains NaN on candidate pixels")
    return candidates


def _yx(flat: np.ndarray, width: int) -> np.ndarray:
    flat = np.asarray(flat, dtype=np.int64)
    return np.stack([flat // width, flat % width], axis=1).reshape(-1, 2)


def _best_first(score: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``flat`` (raster indices) most uncertain first, ties by raster order."""
    return flat[np.lexsort((flat, -score.reshape(-1)[flat]))]


def random_points(candidates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` candidate pixels drawn uniformly without replacement."""
    candidates = _check(candidates, count)
    flat = np.flatnonzero(candidates)
    picked = rng.choice(flat.size, size=min(count, flat.size), replace=False)
    return _yx(flat[picked], candidates.shape[1])


def cell_side(height: int, width: int, count: int) -> int:
    """Side of the square cells of :func:`spread_top_points`: ``floor(sqrt(H*W // count))``,
    so the ``ceil(H/s) x ceil(W/s)`` cells are at least ``count``."""
    return max(1, math.isqrt(height * width // max(count, 1)))


def spread_top_points(score: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """The most uncertain candidates, at most one per cell until every cell gave one.

    score ``H x W`` float (higher = more uncertain). Pixels go best first (ties by raster
    order); a pixel's pass is how many better pixels of its cell come before it; points
    are taken by (pass, best-first position), so pass 0 holds each cell's best pixel.
    """
    score = np.asarray(score, dtype=np.float64)
    candidates = _check(candidates, count, score)
    height, width = candidates.shape
    order = _best_first(score, np.flatnonzero(candidates))
    side = cell_side(height, width, count)
    cells = (order // width // side) * math.ceil(width / side) + (order % width) // side
    by_cell = np.argsort(cells, kind="stable")  # best first within each cell
    sorted_cells = cells[by_cell]
    starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_cells.size]))
    passes = np.empty(order.size, dtype=np.int64)
    passes[by_cell] = np.arange(order.size) - group_start
    taken = np.lexsort((np.arange(order.size), passes))[:count]
    return _yx(order[taken], width)


def top_share_points(score: np.ndarray, candidates: np.ndarray, count: int, share: float,
                     rng: np.random.Generator) -> np.ndarray:
    """PixelPick's query: ``count`` points drawn uniformly from the ``ceil(share x n)`` most
    uncertain of the ``n`` candidates (ties by raster order), never fewer than ``count``
    of them. The random draw spreads the points over the uncertain pixels; the share
    keeps them uncertain."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    score = np.asarray(score, dtype=np.float64)
    candidates = _check(candidates, count, score)
    order = _best_first(score, np.flatnonzero(candidates))
    top = order[: max(count, math.ceil(share * order.size))]
    picked = rng.choice(top.size, size=min(count, top.size), replace=False)
    return _yx(top[picked], candidates.shape[1])
