"""Config parsing: YAML + dotted overrides, and errors that name the field and value."""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest

from segrl.config import (
    ConfigError,
    ExperimentConfig,
    ScoreConfig,
    StoreConfig,
    apply_overrides,
    config_from_dict,
    from_dict,
    load_config,
    parse_override,
    replace,
    to_dict,
)


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_round_trip_through_dict():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert config_from_dict(to_dict(cfg)) == cfg


def test_yaml_and_overrides_are_applied_with_types(tmp_path):
    path = write(tmp_path, "name: exp1\ntrain:\n  lr: 0.01\n  epochs: 3\ndata:\n  crop_size: [64, 96]\n")
    cfg = load_config(path, ["train.lr=0.5", "compute.num_workers=2", "data.hflip=false"])
    assert cfg.name == "exp1"
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 3
    assert cfg.compute.num_workers == 2
    assert cfg.data.crop_size == (64, 96)
    assert cfg.data.hflip is False


def test_the_words_true_and_false_of_a_string_field_stay_words():
    # `compute.use_gpu=true` as the README writes it: YAML reads it as a boolean
    assert load_config(overrides=["compute.use_gpu=true"]).compute.use_gpu == "true"
    assert load_config(overrides=["compute.use_gpu=false"]).compute.use_gpu == "false"
    with pytest.raises(ConfigError, match="compute.use_gpu"):
        load_config(overrides=["compute.use_gpu=yes please"])


def test_int_is_accepted_for_float_field():
    assert load_config(overrides=["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("text, number", [("1e-3", 1e-3), ("5E-4", 5e-4), ("2e3", 2e3), ("+1e-2", 1e-2)])
def test_numbers_yaml_reads_as_strings_are_numbers_in_float_fields(tmp_path, text, number):
    # YAML 1.1 reads 1e-3 (no dot in the mantissa, or no sign in the exponent) as a string
    assert isinstance(parse_override(f"train.lr={text}")[1], str)
    assert load_config(overrides=[f"train.lr={text}"]).train.lr == number
    from_file = load_config(write(tmp_path, f"train:\n  lr: {text}\ndata:\n  scale_range: [{text}, 4e3]\n"))
    assert from_file.train.lr == number and from_file.data.scale_range == (number, 4000.0)
    assert isinstance(from_file.train.lr, float)


def test_number_text_is_only_a_number_in_float_fields(tmp_path):
    assert load_config(overrides=["name=1e3"]).name == "1e3"  # a string field keeps the text
    with pytest.raises(ConfigError, match="'train.epochs' = '1e3'"):
        load_config(overrides=["train.epochs=1e3"])
    with pytest.raises(ConfigError, match="'train.lr' = 'abc' must be of type float"):
        load_config(overrides=["train.lr=abc"])
    path = write(tmp_path, "train:\n  lr: 1e-3x\n")
    with pytest.raises(ConfigError, match="exp.yaml: config field 'train.lr' = '1e-3x'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.weight_decay=.nan", "train.weight_decay"),
        ("train.lr=inf", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.momentum=-.inf", "train.momentum"),
        ("train.poly_power=NaN", "train.poly_power"),
        ("method.lambda_u=.nan", "method.lambda_u"),
        ("method.ema_momentum=.nan", "method.ema_momentum"),
        ("al.budget_per_round=.nan", "al.budget_per_round"),
        ("compute.cpus_per_worker=.inf", "compute.cpus_per_worker"),
        ("data.scale_range=[0.5, .inf]", "data.scale_range[1]"),
        ("train.schedule_span=[.nan, 1.0]", "train.schedule_span[0]"),
    ],
)
def test_nan_and_infinity_are_rejected_naming_the_field(override, field):
    # nan passes every `<` range check (nan < 0 is false): weight_decay=nan trained to loss nan
    with pytest.raises(ConfigError, match=rf"'{re.escape(field)}' = -?(nan|inf) must be a finite number"):
        load_config(overrides=[override])


def test_every_float_field_refuses_nan():
    """No float field of any section slips through (the check sits in the type coercion)."""
    checked = 0
    for section, cls in typing.get_type_hints(ExperimentConfig).items():
        if not dataclasses.is_dataclass(cls):
            continue
        for name, hint in typing.get_type_hints(cls).items():
            if hint is float:
                checked += 1
                with pytest.raises(ConfigError, match=rf"'{section}.{name}' = nan must be a finite"):
                    load_config(overrides=[f"{section}.{name}=.nan"])
    assert checked > 20
    with pytest.raises(ConfigError, match="'top_q' = nan must be a finite"):
        from_dict(ScoreConfig, {"top_q": math.nan})


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("train.lrr=0.1", "train.lrr", None),
        ("trian.lr=0.1", "trian", None),
        ("train.epochs=ten", "train.epochs", "'ten'"),
        ("train.epochs=2.5", "train.epochs", "2.5"),
        ("train.epochs=0", "train.epochs", "0"),
        ("train.lr=-1", "train.lr", "-1"),
        ("train.amp=3", "train.amp", "3"),
        ("train.epochs=true", "train.epochs", "True"),
        ("model.arch=unet", "model.arch", "'unet'"),
        ("data.dataset=kitti", "data.dataset", "'kitti'"),
        ("data.crop_size=[64]", "data.crop_size", "[64]"),
        ("data.scale_range=[2.0, 1.0]", "data.scale_range", "(2.0, 1.0)"),
        ("compute.use_gpu=maybe", "compute.use_gpu", "'maybe'"),
        ("store.endpoint_url=localhost:8333", "store.endpoint_url", "'localhost:8333'"),
        ("run=a/b", "run", "'a/b'"),
    ],
)
def test_bad_values_are_rejected_naming_field_and_value(override, field, value):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert field in message
    if value is not None:
        assert value in message


