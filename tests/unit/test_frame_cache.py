"""The frame cache: a cached set yields exactly what the uncached one does, and only sets
that fit the budget are cached."""

from __future__ import annotations

import pickle

import torch
from torch.utils.data import DataLoader

from segrl.data.build import SplitView, TrainingSets
from segrl.data.cache import CachedFrames, cache_frames, cache_training_sets, sample_bytes
from segrl.data.synthetic import SyntheticScenes
from segrl.data.transforms import eval_transform, train_transform

SIZE = (48, 64)


def scenes(count: int = 6) -> SyntheticScenes:
    return SyntheticScenes(count, size=SIZE, transform=train_transform((24, 32), base_size=(24, 32),
                                                                       scale_range=(0.5, 1.5)))


def draws(dataset, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    return [dataset[i] for i in (0, 3, 1, 3, 5)]


def test_a_cached_set_yields_the_uncached_samples_for_the_same_random_stream():
    plain = scenes()
    cached, report = cache_frames(plain, 10 * 2**20)
    assert isinstance(cached, CachedFrames) and report.cached and report.frames == 6
    # the resized frames are what is kept: 3 x 24 x 32 image + mask + valid, uint8
    assert report.bytes == 6 * (3 + 1 + 1) * 24 * 32
    for a, b in zip(draws(plain, 7), draws(cached, 7), strict=True):
        assert a["id"] == b["id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["valid"], b["valid"])
    # random augmentation still runs per draw: the same frame twice differs
    torch.manual_seed(0)
    assert not torch.equal(cached[3]["image"], cached[3]["image"])
    assert cached.classes == plain.classes and cached.ignore_index == plain.ignore_index


def test_the_cache_is_not_written_by_a_draw_and_survives_dataloader_workers():
    cached, _ = cache_frames(scenes(4), 10 * 2**20)
    before = [{k: v.clone() for k, v in f.items() if isinstance(v, torch.Tensor)} for f in cached.frames]
    batches = list(DataLoader(cached, batch_size=2, num_workers=1))
    assert [b["image"].shape for b in batches] == [torch.Size([2, 3, 24, 32])] * 2
    for frame, kept in zip(cached.frames, before, strict=True):
        assert all(torch.equal(frame[k], v) for k, v in kept.items())
    assert len(pickle.loads(pickle.dumps(cached))) == 4


def test_sets_over_the_budget_stay_uncached_and_the_budget_is_shared_in_order():
    plain = scenes()
    frame = sample_bytes(plain.transform.pre(plain.raw(0)))
    kept, report = cache_frames(plain, 6 * frame - 1)
    assert kept is plain and not report.cached and "data.cache_bytes" in report.reason
    kept, report = cache_frames(plain, 0)
    assert kept is plain and report.reason == "data.cache_bytes = 0"
    val = SyntheticScenes(2, size=SIZE, split="val", transform=eval_transform(base_size=(24, 32)))
    sets = TrainingSets(labeled=SplitView(plain, [0, 1, 2]), val=val, unlabeled=SplitView(plain, [3, 4, 5]))
    # room for the labeled and the unlabeled three, not for val after them
    lines = cache_training_sets(sets, 6 * frame + 1)
    assert isinstance(sets.labeled, CachedFrames) and isinstance(sets.unlabeled, CachedFrames)
    assert sets.val is val
    assert [line.split(":")[1].split()[0] for line in lines] == ["labeled", "unlabeled", "val"]
    assert "not cached" in lines[-1]
