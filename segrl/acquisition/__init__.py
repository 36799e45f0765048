"""Acquisition: pure scores over probabilities and label maps, and budgeted selectors.

Scores (higher = label first) live in :mod:`segrl.acquisition.scores`, selectors
that spend a pixel budget in :mod:`segrl.acquisition.selectors`. Nothing here does
I/O or touches Ray; the scoring actors in ``segrl.engine`` call these functions.
"""

from segrl.acquisition.labor import (
    ppl_points,
    select_ppl_images,
    select_spl_images,
    spl_pixels,
)
from segrl.acquisition.scores import (
    IMAGE_REDUCTIONS,
    PIXEL_SCORES,
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
    stability,
)
from segrl.acquisition.selectors import (
    StreamingTopK,
    select_images,
    select_random,
    select_regions,
    spread_images,
)

__all__ = [
    "IMAGE_REDUCTIONS",
    "PIXEL_SCORES",
    "StreamingTopK",
    "class_histogram",
    "confident_share",
    "disagreement",
    "disagreement_mask",
    "get_pixel_score",
    "get_reduction",
    "image_embedding",
    "instability",
    "least_confidence",
    "margin",
    "mean_max_prob",
    "pixel_entropy",
    "ppl_points",
    "reduce_mean",
    "reduce_top_q",
    "region_grid",
    "region_impurity",
    "region_impurity_uncertainty",
    "region_mean",
    "select_images",
    "select_ppl_images",
    "select_random",
    "select_regions",
    "select_spl_images",
    "spl_pixels",
    "spread_images",
    "stability",
]
