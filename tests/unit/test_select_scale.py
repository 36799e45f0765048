"""The loop's column-based selection against a straightforward reference (the
per-row, dict-based code it replaced) on random pools: same ids, order and costs,
with score ties, fully or partly labeled images, images that failed to score,
budget edges, and region tables streamed in tiny batches so both passes run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segrl.acquisition import select_images, select_ppl_images, select_random, select_regions
from segrl.acquisition.selectors import StreamingBestPrefix
from segrl.config import ALConfig
from segrl.loop import select
from segrl.loop.select import labor_images, select_region_rows, select_whole_images

SEEDS = range(12)


def random_pool(rng: np.random.Generator, n: int) -> tuple[pa.Table, pa.Table, dict[str, int], dict]:
    """Pool, scores (some images missing: failed to score), asked-pixel counts and masks."""
    ids = [f"im{k:03d}" for k in rng.permutation(n)]  # row order is not id order
    h, w = rng.integers(4, 9, n), rng.integers(4, 9, n)
    pool = pa.table({"id": ids, "image_uri": [f"/p/{i}.png" for i in ids], "height": h, "width": w,
                     "row": np.arange(n)})
    scored = np.flatnonzero(rng.random(n) > 0.15)
    values = rng.integers(0, 4, n) / 4  # few distinct values: many ties
    scores = pa.table({"id": [ids[k] for k in scored], "entropy_mean": values[scored],
                       "instability": values[::-1][scored],
                       "disagree_pixels": rng.integers(0, 6, n)[scored],
                       "class_hist": [rng.integers(0, 3, 4).tolist() for _ in scored]})
    masks, counts = {}, {}
    for k in np.flatnonzero(rng.random(n) < 0.3):
        full = rng.random() < 0.4
        mask = np.ones((h[k], w[k]), bool) if full else rng.random((h[k], w[k])) < 0.3
        masks[ids[k]], counts[ids[k]] = mask, int(mask.sum())
    return pool, scores, counts, masks


def reference_whole_images(al, pool, scores, labeled_pixels, budget):
    ids = np.asarray(pool.column("id").to_pylist(), dtype=object)
    area = np.asarray(pool.column("height").to_pylist()) * np.asarray(pool.column("width").to_pylist())
    remaining = area - np.asarray([labeled_pixels.get(i, 0) for i in ids])
    exclude = set(ids[remaining <= 0].tolist())
    costs = np.where(remaining > 0, remaining, area)
    if al.acquisition == "random":
        chosen = select_random(ids, costs, budget, exclude=exclude, seed=al.seed)
    else:
        column = select.IMAGE_SIGNAL[al.acquisition]
        lookup = dict(zip(scores.column("id").to_pylist(), scores.column(column).to_pylist(), strict=True))
        hists = dict(zip(scores.column("id").to_pylist(), scores.column("class_hist").to_pylist(), strict=True))
        signal = np.asarray([lookup.get(i, -np.inf) for i in ids], dtype=np.float64)
        hist = np.asarray([hists.get(i, [0] * 4) for i in ids])
        chosen = select_images(ids, signal, costs, budget, exclude=exclude, seed=al.seed,
                               class_hist=hist, balance=al.class_balance)
    position = {i: k for k, i in enumerate(ids.tolist())}
    return [(i, int(remaining[position[i]])) for i in chosen]


def reference_regions(pool, regions, budget, masks):
    ids = np.asarray(regions.column("id").to_pylist(), dtype=object)
    boxes = np.stack([np.asarray(regions.column(c).to_pylist(), dtype=np.int64) for c in ("y0", "x0", "y1", "x1")], 1)
    picked, _ = select_regions(ids, boxes, np.asarray(regions.column("score").to_pylist()), budget,
                               labeled_pixels=masks.get)
    out = []
    for k in picked.tolist():
        y0, x0, y1, x1 = (int(v) for v in boxes[k])
        mask = masks.get(ids[k])
        cost = (y1 - y0) * (x1 - x0) - (int(np.count_nonzero(mask[y0:y1, x0:x1])) if mask is not None else 0)
        out.append((ids[k], y0, x0, y1, x1, cost))
    return out


def random_regions(rng: np.random.Generator, pool: pa.Table, per_image: int) -> pa.Table:
    ids, h, w = (pool.column(c).to_pylist() for c in ("id", "height", "width"))
    rows, image = [], []
    for k in range(len(ids)):
        for _ in range(rng.integers(0, per_image + 1)):
            y0, x0 = rng.integers(0, h[k]), rng.integers(0, w[k])
            rows.append((y0, x0, min(h[k], y0 + rng.integers(0, 4)), min(w[k], x0 + rng.integers(0, 4))))
            image.append(k)
    boxes = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return pa.table({"id": [ids[k] for k in image], "row": np.asarray(image, dtype=np.int64),
                     **{c: boxes[:, j] for j, c in enumerate(("y0", "x0", "y1", "x1"))},
                     "score": rng.integers(0, 5, len(image)) / 5})


def budgets(rng, total: int) -> list[int]:
    return [0, 1, int(rng.integers(0, total + 1)), total // 10, total, 10 * total]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("acquisition,balance", [("entropy", False), ("entropy", True), ("stability", False),
                                                 ("random", False)])
def test_whole_images_match_the_reference(seed: int, acquisition: str, balance: bool):
    rng = np.random.default_rng(seed)
    pool, scores, counts, _ = random_pool(rng, int(rng.integers(1, 40)))
    al = ALConfig(acquisition=acquisition, class_balance=balance, seed=seed)
    total = int(np.sum(pool.column("height").to_numpy() * pool.column("width").to_numpy()))
    for budget in budgets(rng, total):
        got = select_whole_images(al, pool, scores, counts, budget).to_pylist()
        assert [(r["id"], r["cost_pixels"]) for r in got] == reference_whole_images(al, pool, scores, counts, budget)
        assert all(r["unit"] == "image" and (r["y1"], r["x1"]) == (r["height"], r["width"]) for r in got)
    as_table = pa.table({"id": list(counts), "requested_pixels": list(counts.values())}, schema=pa.schema(
        [("id", pa.string()), ("requested_pixels", pa.int64())]))
    assert select_whole_images(al, pool, scores, as_table, total // 3).equals(
        select_whole_images(al, pool, scores, counts, total // 3))


@pytest.mark.parametrize("seed", SEEDS)
def test_regions_match_the_reference_whatever_the_batching(seed: int, tmp_path, monkeypatch):
    rng = np.random.default_rng(seed)
    pool, _, counts, masks = random_pool(rng, int(rng.integers(1, 25)))
    regions = random_regions(rng, pool, per_image=6)
    pq.write_table(regions, tmp_path / "regions.parquet", row_group_size=5)
    pq.write_table(pool, tmp_path / "pool.parquet", row_group_size=int(rng.integers(1, 7)))
    monkeypatch.setattr(select, "BATCH_ROWS", int(rng.integers(1, 9)))
    monkeypatch.setattr(StreamingBestPrefix, "min_buffer", int(rng.integers(1, 6)))
    total = int(np.sum((regions.column("y1").to_numpy() - regions.column("y0").to_numpy())
                       * (regions.column("x1").to_numpy() - regions.column("x0").to_numpy())))
    for budget in budgets(rng, total):
        want = reference_regions(pool, regions, budget, masks)
        for source, labeled in [(regions, counts), (pq.ParquetFile(tmp_path / "regions.parquet"), counts),
                                (regions.drop_columns(["row"]), None)]:
            got = select_region_rows(pool, source, budget, masks.get, labeled).to_pylist()
            assert [(r["id"], r["y0"], r["x0"], r["y1"], r["x1"], r["cost_pixels"]) for r in got] == want
            assert all(r["unit"] == "region" for r in got)
        step = select.select_region_step(pq.ParquetFile(tmp_path / "pool.parquet"),
                                         pq.ParquetFile(tmp_path / "regions.parquet"), budget, masks.get, counts)
        assert [(r["id"], r["y0"], r["x0"], r["y1"], r["x1"], r["cost_pixels"]) for r in step.to_pylist()] == want
        assert step.column("uri").to_pylist() == [f"/p/{i}.png" for i in step.column("id").to_pylist()]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("acquisition", ["labor_spl", "labor_ppl"])
def test_labor_images_match_the_reference(seed: int, acquisition: str):
    rng = np.random.default_rng(seed)
    pool, scores, counts, _ = random_pool(rng, int(rng.integers(1, 40)))
    al = ALConfig(acquisition=acquisition, budget_unit="clicks" if acquisition == "labor_ppl" else "share",
                  points_per_image=int(rng.integers(1, 5)))
    info = {i: h * w for i, h, w in zip(*(pool.column(c).to_pylist() for c in ("id", "height", "width")), strict=True)}
    ids = scores.column("id").to_pylist()
    disagree = np.asarray(scores.column("disagree_pixels").to_pylist(), dtype=np.int64)
    full = {i for i in ids if counts.get(i, 0) >= info[i]}
    for budget in budgets(rng, int(disagree.sum())):
        if acquisition == "labor_spl":
            want = [ids[k] for k in np.lexsort((np.asarray(ids, dtype=object).astype(str), -disagree))
                    if disagree[k] > 0 and ids[k] not in full]
        else:
            want = select_ppl_images(ids, disagree, al.points_per_image, budget, exclude=full)
        got, got_disagree = labor_images(al, pool, scores, counts, budget)
        assert pool.column("id").take(pa.array(got, pa.int64())).to_pylist() == want
        count_of = dict(zip(ids, disagree.tolist(), strict=True))
        assert got_disagree.tolist() == [count_of[i] for i in want]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("acquisition,balance", [("entropy", False), ("stability", False), ("entropy", True),
                                                 ("random", False)])
def test_the_streamed_image_step_matches_the_reference(seed: int, acquisition: str, balance: bool, tmp_path,
                                                       monkeypatch):
    rng = np.random.default_rng(seed)
    pool, scores, counts, _ = random_pool(rng, int(rng.integers(1, 40)))
    # the loop's pool is its scores table: images that failed to score are in neither
    scored = pool.filter(pa.compute.is_in(pool.column("id"), value_set=scores.column("id")))
    for name in scores.column_names[1:]:  # both in pool order
        scored = scored.append_column(name, scores.column(name))
    scores = scored
    pq.write_table(scores, tmp_path / "scores.parquet", row_group_size=int(rng.integers(1, 7)))
    monkeypatch.setattr(select, "BATCH_ROWS", int(rng.integers(1, 9)))
    monkeypatch.setattr(StreamingBestPrefix, "min_buffer", int(rng.integers(1, 6)))
    al = ALConfig(acquisition=acquisition, class_balance=balance, seed=seed)
    source = pq.ParquetFile(tmp_path / "scores.parquet")
    total, images = select.pool_size(source)
    assert images == scores.num_rows
    for budget in budgets(rng, total):
        got = select.select_image_step(al, source, counts, budget)
        assert [(r["id"], r["cost_pixels"]) for r in got.to_pylist()] == reference_whole_images(
            al, scores, scores, counts, budget)
        assert got.column("uri").to_pylist() == [f"/p/{i}.png" for i in got.column("id").to_pylist()]
