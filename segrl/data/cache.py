"""Decoded, resized frames kept in memory, once per training worker (``data.cache_bytes``).

A labeled set is read every epoch; decoding its PNGs and resizing them to
``data.base_size`` each time costs more than the model's step at small resolutions. When
the set's frames fit the budget they are decoded once, at their ``transform.pre`` stage
(deterministic), and only ``transform.post`` (the random augmentation) runs per draw, so
a cached set yields exactly what the uncached one does for the same random stream.

DataLoader worker processes are forked from the training worker after the cache is
filled: they read its tensors through copy-on-write pages, not copies. Sets that do not
fit (a pool of millions) stay as they are, decoded on access.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset


def sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes of a sample's tensors."""
    return sum(v.numel() * v.element_size() for v in sample.values() if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class CacheReport:
    frames: int
    bytes: int
    cached: bool
    reason: str = ""

    def line(self, what: str) -> str:
        size = f"{self.bytes / 2**20:.1f} MiB"
        if self.cached:
            return f"[segrl] frame cache: {what} {self.frames} frames decoded once, {size}"
        return f"[segrl] frame cache: {what} not cached ({self.reason})"


class CachedFrames(Dataset):
    """``dataset`` whose frames' ``transform.pre`` stage is held in ``frames``; everything
    else (``classes``, ``metadata``, ``sample_id`` ...) is the dataset's own."""

    def __init__(self, dataset: Dataset, frames: list[dict[str, Any]]) -> None:
        self.dataset, self.frames = dataset, frames
        self.post = dataset.transform.post

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.post(dict(self.frames[i]))  # post builds new tensors: the cache is never written

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "frames", "post"):
            raise AttributeError(name)  # unpickling (DataLoader workers) looks these up before __init__
        return getattr(self.dataset, name)


def has_cacheable_stage(dataset: Dataset | None) -> bool:
    """Whether ``dataset`` decodes in two stages (``raw``, ``transform.pre`` / ``post``), so
    that its frames can be kept (or streamed) at their deterministic ``pre`` stage."""
    return dataset is not None and hasattr(dataset, "raw") and hasattr(getattr(dataset, "transform", None), "pre")


def frame_bytes(dataset: Dataset) -> int:
    """Bytes of one frame of ``dataset`` at its cacheable stage (its first frame's)."""
    return sample_bytes(dataset.transform.pre(dataset.raw(0)))


def cache_frames(dataset: Dataset | None, max_bytes: int) -> tuple[Dataset | None, CacheReport | None]:
    """(``dataset`` with its frames decoded once, report) when they fit ``max_bytes``;
    otherwise ``dataset`` as it is. The size is estimated from the first frame, then
    checked as frames are decoded: a set that turns out larger stays uncached."""
    if dataset is None or len(dataset) == 0:
        return dataset, None
    if not has_cacheable_stage(dataset):
        return dataset, CacheReport(len(dataset), 0, False, "its frames have no cacheable stage")
    if max_bytes <= 0:
        return dataset, CacheReport(len(dataset), 0, False, "data.cache_bytes = 0")
    pre = dataset.transform.pre
    first = pre(dataset.raw(0))
    estimate = sample_bytes(first) * len(dataset)
    if estimate > max_bytes:
        return dataset, CacheReport(len(dataset), estimate, False,
                                    f"about {estimate / 2**20:.0f} MiB > data.cache_bytes = {max_bytes / 2**20:.0f} MiB")
    frames, total = [first], sample_bytes(first)
    for i in range(1, len(dataset)):
        frames.append(pre(dataset.raw(i)))
        total += sample_bytes(frames[-1])
        if total > max_bytes:
            return dataset, CacheReport(len(dataset), total, False,
                                        f"over data.cache_bytes = {max_bytes / 2**20:.0f} MiB at frame {i}")
    return CachedFrames(dataset, frames), CacheReport(len(dataset), total, True)


def cache_training_sets(sets: Any, max_bytes: int, skip: tuple[str, ...] = ()) -> list[str]:
    """Cache the sets of a training run (``segrl.data.build.TrainingSets``) in the order they
    are read most, while the budget lasts: labeled, labeled target, unlabeled, pseudo-labeled,
    then evaluation; not those named in ``skip`` (streamed ones). Returns a console line per set."""
    lines, left = [], max_bytes
    for name in ("labeled", "target_labeled", "unlabeled", "pseudo", "val"):
        if name in skip:
            continue
        cached, report = cache_frames(getattr(sets, name), left)
        if report is None:
            continue
        setattr(sets, name, cached)
        if report.cached:
            left -= report.bytes
        lines.append(report.line(name))
    return lines
