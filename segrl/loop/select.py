"""One round's selection: score tables in, a selection table (``segrl.labeling``) out.

Everything here is plain Python over Arrow tables and numpy arrays (no Ray, no model),
so the rules (budget in pixels or clicks, no pixel charged twice, determinism) are
unit-tested directly. LabOR's pixel masks and points need the model, and are computed
in :mod:`segrl.loop.labor` for the images chosen here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from segrl.acquisition import select_images, select_random, select_regions
from segrl.config import ALConfig

IMAGE_SIGNAL = {"entropy": "entropy_mean", "stability": "instability"}
REGION_ACQUISITIONS = ("region_entropy", "region_impurity")
LABOR_ACQUISITIONS = ("labor_spl", "labor_ppl")

LabeledMask = Callable[[str], "np.ndarray | None"]


def round_budget(al: ALConfig, pool_pixels: int, pool_images: int) -> int:
    """The budget of one round in pixels (clicks for ``labor_ppl``)."""
    if al.budget_unit == "share":
        return int(al.budget_per_round * pool_pixels)
    if al.budget_unit == "images":
        return int(al.budget_per_round * pool_pixels / max(pool_images, 1))
    return int(al.budget_per_round)


def image_row(image_id: str, uri: str, height: int, width: int, cost: int) -> dict:
    """A selection row asking for a whole image."""
    return {"id": image_id, "uri": uri, "unit": "image", "height": height, "width": width,
            "y0": 0, "x0": 0, "y1": height, "x1": width, "mask_key": "", "points": [],
            "cost_pixels": cost, "cost_clicks": 0}


def select_whole_images(
    al: ALConfig, pool: pa.Table, scores: pa.Table | None, labeled_pixels: dict[str, int], budget: int,
) -> list[dict]:
    """Random, entropy (STAL) or instability (ST++) image selection.

    ``pool``: id, image_uri, height, width. An image costs its pixels not labeled yet;
    fully labeled images are never candidates.
    """
    ids = np.asarray(pool.column("id").to_pylist(), dtype=object)
    area = np.asarray(pool.column("height").to_pylist()) * np.asarray(pool.column("width").to_pylist())
    done = np.asarray([labeled_pixels.get(i, 0) for i in ids])
    remaining = area - done
    exclude = set(ids[remaining <= 0].tolist())
    costs = np.where(remaining > 0, remaining, area)  # excluded anyway; selectors want costs > 0
    if al.acquisition == "random":
        chosen = select_random(ids, costs, budget, exclude=exclude, seed=al.seed)
    else:
        signal = _aligned(scores, ids, IMAGE_SIGNAL[al.acquisition])
        hist = None
        if al.class_balance:
            hist = np.asarray(_aligned_list(scores, ids, "class_hist"))
        chosen = select_images(ids, signal, costs, budget, exclude=exclude, seed=al.seed,
                               class_hist=hist, balance=al.class_balance)
    position = {image_id: i for i, image_id in enumerate(ids.tolist())}
    uris, heights, widths = (pool.column(c).to_pylist() for c in ("image_uri", "height", "width"))
    return [image_row(i, uris[position[i]], heights[position[i]], widths[position[i]],
                      int(remaining[position[i]])) for i in chosen]


def select_region_rows(
    pool: pa.Table, regions: pa.Table, budget: int, labeled_mask: LabeledMask,
) -> list[dict]:
    """Region selection (S4AL / RIPU) over every image's candidate regions."""
    ids = np.asarray(regions.column("id").to_pylist(), dtype=object)
    boxes = np.stack([np.asarray(regions.column(c).to_pylist(), dtype=np.int64)
                      for c in ("y0", "x0", "y1", "x1")], axis=1) if len(ids) else np.zeros((0, 4), np.int64)
    scores = np.asarray(regions.column("score").to_pylist(), dtype=np.float64)
    picked, _ = select_regions(ids, boxes, scores, budget, labeled_pixels=labeled_mask)
    info = {i: (u, h, w) for i, u, h, w in zip(*(pool.column(c).to_pylist()
                                                 for c in ("id", "image_uri", "height", "width")), strict=True)}
    rows = []
    for k in picked.tolist():
        image_id = ids[k]
        y0, x0, y1, x1 = (int(v) for v in boxes[k])
        mask = labeled_mask(image_id)
        cost = (y1 - y0) * (x1 - x0) - (int(np.count_nonzero(mask[y0:y1, x0:x1])) if mask is not None else 0)
        uri, h, w = info[image_id]
        rows.append({"id": image_id, "uri": uri, "unit": "region", "height": h, "width": w,
                     "y0": y0, "x0": x0, "y1": y1, "x1": x1, "mask_key": "", "points": [],
                     "cost_pixels": cost, "cost_clicks": 0})
    return rows


def _aligned(scores: pa.Table, ids: np.ndarray, column: str) -> np.ndarray:
    """``column`` of ``scores`` in the order of ``ids``; images that failed to score get -inf."""
    lookup = dict(zip(scores.column("id").to_pylist(), scores.column(column).to_pylist(), strict=True))
    return np.asarray([lookup.get(i, -np.inf) for i in ids], dtype=np.float64)


def _aligned_list(scores: pa.Table, ids: np.ndarray, column: str) -> list:
    lookup = dict(zip(scores.column("id").to_pylist(), scores.column(column).to_pylist(), strict=True))
    width = len(next(iter(lookup.values()))) if lookup else 0
    return [lookup.get(i, [0] * width) for i in ids]
