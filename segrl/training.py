"""Training building blocks with no Ray in them: sampler, optimiser, schedule, step, eval.

``segrl.engine.train`` runs these inside Ray Train workers; tests and the
throughput benchmark run them in a plain process.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from segrl.config import TrainConfig
from segrl.data.manifest import IMAGE_PIXELS_COLUMN, LABELED_PIXELS_COLUMN, read_bytes
from segrl.metrics import all_reduce_confusion, confusion_matrix

# Run layout: <run>/train/ckpt_<step>/checkpoint.pt
TRAIN_DIR = "train"
CHECKPOINT_PREFIX = "ckpt_"
CHECKPOINT_FILE = "checkpoint.pt"
# Written after checkpoint.pt with its size: a folder whose checkpoint.pt lacks it, or has
# another size, was cut off mid-write or mid-upload (a killed driver) and is never resumed.
COMPLETE_FILE = "complete.json"


class ShardSampler(Sampler[int]):
    """Deterministic per-epoch shuffle, split across ranks, able to start mid-epoch.

    Rank ``r`` of ``world`` takes every ``world``-th index of the epoch's permutation,
    padded so every rank gets the same count (DDP needs equal step counts). Starting
    at ``start`` batches in lets a restored run continue exactly where its checkpoint
    left off without decoding the skipped images. With ``weights``, each pass is instead
    ``draws`` indices drawn with replacement in proportion to them (``WeightedRandomSampler``
    seeded by seed, epoch and pass), e.g. images by their labeled pixels.
    """

    def __init__(
        self,
        size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad: bool = True,
        repeats: int = 1,
        weights: Sequence[float] | None = None,
        draws: int | None = None,
    ) -> None:
        self.size, self.rank, self.world = size, rank, world
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.repeats = repeats  # passes over the data per epoch (over-sampling a small set)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.draws = size if draws is None else draws  # indices per pass when drawn by weight
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.weights is not None:
            passes = [self._weighted_pass(k) for k in range(self.repeats)]
        elif self.shuffle:
            passes = [np.random.default_rng([self.seed, self.epoch, k]).permutation(self.size) if k else
                      np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
                      for k in range(self.repeats)]
        else:
            passes = [np.arange(self.size)] * self.repeats
        order = np.concatenate(passes)
        if self.pad:
            per_rank = math.ceil(order.size / self.world)
            order = np.resize(order, per_rank * self.world)
        return order[self.rank :: self.world].tolist()

    def _weighted_pass(self, k: int) -> np.ndarray:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, k]).generate_state(1)[0])
        drawn = WeightedRandomSampler(self.weights, self.draws, replacement=True,
                                      generator=torch.Generator().manual_seed(seed))
        return np.fromiter(drawn, dtype=np.int64, count=self.draws)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


def labeled_sampler(dataset: Dataset, cfg: TrainConfig, rank: int, world: int, batch_size: int) -> ShardSampler:
    """The sampler of the labeled set: with ``train.sampling=labeled_pixels`` and a set that
    knows each image's labeled pixels (the loop's manifests), images are drawn in
    proportion to them and an epoch is as many draws as the labels fill whole images.

    Sparse labels (hundreds of images with a region each) would otherwise get one draw per
    image whatever it holds: most steps would carry few labels, and a fixed epoch count
    would not grow with the labels. The loss divides each image's pixels by its labeled
    pixels (``label_weights``), so every labeled pixel keeps the same expected weight.
    Equal counts (dense labels) keep the plain per-epoch permutation.
    """
    counts = label_counts(dataset) if cfg.sampling == "labeled_pixels" else None
    if counts is None or bool((counts[0] == counts[0][0]).all()):
        return ShardSampler(len(dataset), rank, world, seed=cfg.seed)
    labeled, pixels = counts
    draws = max(math.ceil(labeled.sum() / pixels.mean()), batch_size * world)
    return ShardSampler(len(dataset), rank, world, seed=cfg.seed, weights=labeled.tolist(), draws=draws)


def label_counts(dataset: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """Labeled and all pixels per image (``N`` each), where a manifest carries them."""
    columns = getattr(dataset, "metadata_columns", ())
    if LABELED_PIXELS_COLUMN not in columns or IMAGE_PIXELS_COLUMN not in columns:
        return None
    labeled = np.asarray(dataset.metadata(LABELED_PIXELS_COLUMN), dtype=np.float64)
    return labeled, np.asarray(dataset.metadata(IMAGE_PIXELS_COLUMN), dtype=np.float64)


def label_weights(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` drawn by labeled pixels, with ``label_weight`` ``B``: 1 / labeled pixels of
    each image, the importance weight that undoes the draw's preference for dense images."""
    return dict(batch, label_weight=1.0 / batch[LABELED_PIXELS_COLUMN].double().clamp(min=1))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on norms and biases (they only rescale)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    poly: linear warm-up then (1 - t)^power (DeepLab); onecycle: cosine up for the first
    30% then cosine down to 1e-4 of the peak; constant: 1 after warm-up.
    """
    total_steps = max(total_steps, 1)
    if cfg.schedule == "onecycle":
        peak = max(int(0.3 * total_steps), 1)
        if step < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * step / peak)) / 2
        t = min((step - peak) / max(total_steps - peak, 1), 1.0)
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * t)) / 2
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    return max(1.0 - step / total_steps, 0.0) ** cfg.poly_power


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` over this run's ``total_steps``, or over its ``cfg.schedule_span`` share
    of one longer schedule: runs that continue each other (the loop's rounds with
    ``al.retrain=continue``) then follow one schedule instead of each going back to the peak."""
    start, end = cfg.schedule_span
    whole = max(round(total_steps / (end - start)), 1)  # steps of the whole schedule at this run's pace
    offset = round(start * whole)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(offset + step, whole, cfg)
    )


