"""Pool scoring on Ray Data: read each frame once, run K checkpoints, keep small rows.

Pipeline per wave of shards::

    pool batches (driver streams the manifest; ids + URIs only)
      -> ray.data.from_arrow_refs            one block per shard
      -> map_batches(decode_frames)          CPU tasks: fetch, decode, resize; bad files -> error rows
      -> map_batches(ScoreActor, ActorPoolStrategy)   K models per actor, every signal in one pass
      -> iter_batches on the driver          rows grouped by shard; a complete shard is committed

A shard (``shard_size`` consecutive pool rows) is committed by writing its parts under
``<out>/_work/`` and then a marker; a rerun after the driver died skips committed
shards. Rows are keyed by their pool position, so a task Ray retried after an actor was
lost cannot produce duplicate rows. When every shard is committed the parts are merged
(streaming) into ``scores.parquet``, ``errors.parquet`` and ``regions.parquet``, and
``score_summary.json`` is written last.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from segrl.config import ConfigError, ScoreConfig, absolute_local_path, replace, to_dict
from segrl.data.labels import DataError
from segrl.data.pool import (
    check_pool_ids,
    id_file_problem,
    largest_frame_decode_bytes,
    load_pool_frame,
)
from segrl.storage import DEFAULT_RETRY_SECONDS, ArtifactStore, open_store
from segrl.threads import ThreadGovernor

WORK = "_work"
SUMMARY = "score_summary.json"
FINGERPRINT_KEYS = ("pool", "checkpoints", "image_size", "signals", "top_q", "confidence_tau",
                    "region_size", "region_score", "regions_top_r", "shard_size", "pseudo_labels")
SHARDS_PER_WAVE = 32


@dataclass(frozen=True)
class ScoreSummary:
    out_uri: str
    scores_uri: str
    errors_uri: str
    regions_uri: str | None
    scored: int
    errors: int
    shards_scored_now: int
    shards_skipped: int
    seconds: float
    steady_frames_per_s: float | None  # frames/s between the first and the last commit


# --------------------------------------------------------------------------- CPU stage


def decode_frames(
    batch: pa.Table, size: tuple[int, int], endpoint_url: str | None, retry_seconds: float = DEFAULT_RETRY_SECONDS
) -> dict[str, Any]:
    """Fetch, decode and resize a batch of pool rows; unreadable frames become error rows (an
    unreachable S3 endpoint after ``retry_seconds`` of tries too, the way the store retries).

    Returns numpy columns: image N x H x W x 3 uint8 (zeros for errors), original size
    N x 2, error (empty string when fine), plus the id/uri/shard/row columns.
    """
    h, w = size
    n = batch.num_rows
    images = np.zeros((n, h, w, 3), dtype=np.uint8)
    original = np.zeros((n, 2), dtype=np.int32)
    errors = np.array([""] * n, dtype=object)
    for i, uri in enumerate(batch.column("image_uri").to_pylist()):
        try:
            frame, original[i] = load_pool_frame(uri, endpoint_url, size, retry_seconds)  # large files decode smaller
        except DataError as exc:
            errors[i] = str(exc)
            continue
        images[i] = frame if frame.shape[:2] == (h, w) else _resize_frame(frame, (h, w))
    return {
        "id": np.array(batch.column("id").to_pylist(), dtype=object),
        "image_uri": np.array(batch.column("image_uri").to_pylist(), dtype=object),
        "shard": batch.column("shard").to_numpy(),
        "row": batch.column("row").to_numpy(),
        "image": images,
        "original_size": original,
        "error": errors,
    }



def _resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear, antialiased resize of an H x W x 3 uint8 frame to ``size``."""
    # torch only here: a decode task of a pool already at the model's size never imports it,
    # which saves each task process seconds of CPU
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

# --------------------------------------------------------------------------- model stage


