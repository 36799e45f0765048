"""ST and ST++ (Yang et al., CVPR 2022) as stages of Ray Train runs and Ray Data scoring.

ST:   teacher on the labeled set -> hard pseudo labels for every unlabeled image (the
      scoring pipeline, ``pseudo_labels: all``) -> a fresh student on labeled U
      pseudo-labeled images, strong view on the unlabeled ones.
ST++: the teacher saves K evenly spaced snapshots; scoring also gives each unlabeled
      image its stability (mean IoU between the earlier snapshots' predictions and the
      final one's). Stage 1 trains a student on the R most stable share; that student
      re-labels the rest; stage 2 trains a fresh student on all of them.

Layout under ``<store.root>/<run>/``::

    config.yaml, metrics.json, metrics.md   the pipeline's config and final result
    self_training.json                      the stages finished so far (resume point)
    teacher/  student/ (ST)  student1/ student2/ (ST++)   each a training run
    pseudo/teacher/, pseudo/student1/       scoring outputs: scores.parquet, pseudo_labels/
    unlabeled_pool.parquet                  the unlabeled images as a pool manifest
    reliable_ids.txt, unreliable_ids.txt    ST++'s split, most stable first
    pseudo_<stage>.parquet                  the pseudo-labeled manifest a student trains on

Rerunning the same run skips finished stages and resumes the unfinished one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from segrl.config import ExperimentConfig, ScoreConfig, absolute_local_paths, replace
from segrl.engine.train import (
    METRICS_FILE,
    SNAPSHOT_DIR,
    TrainSummary,
    preflight,
    record_config,
    run_store,
    train,
)
from segrl.storage import ArtifactStore

STATE_FILE = "self_training.json"
POOL_FILE = "unlabeled_pool.parquet"


@dataclass(frozen=True)
class SelfTrainingSummary:
    run_uri: str
    metrics: dict[str, Any]
    stages: dict[str, Any]


def rank_by_stability(ids: list[str], stability: list[float]) -> list[str]:
    """Ids most stable first (ties by id), the order ST++ splits reliable from unreliable."""
    return [i for _, i in sorted(zip((-s for s in stability), ids, strict=True))]


def split_reliable(ranked_ids: list[str], ratio: float) -> tuple[list[str], list[str]]:
    """(reliable, unreliable): the first ``ratio`` share of ``ranked_ids`` (at least one)."""
    count = max(1, round(len(ranked_ids) * ratio))
    return ranked_ids[:count], ranked_ids[count:]


def stage_config(cfg: ExperimentConfig, stage: str, **changes: Any) -> ExperimentConfig:
    """The config of one stage: a child run ``<run>/<stage>`` with ``changes`` applied."""
    parent = run_store(cfg)
    return replace(cfg, **{"run": stage, "store.root": parent.uri(), **changes})


def run_self_training(cfg: ExperimentConfig) -> SelfTrainingSummary:
    """Run ST (``method.name: st``) or ST++ (``st_pp``) end to end; see the module doc."""
    cfg = absolute_local_paths(cfg)
    plus = cfg.method.name == "st_pp"
    preflight(replace(cfg, **{"method.name": "supervised"}))
    store = run_store(cfg)
    record_config(store, cfg)
    state = store.read_json(STATE_FILE) if store.exists(STATE_FILE) else {"stages": {}}
    stages: dict[str, Any] = state["stages"]

    def finish(name: str, result: dict[str, Any]) -> None:
        stages[name] = result
        store.write_json(STATE_FILE, state)

    def trained(name: str, **changes: Any) -> dict[str, Any]:
        if name not in stages:
            started = time.perf_counter()
            summary: TrainSummary = train(stage_config(cfg, name, **changes))
            finish(name, {"run": summary.run_uri, "val_miou": summary.metrics.get("val_miou"),
                          "steps": summary.metrics.get("step"), "seconds": time.perf_counter() - started})
        return stages[name]

    teacher = trained("teacher", **{"method.name": "supervised",
                                    "train.snapshots": cfg.method.checkpoints_k if plus else 1})
    pool_uri = _write_unlabeled_pool(cfg, store)
    labels = _pseudo_label(cfg, store, "teacher", teacher["run"], pool_uri, stages, finish)
    if not plus:
        _write_pseudo_manifest(store, "pseudo_student.parquet", labels)
        final = trained("student", **_student_changes(store, "pseudo_student.parquet"))
    else:
        if "split" not in stages:
            scores = store.read_table("pseudo/teacher/scores.parquet")
            ranked = rank_by_stability(scores.column("id").to_pylist(), scores.column("stability").to_pylist())
            reliable, unreliable = split_reliable(ranked, cfg.method.reliable_ratio)
            store.write_text("reliable_ids.txt", "".join(f"{i}\n" for i in reliable))
            store.write_text("unreliable_ids.txt", "".join(f"{i}\n" for i in unreliable))
            finish("split", {"reliable": len(reliable), "unreliable": len(unreliable)})
        reliable = store.read_text("reliable_ids.txt").split()
        unreliable = store.read_text("unreliable_ids.txt").split()
        _write_pseudo_manifest(store, "pseudo_student1.parquet", {i: labels[i] for i in reliable})
        student1 = trained("student1", **_student_changes(store, "pseudo_student1.parquet", snapshots=1))
        merged = {i: labels[i] for i in reliable}
        if unreliable:
            pool2 = _write_pool(store, "unreliable_pool.parquet", _pool_rows(store, POOL_FILE, set(unreliable)))
            relabeled = _pseudo_label(cfg, store, "student1", student1["run"], pool2, stages, finish)
            merged.update(relabeled)
        _write_pseudo_manifest(store, "pseudo_student2.parquet", merged)
        final = trained("student2", **_student_changes(store, "pseudo_student2.parquet"))
    metrics = _stage_metrics(store, final["run"].rstrip("/").rsplit("/", 1)[-1])
    metrics["stages"] = stages
    store.write_json(METRICS_FILE, metrics)
    if "table" in metrics:
        store.write_text("metrics.md", metrics["table"] + "\n")
    return SelfTrainingSummary(run_uri=store.uri(), metrics=metrics, stages=stages)


def _student_changes(store: ArtifactStore, manifest: str, snapshots: int = 0) -> dict[str, Any]:
    return {"method.name": "pseudo_label", "data.pseudo_manifest": store.uri(manifest),
            "train.snapshots": snapshots}


def _stage_metrics(store: ArtifactStore, stage: str) -> dict[str, Any]:
    return dict(store.read_json(f"{stage}/{METRICS_FILE}"))


def _write_unlabeled_pool(cfg: ExperimentConfig, store: ArtifactStore) -> str:
    """The run's unlabeled images as a pool manifest (id, image_uri) for the scoring job."""
    from segrl.data.build import build_training_sets
    from segrl.data.pool_dataset import dataset_frames

    if not store.exists(POOL_FILE):
        sets = build_training_sets(cfg.data, cfg.train.seed, cfg.store.endpoint_url)
        if sets.unlabeled is None:
            from segrl.config import ConfigError

            raise ConfigError(
                f"method.name '{cfg.method.name}' needs unlabeled images: set data.labeled_count, "
                "data.labeled_ids, data.unlabeled_pool, data.target_prefixes or (synthetic) "
                "data.synthetic_unlabeled_images"
            )
        _write_pool(store, POOL_FILE, dataset_frames(sets.unlabeled))
    return store.uri(POOL_FILE)


