"""The STAL loop: rounds of select -> label -> train -> score, resumable from the store.

Round 0 selects the initial labeled images (random, or ``al.initial_ids``); round r > 0
selects from round r-1's scores under the round's budget. Every round trains a model
(Ray Train, any recipe; from scratch, or with ``al.retrain=continue`` resuming the
previous round's model, optimiser and schedule, as STAL's incremental retraining) and
scores the pool with it (Ray Data), except that the last round only trains. Layout under ``<store.root>/<run>/``::

    config.yaml                 the resolved config
    state.json                  steps done, the step log, status (written atomically after each step)
    pool.parquet                the pool: id, image_uri
    labels/<id>.png             every label so far, merged (255 = unlabeled)
    labels/requested/<id>.png   every pixel asked for so far (255), labeled or answered "void"
    labels/index.parquet        id, image_uri, height, width, labeled and requested pixels
    rounds/<NN>/selection.parquet   what was asked for, with its cost
    rounds/<NN>/labels/         the sparse answers of that round (oracle or imported)
    rounds/<NN>/labeling/       (external) manifest, masks and README for annotators
    rounds/<NN>/model/          the round's training run: train/ckpt_*, snapshots/ckpt_* (K)
    rounds/<NN>/scores.parquet, regions.parquet, errors.parquet   the round's scoring
    rounds/<NN>/metrics.json    eval mIoU, per-class IoU, labels so far, seconds per step
    metrics.json, report.md, miou_vs_labeled.png   across rounds
    review.html, review.json, review/   the review page (segrl.loop.review), after every step
    rounds/<NN>/review/         its thumbnails of the round's first report.frames_per_round frames

A step is recorded in ``state.json`` only after its outputs are written, and each step
rewrites the same outputs if it is run again, so a rerun after a crash continues with
the first unfinished step and never repeats a finished one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segrl.config import (
    POINT_ACQUISITIONS,
    ALConfig,
    ConfigError,
    ExperimentConfig,
    ScoreConfig,
    absolute_local_paths,
    replace,
)
from segrl.console import say
from segrl.data.build import SplitView
from segrl.data.labels import DataError
from segrl.data.manifest import IMAGE_PIXELS_COLUMN, LABELED_PIXELS_COLUMN
from segrl.engine.train import SNAPSHOT_DIR, record_config, run_store
from segrl.labeling import (
    MARKER_NAME,
    encode_label_png,
    export_manifest,
    labeled_pixel_count,
    merge_sparse,
    oracle_label,
    selection_table,
    validate_selection,
)
from segrl.labeling.tools import export_tools
from segrl.loop.labor import labor_rows
from segrl.loop.points import initial_point_row, point_rows
from segrl.loop.report import miou_plot_png, rounds_table
from segrl.loop.review import write_review
from segrl.loop.select import (
    LABOR_ACQUISITIONS,
    POOL_COLUMNS,
    REGION_ACQUISITIONS,
    image_row,
    pool_areas,
    pool_size,
    read_scores,
    round_budget,
    select_image_step,
    select_region_step,
)
from segrl.loop.state import STATE_FILE, read_state
from segrl.scoring import inspect_checkpoints, resolve_image_size
from segrl.training import CHECKPOINT_FILE, CHECKPOINT_PREFIX, TRAIN_DIR

POOL_FILE = "pool.parquet"
INDEX_FILE = "labels/index.parquet"
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("image_uri", pa.string()), ("height", pa.int64()),
                          ("width", pa.int64()), ("labeled_pixels", pa.int64()), ("requested_pixels", pa.int64())])


@dataclass(frozen=True)
class LoopSummary:
    run_uri: str
    status: str  # finished | waiting_for_labels
    rounds: list[dict[str, Any]]
    table: str
    message: str = ""


def round_dir(r: int) -> str:
    return f"rounds/{r:02d}"


def score_signals(al: ALConfig) -> tuple[str, ...]:
    """What a round's scoring computes for ``al``'s selection: its acquisition's signal, and
    the frames' embeddings when the picks are spread (``al.spread_candidates``)."""
    signals = {"entropy": ("entropy",), "stability": ("stability",), "random": ("confidence",)}.get(
        al.acquisition, ("entropy",))
    return (*signals, "embedding") if al.spread_candidates else signals