class ScoreActor:
    """A Ray Data actor holding all K checkpoints (loaded once per actor)."""

    def __init__(self, config: dict[str, Any], info: dict[str, Any], threads: int, pseudo_ids: list[str]):
        import torch

        from segrl.config import from_dict
        from segrl.scoring import CheckpointInfo, PoolScorer

        cfg = from_dict(ScoreConfig, config)
        info_obj = CheckpointInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in info.items()})
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out = open_store(cfg.out, cfg.store.endpoint_url or None) if (cfg.pseudo_labels) else None
        # at most the CPUs the actor was granted, fewer while the machine is busy elsewhere
        self.threads = ThreadGovernor(threads, torch.set_num_threads)
        self.scorer = PoolScorer(cfg, info_obj, device, frozenset(pseudo_ids), out)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.threads.step()
        batch = {**batch, "error": self._pseudo_label_errors(batch["id"], batch["error"])}
        ok = batch["error"] == ""
        n = len(ok)
        columns: dict[str, Any] = {
            "id": pa.array([str(v) for v in batch["id"]], pa.string()),
            "image_uri": pa.array([str(v) for v in batch["image_uri"]], pa.string()),
            "shard": pa.array(batch["shard"].astype(np.int64)),
            "row": pa.array(batch["row"].astype(np.int64)),
            "error": pa.array([str(v) for v in batch["error"]], pa.string()),
            "height": pa.array(batch["original_size"][:, 0].astype(np.int64)),
            "width": pa.array(batch["original_size"][:, 1].astype(np.int64)),
        }
        if ok.any():
            ids = [str(i) for i in batch["id"][ok]]
            scored = self.scorer.score(batch["image"][ok], ids, batch["original_size"][ok])
            for name, values in scored.items():
                full = np.zeros((n, *values.shape[1:]), dtype=values.dtype)
                if values.dtype.kind == "f":
                    full[:] = np.nan
                full[ok] = values
                columns[name] = _arrow_column(full)
        # Arrow tables, not numpy tensor columns: small fixed-size lists travel and
        # concatenate reliably, and the driver never needs numpy tensor extensions.
        return pa.table(columns)

    def _pseudo_label_errors(self, ids: np.ndarray, errors: np.ndarray) -> np.ndarray:
        """``errors`` plus a reason for each frame whose pseudo label would be written
        outside the output folder (an id like ``../x``): that frame, not the job, fails."""
        scorer = self.scorer
        if scorer.out_store is None:
            return errors
        errors = errors.copy()
        for i, sample_id in enumerate(ids):
            wanted = scorer.pseudo_all or str(sample_id) in scorer.pseudo_ids
            if wanted and not errors[i]:
                errors[i] = id_file_problem(str(sample_id))
        return errors


