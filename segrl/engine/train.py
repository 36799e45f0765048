"""Supervised training on Ray Train (DDP: gloo on CPU, nccl on GPU).

Layout in the store, under ``<store.root>/<run>/``::

    config.yaml              the resolved config (written once, before training)
    train/ckpt_<step>/       Ray Train checkpoints: checkpoint.pt (model, optimiser, step, config)
    metrics.json             final val mIoU, per-class IoU and per-epoch history
    metrics.md               the per-class IoU table

Rerunning the same run name resumes from the newest complete checkpoint in ``train/``
(newer than Ray Train's run snapshot, which lags the reported checkpoints when the
driver is killed), with every rank's random streams, so that the resumed run trains as
the uninterrupted one would have; a worker lost mid-run is replaced and restored from
the last checkpoint (``FailureConfig``). Checkpoints beyond ``train.keep_checkpoints``
that Ray Train does not track (a killed run's) are deleted before and after training.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from segrl.config import (
    ComputeConfig,
    ConfigError,
    ExperimentConfig,
    MethodConfig,
    absolute_local_paths,
    config_from_dict,
    to_dict,
)
from segrl.console import (
    hide_ray_info_on_console,
    init_ray_quietly,
    quiet_cluster_env,
    say,
    train_logging_config,
    verbose,
)
from segrl.storage import ArtifactStore, open_store
from segrl.threads import ThreadGovernor, granted_threads
from segrl.training import (
    CHECKPOINT_FILE,
    CHECKPOINT_PREFIX,
    COMPLETE_FILE,
    TRAIN_DIR,
    checkpoint_step,
    generator_states,
    is_complete_checkpoint,
    rng_state,
    save_training_state,
    set_generator_states,
    set_rng_state,
)

if TYPE_CHECKING:  # the data modules import torchvision: Ray Train's controller, which loads this module, needs none
    from segrl.data.build import TrainingSets

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
LABELED_IDS_FILE = "labeled_ids.txt"
TARGET_EVAL_IDS_FILE = "target_eval_ids.txt"
SNAPSHOT_DIR = "snapshots"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of checkpoints it tracks
STEPS_EPOCHS = 5  # epochs of a train.steps run, when the labeled set is small
# Changing these on a rerun does not invalidate the checkpoints being resumed.
# Ray Train settings for a cluster of this machine alone (set unless the user set them):
# - the controller advances one state per health check (2 s by default), which costs a short
#   loop round several seconds per training run;
# - the preemption watcher (one more actor process per run) waits for cloud nodes to be
#   drained, which a single machine never is;
# - Ray runs its worker processes at niceness 15, so any ordinary busy process on the machine
#   takes their cores: beside two busy single-threaded processes on 2 cores, a Ray Train worker
#   group took 257 s to start and the quick start trained at 1.2 images/s (40 idle). At 0 the
#   training worker gets its fair share, and segrl/threads.py sizes its threads to that share.
LOCAL_CLUSTER_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_worker_niceness": "0",
}
# Ray turns a node address of 127.0.0.1 (ray.init(_node_ip_address=...), ray start
# --node-ip-address) into the machine's outward address, and its GCS, raylet, workers and
# agents then listen on every interface. With this setting (Ray's single-machine mode, the
# default on macOS and Windows) the node's address is 127.0.0.1 and they listen there only;
# such a cluster takes no other nodes, which a cluster of this machine alone never needs.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's state API clients find the dashboard
# An epoch's history keys that depend on the clock and the machine's load, not on what was
# learned: a resumed or disturbed run equals an undisturbed one in every other key.
CLOCK_KEYS = ("images_per_s", "eval_s", "previous_checkpoint_s", "threads")


def without_clock(history: list[dict]) -> list[dict]:
    """Each epoch's record without its :data:`CLOCK_KEYS`."""
    return [{k: v for k, v in epoch.items() if k not in CLOCK_KEYS} for epoch in history]


# store.root: where the run lives, not what it computes, so a run folder can be moved or copied;
# data.cache_bytes and store.retry_seconds change speed and patience, not results; streaming
# changes speed and which unlabeled batches a resumed run draws (segrl.data.stream); loader
# processes change speed and the augmentation streams, not their distribution
RESUMABLE_CHANGES = ("train.epochs", "train.steps", "al.rounds", "train.log_every_steps", "train.eval_every_epochs",
                     "store.root", "data.cache_bytes", "store.retry_seconds", "compute.adapt_threads",
                     "data.stream_unlabeled", "data.stream_decode_cpus", "data.loader_workers")


@dataclass(frozen=True)
class TrainSummary:
    run_uri: str
    checkpoint_uri: str
    metrics: dict[str, Any]


def run_store(cfg: ExperimentConfig) -> ArtifactStore:
    """The store rooted at this run's folder."""
    store = open_store(cfg.store.root, cfg.store.endpoint_url or None, cfg.store.region or None,
                       cfg.store.retry_seconds)
    return store.child(cfg.run_name)


