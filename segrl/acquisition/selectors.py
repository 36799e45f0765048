"""Budgeted selectors: turn per-image or per-region scores into what gets labeled.

Pure numpy (no I/O, no Ray) so they run on the driver over a scores table read
in chunks. Higher score = label first. Every selector is deterministic: ties are
broken by id (or image id, then input position), and the random baseline takes
an explicit seed and is independent of the input row order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

LabeledPixels = Callable[[object], np.ndarray | None] | Mapping[object, np.ndarray]


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if np.isnan(scores).any():
        # A NaN would sort arbitrarily and silently drop or promote items.
        raise ValueError("scores contain NaN")
    return scores


class StreamingTopK:
    """The ``k`` best (score, key) pairs of a stream pushed in chunks, in O(k + chunk) memory.

    For selection over a pool of millions of rows read batch by batch. ``result()``
    equals a full sort by (score best first, key ascending) cut to ``k``: among
    equal scores the smallest keys win, whatever the chunking.
    """

    def __init__(self, k: int, largest: bool = True) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.k = k
        self.largest = largest
        self._scores = np.empty(0, dtype=np.float64)
        self._keys: np.ndarray = np.empty(0, dtype=np.int64)

    def push(self, scores: np.ndarray, keys: np.ndarray) -> None:
        """Add one chunk: ``scores`` (n,) float and ``keys`` (n,) sortable ids."""
        scores = _check_scores(scores)
        keys = np.asarray(keys).reshape(-1)
        if scores.shape != keys.shape:
            raise ValueError(f"{scores.shape[0]} scores but {keys.shape[0]} keys")
        if self.k == 0 or scores.size == 0:
            return
        if self._scores.size:
            scores = np.concatenate([self._scores, scores])
            keys = np.concatenate([self._keys, keys])
        rank = -scores if self.largest else scores
        if rank.size > self.k:
            # Cheap cut first: keep everything at least as good as the k-th best, so
            # ties at the boundary stay and the key tie-break below decides them.
            kth = np.partition(rank, self.k - 1)[self.k - 1]
            keep = rank <= kth
            rank, scores, keys = rank[keep], scores[keep], keys[keep]
        order = np.lexsort((keys, rank))[: self.k]
        self._scores, self._keys = scores[order], keys[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, keys)`` of the best ``k`` seen so far, best first."""
        return self._scores.copy(), self._keys.copy()


def _costs(pixels_per_image: int | np.ndarray, n: int) -> np.ndarray:
    costs = np.broadcast_to(np.asarray(pixels_per_image, dtype=np.int64), (n,))
    if (costs <= 0).any():
        raise ValueError("pixels_per_image must be positive")
    return costs


def _greedy_fit(order: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """Positions from ``order`` taken greedily: each one that still fits the budget, in turn."""
    if budget < 0:
        raise ValueError(f"budget_pixels must be >= 0, got {budget}")
    pos, cost = order, costs[order]
    taken: list[np.ndarray] = []
    remaining = int(budget)
    # Same result as an item-by-item loop, in vectorised rounds for pools of millions:
    # drop what can no longer fit (the remaining budget only shrinks), take the leading
    # run that fits at once, skip the first item that does not, and repeat.
    while True:
        fits = cost <= remaining
        pos, cost = pos[fits], cost[fits]
        if pos.size == 0:
            break
        n = int(np.searchsorted(np.cumsum(cost), remaining, side="right"))
        taken.append(pos[:n])
        remaining -= int(cost[:n].sum())
        pos, cost = pos[n + 1 :], cost[n + 1 :]
    return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)


def greedy_fit_chunks(chunks: Iterable[np.ndarray], costs: np.ndarray, budget: int,
                      cheapest: int = 1) -> np.ndarray:
    """:func:`_greedy_fit` over the concatenation of ``chunks`` (index arrays into ``costs``,
    all costs >= ``cheapest`` > 0): the indices taken, in order.

    The rule takes items one after another, so each chunk can be decided with what the
    earlier ones left; chunks stop being drawn once not even the cheapest item fits. A
    pool-sized order then never has to exist as one gathered array of costs.
    """
    if budget < 0:
        raise ValueError(f"budget_pixels must be >= 0, got {budget}")
    taken: list[np.ndarray] = [np.empty(0, dtype=np.int64)]
    remaining = int(budget)
    for chunk in chunks:
        if remaining < max(cheapest, 1):
            break
        chunk = np.asarray(chunk, dtype=np.int64)
        picked = chunk[_greedy_fit(np.arange(chunk.size), costs[chunk], remaining)]
        taken.append(picked)
        remaining -= int(costs[picked].sum())
    return np.concatenate(taken)


