"""Unlabeled sets too large for memory, streamed through Ray Data into Ray Train.

A pool of millions of frames does not fit ``data.cache_bytes``, and decoding it in the
training worker (its DataLoader) takes the cores the training step needs. Streamed, Ray
Data's tasks run each frame's deterministic ``transform.pre`` stage (decode, resize to
``data.base_size``) wherever the cluster has a free CPU, Ray Train splits the stream
between the workers (``ray.train.get_dataset_shard``), and each worker applies only
``transform.post`` (the random weak view and the conversion) to the rows it receives, as
the map-style set does on every draw: the batches are the same in distribution.

The stream's order is a seeded permutation of the whole set, cut into blocks, with a
local shuffle per pass; which rows reach which worker is Ray Data's choice. A resumed
run therefore draws other unlabeled batches than the interrupted one would have (its
labeled batches, steps and schedule stay exact); ``data.stream_unlabeled=never`` keeps
the exact, seeded unlabeled batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors

from segrl.config import STREAM_MODES

UNLABELED_STREAM = "unlabeled"  # the Ray Train dataset name of the stream
ROWS_PER_BLOCK = 64  # frames per block of the stream (and per decode task)
SHUFFLE_BATCHES = 4  # each worker's local shuffle buffer, in batches

# A raw sample's tensor kinds, so that a streamed row is rebuilt as the transforms expect
# (v2 transforms treat an Image and a Mask differently: bilinear against nearest).
KINDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Image": tv_tensors.Image, "Mask": tv_tensors.Mask, "Tensor": lambda t: t,
}


@dataclass(frozen=True)
class StreamPlan:
    """Whether a run streams its unlabeled set, and why (the console line)."""

    stream: bool
    reason: str

    def line(self, what: str = "unlabeled set") -> str:
        verb = "streamed through Ray Data" if self.stream else "not streamed"
        return f"[segrl] {what}: {verb} ({self.reason})"


def plan_stream(mode: str, frames: int, frame_bytes: int, budget_bytes: int) -> StreamPlan:
    """Stream a set of ``frames`` frames of about ``frame_bytes`` decoded each when
    ``data.stream_unlabeled`` is ``always``, or ``auto`` and the set would not fit the
    ``budget_bytes`` of frame cache left for it."""
    if mode not in STREAM_MODES:
        raise ValueError(f"data.stream_unlabeled must be one of {', '.join(STREAM_MODES)}, got {mode!r}")
    if mode != "auto":
        return StreamPlan(mode == "always", f"data.stream_unlabeled = {mode}")
    estimate = frames * frame_bytes
    mib = f"{frames} frames, about {estimate / 2**20:.0f} MiB decoded"
    if estimate > budget_bytes:
        return StreamPlan(True, f"{mib} > the {max(budget_bytes, 0) / 2**20:.0f} MiB of data.cache_bytes left")
    return StreamPlan(False, f"{mib}, fits data.cache_bytes")


def sample_kinds(sample: dict[str, Any]) -> dict[str, str]:
    """Each tensor field's kind (``Image``, ``Mask`` or a plain ``Tensor``); other fields
    (the id, metadata columns) are values."""
    kinds = {}
    for key, value in sample.items():
        if isinstance(value, torch.Tensor):
            kinds[key] = next((name for name in ("Image", "Mask") if isinstance(value, KINDS[name])), "Tensor")
    return kinds


def samples_to_columns(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Samples as columns for a Ray Data block: tensors stacked (an object array of
    arrays where their shapes differ, which Ray Data stores as a variable-shaped tensor
    column), values as a plain array."""
    columns: dict[str, np.ndarray] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            arrays = [v.as_subclass(torch.Tensor).numpy() for v in values]
            if all(a.shape == arrays[0].shape for a in arrays):
                columns[key] = np.stack(arrays)
            else:
                column = np.empty(len(arrays), dtype=object)
                column[:] = arrays
                columns[key] = column
        else:
            columns[key] = np.asarray(values)
    return columns


def columns_to_samples(columns: dict[str, np.ndarray], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """The inverse of :func:`samples_to_columns`: one raw-stage sample per row, its tensors
    of the kinds ``kinds`` names (writable copies: the transforms may work in place)."""
    rows = len(next(iter(columns.values())))
    samples = []
    for j in range(rows):
        sample: dict[str, Any] = {}
        for key, column in columns.items():
            if key in kinds:
                sample[key] = KINDS[kinds[key]](torch.from_numpy(np.array(column[j])))
            else:
                value = column[j]
                sample[key] = value.item() if isinstance(value, np.generic) else value
        samples.append(sample)
    return samples


def decode_rows(batch: dict[str, np.ndarray], dataset: Dataset) -> dict[str, np.ndarray]:
    """Ray Data's decode step: the ``transform.pre`` stage of the frames at ``batch["index"]``."""
    pre = dataset.transform.pre
    return samples_to_columns([pre(dataset.raw(int(i))) for i in batch["index"]])


def frame_stream(dataset: Dataset, seed: int, decode_cpus: float, progress_bars: bool = False) -> Any:
    """A Ray Data dataset of ``dataset``'s frames at their ``transform.pre`` stage, in a
    seeded order, decoded lazily by tasks of ``decode_cpus`` CPUs each."""
    import pyarrow as pa
    import ray.data

    order = np.random.default_rng(seed).permutation(len(dataset))
    # blocks made on the driver, so no read task holds a CPU; the decode runs per block
    blocks = [pa.table({"index": order[i : i + ROWS_PER_BLOCK]}) for i in range(0, len(order), ROWS_PER_BLOCK)]
    stream = ray.data.from_arrow(blocks).map_batches(
        decode_rows, fn_kwargs={"dataset": dataset}, batch_size=ROWS_PER_BLOCK, batch_format="numpy",
        num_cpus=decode_cpus,
    )
    # every pass of every split would draw its bars between the epoch lines (this dataset's own context)
    stream.context.enable_progress_bars = progress_bars
    return stream


def streamed_batches(
    passes: Callable[[int], Iterable[dict[str, np.ndarray]]], kinds: dict[str, str],
    post: Callable[[dict[str, Any]], dict[str, Any]], first_pass: int = 0,
) -> Iterator[dict[str, Any]]:
    """Endless training batches from ``passes(n)``, the stream's rows of pass ``n`` in
    batches: each row through ``post`` (the random augmentation), collated as a DataLoader
    collates. A restored run starts a new pass, ``first_pass``."""
    n = first_pass
    while True:
        empty = True
        for columns in passes(n):
            empty = False
            yield default_collate([post(sample) for sample in columns_to_samples(columns, kinds)])
        if empty:
            # drop_last gave nothing: the generator would otherwise spin forever
            raise ValueError("the streamed unlabeled set cannot fill one batch on this worker: lower "
                             "train.batch_size or the data.batch_ratio share of unlabeled images")
        n += 1


def shard_passes(shard: Any, batch_size: int, seed: int) -> Callable[[int], Iterable[dict[str, np.ndarray]]]:
    """Pass ``n`` of a Ray Train dataset shard in batches of ``batch_size`` rows, locally
    shuffled with a seed of its own."""

    def one_pass(n: int) -> Iterable[dict[str, np.ndarray]]:
        return shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=SHUFFLE_BATCHES * batch_size,
                                  local_shuffle_seed=seed + n)

    return one_pass