def use_local_cluster_env() -> None:
    """:data:`LOCAL_CLUSTER_ENV` in this process's environment, where not set already, so that
    every process of a local cluster started from here inherits it."""
    for name, value in {**LOCAL_CLUSTER_ENV, **quiet_cluster_env()}.items():
        os.environ.setdefault(name, value)


def ensure_ray(compute: ComputeConfig) -> None:
    """Connect to the configured cluster, or start a local one, once per process."""
    import ray

    if ray.is_initialized():
        return
    # "local" starts a fresh cluster rather than joining whichever one happens to run here;
    # `ray job submit` sets RAY_ADDRESS for the driver, which then joins its cluster.
    address = compute.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local" or is_loopback_address(address):
        # a driver joining a cluster on 127.0.0.1 (cluster/local_up.sh's) must take that
        # address too: Ray would otherwise look for the GCS at the machine's outward address
        listen_on_loopback_only()
    if address != "local":
        init_ray_quietly(address)
        return
    use_local_cluster_env()
    port = free_loopback_port()
    with own_dashboard_env(port):
        init_ray_quietly(address, dashboard_port=port)


@contextmanager
def own_dashboard_env(port: int) -> Iterator[None]:
    """``RAY_API_SERVER_ADDRESS`` naming the dashboard at ``port`` while a local cluster starts,
    so that every process of that cluster inherits it; this process's own value is restored.

    Ray Train's placement-group cleaner asks the state API whether the run's controller is
    alive, and without an address it looks for "the" Ray instance of the machine: beside
    another cluster (a second job, a benchmark) it finds two, and its thread dies printing a
    ConnectionError traceback into every training run's console. The driver keeps its own
    value: it may talk to another cluster after this one.
    """
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous


# Ports for a local cluster's dashboard and the like: above Ray's worker ports (10002-19999)
# and below Linux's ephemeral range, from which every outgoing connection and every port-0
# listener (Ray's own gRPC servers) draws, so that no other process takes the one picked
# before its server binds it.
QUIET_PORTS = (20000, 32767)


def free_loopback_port(quiet: tuple[int, int] = QUIET_PORTS) -> int:
    """A port that is free on 127.0.0.1 right now, from ``quiet`` where that lies below the
    system's ephemeral ports (else one the system picks)."""
    low, high = quiet[0], min(quiet[1], ephemeral_ports()[0] - 1)
    for port in random.Random().sample(range(low, high + 1), min(64, max(high - low + 1, 0))):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ephemeral_ports() -> tuple[int, int]:
    """The system's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (``127.0.0.1:6379``, ``http://localhost:8265``) names this machine's
    loopback interface."""
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_on_loopback_only() -> None:
    """Make the local cluster this process is about to start listen on 127.0.0.1 only
    (``LOOPBACK_ENV``): its processes read the setting from the environment, this driver
    from the Ray constant it read when Ray was first imported."""
    from ray._private import ray_constants

    for name, value in LOOPBACK_ENV.items():
        os.environ.setdefault(name, value)
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")


def resolve_use_gpu(compute: ComputeConfig) -> bool:
    import ray

    if compute.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return compute.use_gpu == "true"


