"""Scoring a batch of pool frames with K checkpoints, in one pass (no Ray, no pool I/O).

:class:`PoolScorer` is what each Ray Data model actor holds (see
``segrl.engine.score``); it also runs in a plain process. It loads every checkpoint
once, runs all of them on the same batch, and reduces the dense probability maps to
small per-image values before returning, so dense maps never leave it:

* for each pixel score ``s`` in the config's signals (``entropy``, ``least_confidence``,
  ``margin``): ``s_mean`` and ``s_top_q`` (mean of the top-q most uncertain pixels);
* ``confidence``: ``mean_max_prob`` and ``confident_share`` (max probability >= tau);
* ``stability`` (ST++): mean IoU between each earlier checkpoint's prediction and the
  final one's; 1.0 with a single checkpoint. ``instability = 1 - stability``;
* ``embedding`` (asked for): the final model's features averaged over the frame, unit
  length (for selection that spreads its picks, ``al.spread_candidates``);
* always ``class_hist``: predicted pixels per class (for class-balanced selection);
* with ``regions_top_r > 0``: the r best grid regions per image (boxes in original pixels);
* optional pseudo labels (PNG class ids + PNG confidence 0..255) for chosen ids.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from segrl.config import ScoreConfig
from segrl.data.labels import DataError
from segrl.storage import ArtifactStore, open_store
from segrl.training import CHECKPOINT_FILE, CHECKPOINT_PREFIX

PIXEL_SIGNALS = ("entropy", "least_confidence", "margin")


@dataclass(frozen=True)
class CheckpointInfo:
    """What the driver learns about the checkpoints before scoring starts."""

    uris: tuple[str, ...]  # oldest first; the last is the final model
    arch: str
    classes: tuple[str, ...]
    image_size: tuple[int, int] | None  # the training resolution, if the config fixes one


def list_checkpoints(uri: str, endpoint_url: str | None = None) -> list[str]:
    """Checkpoint folders under ``uri``, oldest first (``ckpt_<n>`` sort by step).

    ``uri`` is either one checkpoint folder (holding ``checkpoint.pt``) or a folder of
    ``ckpt_*`` folders, e.g. a run's ``train/`` or a round's ``checkpoints/``.
    """
    store = open_store(uri, endpoint_url)
    if store.exists(CHECKPOINT_FILE):
        return [store.uri()]
    names = sorted(
        k.rsplit("/", 1)[-1] for k in store.list("") if k.rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)
    )
    found = [store.uri(n) for n in names if store.exists(f"{n}/{CHECKPOINT_FILE}")]
    if not found:
        raise DataError(
            f"no checkpoints at {uri}: expected {CHECKPOINT_FILE} there or in {CHECKPOINT_PREFIX}* folders"
        )
    return found


def load_checkpoint_state(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The state dict saved by segrl training in checkpoint folder ``uri``."""
    store = open_store(uri, endpoint_url)
    try:
        data = store.read_bytes(CHECKPOINT_FILE)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"checkpoint {store.uri(CHECKPOINT_FILE)} cannot be loaded: {exc}") from exc


def _classes_of(state: dict[str, Any], uri: str) -> tuple[str, ...]:
    classes = state.get("metrics", {}).get("classes")
    if classes:
        return tuple(classes)
    raise DataError(f"checkpoint {uri} does not record its class names (metrics.classes)")


def _training_size(config: dict[str, Any]) -> tuple[int, int] | None:
    data = config.get("data", {})
    size = data.get("base_size") or (data.get("synthetic_size") if data.get("dataset") == "synthetic" else None)
    return (int(size[0]), int(size[1])) if size else None


def inspect_checkpoints(uri: str, endpoint_url: str | None = None) -> CheckpointInfo:
    """List and check the K checkpoints: same architecture and classes in all of them."""
    uris = list_checkpoints(uri, endpoint_url)
    first = load_checkpoint_state(uris[-1], endpoint_url)
    arch = first["config"]["model"]["arch"]
    classes = _classes_of(first, uris[-1])
    for other in uris[:-1]:
        state = load_checkpoint_state(other, endpoint_url)
        if state["config"]["model"]["arch"] != arch or _classes_of(state, other) != classes:
            raise DataError(
                f"checkpoint {other} is a different model ({state['config']['model']['arch']}) "
                f"or label set than {uris[-1]} ({arch}); score with checkpoints of one run"
            )
    return CheckpointInfo(tuple(uris), arch, classes, _training_size(first["config"]))


