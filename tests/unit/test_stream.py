"""The streamed unlabeled set (segrl.data.stream): when it streams, and that a streamed batch
is what the map-style set gives for the same frames and random stream."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchvision import tv_tensors

from segrl.config import MethodConfig
from segrl.console import quiet_cluster_env
from segrl.data.cache import frame_bytes
from segrl.data.stream import (
    columns_to_samples,
    decode_rows,
    plan_stream,
    sample_kinds,
    samples_to_columns,
    streamed_batches,
)
from segrl.data.synthetic import SyntheticScenes
from segrl.data.transforms import train_transform
from segrl.engine.train import QUIET_PORTS, ephemeral_ports, free_loopback_port
from segrl.methods.recipes import build_recipe, unlabeled_draws
from segrl.models import build_model

SIZE = (48, 64)


def scenes(count: int = 6) -> SyntheticScenes:
    return SyntheticScenes(count, size=SIZE, domain="target", split="unlabeled",
                           transform=train_transform((24, 32), base_size=(24, 32), scale_range=(0.5, 1.5)))


def test_auto_streams_only_a_set_over_the_cache_left_and_the_modes_override():
    assert not plan_stream("auto", 100, 1000, 100_000).stream  # exactly fits
    over = plan_stream("auto", 101, 1000, 100_000)
    assert over.stream and "101 frames" in over.reason and "data.cache_bytes" in over.reason
    assert plan_stream("auto", 1, 1000, -5).stream  # the labeled sets took the whole budget
    assert plan_stream("always", 1, 1, 10**9).stream
    assert not plan_stream("never", 10**7, 10**6, 0).stream
    assert plan_stream("never", 1, 1, 1).line() == "[segrl] unlabeled set: not streamed (data.stream_unlabeled = never)"
    with pytest.raises(ValueError, match="data.stream_unlabeled.*'sometimes'"):
        plan_stream("sometimes", 1, 1, 1)


def test_rows_become_columns_and_back_with_their_kinds():
    data = scenes(3)
    samples = [data.transform.pre(data.raw(i)) for i in range(3)]
    kinds = sample_kinds(samples[0])
    assert kinds == {"image": "Image", "mask": "Mask", "valid": "Mask"}
    columns = samples_to_columns(samples)
    assert columns["image"].shape == (3, 3, 24, 32) and columns["image"].dtype == np.uint8
    assert list(columns["id"]) == [s["id"] for s in samples]
    back = columns_to_samples(columns, kinds)
    for before, after in zip(samples, back, strict=True):
        assert type(after["image"]) is tv_tensors.Image and type(after["mask"]) is tv_tensors.Mask
        assert after["id"] == before["id"] and isinstance(after["id"], str)
        assert all(torch.equal(after[k], before[k]) for k in kinds)
    # frames of different sizes (no data.base_size): one array per row
    ragged = samples_to_columns([{"image": tv_tensors.Image(torch.zeros(3, 2, 2, dtype=torch.uint8))},
                                 {"image": tv_tensors.Image(torch.ones(3, 4, 5, dtype=torch.uint8))}])
    assert [a.shape for a in ragged["image"]] == [(3, 2, 2), (3, 4, 5)]
    assert columns_to_samples(ragged, {"image": "Image"})[1]["image"].shape == (3, 4, 5)


def test_a_streamed_batch_is_the_map_style_batch_of_the_same_frames_and_random_stream():
    data = scenes(6)
    order = np.array([4, 1, 5, 0, 3, 2])
    # what Ray Data's decode tasks hand the worker: two blocks of rows at the pre stage
    blocks = [decode_rows({"index": order[:3]}, data), decode_rows({"index": order[3:]}, data)]
    passes = []

    def one_pass(n: int):
        passes.append(n)
        return iter(blocks)

    torch.manual_seed(11)
    streamed = streamed_batches(one_pass, sample_kinds(data.transform.pre(data.raw(0))), data.transform.post,
                                first_pass=7)
    got = [next(streamed) for _ in range(3)]  # the third batch begins a second pass
    torch.manual_seed(11)
    expected = [default_collate([data[int(i)] for i in order[:3]]), default_collate([data[int(i)] for i in order[3:]]),
                default_collate([data[int(i)] for i in order[:3]])]
    assert passes == [7, 8]
    for a, b in zip(got, expected, strict=True):
        assert a["id"] == b["id"]
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "valid"))
    assert got[0]["image"].dtype == torch.float32 and got[0]["image"].shape == (3, 3, 24, 32)


def test_a_stream_that_cannot_fill_a_batch_fails_naming_the_settings():
    with pytest.raises(ValueError, match="train.batch_size or the data.batch_ratio"):
        next(streamed_batches(lambda n: iter([]), {}, lambda s: s))


def test_frame_bytes_is_one_frame_at_its_cached_stage():
    assert frame_bytes(scenes(2)) == (3 + 1 + 1) * 24 * 32


@pytest.mark.parametrize("name", ["supervised", "mean_teacher", "pseudo_label", "proda", "distill"])
@pytest.mark.parametrize("labor", [False, True])
def test_the_driver_knows_which_set_a_recipe_draws_before_it_is_built(name, labor, tmp_path):
    cfg = MethodConfig(name=name, labor_selector=labor)
    if name == "distill":  # its teacher is read from a weights file
        torch.save(build_model("lraspp_mobilenet_v3_large", 4).state_dict(), tmp_path / "teacher.pt")
        cfg = MethodConfig(name=name, labor_selector=labor, teacher_weights=str(tmp_path / "teacher.pt"))
    recipe = build_recipe(cfg, build_model("lraspp_mobilenet_v3_large", 4), torch.ones(4), 255, 0)
    draws = unlabeled_draws(cfg)
    assert (draws is not None) == recipe.needs_unlabeled
    assert draws in (None, "pseudo" if recipe.needs_pseudo else "unlabeled")


def test_the_driver_plans_target_batches_for_a_supervised_run_with_adversarial_alignment():
    cfg = MethodConfig(lambda_adv=0.001)  # AdaptSegNet: the term needs the unlabeled target's maps
    recipe = build_recipe(cfg, build_model("lraspp_mobilenet_v3_large", 4), torch.ones(4), 255, 0)
    assert unlabeled_draws(cfg) == "unlabeled" and recipe.needs_unlabeled
    assert unlabeled_draws(MethodConfig()) is None


def test_picked_ports_lie_below_the_ephemeral_range_and_are_free():
    low, _ = ephemeral_ports()
    port = free_loopback_port()
    if low > QUIET_PORTS[0]:
        assert QUIET_PORTS[0] <= port < low
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # nobody holds it


def test_ray_data_in_a_cluster_process_prints_warnings_and_progress_only(monkeypatch):
    monkeypatch.delenv("SEGRL_VERBOSE", raising=False)
    env = quiet_cluster_env()
    config = json.loads(open(env["RAY_DATA_LOGGING_CONFIG"]).read())
    assert config["handlers"]["console"]["level"] == "WARNING" and "file" in config["loggers"]["ray.data"]["handlers"]
    script = (
        "import logging, ray.data\n"
        "logging.getLogger('ray.data._internal.execution').info('Starting execution of Dataset x')\n"
        "logging.getLogger('ray.data._internal.progress').warning('Progress bars disabled. To enable, set it')\n"
        "logging.getLogger('ray.data._internal.progress').info('Total Progress: 3/9')\n"
        "logging.getLogger('ray.data.read').warning('a real warning')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed
    assert "Total Progress: 3/9" in printed and "a real warning" in printed
    assert "Starting execution" not in printed and "Progress bars disabled" not in printed
    monkeypatch.setenv("SEGRL_VERBOSE", "1")
    assert quiet_cluster_env() == {}
