"""Pure training pieces: sampler sharding and resumption, learning-rate schedules, a step."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from segrl.config import ConfigError, TrainConfig, load_config
from segrl.training import (
    COMPLETE_FILE,
    ShardSampler,
    build_optimizer,
    build_scheduler,
    checkpoint_step,
    continue_from,
    cycle_batches,
    generator_states,
    is_complete_checkpoint,
    label_weights,
    labeled_sampler,
    load_training_state,
    lr_factor,
    make_loader,
    read_training_state,
    rng_state,
    save_training_state,
    set_generator_states,
    set_rng_state,
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


# --------------------------------------------------------------------------- resuming exactly


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_saved_random_streams_give_the_same_draws_after_a_restore(tmp_path):
    """A restored run must draw the augmentations the uninterrupted one drew: torch, numpy and
    Python's streams go into the checkpoint and come back out of a weights_only load."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _draws()
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, TrainConfig())
    save_training_state(tmp_path, model, opt, build_scheduler(opt, 4, TrainConfig()), 1, 0, {},
                        resume={"rng": [rng_state()]})
    expected = _draws()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)  # what a fresh worker starts with
    set_rng_state(load_training_state(tmp_path)["resume"]["rng"][0])
    assert _draws() == expected


def test_the_generators_inside_a_recipe_are_saved_and_restored():
    from segrl.config import MethodConfig
    from segrl.methods.recipes import build_recipe
    from segrl.models import build_model

    cfg = MethodConfig(name="mean_teacher", classmix=True, replay_buffer=4, lambda_contrastive=0.1)
    recipe = build_recipe(cfg, build_model("lraspp_mobilenet_v3_large", 3), torch.ones(3), 255, seed=5)
    states = generator_states(recipe)
    assert {"generator", "buffer._generator", "terms.0.generator", "terms.0.memory._generator"} <= set(states)
    expected = {path: torch.rand(2, generator=g).tolist() for path, g in _generators_of(recipe).items()}
    fresh = build_recipe(cfg, build_model("lraspp_mobilenet_v3_large", 3), torch.ones(3), 255, seed=6)
    set_generator_states(fresh, states)
    assert {path: torch.rand(2, generator=g).tolist() for path, g in _generators_of(fresh).items()} == expected


def _generators_of(recipe) -> dict:
    from segrl.training import _generators

    return dict(_generators(recipe, "", set()))