def _arrow_column(values: np.ndarray) -> pa.Array:
    """A numpy column (N or N x ...) as an Arrow array (fixed-size list for extra dims)."""
    if values.dtype == object:
        return pa.array([str(v) for v in values], pa.string())
    if values.ndim == 1:
        return pa.array(values)
    width = int(np.prod(values.shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


# --------------------------------------------------------------------------- resources


def decode_task_memory(
    batch_size: int, size: tuple[int, int], requested_mb: int, largest_node_memory: float
) -> int:
    """Bytes of Ray memory one decode task reserves, so that Ray runs no more decode tasks on a
    node than its memory holds: the largest frame PIL accepts, decoding, plus the batch it
    returns (``batch_size`` frames of ``size``), or ``decode_memory_mb`` when set. A derived
    budget is capped at the largest node's memory so that a task can always be placed (an
    uncapped one would wait forever); a requested one that no node has is an error."""
    h, w = size
    if requested_mb:
        wanted = requested_mb * 2**20
        if largest_node_memory and wanted > largest_node_memory:
            raise ConfigError(
                f"config field 'decode_memory_mb' = {requested_mb} is more than any node has "
                f"({largest_node_memory / 2**20:.0f} MiB of Ray memory): no decode task could run"
            )
        return wanted
    derived = largest_frame_decode_bytes() + batch_size * h * w * 3
    return int(min(derived, largest_node_memory)) if largest_node_memory else derived


def plan_resources(cfg: ScoreConfig, use_gpu: bool, size: tuple[int, int]) -> dict[str, Any]:
    """Actor count, CPUs and memory per actor and per decode task, threads and batch size.

    On a small CPU machine the actors must leave CPU for the decode tasks, or the
    pipeline starves its own input and hangs; so CPU requests are fractional, an actor
    never asks for more than one node has, and the pool is sized from what the
    cluster has.
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in alive]
    largest_memory = max((n["Resources"].get("memory", 0.0) for n in alive), default=0.0)
    total_cpu = float(sum(node_cpus)) or 1.0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    decode_cpus = 0.25
    reserve = 2 * decode_cpus  # two decode tasks can always run beside the actors
    if use_gpu:
        actors = cfg.actors or max(1, gpus)
        # A GPU actor mostly waits on the device; it needs a CPU share, not whole cores.
        cpus_per_actor = cfg.cpus_per_actor or min(1.0, max((total_cpu - reserve) / actors, 0.25))
    else:
        cpus_per_actor = cfg.cpus_per_actor or min(0.75 * max(node_cpus, default=1.0), 4.0)
        actors = cfg.actors or max(1, sum(int(c // cpus_per_actor) for c in node_cpus))
        while not cfg.actors and actors > 1 and actors * cpus_per_actor + reserve > total_cpu:
            actors -= 1
    if actors * cpus_per_actor + decode_cpus > total_cpu + 1e-9:
        raise ConfigError(
            f"config fields 'actors' = {actors} x 'cpus_per_actor' = {cpus_per_actor} leave no CPU "
            f"for decoding on a cluster with {total_cpu:g} CPUs; lower one of them"
        )
    threads = max(1, math.ceil(cpus_per_actor))
    batch_size = cfg.batch_size or (64 if use_gpu else 16)
    return {"actors": actors, "cpus_per_actor": cpus_per_actor, "decode_cpus": decode_cpus,
            "decode_memory": decode_task_memory(batch_size, size, cfg.decode_memory_mb, largest_memory),
            "threads": threads, "batch_size": batch_size, "gpus_per_actor": 1 if use_gpu else 0}


# --------------------------------------------------------------------------- shards


def _shard_key(kind: str, shard: int) -> str:
    return f"{WORK}/{kind}/{shard:06d}.parquet"


def _marker(shard: int) -> str:
    return f"{WORK}/shards/{shard:06d}.done"


def iter_shards(cfg: ScoreConfig) -> Iterator[tuple[int, pa.Table]]:
    """(shard index, table of id/image_uri/shard/row) over the pool, streaming."""
    from segrl.data.pool import iter_pool_batches

    position = 0
    for index, batch in enumerate(iter_pool_batches(cfg.pool, cfg.shard_size, cfg.store.endpoint_url or None)):
        n = batch.num_rows
        table = pa.Table.from_batches([batch])
        table = table.append_column("shard", pa.array(np.full(n, index, dtype=np.int64)))
        table = table.append_column("row", pa.array(np.arange(position, position + n, dtype=np.int64)))
        position += n
        yield index, table


def _rows_to_tables(parts: list[pa.Table], regions_top_r: int) -> dict[str, pa.Table]:
    """Split the actor outputs of one shard into scores / errors / regions tables."""
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("row")
    rows = table.column("row").to_numpy()
    _, first = np.unique(rows, return_index=True)  # a retried task cannot duplicate a row
    table = table.take(pa.array(first))
    bad = pa.compute.not_equal(table.column("error"), "")
    errors = table.filter(bad).select(["id", "image_uri", "row", "error"]).rename_columns(
        ["id", "image_uri", "row", "reason"]
    )
    good = table.filter(pa.compute.invert(bad))
    scores = good.drop_columns(
        [c for c in ("shard", "error", "region_boxes", "region_scores") if c in good.column_names]
    )
    tables = {"scores": scores, "errors": errors}
    if regions_top_r and "region_scores" in good.column_names and good.num_rows:
        n, r = good.num_rows, regions_top_r
        boxes = good.column("region_boxes").combine_chunks().flatten().to_numpy().reshape(n, r, 4)
        region_scores = good.column("region_scores").combine_chunks().flatten().to_numpy().reshape(n, r)
        keep = region_scores.reshape(-1) >= 0
        image_index = np.repeat(np.arange(n), r)[keep]
        flat_boxes = boxes.reshape(-1, 4)[keep]
        tables["regions"] = pa.table({
            "id": good.column("id").take(pa.array(image_index)),
            "row": good.column("row").take(pa.array(image_index)),
            "rank": pa.array(np.tile(np.arange(r), n)[keep].astype(np.int32)),
            "y0": pa.array(flat_boxes[:, 0]), "x0": pa.array(flat_boxes[:, 1]),
            "y1": pa.array(flat_boxes[:, 2]), "x1": pa.array(flat_boxes[:, 3]),
            "score": pa.array(region_scores.reshape(-1)[keep].astype(np.float64)),
        })
    return tables


def _commit_shard(store: ArtifactStore, shard: int, tables: dict[str, pa.Table]) -> None:
    for kind, table in tables.items():
        store.write_table(_shard_key(kind, shard), table)
    store.write_json(_marker(shard), {kind: t.num_rows for kind, t in tables.items()})


def _merge(store: ArtifactStore, kind: str, shards: list[int], final_key: str) -> int:
    """Stream the committed parts of ``kind`` into one Parquet file; returns its row count."""
    rows, writer = 0, None
    with store.open_output(final_key) as out:
        try:
            for shard in shards:
                key = _shard_key(kind, shard)
                if not store.exists(key):
                    continue
                table = store.read_table(key)
                if table.num_rows == 0:  # a shard of only unreadable frames has no score columns
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:  # no part at all (e.g. no errors): an empty table
                pq.write_table(_EMPTY[kind], out)
        finally:
            if writer is not None:
                writer.close()
    return rows


_EMPTY = {
    "errors": pa.table({"id": pa.array([], pa.string()), "image_uri": pa.array([], pa.string()),
                        "row": pa.array([], pa.int64()), "reason": pa.array([], pa.string())}),
    "scores": pa.table({"id": pa.array([], pa.string())}),
    "regions": pa.table({"id": pa.array([], pa.string())}),
}


# --------------------------------------------------------------------------- the job


def _absolute(cfg: ScoreConfig) -> ScoreConfig:
    """Local relative paths resolved where the user typed them (actors run elsewhere)."""
    pseudo = cfg.pseudo_labels
    return replace(cfg, pool=absolute_local_path(cfg.pool), checkpoints=absolute_local_path(cfg.checkpoints),
                   out=absolute_local_path(cfg.out),
                   pseudo_labels=pseudo if pseudo in ("", "all") else absolute_local_path(pseudo))


def _check_fingerprint(store: ArtifactStore, cfg: ScoreConfig) -> None:
    """Refuse to mix shards scored with different settings in one output folder."""
    mine = {k: v for k, v in to_dict(cfg).items() if k in FINGERPRINT_KEYS}
    key = f"{WORK}/fingerprint.json"
    if not store.exists(key):
        store.write_json(key, mine)
        return
    saved = store.read_json(key)
    for name in FINGERPRINT_KEYS:
        if saved.get(name) != mine.get(name):
            raise ConfigError(
                f"{store.uri()} holds scores made with '{name}' = {saved.get(name)!r}, now "
                f"{mine.get(name)!r}: use another 'out' folder or the saved value"
            )


def _pseudo_ids(cfg: ScoreConfig) -> list[str]:
    if cfg.pseudo_labels in ("", "all"):
        return []
    from segrl.data.manifest import read_bytes

    return [line.strip() for line in read_bytes(cfg.pseudo_labels, cfg.store.endpoint_url or None)
            .decode().splitlines() if line.strip()]


def score_pool(cfg: ScoreConfig, progress: bool = True) -> ScoreSummary:
    """Score every frame of ``cfg.pool`` with the checkpoints; write the tables to ``cfg.out``."""
    import ray

    from segrl.engine.train import ensure_ray, resolve_use_gpu
    from segrl.scoring import inspect_checkpoints, resolve_image_size

    started = time.perf_counter()
    cfg = _absolute(cfg)
    endpoint = cfg.store.endpoint_url or None
    store = open_store(cfg.out, endpoint, retry_seconds=cfg.store.retry_seconds)
    info = inspect_checkpoints(cfg.checkpoints, endpoint)
    size = resolve_image_size(cfg, info)
    pseudo_ids = _pseudo_ids(cfg)
    check_pool_ids(cfg.pool, endpoint)  # repeated ids: refused before anything is written
    _check_fingerprint(store, cfg)
    ensure_ray(cfg.compute)
    use_gpu = resolve_use_gpu(cfg.compute)
    plan = plan_resources(cfg, use_gpu, size)

    done_before = {int(k.rsplit("/", 1)[-1].split(".")[0]) for k in store.list(f"{WORK}/shards")}
    all_shards: list[int] = []
    pending: list[tuple[int, pa.Table]] = []
    scored_now = 0
    commits: list[tuple[float, int]] = []  # (time, frames) of each shard committed now

    def run_wave(wave: list[tuple[int, pa.Table]]) -> None:
        nonlocal scored_now
        expected = {index: table.num_rows for index, table in wave}
        buffers: dict[int, list[pa.Table]] = {index: [] for index in expected}
        seen: dict[int, set[int]] = {index: set() for index in expected}
        refs = [ray.put(table) for _, table in wave]
        ds = ray.data.from_arrow_refs(refs)
        ds = ds.map_batches(
            decode_frames,
            fn_kwargs={"size": size, "endpoint_url": endpoint, "retry_seconds": cfg.store.retry_seconds},
            batch_size=plan["batch_size"], batch_format="pyarrow", num_cpus=plan["decode_cpus"],
            memory=plan["decode_memory"],  # a node runs no more decodes than its memory holds
        )
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={
                "config": to_dict(cfg),
                "info": {"uris": list(info.uris), "arch": info.arch, "classes": list(info.classes),
                         "image_size": list(info.image_size) if info.image_size else None},
                "threads": plan["threads"], "pseudo_ids": pseudo_ids,
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan["actors"]),
            batch_size=plan["batch_size"], batch_format="numpy",
            num_cpus=plan["cpus_per_actor"], num_gpus=plan["gpus_per_actor"],
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            shards = batch.column("shard").to_numpy()
            for shard in np.unique(shards):
                part = batch.filter(pa.array(shards == shard))
                shard = int(shard)
                buffers[shard].append(part)
                seen[shard].update(part.column("row").to_pylist())
                if len(seen[shard]) == expected[shard]:
                    tables = _rows_to_tables(buffers.pop(shard), cfg.regions_top_r)
                    _commit_shard(store, shard, tables)
                    commits.append((time.perf_counter(), expected[shard]))
                    scored_now += 1
                    if progress:
                        print(f"[segrl] shard {shard} committed ({expected[shard]} frames)", flush=True)
        missing = sorted(buffers)
        if missing:
            raise RuntimeError(f"scoring ended without all rows of shard(s) {missing}")

    for index, table in iter_shards(cfg):
        all_shards.append(index)
        if index in done_before:
            continue
        pending.append((index, table))
        if len(pending) == SHARDS_PER_WAVE:
            run_wave(pending)
            pending = []
    if pending:
        run_wave(pending)

    scored = _merge(store, "scores", all_shards, "scores.parquet")
    errors = _merge(store, "errors", all_shards, "errors.parquet")
    regions_uri = None
    if cfg.regions_top_r:
        _merge(store, "regions", all_shards, "regions.parquet")
        regions_uri = store.uri("regions.parquet")
    seconds = time.perf_counter() - started
    steady = None
    if len(commits) >= 2 and commits[-1][0] > commits[0][0]:
        steady = sum(n for _, n in commits[1:]) / (commits[-1][0] - commits[0][0])
    summary = ScoreSummary(
        out_uri=store.uri(), scores_uri=store.uri("scores.parquet"), errors_uri=store.uri("errors.parquet"),
        regions_uri=regions_uri, scored=scored, errors=errors, shards_scored_now=scored_now,
        shards_skipped=len(all_shards) - scored_now, seconds=seconds, steady_frames_per_s=steady,
    )
    store.write_json(SUMMARY, {**summary.__dict__, "checkpoints": list(info.uris), "classes": list(info.classes),
                               "image_size": list(size), "resources": plan})
    return summary
