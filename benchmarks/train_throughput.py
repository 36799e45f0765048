"""Training throughput on CamVid: segrl on Ray Train against the fastest plain PyTorch loop.

Contenders, each with the same model, batch, resolution, frames and CPU threads, one
after the other in one run, for ``supervised`` and for ``mean_teacher`` with Balanced
ClassMix (every step a mean-teacher step: no cold start):

(a) plain loop, one process, on frames decoded and resized once into uint8 tensors in
    memory, with batched random scale / crop / flip (``batch_weak_views``): the reference;
(b) plain loop over a DataLoader that decodes the PNGs every epoch;
(c) segrl on Ray Train, 1 worker; (d) 2 workers (the threads split between them);
(e) for the recipes that draw unlabeled batches: (c) with the unlabeled set streamed through
    Ray Data (``data.stream_unlabeled=always``: Ray Data tasks decode it on the same cores).

The mean-teacher step is segrl's own recipe in every contender (``recipe.losses``:
teacher forward on the weak view, ClassMix, strong views, one student forward). Time is
that of every epoch but the first (which warms up allocators and caches): 5 epochs of 22
steps in the full setting, as the machine's speed drifts over minutes; ratios are against (a).

    python benchmarks/train_throughput.py --setting small   # a couple of minutes on an idle 2-core machine
    python benchmarks/train_throughput.py                    # full: the whole train split, steadier numbers

Targets (issue 14): (c) >= 0.9x (a) for supervised; a mean-teacher step <= 3x a
supervised step. Numbers from a machine other processes are using are noise.

Contention: ``--contend N`` runs every contender beside N busy single-threaded processes
(``while True: pass``), the way a shared machine is busy, and writes
``train_throughput_<setting>_contend<N>.{md,json}`` with each row's images/s against the
idle run's (``--contend 0``, run first). The plain loops keep their threads fixed, as a
plain loop does; segrl chooses its threads from the free cores (``segrl/threads.py``).

    python benchmarks/train_throughput.py --setting small --contend 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from segrl.config import load_config, to_dict
from segrl.data.batch_augment import batch_weak_views
from segrl.data.build import build_training_sets
from segrl.data.cache import cache_frames
from segrl.engine.train import use_local_cluster_env
from segrl.methods.recipes import build_recipe
from segrl.models import build_model
from segrl.training import (
    StepContext,
    build_optimizer,
    build_scheduler,
    recipe_step,
)

SETTINGS = {
    # labeled frames (the rest of the train split is the unlabeled set), epochs (the last timed)
    "small": {"labeled": 48, "epochs": 2},
    "full": {"labeled": 176, "epochs": 6},  # 22 steps an epoch; the other 191 frames give 23 unlabeled batches
}
RECIPES = {
    "supervised": ["method.name=supervised"],
    "mean_teacher_classmix": ["method.name=mean_teacher", "method.classmix=true", "method.cold_start_epochs=0"],
}
BATCH, SIZE = 8, (180, 240)


def experiment(setting: dict, recipe: str, threads: int, workers: int, root: str, data_root: str,
               cache: bool = True, *extra: str):
    return load_config("configs/camvid_supervised.yaml", overrides=[
        f"name=throughput_{recipe}_{workers}w",
        f"store.root={root}",
        f"data.root={data_root}",
        f"data.labeled_count={setting['labeled']}",
        f"data.cache_bytes={512 * 2**20 if cache else 0}",
        f"train.batch_size={BATCH}",
        f"train.epochs={setting['epochs']}",
        "train.schedule=constant",
        f"train.eval_every_epochs={setting['epochs']}",
        "train.log_every_steps=100000",
        f"compute.num_workers={workers}",
        f"compute.cpus_per_worker={max(threads // workers, 1)}",
        f"compute.threads_per_worker={max(threads // workers, 1)}",
        *RECIPES[recipe],
        *extra,
    ])


def in_memory(dataset) -> dict[str, torch.Tensor]:
    """The set's frames decoded and resized once: uint8 images, masks."""
    cached, _ = cache_frames(dataset, 2**40)
    frames = cached.frames
    return {"image": torch.stack([f["image"].as_subclass(torch.Tensor) for f in frames]),
            "mask": torch.stack([f["mask"].as_subclass(torch.Tensor) for f in frames]).long()}


def plain_step_context(cfg, classes: int, total_steps: int):
    model = build_model(cfg.model.arch, classes)
    model.train()
    recipe = build_recipe(cfg.method, model, torch.ones(classes), 255, cfg.train.seed)
    optimizer = build_optimizer(torch.nn.ModuleList([model]), cfg.train)
    scheduler = build_scheduler(optimizer, total_steps, cfg.train)
    ctx = StepContext(model, optimizer, scheduler, torch.device("cpu"), 255, None, None, torch.nn.ModuleList())
    return ctx, recipe


