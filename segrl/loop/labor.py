"""LabOR selection for the images a round picks: segment masks (SPL) or points (PPL).

Scoring gives every pool image its count of pixels where the two heads disagree
(``disagree_pixels``); SPL gives every such image its mask, all shrunk together to the
budget (``spl_image_budgets``), PPL chooses images under the click budget
(``select_ppl_images``). Only for those images does the driver run the model again,
at the scoring resolution, to get the masks and points (for SPL: every image with
disagreement, as the paper labels the whole pool), which are then mapped to original pixels: the nearest-neighbour rule that training's
resize uses, so a requested pixel is one the training grid keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from segrl.acquisition.labor import ppl_points, spl_image_budgets, spl_pixels
from segrl.config import ALConfig, ScoreConfig, StoreConfig
from segrl.engine.score import decode_frames
from segrl.labeling import encode_label_png
from segrl.loop.select import LabeledPixels, labor_images, pool_areas
from segrl.scoring import PoolScorer, inspect_checkpoints
from segrl.storage import DEFAULT_RETRY_SECONDS, ArtifactStore

CHUNK = 16


def to_grid(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean H x W mask resized (nearest) to ``size``."""
    tensor = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(tensor, size=size, mode="nearest")[0, 0].bool().numpy()


def scale_points(points: list | np.ndarray, small: tuple[int, int],
                 original: tuple[int, int]) -> list[list[int]]:
    """(y, x, ...) at the scoring size -> [y, x] in original pixels (nearest-resize rule)."""
    (h, w), (oh, ow) = small, original
    return [[min(oh - 1, int(p[0]) * oh // h), min(ow - 1, int(p[1]) * ow // w)] for p in points]


def labor_rows(
    al: ALConfig, pool: pa.Table, scores: pa.Table, budget: int, labeled_mask: Callable[[str], np.ndarray | None],
    labeled_pixels: LabeledPixels, checkpoints: str, image_size: tuple[int, int], store: ArtifactStore,
    masks_prefix: str, store_cfg: StoreConfig,
) -> list[dict]:
    """Selection rows for ``labor_spl`` (pixels, budget in pixels) or ``labor_ppl`` (points, clicks)."""
    chosen, disagree = labor_images(al, pool, scores, labeled_pixels, budget)
    caps = None  # per chosen image, in order: SPL's share of the budget
    if al.acquisition == "labor_spl":
        # every image with disagreement gets its mask, all shrunk together to the budget
        scale = pool_areas(pool)[chosen] / (image_size[0] * image_size[1])
        caps = spl_image_budgets(disagree, scale, budget)
        chosen, caps = chosen[caps > 0], caps[caps > 0]
    if not chosen.size:
        return []
    endpoint = store_cfg.endpoint_url or None
    scorer = PoolScorer(ScoreConfig(pool="-", checkpoints=checkpoints, out="-", store=store_cfg),
                        inspect_checkpoints(checkpoints, endpoint))
    rows, remaining, position = [], budget, 0
    for part, info, frames in chosen_frames(pool, chosen, image_size, endpoint, retry_seconds=store_cfg.retry_seconds):
        for k, image_id in enumerate(part):
            cap = remaining if caps is None else min(remaining, int(caps[position]))
            position += 1
            row = _request(al, scorer, frames[k : k + 1], image_id, info[image_id], image_size,
                           labeled_mask, cap, store, masks_prefix)
            if row is None:
                continue
            rows.append(row)
            remaining -= row["cost_clicks"] if al.acquisition == "labor_ppl" else row["cost_pixels"]
            if remaining <= 0:
                return rows
    return rows


def chosen_frames(pool: pa.Table, chosen: np.ndarray, image_size: tuple[int, int], endpoint: str | None,
                  decode: bool = True, retry_seconds: float = DEFAULT_RETRY_SECONDS,
                  ) -> Iterator[tuple[list[str], dict, np.ndarray | None]]:
    """(ids, id -> (uri, height, width), frames N x H x W x 3 uint8 at ``image_size``) of
    pool rows ``chosen``, CHUNK images at a time, so only as many images are decoded as a
    caller consumes and the driver holds one chunk of frames. ``decode=False``: frames None.
    An unreachable S3 endpoint is tried again for ``retry_seconds`` (``store.retry_seconds``)."""
    for start in range(0, len(chosen), CHUNK):
        rows_part = pa.array(chosen[start : start + CHUNK], pa.int64())
        part = pool.column("id").take(rows_part).to_pylist()
        info = dict(zip(part, zip(*(pool.column(c).take(rows_part).to_pylist()
                                    for c in ("image_uri", "height", "width")), strict=True), strict=True))
        frames = None
        if decode:
            frames = decode_frames(pa.table({"id": part, "image_uri": [info[i][0] for i in part],
                                             "shard": [0] * len(part), "row": list(range(len(part)))}),
                                   image_size, endpoint, retry_seconds)["image"]
        yield part, info, frames


def points_row(image_id: str, uri: str, original: tuple[int, int], small: tuple[int, int],
               found: list | np.ndarray, labeled: np.ndarray) -> dict | None:
    """A 'points' selection row from points (y, x, ...) found on the ``small`` grid: mapped
    to original pixels, already-labeled and repeated pixels dropped (several grid pixels
    can map to one original pixel); one click and one labeled pixel each. None if none left."""
    points = [p for p in scale_points(found, small, original) if not labeled[p[0], p[1]]]
    points = [list(p) for p in dict.fromkeys(tuple(p) for p in points)]
    if not points:
        return None
    ys, xs = [p[0] for p in points], [p[1] for p in points]
    return {"id": image_id, "uri": uri, "unit": "points", "height": original[0], "width": original[1],
            "y0": min(ys), "x0": min(xs), "y1": max(ys) + 1, "x1": max(xs) + 1, "mask_key": "",
            "points": points, "cost_pixels": len(points), "cost_clicks": len(points)}


def _request(al, scorer, image, image_id, info, image_size, labeled_mask, remaining, store, masks_prefix):
    uri, oh, ow = info
    mask, discrepancy, pred, features = (t[0] for t in scorer.labor_maps(image))
    labeled = labeled_mask(image_id)
    labeled = np.zeros((oh, ow), bool) if labeled is None else labeled
    small_labeled = to_grid(labeled, image_size)
    if al.acquisition == "labor_spl":
        return _spl_row(image_id, uri, (oh, ow), image_size, mask, discrepancy, labeled, small_labeled,
                        remaining, store, masks_prefix)
    return _ppl_row(image_id, uri, (oh, ow), image_size, mask, pred, features, labeled, small_labeled,
                    min(al.points_per_image, remaining))


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _spl_row(image_id, uri, original, small, mask, discrepancy, labeled, small_labeled, remaining,
             store, masks_prefix) -> dict | None:
    scale = original[0] * original[1] / (small[0] * small[1])
    cap = int(remaining / scale)
    while cap > 0:
        chosen = spl_pixels(discrepancy.cpu().numpy(), mask.cpu().numpy(), cap, small_labeled)
        request = to_grid(chosen, original) & ~labeled
        cost = int(request.sum())
        if cost <= remaining:
            break
        cap = int(cap * remaining / cost)  # the upsampled mask overshot: shrink and retry
    if cap <= 0 or cost == 0:
        return None
    key = f"{masks_prefix}/{image_id}.png"
    store.write_bytes(key, encode_label_png(request.astype(np.uint8) * 255))
    y0, x0, y1, x1 = _bbox(request)
    return {"id": image_id, "uri": uri, "unit": "pixels", "height": original[0], "width": original[1],
            "y0": y0, "x0": x0, "y1": y1, "x1": x1, "mask_key": key, "points": [],
            "cost_pixels": cost, "cost_clicks": 0}


def _ppl_row(image_id, uri, original, small, mask, pred, features, labeled, small_labeled,
             count) -> dict | None:
    if count <= 0:
        return None
    found = ppl_points(pred.cpu().numpy(), mask.cpu().numpy(), features.cpu().numpy(), count, small_labeled)
    return points_row(image_id, uri, original, small, found, labeled)
