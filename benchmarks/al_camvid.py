"""Label efficiency on CamVid: mIoU per labeled pixel, every row with the reference's steps.

CamVid train (367 frames) is the pool, val (101) the evaluation set; the oracle answers
from the train labels. One model (LR-ASPP MobileNetV3-Large from scratch), one resolution,
one optimiser and schedule for every training run in the table:

- The reference is full supervision (every train label) with ``steps`` optimiser steps,
  run again with twice the steps: if doubling gains less than 1 mIoU it has converged
  (the table says which).
- Every row trains every round from scratch with exactly the reference's steps
  (``al.retrain=from_scratch``, ``al.scale_steps=false``), so the rows differ by their
  labels only, and every number, a loop's intermediate rounds included, had the same steps.
- Budgets: clicks per image on average (5, 20, 100; a click labels one pixel) for the
  point rows, and about 1%, 5.5% and 10% of the pool's pixels for whole-image and region rows
  (a loop of 1% random images, then two rounds of 4.5%).
- Point loops follow PixelPick: round 0 asks random clicks in every image, round 1 asks the
  rest of the budget by the acquisition; random points ask the whole budget at random.

Rows run in the order of ``PLAN`` (most informative first), each a loop in its own run
folder; the benchmark is resumable (a finished row is not rerun, an interrupted one
resumes inside its loop) and rewrites its table, JSON and plot after every row.

    python benchmarks/al_camvid.py                          # small: 90x120, 2000 steps a training run
    python benchmarks/al_camvid.py --setting full           # 180x240, 2750 steps
    python benchmarks/al_camvid.py --rows random_points@20,pixelpick_points@20 --seeds 0,1,2
    python benchmarks/al_camvid.py --list                   # the rows and their order
    python benchmarks/al_camvid.py --hold-out-near-val 10   # pool without the frames 10 s from val

Writes benchmarks/results/al_camvid_<setting>.{json,md,png} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETTINGS = {
    "small": {"size": (90, 120), "steps": 2000, "region": (16, 16), "batch": 8},
    "full": {"size": (180, 240), "steps": 2750, "region": (32, 32), "batch": 8},
}
POOL_IMAGES = 367  # CamVid train: a per-image click budget x this covers every image
CAMVID_FPS = 30  # CamVid's ids number the frames of 30 Hz video
IMAGE_LOOP = ["al.initial_labeled=4", "al.rounds=2", "al.budget_per_round=0.045", "al.budget_unit=share"]
RECIPES = {
    "supervised": ["method.name=supervised"],
    "mean_teacher": ["method.name=mean_teacher", "method.classmix=true", "method.replay_buffer=32"],
}


def point_loop(acquisition: str, clicks: int) -> list[str]:
    """Round 0: half the clicks at random in every image; round 1: the other half by ``acquisition``."""
    first = clicks // 2
    rest = clicks - first
    return ["al.initial_labeled=0", f"al.initial_points_per_image={first}", "al.rounds=1",
            f"al.acquisition={acquisition}", "al.budget_unit=clicks", f"al.points_per_image={rest}",
            f"al.budget_per_round={rest * POOL_IMAGES}"]


def random_points(clicks: int) -> list[str]:
    return ["al.initial_labeled=0", f"al.initial_points_per_image={clicks}", "al.rounds=0",
            "al.acquisition=random_points", "al.budget_unit=clicks", "al.budget_per_round=1"]


# Budgets in clicks (round 0 of a loop: random clicks in every image) ...
POINT_ROWS = {
    **{f"random_points@{n}": random_points(n) for n in (5, 20, 100)},
    **{f"pixelpick_points@{n}": point_loop("pixelpick_points", n) for n in (5, 20, 100)},
    "margin_points@20": point_loop("margin_points", 20),
    "entropy_points@20": point_loop("entropy_points", 20),
    "labor_ppl@20": point_loop("labor_ppl", 20),
}
# ... and in pixels (round 0: random whole images).
PIXEL_ROWS = {
    "random_images": [*IMAGE_LOOP, "al.acquisition=random"],
    "entropy_images": [*IMAGE_LOOP, "al.acquisition=entropy"],
    # entropy's picks spread in feature space over a shortlist worth 4 budgets (k-center greedy)
    "entropy_images_spread": [*IMAGE_LOOP, "al.acquisition=entropy", "al.spread_candidates=4"],
    "region_entropy": [*IMAGE_LOOP, "al.acquisition=region_entropy", "al.regions_top_r=16"],
    "ripu_regions": [*IMAGE_LOOP, "al.acquisition=region_impurity", "al.regions_top_r=16"],
    "labor_spl": [*IMAGE_LOOP, "al.acquisition=labor_spl"],
}
ROWS = {**POINT_ROWS, **PIXEL_ROWS}
# (row, recipe, seed) in the order they run: the reference and its convergence check first (a
# reference that gains from doubling its steps makes every row's steps too few), then the rows
# that decide the targets (random and uncertainty points at few clicks, random whole images),
# each measured gap's seeds as soon as it is seen, then the other seeds. ("reference", k): full
# supervision with k x the setting's steps.
PLAN = [
    ("reference", 1), ("reference", 2),
    ("random_points@20", "supervised", 0), ("pixelpick_points@20", "supervised", 0),
    # the first gap (pixelpick +5.25 mIoU over random at 20 clicks, seed 0) needs its spread
    ("random_points@20", "supervised", 1), ("pixelpick_points@20", "supervised", 1),
    ("random_points@20", "supervised", 2), ("pixelpick_points@20", "supervised", 2),
    ("random_points@5", "supervised", 0), ("pixelpick_points@5", "supervised", 0),
    ("random_images", "supervised", 0), ("entropy_images", "supervised", 0),
    ("entropy_images_spread", "supervised", 0),
    ("random_points@100", "supervised", 0), ("pixelpick_points@100", "supervised", 0),
    ("random_images", "supervised", 1), ("random_images", "supervised", 2),
    ("margin_points@20", "supervised", 0), ("entropy_points@20", "supervised", 0),
    ("labor_ppl@20", "supervised", 0), ("region_entropy", "supervised", 0),
    ("ripu_regions", "supervised", 0), ("labor_spl", "supervised", 0),
    ("random_points@5", "supervised", 1), ("random_points@5", "supervised", 2),
    ("pixelpick_points@5", "supervised", 1), ("pixelpick_points@5", "supervised", 2),
    *[(row, "mean_teacher", 0) for row in ("random_points@20", "pixelpick_points@20", "random_images",
                                           "entropy_images")],
]


def common(setting: dict, data_root: str, store: str) -> list[str]:
    h, w = setting["size"]
    rh, rw = setting["region"]
    return [
        "data.dataset=camvid", f"data.root={data_root}", f"data.base_size=[{h},{w}]", f"data.crop_size=[{h},{w}]",
        "data.scale_range=[0.75,1.5]", f"store.root={store}", "model.arch=lraspp_mobilenet_v3_large",
        f"train.steps={setting['steps']}", f"train.batch_size={setting['batch']}", "train.lr=0.002",
        "train.schedule=onecycle", "train.eval_every_epochs=1000", "train.log_every_steps=100000",
        "train.keep_checkpoints=1", "al.retrain=from_scratch", "al.scale_steps=false", f"al.region_size=[{rh},{rw}]",
        "compute.num_workers=1", "compute.cpus_per_worker=1", "compute.threads_per_worker=2",
    ]


def row_key(row: str, recipe: str, seed: int) -> str:
    return f"{row}/{recipe}/s{seed}"


def run_row(base: list[str], row: str, recipe: str, seed: int, steps: int) -> dict:
    from segrl.config import load_config
    from segrl.loop.run import run_loop

    started = time.perf_counter()
    # the steps in the run's name: a loop run of another setting's steps (which segrl would
    # resume, a finished round as it was) is never taken for this one
    name = row_key(row, recipe, seed).replace("/", "_").replace("@", "_") + f"_steps{steps}"
    cfg = load_config(overrides=[*base, f"name=al_{name}", *ROWS[row], *RECIPES[recipe],
                                 f"al.seed={seed}", f"train.seed={seed}"])
    summary = run_loop(cfg)
    if summary.status != "finished":
        raise RuntimeError(f"row {row} ended with status {summary.status}: {summary.message}")
    check_equal_steps(row, summary.run_uri, summary.rounds, steps)
    rounds = [{k: r[k] for k in ("round", "labeled_images", "labeled_pixels", "clicks", "labeled_share",
                                 "val_miou", "val_iou_per_class", "steps")} for r in summary.rounds]
    return {"row": row, "recipe": recipe, "seed": seed, "rounds": rounds,
            "seconds": time.perf_counter() - started, "run": summary.run_uri}


def frames_near(ids: list[str], reference_ids: list[str], seconds: float, fps: float = CAMVID_FPS) -> list[str]:
    """The ``ids`` filmed within ``seconds`` of a reference frame of the same sequence.

    A CamVid id is ``<sequence>_<frame number>`` (``0016E5_07959``; ``Seq05VD_f00000``), numbered at the video's
    frame rate, so two frames of one sequence lie ``|a - b| / fps`` seconds apart.
    """
    def parts(sample_id: str) -> tuple[str, int]:
        sequence, number = sample_id.rsplit("_", 1)
        return sequence, int(number.lstrip("f") or 0)

    by_sequence: dict[str, list[int]] = {}
    for sequence, number in map(parts, reference_ids):
        by_sequence.setdefault(sequence, []).append(number)
    reach = seconds * fps
    near = []
    for sample_id in ids:
        sequence, number = parts(sample_id)
        if any(abs(number - n) <= reach for n in by_sequence.get(sequence, ())):
            near.append(sample_id)
    return sorted(near)


def held_out_file(data_root: str, store: str, seconds: float) -> tuple[str, int]:
    """(a file in the store listing the train frames within ``seconds`` of a val frame, how many)."""
    from segrl.data.datasets import CamVid  # the ids the pool is built from

    near = frames_near(CamVid(data_root, "train").ids, CamVid(data_root, "val").ids, seconds)
    path = Path(store) / f"held_out_within_{seconds:g}s_of_val.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in near))
    return str(path), len(near)


def check_equal_steps(row: str, run_uri: str, rounds: list[dict], steps: int) -> None:
    """Every round of a row trained exactly the setting's ``steps``, else a RuntimeError
    naming the run and the round: a row of unequal steps is not comparable."""
    for r in rounds:
        if r.get("steps") != steps:
            raise RuntimeError(f"row {row} ({run_uri}): round {r['round']} trained {r.get('steps')} steps, "
                               f"not the setting's {steps}; rows must have equal steps")


def run_reference(base: list[str], steps: int, seed: int) -> dict:
    from segrl.config import load_config
    from segrl.engine.train import train

    started = time.perf_counter()
    summary = train(load_config(overrides=[*base, f"name=al_full_supervision_{steps}_s{seed}",
                                           f"train.steps={steps}", f"train.seed={seed}"]))
    return {"val_miou": summary.metrics["val_miou"], "steps": summary.metrics["step"], "seed": seed,
            "val_iou_per_class": summary.metrics.get("val_iou_per_class"),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data/camvid"))
    parser.add_argument("--store", default="runs/bench_al_camvid")
    parser.add_argument("--rows", default="", help="comma-separated row names (default: the whole PLAN)")
    parser.add_argument("--recipes", default="", help="comma-separated recipes (with --rows; default supervised)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (with --rows; default 0)")
    parser.add_argument("--no-reference", action="store_true", help="skip the full-supervision runs")
    parser.add_argument("--steps", type=int, default=0,
                        help="a quick check with other steps; its tables get their own file names")
    parser.add_argument("--hold-out-near-val", type=float, default=0.0, metavar="SECONDS",
                        help="leave train frames filmed within SECONDS of a val frame out of the pool and the "
                             "reference (CamVid val is one clip; its tables get their own file names)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args()
    plan = PLAN
    if args.rows:
        unknown = [r for r in args.rows.split(",") if r not in ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
        plan = [("reference", 1), ("reference", 2)] + [(row, recipe, int(seed)) for row in args.rows.split(",")
                for recipe in (args.recipes or "supervised").split(",") for seed in (args.seeds or "0").split(",")]
    if args.no_reference:
        plan = [item for item in plan if item[0] != "reference"]
    if args.list:
        for item in plan:
            print(f"full supervision, {item[1]} x steps" if item[0] == "reference" else row_key(*item),
                  ROWS.get(item[0], ""))
        return
    setting = dict(SETTINGS[args.setting], **({"steps": args.steps} if args.steps else {}))
    tag = args.setting + (f"_steps{args.steps}" if args.steps else "")
    if args.hold_out_near_val:
        tag += f"_holdout{args.hold_out_near_val:g}s"
    store = str(Path(args.store).resolve()) + f"_{tag}"
    out = Path(__file__).parent / "results" / f"al_camvid_{tag}.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    results = saved.get("results", {}) if saved.get("steps") == setting["steps"] else {}
    reference = saved.get("reference", {}) if saved.get("steps") == setting["steps"] else {}
    base = common(setting, args.data_root, store)
    if args.hold_out_near_val:
        excluded, count = held_out_file(args.data_root, store, args.hold_out_near_val)
        base.append(f"data.exclude_ids={excluded}")
        setting.update(held_out_seconds=args.hold_out_near_val, pool_images=POOL_IMAGES - count)
    for item in plan:
        if item[0] == "reference":
            steps = item[1] * setting["steps"]
            if str(steps) not in reference:
                reference[str(steps)] = run_reference(base, steps, 0)
                save(out, tag, setting, reference, results)
            continue
        row, recipe, seed = item
        key = row_key(row, recipe, seed)
        if key in results:
            continue  # finished rows are not rerun
        results[key] = run_row(base, row, recipe, seed, setting["steps"])
        save(out, tag, setting, reference, results)
    save(out, tag, setting, reference, results)
    print(out.with_suffix(".md").read_text())


# ---------------------------------------------------------------------- tables


# The pixel rows' budget after each round (4 random images, then two rounds of 4.5% of the
# pixels), by name: what each method actually labeled is in the share column, and methods that
# spend a round's budget a little differently still share a line.
PIXEL_BUDGETS = ("~1% pixels", "~5.5% pixels", "~10% pixels")


def points(result: dict, pool_images: int = POOL_IMAGES) -> list[dict]:
    """One entry per round of a row: its budget, labeled share and mIoU."""
    entries = []
    for r in result["rounds"]:
        if result["row"] in POINT_ROWS:
            budget = f"{round(r['clicks'] / pool_images)} clicks/img"
        else:
            budget = PIXEL_BUDGETS[r["round"]]
        entries.append({"budget": budget, "share": r["labeled_share"], "miou": r["val_miou"], "round": r["round"]})
    return entries


def budget_groups(results: dict, pool_images: int = POOL_IMAGES) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """(budget, recipe) -> method -> [one entry per seed]. Round 0 of a loop is what it
    labeled: random clicks (point loops) or random images, so it joins those methods; a
    seed's entry that two loops share (the same round 0) counts once."""
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for result in results.values():
        for entry in points(result, pool_images):
            method = result["row"].split("@")[0]
            if entry["round"] == 0 and method != "random_images":
                method = "random_points" if result["row"] in POINT_ROWS else "random_images"
            seeds = groups.setdefault((entry["budget"], result["recipe"]), {}).setdefault(method, [])
            if all(e["seed"] != result["seed"] for e in seeds):
                seeds.append(dict(entry, seed=result["seed"]))
    return groups


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _budget_order(budget: str) -> tuple[int, float]:
    number = float(budget.split()[0].lstrip("~").rstrip("%"))
    return (0 if "clicks" in budget else 1, number)


