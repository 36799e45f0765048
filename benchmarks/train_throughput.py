"""Training throughput: segrl on Ray Train (1 and 2 workers) against a plain PyTorch loop.

Same model, batch, resolution, data and total CPU threads in one run; images/s are
timed over the last epoch of each (the first epoch warms up allocators and caches).

    python benchmarks/train_throughput.py                 # small: a couple of minutes on 2 cores
    python benchmarks/train_throughput.py --setting full  # longer epochs, steadier numbers

Target: Ray Train with 1 worker >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from segrl.config import load_config, to_dict
from segrl.data.build import build_dataset
from segrl.losses import cross_entropy
from segrl.models import build_model

SETTINGS = {
    "small": {"images": 64, "epochs": 2, "size": (180, 240), "batch": 8},
    "full": {"images": 256, "epochs": 3, "size": (180, 240), "batch": 8},
}


def experiment(setting: dict, threads: int, workers: int, root: str, arch: str):
    h, w = setting["size"]
    return load_config(
        overrides=[
            f"name=throughput_{workers}w",
            f"store.root={root}",
            f"model.arch={arch}",
            f"data.synthetic_train_images={setting['images']}",
            "data.synthetic_val_images=8",
            f"data.synthetic_size=[{h},{w}]",
            f"data.crop_size=[{h},{w}]",
            f"train.batch_size={setting['batch']}",
            f"train.epochs={setting['epochs']}",
            "train.schedule=constant",
            f"train.eval_every_epochs={setting['epochs']}",
            "train.log_every_steps=100000",
            f"compute.num_workers={workers}",
            f"compute.cpus_per_worker={max(threads // workers, 1) if workers > 1 else threads}",
            f"compute.threads_per_worker={max(threads // workers, 1)}",
        ]
    )


def plain_loop(cfg, threads: int) -> float:
    """Images/s of the last epoch of a textbook single-process PyTorch loop."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = build_dataset(cfg.data, cfg.data.train_split, train=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True
    )
    model = build_model(cfg.model.arch, len(dataset.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    model.train()
    rate = 0.0
    for _ in range(cfg.train.epochs):
        images, started = 0, time.perf_counter()
        for batch in loader:
            loss = cross_entropy(model(batch["image"]), batch["mask"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += batch["image"].shape[0]
        rate = images / (time.perf_counter() - started)
    return rate


def ray_train(cfg) -> float:
    from segrl.engine.train import train

    summary = train(cfg)
    return summary.metrics["history"][-1]["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total CPU threads for each contender")
    parser.add_argument("--arch", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]

    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        plain = plain_loop(experiment(setting, args.threads, 1, root, args.arch), args.threads)
        rows.append(("plain PyTorch loop, 1 process", plain))
        for workers in (1, 2):
            rate = ray_train(experiment(setting, args.threads, workers, root, args.arch))
            rows.append((f"segrl Ray Train, {workers} worker{'s' if workers > 1 else ''}", rate))
    ray.shutdown()

    h, w = setting["size"]
    print(f"\nTraining throughput: {args.arch}, batch {setting['batch']}, {h}x{w}, "
          f"{args.threads} CPU threads in total, setting '{args.setting}'\n")
    print("| contender | images/s | ratio to plain |")
    print("| --- | ---: | ---: |")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {rate / plain:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "setting": args.setting, "arch": args.arch, "threads": args.threads,
        "config": to_dict(experiment(setting, args.threads, 1, "-", args.arch)),
        "rows": [{"contender": n, "images_per_s": r, "ratio": r / plain} for n, r in rows],
        "ratio_1_worker": rows[1][1] / plain if not math.isnan(plain) else None,
    }, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