class ActiveLearningLoop:
    """Runs (or resumes) the loop of one run; see the module doc."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = absolute_local_paths(cfg)
        self.al = self.cfg.al
        self.store = run_store(self.cfg)
        self.endpoint = self.cfg.store.endpoint_url or None
        self._dataset = None
        self._ran_steps = 0  # steps run by this process (a resumed run skips the finished ones)

    # ------------------------------------------------------------------ state

    def _save_state(self) -> None:
        self.store.write_json(STATE_FILE, self.state)

    def _step(self, r: int, name: str, fn: Any) -> bool:
        """Run step ``name`` of round ``r`` unless done; False while it waits for people."""
        key = f"{r:02d}/{name}"
        if key in self.state["done"]:
            return True
        started = time.perf_counter()
        say(f"[segrl] round {r}: {name} ...")
        result = fn(r)
        if result is None:
            return False
        seconds = time.perf_counter() - started
        say(f"[segrl] round {r}: {name} done in {seconds:.1f} s")
        self._ran_steps += 1
        self.state["done"].append(key)
        self.state["log"].append({"step": key, "seconds": round(seconds, 3),
                                  "finished": datetime.now(timezone.utc).isoformat(), **result})
        self.state["status"] = "running"
        self._save_state()
        self.write_review()
        return True

    # ------------------------------------------------------------------ the loop

    def run(self) -> LoopSummary:
        from segrl.engine.train import preflight

        preflight(self.cfg)  # bad data, weights or store fail here, before anything is written
        self.state = read_state(self.store)  # a damaged state.json is named, not a traceback
        check_rounds_kept(self.state, self.al.rounds)
        frames = None if "num_classes" in self.state else self._pool_frames()  # bad pools refused unwritten
        record_config(self.store, self.cfg)
        if frames is not None:
            self._write_pool(frames)
        self._restore_labels()
        for r in range(self.al.rounds + 1):
            ran_before = self._ran_steps
            if not self._step(r, "select", self._select):
                return self._summary("waiting_for_labels")
            if not self._step(r, "label", self._label):
                return self._summary("waiting_for_labels", self._waiting_message(r))
            self._step(r, "train", self._train)
            self._report()
            if r < self.al.rounds:
                self._step(r, "score", self._score)
                table = self._report()
                if self._ran_steps > ran_before and table:  # the last round's table is the job's to print
                    say(table)
        self.state["status"] = "finished"
        self._save_state()
        return self._summary("finished")

    # ------------------------------------------------------------------ data

    def _train_dataset(self) -> Any:
        from segrl.data.build import build_dataset

        if self._dataset is None:
            self._dataset = build_dataset(self.cfg.data, self.cfg.data.train_split, train=False,
                                          endpoint_url=self.cfg.store.endpoint_url)
        return self._dataset

    def _pool_frames(self) -> list[tuple[str, str]]:
        """The train split as the pool (the oracle answers from its labels); with a labeled
        source domain (``data.target_prefixes``), its target frames minus the held-out ones.
        Refused, before anything is written, when an id repeats (a label would go to the
        wrong image and the budget be charged twice) or the oracle has no truth to answer from."""
        from segrl.data.build import build_training_sets
        from segrl.data.pool import check_unique_ids, id_file_problem
        from segrl.data.pool_dataset import dataset_frames, unlabeled_ids

        dataset = self._train_dataset()
        frames = dataset_frames(dataset)
        if self.cfg.data.target_prefixes:
            sets = build_training_sets(replace(self.cfg.data, labeled_manifest=""), self.cfg.train.seed,
                                       self.cfg.store.endpoint_url)
            held_out = set(sets.target_eval_ids or ())
            frames = [f for f in frames if f[0].startswith(tuple(self.cfg.data.target_prefixes))
                      and f[0] not in held_out]
        source = f"the {self.cfg.data.train_split} split of data.root {self.cfg.data.root or self.cfg.data.dataset!r}"
        check_unique_ids([f[0] for f in frames], source)
        unusable = [problem for problem in map(id_file_problem, (f[0] for f in frames)) if problem]
        if unusable:  # the loop writes labels/<id>.png for every labeled frame
            raise DataError(f"{source}: {len(unusable)} frame id(s) unusable; first: {unusable[0]}")
        if self.al.labeling == "oracle":
            pool_ids = {f[0] for f in frames}
            missing = [i for i in unlabeled_ids(dataset) if i in pool_ids]
            if missing:
                raise ConfigError(
                    f"al.labeling = 'oracle' answers from the ground truth, but {len(missing)} of the "
                    f"{len(frames)} pool frames of {source} have none (no 'label_uri'; first: {missing[0]!r}): "
                    "give every frame a label_uri, or label with people (al.labeling=external)")
        return frames

    def _write_pool(self, frames: list[tuple[str, str]]) -> None:
        dataset = self._train_dataset()
        self.store.write_table(POOL_FILE, pa.table({"id": [f[0] for f in frames], "image_uri": [f[1] for f in frames]}))
        self.state.update(num_classes=len(dataset.classes), classes=list(dataset.classes), pool_images=len(frames))
        self._save_state()

    def _truth(self, image_id: str) -> np.ndarray:
        dataset = self._train_dataset()
        if not hasattr(self, "_positions"):
            from segrl.data.build import dataset_ids

            self._positions = {i: k for k, i in enumerate(dataset_ids(dataset))}
        k = self._positions[image_id]
        while isinstance(dataset, SplitView):  # data.exclude_ids: the frame's place in the whole split
            dataset, k = dataset.base, dataset.indices[k]
        return dataset.render(k)[1] if hasattr(dataset, "render") else dataset.load(k)[1]

    def _index(self) -> pa.Table:
        if self.store.exists(INDEX_FILE):
            return self.store.read_table(INDEX_FILE)
        return INDEX_SCHEMA.empty_table()

    def _labeled_pixels(self) -> pa.Table:
        """Pixels already asked for per image (id, requested_pixels): what a new request must not charge again."""
        return self._index().select(["id", "requested_pixels"])

    def _labeled_mask(self, image_id: str) -> np.ndarray | None:
        from segrl.data.labels import decode_label

        key = f"labels/requested/{image_id}.png"
        if not self.store.exists(key):
            return None
        return decode_label(self.store.read_bytes(key), self.store.uri(key)) != 0

    def _scored_pool(self, r: int) -> pa.Table:
        """The round's scores, only the columns selection reads (pools have millions of rows)."""
        with self.store.open_input(f"{round_dir(r)}/scores.parquet") as f:
            return read_scores(pq.ParquetFile(f), self.al)

    # ------------------------------------------------------------------ steps

    def _select(self, r: int) -> dict[str, Any]:
        if r == 0:
            table = _empty_or(self._initial_rows())
            budget = int(pc.sum(table.column("cost_pixels")).as_py() or 0)
            if self.al.initial_points_per_image:  # every pool image was opened: the pool's size is known
                self.state["pool_pixels"] = int(pool_areas(table).sum())
        else:
            with self.store.open_input(f"{round_dir(r - 1)}/scores.parquet") as f:  # streamed: millions of rows
                scores = pq.ParquetFile(f)
                pool_pixels, pool_images = pool_size(scores)
                self.state["pool_pixels"] = pool_pixels
                budget = round_budget(self.al, pool_pixels, pool_images)
                table = self._acquire(r, scores, budget)
            table = table if isinstance(table, pa.Table) else _empty_or(table)
        self.store.write_table(f"{round_dir(r)}/selection.parquet", table)
        return {"selected_images": int(pc.count_distinct(table.column("id")).as_py()), "budget": int(budget),
                "cost_pixels": int(pc.sum(table.column("cost_pixels")).as_py() or 0),
                "cost_clicks": int(pc.sum(table.column("cost_clicks")).as_py() or 0)}

    def _initial_rows(self) -> list[dict]:
        from segrl.data.manifest import read_bytes
        from segrl.data.pool import load_pool_image

        pool = self.store.read_table(POOL_FILE)
        ids = pool.column("id").to_pylist()
        uris = dict(zip(ids, pool.column("image_uri").to_pylist(), strict=True))
        if self.al.initial_ids:
            wanted = read_bytes(self.al.initial_ids, self.endpoint).decode().split()
            unknown = [i for i in wanted if i not in uris]
            if unknown:
                raise ConfigError(f"al.initial_ids file {self.al.initial_ids} lists id {unknown[0]!r} "
                                  f"that is not in the pool ({len(unknown)} unknown in all)")
        elif self.al.initial_labeled:
            if self.al.initial_labeled > len(ids):
                raise ConfigError(f"al.initial_labeled = {self.al.initial_labeled} exceeds the {len(ids)} "
                                  "images of the pool")
            order = np.random.default_rng(self.al.seed).permutation(len(ids))
            wanted = sorted(ids[k] for k in order[: self.al.initial_labeled])
        if self.al.initial_points_per_image:  # PixelPick's first round: random clicks in every image
            wanted = sorted(ids)
        rows = []
        for image_id in wanted:
            h, w = load_pool_image(uris[image_id], self.endpoint).shape[:2]
            if self.al.initial_points_per_image:
                row = initial_point_row(image_id, uris[image_id], (h, w), self.cfg.data.base_size or None,
                                        self.al.initial_points_per_image, self.al.seed)
                if row is not None:
                    rows.append(row)
            else:
                rows.append(image_row(image_id, uris[image_id], h, w, h * w))
        return rows

    def _acquire(self, r: int, scores_file: pq.ParquetFile, budget: int) -> pa.Table | list[dict]:
        labeled = self._labeled_pixels()
        if self.al.acquisition not in (*REGION_ACQUISITIONS, *LABOR_ACQUISITIONS, *POINT_ACQUISITIONS):
            return select_image_step(self.al, scores_file, labeled, budget)
        if self.al.acquisition in REGION_ACQUISITIONS:
            with self.store.open_input(f"{round_dir(r - 1)}/regions.parquet") as f:  # streamed: 10-20 rows a frame
                return select_region_step(scores_file, pq.ParquetFile(f), budget, self._labeled_mask, labeled)
        scores = read_scores(scores_file, self.al)
        pool = scores.select([c for c in POOL_COLUMNS if c in scores.column_names])
        final, size = self._final_model(r - 1)
        if self.al.acquisition in POINT_ACQUISITIONS:
            return point_rows(self.al, pool, budget, self._labeled_mask, labeled, final, size, self.cfg.store)
        return labor_rows(self.al, pool, scores, budget, self._labeled_mask, labeled, final, size,
                          self.store, f"{round_dir(r)}/masks", self.cfg.store)

    def _trained_model(self, r: int) -> tuple[str, tuple[int, int]] | None:
        """:meth:`_final_model` of round r, or None while it has no snapshot (not trained, or
        a store put together by hand), for the review page's predictions."""
        return self._final_model(r) if self.store.list(f"{round_dir(r)}/model/{SNAPSHOT_DIR}") else None

    def _final_model(self, r: int) -> tuple[str, tuple[int, int]]:
        """Round r's final snapshot and its scoring grid, where LabOR and the point
        acquisitions look for pixels (the grid training resizes to)."""
        checkpoints = self._snapshots(r)
        final = self.store.uri(f"{round_dir(r)}/model/{SNAPSHOT_DIR}/"
                               + sorted(self.store.list(f"{round_dir(r)}/model/{SNAPSHOT_DIR}"))[-1]
                               .rsplit("/", 1)[-1])
        info = inspect_checkpoints(checkpoints, self.endpoint)
        size_cfg = ScoreConfig(pool="-", checkpoints=checkpoints, out="-",
                               image_size=native_scoring_size(self.cfg.data, self._index()))
        return final, resolve_image_size(size_cfg, info)

    def _label(self, r: int) -> dict[str, Any] | None:
        selection = validate_selection(self.store.read_table(f"{round_dir(r)}/selection.parquet"))
        labels_prefix = f"{round_dir(r)}/labels"
        if selection.num_rows == 0:
            return {"labeled_pixels": 0}
        if self.al.labeling == "oracle":
            counts = oracle_label(selection, self._truth, self.store, labels_prefix)
        else:
            if not self.store.exists(f"{labels_prefix}/{MARKER_NAME}"):
                if not self.store.exists(f"{round_dir(r)}/labeling/manifest.json"):
                    # the tools' files first: manifest.json, written last, says the export is whole
                    export_tools(selection, self.store, f"{round_dir(r)}/labeling", self.state["classes"],
                                 self.cfg.annotation, self.endpoint)
                    export_manifest(selection, self.store, f"{round_dir(r)}/labeling", self.state["classes"])
                self.state["status"] = "waiting_for_labels"
                self.state["waiting_round"] = r
                self._save_state()
                return None
            counts = self.store.read_json(f"{labels_prefix}/{MARKER_NAME}")
            counts = {k: v for k, v in counts.items() if isinstance(v, int)}
        self._merge(selection, labels_prefix)
        return counts

    def _merge(self, selection: pa.Table, labels_prefix: str) -> None:
        """Fold a round's sparse answers and requests into ``labels/``: idempotent, so a rerun is safe."""
        from segrl.labeling import requested_mask, rows_by_image, store_mask_reader

        index = {row["id"]: row for row in self._index().to_pylist()}
        read_mask = store_mask_reader(self.store)
        for image_id, rows in rows_by_image(selection).items():
            new = self._read_png(f"{labels_prefix}/{image_id}.png")
            if new is None:
                continue
            merged = merge_sparse(self._read_png(f"labels/{image_id}.png"), new)
            asked = requested_mask(rows, read_mask)
            before = self._read_png(f"labels/requested/{image_id}.png")
            if before is not None:
                asked |= before != 0
            self.store.write_bytes(f"labels/{image_id}.png", encode_label_png(merged))
            self.store.write_bytes(f"labels/requested/{image_id}.png", encode_label_png(asked.astype(np.uint8) * 255))
            row = rows[0]
            index[image_id] = {"id": image_id, "image_uri": row["uri"], "height": row["height"], "width": row["width"],
                               "labeled_pixels": labeled_pixel_count(merged), "requested_pixels": int(asked.sum())}
        rows = [index[i] for i in sorted(index)]
        self.store.write_table(INDEX_FILE, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))

    def _restore_labels(self) -> None:
        """Rebuild ``labels/`` from the rounds' own answers when part of it is gone.

        ``labels/`` is derived: each labeled round's answers (``rounds/NN/labels/``) merged
        in round order. Training and selection read it, so a lost index would silently
        shrink the training set and offer (and charge) labeled images again. Replaying the
        merges is idempotent, so the rebuilt files equal the lost ones byte for byte.
        """
        rounds = [r for r in range(self.al.rounds + 1) if f"{r:02d}/label" in self.state["done"]]
        answered = {r: self._answered_ids(r) for r in rounds}
        expected = set().union(*answered.values())
        present = set(self.store.list("labels", recursive=True))
        indexed = set(self._index().column("id").to_pylist()) if INDEX_FILE in present else set()
        lost = sorted(i for i in expected if i not in indexed or f"labels/{i}.png" not in present
                      or f"labels/requested/{i}.png" not in present)
        if not lost:
            return
        say(f"[segrl] labels/ lacks {len(lost)} labeled image(s) ({lost[0]}, ...): rebuilding it "
            f"from the answers of round(s) {', '.join(str(r) for r in rounds)}")
        for r in rounds:
            selection = validate_selection(self.store.read_table(f"{round_dir(r)}/selection.parquet"))
            if selection.num_rows:
                self._merge(selection, f"{round_dir(r)}/labels")

    def _answered_ids(self, r: int) -> set[str]:
        """Ids whose answers round r (label step done) stored under ``rounds/NN/labels/``.

        The oracle answered every selected image and can answer again from the same truth;
        people's answers (listed in the import's marker) cannot be remade, so their loss is a
        ``DataError`` naming the round and how to recover.
        """
        labels_prefix = f"{round_dir(r)}/labels"
        selection = self.store.read_table(f"{round_dir(r)}/selection.parquet")
        if selection.num_rows == 0:
            return set()
        marker = f"{labels_prefix}/{MARKER_NAME}"
        if self.al.labeling == "oracle":
            wanted = set(selection.column("id").to_pylist())
        elif self.store.exists(marker):
            wanted = set(self.store.read_json(marker).get("dropped_pixels_per_image", {}))
        else:
            wanted = {MARKER_NAME}  # the import's record itself is gone
        stored = {k.rsplit("/", 1)[-1].removesuffix(".png") for k in self.store.list(labels_prefix)}
        gone = sorted(wanted - stored)
        if gone and self.al.labeling == "oracle":
            say(f"[segrl] round {r}: the oracle's answers for {len(gone)} image(s) are gone: answering again")
            oracle_label(selection, self._truth, self.store, labels_prefix)  # the same truth, the same answers
        elif gone:
            raise DataError(
                f"round {r}'s imported answers are gone from {self.store.uri(labels_prefix)} ({len(gone)} "
                f"missing, first: {gone[0]!r}), so the run's merged labels/ cannot be rebuilt from them: "
                "restore that folder from a backup, or delete it and import the round's answers again "
                f"(python jobs/import_labels.py --run {self.store.uri()} --round {r} --labels ...), then rerun")
        return wanted

    def _read_png(self, key: str) -> np.ndarray | None:
        from segrl.data.labels import decode_label

        return decode_label(self.store.read_bytes(key), self.store.uri(key)) if self.store.exists(key) else None

    def _snapshots(self, r: int) -> str:
        return self.store.uri(f"{round_dir(r)}/model/{SNAPSHOT_DIR}")

    def _train(self, r: int) -> dict[str, Any]:
        from segrl.engine.train import train

        index = self._index()
        if self.cfg.data.target_prefixes and self.cfg.data.batch_ratio[1] == 0:
            raise ConfigError("config field 'data.batch_ratio' = "
                              f"{list(self.cfg.data.batch_ratio)} gives the target frames the loop labels no "
                              "share of a batch: set its second entry > 0, e.g. [1, 1, 1]")
        pixels = pc.multiply(index.column("height"), index.column("width"))
        labeled = pa.table({"id": index.column("id"), "image_uri": index.column("image_uri"),
                            "label_uri": pa.array([self.store.uri(f"labels/{i}.png")
                                                   for i in index.column("id").to_pylist()]),
                            LABELED_PIXELS_COLUMN: index.column("labeled_pixels"), IMAGE_PIXELS_COLUMN: pixels})
        manifest = f"{round_dir(r)}/labeled.parquet"
        self.store.write_table(manifest, labeled)
        method = self.cfg.method
        changes: dict[str, Any] = {
            "run": "model", "store.root": self.store.uri(round_dir(r)),
            "data.labeled_manifest": self.store.uri(manifest), "data.labeled_count": 0, "data.labeled_ids": "",
            "data.unlabeled_pool": self.store.uri(POOL_FILE),
            "train.snapshots": method.checkpoints_k if self.al.acquisition == "stability" else 1,
            "method.labor_selector": self.al.acquisition in LABOR_ACQUISITIONS,
        }
        per_worker = max(1, index.num_rows // self.cfg.compute.num_workers)
        if not self.cfg.data.target_prefixes and self.cfg.train.batch_size > per_worker:
            # early rounds may hold fewer labeled images than a batch: use them all each step
            changes["train.batch_size"] = per_worker
        if method.name in ("st", "st_pp"):
            changes["method.name"] = "supervised"  # multi-stage ST is not a per-round recipe
        changes.update(self._retrain_changes(r))
        steps = self._round_steps(int(pc.sum(index.column("labeled_pixels")).as_py() or 0))
        if steps:
            changes["train.steps"] = steps
        summary = train(replace(self.cfg, **changes))
        metrics = summary.metrics
        val_miou = metrics.get("val_miou")
        if val_miou is None or not math.isfinite(val_miou):
            say(f"[segrl] round {r}: val mIoU is undefined (stored as null): no validation pixel is labeled "
                "with a class, so no class has an IoU")
            val_miou = None
        return {"val_miou": val_miou, "steps": metrics.get("step")}

    def _round_steps(self, labeled_pixels: int) -> int:
        """``train.steps`` of a round: with ``al.scale_steps``, scaled by the labels it has
        against round 0's, so a label of a later round gets as many steps as round 0's did
        (a fixed count would share them among ever more labels). 0 = leave as configured."""
        steps = self.cfg.train.steps
        if not (self.al.scale_steps and steps):
            return 0
        first = self.state.setdefault("first_labeled_pixels", labeled_pixels)
        return max(steps, round(steps * labeled_pixels / max(first, 1)))

    def _retrain_changes(self, r: int) -> dict[str, Any]:
        """``al.retrain``: from_scratch trains every round from ``model.weights`` with a whole
        schedule; continue gives round r the [r, r+1) / (rounds + 1) share of one schedule and
        resumes the model, optimiser and recipe state where round r-1's training ended (a
        weights-only warm start with a fresh schedule back at the peak would undo it)."""
        if self.al.retrain == "from_scratch":
            return {}
        parts = self.al.rounds + 1
        changes: dict[str, Any] = {"train.schedule_span": (r / parts, (r + 1) / parts)}
        if r > 0:
            folder = f"{round_dir(r - 1)}/model/{TRAIN_DIR}"
            names = sorted(name.rsplit("/", 1)[-1] for name in self.store.list(folder))
            last = [name for name in names if name.startswith(CHECKPOINT_PREFIX)][-1]
            changes["train.resume_from"] = self.store.uri(f"{folder}/{last}/{CHECKPOINT_FILE}")
        return changes

    def _score(self, r: int) -> dict[str, Any]:
        from segrl.engine.score import score_pool

        al = self.al
        signals = score_signals(al)
        score_cfg = ScoreConfig(
            name=f"round{r:02d}", pool=self.store.uri(POOL_FILE), checkpoints=self._snapshots(r),
            out=self.store.uri(round_dir(r)), signals=signals,
            image_size=native_scoring_size(self.cfg.data, self._index()),  # native frames: their size
            region_size=tuple(al.region_size),
            region_score="impurity_uncertainty" if al.acquisition == "region_impurity" else "entropy",
            regions_top_r=al.regions_top_r if al.acquisition in REGION_ACQUISITIONS else 0,
            store=self.cfg.store, compute=self.cfg.compute,
        )
        score_cfg.validate()
        summary = score_pool(score_cfg, progress=False)
        return {"scored": summary.scored, "errors": summary.errors}

    # ------------------------------------------------------------------ reports

    def _round_rows(self) -> list[dict[str, Any]]:
        log = {entry["step"]: entry for entry in self.state["log"]}
        pool_pixels = self.state.get("pool_pixels")
        rows, labeled_pixels, clicks = [], 0, 0
        for r in range(self.al.rounds + 1):
            if f"{r:02d}/train" not in log:
                break
            selection = self.store.read_table(f"{round_dir(r)}/selection.parquet")
            clicks += int(sum(selection.column("cost_clicks").to_pylist()))
            labeled_pixels += int(log.get(f"{r:02d}/select", {}).get("cost_pixels", 0))
            metrics = self.store.read_json(f"{round_dir(r)}/model/metrics.json")
            if pool_pixels is None and self.store.exists(f"{round_dir(r)}/scores.parquet"):
                pool_pixels = int(pool_areas(self._scored_pool(r)).sum())
            images = self._labeled_images_after(r)
            row = {
                "round": r, "labeled_images": images, "labeled_pixels": labeled_pixels, "clicks": clicks,
                "labeled_share": labeled_pixels / pool_pixels if pool_pixels else 0.0,
                "val_miou": metrics.get("val_miou"), "val_iou_per_class": metrics.get("val_iou_per_class"),
                # the optimiser steps the round's model had when it finished training
                "steps": log[f"{r:02d}/train"].get("steps"),
                "seconds": {step: log[f"{r:02d}/{step}"]["seconds"] for step in ("select", "label", "train", "score")
                            if f"{r:02d}/{step}" in log},
            }
            rows.append(row)
            self.store.write_json(f"{round_dir(r)}/metrics.json", row)
        return rows

    def _labeled_images_after(self, r: int) -> int:
        ids: set[str] = set()
        for k in range(r + 1):
            selection = self.store.read_table(f"{round_dir(k)}/selection.parquet")
            ids.update(selection.column("id").to_pylist())
        return len(ids)

    def _report(self) -> str | None:
        """Write metrics.json, report.md and the plot of the rounds so far; return their table."""
        rows = self._round_rows()
        if not rows:
            return None
        table = rounds_table(rows)
        self.store.write_json("metrics.json", {"rounds": rows, "acquisition": self.al.acquisition,
                                               "method": self.cfg.method.name})
        self.store.write_text("report.md", f"# {self.cfg.run_name}: {self.al.acquisition}, "
                                           f"{self.cfg.method.name}\n\n{table}\n")
        self.store.write_bytes("miou_vs_labeled.png",
                               miou_plot_png(rows, f"{self.cfg.run_name} ({self.al.acquisition})"))
        return table

    def write_review(self) -> str:
        """Rewrite review.html and review.json for the steps done so far (segrl.loop.review); its URI."""
        if not hasattr(self, "state"):  # jobs/review_page.py: a page of a stored run, no step run
            self.state = self._load_state()
        write_review(self.store, self.cfg, self.state, self._round_rows(), model_of=self._trained_model,
                     truth=self._truth if self.al.labeling == "oracle" else None)
        return self.store.uri("review.html")

    def _summary(self, status: str, message: str = "") -> LoopSummary:
        rows = self._round_rows()
        return LoopSummary(run_uri=self.store.uri(), status=status, rounds=rows, table=rounds_table(rows),
                           message=message)

    def _waiting_message(self, r: int) -> str:
        tools = "".join(f" or {self.store.uri(round_dir(r) + '/labeling/' + t)}/" for t in self.cfg.annotation.tools)
        return (
            f"round {r}: waiting for labels. Annotators: see {self.store.uri(round_dir(r) + '/labeling/README.md')}"
            f"{tools}.\n"
            f"Then: python jobs/import_labels.py --run {self.store.uri()} --round {r} --labels <folder of PNGs, "
            f"Label Studio JSON export or CVAT export>\n"
            f"and rerun this job to continue."
        )


def check_rounds_kept(state: dict[str, Any], rounds: int) -> None:
    """Refuse an ``al.rounds`` below a round the run has already started: the loop would
    stop before it and rewrite report.md and metrics.json without the rounds after it."""
    started = sorted({int(step.split("/", 1)[0]) for step in state["done"] if step.split("/", 1)[0].isdigit()})
    if started and started[-1] > rounds:
        raise ConfigError(
            f"config field 'al.rounds' = {rounds}, but this run has already started round {started[-1]} "
            f"(rounds 0-{started[-1]} in state.json): a smaller count would drop the later rounds from "
            f"report.md. Rerun with al.rounds >= {started[-1]}, or use a new run name (run=...)")


def native_scoring_size(data: Any, index: pa.Table) -> tuple[int, ...]:
    """The [H, W] to score a round's model at when its training config fixes none.

    Training on native-size frames (no ``data.base_size``, not synthetic) crops the frames
    as they are, so scoring uses their size too: the labeled frames' (the most common one
    if they differ; other frames are resized to it and their scores mapped back). Empty
    when the checkpoints' own config fixes a size.
    """
    if data.base_size or data.dataset == "synthetic" or index.num_rows == 0:
        return ()
    sizes = pa.table({"h": index.column("height"), "w": index.column("width")}).group_by(["h", "w"]).aggregate(
        [([], "count_all")]).sort_by([("count_all", "descending"), ("h", "descending"), ("w", "descending")])
    return int(sizes.column("h")[0].as_py()), int(sizes.column("w")[0].as_py())


def _empty_or(rows: list[dict]) -> pa.Table:
    from segrl.labeling import SELECTION_SCHEMA

    return selection_table(rows) if rows else SELECTION_SCHEMA.empty_table()


def run_loop(cfg: ExperimentConfig) -> LoopSummary:
    """Run or resume the active-learning loop ``cfg`` describes."""
    return ActiveLearningLoop(cfg).run()