def test_unknown_key_in_file_names_file_key_and_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "train.batchsize" in message and "batch_size" in message


def test_dataset_other_than_synthetic_needs_a_root():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(overrides=["data.dataset=camvid"])


def test_manifest_needs_class_names():
    with pytest.raises(ConfigError, match="data.classes"):
        load_config(overrides=["data.dataset=manifest", "data.root=/pool"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=") == (["a"], "")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_replace_with_dotted_keys_leaves_original_untouched():
    cfg = ExperimentConfig()
    new = replace(cfg, **{"train.lr": 0.5, "name": "x"})
    assert new.train.lr == 0.5 and new.name == "x"
    assert cfg.train.lr != 0.5


def test_shipped_configs_load():
    from pathlib import Path

    from segrl.config import ScoreConfig

    for path in sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml")):
        if path.name.startswith("sweep_"):
            continue  # sweep files: tests/unit/test_sweep.py::test_shipped_sweeps_load
        load_config(path, cls=ScoreConfig if path.name.startswith("score_") else ExperimentConfig)


def test_annotation_tools_and_image_urls_are_checked_by_name():
    cfg = load_config(overrides=["annotation.tools=[label_studio,cvat]", "annotation.url_root=/data"])
    assert cfg.annotation.tools == ("label_studio", "cvat") and cfg.annotation.image_urls == "local"
    with pytest.raises(ConfigError, match=r"annotation.tools\[0\]' = 'labelbox' is not one of label_studio, cvat"):
        load_config(overrides=["annotation.tools=[labelbox]"])
    with pytest.raises(ConfigError, match="annotation.url_root.*LOCAL_FILES_DOCUMENT_ROOT"):
        load_config(overrides=["annotation.tools=[label_studio]"])
    with pytest.raises(ConfigError, match="annotation.url_prefix"):
        load_config(overrides=["annotation.image_urls=prefix"])


def test_store_retry_seconds_defaults_to_the_stores_own_default():
    from segrl.storage import DEFAULT_RETRY_SECONDS

    # one patience everywhere: a frame read without a config waits as long as a configured store
    assert StoreConfig().retry_seconds == DEFAULT_RETRY_SECONDS
