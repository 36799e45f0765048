"""One round's selection: score tables in, a selection table (``segrl.labeling``) out.

Everything here is plain Python over Arrow tables and numpy arrays (no Ray, no model),
so the rules (budget in pixels or clicks, no pixel charged twice, determinism) are
unit-tested directly. LabOR's pixel masks and points, and the point acquisitions'
pixels, need the model (or a random draw per image), and are computed in
:mod:`segrl.loop.labor` and :mod:`segrl.loop.points` for the images chosen here.

Pools hold millions of frames and regions tables 10-20 rows per frame, so nothing
here turns a whole column into Python objects: columns go to numpy, ids are compared
through their sort rank (:func:`id_ranks`), a region table is streamed batch by batch
and cut to its best-first prefix, and only the chosen rows become selection rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from segrl.acquisition import select_images, spread_images
from segrl.acquisition.selectors import (
    StreamingBestPrefix,
    greedy_fit_chunks,
    order_by_count_then_rank,
    take_regions_in_order,
)
from segrl.config import ALConfig
from segrl.labeling import SELECTION_SCHEMA

IMAGE_SIGNAL = {"entropy": "entropy_mean", "stability": "instability"}
REGION_ACQUISITIONS = ("region_entropy", "region_impurity")
LABOR_ACQUISITIONS = ("labor_spl", "labor_ppl")
REGION_COLUMNS = ("id", "y0", "x0", "y1", "x1", "score")
BATCH_ROWS = 1 << 20
# The region prefix is cut at this many times the budget in area, so that skipped
# regions (overlaps, labeled pixels) rarely force the second pass over the table.
PREFIX_SLACK = 1.25

LabeledMask = Callable[[str], "np.ndarray | None"]
# Pixels already asked for per image: a mapping id -> count, or a table (id, requested_pixels).
LabeledPixels = Mapping[str, int] | pa.Table


def round_budget(al: ALConfig, pool_pixels: int, pool_images: int) -> int:
    """The budget of one round in pixels (clicks for ``labor_ppl`` and the point acquisitions)."""
    if al.budget_unit == "share":
        return int(al.budget_per_round * pool_pixels)
    if al.budget_unit == "images":
        return int(al.budget_per_round * pool_pixels / max(pool_images, 1))
    return int(al.budget_per_round)


def image_row(image_id: str, uri: str, height: int, width: int, cost: int) -> dict:
    """A selection row asking for a whole image."""
    return {"id": image_id, "uri": uri, "unit": "image", "height": height, "width": width,
            "y0": 0, "x0": 0, "y1": height, "x1": width, "mask_key": "", "points": [],
            "cost_pixels": cost, "cost_clicks": 0}


# ---------------------------------------------------------------------- columns

# What selection reads of scores.parquet besides ids and sizes ("row" links regions.parquet to it).
POOL_COLUMNS = ("id", "image_uri", "height", "width", "row")
SIGNAL_COLUMNS = {**IMAGE_SIGNAL, "labor_spl": "disagree_pixels", "labor_ppl": "disagree_pixels"}


def read_scores(scores: pq.ParquetFile, al: ALConfig) -> pa.Table:
    """The columns of a scores file that ``al``'s selection reads: at 10M frames every
    other signal column would cost the driver ~80 MB."""
    wanted = {*POOL_COLUMNS, SIGNAL_COLUMNS.get(al.acquisition), "class_hist" if al.class_balance else None}
    if al.acquisition not in REGION_ACQUISITIONS:  # "row" only links regions.parquet: 80 MB
        wanted.discard("row")
    return read_columns(scores, wanted)


def read_columns(source: pq.ParquetFile, wanted: Iterable[str | None]) -> pa.Table:
    """The ``wanted`` columns of a Parquet file (in file order; absent ones skipped), read
    one row group at a time: a whole-file read holds every column's decode buffers at
    once, ~300 MB above the table itself at 10M frames."""
    wanted = set(wanted)
    columns = [c for c in source.schema_arrow.names if c in wanted]
    if source.num_row_groups == 0:
        return source.read(columns=columns)
    table = pa.concat_tables([source.read_row_group(g, columns=columns)
                              for g in range(source.num_row_groups)])
    release_unused()
    return table


def pool_size(scores: pq.ParquetFile) -> tuple[int, int]:
    """(pixels, images) of the scored pool, read one row group of sizes at a time."""
    pixels = 0
    for group in range(scores.num_row_groups):
        pixels += int(pool_areas(scores.read_row_group(group, columns=["height", "width"])).sum())
    release_unused()
    return pixels, scores.metadata.num_rows


def release_unused() -> None:
    """Hand the memory Arrow's allocator keeps after a read back to the system: Parquet
    decoding leaves ~100 MB of freed pages at 10M frames, which the driver would
    otherwise hold for the rest of the round."""
    pa.default_memory_pool().release_unused()


def take_rows(source: pq.ParquetFile, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """``rows`` (in their order) of a Parquet file's ``columns``, one row group at a time."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    parts, start = [], 0
    for group in range(source.num_row_groups):
        size = source.metadata.row_group(group).num_rows
        lo, hi = np.searchsorted(wanted, [start, start + size])
        if hi > lo:
            parts.append(source.read_row_group(group, columns=columns).take(pa.array(wanted[lo:hi] - start)))
        start += size
    schema = pa.schema([source.schema_arrow.field(c) for c in columns])
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    back = np.empty_like(order)
    back[order] = np.arange(order.size)
    return table.take(pa.array(back))


