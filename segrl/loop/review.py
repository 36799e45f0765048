"""The review page of a loop run: what each round chose, why, and what the model predicts there.

The loop rewrites ``review.html`` (beside ``report.md``) after every step, and its data as
``review.json``, so a user can look at a round before paying annotators:

- the mIoU-vs-labeled-share curve of the run, of the runs in ``report.compare_runs`` (e.g. a
  random baseline) and the val mIoU of ``report.full_supervision_run`` as a line;
- per round, newest first: the first ``report.frames_per_round`` frames in pick order (best
  first) as thumbnails: the request drawn on the frame (whole images and regions outlined,
  points as dots, pixel masks tinted), the prediction of the model that chose the frame (the
  previous round's final snapshot; round 0's frames are chosen before any model), the ground
  truth where the oracle has it (else the answers once imported); each frame's rank and score;
- per-class IoU per round (a heat map) and labeled pixels per class so far (stacked bars);
- links to each round's ``selection.parquet``, labeling export or answers, and metrics.

Every path on the page is relative to the run folder and thumbnails are small files under
``rounds/<NN>/review/``, so the page opens from a local folder, a copied S3 prefix or any
static file server, with no script and nothing fetched from elsewhere. A round's thumbnails
and scores are made once: its selection, ground truth and choosing model never change.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import jinja2
import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from segrl.config import ConfigError, ExperimentConfig, ScoreConfig
from segrl.data.labels import DataError, decode_label
from segrl.data.pool import load_pool_image
from segrl.engine.score import decode_frames
from segrl.labeling import requested_mask, rows_by_image, store_mask_reader
from segrl.loop.select import REGION_ACQUISITIONS, REGION_COLUMNS, SIGNAL_COLUMNS
from segrl.scoring import PoolScorer, inspect_checkpoints
from segrl.storage import ArtifactStore, open_store

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PAGE = "review.html"
DATA = "review.json"
FOLDER = "review"  # the run's plots: review/*.png; a round's thumbnails: rounds/<NN>/review/
REQUEST_COLOR = (255, 221, 0)  # the yellow "requested" of the Label Studio and CVAT exports
TINT = 0.5  # share of REQUEST_COLOR in a tinted (requested) pixel
UNLABELED_COLOR = (48, 48, 48)
PREDICT_CHUNK = 16  # frames per model call: bounds the driver's memory on large thumbnails

TruthOf = Callable[[str], np.ndarray]
ModelOf = Callable[[int], "tuple[str, tuple[int, int]] | None"]  # round -> (final snapshot, scoring size)


# ---------------------------------------------------------------------- drawing (pure)


def thumbnail_size(height: int, width: int, target_width: int) -> tuple[int, int]:
    """(h, w) of a thumbnail ``target_width`` wide (never wider than the frame), aspect kept."""
    w = min(target_width, width)
    return max(1, round(height * w / width)), w


def draw_request(image: np.ndarray, rows: list[dict[str, Any]], mask: np.ndarray | None,
                 size: tuple[int, int]) -> Image.Image:
    """The H x W x 3 frame at ``size`` (h, w) with its request drawn on it.

    ``mask`` (H x W bool): the pixels of the image's 'pixels' rows, tinted; a thumbnail
    pixel is tinted when any pixel it covers is, so a thin segment stays visible. Boxes of
    'image' and 'region' rows are outlined, 'points' rows' [y, x] drawn as dots.
    """
    h, w = size
    height, width = image.shape[:2]
    frame = np.asarray(Image.fromarray(image).convert("RGB").resize((w, h), Image.BILINEAR), np.float32)
    if mask is not None and mask.any():
        cover = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((w, h), Image.BOX)) > 0
        frame[cover] = (1 - TINT) * frame[cover] + TINT * np.asarray(REQUEST_COLOR, np.float32)
    out = Image.fromarray(frame.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    sy, sx = h / height, w / width
    line = max(1, round(w / 120))
    radius = max(2, round(w / 80))
    for row in rows:
        if row["unit"] in ("image", "region"):
            draw.rectangle([row["x0"] * sx, row["y0"] * sy, row["x1"] * sx - 1, row["y1"] * sy - 1],
                           outline=REQUEST_COLOR, width=line)
        for y, x in row["points"]:
            cy, cx = (y + 0.5) * sy, (x + 0.5) * sx
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=REQUEST_COLOR,
                         outline=(0, 0, 0))
    return out


def class_palette(num_classes: int) -> np.ndarray:
    """256 x 3 uint8: a distinct colour per class id (matplotlib's tab20, else hsv), dark
    grey for every other value (255 = unlabeled)."""
    colormap = plt.get_cmap("tab20" if num_classes <= 20 else "hsv")
    palette = np.tile(np.asarray(UNLABELED_COLOR, np.uint8), (256, 1))
    for c in range(min(num_classes, 255)):
        palette[c] = np.round(255 * np.asarray(colormap(c % 20 if num_classes <= 20 else c / num_classes)[:3]))
    return palette


def color_labels(label: np.ndarray, palette: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An H x W map of class ids as a palette image at ``size`` (h, w), nearest resampling
    (a class is never blended into another)."""
    image = Image.fromarray(np.asarray(label, np.uint8))
    image.putpalette(palette.flatten().tolist())  # an "L" image becomes "P": a small PNG
    return image.resize((size[1], size[0]), Image.NEAREST)


def encoded(image: Image.Image, fmt: str) -> bytes:
    """JPEG (photos with drawings) or PNG (flat label colours) bytes of ``image``."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=80, optimize=True)
    else:
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def class_pixel_counts(labels: Iterable[np.ndarray], num_classes: int) -> list[int]:
    """Labeled pixels per class over sparse label maps (values >= num_classes are unlabeled)."""
    counts = np.zeros(num_classes, np.int64)
    for label in labels:
        values = np.asarray(label).ravel()
        counts += np.bincount(values[values < num_classes], minlength=num_classes)[:num_classes]
    return counts.tolist()


# ---------------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def curve_png(series: list[dict[str, Any]], full_supervision: float | None, title: str) -> bytes:
    """val mIoU (%) against labeled share of the pool (%): one line per run, the first one
    (this run) annotated with its rounds; ``full_supervision`` (0-1) a dashed line."""
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for k, run in enumerate(series):
        xs = [100 * p["labeled_share"] for p in run["points"]]
        ys = [100 * p["val_miou"] for p in run["points"]]
        ax.plot(xs, ys, marker="o", linewidth=2.5 if k == 0 else 1.5, label=run["label"])
        if k == 0:
            for p, x, y in zip(run["points"], xs, ys, strict=True):
                ax.annotate(str(p["round"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if full_supervision is not None:
        ax.axhline(100 * full_supervision, color="black", linestyle="--", linewidth=1,
                   label=f"full supervision ({100 * full_supervision:.1f}%)")
    ax.set_xlabel("labeled share of the pool's pixels (%)")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if series or full_supervision is not None:
        ax.legend(fontsize=8, loc="best")  # away from the points
    fig.tight_layout()
    return _png(fig)


def iou_heatmap_png(rounds: list[int], classes: list[str], iou: np.ndarray) -> bytes:
    """Per-class val IoU (%) as a rounds x classes heat map; ``iou`` holds NaN where unknown."""
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * len(classes), 1.4 + 0.35 * len(rounds)), dpi=100)
    ax.imshow(100 * iou, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rounds)):
        for j in range(len(classes)):
            if np.isfinite(iou[i, j]):
                ax.text(j, i, f"{100 * iou[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if iou[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rounds)), [f"round {r}" for r in rounds], fontsize=8)
    ax.set_title("val IoU per class (%)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def class_pixels_png(rounds: list[int], classes: list[str], counts: np.ndarray) -> bytes:
    """Labeled pixels per class so far: one bar per class, stacked by the round that added them."""
    fig, ax = plt.subplots(figsize=(5, 1.2 + 0.28 * len(classes)), dpi=100)
    left = np.zeros(len(classes))
    shades = plt.get_cmap("Greys")(np.linspace(0.35, 0.85, max(len(rounds), 1)))
    for i, r in enumerate(rounds):
        ax.barh(range(len(classes)), counts[i], left=left, color=shades[i], label=f"round {r}")
        left += counts[i]
    for j, total in enumerate(left):
        ax.text(total, j, f" {int(total):,}", va="center", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("labeled pixels per class so far", fontsize=10)
    ax.set_xlabel("labeled pixels so far")
    ax.set_xlim(0, max(1.0, float(left.max(initial=0))) * 1.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------- what the store holds


def rows_of_ids(source: pq.ParquetFile, ids: list[str], columns: list[str]) -> pa.Table:
    """The rows of ``ids`` (any order) in a Parquet file, read a batch at a time: a scores
    table has millions of rows, a regions table ten times as many."""
    wanted = pa.array(ids, pa.string())
    parts = [pa.Table.from_batches([batch]).filter(pc.is_in(batch.column("id"), value_set=wanted))
             for batch in source.iter_batches(batch_size=1 << 20, columns=columns)]
    return pa.concat_tables(parts) if parts else pa.schema([source.schema_arrow.field(c) for c in columns]).empty_table()


def frame_scores(store: ArtifactStore, r: int, acquisition: str, groups: dict[str, list[dict]]) -> tuple[str, dict]:
    """(score name, id -> score) of the frames round ``r`` chose, from round r-1's scoring.

    The score is what ranked the frame: the image signal of the acquisition, or for the
    region acquisitions the best score among the frame's chosen regions. Random and point
    acquisitions (frames in a seeded random order) have none: ("", {}).
    """
    previous = f"rounds/{r - 1:02d}"
    if r == 0 or not groups:
        return "", {}
    ids = list(groups)
    if acquisition in REGION_ACQUISITIONS and store.exists(f"{previous}/regions.parquet"):
        with store.open_input(f"{previous}/regions.parquet") as f:
            regions = rows_of_ids(pq.ParquetFile(f), ids, list(REGION_COLUMNS)).to_pylist()
        chosen = {(row["id"], row["y0"], row["x0"], row["y1"], row["x1"]) for rows in groups.values() for row in rows}
        best: dict[str, float] = {}
        for region in regions:
            if (region["id"], region["y0"], region["x0"], region["y1"], region["x1"]) in chosen:
                best[region["id"]] = max(best.get(region["id"], -math.inf), region["score"])
        return "best region score", best
    column = SIGNAL_COLUMNS.get(acquisition)
    if column is None or not store.exists(f"{previous}/scores.parquet"):
        return "", {}
    with store.open_input(f"{previous}/scores.parquet") as f:
        scores = pq.ParquetFile(f)
        if column not in scores.schema_arrow.names:
            return "", {}
        table = rows_of_ids(scores, ids, ["id", column])
    return column, dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist(), strict=True))


def predictions(checkpoint: str, image_size: tuple[int, int], frames: list[tuple[str, str]],
                cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """id -> class map (at ``image_size``) of the model at ``checkpoint`` on ``frames``
    [(id, uri)], decoded and resized as scoring does."""
    endpoint = cfg.store.endpoint_url or None
    scorer = PoolScorer(ScoreConfig(pool="-", checkpoints=checkpoint, out="-", store=cfg.store),
                        inspect_checkpoints(checkpoint, endpoint))
    out = {}
    for start in range(0, len(frames), PREDICT_CHUNK):
        part = frames[start : start + PREDICT_CHUNK]
        batch = decode_frames(pa.table({"id": [i for i, _ in part], "image_uri": [u for _, u in part],
                                        "shard": [0] * len(part), "row": list(range(len(part)))}),
                              image_size, endpoint, cfg.store.retry_seconds)
        labels = scorer.probabilities(batch["image"])[-1].argmax(1).cpu().numpy().astype(np.uint8)
        out.update({image_id: label for (image_id, _), label in zip(part, labels, strict=True)})
    return out


def _read_label(store: ArtifactStore, key: str) -> np.ndarray | None:
    return decode_label(store.read_bytes(key), store.uri(key)) if store.exists(key) else None


class RoundReview:
    """Thumbnails, scores and class counts of one round, written once under rounds/<NN>/review/."""

    def __init__(self, store: ArtifactStore, cfg: ExperimentConfig, r: int, palette: np.ndarray,
                 truth: TruthOf | None, model_of: ModelOf | None) -> None:
        self.store, self.cfg, self.r = store, cfg, r
        self.folder = f"rounds/{r:02d}"
        self.palette, self.truth, self.model_of = palette, truth, model_of

    def frames(self, groups: dict[str, list[dict]], labeled: bool) -> list[dict[str, Any]]:
        """The frames of ``groups`` (the round's first ones, in pick order) with their thumbnails.

        Drawn once and kept in ``frames.json`` (redrawn only for other ``report.*`` sizes);
        the truth view of an external round is drawn once its answers are in (``labeled``)."""
        key = f"{self.folder}/{FOLDER}/frames.json"
        sizes = {"frames_per_round": self.cfg.report.frames_per_round,
                 "thumbnail_width": self.cfg.report.thumbnail_width}
        cached = self.store.read_json(key) if self.store.exists(key) else {}
        changed = {k: cached.get(k) for k in sizes} != sizes
        if changed:
            frames = self._frames_meta(groups)
            self._draw_requests_and_predictions(frames, groups)
        else:
            frames = cached["frames"]
        if self.truth is not None or labeled:
            for frame in frames:
                if frame["truth"] is None and frame["error"] is None:
                    frame["truth"], frame["truth_kind"] = self._draw_truth(frame)
                    changed = True
        if changed:
            self.store.write_json(key, {**sizes, "frames": frames})  # last: the drawings are whole
        return frames

    def _frames_meta(self, groups: dict[str, list[dict]]) -> list[dict[str, Any]]:
        score_name, scores = frame_scores(self.store, self.r, self.cfg.al.acquisition, groups)
        frames = []
        for rank, (image_id, rows) in enumerate(groups.items(), start=1):
            units = sorted({row["unit"] for row in rows})
            frames.append({
                "id": image_id, "rank": rank, "uri": rows[0]["uri"], "height": rows[0]["height"],
                "width": rows[0]["width"], "units": units, "requests": len(rows),
                "cost_pixels": sum(row["cost_pixels"] for row in rows),
                "cost_clicks": sum(row["cost_clicks"] for row in rows),
                "score_name": score_name, "score": scores.get(image_id),
                "request": None, "prediction": None, "prediction_model": None, "truth": None, "truth_kind": None,
                "error": None,
            })
        return frames

    def _thumb_key(self, frame: dict[str, Any], view: str, ext: str) -> str:
        return f"{self.folder}/{FOLDER}/{frame['rank']:03d}_{view}.{ext}"

    def _size(self, frame: dict[str, Any]) -> tuple[int, int]:
        return thumbnail_size(frame["height"], frame["width"], self.cfg.report.thumbnail_width)

    def _draw_requests_and_predictions(self, frames: list[dict[str, Any]], groups: dict[str, list[dict]]) -> None:
        endpoint = self.cfg.store.endpoint_url or None
        read_mask = store_mask_reader(self.store)
        for frame in frames:
            rows = groups[frame["id"]]
            pixel_rows = [row for row in rows if row["unit"] == "pixels"]
            mask = requested_mask(pixel_rows, read_mask) if pixel_rows else None
            try:
                image = load_pool_image(frame["uri"], endpoint)
            except DataError as exc:  # a frame gone since it was chosen: say so, show the others
                frame["error"] = str(exc)
                continue
            key = self._thumb_key(frame, "request", "jpg")
            self.store.write_bytes(key, encoded(draw_request(image, rows, mask, self._size(frame)), "JPEG"))
            frame["request"] = key
        readable = [f for f in frames if f["error"] is None]
        if self.r == 0 or self.model_of is None or not readable:
            return
        model = self.model_of(self.r - 1)  # the model whose scores chose these frames
        if model is None:
            return
        checkpoint, image_size = model
        predicted = predictions(checkpoint, image_size, [(f["id"], f["uri"]) for f in readable], self.cfg)
        for frame in readable:
            key = self._thumb_key(frame, "prediction", "png")
            image = color_labels(predicted[frame["id"]], self.palette, self._size(frame))
            self.store.write_bytes(key, encoded(image, "PNG"))
            frame["prediction"] = key
            frame["prediction_model"] = f"round {self.r - 1}"

    def _draw_truth(self, frame: dict[str, Any]) -> tuple[str | None, str | None]:
        """The oracle's ground truth of the frame, else the answers imported for it (sparse)."""
        if self.truth is not None:
            label, kind = self.truth(frame["id"]), "ground truth"
        else:
            label, kind = _read_label(self.store, f"{self.folder}/labels/{frame['id']}.png"), "answers"
            if label is None:
                return None, None
        key = self._thumb_key(frame, "truth", "png")
        self.store.write_bytes(key, encoded(color_labels(label, self.palette, self._size(frame)), "PNG"))
        return key, kind

    def class_pixels(self, ids: pa.Array, num_classes: int) -> list[int]:
        """Labeled pixels per class the round's answers (of images ``ids``) added; read once."""
        key = f"{self.folder}/{FOLDER}/class_pixels.json"
        if self.store.exists(key):
            return self.store.read_json(key)
        labels = (_read_label(self.store, f"{self.folder}/labels/{image_id}.png") for image_id in ids.to_pylist())
        counts = class_pixel_counts((label for label in labels if label is not None), num_classes)
        self.store.write_json(key, counts)
        return counts


# ---------------------------------------------------------------------- other runs


def compare_series(uris: Iterable[str], endpoint: str | None) -> list[dict[str, Any]]:
    """The curve of each loop run in ``report.compare_runs``: its metrics.json rounds. A run
    without one yet (still in its first round) is listed with a note, not an error."""
    series = []
    for uri in uris:
        store = open_store(uri, endpoint)
        name = posixpath.basename(uri.rstrip("/"))
        if not store.exists("metrics.json"):
            series.append({"label": name, "run": uri, "points": [], "note": "no metrics.json yet"})
            continue
        metrics = _read_metrics(store, "report.compare_runs")
        if not isinstance(metrics.get("rounds"), list):
            raise ConfigError(f"config field 'report.compare_runs' names {uri}, whose metrics.json has no "
                              "'rounds' list: not a loop run (jobs/stal_loop.py)")
        points = [{"round": row["round"], "labeled_share": row["labeled_share"], "val_miou": row["val_miou"]}
                  for row in metrics["rounds"] if row.get("val_miou") is not None]
        series.append({"label": f"{name} ({metrics.get('acquisition', '?')})", "run": uri, "points": points,
                       "note": ""})
    return series


def full_supervision_miou(uri: str, endpoint: str | None) -> tuple[float | None, str]:
    """(val mIoU of the training run ``uri``, note) for the full-supervision line."""
    if not uri:
        return None, ""
    store = open_store(uri, endpoint)
    if not store.exists("metrics.json"):
        return None, f"full supervision run {uri}: no metrics.json yet"
    miou = _read_metrics(store, "report.full_supervision_run").get("val_miou")
    if not isinstance(miou, (int, float)):
        raise ConfigError(f"config field 'report.full_supervision_run' names {uri}, whose metrics.json has "
                          "no numeric 'val_miou': not a training run (jobs/train.py)")
    return float(miou), ""


def _read_metrics(store: ArtifactStore, field: str) -> dict[str, Any]:
    try:
        metrics = store.read_json("metrics.json")
    except ValueError as exc:
        raise ConfigError(f"config field '{field}' names {store.uri()}, whose metrics.json is not JSON: "
                          f"{exc}") from exc
    if not isinstance(metrics, dict):
        raise ConfigError(f"config field '{field}' names {store.uri()}, whose metrics.json is not an object")
    return metrics


# ---------------------------------------------------------------------- the page


def round_links(store: ArtifactStore, r: int) -> list[dict[str, str]]:
    """The round's files a reviewer opens, those that exist, relative to the run folder."""
    folder = f"rounds/{r:02d}"
    candidates = [("selection", f"{folder}/selection.parquet"), ("labeling export", f"{folder}/labeling/manifest.json"),
                  ("labeling README", f"{folder}/labeling/README.md"), ("answers", f"{folder}/labels/"),
                  ("metrics", f"{folder}/metrics.json"), ("scores", f"{folder}/scores.parquet")]
    return [{"name": name, "href": key} for name, key in candidates if store.exists(key.rstrip("/"))]


def review_data(store: ArtifactStore, cfg: ExperimentConfig, state: dict[str, Any], rows: list[dict[str, Any]],
                truth: TruthOf | None, model_of: ModelOf | None) -> dict[str, Any]:
    """Everything the page shows, as plain JSON (also ``review.json``); writes the thumbnails
    and plots it refers to."""
    classes = list(state.get("classes", []))
    palette = class_palette(len(classes))
    done = set(state.get("done", []))
    metrics_of = {row["round"]: row for row in rows}
    rounds, so_far = [], np.zeros(len(classes), np.int64)
    for r in range(cfg.al.rounds + 1):
        if f"{r:02d}/select" not in done:
            break
        selection = store.read_table(f"rounds/{r:02d}/selection.parquet")
        ids = pc.unique(selection.column("id"))  # in pick order: unique keeps first appearances
        # only the shown frames' rows become Python objects: LabOR SPL asks for every pool image
        shown = selection.filter(pc.is_in(selection.column("id"), value_set=ids[: cfg.report.frames_per_round]))
        groups = rows_by_image(shown) if shown.num_rows else {}
        review = RoundReview(store, cfg, r, palette, truth, model_of)
        added = review.class_pixels(ids, len(classes)) if f"{r:02d}/label" in done else None
        if added is not None:
            so_far = so_far + np.asarray(added, np.int64)
        row = metrics_of.get(r, {})
        rounds.append({
            "round": r, "images": len(ids), "requests": selection.num_rows,
            "units": sorted(set(selection.column("unit").to_pylist())),
            "cost_pixels": int(pc.sum(selection.column("cost_pixels")).as_py() or 0),
            "cost_clicks": int(pc.sum(selection.column("cost_clicks")).as_py() or 0),
            "labeled": f"{r:02d}/label" in done, "trained": f"{r:02d}/train" in done,
            "val_miou": row.get("val_miou"), "val_iou_per_class": row.get("val_iou_per_class"),
            "labeled_share": row.get("labeled_share"), "labeled_pixels": row.get("labeled_pixels"),
            "class_pixels_added": added, "class_pixels_so_far": so_far.tolist() if added is not None else None,
            "frames": review.frames(groups, f"{r:02d}/label" in done), "links": round_links(store, r),
        })
    endpoint = cfg.store.endpoint_url or None
    this_run = {"label": f"{cfg.run_name} ({cfg.al.acquisition})", "run": ".", "note": "",
                "points": [{"round": row["round"], "labeled_share": row["labeled_share"], "val_miou": row["val_miou"]}
                           for row in rows if row.get("val_miou") is not None]}
    series = [this_run, *compare_series(cfg.report.compare_runs, endpoint)]
    full, full_note = full_supervision_miou(cfg.report.full_supervision_run, endpoint)
    log = state.get("log", [])
    data = {
        "run": cfg.run_name, "acquisition": cfg.al.acquisition, "method": cfg.method.name,
        "labeling": cfg.al.labeling, "classes": classes,
        "class_colors": ["#" + bytes(palette[c].tolist()).hex() for c in range(len(classes))],
        "last_step": log[-1]["step"] if log else None, "last_step_finished": log[-1]["finished"] if log else None,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frames_per_round": cfg.report.frames_per_round,
        "curve": {"series": series, "full_supervision": full, "full_supervision_run": cfg.report.full_supervision_run,
                  "note": full_note},
        "rounds": rounds[::-1],  # newest first: the round waiting for labels is what a reviewer opens
        "plots": _write_plots(store, cfg, classes, rows, rounds, series, full),
    }
    return data


def _write_plots(store: ArtifactStore, cfg: ExperimentConfig, classes: list[str],
                 rows: list[dict[str, Any]], rounds: list[dict[str, Any]], series: list[dict],
                 full: float | None) -> dict[str, str | None]:
    """The curve, IoU heat map and class bars under review/; their keys by name (None: not yet)."""
    plots: dict[str, str | None] = {"iou_per_class": None, "labeled_pixels_per_class": None}
    store.write_bytes(f"{FOLDER}/miou_curve.png", curve_png(series, full, f"{cfg.run_name}: val mIoU vs labels"))
    plots["curve"] = f"{FOLDER}/miou_curve.png"
    trained = [row for row in rows if row.get("val_iou_per_class")]
    if trained and classes:
        iou = np.array([[_nan_if_none(row["val_iou_per_class"].get(c)) for c in classes] for row in trained])
        store.write_bytes(f"{FOLDER}/iou_per_class.png", iou_heatmap_png([row["round"] for row in trained], classes, iou))
        plots["iou_per_class"] = f"{FOLDER}/iou_per_class.png"
    labeled = [rd for rd in rounds if rd["class_pixels_added"] is not None]
    if labeled and classes:
        counts = np.array([rd["class_pixels_added"] for rd in labeled], np.float64)
        store.write_bytes(f"{FOLDER}/labeled_pixels_per_class.png",
                          class_pixels_png([rd["round"] for rd in labeled], classes, counts))
        plots["labeled_pixels_per_class"] = f"{FOLDER}/labeled_pixels_per_class.png"
    return plots


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>segrl review: {{ run }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin: 0 0 .2em; } h2 { margin: .2em 0; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin: 1em 0; }
.meta, .note { color: #666; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.plots img { max-width: 100%; }
.frames { display: flex; flex-wrap: wrap; gap: 12px; }
figure.frame { margin: 0; padding: 6px; border: 1px solid #e4e4e4; border-radius: 4px; }
.views { display: flex; gap: 4px; }
.view { text-align: center; font-size: 11px; color: #666; }
.view img { display: block; }
.missing { display: flex; align-items: center; justify-content: center; background: #f0f0f0; color: #999; }
figcaption { font-size: 12px; margin-top: 4px; }
.legend span { display: inline-block; margin-right: .8em; font-size: 12px; }
.legend i { display: inline-block; width: .9em; height: .9em; margin-right: .25em; vertical-align: -1px; }
.links a { margin-right: .8em; }
</style>
</head>
<body>
<h1>{{ run }}</h1>
<p class="meta">acquisition <b>{{ acquisition }}</b> · method {{ method }} · labeling {{ labeling }} ·
last step {{ last_step or "none" }}{% if last_step_finished %} ({{ last_step_finished }}){% endif %} · page written {{ written }} ·
<a href="report.md">report.md</a> · <a href="metrics.json">metrics.json</a> · <a href="review.json">review.json</a></p>

<section id="curve">
<h2>val mIoU against labeled share; per class</h2>
<div class="plots">
<img src="{{ plots.curve }}" alt="val mIoU against labeled share">
{% if plots.iou_per_class %}<img src="{{ plots.iou_per_class }}" alt="val IoU per class and round">{% endif %}
{% if plots.labeled_pixels_per_class %}<img src="{{ plots.labeled_pixels_per_class }}" alt="labeled pixels per class so far">{% endif %}
</div>
{% for s in curve.series if s.note %}<p class="note">{{ s.label }}: {{ s.note }}</p>{% endfor %}
{% if curve.note %}<p class="note">{{ curve.note }}</p>{% endif %}
<p class="legend">{% for name in classes %}<span><i style="background: {{ class_colors[loop.index0] }}"></i>{{ name }}</span>{% endfor %}<span><i style="background: #303030"></i>unlabeled / void</span></p>
</section>

{% for rd in rounds %}
<section class="round" id="round-{{ rd.round }}" data-round="{{ rd.round }}">
<h2>Round {{ rd.round }}</h2>
<p>{{ rd.images }} image{{ "" if rd.images == 1 else "s" }}, {{ rd.requests }} request{{ "" if rd.requests == 1 else "s" }} ({{ rd.units | join(", ") or "none" }});
cost {{ "{:,}".format(rd.cost_pixels) }} pixels{% if rd.cost_clicks %}, {{ "{:,}".format(rd.cost_clicks) }} clicks{% endif %}.
{% if rd.val_miou is not none %}After training: val mIoU <b>{{ "%.2f" | format(100 * rd.val_miou) }}%</b> at {{ "%.3f" | format(100 * rd.labeled_share) }}% of the pool's pixels labeled.
{% elif rd.labeled %}Labeled; not trained yet.{% else %}Waiting for labels.{% endif %}</p>
<p class="links">{% for link in rd.links %}<a href="{{ link.href }}">{{ link.name }}</a>{% endfor %}</p>
<p class="note">{% if rd.frames %}The first {{ rd.frames | length }} of {{ rd.images }} frames in pick order (best first).{% else %}No frames.{% endif %}
{% if rd.round == 0 %}Round 0's frames are chosen before any model, so there is no prediction.{% endif %}</p>
<div class="frames">
{% for f in rd.frames %}
<figure class="frame" data-id="{{ f.id }}">
<div class="views">
{% if f.error %}<div class="view missing">{{ f.error }}</div>{% else %}<div class="view"><img class="thumb" src="{{ f.request }}" alt="request on {{ f.id }}">requested</div>{% endif %}
{% if f.prediction %}<div class="view"><img class="thumb" src="{{ f.prediction }}" alt="prediction on {{ f.id }}">prediction ({{ f.prediction_model }})</div>{% endif %}
{% if f.truth %}<div class="view"><img class="thumb" src="{{ f.truth }}" alt="{{ f.truth_kind }} of {{ f.id }}">{{ f.truth_kind }}</div>{% endif %}
</div>
<figcaption><b>#{{ f.rank }}</b> {{ f.id }}{% if f.score is not none %} · {{ f.score_name }} {{ "%.4g" | format(f.score) }}{% endif %}<br>
{{ f.units | join(", ") }}: {{ f.requests }} request{{ "" if f.requests == 1 else "s" }}, {{ "{:,}".format(f.cost_pixels) }} px{% if f.cost_clicks %}, {{ f.cost_clicks }} clicks{% endif %}</figcaption>
</figure>
{% endfor %}
</div>
</section>
{% endfor %}
</body>
</html>
""")


def render_page(data: dict[str, Any]) -> str:
    """review.html from :func:`review_data`'s dict (every value HTML-escaped)."""
    return TEMPLATE.render(**data)


def write_review(store: ArtifactStore, cfg: ExperimentConfig, state: dict[str, Any], rows: list[dict[str, Any]],
                 truth: TruthOf | None = None, model_of: ModelOf | None = None) -> dict[str, Any]:
    """Write ``review.json`` and ``review.html`` of the run in ``store`` (see the module doc).

    ``rows``: the loop's round rows (metrics.json's); ``truth(id)``: the oracle's label map,
    None for external labeling; ``model_of(r)``: round r's final snapshot and its scoring size.
    """
    data = review_data(store, cfg, state, rows, truth, model_of)
    store.write_json(DATA, data)
    store.write_text(PAGE, render_page(data))
    return data