class PoolScorer:
    """Runs K checkpoints on uint8 frames and returns per-image rows (see module doc)."""

    def __init__(
        self,
        cfg: ScoreConfig,
        info: CheckpointInfo,
        device: str | torch.device = "cpu",
        pseudo_ids: frozenset[str] | None = None,
        out_store: ArtifactStore | None = None,
    ) -> None:
        from segrl.models import build_model

        self.cfg, self.info = cfg, info
        self.device = torch.device(device)
        self.num_classes = len(info.classes)
        endpoint = cfg.store.endpoint_url or None
        self.models = []
        self.labor_heads = None
        for uri in info.uris:
            state = load_checkpoint_state(uri, endpoint)
            model = build_model(info.arch, self.num_classes)
            model.load_state_dict(state["model"])
            self.models.append(model.to(self.device).eval())
        if "labor_heads" in state:  # the final checkpoint carries LabOR's two-head selector
            from segrl.models.heads import TwoHeadClassifier

            heads = TwoHeadClassifier(self.models[-1].feature_channels, self.num_classes)
            heads.load_state_dict(state["labor_heads"])
            self.labor_heads = heads.to(self.device).eval()
        self.pseudo_all = cfg.pseudo_labels == "all"
        self.pseudo_ids = pseudo_ids or frozenset()
        self.out_store = out_store
        from segrl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def normalise(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return (x.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> torch.Tensor:
        """K x N x C x H x W softmax maps of uint8 frames N x H x W x 3."""
        return self.probabilities_and_features(images)[0]

    @torch.inference_mode()
    def probabilities_and_features(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`probabilities` and the final model's features N x D x h x w, from the
        same forward passes."""
        x = self.normalise(images)
        probs = [model(x).float().softmax(1) for model in self.models[:-1]]
        logits, features = self.models[-1](x, return_features=True)
        return torch.stack([*probs, logits.float().softmax(1)]), features

    @torch.inference_mode()
    def labor_maps(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """LabOR's view of frames N x H x W x 3: (disagreement mask N x H x W bool, head
        discrepancy N x H x W, final-model prediction N x H x W, features N x D x H x W)."""
        from segrl.losses import classifier_discrepancy_map

        x = self.normalise(images)
        logits, features = self.models[-1](x, return_features=True)
        logits_a, logits_b = self.labor_heads(features, size=tuple(x.shape[-2:]))
        probs_a, probs_b = logits_a.float().softmax(1), logits_b.float().softmax(1)
        mask = probs_a.argmax(1) != probs_b.argmax(1)
        features = F.interpolate(features.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return mask, classifier_discrepancy_map(probs_a, probs_b), logits.argmax(1), features

    @torch.inference_mode()
    def score(
        self, images: np.ndarray, ids: list[str], original_sizes: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Per-image columns for frames ``images`` (N x H x W x 3 uint8, resized).

        ``original_sizes`` is N x 2 (H, W) before resizing; region boxes and pseudo
        labels are given at that resolution.
        """
        from segrl.acquisition import (
            IMAGE_REDUCTIONS,
            PIXEL_SCORES,
            class_histogram,
            confident_share,
            image_embedding,
            mean_max_prob,
            stability,
        )

        probs_k, features = self.probabilities_and_features(images)
        probs = probs_k[-1]
        pred = probs.argmax(1)
        out: dict[str, np.ndarray] = {}
        for name in self.cfg.signals:
            if name in PIXEL_SIGNALS:
                pixel = PIXEL_SCORES[name](probs)
                out[f"{name}_mean"] = IMAGE_REDUCTIONS["mean"](pixel).cpu().numpy()
                out[f"{name}_top_q"] = IMAGE_REDUCTIONS["top_q"](pixel, self.cfg.top_q).cpu().numpy()
            elif name == "confidence":
                out["mean_max_prob"] = mean_max_prob(probs).cpu().numpy()
                out["confident_share"] = confident_share(probs, self.cfg.confidence_tau).cpu().numpy()
            elif name == "stability":
                preds = probs_k.argmax(2)
                stab = stability(preds, self.num_classes).cpu().numpy()
                out["stability"] = stab
                out["instability"] = 1.0 - stab
            elif name == "embedding":  # for al.spread_candidates: D floats per frame
                out["embedding"] = image_embedding(features).cpu().numpy()
        out["class_hist"] = class_histogram(pred, self.num_classes).cpu().numpy()
        if self.labor_heads is not None:
            mask = self.labor_maps(images)[0]
            scale = original_sizes.prod(axis=1) / float(mask.shape[-2] * mask.shape[-1])
            # LabOR's signal: how many pixels (at the original size) the two heads disagree on
            out["disagree_pixels"] = np.round(mask.flatten(1).sum(1).cpu().numpy() * scale).astype(np.int64)
        if self.cfg.regions_top_r:
            boxes, scores = self.top_regions(probs, pred, original_sizes)
            out["region_boxes"], out["region_scores"] = boxes, scores
        if self.out_store is not None and (self.pseudo_all or self.pseudo_ids):
            out["pseudo_label"] = self.write_pseudo_labels(probs, ids, original_sizes)
        return out

    def top_regions(
        self, probs: torch.Tensor, pred: torch.Tensor, original_sizes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The r best grid regions per image: boxes N x r x 4 (y0, x0, y1, x1, original
        pixels, end-exclusive) and scores N x r (-1 where an image has fewer cells)."""
        from segrl.acquisition import (
            pixel_entropy,
            region_grid,
            region_impurity_uncertainty,
            region_mean,
        )

        size = tuple(self.cfg.region_size)
        if self.cfg.region_score == "impurity_uncertainty":
            grid_scores = region_impurity_uncertainty(probs, size)
        else:
            grid_scores = region_mean(pixel_entropy(probs), size)
        n, h, w = pred.shape
        cells = region_grid(h, w, size)
        flat = grid_scores.reshape(n, -1)
        r = min(self.cfg.regions_top_r, flat.shape[1])
        top_scores, top_index = flat.topk(r, dim=1)
        cell_boxes = torch.tensor(cells, dtype=torch.float64)
        boxes = np.full((n, self.cfg.regions_top_r, 4), -1, dtype=np.int32)
        scores = np.full((n, self.cfg.regions_top_r), -1.0, dtype=np.float32)
        for i in range(n):
            oh, ow = (int(v) for v in original_sizes[i])
            scale = torch.tensor([oh / h, ow / w, oh / h, ow / w], dtype=torch.float64)
            chosen = (cell_boxes[top_index[i].cpu()] * scale).round().to(torch.int32)
            boxes[i, :r] = chosen.numpy()
            scores[i, :r] = top_scores[i].cpu().numpy()
        return boxes, scores

    def write_pseudo_labels(
        self, probs: torch.Tensor, ids: list[str], original_sizes: np.ndarray
    ) -> np.ndarray:
        """Write ``pseudo_labels/<id>.png`` (class ids) and ``<id>_conf.png`` for chosen ids."""
        from PIL import Image

        assert self.out_store is not None
        written = np.array([""] * len(ids), dtype=object)
        for i, sample_id in enumerate(ids):
            if not (self.pseudo_all or sample_id in self.pseudo_ids):
                continue
            oh, ow = (int(v) for v in original_sizes[i])
            p = F.interpolate(probs[i : i + 1], size=(oh, ow), mode="bilinear", align_corners=False)[0]
            conf, label = p.max(0)
            key = f"pseudo_labels/{sample_id}.png"
            for name, array in (
                (key, label.to(torch.uint8).cpu().numpy()),
                (f"pseudo_labels/{sample_id}_conf.png", (conf * 255).round().to(torch.uint8).cpu().numpy()),
            ):
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                self.out_store.write_bytes(name, buffer.getvalue())
            written[i] = self.out_store.uri(key)
        return written


def save_scoring_checkpoint(
    folder: str, model: torch.nn.Module, arch: str, classes: tuple[str, ...] | list[str],
    image_size: tuple[int, int] | None = None, step: int = 0,
) -> str:
    """Write ``folder/checkpoint.pt`` in the format training writes, for weights that
    come from elsewhere (a user's own model, or a benchmark's untrained one)."""
    import os

    os.makedirs(folder, exist_ok=True)
    data = {"dataset": "manifest"}
    if image_size:
        data["base_size"] = list(image_size)
    path = os.path.join(folder, CHECKPOINT_FILE)
    torch.save({"model": model.state_dict(), "config": {"model": {"arch": arch}, "data": data},
                "step": step, "epoch": 0, "metrics": {"classes": list(classes)}}, path)
    return path


def resolve_image_size(cfg: ScoreConfig, info: CheckpointInfo) -> tuple[int, int]:
    """The scoring resolution: the config's, else the checkpoint's training resolution."""
    if cfg.image_size:
        return int(cfg.image_size[0]), int(cfg.image_size[1])
    if info.image_size:
        return info.image_size
    raise DataError(
        "set image_size=[H,W]: the checkpoints' training config does not fix a frame size"
    )