RANDOM_METHODS = ("random_points", "random_images")


def _per_seed_gaps(active: list[dict], baseline: list[dict]) -> str:
    """'; ahead on k of n seeds (+a / +b ...), paired gap mean ± std' for two or more paired
    seeds, else ''. The paired spread is the seeds' spread of the gap itself: a seed's round 0
    starts both rows, so much of what varies between seeds varies in both."""
    base = {e["seed"]: e["miou"] for e in baseline}
    gaps = [100 * (e["miou"] - base[e["seed"]]) for e in sorted(active, key=lambda e: e["seed"])]
    if len(gaps) < 2:
        return ""
    mean, std = mean_std(gaps)
    return (f"; ahead on {sum(g > 0 for g in gaps)} of {len(gaps)} seeds ({' / '.join(f'{g:+.2f}' for g in gaps)}),"
            f" paired gap {mean:+.2f} ± {std:.2f}")


def _on_seeds(baseline: list[dict], active: list[dict]) -> tuple[list[dict], list[dict]]:
    """The active row's entries and the baseline's, both on the seeds they share."""
    shared = {e["seed"] for e in baseline} & {e["seed"] for e in active}
    return [e for e in active if e["seed"] in shared], [e for e in baseline if e["seed"] in shared]


def target_lines(groups: dict, ref: dict | None, results: dict) -> list[str]:
    """The issue's targets, each met, missed or not measured yet, from the table's own numbers.

    - at <= 20 and <= 5 clicks per image the best row reaches 95% / 85% of full supervision;
    - at <= 20 clicks the best active row beats random points at the same clicks by >= 2 mIoU
      and by more than the two rows' seed spreads;
    - at every pixel budget the best row beats random whole images;
    - no round of a row ends below the round before it by more than that row's seed spread.
    """
    lines = []
    full = 100 * ref["val_miou"] if ref else None

    def stats(entries: list[dict]) -> tuple[float, float]:
        mean, std = mean_std([100 * e["miou"] for e in entries])
        return mean, std or 0.0

    def clicks_of(budget: str) -> int | None:
        return int(budget.split()[0]) if budget.endswith("clicks/img") else None

    for limit, share in ((20, 95), (5, 85)):
        within = [(stats(es)[0], m, b, r) for (b, r), methods in groups.items() for m, es in methods.items()
                  if (clicks_of(b) or 10**9) <= limit]
        if not within or full is None:
            lines.append(f"- at <= {limit} clicks/img, best row >= {share}% of full: not measured")
            continue
        best = max(within)
        got = 100 * best[0] / full
        lines.append(f"- at <= {limit} clicks/img, best row >= {share}% of full: {'met' if got >= share else 'MISSED'}"
                     f" ({best[1]}, {best[3]}, {best[2]}: {best[0]:.2f} mIoU = {got:.1f}%)")
    for (budget, recipe), methods in sorted(groups.items(), key=lambda k: (_budget_order(k[0][0]), k[0][1])):
        clicks = clicks_of(budget)
        baseline = "random_points" if clicks is not None else "random_images"
        if (clicks is not None and clicks > 20) or baseline not in methods:
            continue
        # Each active row is compared on the seeds it shares with the baseline: a seed's round 0
        # (its random labels) starts every loop of that seed, so a lucky seed lifts both rows.
        paired = {m: _on_seeds(methods[baseline], es) for m, es in methods.items() if m not in RANDOM_METHODS}
        paired = {m: (es, base) for m, (es, base) in paired.items() if base}
        if not paired:
            continue
        # The best row is the best of those with the most seeds: one lucky seed does not outrank
        # a mean over three.
        name, (entries, base_entries) = max(paired.items(), key=lambda kv: (len(kv[1][0]), stats(kv[1][0])[0]))
        (mean, std), (base_mean, base_std) = stats(entries), stats(base_entries)
        gap = mean - base_mean
        need = max(2.0, std + base_std) if clicks is not None else std + base_std
        n_active, n_base = len(entries), len(base_entries)
        # One seed has no spread: a gap that clears the bar there is not yet beyond the seeds'.
        verdict = "MISSED" if gap <= need else ("met" if min(n_active, n_base) > 1 else "met on one seed, spread not known")
        lines.append(f"- {budget} ({recipe}): best active row {name} {mean:.2f} vs {baseline} {base_mean:.2f}: "
                     f"{gap:+.2f} mIoU, needed > {need:.2f}: {verdict} (n = {n_active} and {n_base})"
                     + _per_seed_gaps(entries, base_entries))
    by_row: dict[tuple[str, str], list[list[float]]] = {}
    for result in results.values():
        by_row.setdefault((result["row"], result["recipe"]), []).append(
            [100 * r["val_miou"] for r in result["rounds"]])
    drops = []
    for (row, recipe), seeds in sorted(by_row.items()):
        rounds = min(len(s) for s in seeds)
        per_round = [stats([{"miou": s[i] / 100} for s in seeds]) for i in range(rounds)]
        for i in range(1, rounds):
            drop = per_round[i - 1][0] - per_round[i][0]
            if drop > max(per_round[i - 1][1], per_round[i][1]):
                drops.append(f"{row} ({recipe}) round {i}: {-drop:+.2f} mIoU (n = {len(seeds)})")
    lines.append("- no later round below the one before beyond the seeds' spread: "
                 + ("met" if not drops else "MISSED: " + "; ".join(drops)))
    return lines