def order_by_count_then_rank(counts: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Positions of ``counts`` (ints >= 0) by count descending, ties by position: the order
    of ``np.lexsort((np.arange(n), -counts))``.

    One int64 key (count, position) sorted in place needs no index array beside the
    key, where lexsort over 10M rows needs several. ``overwrite``: an int64 ``counts``
    the caller no longer needs becomes that key (and the result), saving one more.
    """
    counts = np.asarray(counts).reshape(-1)
    n = counts.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    top = int(counts.max())
    if counts.min() < 0 or (top + 1) * n >= 1 << 62:  # the key would not fit: sort by both
        return np.lexsort((np.arange(n), -counts.astype(np.int64)))
    if overwrite and counts.dtype == np.int64 and counts.flags.writeable:
        key = np.subtract(top, counts, out=counts)
    else:
        key = np.subtract(top, counts, dtype=np.int64)
    key *= n
    for start in range(0, n, 1 << 20):  # positions added a slice at a time: no n-long arange
        key[start : start + (1 << 20)] += np.arange(start, min(n, start + (1 << 20)))
    key.sort()
    key %= n
    return key


def _candidates(ids: np.ndarray, exclude: Collection) -> np.ndarray:
    """Positions of ids not in ``exclude``."""
    if not len(exclude):
        return np.arange(ids.size)
    # No cast to ids.dtype: a fixed-width string cast would truncate longer ids into false matches.
    return np.flatnonzero(~np.isin(ids, np.asarray(list(exclude))))


def _balanced_order(
    order: np.ndarray, class_hist: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Reorder best-first ``order`` round-robin over "rarest predicted class" groups.

    An image's group is the class it predicts (count > 0) that is rarest in the
    candidate pool's summed histogram (ties -> lower class id; no prediction ->
    its own group, last). Groups are visited rarest first; within a group images
    keep their best-first order. So the first picks cover as many rare classes as
    possible before any class gets its second image, in the spirit of the
    class-balanced sampling of STAL and S4AL.
    """
    pool_freq = class_hist[candidates].sum(axis=0).astype(np.float64)
    rarity = np.where(class_hist[order] > 0, pool_freq[None, :], np.inf)
    group = np.argmin(rarity, axis=1)
    empty = np.isinf(rarity.min(axis=1))
    n_classes = class_hist.shape[1]
    # Group position: classes sorted rarest first, the empty group after all of them.
    class_rank = np.empty(n_classes + 1, dtype=np.int64)
    class_rank[np.lexsort((np.arange(n_classes), pool_freq))] = np.arange(n_classes)
    class_rank[n_classes] = n_classes
    group_pos = class_rank[np.where(empty, n_classes, group)]
    # Rank inside a group: a stable sort by group keeps the best-first order.
    by_group = np.argsort(group_pos, kind="stable")
    within = np.empty(order.size, dtype=np.int64)
    sorted_groups = group_pos[by_group]
    starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
    within[by_group] = np.arange(order.size) - starts
    return order[np.lexsort((group_pos, within))]


def select_images(
    ids: Sequence | np.ndarray,
    scores: np.ndarray,
    pixels_per_image: int | np.ndarray,
    budget_pixels: int,
    exclude: Collection = (),
    seed: int = 0,
    class_hist: np.ndarray | None = None,
    balance: bool = False,
) -> list:
    """Image-level selection (STAL's entropy top-K under a pixel budget).

    ``ids`` (N,), ``scores`` (N,), ``pixels_per_image`` an int or (N,) costs.
    Best score first (ties by id ascending); an image is taken only if its full
    cost fits what is left of ``budget_pixels``, otherwise it is skipped and the
    next one tried. Ids in ``exclude`` (already labeled) are never chosen.
    With ``balance=True`` and ``class_hist`` (N x C predicted pixel counts), the
    order is interleaved over rarest-class groups (see :func:`_balanced_order`).
    ``seed`` is accepted so all image selectors share one signature; this
    selector is fully determined by scores and ids. Returns the chosen ids in
    pick order.
    """
    ids = np.asarray(ids)
    scores = _check_scores(scores)
    if ids.shape != scores.shape:
        raise ValueError(f"{ids.size} ids but {scores.size} scores")
    costs = _costs(pixels_per_image, ids.size)
    candidates = _candidates(ids, exclude)
    order = candidates[np.lexsort((ids[candidates], -scores[candidates]))]
    if balance:
        if class_hist is None:
            raise ValueError("balance=True needs class_hist (N x C)")
        class_hist = np.asarray(class_hist)
        if class_hist.ndim != 2 or class_hist.shape[0] != ids.size:
            raise ValueError(f"class_hist must be {ids.size} x C, got {class_hist.shape}")
        order = _balanced_order(order, class_hist, candidates)
    return ids[_greedy_fit(order, costs, budget_pixels)].tolist()


def spread_images(
    ids: Sequence | np.ndarray,
    scores: np.ndarray,
    embeddings: np.ndarray,
    pixels_per_image: int | np.ndarray,
    budget_pixels: int,
    candidates_factor: float,
    labeled: np.ndarray | None = None,
) -> list:
    """Uncertain images that are not near copies of each other or of what is labeled:
    k-center greedy over the best-scored images.

    Top-K by score alone spends a round on runs of neighbouring video frames, each as
    uncertain as the next and all teaching the same thing. The candidates are the best
    images (score first, ties by id) worth ``candidates_factor`` x ``budget_pixels``; each
    pick is the candidate farthest (Euclidean, in ``embeddings`` N x D) from the images
    already labeled (``labeled`` M x D) and all picks so far, among those whose cost still
    fits; ties, and the first pick when nothing is labeled, go to the better scored
    (Sener & Savarese's core-set rule, on an uncertainty shortlist). ``candidates_factor``
    1 is plain top-K. Returns the chosen ids in pick order.
    """
    ids = np.asarray(ids)
    scores = _check_scores(scores)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if ids.shape != scores.shape or embeddings.shape[:1] != ids.shape or embeddings.ndim != 2:
        raise ValueError(f"{ids.size} ids, {scores.size} scores and embeddings {embeddings.shape}: "
                         "need N, N and N x D")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf (an image that failed to score?)")
    if candidates_factor < 1:
        raise ValueError(f"candidates_factor must be >= 1, got {candidates_factor}")
    costs = _costs(pixels_per_image, ids.size)
    order = np.lexsort((ids, -scores))
    shortlist = order[: int(np.searchsorted(np.cumsum(costs[order]), candidates_factor * budget_pixels,
                                            side="right"))]
    remaining = int(budget_pixels)
    open_ = np.ones(shortlist.size, dtype=bool)
    points = embeddings[shortlist]
    nearest = np.full(shortlist.size, np.inf)  # distance of each candidate to the nearest center
    for center in np.asarray(labeled if labeled is not None else np.empty((0, 1)), dtype=np.float64):
        nearest = np.minimum(nearest, np.linalg.norm(points - center, axis=1))
    picks: list[int] = []
    while True:
        fits = open_ & (costs[shortlist] <= remaining)
        if not fits.any():
            break
        # shortlist order is score order, so argmax's first maximum is the better scored
        at = int(np.argmax(np.where(fits, nearest, -1.0)))
        picks.append(int(shortlist[at]))
        open_[at] = False
        remaining -= int(costs[shortlist[at]])
        nearest = np.minimum(nearest, np.linalg.norm(points - points[at], axis=1))
    return ids[np.asarray(picks, dtype=np.int64)].tolist()


def select_random(
    ids: Sequence | np.ndarray,
    pixels_per_image: int | np.ndarray,
    budget_pixels: int,
    exclude: Collection = (),
    seed: int = 0,
) -> list:
    """Random images under a pixel budget: the baseline every paper compares against.

    Deterministic given ``seed`` and the set of ids: ids are sorted before the
    shuffle, so the row order a distributed read happens to produce does not
    change the pick. Same skip-and-continue budget rule as :func:`select_images`.
    """
    ids = np.asarray(ids)
    costs = _costs(pixels_per_image, ids.size)
    candidates = _candidates(ids, exclude)
    candidates = candidates[np.argsort(ids[candidates], kind="stable")]
    order = candidates[np.random.default_rng(seed).permutation(candidates.size)]
    return ids[_greedy_fit(order, costs, budget_pixels)].tolist()


def _labeled_mask(labeled_pixels: LabeledPixels | None, image_id: object) -> np.ndarray | None:
    if labeled_pixels is None:
        return None
    if callable(labeled_pixels):
        return labeled_pixels(image_id)
    return labeled_pixels.get(image_id)


def select_regions(
    image_ids: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    budget_pixels: int,
    labeled_pixels: LabeledPixels | None = None,
) -> tuple[np.ndarray, int]:
    """Region-level selection (RIPU, S4AL) over a pool of candidate boxes.

    ``image_ids`` (N,), ``boxes`` (N x 4: y0, x0, y1, x1, end-exclusive),
    ``scores`` (N,). Greedy best-first over the whole pool (ties by image id, then
    input position). A region is skipped when it overlaps a region already taken
    in the same image, when its cost is 0, or when its cost exceeds what is left of
    the budget (smaller ones after it are still tried). The cost is the region's
    area minus the pixels already labeled inside it, read from ``labeled_pixels``
    (a callable or a mapping image_id -> bool H x W mask; missing -> none labeled),
    so no pixel is paid for twice.

    The loop is per candidate: feed it a pool cut down by :class:`StreamingTopK`,
    not millions of regions. Returns (indices into the inputs in pick order, total
    pixels charged).
    """
    image_ids = np.asarray(image_ids).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    scores = _check_scores(scores)
    if not image_ids.size == boxes.shape[0] == scores.size:
        raise ValueError(
            f"{image_ids.size} image ids, {boxes.shape[0]} boxes, {scores.size} scores"
        )
    if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError("boxes must be (y0, x0, y1, x1) with y1 >= y0 and x1 >= x0")
    if budget_pixels < 0:
        raise ValueError(f"budget_pixels must be >= 0, got {budget_pixels}")
    order = np.lexsort((np.arange(scores.size), image_ids, -scores))
    taken: list[int] = []
    taken_boxes: dict[object, list[np.ndarray]] = {}
    remaining = int(budget_pixels)
    for i in order:
        if remaining == 0:
            break
        image_id = image_ids[i]
        image_id = image_id.item() if isinstance(image_id, np.generic) else image_id
        y0, x0, y1, x1 = boxes[i]
        if any(
            min(y1, b[2]) > max(y0, b[0]) and min(x1, b[3]) > max(x0, b[1])
            for b in taken_boxes.get(image_id, ())
        ):
            continue
        cost = int((y1 - y0) * (x1 - x0))
        mask = _labeled_mask(labeled_pixels, image_id)
        if mask is not None:
            cost -= int(np.count_nonzero(mask[y0:y1, x0:x1]))
        if cost == 0 or cost > remaining:
            continue
        taken.append(int(i))
        taken_boxes.setdefault(image_id, []).append(boxes[i])
        remaining -= cost
    return np.asarray(taken, dtype=np.int64), int(budget_pixels) - remaining


class StreamingBestPrefix:
    """The best-first prefix of a stream whose weights first add up to ``target``.

    For region selection over a pool of 100M candidate rows read batch by batch: a
    greedy budgeted pick examines candidates best first, so it needs the leading
    ones, and how many depends on their sizes, not on a fixed ``k``. ``result()``
    equals a full sort by (score best first, key ascending) cut after the first item
    at which the running sum of weights reaches ``target`` (everything when it never
    does). Each row carries ``payload`` columns (int64, n x p) along with it. With
    ``keep_ties`` keys are ignored and the cut is extended over every row tied with its
    last score, so the caller can order ties by something it cannot stream (e.g. string
    ids) and rows behind the prefix are exactly those with a lower score.
    Memory: O(prefix + chunk); chunks are buffered and sorted only when the buffer
    outgrows the prefix, so the stream costs O(n log prefix).
    """

    min_buffer = 1 << 16  # rows buffered before the first sort

    def __init__(self, target: int, payload_width: int, keep_ties: bool = False) -> None:
        self.target = int(target)
        self.keep_ties = keep_ties
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._kept = 0
        self._bound: tuple[float, int] | None = None  # (score, key) of the prefix's last row
        self._width = payload_width

    def push(self, scores: np.ndarray, keys: np.ndarray, weights: np.ndarray, payload: np.ndarray) -> None:
        scores = _check_scores(scores)
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        weights = np.asarray(weights, dtype=np.int64).reshape(-1)
        payload = np.asarray(payload, dtype=np.int64).reshape(-1, self._width)
        if self._bound is not None:
            # Rows behind a full prefix's last row can never enter it.
            score, key = self._bound
            ahead = (scores >= score) if self.keep_ties else (scores > score) | ((scores == score) & (keys < key))
            scores, keys, weights, payload = scores[ahead], keys[ahead], weights[ahead], payload[ahead]
        if scores.size == 0:
            return
        self._parts.append((scores, keys, weights, payload))
        self._buffered += scores.size
        if self._buffered > 2 * max(self._kept, self.min_buffer):
            self._compact()

    def _compact(self) -> None:
        scores, keys, weights = (np.concatenate([p[k] for p in self._parts]) for k in range(3))
        order = np.lexsort((keys, -scores))
        reached = np.flatnonzero(np.cumsum(weights[order]) >= self.target)
        if reached.size:
            last = reached[0]
            if self.keep_ties:  # rows sorted best first: the tied ones follow the cut
                last = int(np.searchsorted(-scores[order], -scores[order[last]], side="right")) - 1
            order = order[: last + 1]
            self._bound = (float(scores[order[-1]]), int(keys[order[-1]]))
        self._parts = [(scores[order], keys[order], weights[order], self._payload_at(order))]
        self._buffered = self._kept = order.size

    def _payload_at(self, order: np.ndarray) -> np.ndarray:
        """Payload rows ``order`` of the buffered parts taken as one, gathered part by part:
        the parts' payload (most of a row's bytes) is never concatenated first."""
        if len(self._parts) == 1:
            return self._parts[0][3][order]
        out = np.empty((order.size, self._width), dtype=np.int64)
        start = 0
        for part in self._parts:
            stop = start + part[3].shape[0]
            inside = np.flatnonzero((order >= start) & (order < stop))
            out[inside] = part[3][order[inside] - start]
            start = stop
        return out

    @property
    def bound(self) -> tuple[float, int] | None:
        """(score, key) of the prefix's last row once the target was reached: rows behind
        it can never enter, so a caller may drop rows scored below it before pushing."""
        return self._bound

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, int] | None]:
        """``(scores, keys, weights, payload, bound)`` best first; ``bound`` is the (score, key)
        of the prefix's last row when the target was reached, else None (every row is in)."""
        if not self._parts:
            empty = np.empty(0, dtype=np.int64)
            return np.empty(0), empty, empty, np.empty((0, self._width), np.int64), None
        self._compact()
        scores, keys, weights, payload = self._parts[0]
        return scores, keys, weights, payload, self._bound


