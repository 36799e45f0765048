"""Pool-scoring throughput: segrl on Ray Data against a plain PyTorch loop, K=3 vs K=1,
two simulated nodes vs one, and the driver's peak memory on a 100,000-frame pool.

Same model (LR-ASPP MobileNetV3, untrained: the speed does not depend on the weights),
same synthetic frames, same batch and the same total CPU threads for every contender.
Rates are steady state: frames after the first committed shard (or the first batch of
the plain loop) over the time they took, so model loading and start-up are left out.

    python benchmarks/score_throughput.py                  # small: a few minutes on 2 cores
    python benchmarks/score_throughput.py --setting full   # 10,000 frames + the 100k pool

Targets: Ray/plain >= 0.95x; K=3 time <= 3.2x K=1; driver peak RSS < 2 GB at 100k frames.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from segrl.config import ScoreConfig, load_config
from segrl.data.synthetic import SYNTHETIC_CLASSES
from segrl.models import build_model
from segrl.scoring import save_scoring_checkpoint

ARCH = "lraspp_mobilenet_v3_large"
SETTINGS = {
    "small": {"frames": 1536, "size": (64, 80), "batch": 16, "shard": 256, "big_pool": 0},
    "full": {"frames": 10240, "size": (64, 80), "batch": 16, "shard": 1024, "big_pool": 100_000},
}
BIG_POOL_SIZE = (32, 40)


def checkpoints(root: Path, k: int) -> Path:
    for i in range(1, k + 1):
        torch.manual_seed(i)
        model = build_model(ARCH, len(SYNTHETIC_CLASSES))
        save_scoring_checkpoint(str(root / f"ckpt_{i:08d}"), model, ARCH, SYNTHETIC_CLASSES, step=i)
    return root


def score_config(pool: str, ckpts: Path, out: Path, setting: dict, size) -> ScoreConfig:
    return load_config(overrides=[
        f"pool={pool}", f"checkpoints={ckpts}", f"out={out}", f"image_size=[{size[0]},{size[1]}]",
        f"batch_size={setting['batch']}", f"shard_size={setting['shard']}",
        "signals=[entropy,least_confidence,margin,confidence,stability]",
    ], cls=ScoreConfig)


def plain_loop(cfg: ScoreConfig, threads: int, skip: int) -> float:
    """DataLoader (1 decode worker) + the same scorer in this process; steady frames/s."""
    from segrl.data.pool import iter_pool_batches, load_pool_image
    from segrl.scoring import PoolScorer, inspect_checkpoints

    uris = [u for b in iter_pool_batches(cfg.pool, 65536) for u in b.column("image_uri").to_pylist()]

    class Frames(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(uris)

        def __getitem__(self, i: int):
            return torch.from_numpy(load_pool_image(uris[i]))

    torch.set_num_threads(threads)
    scorer = PoolScorer(cfg, inspect_checkpoints(cfg.checkpoints))
    loader = torch.utils.data.DataLoader(Frames(), batch_size=cfg.batch_size, num_workers=1)
    done, started = 0, None
    size = torch.tensor(cfg.image_size).repeat(cfg.batch_size, 1).numpy()
    for images in loader:
        if done >= skip and started is None:
            started = time.perf_counter()
            counted = 0
        scorer.score(images.numpy(), [str(i) for i in range(len(images))], size[: len(images)])
        done += len(images)
        if started is not None:
            counted += len(images)
    return counted / (time.perf_counter() - started)


def ray_rate(cfg: ScoreConfig) -> tuple[float, float]:
    from segrl.engine.score import score_pool

    summary = score_pool(cfg, progress=False)
    return summary.steady_frames_per_s or float("nan"), summary.seconds


def big_pool_memory(pool_size: int, ckpts: Path, out: Path, setting: dict) -> dict:
    """Score a pool of ``pool_size`` frames in a child process; its peak RSS is the driver's."""
    from segrl.data.pool import write_synthetic_pool_manifest

    h, w = BIG_POOL_SIZE
    manifest = write_synthetic_pool_manifest(str(out.parent / "pool_100k.parquet"), pool_size,
                                             seed=1, size=(h, w))
    args = [f"pool={manifest}", f"checkpoints={ckpts}",
            f"out={out}", f"image_size=[{h},{w}]", "batch_size=64", "shard_size=4096",
            "signals=[entropy,confidence]"]
    started = time.perf_counter()
    subprocess.run([sys.executable, "jobs/score_pool.py", "--top", "0", *args], check=True,
                   stdout=subprocess.DEVNULL)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"frames": pool_size, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default="benchmarks/results/score_throughput.json")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    size = setting["size"]
    pool = f"synthetic://target?n={setting['frames']}&seed=0&size={size[0]}x{size[1]}"

    import ray
    from ray.cluster_utils import Cluster

    results: dict = {"setting": args.setting, "threads": args.threads, "frames": setting["frames"]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        k1, k3 = checkpoints(root / "k1", 1), checkpoints(root / "k3", 3)
        cfg1 = score_config(pool, k1, root / "out_k1", setting, size)
        results["plain_k1"] = plain_loop(cfg1, args.threads, skip=setting["shard"])

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        results["ray_k1"], results["ray_k1_seconds"] = ray_rate(cfg1)
        results["ray_k3"], results["ray_k3_seconds"] = ray_rate(score_config(pool, k3, root / "out_k3", setting, size))
        ray.shutdown()

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.threads // 2})
        cluster.add_node(num_cpus=args.threads - args.threads // 2)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        results["ray_k1_2nodes"], _ = ray_rate(score_config(pool, k1, root / "out_2n", setting, size))
        ray.shutdown()
        cluster.shutdown()
        if setting["big_pool"]:
            results["big_pool"] = big_pool_memory(setting["big_pool"], k1, root / "out_big", setting)

    plain = results["plain_k1"]
    print(f"\nScoring throughput: {ARCH}, {setting['frames']} frames {size[0]}x{size[1]}, batch "
          f"{setting['batch']}, {args.threads} CPU threads per contender, setting '{args.setting}'\n")
    print("| contender | frames/s (steady) | ratio | target |")
    print("| --- | ---: | ---: | --- |")
    print(f"| plain PyTorch loop (DataLoader + model), K=1 | {plain:.1f} | 1.00x | |")
    print(f"| segrl Ray Data, 1 node, K=1 | {results['ray_k1']:.1f} | {results['ray_k1'] / plain:.2f}x | >= 0.95x |")
    print(f"| segrl Ray Data, 1 node, K=3 | {results['ray_k3']:.1f} | {results['ray_k3'] / plain:.2f}x | |")
    print(f"| segrl Ray Data, 2 simulated nodes, K=1 | {results['ray_k1_2nodes']:.1f} | "
          f"{results['ray_k1_2nodes'] / plain:.2f}x | report |")
    ratio = results["ray_k3_seconds"] / results["ray_k1_seconds"]
    print(f"\nK=3 vs K=1 wall time: {results['ray_k3_seconds']:.1f}s / {results['ray_k1_seconds']:.1f}s "
          f"= {ratio:.2f}x (target <= 3.2x)")
    results["k3_over_k1_time"] = ratio
    if "big_pool" in results:
        big = results["big_pool"]
        print(f"{big['frames']} frames ({BIG_POOL_SIZE[0]}x{BIG_POOL_SIZE[1]}) scored in {big['seconds']:.0f}s; "
              f"driver peak RSS {big['peak_rss_mb']:.0f} MB (target < 2048 MB)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