@dataclass
class StepContext:
    """What one training step needs besides the batch."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    ignore_index: int = 255
    amp_dtype: torch.dtype | None = None  # None = full precision
    scaler: torch.amp.GradScaler | None = None
    extra: nn.Module | None = None  # recipe modules outside DDP: their gradients are averaged here


def amp_settings(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, Any]:
    """bfloat16 where the GPU has it (no loss scaling needed), else float16 with a scaler."""
    if not enabled or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def recipe_step(
    ctx: StepContext, recipe: Any, batch_x: dict[str, Any], batch_u: dict[str, Any] | None, epoch: int
) -> dict[str, float]:
    """One optimiser step of a recipe's losses (see segrl.methods.recipes); returns them."""
    def to_device(batch: dict[str, Any] | None) -> dict[str, Any] | None:
        if batch is None:
            return None
        return {k: v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    with torch.autocast(
        device_type=ctx.device.type, dtype=ctx.amp_dtype or torch.float32,
        enabled=ctx.amp_dtype is not None,
    ):
        losses = recipe.losses(ctx.model, to_device(batch_x), to_device(batch_u), epoch)
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(losses["loss"]).backward()
        _sync_extra(ctx)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        losses["loss"].backward()
        _sync_extra(ctx)
        ctx.optimizer.step()
    ctx.scheduler.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _sync_extra(ctx: StepContext) -> None:
    if ctx.extra is not None:
        from segrl.methods.terms import all_reduce_gradients

        all_reduce_gradients(ctx.extra)


def cycle_batches(
    dataset: Dataset, batch_size: int, rank: int, world: int, seed: int, workers: int, start_batch: int = 0
) -> Iterator[dict[str, Any]]:
    """Endless batches of this rank's shard of ``dataset``, reshuffled on every pass.

    ``start_batch`` batches are skipped (without decoding them), so that a restored run
    draws the batches the interrupted one would have drawn next.
    """
    sampler = ShardSampler(len(dataset), rank, world, seed=seed)
    per_pass = len(sampler) // batch_size
    if per_pass == 0:
        # drop_last would yield no batch at all and this generator would spin forever
        raise ValueError(f"{len(dataset)} images ({len(sampler)} per worker) cannot fill a batch of "
                         f"{batch_size}: lower train.batch_size or the data.batch_ratio share of this set")
    epoch, skip = divmod(start_batch, per_pass)
    while True:
        sampler.set_epoch(epoch, start=skip * batch_size)
        yield from make_loader(dataset, batch_size, sampler, workers, drop_last=True, seed=[seed, epoch])
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def evaluate_confusion(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    device: torch.device,
    ignore_index: int = 255,
    distributed: bool = False,
) -> torch.Tensor:
    """Confusion matrix (rows = truth) of ``model`` over ``loader``, summed over workers."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        logits = model(batch["image"].to(device, non_blocking=True))
        pred = logits.argmax(1)
        conf += confusion_matrix(pred, batch["mask"].to(device), num_classes, ignore_index)
    model.train(was_training)
    if distributed:
        conf = all_reduce_confusion(conf)
    return conf.cpu()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def save_training_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    epoch: int,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    recipe_state: dict[str, Any] | None = None,
    offsets: dict[str, int] | None = None,
    resume: dict[str, Any] | None = None,
) -> Path:
    """Write model, optimiser, schedule, position, config and recipe state into ``directory``.

    ``offsets`` (``step``, ``epoch``) place this run inside a chain of runs that continue
    each other (``train.resume_from``): the recipe's clocks (EMA warm-up, cold start) run on.
    ``resume`` is what a restored run needs to go on as if never stopped: each rank's random
    streams (``rng_state``) and the running sums of a checkpoint taken mid-epoch.
    ``COMPLETE_FILE`` is written last: see ``is_complete_checkpoint``.
    """
    path = Path(directory) / CHECKPOINT_FILE
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": epoch,
        "config": config,
        "metrics": metrics or {},
        "recipe": recipe_state or {},
        "offsets": offsets or {"step": 0, "epoch": 0},
        "resume": resume or {},
    }
    torch.save(state, path)
    (Path(directory) / COMPLETE_FILE).write_text(json.dumps({"bytes": path.stat().st_size}))
    return path


def is_complete_checkpoint(checkpoint_bytes: int | None, marker_text: str | None) -> bool:
    """Whether a checkpoint folder was written whole: its ``COMPLETE_FILE`` is there and
    names the size its ``checkpoint.pt`` has (the two may be uploaded in either order)."""
    if checkpoint_bytes is None or marker_text is None:
        return False
    try:
        return json.loads(marker_text).get("bytes") == checkpoint_bytes
    except (ValueError, AttributeError):
        return False


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name ``ckpt_<step>``; None for any other name."""
    digits = name[len(CHECKPOINT_PREFIX):]
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def rng_state() -> dict[str, Any]:
    """This process's global random streams: torch (CPU and CUDA), numpy and Python's."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def generator_states(root: Any) -> dict[str, torch.Tensor]:
    """States of the ``torch.Generator`` objects held by ``root`` and the segrl objects
    inside it (a recipe's ClassMix draws, replay buffer, memory bank), by attribute path."""
    return {path: generator.get_state() for path, generator in _generators(root, "", set())}


def set_generator_states(root: Any, states: dict[str, torch.Tensor]) -> None:
    """Restore what ``generator_states`` returned for an object built the same way."""
    for path, generator in _generators(root, "", set()):
        if path in states:
            generator.set_state(states[path])


def _generators(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, torch.Generator]]:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Generator):
        yield path, obj
        return
    if isinstance(obj, (list, tuple)):
        children = [(str(i), v) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        children = [(str(k), v) for k, v in sorted(obj.items(), key=lambda item: str(item[0]))]
    elif type(obj).__module__.startswith("segrl") and hasattr(obj, "__dict__"):
        # only segrl's own objects: a torchvision model or a dataset holds no generator of ours
        children = sorted(vars(obj).items())
    else:
        return
    for name, child in children:
        yield from _generators(child, f"{path}.{name}" if path else name, seen)


def load_training_state(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_training_state`` (tensors and plain data only)."""
    path = Path(directory) / CHECKPOINT_FILE
    return torch.load(path, map_location="cpu", weights_only=True)


def read_training_state(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """A ``checkpoint.pt`` written by ``save_training_state``, local or ``s3://``."""
    return torch.load(io.BytesIO(read_bytes(uri, endpoint_url)), map_location="cpu", weights_only=True)


def continue_from(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                  recipe: Any) -> dict[str, int]:
    """Start a run where another one ended (``train.resume_from``): its model, optimiser
    moments and recipe state (teacher, banks, heads); returns this run's offsets.

    Load the optimiser before building the scheduler: the scheduler then keeps the saved
    base learning rates and sets the rate of this run's first step itself.
    """
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("recipe"):
        recipe.load_state_dict(state["recipe"])
    offsets = state.get("offsets", {"step": 0, "epoch": 0})
    return {"step": offsets["step"] + state["step"], "epoch": offsets["epoch"] + state["epoch"]}


def make_loader(
    dataset: Dataset, batch_size: int, sampler: Sampler, workers: int, drop_last: bool,
    seed: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader over ``sampler``'s indices. With ``seed``, its worker seeds come from a
    generator of its own instead of a draw from the global torch stream, so that a loader
    made anew by a restored run leaves that stream where the interrupted run had it."""
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
    )