def _overlaps_earlier(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """For a best-first sequence: does item i overlap an earlier item of the same image?

    images (n,) int, boxes (n x 4). Vectorised over one offset at a time inside each
    image's group, so the cost is O(n x largest group), not O(n^2).
    """
    by_image = np.lexsort((np.arange(images.size), images))
    grouped_images, grouped_boxes = images[by_image], boxes[by_image]
    hit = np.zeros(images.size, dtype=bool)
    start = np.searchsorted(grouped_images, grouped_images, side="left")
    largest = int((np.arange(images.size) - start).max(initial=-1)) + 1
    for d in range(1, largest):
        later, earlier = grouped_boxes[d:], grouped_boxes[:-d]
        same = grouped_images[d:] == grouped_images[:-d]
        overlap = (np.minimum(later[:, 2], earlier[:, 2]) > np.maximum(later[:, 0], earlier[:, 0])) & (
            np.minimum(later[:, 3], earlier[:, 3]) > np.maximum(later[:, 1], earlier[:, 1]))
        hit[d:] |= same & overlap
    out = np.zeros(images.size, dtype=bool)
    out[by_image] = hit
    return out


def take_regions_in_order(
    images: np.ndarray, boxes: np.ndarray, costs: np.ndarray, budget_pixels: int
) -> tuple[np.ndarray, int]:
    """:func:`select_regions`'s greedy rule over a sequence already in pick order.

    images (n,) int image indices, boxes (n x 4), costs (n,) int > 0 (area minus pixels
    already labeled). An item is skipped when it overlaps an item taken before it in the
    same image or when its cost exceeds what is left. Items that overlap no earlier item
    depend only on the budget, so runs of them go through :func:`_greedy_fit` at once;
    only the others are decided one by one. Returns (positions taken in pick order,
    pixels left).
    """
    dependent = np.flatnonzero(_overlaps_earlier(images, boxes))
    watched = set(images[dependent].tolist())  # images whose taken boxes a later item must check
    taken_boxes: dict[int, list[np.ndarray]] = {}
    taken: list[np.ndarray] = []
    remaining = int(budget_pixels)
    start = 0
    for stop in [*dependent.tolist(), images.size]:
        if remaining == 0:
            break
        run = _greedy_fit(np.arange(start, stop), costs, remaining)
        remaining -= int(costs[run].sum())
        taken.append(run)
        for i in run[np.isin(images[run], list(watched))].tolist() if watched else ():
            taken_boxes.setdefault(int(images[i]), []).append(boxes[i])
        if stop < images.size and 0 < costs[stop] <= remaining:
            y0, x0, y1, x1 = boxes[stop]
            if not any(min(y1, b[2]) > max(y0, b[0]) and min(x1, b[3]) > max(x0, b[1])
                       for b in taken_boxes.get(int(images[stop]), ())):
                taken.append(np.array([stop]))
                taken_boxes.setdefault(int(images[stop]), []).append(boxes[stop])
                remaining -= int(costs[stop])
        start = stop + 1
    return (np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)), remaining