def int_column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy().astype(np.int64, copy=False)


def pool_areas(pool: pa.Table) -> np.ndarray:
    return int_column(pool, "height") * int_column(pool, "width")


def id_ranks(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Each id's position in ascending id order (ties by position), int64.

    Selectors break score ties by id; comparing these ranks gives the same order as
    comparing the strings, without making 10M Python strings.
    """
    if len(ids) == 0:
        return np.empty(0, dtype=np.int64)
    ranks = pc.rank(ids, sort_keys="ascending", tiebreaker="first").to_numpy()  # 1-based uint64
    return np.subtract(ranks.view(np.int64), 1)  # one new array: 80 MB each at 10M frames


def positions_in(ids: pa.ChunkedArray, table: pa.Table) -> np.ndarray:
    """Row of each id in ``table`` (its first), -1 where absent."""
    table_ids = table.column("id")
    if table_ids.equals(ids):  # the loop's pool is its scores table: no lookup needed
        return np.arange(len(ids), dtype=np.int64)
    found = pc.index_in(ids, value_set=table_ids.combine_chunks().cast(ids.type))
    return found.fill_null(-1).to_numpy().astype(np.int64)


def aligned(table: pa.Table, positions: np.ndarray, column: str, missing: float) -> np.ndarray:
    """``column`` of ``table`` at ``positions`` (from :func:`positions_in`), ``missing`` at -1."""
    values = table.column(column).to_numpy().astype(np.float64, copy=False)
    out = np.full(positions.size, missing, dtype=np.float64)
    found = positions >= 0
    out[found] = values[positions[found]]
    return out


def aligned_hist(table: pa.Table, positions: np.ndarray) -> np.ndarray:
    """``class_hist`` (N x C) at ``positions``; zeros for images that failed to score."""
    column = table.column("class_hist").combine_chunks()
    classes = len(column[0]) if len(column) else 0
    hist = pc.list_flatten(column).to_numpy().astype(np.int64).reshape(len(column), classes)
    out = np.zeros((positions.size, classes), dtype=np.int64)
    found = positions >= 0
    out[found] = hist[positions[found]]
    return out


def _as_counts_table(labeled_pixels: LabeledPixels) -> pa.Table:
    if isinstance(labeled_pixels, pa.Table):
        return labeled_pixels
    return pa.table({"id": pa.array(list(labeled_pixels), pa.string()),
                     "requested_pixels": pa.array(list(labeled_pixels.values()), pa.int64())})


def labeled_rows(ids: pa.ChunkedArray,
                 labeled_pixels: LabeledPixels) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``ids`` asked for before, pixels asked in each), the rows ascending.

    The asked images are a small share of a pool: looking the pool's ids up in the
    asked ones chunk by chunk keeps every intermediate the size of a chunk or of the
    answer, where a pool-sized lookup would cost several 80 MB arrays at 10M frames.
    """
    table = _as_counts_table(labeled_pixels)
    empty = np.empty(0, dtype=np.int64)
    if table.num_rows == 0 or len(ids) == 0:
        return empty, empty
    counts = table.column("requested_pixels").to_numpy().astype(np.float64, copy=False)
    if table.column("id").equals(ids):  # same rows: each row is its own match (as positions_in)
        rows = np.arange(len(ids), dtype=np.int64)
        return rows, counts.astype(np.int64)
    value_set = table.column("id").combine_chunks().cast(ids.type)
    rows, found, start = [empty], [empty], 0
    for chunk in ids.chunks:
        at = pc.index_in(chunk, value_set=value_set)
        hit = np.flatnonzero(pc.is_valid(at).to_numpy(zero_copy_only=False))
        rows.append(hit + start)
        found.append(pc.take(at, pa.array(hit)).to_numpy().astype(np.int64))
        start += len(chunk)
    # through float64, as aligned() reads the column
    return np.concatenate(rows), counts[np.concatenate(found)].astype(np.int64)


def requested_pixels(pool: pa.Table, labeled_pixels: LabeledPixels) -> np.ndarray:
    """Pixels already asked for in each pool image (0 if none), int64."""
    out = np.zeros(pool.num_rows, dtype=np.int64)
    rows, counts = labeled_rows(pool.column("id"), labeled_pixels)
    out[rows] = counts
    return out


def remaining_pixels(pool: pa.Table, labeled_pixels: LabeledPixels) -> np.ndarray:
    """Pixels not asked for yet in each pool image, int64: its area minus the asked ones."""
    remaining = int_column(pool, "height")
    if not remaining.flags.writeable:  # a zero-copy view of a one-chunk column
        remaining = remaining.copy()
    remaining *= int_column(pool, "width")
    rows, counts = labeled_rows(pool.column("id"), labeled_pixels)
    remaining[rows] -= counts
    return remaining


def sorted_rows(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Rows of ``ids`` in ascending id order (ties by position), int64: the inverse of
    :func:`id_ranks`, from one stable Arrow sort without the rank array."""
    if len(ids) == 0:
        return np.empty(0, dtype=np.int64)
    return pc.sort_indices(ids).to_numpy().view(np.int64)


def chosen_positions(ranks: np.ndarray, chosen_ranks: list) -> np.ndarray:
    """Pool rows of the ranks a selector returned, in pick order."""
    row_of_rank = np.empty(ranks.size, dtype=np.int64)
    row_of_rank[ranks] = np.arange(ranks.size)
    return row_of_rank[np.asarray(chosen_ranks, dtype=np.int64)]


def _empty_points(n: int) -> pa.Array:
    offsets = pa.array(np.zeros(n + 1, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array([], pa.list_(pa.int64())))


def selection_rows(pool: pa.Table, rows: np.ndarray, unit: str, boxes: np.ndarray, costs: np.ndarray) -> pa.Table:
    """Selection table (:data:`SELECTION_SCHEMA`) for pool ``rows`` asking for ``boxes`` (n x 4)."""
    take = pa.array(rows, pa.int64())
    n = rows.size
    columns = {
        "id": pool.column("id").take(take), "uri": pool.column("image_uri").take(take),
        "unit": pa.array(np.full(n, unit, dtype=object), pa.string()),
        "height": pool.column("height").take(take).cast(pa.int64()),
        "width": pool.column("width").take(take).cast(pa.int64()),
        **{c: pa.array(boxes[:, k].astype(np.int64)) for k, c in enumerate(("y0", "x0", "y1", "x1"))},
        "mask_key": pa.array(np.full(n, "", dtype=object), pa.string()), "points": _empty_points(n),
        "cost_pixels": pa.array(costs.astype(np.int64)), "cost_clicks": pa.array(np.zeros(n, dtype=np.int64)),
    }
    return pa.Table.from_pydict({c: columns[c] for c in SELECTION_SCHEMA.names}, schema=SELECTION_SCHEMA)


# ---------------------------------------------------------------------- whole images


def select_whole_images(
    al: ALConfig, pool: pa.Table, scores: pa.Table | None, labeled_pixels: LabeledPixels, budget: int,
) -> pa.Table:
    """Random, entropy (STAL) or instability (ST++) image selection, as a selection table.

    ``pool``: id, image_uri, height, width. An image costs its pixels not labeled yet;
    fully labeled images are never candidates; images missing from ``scores`` (failed
    to score) rank last.
    """
    rows, costs = choose_whole_images(al, pool, scores, labeled_pixels, budget)
    return image_selection(pool.take(pa.array(rows, pa.int64())), costs)


def choose_whole_images(
    al: ALConfig, pool: pa.Table, scores: pa.Table | None, labeled_pixels: LabeledPixels, budget: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_whole_images`'s choice: (pool rows in pick order, their costs). ``pool``
    needs only id, height and width."""
    remaining = remaining_pixels(pool, labeled_pixels)
    if al.acquisition == "random":
        rows = choose_random_images(pool.column("id"), remaining, budget, al.seed)
        return rows, remaining[rows]
    candidates = np.flatnonzero(remaining > 0)
    ranks = id_ranks(pool.column("id"))
    positions = positions_in(pool.column("id"), scores)
    signal = aligned(scores, positions, IMAGE_SIGNAL[al.acquisition], -np.inf)
    hist = aligned_hist(scores, positions)[candidates] if al.class_balance else None
    chosen = select_images(ranks[candidates], signal[candidates], remaining[candidates], budget,
                           seed=al.seed, class_hist=hist, balance=al.class_balance)
    rows = chosen_positions(ranks, chosen)
    return rows, remaining[rows]


def choose_random_images(ids: pa.ChunkedArray, remaining: np.ndarray, budget: int,
                         seed: int) -> np.ndarray:
    """:func:`segrl.acquisition.select_random` over the open images (``remaining`` > 0):
    their rows, in pick order.

    The same shuffle of the open images in id order, without a pool of ranks, costs or
    a shuffled copy: the id order comes from one Arrow sort, and the budget rule walks
    the shuffle chunk by chunk, stopping once not even the cheapest image fits.
    """
    by_id = sorted_rows(ids)
    by_id = by_id[remaining[by_id] > 0]
    shuffle = np.random.default_rng(seed).permutation(by_id.size)
    cheapest = int(remaining[by_id].min()) if by_id.size else 0
    return greedy_fit_chunks(
        (by_id[shuffle[start : start + BATCH_ROWS]] for start in range(0, by_id.size, BATCH_ROWS)),
        remaining, budget, cheapest)


def image_selection(chosen: pa.Table, costs: np.ndarray) -> pa.Table:
    """Selection rows asking for the whole of each ``chosen`` image (id, image_uri, height, width)."""
    heights, widths = int_column(chosen, "height"), int_column(chosen, "width")
    boxes = np.stack([np.zeros_like(heights), np.zeros_like(widths), heights, widths], axis=1)
    return selection_rows(chosen, np.arange(chosen.num_rows), "image", boxes, costs)


def select_image_step(al: ALConfig, scores: pq.ParquetFile, labeled_pixels: LabeledPixels, budget: int) -> pa.Table:
    """The loop's whole-image selection from its scores file: streamed by row group for
    entropy / instability, in memory (the needed columns only) for random and class balance,
    which need every candidate at once."""
    if al.spread_candidates:
        return select_spread_images(al, scores, labeled_pixels, budget)
    if al.acquisition in IMAGE_SIGNAL and not al.class_balance:
        return select_top_images(al, scores, labeled_pixels, budget)
    # The uris (~40 bytes a frame) stay on disk until the choice is made.
    needed = {"id", "height", "width", SIGNAL_COLUMNS.get(al.acquisition), "class_hist" if al.class_balance else None}
    table = read_columns(scores, needed)
    rows, costs = choose_whole_images(al, table, table, labeled_pixels, budget)
    del table  # the output's columns are read back for the chosen rows only
    return image_selection(take_rows(scores, rows, ["id", "image_uri", "height", "width"]), costs)


def select_top_images(al: ALConfig, scores: pq.ParquetFile, labeled_pixels: LabeledPixels, budget: int) -> pa.Table:
    """:func:`select_whole_images` (entropy / instability, no class balance) over a scores
    file in O(picks + batch) memory.

    The greedy rule takes the best images while they fit, so one pass keeps the best-first
    prefix whose cost exceeds the budget (all rows tied with its last score included); the
    ids of that prefix alone are ranked for the id tie-break. When budget is left, a second
    pass adds the later images cheap enough to fit it, and the rule runs again on both.
    """
    rows, costs = top_image_rows(al, scores, labeled_pixels, budget)
    return image_selection(take_rows(scores, rows, ["id", "image_uri", "height", "width"]), costs)


def top_image_rows(al: ALConfig, scores: pq.ParquetFile, labeled_pixels: LabeledPixels,
                   budget: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`select_top_images`'s choice: (file rows in pick order, their costs)."""
    signal = IMAGE_SIGNAL[al.acquisition]
    prefix = StreamingBestPrefix(budget + 1, payload_width=2, keep_ties=True)
    for values, rows, costs in _image_batches(scores, signal, labeled_pixels):
        prefix.push(values, rows, costs, np.column_stack([rows, costs]))
    values, _, _, payload, bound = prefix.result()
    chosen, left = _take_images(scores, values, payload, budget)
    if left > 0 and bound is not None:
        later_values, later_payload = _later_images(scores, signal, labeled_pixels, bound[0], left)
        values, payload = np.concatenate([values, later_values]), np.concatenate([payload, later_payload])
        chosen, left = _take_images(scores, values, payload, budget)
    return payload[chosen, 0], payload[chosen, 1]


def select_spread_images(al: ALConfig, scores: pq.ParquetFile, labeled_pixels: LabeledPixels,
                         budget: int) -> pa.Table:
    """Entropy / instability images spread in feature space (``al.spread_candidates``):
    the shortlist is the top images worth that many budgets, read as :func:`select_top_images`
    reads them; only its rows' embeddings and those of the images asked for before are
    read, and :func:`segrl.acquisition.spread_images` chooses among them."""
    if "embedding" not in scores.schema_arrow.names:
        raise ValueError("al.spread_candidates needs the scores' embedding column: score the pool "
                         "with 'embedding' among its signals")
    rows, costs = top_image_rows(al, scores, labeled_pixels, int(al.spread_candidates * budget))
    shortlist = take_rows(scores, rows, ["id", IMAGE_SIGNAL[al.acquisition], "embedding"])
    ranks = id_ranks(shortlist.column("id"))
    signal = shortlist.column(IMAGE_SIGNAL[al.acquisition]).to_numpy().astype(np.float64)
    picked = spread_images(ranks, signal, embedding_matrix(shortlist.column("embedding")), costs, budget,
                           al.spread_candidates, labeled=labeled_embeddings(scores, labeled_pixels))
    chosen = chosen_positions(ranks, picked)
    return image_selection(take_rows(scores, rows[chosen], ["id", "image_uri", "height", "width"]), costs[chosen])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list ``embedding`` column as an N x D float array."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.list_flatten(column).to_numpy().reshape(len(column), column.type.list_size)


def labeled_embeddings(scores: pq.ParquetFile, labeled_pixels: LabeledPixels) -> np.ndarray:
    """M x D embeddings of the scored images with pixels asked for before, one batch read
    at a time (the asked images are a small share of a pool)."""
    parts = []
    for batch in scores.iter_batches(batch_size=BATCH_ROWS, columns=["id", "embedding"]):
        table = pa.Table.from_batches([batch])
        rows, counts = labeled_rows(table.column("id"), labeled_pixels)
        if rows.size:
            parts.append(embedding_matrix(table.column("embedding").take(pa.array(rows[counts > 0]))))
    width = scores.schema_arrow.field("embedding").type.list_size
    return np.concatenate(parts) if parts else np.empty((0, width))


def _image_batches(scores: pq.ParquetFile, signal: str, labeled_pixels: LabeledPixels):
    """(signal, file row, cost) of each batch's images that still have pixels to ask for."""
    start = 0
    for batch in scores.iter_batches(batch_size=BATCH_ROWS, columns=["id", "height", "width", signal]):
        table = pa.Table.from_batches([batch])
        costs = pool_areas(table) - requested_pixels(table, labeled_pixels)
        keep = np.flatnonzero(costs > 0)
        values = table.column(signal).to_numpy().astype(np.float64, copy=False)
        yield values[keep], keep + start, costs[keep]
        start += batch.num_rows


def _later_images(scores: pq.ParquetFile, signal: str, labeled_pixels: LabeledPixels, below: float, left: int):
    """(signal, [row, cost]) of the images scored below ``below`` that cost <= ``left``."""
    values, payload = [np.empty(0)], [np.empty((0, 2), dtype=np.int64)]
    for batch_values, rows, costs in _image_batches(scores, signal, labeled_pixels):
        keep = (batch_values < below) & (costs <= left)
        values.append(batch_values[keep])
        payload.append(np.column_stack([rows[keep], costs[keep]]))
    return np.concatenate(values), np.concatenate(payload)


def _take_images(scores: pq.ParquetFile, values: np.ndarray, payload: np.ndarray, budget: int):
    """:func:`select_images` over candidate rows: (their positions in pick order, budget left)."""
    ranks = id_ranks(take_rows(scores, payload[:, 0], ["id"]).column("id"))
    picked = select_images(ranks, values, payload[:, 1], budget)
    chosen = chosen_positions(ranks, picked)
    return chosen, budget - int(payload[chosen, 1].sum())


# ---------------------------------------------------------------------- regions


def region_batches(regions: pa.Table | pq.ParquetFile,
                   with_ids: bool = True) -> Iterator[pa.RecordBatch]:
    """The region rows batch by batch: a Parquet file is read one batch at a time.
    ``with_ids=False`` leaves the id strings (most of a row's bytes) unread, for callers
    that link regions to images through ``row``."""
    wanted = tuple(c for c in (*REGION_COLUMNS, "row") if with_ids or c != "id")
    columns = [c for c in wanted if c in regions.schema.names]
    if isinstance(regions, pq.ParquetFile):
        yield from regions.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    else:
        yield from regions.select(columns).to_batches(max_chunksize=BATCH_ROWS)


class RegionImages:
    """Maps region rows to pool rows: through the scoring ``row`` column when both tables
    have it (numpy only; no table at all when the pool's rows are 0..n-1, as scoring
    writes them), else by id lookup (fine for small tables)."""

    def __init__(self, pool: pa.Table, regions_schema: pa.Schema) -> None:
        self.by_row = None
        self.identity = False
        self.size = pool.num_rows
        if "row" in pool.column_names and "row" in regions_schema.names and pool.num_rows:
            self.identity = _is_identity(pool.column("row"))
            if not self.identity:
                pool_rows = int_column(pool, "row")
                self.by_row = np.full(int(pool_rows.max()) + 1, -1, dtype=np.int64)
                self.by_row[pool_rows] = np.arange(pool.num_rows)
        self.pool = pool.select(["id"]) if self.needs_ids else None

    @property
    def needs_ids(self) -> bool:
        return self.by_row is None and not self.identity

    def __call__(self, batch: pa.RecordBatch, take: np.ndarray | None = None) -> np.ndarray:
        """Pool row of each batch row (of rows ``take`` only, when given), -1 where none."""
        if self.needs_ids:
            ids = batch.column("id") if take is None else batch.column("id").take(pa.array(take))
            return positions_in(pa.chunked_array([ids]), self.pool)
        rows = batch.column("row").to_numpy().astype(np.int64)
        rows = rows if take is None else rows[take]
        size = self.size if self.identity else self.by_row.size
        inside = rows < size
        clipped = np.minimum(rows, size - 1)
        if self.identity:  # what by_row = arange(size) would give, negative indices included
            return np.where(inside, np.where(clipped < 0, clipped + size, clipped), -1)
        return np.where(inside, self.by_row[clipped], -1)


def _is_identity(rows: pa.ChunkedArray) -> bool:
    """Is ``rows`` exactly 0, 1, ..., n-1? Checked chunk by chunk (no pool-sized copy)."""
    start = 0
    for chunk in rows.chunks:
        expected = np.arange(start, start + len(chunk))
        if chunk.null_count or not np.array_equal(chunk.to_numpy(), expected):
            return False
        start += len(chunk)
    return True


def _region_arrays(batch: pa.RecordBatch, to_images: RegionImages, ranks: np.ndarray, offset: int,
                   total: int, wanted: Callable[[np.ndarray], np.ndarray] | None = None):
    """(scores, keys, areas, payload=[image, y0, x0, y1, x1]) of a batch's usable rows,
    of those whose score passes ``wanted`` (a mask over the batch's scores) when given.

    key = image id rank x total + row position: the (image id, position) tie-break of
    :func:`segrl.acquisition.select_regions` as one int64. ``wanted`` cuts the batch
    before any per-row array is built: behind a full prefix most rows of a batch can
    never enter it, and only the box check needs them all.
    """
    columns = [batch.column(c).to_numpy() for c in ("y0", "x0", "y1", "x1")]
    if ((columns[2] < columns[0]) | (columns[3] < columns[1])).any():
        raise ValueError("boxes must be (y0, x0, y1, x1) with y1 >= y0 and x1 >= x0")
    scores = batch.column("score").to_numpy().astype(np.float64)
    rows = None if wanted is None else np.flatnonzero(wanted(scores))
    if rows is not None:
        scores = scores[rows]
        columns = [c[rows] for c in columns]
    images = to_images(batch, rows)
    boxes = np.stack([c.astype(np.int64) for c in columns], axis=1)
    position = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
    position = position if rows is None else position[rows]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (images >= 0) & (area > 0)  # a region of no pixels costs 0 and is never taken
    image = images[keep]
    keys = ranks[image] * total + position[keep]
    payload = np.column_stack([image, boxes[keep]])
    return scores[keep], keys, area[keep], payload


def _costs_after_labels(pool: RegionPool, payload: np.ndarray, area: np.ndarray,
                        labeled: np.ndarray,
                        labeled_mask: LabeledMask) -> np.ndarray:
    """Area minus pixels already asked for inside each region, reading each labeled image's mask once."""
    costs = area.copy()
    need = np.flatnonzero(labeled[payload[:, 0]])
    if need.size == 0:
        return costs
    order = need[np.argsort(payload[need, 0], kind="stable")]
    images = payload[order, 0]
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    ids = pool.ids_of(images[starts])
    for image_id, group in zip(ids, np.split(order, starts[1:]), strict=True):
        mask = labeled_mask(image_id)
        if mask is None:
            continue
        for k in group.tolist():
            y0, x0, y1, x1 = payload[k, 1:5]
            costs[k] -= int(np.count_nonzero(mask[y0:y1, x0:x1]))
    return costs


def _best_first(scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.lexsort((keys, -scores))


def select_region_step(scores: pq.ParquetFile, regions: pq.ParquetFile, budget: int,
                       labeled_mask: LabeledMask, labeled_pixels: LabeledPixels) -> pa.Table:
    """The loop's region selection from its scores and regions files: the pool's uris
    (~40 bytes a frame) stay on disk until the regions are chosen."""
    # sizes only when no counts say which images were asked for (choose_regions then asks all)
    wanted = ("id", "row") if labeled_pixels is not None else ("id", "height", "width", "row")
    pool = RegionPool(read_columns(scores, wanted), regions.schema_arrow, labeled_pixels)
    rows, boxes, costs = _choose_regions(pool, regions, budget, labeled_mask)
    del pool
    chosen = take_rows(scores, rows, ["id", "image_uri", "height", "width"])
    return selection_rows(chosen, np.arange(rows.size), "region", boxes, costs)


def select_region_rows(
    pool: pa.Table, regions: pa.Table | pq.ParquetFile, budget: int, labeled_mask: LabeledMask,
    labeled_pixels: LabeledPixels | None = None,
) -> pa.Table:
    """Region selection (S4AL / RIPU) over every image's candidate regions, as a selection table.

    ``pool``: id, image_uri, height, width (and ``row``, which links it to scoring's
    regions table without an id lookup). See :func:`choose_regions`.
    """
    rows, boxes, costs = choose_regions(pool, regions, budget, labeled_mask, labeled_pixels)
    return selection_rows(pool, rows, "region", boxes, costs)


def choose_regions(
    pool: pa.Table, regions: pa.Table | pq.ParquetFile, budget: int, labeled_mask: LabeledMask,
    labeled_pixels: LabeledPixels | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool rows, boxes n x 4, costs) of the regions chosen, in pick order.

    Same picks as :func:`segrl.acquisition.select_regions` over the whole table, in
    bounded memory: one streaming pass keeps the best-first prefix whose area covers
    the budget (with slack), the greedy rule runs on it, and only when budget is left
    does a second pass fetch the later rows that could still fit it. ``labeled_pixels``
    (per-image counts consistent with ``labeled_mask``) says which images need a mask
    read and bounds that second pass; without it every image's mask is asked for.
    """
    schema = regions.schema_arrow if isinstance(regions, pq.ParquetFile) else regions.schema
    return _choose_regions(RegionPool(pool, schema, labeled_pixels), regions, budget, labeled_mask)


class RegionPool:
    """What region selection keeps of the pool while it streams the regions table: id
    ranks, the row link, and the asked-for images' rows, counts and ids. Not the id
    column (~190 MB at 10M frames) unless every image may need its mask read."""

    def __init__(self, pool: pa.Table, regions_schema: pa.Schema,
                 labeled_pixels: LabeledPixels | None) -> None:
        self.ranks = id_ranks(pool.column("id"))
        self.to_images = RegionImages(pool, regions_schema)
        if labeled_pixels is None:  # without counts, any image may have every pixel asked for
            self.rows, self.requested, self.ids = None, pool_areas(pool), pool.column("id")
            self.labeled = self.requested > 0
        else:
            self.rows, self.requested = labeled_rows(pool.column("id"), labeled_pixels)
            self.ids = pool.column("id").take(pa.array(self.rows, pa.int64()))
            self.labeled = np.zeros(pool.num_rows, dtype=bool)
            self.labeled[self.rows[self.requested > 0]] = True

    def _at(self, images: np.ndarray) -> np.ndarray:
        """Positions of pool rows ``images`` (all asked for) in ``rows``/``requested``/``ids``."""
        return images if self.rows is None else np.searchsorted(self.rows, images)

    def requested_at(self, images: np.ndarray) -> np.ndarray:
        """Pixels asked for in each of pool rows ``images`` (0 if none)."""
        if self.rows is None:
            return self.requested[images]
        out = np.zeros(images.size, dtype=np.int64)
        asked = self.labeled[images]
        out[asked] = self.requested[self._at(images[asked])]
        return out

    def ids_of(self, images: np.ndarray) -> list[str]:
        """Ids of pool rows ``images``, each asked for before."""
        return self.ids.take(pa.array(self._at(images), pa.int64())).to_pylist()


def _choose_regions(pool: RegionPool, regions: pa.Table | pq.ParquetFile, budget: int,
                    labeled_mask: LabeledMask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ranks, to_images, labeled = pool.ranks, pool.to_images, pool.labeled
    total = regions.metadata.num_rows if isinstance(regions, pq.ParquetFile) else regions.num_rows
    prefix = StreamingBestPrefix(int(budget * PREFIX_SLACK) + 1, payload_width=5)
    offset = 0
    for batch in region_batches(regions, with_ids=to_images.needs_ids):
        bound = prefix.bound
        wanted = None if bound is None else (lambda scores, floor=bound[0]: scores >= floor)
        prefix.push(*_region_arrays(batch, to_images, ranks, offset, total, wanted))
        offset += batch.num_rows
    scores, keys, area, payload, bound = prefix.result()
    costs = _costs_after_labels(pool, payload, area, labeled, labeled_mask)
    taken, left = _take(payload, costs, budget)
    if left > 0 and bound is not None:
        tail = _later_rows_that_may_fit(regions, pool, total, bound, left)
        scores, keys, area, payload = (np.concatenate([a, b]) for a, b in zip((scores, keys, area, payload), tail, strict=True))
        costs = np.concatenate([costs, _costs_after_labels(pool, tail[3], tail[2], labeled, labeled_mask)])
        taken, left = _take(payload, costs, budget)
    return payload[taken, 0], payload[taken, 1:5], costs[taken]


def _take(payload: np.ndarray, costs: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Greedy pick over a best-first sequence; zero-cost regions (all asked already) never count."""
    useful = np.flatnonzero(costs > 0)
    taken, left = take_regions_in_order(payload[useful, 0], payload[useful, 1:5], costs[useful], budget)
    return useful[taken], left


def _later_rows_that_may_fit(regions, pool: RegionPool, total, bound, left):
    """Rows behind the prefix whose cost can still be <= ``left``: area minus the image's
    asked pixels is a lower bound of the cost. Returned best first."""
    score, key = bound
    parts = []
    offset = 0
    for batch in region_batches(regions, with_ids=pool.to_images.needs_ids):
        scores, keys, area, payload = _region_arrays(
            batch, pool.to_images, pool.ranks, offset, total, lambda scores: scores <= score)
        offset += batch.num_rows
        behind = (scores < score) | ((scores == score) & (keys > key))
        keep = behind & (area - pool.requested_at(payload[:, 0]) <= left)
        parts.append((scores[keep], keys[keep], area[keep], payload[keep]))
    scores, keys, area, payload = (np.concatenate(c) for c in zip(*parts, strict=True))
    order = _best_first(scores, keys)
    return scores[order], keys[order], area[order], payload[order]


# ---------------------------------------------------------------------- LabOR: the table-level part


def labor_images(al: ALConfig, pool: pa.Table, scores: pa.Table, labeled_pixels: LabeledPixels,
                 budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows LabOR asks the model about, in order; their ``disagree_pixels``).

    From each scored image's ``disagree_pixels``; fully asked images never come.
    SPL: every image with disagreement, most first (ties by id); the caller shrinks
    all their masks together to the budget. PPL: :func:`select_ppl_images` under the
    click budget.
    """
    same = scores.column("id").equals(pool.column("id"))  # the loop's pool is its scores table
    positions = None if same else positions_in(scores.column("id"), pool)
    counts = int_column(scores, "disagree_pixels")
    open_ = (counts > 0) & ~_fully_asked(pool, labeled_pixels, positions)
    if al.acquisition == "labor_spl":
        by_id = sorted_rows(scores.column("id"))
        by_id = by_id[open_[by_id]]
        del open_
        order = order_by_count_then_rank(counts[by_id], overwrite=True)  # a fresh copy: reused
        for start in range(0, order.size, BATCH_ROWS):  # rows in place of positions: no third array
            order[start : start + BATCH_ROWS] = by_id[order[start : start + BATCH_ROWS]]
        chosen = order
        del by_id
    else:
        if al.points_per_image <= 0:
            raise ValueError(f"points_per_image must be > 0, got {al.points_per_image}")
        chosen = _ppl_rows(scores.column("id"), counts, open_, al.points_per_image, budget)
    return (chosen if positions is None else positions[chosen]), counts[chosen]


def _fully_asked(pool: pa.Table, labeled_pixels: LabeledPixels,
                 positions: np.ndarray | None) -> np.ndarray:
    """Per scores row (pool row when ``positions`` is None): is every pixel asked already?"""
    # an image of no pixels counts as fully asked, as requested 0 >= area 0
    full = pc.less_equal(pc.multiply(pool.column("height"), pool.column("width")), 0)
    full = full.to_numpy(zero_copy_only=False).copy()
    rows, counts = labeled_rows(pool.column("id"), labeled_pixels)
    asked = pool.select(["height", "width"]).take(pa.array(rows, pa.int64()))
    full[rows[counts >= pool_areas(asked)]] = True
    return full if positions is None else full[positions]


def _ppl_rows(ids: pa.ChunkedArray, counts: np.ndarray, open_: np.ndarray, points_per_image: int,
              budget: int) -> np.ndarray:
    """:func:`select_ppl_images` over the ``open_`` rows (disagreement, not fully asked):
    rows in pick order.

    An image costs 1 to ``points_per_image`` clicks, so the best ``budget + 1`` images
    (with every image tied with the last) are a prefix the greedy rule cannot walk past
    before the budget runs out; only their ids are ranked. Budget left after them can
    only go to later images cheap enough for it, ranked in turn.
    """
    if budget < 0:
        raise ValueError(f"budget_pixels must be >= 0, got {budget}")
    values = counts[open_]
    if values.size <= budget + 1:
        return _ppl_greedy(ids, counts, np.flatnonzero(open_), points_per_image, budget)[0]
    kth = values.size - (budget + 1)
    values.partition(kth)  # in place: the (budget + 1)-th largest count lands at kth
    bound = values[kth]
    del values
    head = np.flatnonzero(open_ & (counts >= bound))
    chosen, left = _ppl_greedy(ids, counts, head, points_per_image, budget)
    if left > 0:
        cheap = np.minimum(counts, points_per_image) <= left
        later = np.flatnonzero(open_ & (counts < bound) & cheap)
        more, _ = _ppl_greedy(ids, counts, later, points_per_image, left)
        chosen = np.concatenate([chosen, more])
    return chosen


def _ppl_greedy(ids: pa.ChunkedArray, counts: np.ndarray, rows: np.ndarray, points_per_image: int,
                budget: int) -> tuple[np.ndarray, int]:
    """The greedy click-budget rule over ``rows``, most disagreement first, ties by id:
    (rows taken in pick order, clicks left)."""
    ranks = id_ranks(ids.take(pa.array(rows, pa.int64())))  # order within ``rows`` suffices
    clicks = np.minimum(counts[rows], points_per_image)
    picked = _best_first_fit(counts[rows], ranks, clicks, budget)
    return rows[picked], budget - int(clicks[picked].sum())


def _best_first_fit(values: np.ndarray, ranks: np.ndarray, costs: np.ndarray,
                    budget: int) -> np.ndarray:
    return greedy_fit_chunks([np.lexsort((ranks, -values))], costs, budget)


# ---------------------------------------------------------------------- points over the pool


def choose_point_images(al: ALConfig, pool: pa.Table, labeled_pixels: LabeledPixels,
                        budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, clicks of each) for the point acquisitions, in pick order.

    Spread over the pool as PixelPick asks its points of every image: ``al.points_per_image``
    clicks per image (fewer where fewer pixels are left) in as many images as the click
    budget covers, the last one taking what is left; all open images when the budget
    reaches them. Which images, when it does not: a seeded random order (ids sorted
    first, as :func:`segrl.acquisition.select_random`), so the pixel rules are compared
    on the same images. Fully asked images are never chosen.
    """
    remaining = remaining_pixels(pool, labeled_pixels)
    by_id = sorted_rows(pool.column("id"))
    by_id = by_id[remaining[by_id] > 0]
    order = by_id[np.random.default_rng(al.seed).permutation(by_id.size)]
    clicks = np.minimum(remaining[order], al.points_per_image)
    before = np.cumsum(clicks) - clicks  # clicks spent on the images ahead of each
    clicks = np.clip(budget - before, 0, clicks)
    keep = clicks > 0
    return order[keep], clicks[keep]