def save(out: Path, name: str, setting: dict, reference: dict, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": name, **setting, "reference": reference, "results": results}, indent=2))
    ref = reference.get(str(setting["steps"]))
    pool_images = setting.get("pool_images", POOL_IMAGES)
    lines = [f"# CamVid label efficiency, setting '{name}'", "",
             f"{setting['size'][0]}x{setting['size'][1]}, batch {setting['batch']}, LR-ASPP MobileNetV3-Large from "
             f"scratch, AdamW one-cycle; every training run {setting['steps']} optimiser steps; val mIoU (%).", ""]
    if setting.get("held_out_seconds"):
        lines += [f"Train frames filmed within {setting['held_out_seconds']:g} s of a val frame (same sequence, "
                  f"{POOL_IMAGES - pool_images} of {POOL_IMAGES}) are held out of the pool and of the reference: "
                  f"val is one clip, and frames beside it reward covering it.", ""]
    lines += ["## Reference: full supervision", "", "| steps | val mIoU % | wall time |", "| ---: | ---: | ---: |"]
    for steps, r in sorted(reference.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {steps} | {100 * r['val_miou']:.2f} | {r['seconds'] / 60:.1f} min |")
    doubled = reference.get(str(2 * setting["steps"]))
    if ref and doubled:
        gain = 100 * (doubled["val_miou"] - ref["val_miou"])
        verdict = "converged (doubling gains < 1 mIoU)" if gain < 1 else "NOT converged (doubling gains >= 1 mIoU)"
        lines += ["", f"Doubling the steps: {gain:+.2f} mIoU: {verdict}."]
    lines += ["", "## By budget", "",
              "mean ± std over seeds (n); % of full = of the reference at the rows' steps; labeled share = of the "
              f"pool's original pixels ({pool_images} frames of 360x480), a click labels one pixel. Rows with other seeds "
              "are not comparable line by line: a loop's round 0 is its seed's random labels; the targets "
              "compare each active row with random on the seeds both ran.", "",
              "| budget | recipe | method | labeled share % | val mIoU % | n | % of full |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    groups = budget_groups(results, pool_images)
    for (budget, recipe) in sorted(groups, key=lambda k: (_budget_order(k[0]), k[1])):
        for method, entries in sorted(groups[(budget, recipe)].items(),
                                      key=lambda kv: -statistics.fmean(e["miou"] for e in kv[1])):
            mean, std = mean_std([100 * e["miou"] for e in entries])
            share = statistics.fmean(100 * e["share"] for e in entries)
            full = f"{mean / (100 * ref['val_miou']) * 100:.1f}" if ref else "-"
            spread = f" ± {std:.2f}" if std is not None else ""
            lines.append(f"| {budget} | {recipe} | {method} | {share:.3g} | {mean:.2f}{spread} | {len(entries)} | {full} |")
    lines += ["", "## Targets", "", *target_lines(groups, ref, results)]
    lines += ["", "## Rows, round by round", "",
              "| row | recipe | seed | rounds: share % / mIoU % | wall time |", "| --- | --- | ---: | --- | ---: |"]
    for result in results.values():
        cells = " → ".join(f"{100 * r['labeled_share']:.3g} / {100 * r['val_miou']:.2f}" for r in result["rounds"])
        lines.append(f"| {result['row']} | {result['recipe']} | {result['seed']} | {cells} | "
                     f"{result['seconds'] / 60:.1f} min |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(out.with_suffix(".png"), name, ref, groups)


def _plot(path: Path, name: str, ref: dict | None, groups: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for (_, recipe), methods in groups.items():
        for method, entries in methods.items():
            mean, std = mean_std([100 * e["miou"] for e in entries])
            share = statistics.fmean(100 * e["share"] for e in entries)
            curves.setdefault((method.split(" (")[0], recipe), []).append((share, mean, std or 0.0))
    for (method, recipe), pts in sorted(curves.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    linestyle="-" if recipe == "supervised" else "--", label=f"{method} ({recipe})")
    if ref:
        ax.axhline(100 * ref["val_miou"], color="grey", linestyle=":", label="full supervision")
    ax.set_xscale("log")
    ax.set_xlabel("labeled share of the pool's pixels (%, log)")
    ax.set_ylabel("CamVid val mIoU (%)")
    ax.set_title(f"label efficiency on CamVid ({name}), equal steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