def timed_epochs(epochs: int, run_epoch) -> tuple[float, int]:
    """(seconds, steps) of all but the first of ``epochs`` calls of ``run_epoch() -> steps``
    (of the one call when there is just one)."""
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        steps = run_epoch()
        times.append((time.perf_counter() - started, steps))
    timed = times[1:] or times
    return sum(seconds for seconds, _ in timed), sum(steps for _, steps in timed)


def plain_in_memory(cfg, sets, threads: int) -> tuple[float, int]:
    """(a): uint8 frames in memory, batched augmentation, the recipe's step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    labeled = in_memory(sets.labeled)
    unlabeled = in_memory(sets.unlabeled) if cfg.method.name != "supervised" else None
    steps_per_epoch = labeled["image"].shape[0] // BATCH
    ctx, recipe = plain_step_context(cfg, len(sets.classes), steps_per_epoch * cfg.train.epochs)
    scale = tuple(cfg.data.scale_range)

    def views(frames: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return batch_weak_views(frames["image"][idx], frames["mask"][idx], SIZE, scale)

    def run_epoch() -> int:
        order = torch.randperm(labeled["image"].shape[0])
        for step in range(steps_per_epoch):
            batch_u = None
            if unlabeled is not None:
                batch_u = views(unlabeled, torch.randint(unlabeled["image"].shape[0], (BATCH,)))
            recipe_step(ctx, recipe, views(labeled, order[step * BATCH:(step + 1) * BATCH]), batch_u, 1)
            recipe.after_step(ctx.model, step)
        return steps_per_epoch

    return timed_epochs(cfg.train.epochs, run_epoch)


def plain_dataloader(cfg, sets, threads: int) -> tuple[float, int]:
    """(b): a DataLoader decoding PNGs in the training process, the recipe's step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(sets.labeled, batch_size=BATCH, shuffle=True, drop_last=True)
    unlabeled = None
    if cfg.method.name != "supervised":
        unlabeled = torch.utils.data.DataLoader(sets.unlabeled, batch_size=BATCH, shuffle=True, drop_last=True)
    ctx, recipe = plain_step_context(cfg, len(sets.classes), len(loader) * cfg.train.epochs)

    def run_epoch() -> int:
        steps = 0
        batches_u = iter(unlabeled) if unlabeled is not None else None
        for batch in loader:
            recipe_step(ctx, recipe, batch, next(batches_u) if batches_u is not None else None, 1)
            recipe.after_step(ctx.model, steps)
            steps += 1
        return steps

    return timed_epochs(cfg.train.epochs, run_epoch)


def segrl_ray(cfg) -> tuple[float, int, dict]:
    """(c), (d): segrl's training job; the seconds and steps of its epochs but the first (as
    :func:`timed_epochs`), and its last epoch's record (overheads)."""
    from segrl.engine.train import train

    history = train(cfg).metrics["history"]
    timed = history[1:] or history
    steps = cfg.data.labeled_count // cfg.compute.num_workers // BATCH  # each worker's, in step, per epoch
    seconds = sum(steps * BATCH * cfg.compute.num_workers / epoch["images_per_s"] for epoch in timed)
    return seconds, steps * len(timed), history[-1]


def ray_seconds_and_steps(cfg) -> tuple[float, int]:
    return segrl_ray(cfg)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="full")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each contender in total")
    parser.add_argument("--data-root", default="../shared/data/camvid")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES))
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--contend", type=int, default=0,
                        help="busy single-threaded processes running beside every contender")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]

    import ray

    use_local_cluster_env()  # the settings of the local cluster segrl starts
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    rows = []
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.contend)]
    try:
        table = run_contenders(args, setting, rows)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    ray.shutdown()
    print("\n" + table)
    print(f"\nresults: {args.out_dir}/{results_name(args.setting, args.contend)}.{{md,json}}")


def results_name(setting: str, contend: int = 0) -> str:
    """The results' file name (no suffix) of a run of ``setting`` beside ``contend`` busy processes."""
    return f"train_throughput_{setting}" + (f"_contend{contend}" if contend else "")


