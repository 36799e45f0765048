"""A 2 x 1 grid sweep over two keys on a local Ray cluster: interrupted, restored, finished, ranked."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from segrl.engine.tune import run_sweep
from segrl.sweep import load_sweep

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SWEEP = """
name: tiny_sweep
base:
  name: tiny
  data: {{synthetic_train_images: 8, synthetic_val_images: 4, synthetic_size: [32, 40],
          crop_size: [32, 40]}}
  train: {{epochs: 1, batch_size: 4, log_every_steps: 1000}}
  store: {{root: {root}}}
  compute: {{num_workers: 1, cpus_per_worker: 1, threads_per_worker: 1, ray_address: "{address}"}}
space:
  train.lr: [0.001, 0.003]
  train.weight_decay: [0.0001]
tune: {{metric: val_miou, mode: max, max_concurrent_trials: 1}}
"""


def test_interrupted_sweep_is_restored_without_rerunning_finished_trials(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(root=tmp_path / "runs", address=address))
    trials = tmp_path / "runs" / "tiny_sweep" / "trials"

    driver = subprocess.Popen([sys.executable, "jobs/sweep.py", "--config", str(path)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if list(trials.glob("*/metrics.json")):
            driver.kill()
            break
        time.sleep(0.2)
    driver.wait(timeout=60)
    finished = {p.parent.name: p.stat().st_mtime for p in trials.glob("*/metrics.json")}
    assert len(finished) == 1, f"the sweep was not interrupted mid-way ({len(finished)} done)"

    result = run_sweep(load_sweep(path))
    assert result.restored
    table = result.table.to_pylist()
    assert len(table) == 2 and {r["status"] for r in table} == {"done"}
    assert {(r["train.lr"], r["train.weight_decay"]) for r in table} == {("0.001", "0.0001"), ("0.003", "0.0001")}
    scores = [r["val_miou"] for r in table]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for name, mtime in finished.items():  # finished before the interruption: not trained again
        assert (trials / name / "metrics.json").stat().st_mtime == mtime
    assert all(Path(r["run_uri"], "metrics.json").is_file() for r in table)
    assert (tmp_path / "runs" / "tiny_sweep" / "results.md").is_file()
