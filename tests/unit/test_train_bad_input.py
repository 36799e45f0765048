"""Bad input to the training job fails before anything is written, with a named cause."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segrl.config import load_config
from segrl.models import build_model

REPO = Path(__file__).resolve().parents[2]


def train_main():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tiny_camvid(root: Path, label_value: int = 3) -> Path:
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "a.png")
        Image.fromarray(np.full((8, 8), label_value, np.uint8)).save(root / f"{split}annot" / "a.png")
    return root


def run(tmp_path, capsys, *overrides) -> tuple[int, str]:
    code = train_main()([f"store.root={tmp_path / 'store'}", "data.dataset=camvid", *overrides])
    return code, capsys.readouterr().err


def assert_store_untouched(tmp_path):
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


def test_missing_data_root(tmp_path, capsys):
    code, err = run(tmp_path, capsys, f"data.root={tmp_path / 'nowhere'}")
    assert code == 2 and "nowhere" in err and "does not exist" in err
    assert_store_untouched(tmp_path)


def test_label_id_out_of_range_names_file_and_value(tmp_path, capsys):
    root = tiny_camvid(tmp_path / "camvid", label_value=40)
    code, err = run(tmp_path, capsys, f"data.root={root}")
    assert code == 2 and "trainannot/a.png" in err and "[40]" in err
    assert_store_untouched(tmp_path)


def test_weights_of_another_architecture(tmp_path, capsys):
    root = tiny_camvid(tmp_path / "camvid")
    torch.save(build_model("deeplabv3_mobilenet_v3_large", 11).state_dict(), tmp_path / "dl.pt")
    code, err = run(tmp_path, capsys, f"data.root={root}", f"model.weights={tmp_path / 'dl.pt'}")
    assert code == 2 and "dl.pt" in err and "lraspp_mobilenet_v3_large" in err
    assert_store_untouched(tmp_path)


def test_unknown_key_and_wrong_type(tmp_path, capsys):
    code, err = run(tmp_path, capsys, "train.learning_rate=0.1")
    assert code == 2 and "train.learning_rate" in err
    code, err = run(tmp_path, capsys, "train.epochs=many")
    assert code == 2 and "train.epochs" in err and "many" in err
    assert_store_untouched(tmp_path)


def test_unreachable_store_endpoint_is_named(tmp_path, capsys):
    root = tiny_camvid(tmp_path / "camvid")
    code = train_main()([f"data.root={root}", "data.dataset=camvid", "store.root=s3://bucket/runs",
                         "store.endpoint_url=http://127.0.0.1:9", "store.retry_seconds=0"])
    err = capsys.readouterr().err
    assert code == 2 and "127.0.0.1:9" in err and "unreachable" in err


def test_relative_data_root_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from segrl.config import absolute_local_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_local_paths(load_config(overrides=["data.dataset=camvid", "data.root=data/camvid",
                                                      "store.root=s3://b/runs"]))
    assert cfg.data.root == str(tmp_path / "data" / "camvid") and cfg.store.root == "s3://b/runs"


@pytest.fixture(autouse=True)
def _no_aws_endpoint(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