def run_contenders(args, setting: dict, rows: list[dict]) -> str:
    table = ""
    with tempfile.TemporaryDirectory() as root:
        for recipe in args.recipes:
            cfg = experiment(setting, recipe, args.threads, 1, root, args.data_root, cache=False)
            sets = build_training_sets(cfg.data, cfg.train.seed)
            contenders = [("(a) plain loop, frames in memory, batched augmentation",
                           partial(plain_in_memory, cfg, sets, args.threads)),
                          ("(b) plain loop, DataLoader decoding PNGs",
                           partial(plain_dataloader, cfg, sets, args.threads))]
            for workers in (1, 2):
                ray_cfg = experiment(setting, recipe, args.threads, workers, root, args.data_root)
                contenders.append((f"({'c' if workers == 1 else 'd'}) segrl Ray Train, {workers} worker"
                                   f"{'s' if workers > 1 else ''}", partial(ray_seconds_and_steps, ray_cfg)))
            if recipe != "supervised":
                # the worker holds all but the decode tasks' CPU; its threads still take both cores
                streamed_cfg = experiment(setting, recipe, args.threads, 1, root, args.data_root, True,
                                          "data.stream_unlabeled=always", f"compute.cpus_per_worker={args.threads - 0.5}",
                                          "data.stream_decode_cpus=0.5", f"name=throughput_{recipe}_streamed")
                contenders.append(("(e) segrl Ray Train, 1 worker, unlabeled set streamed through Ray Data",
                                   partial(ray_seconds_and_steps, streamed_cfg)))
            for name, run in contenders:
                seconds, steps = run()
                images = steps * BATCH * (2 if name.startswith("(d)") else 1)  # (d): two batches a step
                rows.append({"recipe": recipe, "contender": name, "steps": steps, "seconds": seconds,
                             "labeled_images_per_s": images / seconds, "seconds_per_step": seconds / steps})
                print(f"[throughput] {recipe}: {name}: {rows[-1]['labeled_images_per_s']:.2f} labeled images/s",
                      flush=True)
                table = write_results(rows, setting, args)  # after every row: a stopped run keeps its rows
    return table


def idle_rows(args) -> dict[tuple[str, str], dict]:
    """The idle run's rows by (recipe, contender), when this run is a contended one."""
    path = Path(args.out_dir) / f"{results_name(args.setting)}.json"
    if not args.contend or not path.exists():
        return {}
    return {(r["recipe"], r["contender"]): r for r in json.loads(path.read_text())["rows"]}


def write_results(rows: list[dict], setting: dict, args) -> str:
    table = format_table(rows, args, idle_rows(args))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{results_name(args.setting, args.contend)}.md").write_text(table + "\n")
    (out / f"{results_name(args.setting, args.contend)}.json").write_text(json.dumps({
        "setting": args.setting, **setting, "threads": args.threads, "contend": args.contend,
        "batch": BATCH, "size": SIZE,
        "cpus": os.cpu_count(), "load_average": os.getloadavg(),
        "config": to_dict(experiment(setting, args.recipes[0], args.threads, 1, "<temporary folder>", args.data_root)),
        "rows": rows,
    }, indent=2))
    return table


def format_table(rows: list[dict], args, idle: dict[tuple[str, str], dict] | None = None) -> str:
    """The rows as a markdown table; with ``idle`` (a contended run's idle rows) two more
    columns: the idle images/s and the share of it kept under load."""
    idle = idle or {}
    reference = {r["recipe"]: r for r in rows if r["contender"].startswith("(a)")}
    supervised = {r["contender"]: r for r in rows if r["recipe"] == "supervised"}
    load = f", beside {args.contend} busy single-threaded processes" if args.contend else ""
    extra = " idle images/s | kept under load |" if idle else ""
    lines = [f"Training throughput: LR-ASPP MobileNetV3-Large, CamVid {SIZE[0]}x{SIZE[1]}, batch {BATCH}, "
             f"{args.threads} CPU threads per contender, setting '{args.setting}'{load} "
             f"(load average when written: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", "",
             "| recipe | contender | labeled images/s | s/step | ratio to (a) | step vs supervised |" + extra,
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if idle else "")]
    for r in rows:
        ratio = r["labeled_images_per_s"] / reference[r["recipe"]]["labeled_images_per_s"]
        base = supervised.get(r["contender"])
        versus = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "-"
        line = (f"| {r['recipe']} | {r['contender']} | {r['labeled_images_per_s']:.2f} | "
                f"{r['seconds_per_step']:.3f} | {ratio:.2f}x | {versus} |")
        if idle:
            before = idle.get((r["recipe"], r["contender"]))
            line += (f" {before['labeled_images_per_s']:.2f} | "
                     f"{r['labeled_images_per_s'] / before['labeled_images_per_s']:.0%} |" if before else " - | - |")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
