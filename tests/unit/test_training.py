"""Pure training pieces: sampler sharding and resumption, learning-rate schedules, a step."""

from __future__ import annotations

import pytest
import torch

from segrl.config import ConfigError, TrainConfig, load_config
from segrl.training import (
    ShardSampler,
    build_optimizer,
    build_scheduler,
    continue_from,
    label_weights,
    labeled_sampler,
    lr_factor,
    read_training_state,
    save_training_state,
)


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


def _lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int,
         model: torch.nn.Module) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(2, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return rates


class _NoRecipe:
    def load_state_dict(self, state):
        raise AssertionError("no recipe state was saved")


def test_a_continued_run_follows_one_schedule_with_the_optimiser_state(tmp_path):
    """Two runs covering [0, 0.5) and [0.5, 1) of one schedule, the second continuing the
    first (al.retrain=continue), take the learning rates of one 10-step run, and the second
    starts with the first's model and Adam moments (not a fresh optimiser back at the peak)."""
    whole = TrainConfig(schedule="onecycle", lr=0.1)
    torch.manual_seed(0)
    reference = torch.nn.Linear(3, 2)
    opt = build_optimizer(reference, whole)
    expected = _lrs(opt, build_scheduler(opt, 10, whole), 10, reference)

    first_cfg = TrainConfig(schedule="onecycle", lr=0.1, schedule_span=(0.0, 0.5))
    torch.manual_seed(0)
    first = torch.nn.Linear(3, 2)
    opt_a = build_optimizer(first, first_cfg)
    sched_a = build_scheduler(opt_a, 5, first_cfg)
    rates = _lrs(opt_a, sched_a, 5, first)
    save_training_state(tmp_path, first, opt_a, sched_a, step=5, epoch=1, config={})

    second_cfg = TrainConfig(schedule="onecycle", lr=0.1, schedule_span=(0.5, 1.0))
    second = torch.nn.Linear(3, 2)
    opt_b = build_optimizer(second, second_cfg)
    offsets = continue_from(read_training_state(str(tmp_path / "checkpoint.pt")), second, opt_b, _NoRecipe())
    assert offsets == {"step": 5, "epoch": 1}
    assert torch.equal(second.weight, first.weight)
    assert opt_b.state[second.weight]["step"].item() == 5  # Adam's moments carried over
    rates += _lrs(opt_b, build_scheduler(opt_b, 5, second_cfg), 5, second)
    assert rates == pytest.approx(expected)
    assert max(rates[5:]) < max(rates[:5])  # the second run never climbs back to the peak


def test_schedule_span_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"train.schedule_span.*0.6, 0.4"):
        load_config(overrides=["train.schedule_span=[0.6, 0.4]"])
    with pytest.raises(ConfigError, match="al.retrain.*'warm'"):
        load_config(overrides=["al.retrain=warm"])


class _CountedSet(torch.utils.data.Dataset):
    """A labeled set that knows its labeled pixels per image, as the loop's manifests do."""

    metadata_columns = ("labeled_pixels", "image_pixels")

    def __init__(self, labeled: list[int], pixels: int = 100) -> None:
        self.columns = {"labeled_pixels": labeled, "image_pixels": [pixels] * len(labeled)}

    def __len__(self) -> int:
        return len(self.columns["labeled_pixels"])

    def metadata(self, name: str) -> list:
        return self.columns[name]


def test_sparse_labels_are_drawn_by_labeled_pixels_and_an_epoch_is_their_whole_images():
    """Two fully labeled images and eight with a tenth labeled: 2.8 images' worth of labels.
    An epoch is 3 draws (not 10), images come up in proportion to their labels, and the
    loss weight 1 / labeled pixels gives every labeled pixel the same expected weight."""
    counts = [100, 100] + [10] * 8
    sampler = labeled_sampler(_CountedSet(counts), TrainConfig(seed=4), rank=0, world=1, batch_size=1)
    assert len(sampler) == 3
    draws = []
    for epoch in range(3000):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    share = torch.bincount(torch.tensor(draws), minlength=10).double() / len(draws)
    expected = torch.tensor(counts, dtype=torch.double) / sum(counts)
    assert torch.allclose(share, expected, atol=0.01)
    sampler.set_epoch(7)
    assert list(sampler) == list(sampler)  # the same draw for the same epoch (resumable)
    weights = label_weights({"labeled_pixels": torch.tensor(counts)})["label_weight"]
    assert torch.allclose(expected * weights, expected[0] * weights[0])  # draw share x weight: equal
    # Small sets still fill a batch on every worker; two workers split each epoch's draws.
    assert len(labeled_sampler(_CountedSet(counts), TrainConfig(), 0, 2, batch_size=4)) == 4


def test_dense_or_unknown_label_counts_keep_the_plain_permutation():
    dense = labeled_sampler(_CountedSet([100] * 5), TrainConfig(seed=1), 0, 1, 1)
    assert dense.weights is None and dense.indices() == ShardSampler(5, seed=1).indices()
    uniform = labeled_sampler(_CountedSet([100, 10]), TrainConfig(sampling="images"), 0, 1, 1)
    assert uniform.weights is None and len(uniform) == 2
    plain = labeled_sampler(torch.utils.data.TensorDataset(torch.zeros(3)), TrainConfig(), 0, 1, 1)
    assert plain.weights is None and len(plain) == 3
