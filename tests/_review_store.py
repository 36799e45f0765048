"""A loop run's store as the loop leaves it, written with segrl's own writers and no Ray,
for the review page's tests: three rounds over synthetic frames, asking for whole images
(round 0), regions and a pixel mask (round 1) and points (round 2), answered by the
oracle; round 2 is labeled but not trained. The "model" is an untrained network saved as
a scoring checkpoint: what it predicts is noise, but it goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from segrl.config import ExperimentConfig, load_config
from segrl.data.pool import synthetic_frame_uri, synthetic_label
from segrl.data.synthetic import SYNTHETIC_CLASSES
from segrl.engine.train import run_store
from segrl.labeling import encode_label_png, oracle_label, selection_table
from segrl.loop.select import image_row
from segrl.models import build_model
from segrl.scoring import save_scoring_checkpoint
from segrl.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
H, W = 48, 64
ARCH = "lraspp_mobilenet_v3_large"
IDS = [f"frame{i:02d}" for i in range(8)]
URIS = {image_id: synthetic_frame_uri("source", 0, i, (H, W)) for i, image_id in enumerate(IDS)}


@dataclass
class ReviewRun:
    store: ArtifactStore
    cfg: ExperimentConfig
    state: dict[str, Any]
    rows: list[dict[str, Any]]
    checkpoint: str

    def truth(self, image_id: str) -> np.ndarray:
        return synthetic_label(URIS[image_id])

    def model_of(self, r: int) -> tuple[str, tuple[int, int]]:
        return self.checkpoint, (H, W)

    @property
    def images_per_round(self) -> list[int]:
        return [len(set(selection_table(rows).column("id").to_pylist())) for rows in ROUNDS]


def box(image_id: str, y0: int, x0: int, y1: int, x1: int) -> dict:
    return {**image_row(image_id, URIS[image_id], H, W, 0), "unit": "region", "y0": y0, "x0": x0,
            "y1": y1, "x1": x1, "cost_pixels": (y1 - y0) * (x1 - x0)}


def points(image_id: str, at: list[list[int]]) -> dict:
    ys, xs = [p[0] for p in at], [p[1] for p in at]
    return {**image_row(image_id, URIS[image_id], H, W, 0), "unit": "points", "y0": min(ys), "x0": min(xs),
            "y1": max(ys) + 1, "x1": max(xs) + 1, "points": at, "cost_pixels": len(at), "cost_clicks": len(at)}


REGIONS_SCHEMA = pa.schema([("id", pa.string()), *((c, pa.int64()) for c in ("y0", "x0", "y1", "x1")),
                            ("score", pa.float64())])
SEGMENT = "rounds/01/masks/frame05.png"
ROUNDS = [
    [image_row(i, URIS[i], H, W, H * W) for i in IDS[:3]],
    [box("frame03", 0, 0, 16, 16), box("frame03", 16, 32, 32, 48), box("frame04", 32, 48, 48, 64),
     {**image_row("frame05", URIS["frame05"], H, W, 0), "unit": "pixels", "y0": 20, "x0": 10, "y1": 30,
      "x1": 40, "mask_key": SEGMENT, "cost_pixels": 10 * 30}],
    [points("frame06", [[5, 5], [20, 40], [40, 60]]), points("frame07", [[10, 50]])],
]


def write_review_run(root: Path, *overrides: str, with_model: bool = True) -> ReviewRun:
    """The store of run ``review`` under ``root`` (see the module doc), config ``overrides``
    applied; ``with_model=False`` saves no checkpoint (``model_of`` must then not be used)."""
    cfg = load_config(str(REPO / "configs" / "stal_synthetic.yaml"),
                      [f"store.root={root}", "run=review", "al.acquisition=region_entropy",
                       "report.thumbnail_width=96", *overrides])
    store = run_store(cfg)
    segment = np.zeros((H, W), np.uint8)
    segment[20:30, 10:40] = 255
    store.write_bytes(SEGMENT, encode_label_png(segment))
    classes = list(SYNTHETIC_CLASSES)
    state: dict[str, Any] = {"done": [], "log": [], "classes": classes, "num_classes": len(classes)}
    rows = []
    for r, requests in enumerate(ROUNDS):
        selection = selection_table(requests)
        store.write_table(f"rounds/{r:02d}/selection.parquet", selection)
        oracle_label(selection, lambda i: synthetic_label(URIS[i]), store, f"rounds/{r:02d}/labels")
        steps = ["select", "label"] if r == len(ROUNDS) - 1 else ["select", "label", "train", "score"]
        for step in steps:
            state["done"].append(f"{r:02d}/{step}")
            state["log"].append({"step": f"{r:02d}/{step}", "seconds": 1.0, "finished": "2026-01-01T00:00:00+00:00"})
        if "score" in steps:  # what round r+1's selection ranked by
            regions = [row for row in ROUNDS[r + 1] if row["unit"] == "region"]
            store.write_table(f"rounds/{r:02d}/regions.parquet", pa.Table.from_pylist(
                [{"id": row["id"], "y0": row["y0"], "x0": row["x0"], "y1": row["y1"], "x1": row["x1"],
                  "score": 0.5 + 0.1 * k} for k, row in enumerate(regions)], schema=REGIONS_SCHEMA))
            rows.append({"round": r, "labeled_share": 0.05 * (r + 1), "val_miou": 0.2 + 0.1 * r,
                         "val_iou_per_class": {c: (k + r) / (len(classes) + 2) for k, c in enumerate(classes)}})
    checkpoint = str(root / "model" / "ckpt_000001")
    if with_model:
        save_scoring_checkpoint(checkpoint, build_model(ARCH, len(classes)), ARCH, classes, image_size=(H, W))
    return ReviewRun(store, cfg, state, rows, checkpoint)
