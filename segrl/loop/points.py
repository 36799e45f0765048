"""Point acquisitions over the pool (PixelPick): ``al.points_per_image`` clicks per image.

:func:`segrl.loop.select.choose_point_images` picks the images and their clicks from
the table's columns; here each chosen image gets its pixels, on the scoring grid (the
grid training resizes to), mapped to original pixels by the nearest-neighbour rule of
:mod:`segrl.loop.labor`, so a requested pixel is one training keeps:

| acquisition        | pixel rule (:mod:`segrl.acquisition.points`)                      | model |
| ---                | ---                                                               | ---   |
| random_points      | :func:`random_points`                                             | no    |
| margin_points      | :func:`spread_top_points` of the margin map, one per cell a pass  | yes   |
| entropy_points     | :func:`spread_top_points` of the entropy map                      | yes   |
| pixelpick_points   | :func:`top_share_points` of the margin map, ``al.point_top_share`` | yes   |

The uncertainty maps come from the round's final model, CHUNK images at a time
(decoded as LabOR's are: :func:`segrl.loop.labor.chosen_frames`); per-pixel maps never
exist for more than one chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from segrl.acquisition.points import point_rng, random_points, spread_top_points, top_share_points
from segrl.acquisition.scores import PIXEL_SCORES
from segrl.config import ALConfig, ScoreConfig, StoreConfig
from segrl.loop.labor import chosen_frames, points_row, to_grid
from segrl.loop.select import LabeledMask, LabeledPixels, choose_point_images, requested_pixels
from segrl.scoring import PoolScorer, inspect_checkpoints

# The pixel score each uncertainty acquisition ranks by (PixelPick's best is margin).
POINT_SCORES = {"margin_points": "margin", "entropy_points": "entropy", "pixelpick_points": "margin"}


def pick_points(al: ALConfig, image_id: str, score: np.ndarray | None, candidates: np.ndarray,
                count: int) -> np.ndarray:
    """``al.acquisition``'s ``count`` points ([y, x] on the grid) of one image."""
    rng = point_rng(al.seed, image_id)
    if al.acquisition == "random_points":
        return random_points(candidates, count, rng)
    if al.acquisition == "pixelpick_points":
        return top_share_points(score, candidates, count, al.point_top_share, rng)
    return spread_top_points(score, candidates, count)


def initial_point_row(image_id: str, uri: str, original: tuple[int, int], grid: tuple[int, int] | None,
                      count: int, seed: int) -> dict | None:
    """Round 0 of a point loop (``al.initial_points_per_image``, PixelPick's first round):
    ``count`` random points of one image, drawn on ``grid`` (the size training resizes the
    image to; None = its own size) and mapped to original pixels, so each is a pixel
    training keeps. The generator is :func:`point_rng`'s, so ``random_points`` rounds and
    this one draw the same way."""
    grid = tuple(grid) if grid else original
    found = random_points(np.ones(grid, bool), count, point_rng(seed, image_id))
    return points_row(image_id, uri, original, grid, found, np.zeros(original, bool))


def point_rows(
    al: ALConfig, pool: pa.Table, budget: int, labeled_mask: LabeledMask, labeled_pixels: LabeledPixels,
    checkpoints: str, image_size: tuple[int, int], store_cfg: StoreConfig,
) -> list[dict]:
    """Selection rows (unit 'points', one click per point) of a point acquisition.

    ``pool``: id, image_uri, height, width; ``checkpoints``: the final model, read only
    by the uncertainty acquisitions. An image whose chosen pixels all turn out labeled
    (several grid pixels can share an original one) gives no row, and its clicks are not
    spent elsewhere.
    """
    rows_chosen, clicks = choose_point_images(al, pool, labeled_pixels, budget)
    if not rows_chosen.size:
        return []
    asked = requested_pixels(pool, labeled_pixels)[rows_chosen] > 0
    clicks_of = dict(zip(pool.column("id").take(pa.array(rows_chosen, pa.int64())).to_pylist(),
                         zip(clicks.tolist(), asked.tolist(), strict=True), strict=True))
    endpoint = store_cfg.endpoint_url or None
    scorer, score_name = None, POINT_SCORES.get(al.acquisition)
    if score_name:
        scorer = PoolScorer(ScoreConfig(pool="-", checkpoints=checkpoints, out="-", store=store_cfg),
                            inspect_checkpoints(checkpoints, endpoint))
    rows = []
    for part, info, frames in chosen_frames(pool, rows_chosen, image_size, endpoint, decode=scorer is not None,
                                            retry_seconds=store_cfg.retry_seconds):
        scores = None
        if scorer is not None:  # one chunk's maps at a time: K x N x C x H x W -> N x H x W
            scores = PIXEL_SCORES[score_name](scorer.probabilities(frames)[-1]).cpu().numpy()
        for k, image_id in enumerate(part):
            uri, height, width = info[image_id]
            count, has_labels = clicks_of[image_id]
            labeled = labeled_mask(image_id) if has_labels else None
            labeled = np.zeros((height, width), bool) if labeled is None else labeled
            found = pick_points(al, image_id, None if scores is None else scores[k],
                                ~to_grid(labeled, image_size), count)
            row = points_row(image_id, uri, (height, width), image_size, found, labeled)
            if row is not None:
                rows.append(row)
    return rows