class _Frames(torch.utils.data.Dataset):
    """Frames whose 'augmentation' is a draw from the global torch stream, like the transforms."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"index": torch.tensor(i), "jitter": torch.rand(())}


def test_cycled_batches_started_at_a_batch_continue_as_the_uninterrupted_cycle():
    torch.manual_seed(0)
    whole = cycle_batches(_Frames(), 3, 0, 1, seed=4, workers=0)
    uninterrupted = [next(whole) for _ in range(7)]  # 3 batches per pass: into the third pass
    torch.manual_seed(0)
    for _ in range(5):
        next(cycle_batches(_Frames(), 3, 0, 1, seed=4, workers=0))  # the draws before the checkpoint
    resumed = cycle_batches(_Frames(), 3, 0, 1, seed=4, workers=0, start_batch=5)
    for expected in uninterrupted[5:]:
        batch = next(resumed)
        assert torch.equal(batch["index"], expected["index"]) and torch.equal(batch["jitter"], expected["jitter"])


def test_a_seeded_loader_leaves_the_global_stream_alone():
    # a DataLoader iterator draws its worker seed from the global stream unless it has a generator
    # of its own: a restored run making its loader anew mid-epoch would draw once more
    sampler = ShardSampler(4, shuffle=False)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    iter(make_loader(_Frames(), 2, sampler, 0, drop_last=True, seed=[0, 0, 1]))
    assert torch.equal(torch.rand(1), expected)


def test_a_checkpoint_is_complete_only_with_its_marker_naming_its_size(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, TrainConfig())
    path = save_training_state(tmp_path, model, opt, build_scheduler(opt, 4, TrainConfig()), 1, 0, {})
    marker = (tmp_path / COMPLETE_FILE).read_text()
    assert is_complete_checkpoint(path.stat().st_size, marker)
    assert not is_complete_checkpoint(path.stat().st_size - 1, marker)  # cut off mid-upload
    assert not is_complete_checkpoint(path.stat().st_size, None)  # marker not written (yet)
    assert not is_complete_checkpoint(None, marker)  # checkpoint.pt not uploaded (yet)
    assert not is_complete_checkpoint(path.stat().st_size, "{tru")
    assert checkpoint_step("ckpt_00000012") == 12 and checkpoint_step("checkpoint_manager_snapshot.json") is None


def test_a_killed_runs_checkpoints_are_pruned_to_keep_and_the_newest_complete_is_resumed(tmp_path):
    """What a driver killed mid-run leaves: checkpoints Ray Train never registered (its snapshot
    lags), one cut off mid-upload. The newest complete one is resumed; beyond keep_checkpoints
    only those Ray Train tracks stay (it refuses to start if one of them is gone)."""
    import json

    from segrl.engine.train import complete_checkpoints, prune_checkpoints
    from segrl.storage import open_store

    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, TrainConfig())
    train_dir = tmp_path / "run" / "train"
    for step in (2, 4, 8, 12, 14):
        folder = train_dir / f"ckpt_{step:08d}"
        folder.mkdir(parents=True)
        save_training_state(folder, model, opt, build_scheduler(opt, 4, TrainConfig()), step, 0, {})
    with (train_dir / "ckpt_00000014" / "checkpoint.pt").open("r+b") as f:
        f.truncate(100)  # the upload the kill cut short
    (train_dir / "ckpt_00000016").mkdir()  # an upload that had not begun
    (train_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "ckpt_00000004"}],
         "latest_checkpoint_result": {"checkpoint_dir_name": "ckpt_00000004"}}))
    store = open_store(str(tmp_path / "run"))
    assert complete_checkpoints(store)[:2] == ["ckpt_00000012", "ckpt_00000008"]
    prune_checkpoints(store, keep=1)
    assert sorted(p.name for p in train_dir.glob("ckpt_*")) == ["ckpt_00000004", "ckpt_00000012"]
    prune_checkpoints(store, keep=1)  # nothing more once only the kept ones are left
    assert complete_checkpoints(store) == ["ckpt_00000012", "ckpt_00000004"]


def test_a_ranks_recipe_state_is_saved_as_its_differences_from_rank_0_and_restored_whole():
    """Each DDP rank's teacher keeps BatchNorm statistics of its own images (and its own replay
    buffer): a resumed rank must get back its own, not rank 0's, at the cost of what differs."""
    from segrl.engine.train import SAME, differences, own_rank_state

    shared = torch.arange(6.0)
    rank_0 = {"teacher": {"model": {"w": shared.clone(), "bn.mean": torch.zeros(2)}, "momentum": 0.99},
              "buffer": {"images": torch.ones(2, 3), "capacity": 8}, "terms": []}
    rank_1 = {"teacher": {"model": {"w": shared.clone(), "bn.mean": torch.ones(2)}, "momentum": 0.99},
              "buffer": {"images": torch.zeros(2, 3), "capacity": 8}, "terms": []}
    diff = differences(rank_1, rank_0)
    assert diff["teacher"]["model"]["w"] == SAME and diff["teacher"]["momentum"] == SAME  # not stored twice
    assert torch.equal(diff["teacher"]["model"]["bn.mean"], torch.ones(2))
    restored = own_rank_state(rank_0, [diff], rank=1, world=2)
    assert torch.equal(restored["teacher"]["model"]["w"], shared)
    assert torch.equal(restored["teacher"]["model"]["bn.mean"], torch.ones(2))
    assert torch.equal(restored["buffer"]["images"], torch.zeros(2, 3)) and restored["terms"] == []
    assert own_rank_state(rank_0, [diff], rank=0, world=2) is rank_0
    assert own_rank_state(rank_0, [], rank=1, world=2) is rank_0  # a checkpoint of another world size


def test_a_driver_joining_a_loopback_cluster_is_told_so():
    # Ray resolves 127.0.0.1 to the machine's outward address unless told the cluster is local:
    # a driver of local_up.sh's cluster (on 127.0.0.1) would look for its GCS there and hang
    from segrl.engine.train import is_loopback_address

    for address in ("127.0.0.1:6379", "localhost:6379", "http://127.0.0.1:8265", "[::1]:6379"):
        assert is_loopback_address(address), address
    for address in ("192.0.2.2:6379", "head.example.org:6379", "ray://10.0.0.5:10001"):
        assert not is_loopback_address(address), address


def test_without_clock_drops_only_the_values_that_depend_on_the_clock():
    from segrl.engine.train import without_clock

    history = [{"epoch": 1, "loss": 0.5, "images_per_s": 9.1, "eval_s": 0.3, "previous_checkpoint_s": 1.2,
                "val_miou": 0.4}]
    assert without_clock(history) == [{"epoch": 1, "loss": 0.5, "val_miou": 0.4}]
    assert history[0]["eval_s"] == 0.3  # the input is not modified


def test_a_local_cluster_names_its_own_dashboard_for_the_state_api(monkeypatch):
    """Every process of the local cluster (Ray Train's placement-group cleaner among them)
    inherits this address and asks the state API there instead of looking for "the" Ray
    instance of the machine; the driver's own value comes back after the start."""
    from segrl.engine.train import free_loopback_port, own_dashboard_env

    port = free_loopback_port()
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with own_dashboard_env(port):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # none before, none after
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    with own_dashboard_env(port):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"