def _write_pool(store: ArtifactStore, key: str, frames: list[tuple[str, str]]) -> str:
    table = pa.table({"id": [f[0] for f in frames], "image_uri": [f[1] for f in frames]})
    store.write_table(key, table)
    return store.uri(key)


def _pool_rows(store: ArtifactStore, key: str, keep: set[str]) -> list[tuple[str, str]]:
    table = store.read_table(key)
    return [(i, u) for i, u in zip(table.column("id").to_pylist(), table.column("image_uri").to_pylist(),
                                   strict=True) if i in keep]


def _pseudo_label(cfg: ExperimentConfig, store: ArtifactStore, stage: str, stage_run: str, pool_uri: str,
                  stages: dict[str, Any], finish: Any) -> dict[str, tuple[str, str]]:
    """Score ``pool_uri`` with the stage's snapshots (Ray Data); id -> (image, pseudo label)."""
    from segrl.engine.score import score_pool

    name = f"pseudo_{stage}"
    out = store.uri(f"pseudo/{stage}")
    if name not in stages:
        score_cfg = ScoreConfig(
            name=name, pool=pool_uri, checkpoints=f"{stage_run.rstrip('/')}/{SNAPSHOT_DIR}", out=out,
            signals=("confidence", "stability"), pseudo_labels="all", store=cfg.store, compute=cfg.compute,
        )
        score_cfg.validate()
        summary = score_pool(score_cfg, progress=False)
        finish(name, {"scored": summary.scored, "errors": summary.errors, "seconds": summary.seconds})
    scores = store.read_table(f"pseudo/{stage}/scores.parquet")
    images = dict(_pool_rows(store, POOL_FILE, set(scores.column("id").to_pylist())))
    return {i: (images[i], label) for i, label in zip(scores.column("id").to_pylist(),
                                                      scores.column("pseudo_label").to_pylist(), strict=True)}


def _write_pseudo_manifest(store: ArtifactStore, key: str, labels: dict[str, tuple[str, str]]) -> None:
    ids = sorted(labels)
    table = pa.table({"id": ids, "image_uri": [labels[i][0] for i in ids], "label_uri": [labels[i][1] for i in ids]})
    store.write_table(key, table)
