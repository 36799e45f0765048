"""Sweep files: search-space parsing, validation against the config schema, resources."""

from __future__ import annotations

import pytest

from segrl.config import ConfigError, load_config
from segrl.sweep import Domain, load_sweep, max_concurrent_trials, parse_domain, trial_overrides


def write(tmp_path, text: str):
    (tmp_path / "base.yaml").write_text("name: base\ntrain:\n  epochs: 2\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_domains_known_answers():
    assert parse_domain("a", [1, 2]) == Domain("grid", (1, 2))
    assert parse_domain("a", "uniform(0.25, 0.75)") == Domain("uniform", (0.25, 0.75))
    assert parse_domain("a", "loguniform(1e-4, 1e-2)") == Domain("loguniform", (1e-4, 1e-2))
    assert parse_domain("a", "randint(1, 4)") == Domain("randint", (1, 3))
    assert parse_domain("a", "choice([entropy, margin])") == Domain("choice", ("entropy", "margin"))
    for bad in ("uniform(2, 1)", "loguniform(0, 1)", "normal(0, 1)", "choice([])", []):
        with pytest.raises(ConfigError, match="sweep space 'a'"):
            parse_domain("a", bad)


def test_sweep_file_loads_base_overrides_and_space(tmp_path):
    sweep = load_sweep(write(tmp_path, """
name: s
base: base.yaml
overrides: [train.lr=0.01]
space:
  method.lambda_u: [0.5, 1.0]
  train.weight_decay: loguniform(1e-5, 1e-3)
tune: {metric: val_miou, mode: max, scheduler: asha}
"""))
    assert sweep.name == "s" and sweep.base["train"] == {"epochs": 2, "lr": 0.01}
    assert set(sweep.space) == {"method.lambda_u", "train.weight_decay"}
    assert sweep.tune.scheduler == "asha"


def test_a_typo_in_a_swept_key_is_named_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="method.lamda_u"):
        load_sweep(write(tmp_path, "base: base.yaml\nspace:\n  method.lamda_u: [1.0]\n"))


def test_a_bad_value_in_the_space_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs.*'many'"):
        load_sweep(write(tmp_path, "base: base.yaml\nspace:\n  train.epochs: [2, many]\n"))
    with pytest.raises(ConfigError, match="method.image_weight_tau"):
        load_sweep(write(tmp_path, "base: base.yaml\nspace:\n  method.image_weight_tau: uniform(0.5, 1.5)\n"))


def test_unknown_sweep_and_tune_keys(tmp_path):
    with pytest.raises(ConfigError, match="'spaces'"):
        load_sweep(write(tmp_path, "base: base.yaml\nspaces: {}\n"))
    with pytest.raises(ConfigError, match="'metrik'"):
        load_sweep(write(tmp_path, "base: base.yaml\nspace: {train.lr: [0.1]}\ntune: {metrik: x}\n"))


def test_trial_overrides_are_yaml_values():
    assert trial_overrides({"train.lr": 0.01, "method.classmix": True, "data.crop_size": [8, 8]}) == [
        "data.crop_size=[8, 8]", "method.classmix=true", "train.lr=0.01"]


def test_concurrency_leaves_a_cpu_and_fits_the_workers():
    cfg = load_config(overrides=["compute.num_workers=1", "compute.cpus_per_worker=1"])
    assert max_concurrent_trials(2, cfg) == 1  # 2 cores: one trial at a time
    assert max_concurrent_trials(16, cfg) == 15
    big = load_config(overrides=["compute.num_workers=4", "compute.cpus_per_worker=2"])
    assert max_concurrent_trials(17, big) == 2
    with pytest.raises(ConfigError, match="needs 8 CPUs"):
        max_concurrent_trials(4, big)


def test_shipped_sweeps_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("configs").glob("sweep_*.yaml")):
        load_sweep(path)
