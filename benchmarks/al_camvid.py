"""Active learning on CamVid: which pixels to label, compared at equal labeling cost.

CamVid train (367 frames) is the pool, val is the eval set, the oracle answers from the
train labels. Every method runs the same loop: the same initial random images (~2% of
the pool's pixels), the same recipe, the same optimiser steps per round, warm-started
from the previous round; only the acquisition differs. Labeled shares after the rounds
are about 2%, 6% and 10% of the pool's pixels (two rounds of 4% each, in both settings);
LabOR PPL pays in clicks: its share is the clicked pixels. Full supervision (all 367 images,
as many optimiser steps as a whole loop takes) is the reference.

    python benchmarks/al_camvid.py                     # small: 90x120, 80 steps per round, 3 rounds
    python benchmarks/al_camvid.py --setting full      # 180x240, 600 steps per round, 3 rounds
    python benchmarks/al_camvid.py --methods random,entropy

Writes benchmarks/results/al_camvid_<setting>.{json,md,png} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SETTINGS = {
    "small": {"size": (90, 120), "steps": 80, "region": (16, 16), "rounds": 2, "budget": 0.04},
    "full": {"size": (180, 240), "steps": 600, "region": (32, 32), "rounds": 2, "budget": 0.04},
}
METHODS = {
    "random": ["al.acquisition=random"],
    "entropy": ["al.acquisition=entropy"],
    "region_entropy": ["al.acquisition=region_entropy", "al.regions_top_r=16"],
    "labor_spl": ["al.acquisition=labor_spl"],
    "labor_ppl": ["al.acquisition=labor_ppl", "al.budget_unit=clicks", "al.budget_per_round=2000",
                  "al.points_per_image=20"],
}


def common(setting: dict, data_root: str, store: str) -> list[str]:
    h, w = setting["size"]
    rh, rw = setting["region"]
    return [
        "data.dataset=camvid", f"data.root={data_root}", f"data.base_size=[{h},{w}]", f"data.crop_size=[{h},{w}]",
        "data.scale_range=[0.75,1.5]", f"store.root={store}", "model.arch=lraspp_mobilenet_v3_large",
        f"train.steps={setting['steps']}", "train.batch_size=8", "train.lr=0.002", "train.schedule=onecycle",
        "train.eval_every_epochs=1000", "train.log_every_steps=100000", "method.name=supervised",
        f"al.rounds={setting['rounds']}", "al.initial_labeled=7", f"al.budget_per_round={setting['budget']}",
        f"al.region_size=[{rh},{rw}]",
        "compute.num_workers=1", "compute.cpus_per_worker=1", "compute.threads_per_worker=2",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/camvid"))
    parser.add_argument("--store", default="runs/bench_al_camvid")
    parser.add_argument("--methods", default="", help="comma-separated subset (and/or 'full')")
    args = parser.parse_args()
    from segrl.config import load_config
    from segrl.engine.train import train
    from segrl.loop.run import run_loop

    setting = SETTINGS[args.setting]
    store = str(Path(args.store).resolve()) + f"_{args.setting}"
    wanted = set(filter(None, args.methods.split(",")))
    out = Path(__file__).parent / "results" / f"al_camvid_{args.setting}.json"
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    base = common(setting, args.data_root, store)
    for method, extra in METHODS.items():
        if wanted and method not in wanted:
            continue
        started = time.perf_counter()
        summary = run_loop(load_config(overrides=[*base, f"name=al_{method}", *extra]))
        results[method] = {"rounds": summary.rounds, "seconds": time.perf_counter() - started,
                           "run": summary.run_uri}
        _save(out, args.setting, setting, results)
    if not wanted or "full" in wanted:
        started = time.perf_counter()
        # the loop warm-starts every round, so its final model has seen (rounds + 1) x steps
        total_steps = setting["steps"] * (setting["rounds"] + 1)
        full = train(load_config(overrides=[*base, "name=al_full_supervision", f"train.steps={total_steps}"]))
        results["full_supervision"] = {"val_miou": full.metrics["val_miou"], "steps": full.metrics["step"],
                                       "seconds": time.perf_counter() - started}
        _save(out, args.setting, setting, results)
    print(out.with_suffix(".md").read_text())


def _save(out: Path, name: str, setting: dict, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": name, **setting, "results": results}, indent=2))
    lines = [f"CamVid active learning, setting '{name}': {setting}", "",
             "| method | round 0: share % / mIoU % | round 1 | round 2 | wall time |", "| --- | --- | --- | --- | ---: |"]
    for method, result in results.items():
        if method == "full_supervision":
            continue
        cells = [f"{100 * r['labeled_share']:.2f} / {100 * r['val_miou']:.2f}" for r in result["rounds"]]
        cells += ["-"] * (3 - len(cells))
        lines.append(f"| {method} | {' | '.join(cells)} | {result['seconds'] / 60:.1f} min |")
    if "full_supervision" in results:
        full = results["full_supervision"]
        lines.append(f"| full supervision (100%) | {100 * full['val_miou']:.2f} mIoU, {full['steps']} steps | | | "
                     f"{full['seconds'] / 60:.1f} min |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(out.with_suffix(".png"), results, name)


def _plot(path: Path, results: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, result in results.items():
        if method == "full_supervision":
            ax.axhline(100 * result["val_miou"], color="grey", linestyle="--", label="full supervision")
            continue
        rounds = result["rounds"]
        ax.plot([100 * r["labeled_share"] for r in rounds], [100 * r["val_miou"] for r in rounds],
                marker="o", label=method)
    ax.set_xlabel("labeled share of the pool's pixels (%)")
    ax.set_ylabel("CamVid val mIoU (%)")
    ax.set_title(f"active learning on CamVid ({name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
