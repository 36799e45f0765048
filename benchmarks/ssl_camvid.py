"""Label efficiency of the self-training recipes on real data (CamVid).

Two tables, each run with the same model, resolution and optimiser steps per training run:

1. semi-supervised: 1/8 of CamVid train labeled (46 images, a fixed id list written to
   the store), the other 321 unlabeled, evaluated on val: supervised only, ST, ST++,
   mean teacher (+ Balanced ClassMix), mean teacher + STAL contrastive.
2. day -> dusk: daylight train frames (0006R0, 0016E5) labeled, dusk frames (0001TP)
   unlabeled, 20 dusk frames held out (a fixed draw) for evaluation: source only, ST,
   ProDA (started from the source-only model).

    python benchmarks/ssl_camvid.py                      # small: 90x120, 240 steps per run
    python benchmarks/ssl_camvid.py --setting full       # 180x240, 1350 steps per run
    python benchmarks/ssl_camvid.py --only semi --methods supervised,mean_teacher

Writes ``benchmarks/results/ssl_camvid_<setting>.json`` and ``.md`` and prints the tables.
ST and ST++ train several runs (teacher and students), each with the same step budget;
the table reports their total steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SETTINGS = {
    "small": {"size": (90, 120), "steps": 240, "batch": 8, "eval_every": 1000},
    "full": {"size": (180, 240), "steps": 1350, "batch": 8, "eval_every": 1000},
}
LABELED = 46  # 1/8 of the 367 train frames

SEMI = {
    "supervised": ["method.name=supervised"],
    "st": ["method.name=st"],
    "st_pp": ["method.name=st_pp", "method.checkpoints_k=3", "method.reliable_ratio=0.5"],
    "mean_teacher_classmix": ["method.name=mean_teacher", "method.classmix=true", "method.replay_buffer=32",
                              "method.cold_start_epochs=5"],
    "mean_teacher_contrastive": ["method.name=mean_teacher", "method.lambda_contrastive=0.1",
                                 "method.cold_start_epochs=5"],
}
DUSK = {
    "source_only": ["method.name=supervised"],
    "st": ["method.name=st"],
    "proda": ["method.name=proda", "method.lambda_structure=0.1"],
}


def overrides(setting: dict, data_root: str, store: str, steps_per_epoch: int) -> list[str]:
    h, w = setting["size"]
    epochs = max(1, round(setting["steps"] / steps_per_epoch))
    return [
        "data.dataset=camvid", f"data.root={data_root}", f"data.base_size=[{h},{w}]", f"data.crop_size=[{h},{w}]",
        "data.scale_range=[0.75,1.5]", f"store.root={store}", "model.arch=lraspp_mobilenet_v3_large",
        f"train.epochs={epochs}", f"train.batch_size={setting['batch']}", "train.optimizer=adamw", "train.lr=0.002",
        "train.schedule=onecycle", f"train.eval_every_epochs={min(epochs, setting['eval_every'])}",
        "train.keep_checkpoints=1", "train.log_every_steps=100000",
        "compute.num_workers=1", "compute.cpus_per_worker=1", "compute.threads_per_worker=2",
    ]


def run_one(name: str, args: list[str]) -> dict:
    from segrl.config import load_config
    from segrl.engine.selftrain import run_self_training
    from segrl.engine.train import train

    cfg = load_config(overrides=[f"name={name}", *args])
    started = time.perf_counter()
    if cfg.method.name in ("st", "st_pp"):
        summary = run_self_training(cfg)
        steps = sum(s.get("steps") or 0 for s in summary.stages.values())
    else:
        summary = train(cfg)
        steps = summary.metrics["step"]
    seconds = time.perf_counter() - started
    metrics = summary.metrics
    return {"method": name, "val_miou": metrics["val_miou"], "per_class": metrics.get("val_iou_per_class"),
            "steps": steps, "seconds": seconds, "run": summary.run_uri}


def table(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| method | mIoU % | optimiser steps | wall time |", "| --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['method']} | {100 * row['val_miou']:.2f} | {row['steps']} | "
                     f"{row['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/camvid"))
    parser.add_argument("--store", default="runs/bench_ssl_camvid")
    parser.add_argument("--only", choices=("semi", "dusk"), default=None)
    parser.add_argument("--methods", default="", help="comma-separated subset of method names")
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    wanted = set(filter(None, args.methods.split(",")))
    store_root = str(Path(args.store).resolve()) + f"_{args.setting}"
    results: dict[str, list[dict]] = {"semi": [], "dusk": []}
    out = Path(__file__).parent / "results" / f"ssl_camvid_{args.setting}.json"
    if out.exists():  # keep earlier rows when a subset is rerun
        results.update(json.loads(out.read_text()).get("results", {}))

    from segrl.config import load_config
    from segrl.data.build import build_training_sets
    from segrl.storage import open_store

    if args.only in (None, "semi"):
        base = load_config(overrides=["data.dataset=camvid", f"data.root={args.data_root}",
                                      f"data.labeled_count={LABELED}"])
        ids = build_training_sets(base.data, seed=0).labeled_ids
        store = open_store(store_root)
        store.write_text("labeled_ids.txt", "".join(f"{i}\n" for i in ids))
        common = [*overrides(setting, args.data_root, store_root, LABELED // setting["batch"]),
                  f"data.labeled_ids={store.uri('labeled_ids.txt')}"]
        for method, extra in SEMI.items():
            if wanted and method not in wanted:
                continue
            row = run_one(f"semi_{method}", [*common, *extra])
            row["method"] = method
            results["semi"] = [r for r in results["semi"] if r["method"] != method] + [row]
            _save(out, args.setting, setting, results)
    if args.only in (None, "dusk"):
        dusk_data = ["data.target_prefixes=[0001TP]", "data.target_eval_count=20"]
        base = load_config(overrides=["data.dataset=camvid", f"data.root={args.data_root}", *dusk_data])
        sources = len(build_training_sets(base.data, seed=0).labeled)
        common = [*overrides(setting, args.data_root, store_root, sources // setting["batch"]), *dusk_data]
        source_run = None
        for method, extra in DUSK.items():
            if wanted and method not in wanted:
                continue
            more = list(extra)
            if method == "proda":
                source_run = source_run or str(Path(store_root) / "dusk_source_only")
                checkpoint = sorted((Path(source_run) / "train").glob("ckpt_*"))[-1] / "checkpoint.pt"
                more.append(f"model.weights={checkpoint}")
            row = run_one(f"dusk_{method}", [*common, *more])
            row["method"] = method
            if method == "source_only":
                source_run = row["run"]
            results["dusk"] = [r for r in results["dusk"] if r["method"] != method] + [row]
            _save(out, args.setting, setting, results)
    print(out.with_suffix(".md").read_text())


def _save(out: Path, name: str, setting: dict, results: dict[str, list[dict]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": name, **setting, "results": results}, indent=2))
    text = [f"CamVid label efficiency, setting '{name}': {setting}", ""]
    if results["semi"]:
        text += [table(results["semi"], f"1/8 labeled ({LABELED} images), val mIoU"), ""]
    if results["dusk"]:
        text += [table(results["dusk"], "day -> dusk, held-out dusk mIoU (20 frames)"), ""]
    out.with_suffix(".md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