def record_config(store: ArtifactStore, cfg: ExperimentConfig) -> None:
    """Save the resolved config, or check that a rerun is compatible with the saved one."""
    resolved = to_dict(cfg)
    if not store.exists(CONFIG_FILE):
        store.write_yaml(CONFIG_FILE, resolved)
        return
    saved = store.read_yaml(CONFIG_FILE)
    # where it runs and what its review page shows never change a run's results
    changed = [k for k in _diff_keys(saved, resolved) if k.split(".")[0] not in ("compute", "report")]
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        key = blocking[0]
        raise ConfigError(
            f"run '{cfg.run_name}' at {store.uri()} was started with a different config: "
            f"'{key}' was {_lookup(saved, key)!r}, now {_lookup(resolved, key)!r}. "
            "Use a new run name (run=...) or the saved values."
        )
    if changed:
        store.write_yaml(CONFIG_FILE, resolved)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def train(cfg: ExperimentConfig, callbacks: list[Any] | None = None) -> TrainSummary:
    """Train ``cfg``'s model on Ray Train and write checkpoints and metrics to the store.

    ``callbacks`` are Ray Train user callbacks, e.g. Tune's ``TuneReportCallback`` when a
    sweep trial drives this run.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = absolute_local_paths(cfg)
    sets = checked_sets(cfg)
    store = run_store(cfg)
    record_config(store, cfg)
    for name, ids in recorded_splits(sets).items():
        # The fixed splits of this run (labeled ids, held-out target), for reproduction.
        store.write_text(name, "\n".join(ids) + "\n")
    ensure_ray(cfg.compute)
    use_gpu = resolve_use_gpu(cfg.compute)
    streams = unlabeled_stream(cfg, sets)
    prune_checkpoints(store, cfg.train.keep_checkpoints)
    newest = complete_checkpoints(store)[:1]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "verbose": verbose(), "resume_checkpoint": "".join(newest),
                           "streamed_unlabeled": bool(streams)},
        datasets=streams or None,  # each worker reads its split with ray.train.get_dataset_shard
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.compute.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.compute.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN_DIR,
            storage_path=store.fs_path(),
            storage_filesystem=store.ray_filesystem,  # retries a store outage as segrl does
            failure_config=ray.train.FailureConfig(max_failures=cfg.compute.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or None,
            logging_config=train_logging_config(),
        ),
    )
    result = trainer.fit()
    # the newest complete checkpoint rather than result.checkpoint: a rerun that restored a
    # checkpoint Ray Train had not registered yet and had nothing left to train reports none
    newest = complete_checkpoints(store)[:1]
    final = stored_checkpoint(store, newest[0]) if newest else result.checkpoint  # (or one of an older segrl)
    if final is None:
        raise RuntimeError(f"training of run '{cfg.run_name}' ended without a checkpoint")
    prune_checkpoints(store, cfg.train.keep_checkpoints)
    checkpoint_uri = store.uri(f"{TRAIN_DIR}/{os.path.basename(final.path)}")
    metrics = final_metrics(final)
    finished_before = metrics.get("start_step") == metrics.get("step") and store.exists(METRICS_FILE)
    if not finished_before:  # a rerun of a finished run trains nothing and rewrites nothing
        store.write_json(METRICS_FILE, metrics)
        if "table" in metrics:
            store.write_text("metrics.md", metrics["table"] + "\n")
    return TrainSummary(run_uri=store.uri(), checkpoint_uri=checkpoint_uri, metrics=metrics)


def preflight(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Fail on the driver, before anything is written, on what is cheap to check
    (:func:`checked_sets`). Returns the id lists to record in the run (drawn splits,
    held-out target frames)."""
    return recorded_splits(checked_sets(cfg))


def unlabeled_stream(cfg: ExperimentConfig, sets: TrainingSets) -> dict[str, Any]:
    """``{UNLABELED_STREAM: Ray Data dataset}`` when the set the recipe draws unlabeled
    batches from is streamed (``data.stream_unlabeled``, :mod:`segrl.data.stream`), else ``{}``.
    Says which, once, for a run that draws unlabeled batches."""
    import ray

    from segrl.data.cache import frame_bytes, has_cacheable_stage
    from segrl.data.stream import UNLABELED_STREAM, frame_stream, plan_stream
    from segrl.methods.recipes import unlabeled_draws

    which = unlabeled_draws(cfg.method)
    source = getattr(sets, which) if which else None
    if not has_cacheable_stage(source):
        return {}
    # the worker's cache takes the labeled sets first (segrl.data.cache.cache_training_sets)
    cached_first = sum(frame_bytes(d) * len(d) for d in (sets.labeled, sets.target_labeled)
                       if has_cacheable_stage(d))
    plan = plan_stream(cfg.data.stream_unlabeled, len(source), frame_bytes(source),
                       cfg.data.cache_bytes - cached_first)
    say(plan.line(f"{which} set"))
    if not plan.stream:
        return {}
    spare = ray.cluster_resources().get("CPU", 0.0) - cfg.compute.num_workers * cfg.compute.cpus_per_worker
    if spare < cfg.data.stream_decode_cpus:
        raise ConfigError(
            f"streaming the {which} set needs {cfg.data.stream_decode_cpus:g} CPU (data.stream_decode_cpus) "
            f"beside the training workers, and the cluster has {spare:g} left: lower compute.num_workers or "
            "compute.cpus_per_worker, or set data.stream_unlabeled=never to decode in the workers")
    return {UNLABELED_STREAM: frame_stream(source, cfg.train.seed, cfg.data.stream_decode_cpus, verbose())}


def checked_sets(cfg: ExperimentConfig) -> TrainingSets:
    """Every training set of ``cfg``, checked on the driver before anything is written.

    Build every training set (missing root, images without labels, unknown ids), decode
    the first sample of each (unreadable files, label ids out of range), and build the
    model with its weights (a file of another architecture). Problems found later in
    the run (a corrupt frame deep in the set) fail the run with the same named errors.
    """
    from segrl.data.build import build_training_sets
    from segrl.models import build_model

    endpoint = cfg.store.endpoint_url or None
    sets = build_training_sets(cfg.data, cfg.train.seed, cfg.store.endpoint_url)
    for name in ("labeled", "val", "unlabeled", "target_labeled", "pseudo"):
        dataset = getattr(sets, name)
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise ConfigError(f"the {name} set of {cfg.data.dataset} at {cfg.data.root!r} is empty")
        dataset[0]
    build_model(cfg.model.arch, len(sets.classes), weights=cfg.model.weights or None, endpoint_url=endpoint)
    if cfg.train.resume_from:  # its model entry must fit the model, like a weights file
        build_model(cfg.model.arch, len(sets.classes), weights=cfg.train.resume_from, endpoint_url=endpoint)
    if cfg.method.teacher_weights:
        build_model(cfg.model.arch, len(sets.classes), weights=cfg.method.teacher_weights, endpoint_url=endpoint)
    return sets


