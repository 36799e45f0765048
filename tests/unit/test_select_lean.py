"""The lean building blocks of pool-scale selection (chunked budget walk, one-key sort,
sparse asked-pixel lookup, row links, PPL's prefix cut) against known answers and the
plain forms they replace, so a faster form can never pick differently."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from segrl.acquisition import select_ppl_images, select_random
from segrl.acquisition.selectors import (
    StreamingBestPrefix,
    _greedy_fit,
    greedy_fit_chunks,
    order_by_count_then_rank,
)
from segrl.loop import select
from segrl.loop.select import (
    RegionImages,
    choose_random_images,
    labeled_rows,
    remaining_pixels,
    requested_pixels,
    sorted_rows,
)


def test_greedy_fit_chunks_skips_what_does_not_fit_across_chunk_borders():
    costs = np.array([4, 7, 2, 3, 1, 5])
    # 4 fits (left 6), 7 does not, 2 fits (4), 3 fits (1), 1 fits (0), then it stops
    chunks = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    assert greedy_fit_chunks(chunks, costs, 10).tolist() == [0, 2, 3, 4]
    assert greedy_fit_chunks([], costs, 10).tolist() == []
    with pytest.raises(ValueError):
        greedy_fit_chunks([np.array([0])], costs, -1)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_fit_chunks_equals_one_walk_over_the_whole_order(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    costs = rng.integers(1, 9, n)
    order = rng.permutation(n)
    cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 5))))
    chunks = np.split(order, cuts)
    for budget in (0, 1, int(costs.sum()) // 3, int(costs.sum()), 10 * int(costs.sum()) + 1):
        want = _greedy_fit(order, costs, budget)
        got = greedy_fit_chunks(chunks, costs, budget, int(costs.min(initial=1)))
        assert got.tolist() == want.tolist()


def test_order_by_count_then_rank_puts_most_first_and_ties_by_position():
    assert order_by_count_then_rank(np.array([2, 5, 2, 0, 5])).tolist() == [1, 4, 0, 2, 3]
    assert order_by_count_then_rank(np.array([], dtype=np.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(10))
def test_order_by_count_then_rank_equals_lexsort(seed: int):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, int(rng.integers(1, 3000)))
    want = np.lexsort((np.arange(counts.size), -counts)).tolist()
    assert order_by_count_then_rank(counts).tolist() == want
    assert order_by_count_then_rank(counts.copy(), overwrite=True).tolist() == want
    # counts too large for the one-key form take the lexsort path
    assert order_by_count_then_rank(counts.astype(np.int64) << 58).tolist() == want


def test_sorted_rows_is_the_stable_id_order():
    ids = pa.chunked_array([["b", "a"], ["c", "a"]])
    assert sorted_rows(ids).tolist() == [1, 3, 0, 2]
    assert sorted_rows(pa.chunked_array([], pa.string())).tolist() == []


def test_labeled_rows_finds_each_pool_row_asked_for_over_chunks():
    pool_ids = pa.chunked_array([["a", "b"], ["c", "a", "d"]])
    # "x" is not in the pool; "a" twice in the pool (both rows), twice asked (first wins)
    asked = pa.table({"id": ["c", "x", "a", "a"], "requested_pixels": [3, 9, 5, 7]})
    rows, counts = labeled_rows(pool_ids, asked)
    assert rows.tolist() == [0, 2, 3] and counts.tolist() == [5, 3, 5]
    assert labeled_rows(pool_ids, {"d": 4})[0].tolist() == [4]
    assert labeled_rows(pool_ids, {})[0].size == 0


def test_requested_and_remaining_pixels_from_sparse_lookups():
    pool = pa.table({"id": ["a", "b", "c"], "height": [2, 3, 4], "width": [5, 5, 5]})
    assert requested_pixels(pool, {"b": 6, "z": 1}).tolist() == [0, 6, 0]
    assert remaining_pixels(pool, {"b": 6, "c": 20}).tolist() == [10, 9, 0]
    same = pa.table({"id": ["a", "b", "c"], "requested_pixels": [1, 2, 3]})  # the pool's own rows
    assert requested_pixels(pool, same).tolist() == [1, 2, 3]


@pytest.mark.parametrize("seed", range(10))
def test_random_images_equal_select_random_over_the_open_images(seed: int, monkeypatch):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    ids = pa.chunked_array([[f"im{k:03d}" for k in rng.permutation(n)]])
    remaining = rng.integers(-2, 9, n)  # <= 0: fully asked, never chosen
    monkeypatch.setattr(select, "BATCH_ROWS", int(rng.integers(1, 9)))  # many shuffle chunks
    open_ = np.flatnonzero(remaining > 0)
    for budget in (0, 1, int(remaining.clip(0).sum()) // 2, 10**9):
        names = np.asarray(ids.to_pylist())[open_]
        want = select_random(names, remaining[open_], budget, seed=seed)
        got = choose_random_images(ids, remaining, budget, seed)
        assert ids.take(pa.array(got, pa.int64())).to_pylist() == want


def test_region_rows_link_the_same_through_an_identity_or_a_lookup():
    regions = pa.record_batch({"row": pa.array([0, 3, 9, 2], pa.int64())})
    schema = pa.schema([("row", pa.int64())])
    identity = RegionImages(pa.table({"id": list("abcd"), "row": [0, 1, 2, 3]}), schema)
    shuffled = RegionImages(pa.table({"id": list("abcd"), "row": [3, 0, 2, 1]}), schema)
    assert identity.identity and not identity.needs_ids
    assert identity(regions).tolist() == [0, 3, -1, 2]
    assert identity(regions, np.array([1, 2])).tolist() == [3, -1]
    assert shuffled(regions).tolist() == [1, 0, -1, 2]


def test_best_prefix_gathers_payload_from_many_parts_as_one_sort(monkeypatch):
    rng = np.random.default_rng(3)
    monkeypatch.setattr(StreamingBestPrefix, "min_buffer", 4)
    prefix = StreamingBestPrefix(40, payload_width=2)
    scores, keys = rng.integers(0, 5, 200) / 4, rng.permutation(200)
    weights = rng.integers(1, 4, 200)
    for part in np.array_split(np.arange(200), 13):
        payload = np.column_stack([keys[part], -keys[part]])
        prefix.push(scores[part], keys[part], weights[part], payload)
    got_scores, got_keys, _, payload, _ = prefix.result()
    order = np.lexsort((keys, -scores))
    last = int(np.flatnonzero(np.cumsum(weights[order]) >= 40)[0])
    assert got_keys.tolist() == keys[order[: last + 1]].tolist()
    assert payload.tolist() == [[k, -k] for k in got_keys.tolist()]


@pytest.mark.parametrize("seed", range(12))
def test_ppl_prefix_cut_equals_select_ppl_images(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    ids = pa.chunked_array([[f"im{k:03d}" for k in rng.permutation(n)]])
    counts = rng.integers(0, 5, n)  # many ties; counts below points_per_image make cheap images
    open_ = rng.random(n) > 0.2
    ppi = int(rng.integers(1, 5))
    names = np.asarray(ids.to_pylist())
    for budget in (0, 1, 2, 7, n, 10 * n):
        want = select_ppl_images(names[open_], counts[open_], ppi, budget)
        got = select._ppl_rows(ids, counts, open_ & (counts > 0), ppi, budget)
        assert names[got].tolist() == want
