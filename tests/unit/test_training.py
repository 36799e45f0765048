"""Pure training pieces: sampler sharding and resumption, learning-rate schedules, a step."""

from __future__ import annotations

import pytest
import torch

from segrl.config import TrainConfig
from segrl.training import ShardSampler, build_optimizer, lr_factor


def test_shards_partition_one_epoch_and_pad_to_equal_length():
    shards = [ShardSampler(10, rank, 3, seed=1) for rank in range(3)]
    for s in shards:
        s.set_epoch(2)
    lists = [list(s) for s in shards]
    assert {len(x) for x in lists} == {4}  # ceil(10 / 3)
    assert set(sum(lists, [])) == set(range(10))


def test_epochs_shuffle_differently_but_deterministically():
    a, b = ShardSampler(50, seed=3), ShardSampler(50, seed=3)
    a.set_epoch(0)
    b.set_epoch(0)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))


def test_start_offset_continues_the_same_order():
    s = ShardSampler(20, rank=1, world=2, seed=0)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=6)
    assert list(s) == full[6:] and len(s) == len(full) - 6


def test_unpadded_eval_shards_cover_each_image_once():
    shards = [ShardSampler(7, r, 2, shuffle=False, pad=False) for r in range(2)]
    assert sorted(sum((list(s) for s in shards), [])) == list(range(7))


@pytest.mark.parametrize("schedule", ["poly", "onecycle", "constant"])
def test_schedules_known_points(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_steps=0, poly_power=1.0)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    if schedule == "poly":
        assert factors[0] == 1.0 and factors[50] == pytest.approx(0.5)
    if schedule == "constant":
        assert set(factors) == {1.0}
    if schedule == "onecycle":
        assert factors[30] == pytest.approx(1.0)
        assert factors[0] < 0.1 and factors[-1] < 0.01
        assert max(factors) == pytest.approx(1.0)


def test_warmup_ramps_linearly():
    cfg = TrainConfig(schedule="poly", warmup_steps=4)
    assert [lr_factor(s, 100, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_optimizer_skips_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 1
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def test_sampler_repeats_a_small_set_within_an_epoch_and_stays_deterministic():
    from segrl.training import ShardSampler

    sampler = ShardSampler(3, rank=0, world=2, seed=1, repeats=3)
    other = ShardSampler(3, rank=1, world=2, seed=1, repeats=3)
    assert len(sampler) == len(other) == 5  # 9 draws padded to 10, split in two
    whole = ShardSampler(3, seed=1, repeats=3).indices()
    assert sorted(whole) == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # every image once per pass
    assert ShardSampler(3, seed=1, repeats=3).indices()[:3] == ShardSampler(3, seed=1).indices()  # first pass unchanged
    again = ShardSampler(3, rank=0, world=2, seed=1, repeats=3)
    assert again.indices() == sampler.indices()
