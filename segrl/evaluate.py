"""Evaluate a finished (or running) run's latest checkpoint on a split; plain PyTorch, no Ray."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from segrl.config import ExperimentConfig, apply_overrides, config_from_dict
from segrl.storage import ArtifactStore, ObjectNotFoundError, open_store
from segrl.training import CHECKPOINT_FILE, CHECKPOINT_PREFIX, TRAIN_DIR


@dataclass(frozen=True)
class EvalResult:
    split: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    table: str
    output_uri: str


def latest_checkpoint(store: ArtifactStore) -> str:
    """Key of the newest ``train/ckpt_<step>`` folder that holds a complete checkpoint."""
    names = [k.rsplit("/", 1)[-1] for k in store.list(TRAIN_DIR)]
    steps = sorted((n for n in names if n.startswith(CHECKPOINT_PREFIX)), reverse=True)
    for name in steps:
        if store.exists(f"{TRAIN_DIR}/{name}/{CHECKPOINT_FILE}"):
            return f"{TRAIN_DIR}/{name}"
    raise ObjectNotFoundError(f"no checkpoint under {store.uri(TRAIN_DIR)}: has the run trained yet?")


def load_run_config(store: ArtifactStore, overrides: list[str] | None = None) -> ExperimentConfig:
    """The run's saved config with optional ``a.b=c`` overrides (e.g. a moved data root)."""
    if not store.exists("config.yaml"):
        raise ObjectNotFoundError(f"{store.uri('config.yaml')} does not exist: is {store.uri()} a segrl run?")
    return config_from_dict(apply_overrides(store.read_yaml("config.yaml"), overrides or []))


def evaluate_run(
    run_uri: str,
    split: str = "val",
    overrides: list[str] | None = None,
    endpoint_url: str | None = None,
    batch_size: int = 4,
    device: str | None = None,
) -> EvalResult:
    """Evaluate the latest checkpoint of the run at ``run_uri`` on ``split``.

    Writes ``eval_<split>.json`` and ``eval_<split>.md`` into the run folder.
    """
    from segrl.data.build import build_dataset
    from segrl.metrics import format_iou_table, iou_per_class, mean_iou, pixel_accuracy
    from segrl.models import build_model
    from segrl.training import ShardSampler, evaluate_confusion, load_training_state, make_loader

    store = open_store(run_uri, endpoint_url)
    cfg = load_run_config(store, overrides)
    endpoint = endpoint_url or cfg.store.endpoint_url
    ckpt_key = latest_checkpoint(store)
    with tempfile.TemporaryDirectory() as tmp:
        store.download_dir(ckpt_key, tmp)
        state = load_training_state(tmp)
    dataset = build_dataset(cfg.data, split, train=False, endpoint_url=endpoint)
    classes = list(dataset.classes)
    model = build_model(cfg.model.arch, len(classes))
    model.load_state_dict(state["model"])
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target)
    loader = make_loader(dataset, batch_size, ShardSampler(len(dataset), shuffle=False, pad=False), 0, False)
    conf = evaluate_confusion(model, loader, len(classes), target, dataset.ignore_index)
    ious = iou_per_class(conf).tolist()
    metrics = {
        "split": split,
        "checkpoint": store.uri(ckpt_key),
        "step": state["step"],
        "images": len(dataset),
        "miou": mean_iou(conf),
        "pixel_acc": pixel_accuracy(conf),
        "iou_per_class": {c: (None if math.isnan(v) else v) for c, v in zip(classes, ious, strict=True)},
    }
    table = format_iou_table(conf, classes)
    store.write_json(f"eval_{split}.json", metrics)
    store.write_text(f"eval_{split}.md", table + "\n")
    return EvalResult(split, store.uri(ckpt_key), metrics, table, store.uri(f"eval_{split}.json"))