def recorded_splits(sets: TrainingSets) -> dict[str, list[str]]:
    """The id lists a run records (drawn splits, held-out target frames), by file name."""
    recorded = {}
    if sets.labeled_ids is not None:
        recorded[LABELED_IDS_FILE] = sets.labeled_ids
    if sets.target_eval_ids is not None:
        recorded[TARGET_EVAL_IDS_FILE] = sets.target_eval_ids
    return recorded


def complete_checkpoints(store: ArtifactStore) -> list[str]:
    """Names of the run's complete checkpoint folders (``train/ckpt_<step>``), newest first."""
    complete = []
    for name in checkpoint_folders(store):
        key = f"{TRAIN_DIR}/{name}"
        marker = store.read_text(f"{key}/{COMPLETE_FILE}") if store.exists(f"{key}/{COMPLETE_FILE}") else None
        if is_complete_checkpoint(store.size(f"{key}/{CHECKPOINT_FILE}"), marker):
            complete.append(name)
    return complete


def checkpoint_folders(store: ArtifactStore) -> list[str]:
    """Names of every ``train/ckpt_<step>`` folder, complete or not, newest first."""
    names = [key.rsplit("/", 1)[-1] for key in store.list(TRAIN_DIR)]
    return sorted((n for n in names if checkpoint_step(n) is not None), key=checkpoint_step, reverse=True)


