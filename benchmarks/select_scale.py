"""Selection at pool scale: the loop's own select code on a synthetic pool of 10M frames
and a regions table of 10 rows per frame (100M rows, in row groups).

The data is what scoring writes (``scores.parquet``, ``regions.parquet``) plus the
labeled-state index (``labels/index.parquet``), in a local store under /tmp. Each mode
runs in a fresh child process that reads the files the way ``ActiveLearningLoop._select``
does (only the score columns selection needs; the regions file streamed by row group),
selects, and writes ``selection.parquet``; its wall time and peak RSS
(``VmHWM``) are the driver's cost of that selection step.

    python benchmarks/select_scale.py                  # small: 100k frames, 1M regions, seconds
    python benchmarks/select_scale.py --setting full   # 10M frames, 100M regions (~6 GB under /tmp)

Target: every mode under 60 s and under 2 GB peak RSS.

Frames are 1024 x 2048; regions are 10 distinct 128 x 128 cells of each frame's 8 x 16
grid. 0.1% of the frames were asked for before (half of them fully), so exclusion
and the no-pixel-charged-twice rule are on the path. LabOR (SPL pixels, PPL points)
needs the model for each chosen image's mask or clicks; only its table-level part
(which images, in which order, under the budget) is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segrl.config import ALConfig
from segrl.loop.select import (
    IMAGE_SIGNAL,
    POOL_COLUMNS,
    labor_images,
    pool_size,
    read_scores,
    round_budget,
    select_image_step,
    select_region_step,
)
from segrl.storage import ArtifactStore

SETTINGS = {"small": {"frames": 100_000}, "full": {"frames": 10_000_000}}
REGIONS_PER_FRAME = 10
HEIGHT, WIDTH, CELL = 1024, 2048, 128
GRID_W = WIDTH // CELL
CELLS = (HEIGHT // CELL) * GRID_W
CHUNK = 1_000_000  # frames generated (and scores row group) at a time
REGION_ROW_GROUP = 1 << 20
ASKED_SHARE = 0.001
TARGET_SECONDS, TARGET_MB = 60.0, 2048.0
# mode -> (acquisition config, what the budget counts). Budgets are the loop's round_budget.
MODES = {
    "images (entropy, STAL)": ALConfig(acquisition="entropy"),
    "images (random)": ALConfig(acquisition="random"),
    "regions (region_entropy, S4AL)": ALConfig(acquisition="region_entropy", budget_per_round=0.001),
    "pixels (labor_spl, table part)": ALConfig(acquisition="labor_spl", budget_per_round=0.001),
    "points (labor_ppl, table part)": ALConfig(acquisition="labor_ppl", budget_unit="clicks",
                                               budget_per_round=100_000),
}


def frame_ids(start: int, stop: int) -> pa.Array:
    return pc.binary_join_element_wise("frame_", pc.utf8_lpad(pc.cast(pa.array(np.arange(start, stop)), pa.string()),
                                                             9, "0"), "")


def write_scores(path: Path, frames: int, rng: np.random.Generator) -> None:
    """scores.parquet as scoring writes it: one row per frame, the per-image signals."""
    with pq.ParquetWriter(path, _scores_schema()) as writer:
        for start in range(0, frames, CHUNK):
            stop = min(frames, start + CHUNK)
            n = stop - start
            ids = frame_ids(start, stop)
            uris = pc.binary_join_element_wise("s3://pool/frames/", ids, ".png", "")
            # few distinct values: ties on the score are common, as with coarse signals
            entropy = np.round(rng.random(n), 4)
            writer.write_table(pa.table({
                "id": ids, "image_uri": uris, "height": np.full(n, HEIGHT), "width": np.full(n, WIDTH),
                "row": np.arange(start, stop), "entropy_mean": entropy, "instability": rng.random(n),
                "confidence": rng.random(n), "disagree_pixels": rng.integers(0, 50_000, n),
            }, schema=_scores_schema()))


def _scores_schema() -> pa.Schema:
    return pa.schema([("id", pa.string()), ("image_uri", pa.string()), ("height", pa.int64()),
                      ("width", pa.int64()), ("row", pa.int64()), ("entropy_mean", pa.float64()),
                      ("instability", pa.float64()), ("confidence", pa.float64()),
                      ("disagree_pixels", pa.int64())])


def write_regions(path: Path, frames: int, rng: np.random.Generator) -> None:
    """regions.parquet: 10 distinct grid cells per frame (cells k*13 + offset mod 128)."""
    writer = None
    for start in range(0, frames, CHUNK // 4):
        stop = min(frames, start + CHUNK // 4)
        n = stop - start
        rows = np.repeat(np.arange(start, stop), REGIONS_PER_FRAME)
        offset = np.repeat(rng.integers(0, CELLS, n), REGIONS_PER_FRAME)
        cell = (np.tile(np.arange(REGIONS_PER_FRAME) * 13, n) + offset) % CELLS
        y0, x0 = (cell // GRID_W) * CELL, (cell % GRID_W) * CELL
        table = pa.table({
            "id": pa.chunked_array([frame_ids(start, stop)]).take(pa.array(rows - start)),
            "row": rows, "rank": np.tile(np.arange(REGIONS_PER_FRAME, dtype=np.int32), n),
            "y0": y0.astype(np.int32), "x0": x0.astype(np.int32),
            "y1": (y0 + CELL).astype(np.int32), "x1": (x0 + CELL).astype(np.int32),
            "score": np.round(rng.random(rows.size), 4),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=REGION_ROW_GROUP)
    writer.close()


def write_index(path: Path, frames: int, rng: np.random.Generator) -> None:
    """labels/index.parquet: frames asked before, half fully, half the top half rows."""
    asked = np.sort(rng.choice(frames, max(1, int(frames * ASKED_SHARE)), replace=False))
    full = np.arange(asked.size) % 2 == 0
    ids = frame_ids(0, frames).take(pa.array(asked))
    pq.write_table(pa.table({
        "id": ids, "image_uri": pc.binary_join_element_wise("s3://pool/frames/", ids, ".png", ""),
        "height": np.full(asked.size, HEIGHT), "width": np.full(asked.size, WIDTH),
        "labeled_pixels": np.where(full, HEIGHT * WIDTH, HEIGHT * WIDTH // 2),
        "requested_pixels": np.where(full, HEIGHT * WIDTH, HEIGHT * WIDTH // 2)}), path)


def asked_mask(index: pa.Table):
    """What ``ActiveLearningLoop._labeled_mask`` would decode from labels/requested/<id>.png."""
    full = dict(zip(index.column("id").to_pylist(),
                    (index.column("requested_pixels").to_numpy() == HEIGHT * WIDTH).tolist(), strict=True))

    def mask(image_id: str) -> np.ndarray | None:
        if image_id not in full:
            return None
        out = np.zeros((HEIGHT, WIDTH), bool)
        out[: HEIGHT if full[image_id] else HEIGHT // 2] = True
        return out

    return mask


def peak_rss_mb() -> float:
    """This process's own peak RSS. ``VmHWM`` rather than ``ru_maxrss``: after fork + exec
    the latter starts from the parent's peak (here, the one that generated the data)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, data: Path) -> dict:
    """One selection as the loop's select step runs it; in a fresh process (see main)."""
    al = MODES[mode]
    imports_mb = peak_rss_mb()  # torch, pyarrow, segrl
    store = ArtifactStore(str(data))
    started = time.perf_counter()
    labeled = store.read_table("labels/index.parquet").select(["id", "requested_pixels"])
    with store.open_input("scores.parquet") as f:  # as ActiveLearningLoop._select and _acquire
        scores = pq.ParquetFile(f)
        pool_pixels, pool_images = pool_size(scores)
        budget = round_budget(al, pool_pixels, pool_images)
        rows = pool_images
        if al.acquisition in IMAGE_SIGNAL or al.acquisition == "random":
            table = select_image_step(al, scores, labeled, budget)
        elif al.acquisition.startswith("region"):
            with store.open_input("regions.parquet") as g:
                regions = pq.ParquetFile(g)
                rows = regions.metadata.num_rows
                table = select_region_step(scores, regions, budget, asked_mask(labeled), labeled)
        else:  # LabOR: labor_rows reads the pool's uris to decode the chosen frames
            table = read_scores(scores, al)
            pool = table.select([c for c in POOL_COLUMNS if c in table.column_names])
    if al.acquisition.startswith("labor"):
        selected = int(labor_images(al, pool, table, labeled, budget)[0].size)
    else:
        selected = table.num_rows
        store.write_table("selection.parquet", table)
    seconds = time.perf_counter() - started
    peak_mb = peak_rss_mb()
    return {"mode": mode, "rows": rows, "budget": budget, "selected": selected, "seconds": seconds,
            "peak_rss_mb": peak_mb, "imports_rss_mb": imports_mb, "met": seconds < TARGET_SECONDS and peak_mb < TARGET_MB}


