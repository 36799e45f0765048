"""Supervised training on a real local Ray cluster: 2 DDP workers, checkpoints, resume, worker loss."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from _procs import own_descendants
from _tiny import tiny_overrides

from segrl.config import ConfigError, load_config, replace
from segrl.engine.train import train
from segrl.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]

TINY = tiny_overrides(32, 8, (64, 80))


def tiny_config(root: Path, *extra: str):
    return load_config(overrides=[*TINY, f"store.root={root}", *extra])


def checkpoint_names(root: Path, run: str) -> list[str]:
    return sorted(p.name for p in (root / run / "train").glob("ckpt_*"))


def test_rerun_with_incompatible_config_is_refused(tmp_path):
    from segrl.engine.train import record_config, run_store

    first = tiny_config(tmp_path, "name=locked", "train.epochs=1")
    record_config(run_store(first), first)  # what a started run leaves in the store
    with pytest.raises(ConfigError, match="model.arch"):
        train(tiny_config(tmp_path, "name=locked", "model.arch=deeplabv3_mobilenet_v3_large"))
    # Training longer is not a different run.
    record_config(run_store(first), tiny_config(tmp_path, "name=locked", "train.epochs=3"))


def registered_checkpoints(root: Path, run: str) -> list[str]:
    """Checkpoints the Ray Train controller has registered (a folder alone may be mid-upload)."""
    import json

    snapshot = root / run / "train" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [r["checkpoint_dir_name"] for r in results]


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train workers of this test's cluster (Ray sets their title to the actor class)."""
    return own_descendants("RayTrainWorker")


def test_mean_teacher_on_two_workers_survives_a_killed_worker_then_a_rerun_resumes_to_more_epochs(tmp_path):
    """One DDP run of S4AL's recipe (mean teacher, Balanced ClassMix, replay buffer) that loses a
    worker mid-run and is restored from its last checkpoint, then the same run name with more
    epochs, which continues from the saved step.

    One run answers both questions because a Ray Train start costs about half a minute of both
    cores here: the recipe's terms and saved state, and the loop's survival and resume."""
    import torch

    cfg = tiny_config(
        tmp_path, "name=chaos", "train.epochs=4", "train.checkpoint_every_steps=2", "compute.max_failures=3",
        "method.name=mean_teacher", "method.cold_start_epochs=1", "method.classmix=true",
        "method.replay_buffer=8", "data.synthetic_unlabeled_images=16",
        "data.synthetic_size=[48,64]", "data.crop_size=[48,64]",
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("summary", train(cfg)))
    thread.start()
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and thread.is_alive():
        pids = train_worker_pids()
        if pids and registered_checkpoints(tmp_path, "chaos"):
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    thread.join(timeout=300)
    assert killed is not None, "no worker was seen after the first checkpoint"
    assert "summary" in outcome, "training did not finish after the worker was killed"
    first = outcome["summary"]
    metrics = first.metrics
    steps_per_epoch = 32 // 2 // 4
    assert metrics["step"] == 4 * steps_per_epoch
    # The attempt that finished began from a checkpoint, not from step 0.
    assert metrics["start_step"] > 0
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert "loss_mix" not in history[0]  # cold start: supervised only
    for epoch in history[1:]:  # with ClassMix the mixed images are the only unlabeled term (S4AL)
        assert "loss_u" not in epoch and all(math.isfinite(epoch[k]) for k in ("loss", "loss_x", "loss_mix"))
    assert history[-1]["loss_x"] < history[0]["loss_x"]
    assert 0.0 <= metrics["val_miou"] <= 1.0
    assert checkpoint_names(tmp_path, "chaos")[-1] == f"ckpt_{4 * steps_per_epoch:08d}"
    last = tmp_path / "chaos" / "train" / f"ckpt_{4 * steps_per_epoch:08d}" / "checkpoint.pt"
    state = torch.load(last, weights_only=True)
    assert set(state["recipe"]) == {"teacher", "buffer", "terms"}
    assert state["recipe"]["terms"] == []  # no optional term switched on
    assert state["recipe"]["teacher"]["model"].keys() == state["model"].keys()
    store = open_store(str(tmp_path)).child("chaos")
    assert store.read_yaml("config.yaml")["train"]["epochs"] == 4
    assert store.read_json("metrics.json")["val_miou"] == metrics["val_miou"]

    # Same run name, more epochs: continues from the saved step instead of starting over.
    second = train(replace(cfg, **{"train.epochs": 5}))
    assert second.metrics["start_step"] == 4 * steps_per_epoch
    assert second.metrics["step"] == 5 * steps_per_epoch
    assert [h["epoch"] for h in second.metrics["history"]] == [1, 2, 3, 4, 5]
    assert second.metrics["history"][:4] == history
    assert store.read_yaml("config.yaml")["train"]["epochs"] == 5