def ray_tracked_checkpoints(store: ArtifactStore) -> set[str]:
    """The checkpoints Ray Train's run snapshot lists: it refuses to resume if one is gone."""
    key = f"{TRAIN_DIR}/{RAY_SNAPSHOT_FILE}"
    if not store.exists(key):
        return set()
    snapshot = json.loads(store.read_text(key))
    results = [*snapshot.get("checkpoint_results", []), snapshot.get("latest_checkpoint_result") or {}]
    return {r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name")}


def checkpoints_to_delete(folders: list[str], complete: list[str], tracked: set[str], keep: int) -> list[str]:
    """Folders beyond the newest ``keep`` complete ones (incomplete ones included) that Ray
    Train does not track; Ray Train deletes its own beyond ``num_to_keep``."""
    kept = set(complete[:keep]) | tracked
    return [name for name in folders if name not in kept]


def prune_checkpoints(store: ArtifactStore, keep: int) -> None:
    for name in checkpoints_to_delete(checkpoint_folders(store), complete_checkpoints(store),
                                      ray_tracked_checkpoints(store), keep):
        store.delete(f"{TRAIN_DIR}/{name}")


def stored_checkpoint(store: ArtifactStore, name: str) -> Any:
    """The Ray Train ``Checkpoint`` of folder ``train/<name>`` in the store."""
    import ray.train

    return ray.train.Checkpoint(store.fs_path(f"{TRAIN_DIR}/{name}"), filesystem=store.ray_filesystem)


def checkpoint_to_restore(ray_checkpoint: Any, newest_complete: str, store: ArtifactStore) -> Any:
    """The later of Ray Train's checkpoint (its snapshot's, or this run's last after a lost
    worker) and the newest complete one the driver found in the run folder before training."""
    ray_step = checkpoint_step(os.path.basename(ray_checkpoint.path)) if ray_checkpoint is not None else None
    if newest_complete and (ray_step is None or checkpoint_step(newest_complete) > ray_step):
        return stored_checkpoint(store, newest_complete)
    return ray_checkpoint


def final_metrics(checkpoint: Any) -> dict[str, Any]:
    """The metrics saved inside the last checkpoint (history included)."""
    from segrl.training import load_training_state

    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
    return dict(state["metrics"], step=state["step"], epoch=state["epoch"])


# --------------------------------------------------------------------------- worker side


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: one DDP rank of training with the configured recipe."""
    import ray.train
    import ray.train.torch

    from segrl.data.build import build_training_sets
    from segrl.data.cache import cache_training_sets
    from segrl.data.stream import UNLABELED_STREAM, sample_kinds, shard_passes, streamed_batches
    from segrl.losses import inverse_sqrt_frequency_weights
    from segrl.methods.recipes import build_recipe
    from segrl.metrics import iou_per_class, mean_iou, pixel_accuracy
    from segrl.models import build_model
    from segrl.training import (
        ShardSampler,
        StepContext,
        amp_settings,
        build_optimizer,
        build_scheduler,
        continue_from,
        cycle_batches,
        evaluate_confusion,
        label_weights,
        labeled_sampler,
        load_training_state,
        make_loader,
        read_training_state,
        recipe_step,
        unwrap,
    )

    cfg = config_from_dict(loop_config["config"])
    if not loop_config.get("verbose"):
        hide_ray_info_on_console()
    tcfg = cfg.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    granted = ray.get_runtime_context().get_assigned_resources().get("CPU", cfg.compute.cpus_per_worker)
    threads = ThreadGovernor(granted_threads(cfg.compute.threads_per_worker, granted), torch.set_num_threads,
                             cfg.compute.adapt_threads)
    torch.manual_seed(tcfg.seed + rank)
    endpoint = cfg.store.endpoint_url

    sets = build_training_sets(cfg.data, tcfg.seed, endpoint)
    streamed = loop_config.get("streamed_unlabeled", False)
    for line in cache_training_sets(sets, cfg.data.cache_bytes, skip=("unlabeled", "pseudo") if streamed else ()):
        if rank == 0:
            say(line)
    classes = sets.classes
    ignore = sets.labeled.ignore_index
    n_source, n_target, n_unlabeled = batch_sizes(tcfg.batch_size, cfg.data.batch_ratio)
    train_sampler = labeled_sampler(sets.labeled, tcfg, rank, world, n_source)
    # Padding would count duplicated val images twice; unequal shards are fine for eval.
    val_sampler = ShardSampler(len(sets.val), rank, world, shuffle=False, pad=False)
    steps_per_epoch = len(train_sampler) // n_source
    if steps_per_epoch == 0:
        raise ConfigError(
            f"config field 'train.batch_size' = {tcfg.batch_size} is larger than the "
            f"{len(train_sampler)} labeled training images (or draws) each of {world} workers gets"
        )
    if tcfg.steps:
        # A small labeled set would make thousands of tiny epochs (an eval and a checkpoint
        # each): repeat it within an epoch instead, about STEPS_EPOCHS epochs per run.
        train_sampler.repeats = max(1, math.ceil(tcfg.steps / (STEPS_EPOCHS * steps_per_epoch)))
        steps_per_epoch = len(train_sampler) // n_source
    epochs, total_steps = plan_steps(tcfg.steps, tcfg.epochs, steps_per_epoch)

    model = build_model(cfg.model.arch, len(classes), weights=cfg.model.weights or None, endpoint_url=endpoint or None)
    model = ray.train.torch.prepare_model(model)
    counts = _class_counts(cfg, sets.labeled)
    class_weight = inverse_sqrt_frequency_weights(counts) if tcfg.class_weighting == "inverse_sqrt_frequency" else None
    recipe = build_recipe(cfg.method, model, counts, ignore, tcfg.seed + rank, endpoint or None, class_weight)
    extra = torch.nn.ModuleList(recipe.trainable_modules()).to(device)
    for term in recipe.terms:
        term.synced.to(device)
    recipe.broadcast()
    optimizer = build_optimizer(torch.nn.ModuleList([model, extra]), tcfg)
    restored = checkpoint_to_restore(ray.train.get_checkpoint(), loop_config.get("resume_checkpoint", ""),
                                     run_store(cfg))
    offsets = {"step": 0, "epoch": 0}  # where this run sits in a chain of runs (train.resume_from)
    if restored is None and tcfg.resume_from:
        offsets = continue_from(read_training_state(tcfg.resume_from, endpoint or None), model, optimizer, recipe)
    scheduler = build_scheduler(optimizer, total_steps, tcfg)
    amp_dtype, scaler = amp_settings(device, tcfg.amp)
    ctx = StepContext(model, optimizer, scheduler, device, ignore, amp_dtype, scaler, extra)
    unlabeled_source = sets.pseudo if recipe.needs_pseudo else sets.unlabeled
    if recipe.needs_unlabeled and unlabeled_source is None:
        what = "data.pseudo_manifest" if recipe.needs_pseudo else (
            "data.labeled_count, data.labeled_ids, data.unlabeled_pool, data.target_prefixes or "
            "(synthetic) data.synthetic_unlabeled_images")
        raise ConfigError(f"method.name '{cfg.method.name}' needs unlabeled images: set {what}")
    if recipe.needs_unlabeled:
        check_cold_start_ends(cfg.method, offsets["epoch"] + epochs, tcfg.schedule_span[1])
    snapshot_steps = snapshot_schedule(total_steps, tcfg.snapshots)
    snapshots = run_store(cfg).child(SNAPSHOT_DIR) if rank == 0 and snapshot_steps else None

    step, history, start_step, resume = 0, [], 0, {}
    if restored is not None:
        with restored.as_directory() as directory:
            state = load_training_state(directory)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        resume = state.get("resume", {})
        if state.get("recipe"):
            # rank 0's state, with this rank's own parts (its teacher's BatchNorm statistics,
            # replay buffer, memory banks: each rank sees other images) where it saved them
            recipe.load_state_dict(own_rank_state(state["recipe"], resume.get("recipe_ranks", []), rank, world))
        step = start_step = state["step"]
        offsets = state.get("offsets", offsets)
        history = list(state["metrics"].get("history", []))
        if rank == 0:
            say(f"[segrl] run '{cfg.run_name}': resumed from step {step}")
    # one batch of each per step so far: a restored run draws the ones that come next
    unlabeled_batches = None
    if recipe.needs_unlabeled and n_unlabeled:
        if streamed:  # a restored run starts a new pass of the stream (see segrl.data.stream)
            unlabeled_batches = streamed_batches(
                shard_passes(ray.train.get_dataset_shard(UNLABELED_STREAM), n_unlabeled, tcfg.seed + 1),
                sample_kinds(unlabeled_source.transform.pre(unlabeled_source.raw(0))),
                unlabeled_source.transform.post, first_pass=step)
        else:
            unlabeled_batches = cycle_batches(unlabeled_source, n_unlabeled, rank, world, tcfg.seed + 1,
                                              cfg.data.loader_workers, step)
    target_batches = (
        cycle_batches(sets.target_labeled, n_target, rank, world, tcfg.seed + 2, cfg.data.loader_workers, step)
        if sets.target_labeled is not None and n_target else None
    )
    progress = EpochProgress()
    checkpoint_seconds = [0.0]  # how long the last checkpoint took (written into the next epoch's history)

    def checkpoint_and_report(epoch: int, metrics: dict[str, Any]) -> None:
        began = time.perf_counter()
        _checkpoint_and_report(epoch, metrics)
        checkpoint_seconds[0] = time.perf_counter() - began

    def _checkpoint_and_report(epoch: int, metrics: dict[str, Any]) -> None:
        metrics = dict(metrics, step=step, epoch=epoch, start_step=start_step)
        # every rank's streams, gathered before rank 0 writes: all ranks call this together
        recipe_state = recipe.state_dict()
        streams = {"global": rng_state(), "generators": generator_states(recipe)}
        gathered = gather_to_rank_0((streams, recipe_state), rank, world)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                for_resume = {"rng": [ours for ours, _ in gathered], "progress": dataclasses.asdict(progress),
                              "recipe_ranks": [differences(theirs, recipe_state) for _, theirs in gathered[1:]]}
                save_training_state(tmp, model, optimizer, scheduler, step, epoch, loop_config["config"],
                                    dict(metrics, history=history, classes=list(classes)),
                                    recipe_state, offsets, for_resume)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}")

    model.train()
    if resume.get("rng"):
        # the random streams where the checkpoint left them, last: building the model, the
        # recipe and the loaders above drew from them as they did in the interrupted run
        restore_streams(resume["rng"], rank, world, recipe)
    # a restored run that had already reached its last step trains no further
    for epoch in range(step // steps_per_epoch if step < total_steps else epochs, epochs):
        offset = step - epoch * steps_per_epoch
        train_sampler.set_epoch(epoch, start=offset * n_source)
        loader = make_loader(sets.labeled, n_source, train_sampler, cfg.data.loader_workers, drop_last=True,
                             seed=[tcfg.seed, rank, epoch])
        # a checkpoint taken mid-epoch carries the epoch's sums so far, for its mean loss
        progress = EpochProgress(**resume["progress"]) if offset and resume.get("progress") else EpochProgress()
        started = time.perf_counter()
        for batch in loader:
            if train_sampler.weights is not None:
                batch = label_weights(batch)
            batch_u = next(unlabeled_batches) if unlabeled_batches is not None else None
            if target_batches is not None:
                batch = concat_batches(batch, next(target_batches))
            # the recipe's clocks (cold start, EMA warm-up) run on across continued runs
            losses = recipe_step(ctx, recipe, batch, batch_u, offsets["epoch"] + epoch)
            recipe.after_step(model, offsets["step"] + step)
            threads.step()
            progress.add(losses, batch["image"].shape[0])
            step += 1
            if snapshots is not None and step in snapshot_steps:
                save_snapshot(snapshots, recipe.eval_model(model), step, loop_config["config"], classes,
                              recipe.snapshot_extras())
            if rank == 0 and step % tcfg.log_every_steps == 0:
                say(f"[segrl] step {step}/{total_steps} loss {progress.mean('loss'):.4f}")
            # a train.steps run stops at exactly that step: rows of a benchmark compare equal steps
            end_of_epoch = step == min((epoch + 1) * steps_per_epoch, total_steps)
            if tcfg.checkpoint_every_steps and step % tcfg.checkpoint_every_steps == 0 and not end_of_epoch:
                checkpoint_and_report(epoch, {"loss": progress.mean("loss")})
            if end_of_epoch:
                break
        elapsed = time.perf_counter() - started
        summary: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": progress.mean("loss"),
            # the images of this attempt only: a restored epoch's earlier ones took no time here
            "images_per_s": (progress.images - progress.images_before) * world / max(elapsed, 1e-9),
            "lr": optimizer.param_groups[0]["lr"],
            "threads": threads.threads,
            **{name: progress.mean(name) for name in progress.sums if name != "loss"},
        }
        if streamed and unlabeled_batches is not None:
            # the unlabeled images this epoch's steps drew from the Ray Data stream, all workers
            summary["streamed_unlabeled_images"] = progress.steps * n_unlabeled * world
        progress = EpochProgress()
        last_epoch = epoch + 1 == epochs
        # the run's time outside training steps: this epoch's evaluation, the last checkpoint
        summary.update(eval_s=0.0, previous_checkpoint_s=checkpoint_seconds[0])
        if (epoch + 1) % tcfg.eval_every_epochs == 0 or last_epoch:
            eval_began = time.perf_counter()
            val_loader = make_loader(sets.val, tcfg.batch_size, val_sampler, cfg.data.loader_workers, drop_last=False,
                                     seed=[tcfg.seed, rank, epoch])
            conf = evaluate_confusion(recipe.eval_model(model), val_loader, len(classes), device, ignore,
                                      distributed=world > 1)
            ious = iou_per_class(conf)
            summary.update(
                val_miou=mean_iou(conf),
                val_pixel_acc=pixel_accuracy(conf),
                val_iou_per_class={c: _finite(v) for c, v in zip(classes, ious.tolist(), strict=True)},
            )
            if last_epoch:
                from segrl.metrics import format_iou_table

                summary["table"] = format_iou_table(conf, list(classes))
            summary["eval_s"] = time.perf_counter() - eval_began
        history.append({k: v for k, v in summary.items() if k != "table"})
        if rank == 0:
            say(_epoch_line(summary, epochs, step))
        checkpoint_and_report(epoch + 1, summary)


@dataclass
class EpochProgress:
    """Running sums of the epoch in progress: losses per term, steps and images."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    images_before: int = 0  # images done before a restore (not timed by this attempt)

    def __post_init__(self) -> None:
        self.images_before = self.images

    def add(self, losses: dict[str, float], images: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        self.images += images

    def mean(self, name: str) -> float:
        return self.sums.get(name, 0.0) / max(self.steps, 1)


def gather_to_rank_0(value: Any, rank: int, world: int) -> list[Any]:
    """On rank 0, ``value`` of every rank in rank order (the process group Ray Train set up);
    on the others, ``[None] * world``. Every rank must call it."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.gather_object(value, gathered if rank == 0 else None, dst=0)
    return gathered


SAME = "=rank0"  # in a rank's saved recipe state: the value is rank 0's


def differences(own: Any, reference: Any) -> Any:
    """``own`` with every part equal to ``reference``'s at the same place replaced by ``SAME``,
    so that a rank's recipe state costs only what differs from rank 0's (the teacher's
    weights, averaged from the synchronised student, are the same on every rank)."""
    if isinstance(own, dict) and isinstance(reference, dict):
        return {k: differences(v, reference[k]) if k in reference else v for k, v in own.items()}
    if isinstance(own, (list, tuple)) and isinstance(reference, (list, tuple)) and len(own) == len(reference):
        return type(own)(differences(a, b) for a, b in zip(own, reference, strict=True))
    if torch.is_tensor(own) or torch.is_tensor(reference):
        same = (torch.is_tensor(own) and torch.is_tensor(reference) and own.shape == reference.shape
                and own.dtype == reference.dtype and torch.equal(own, reference))
        return SAME if same else own
    return SAME if type(own) is type(reference) and own == reference else own


def with_differences(reference: Any, diff: Any) -> Any:
    """Undo ``differences``: ``reference`` wherever ``diff`` says ``SAME``."""
    if isinstance(diff, str) and diff == SAME:
        return reference
    if isinstance(diff, dict):
        return {k: with_differences(reference.get(k), v) for k, v in diff.items()}
    if isinstance(diff, (list, tuple)):
        return type(diff)(with_differences(r, d) for r, d in zip(reference, diff, strict=True))
    return diff


def own_rank_state(reference: dict[str, Any], other_ranks: list[Any], rank: int, world: int) -> dict[str, Any]:
    """This rank's recipe state: rank 0's, with the rank's own differences where the
    checkpoint holds them (one entry per rank after the first, for this number of workers)."""
    if rank == 0 or len(other_ranks) != world - 1:
        return reference
    return with_differences(reference, other_ranks[rank - 1])


def restore_streams(saved: list[dict[str, Any]], rank: int, world: int, recipe: Any) -> None:
    """Set this rank's random streams to those saved with the checkpoint; a run restored on
    another number of workers has no saved streams for some ranks and keeps fresh ones."""
    if len(saved) != world:
        if rank == 0:
            say(f"[segrl] the checkpoint holds the random streams of {len(saved)} workers, not {world}: "
                "the resumed run draws other augmentations than an uninterrupted one would")
        return
    set_rng_state(saved[rank]["global"])
    set_generator_states(recipe, saved[rank]["generators"])


def check_cold_start_ends(method: MethodConfig, epochs_at_end: int, schedule_end: float) -> None:
    """Refuse a mean teacher whose cold start outlasts its whole schedule.

    Its unlabeled terms start at epoch ``method.cold_start_epochs``; a ``train.steps`` run has
    about ``STEPS_EPOCHS`` epochs however many steps it takes, so a cold start of 5 epochs
    silently made a 2000-step "mean teacher" plain supervised training (it evaluates the EMA
    teacher). ``epochs_at_end``: the recipe's epoch clock when this run ends (it runs on over
    continued rounds); ``schedule_end`` < 1: later rounds continue the schedule, so this run
    may lie wholly inside the cold start.
    """
    if method.name == "mean_teacher" and schedule_end >= 1 and method.cold_start_epochs >= epochs_at_end:
        raise ConfigError(
            f"config field 'method.cold_start_epochs' = {method.cold_start_epochs} covers every one of the "
            f"run's {epochs_at_end} epochs: the mean teacher would never learn from the unlabeled images "
            f"(a train.steps run has about {STEPS_EPOCHS} epochs); make it smaller than {epochs_at_end}")


def plan_steps(steps: int, epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, total optimiser steps): exactly ``steps`` when set, the last epoch cut short."""
    if steps:
        return math.ceil(steps / steps_per_epoch), steps
    return epochs, epochs * steps_per_epoch


def batch_sizes(batch_size: int, ratio: tuple[float, ...]) -> tuple[int, int, int]:
    """(labeled source, labeled target, unlabeled) images per step from ``data.batch_ratio``.

    The labeled images of a step are ``batch_size``, split source : target by the first
    two ratios; the unlabeled count is ``batch_size x r_u / (r_s + r_t)``.
    """
    r_source, r_target, r_unlabeled = ratio
    labeled = r_source + r_target
    n_target = round(batch_size * r_target / labeled)
    n_source = batch_size - n_target
    if n_source < 1:
        raise ConfigError(f"config field 'data.batch_ratio' = {list(ratio)} leaves no labeled source "
                          f"image in a batch of {batch_size}")
    return n_source, n_target, round(batch_size * r_unlabeled / labeled)


def concat_batches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two collated batches as one (tensors concatenated, lists joined)."""
    return {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else list(a[k]) + list(b[k]) for k in a}


def snapshot_schedule(total_steps: int, count: int) -> set[int]:
    """Steps after which the K snapshots are taken: evenly spaced, the last at the end."""
    if count <= 0:
        return set()
    return {max(1, round(total_steps * j / count)) for j in range(1, count + 1)}


def save_snapshot(store: ArtifactStore, model: torch.nn.Module, step: int, config: dict[str, Any],
                  classes: tuple[str, ...], extras: dict[str, Any] | None = None) -> None:
    """A model-only checkpoint ``snapshots/ckpt_<step>/checkpoint.pt`` that scoring reads."""
    import io

    from segrl.training import CHECKPOINT_FILE, unwrap

    key = f"{CHECKPOINT_PREFIX}{step:08d}/{CHECKPOINT_FILE}"
    if store.exists(key):  # a resumed run passes the same step again
        return
    buffer = io.BytesIO()
    state = {"model": unwrap(model).state_dict(), "step": step, "config": config,
             "metrics": {"classes": list(classes)}, **(extras or {})}
    torch.save(state, buffer)
    store.write_bytes(key, buffer.getvalue())


def _class_counts(cfg: ExperimentConfig, labeled: Any) -> torch.Tensor | None:
    """Labeled pixels per class, for Balanced ClassMix's tail bias and ``train.class_weighting``
    (one pass over the masks), or None when neither is on."""
    if not cfg.method.classmix and cfg.train.class_weighting == "none":
        return None
    counts = torch.zeros(len(labeled.classes), dtype=torch.int64)
    for i in range(len(labeled)):
        mask = labeled[i]["mask"]
        mask = mask[mask != labeled.ignore_index]
        counts += torch.bincount(mask.flatten(), minlength=len(counts))[: len(counts)]
    return counts


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _epoch_line(summary: dict[str, Any], epochs: int, step: int) -> str:
    line = (
        f"[segrl] epoch {summary['epoch']}/{epochs} step {step} loss {summary['loss']:.4f} "
        f"{summary['images_per_s']:.1f} img/s lr {summary['lr']:.2e}"
    )
    if "val_miou" in summary:
        line += f" val mIoU {100 * summary['val_miou']:.2f}% pixel acc {100 * summary['val_pixel_acc']:.2f}%"
    return line