def table(results: list[dict], setting: str, frames: int, load: float) -> str:
    title = (f"Selection at pool scale, setting '{setting}': {frames:,} frames {HEIGHT}x{WIDTH}, "
             f"{frames * REGIONS_PER_FRAME:,} regions; target < {TARGET_SECONDS:.0f} s and "
             f"< {TARGET_MB:.0f} MB peak RSS per mode (a fresh process each; its imports alone: "
             f"{max(r['imports_rss_mb'] for r in results):.0f} MB); 1-min load average at the start "
             f"{load:.1f} on {os.cpu_count()} cores (a shared machine: wall times include waiting)")
    header = ["| mode | rows | budget | selected | seconds | peak RSS MB | target met |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    body = [f"| {r['mode']} | {r['rows']:,} | {r['budget']:,} | {r['selected']:,} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {'yes' if r['met'] else 'no'} |" for r in results]
    return "\n".join([title, "", *header, *body])


def generate(data: Path, frames: int) -> None:
    rng = np.random.default_rng(0)
    (data / "labels").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    write_scores(data / "scores.parquet", frames, rng)
    write_regions(data / "regions.parquet", frames, rng)
    write_index(data / "labels" / "index.parquet", frames, rng)
    print(f"synthetic tables written in {time.perf_counter() - started:.0f} s under {data}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="small")
    parser.add_argument("--data", default="", help="folder for the synthetic tables (default /tmp/...)")
    parser.add_argument("--keep-data", action="store_true", help="do not delete the tables afterwards")
    parser.add_argument("--reuse-data", action="store_true", help="measure on tables a --keep-data run left")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # child process: one mode
    args = parser.parse_args()
    frames = SETTINGS[args.setting]["frames"]
    data = Path(args.data or f"/tmp/segrl_select_scale_{args.setting}")
    if args.measure:
        print(json.dumps(measure(args.measure, data)))
        return
    if not args.reuse_data:
        generate(data, frames)
    results, load = [], os.getloadavg()[0]
    try:
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--setting", args.setting, "--data", str(data),
                                    "--measure", mode], check=True, capture_output=True, text=True)
            results.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"  {mode}: {results[-1]['seconds']:.1f} s, {results[-1]['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        if not args.keep_data:
            shutil.rmtree(data, ignore_errors=True)
    text = table(results, args.setting, frames, load)
    print("\n" + text)
    out = Path(__file__).resolve().parent / "results" / f"select_scale_{args.setting}"
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"setting": args.setting, "frames": frames, "load_average": load,
                                                    "results": results}, indent=2))
    print(f"\nresults: {out}.md, {out}.json")


if __name__ == "__main__":
    main()
