"""Sweeps on Ray Tune: one driver function per trial builds and runs a Ray Train trainer.

Layout in the store, under ``<store.root>/<sweep name>/``::

    tune/                 Ray Tune's experiment state (what ``Tuner.restore`` resumes)
    trials/<trial id>/    each trial's segrl run: config.yaml, train/ckpt_*, metrics.json
    results.parquet       one row per trial: every swept key, the metric, the run URI
    results.md            the same, ranked, as a markdown table

Rerunning a sweep whose ``tune/`` state exists restores it: finished trials are kept,
unfinished ones continue (their runs resume from their last checkpoint).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from segrl.config import absolute_local_paths, apply_overrides, config_from_dict, to_dict
from segrl.storage import open_store
from segrl.sweep import Sweep, max_concurrent_trials, trial_overrides

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# A trial's driver only waits on its Ray Train workers (which reserve their own CPUs);
# Tune needs a non-empty request, so it asks for a sliver.
TRIAL_DRIVER_CPUS = 0.01


@dataclass(frozen=True)
class SweepResult:
    sweep_uri: str
    table: pa.Table  # ranked best first
    markdown: str
    restored: bool


def tune_space(sweep: Sweep) -> dict[str, Any]:
    """The Ray Tune param space of a sweep's domains (keys stay dotted config keys)."""
    from ray import tune

    makers = {
        "grid": lambda v: tune.grid_search(list(v)),
        "choice": lambda v: tune.choice(list(v)),
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),
    }
    return {key: makers[d.kind](d.values) for key, d in sweep.space.items()}


def _trial_run_name(trial_id: str) -> str:
    return "trial_" + re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id)


def make_trial_function(sweep: Sweep):
    """The per-trial driver: base config + sampled overrides -> ``train`` with Tune reporting."""
    base = sweep.base

    def run_trial(params: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from segrl.engine.train import METRICS_FILE, run_store, train

        trial_id = tune.get_context().get_trial_id()
        root = open_store(base.get("store", {}).get("root", "runs"),
                          base.get("store", {}).get("endpoint_url") or None)
        trials_root = root.child(f"{sweep.name}/{TRIALS_DIR}").uri()
        raw = apply_overrides(base, [*trial_overrides(params), f"store.root={trials_root}",
                                     f"run={_trial_run_name(trial_id)}"])
        cfg = config_from_dict(raw)
        store = run_store(cfg)
        if store.exists(METRICS_FILE) and sweep.tune.trial == "train" and cfg.method.name not in ("st", "st_pp"):
            # This trial's run had finished when the sweep was interrupted, before Tune
            # recorded it: report its final result instead of training again.
            final = store.read_json(METRICS_FILE)
            tune.report({k: v for k, v in final.items() if isinstance(v, (int, float))})
            return
        if sweep.tune.trial == "loop":
            from segrl.loop.run import run_loop

            final = run_loop(cfg).rounds[-1]
            tune.report({"val_miou": final["val_miou"], "labeled_share": final["labeled_share"],
                         "epoch": final["round"]})
        elif cfg.method.name in ("st", "st_pp"):
            from segrl.engine.selftrain import run_self_training

            metrics = run_self_training(cfg).metrics
            tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        else:
            train(cfg, callbacks=[TuneReportCallback()])

    return run_trial


def run_sweep(sweep: Sweep) -> SweepResult:
    """Run (or restore and finish) ``sweep``; write and return the ranked results table."""
    import ray
    from ray import tune

    from segrl.engine.train import ensure_ray

    # Trials run in other processes and folders: resolve relative paths here, once.
    base_cfg = absolute_local_paths(config_from_dict(sweep.base))
    sweep = replace(sweep, base=to_dict(base_cfg))
    ensure_ray(base_cfg.compute)
    store = open_store(base_cfg.store.root, base_cfg.store.endpoint_url or None).child(sweep.name)
    concurrent = sweep.tune.max_concurrent_trials or max_concurrent_trials(
        float(ray.cluster_resources().get("CPU", 1)), base_cfg
    )
    trainable = tune.with_resources(make_trial_function(sweep), {"CPU": TRIAL_DRIVER_CPUS})
    experiment = store.fs_path(TUNE_DIR)
    restored = tune.Tuner.can_restore(experiment, storage_filesystem=store.filesystem)
    if restored:
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=tune_space(sweep), storage_filesystem=store.filesystem)
    else:
        scheduler = None
        if sweep.tune.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="epoch", max_t=base_cfg.train.epochs,
                                      grace_period=sweep.tune.grace_period)
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(sweep),
            tune_config=tune.TuneConfig(metric=sweep.tune.metric, mode=sweep.tune.mode,
                                        scheduler=scheduler, num_samples=sweep.tune.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=store.fs_path(),
                                      storage_filesystem=store.filesystem),
        )
    grid = tuner.fit()
    table, markdown = results_table(sweep, grid, store.child(TRIALS_DIR))
    store.write_table("results.parquet", table)
    store.write_text("results.md", markdown + "\n")
    return SweepResult(store.uri(), table, markdown, restored)


def results_table(sweep: Sweep, grid: Any, trials_store: Any) -> tuple[pa.Table, str]:
    """One row per trial, best first: swept keys, the metric, status, the trial's run URI."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        value = metrics.get(sweep.tune.metric)
        trial_id = metrics.get("trial_id") or result.path.rstrip("/").rsplit("_", 2)[-2]
        rows.append({
            **{key: result.config.get(key) for key in sweep.space},
            sweep.tune.metric: float(value) if value is not None else math.nan,
            "epoch": metrics.get("epoch"),
            "status": "error" if result.error else "done",
            "run_uri": trials_store.uri(_trial_run_name(str(trial_id))),
        })
    best_first = sweep.tune.mode == "max"
    rows.sort(key=lambda r: (math.isnan(r[sweep.tune.metric]),
                             -r[sweep.tune.metric] if best_first else r[sweep.tune.metric]))
    keys = list(sweep.space)
    header = ["rank", *keys, sweep.tune.metric, "epoch", "status", "run"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), *(str(row[k]) for k in keys), f"{row[sweep.tune.metric]:.4f}",
                 str(row["epoch"]), row["status"], row["run_uri"]]
        lines.append("| " + " | ".join(cells) + " |")
    table = pa.Table.from_pylist([{k: (str(v) if k in keys else v) for k, v in r.items()} for r in rows]) \
        if rows else pa.table({})
    return table, "\n".join(lines)
