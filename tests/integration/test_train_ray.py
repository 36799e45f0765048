"""Supervised training on a real local Ray cluster: 2 DDP workers, checkpoints, resume, worker loss."""

from __future__ import annotations

import ipaddress
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _procs import listening_addresses, own_descendants
from _tiny import tiny_overrides

from segrl.config import ConfigError, load_config
from segrl.engine.train import train, without_clock
from segrl.storage import open_store

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]
REPO = Path(__file__).resolve().parents[2]

TINY = tiny_overrides(32, 8, (64, 80))


def tiny_config(root: Path, *extra: str):
    return load_config(overrides=[*TINY, f"store.root={root}", *extra])


def checkpoint_names(root: Path, run: str) -> list[str]:
    return sorted(p.name for p in (root / run / "train").glob("ckpt_*"))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def test_the_local_cluster_listens_on_loopback_only(ray_cluster):
    """segrl's local cluster (the tests start theirs the same way) opens no port on another
    interface: Ray on its own puts the GCS, raylet and workers on every interface and its
    agents on the machine's outward address."""
    processes = own_descendants()
    listening = listening_addresses(processes)
    assert len({pid for pid, _, _ in listening}) >= 3, listening  # GCS, raylet, agents at least
    outside = [(pid, address, port) for pid, address, port in listening if not is_loopback(address)]
    assert not outside, f"listening beyond 127.0.0.1 (pid, address, port): {outside}"


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


MEAN_TEACHER = (
    "train.checkpoint_every_steps=2", "train.keep_checkpoints=1", "compute.max_failures=3",
    "method.name=mean_teacher", "method.cold_start_epochs=1", "method.classmix=true",
    "method.replay_buffer=8", "data.synthetic_unlabeled_images=16",
    "data.synthetic_size=[48,64]", "data.crop_size=[48,64]",
)


def newest_complete_step(root: Path, run: str) -> int:
    from segrl.engine.train import complete_checkpoints
    from segrl.training import checkpoint_step

    names = complete_checkpoints(open_store(str(root / run)))
    return checkpoint_step(names[0]) if names else 0


def registered_step(root: Path, run: str) -> int:
    from segrl.training import checkpoint_step

    return max((checkpoint_step(name) for name in registered_checkpoints(root, run)), default=0)


def kill_a_worker_then_the_driver(victim: subprocess.Popen, root: Path, run: str) -> tuple[int, int]:
    """SIGKILL one Ray Train worker once a checkpoint is registered, then, once training has
    gone on from the restore, the whole driver while a complete checkpoint on disk is newer
    than the newest one Ray Train registered. Returns (that step, the registered step)."""
    deadline = time.time() + 400
    killed_worker_at, first_workers = None, set()
    while time.time() < deadline:
        assert victim.poll() is None, "the driver ended before it could be killed: " + _tail(root / "victim.log")
        newest, registered = newest_complete_step(root, run), registered_step(root, run)
        if killed_worker_at is None:
            if registered and (pids := train_worker_pids()):
                os.kill(pids[-1], signal.SIGKILL)
                killed_worker_at, first_workers = newest, set(pids)
        elif newest > max(registered, killed_worker_at) and set(train_worker_pids()) - first_workers:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            return newest, registered
        time.sleep(0.05)
    pytest.fail("no checkpoint newer than Ray Train's snapshot was seen: " + _tail(root / "victim.log"))


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:]


def losses(history: list[dict]) -> list[dict]:
    """Each epoch's record but its clock values (throughput, evaluation and checkpoint time)."""
    return without_clock(history)


def test_mean_teacher_resumed_after_a_killed_worker_and_a_killed_driver_trains_as_an_uninterrupted_run(
        tmp_path, ray_cluster):
    """S4AL's recipe (mean teacher, Balanced ClassMix, replay buffer) on two DDP workers: one
    driver loses a worker (Ray Train restores its last checkpoint) and is then SIGKILLed; the
    same run name, with one epoch more, resumes from the newest complete checkpoint on disk (newer
    than Ray Train's snapshot, which lags) and ends with the loss history and weights of an
    uninterrupted run, keeping train.keep_checkpoints checkpoints.

    One scenario answers all of this because a Ray Train start costs about half a minute of both
    cores here: the recipe's terms and saved state, survival of a worker loss, and resuming exactly."""
    import torch

    steps_per_epoch = 32 // 2 // 4
    address = ray_cluster.get_runtime_context().gcs_address
    # Ray Train's own controller poll (2 s, not segrl's local 0.5 s): as on a real cluster, the
    # controller registers a checkpoint seconds after a worker wrote it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(REPO / "jobs" / "train.py"), *TINY, f"store.root={tmp_path}", "name=chaos",
               "train.epochs=4", *MEAN_TEACHER, f"compute.ray_address={address}"]
    with (tmp_path / "victim.log").open("w") as log:
        victim = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            newest_at_kill, registered_at_kill = kill_a_worker_then_the_driver(victim, tmp_path, "chaos")
        finally:
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
    deadline = time.time() + 60
    while train_worker_pids() and time.time() < deadline:  # Ray ends the dead driver's workers
        time.sleep(0.2)
    newest_at_kill = newest_complete_step(tmp_path, "chaos")  # a last upload may have landed
    assert registered_at_kill < newest_at_kill < 4 * steps_per_epoch

    resumed = train(tiny_config(tmp_path, "name=chaos", "train.epochs=5", *MEAN_TEACHER))
    uninterrupted = train(tiny_config(tmp_path, "name=calm", "train.epochs=5", *MEAN_TEACHER))
    metrics = resumed.metrics
    assert metrics["start_step"] == newest_at_kill  # not Ray Train's older snapshot
    assert metrics["step"] == uninterrupted.metrics["step"] == 5 * steps_per_epoch
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert losses(history) == losses(uninterrupted.metrics["history"])  # equal to the last bit
    assert "loss_mix" not in history[0]  # cold start: supervised only
    for epoch in history[1:]:  # with ClassMix the mixed images are the only unlabeled term (S4AL)
        assert "loss_u" not in epoch and all(math.isfinite(epoch[k]) for k in ("loss", "loss_x", "loss_mix"))
    assert history[-1]["loss_x"] < history[0]["loss_x"]
    assert 0.0 <= metrics["val_miou"] <= 1.0
    final = f"ckpt_{5 * steps_per_epoch:08d}"
    assert checkpoint_names(tmp_path, "chaos") == checkpoint_names(tmp_path, "calm") == [final]  # keep_checkpoints=1
    state = torch.load(tmp_path / "chaos" / "train" / final / "checkpoint.pt", weights_only=True)
    reference = torch.load(tmp_path / "calm" / "train" / final / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["model"][k], reference["model"][k]) for k in reference["model"])
    assert set(state["recipe"]) == {"teacher", "buffer", "terms"}
    assert state["recipe"]["terms"] == []  # no optional term switched on
    assert state["recipe"]["teacher"]["model"].keys() == state["model"].keys()
    store = open_store(str(tmp_path)).child("chaos")
    assert store.read_yaml("config.yaml")["train"]["epochs"] == 5
    assert store.read_json("metrics.json")["val_miou"] == metrics["val_miou"]
