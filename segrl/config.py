"""Typed experiment configs: frozen dataclasses per concern, YAML in, `a.b=c` overrides.

Every field is declared once here with its type and default. Loading rejects an
unknown key, a value of the wrong type or an impossible value with a
``ConfigError`` that names the dotted field and the bad value, so a typo in a
200-GPU-hour sweep fails in the first second instead of being silently ignored.
Ray workers receive ``to_dict(cfg)`` and rebuild the dataclass with ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")
STREAM_MODES = ("auto", "always", "never")  # data.stream_unlabeled

# A number as people write it, which YAML 1.1 (PyYAML) reads as a string when the mantissa has
# no dot or the exponent no sign: 1e-3, 5E-4, 2e3. Only float fields accept it.
NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the field."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how its images are prepared."""

    dataset: str = "synthetic"  # synthetic | camvid | cityscapes | manifest
    root: str = ""  # dataset folder (camvid, cityscapes) or manifest URI (manifest)
    train_split: str = "train"
    val_split: str = "val"
    classes: tuple[str, ...] = ()  # class names of a manifest dataset (others know their own)
    # Resize every frame to this (H, W) first; empty = native resolution.
    base_size: tuple[int, ...] = ()
    crop_size: tuple[int, ...] = (128, 160)  # training crop (H, W)
    scale_range: tuple[float, ...] = (0.5, 2.0)  # random scale of the weak view
    hflip: bool = True
    loader_workers: int = 0  # DataLoader processes per Ray Train worker
    # Memory per training worker for frames decoded and resized once (labeled, unlabeled,
    # then val sets, while they fit; DataLoader processes share them); 0 = decode every draw.
    cache_bytes: int = 512 * 2**20
    # Unlabeled (or pseudo-labeled) images decoded by Ray Data tasks and streamed into the
    # workers (segrl.data.stream): auto = when they do not fit the cache_bytes left for them.
    stream_unlabeled: str = "auto"  # auto | always | never
    stream_decode_cpus: float = 0.5  # CPUs of each Ray Data decode task
    # Synthetic scenes (the zero-download default): sizes and render settings.
    synthetic_train_images: int = 256
    synthetic_val_images: int = 64
    synthetic_domain: str = "source"  # source | target
    synthetic_seed: int = 0
    synthetic_size: tuple[int, ...] = (128, 160)
    # Semi-supervised splits of the train split: which images keep their labels.
    labeled_ids: str = ""  # file/URI listing the labeled ids (one per line); others unlabeled
    labeled_count: int = 0  # or: this many labeled images, drawn with train.seed; 0 = all
    # file/URI listing train-split ids (one per line) left out of everything: training, the
    # loop's pool, ST++'s scoring (e.g. frames filmed seconds from the evaluation clip)
    exclude_ids: str = ""
    synthetic_unlabeled_images: int = 0  # synthetic only: extra unlabeled frames ...
    synthetic_unlabeled_domain: str = "target"  # ... in this domain (source or target)
    synthetic_val_domain: str = ""  # synthetic only: evaluate on this domain; empty = synthetic_domain
    # Other sources of training images (manifests: id, image_uri, label_uri in train ids, 255 = none).
    labeled_manifest: str = ""  # labeled set from this manifest instead of the train split (the loop's)
    unlabeled_pool: str = ""  # unlabeled images from any pool: manifest, folder or synthetic://
    pseudo_manifest: str = ""  # unlabeled images with offline pseudo labels (ST / ST++ students)
    # Domain adaptation on one dataset: train ids starting with a target prefix are the target.
    target_prefixes: tuple[str, ...] = ()  # e.g. ["0001TP"]: CamVid dusk; the rest is the source
    target_eval_count: int = 0  # target frames held out (fixed draw) and evaluated instead of val
    target_labeled_count: int = 0  # target frames that keep their labels (the rest: unlabeled)
    # Per batch: labeled source : labeled target : unlabeled (relative to train.batch_size).
    batch_ratio: tuple[float, ...] = (1.0, 0.0, 1.0)

    def validate(self) -> None:
        _at_least("data.cache_bytes", self.cache_bytes, 0)
        _one_of("data.stream_unlabeled", self.stream_unlabeled, STREAM_MODES)
        _positive("data.stream_decode_cpus", self.stream_decode_cpus)
        _one_of("data.dataset", self.dataset, ("synthetic", "camvid", "cityscapes", "manifest"))
        if self.dataset != "synthetic" and not self.root:
            _fail("data.root", self.root, f"is required for dataset '{self.dataset}'")
        if self.dataset == "manifest" and not self.classes:
            _fail("data.classes", list(self.classes), "must list the class names of a manifest")
        _hw("data.crop_size", self.crop_size)
        if self.base_size:
            _hw("data.base_size", self.base_size)
        _hw("data.synthetic_size", self.synthetic_size)
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            _fail("data.scale_range", self.scale_range, "must be [low, high] with 0 < low <= high")
        _at_least("data.loader_workers", self.loader_workers, 0)
        _at_least("data.synthetic_train_images", self.synthetic_train_images, 1)
        _at_least("data.synthetic_val_images", self.synthetic_val_images, 1)
        _one_of("data.synthetic_domain", self.synthetic_domain, ("source", "target"))
        _at_least("data.labeled_count", self.labeled_count, 0)
        if self.labeled_ids and self.labeled_count:
            _fail("data.labeled_count", self.labeled_count, "cannot be combined with data.labeled_ids")
        _at_least("data.synthetic_unlabeled_images", self.synthetic_unlabeled_images, 0)
        _one_of("data.synthetic_unlabeled_domain", self.synthetic_unlabeled_domain, ("source", "target"))
        if self.synthetic_val_domain:
            _one_of("data.synthetic_val_domain", self.synthetic_val_domain, ("source", "target"))
        _at_least("data.target_eval_count", self.target_eval_count, 0)
        _at_least("data.target_labeled_count", self.target_labeled_count, 0)
        if (self.target_eval_count or self.target_labeled_count) and not self.target_prefixes:
            _fail("data.target_prefixes", list(self.target_prefixes),
                  "must name the target sequences when target_eval_count or target_labeled_count is set")
        if self.target_prefixes and (self.labeled_ids or self.labeled_count):
            _fail("data.target_prefixes", list(self.target_prefixes),
                  "cannot be combined with data.labeled_ids / labeled_count")
        if self.target_prefixes and self.labeled_manifest and self.target_labeled_count:
            _fail("data.target_labeled_count", self.target_labeled_count,
                  "cannot be combined with data.labeled_manifest (it lists the labeled target frames)")
        if len(self.batch_ratio) != 3 or min(self.batch_ratio) < 0 or self.batch_ratio[0] + self.batch_ratio[1] <= 0:
            _fail("data.batch_ratio", list(self.batch_ratio),
                  "must be [labeled source, labeled target, unlabeled] >= 0 with some labeled share")
        if self.labeled_manifest and (self.labeled_ids or self.labeled_count):
            _fail("data.labeled_manifest", self.labeled_manifest,
                  "cannot be combined with data.labeled_ids / labeled_count")


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture and optional starting weights."""

    arch: str = "lraspp_mobilenet_v3_large"
    weights: str = ""  # local path or s3:// URI of a state dict; empty = from scratch

    def validate(self) -> None:
        from segrl.models import ARCHITECTURES

        _one_of("model.arch", self.arch, tuple(ARCHITECTURES))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation schedule, evaluation and checkpoint cadence."""

    epochs: int = 4
    steps: int = 0  # if > 0: train exactly this many optimiser steps instead of train.epochs
    batch_size: int = 8  # per Ray Train worker
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: str = "poly"  # poly | onecycle | constant
    poly_power: float = 0.9
    warmup_steps: int = 0
    amp: bool = True  # mixed precision, used only on GPU
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0  # 0 = only at the end of each epoch
    keep_checkpoints: int = 3
    snapshots: int = 0  # K model-only snapshots at evenly spaced steps (ST++ stability); 0 = none
    class_weighting: str = "none"  # none | inverse_sqrt_frequency
    # labeled_pixels: where the labeled set knows each image's labeled pixels (the loop's),
    # draw images in proportion to them, an epoch being the labels in whole images; images:
    # every image once per epoch whatever share of it is labeled.
    sampling: str = "labeled_pixels"
    log_every_steps: int = 20
    seed: int = 0
    # Continuing another run (the loop's al.retrain=continue): its checkpoint.pt gives the
    # model, optimiser, recipe state and schedule position; "" = start afresh.
    resume_from: str = ""
    # The [start, end) share of one learning-rate schedule this run covers, so that runs
    # continuing each other follow one schedule; [0, 1] = a whole schedule of its own.
    schedule_span: tuple[float, ...] = (0.0, 1.0)

    def validate(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.steps", self.steps, 0)
        _at_least("train.batch_size", self.batch_size, 1)
        _one_of("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _one_of("train.schedule", self.schedule, ("poly", "onecycle", "constant"))
        _positive("train.poly_power", self.poly_power)
        _at_least("train.warmup_steps", self.warmup_steps, 0)
        _at_least("train.eval_every_epochs", self.eval_every_epochs, 1)
        _at_least("train.checkpoint_every_steps", self.checkpoint_every_steps, 0)
        _at_least("train.keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("train.snapshots", self.snapshots, 0)
        _one_of("train.class_weighting", self.class_weighting, ("none", "inverse_sqrt_frequency"))
        _one_of("train.sampling", self.sampling, ("labeled_pixels", "images"))
        _at_least("train.log_every_steps", self.log_every_steps, 1)
        if len(self.schedule_span) != 2 or not 0 <= self.schedule_span[0] < self.schedule_span[1] <= 1:
            _fail("train.schedule_span", list(self.schedule_span), "must be [start, end] with 0 <= start < end <= 1")


METHODS = ("supervised", "mean_teacher", "pseudo_label", "proda", "distill", "st", "st_pp")


@dataclass(frozen=True)
class MethodConfig:
    """The training recipe and the weights of its loss terms (see segrl.methods.recipes).

    ``st`` and ``st_pp`` are multi-stage pipelines (segrl.engine.selftrain) whose student
    stages run the ``pseudo_label`` recipe; the others are one Ray Train run each.
    """

    name: str = "supervised"  # supervised | mean_teacher | pseudo_label | proda | distill | st | st_pp
    lambda_u: float = 1.0  # weight of the pseudo-label loss on unlabeled images
    ema_momentum: float = 0.99  # teacher momentum m, warmed up as min(1 - 1/(t+1), m)
    cold_start_epochs: int = 1  # supervised-only epochs before the unlabeled terms start
    confidence_weighting: bool = True  # S4AL: pixel weight = teacher max prob, image weight below
    image_weight_tau: float = 0.97  # image weight = share of pixels with confidence >= tau
    classmix: bool = False  # Balanced ClassMix on unlabeled images (S4AL)
    lambda_mix: float = 1.0
    classmix_temperature: float = 0.5  # tail bias: p_c ~ freq_c^-T (0 = plain ClassMix)
    replay_buffer: int = 0  # unlabeled images kept for mixing with later batches; 0 = none
    # STAL pixel contrastive term (any recipe; 0 = off) and its class-wise confidence bank.
    lambda_contrastive: float = 0.0
    contrastive_temperature: float = 0.5
    contrastive_threshold: float = 0.9  # anchors: labeled pixels, or pseudo labels this confident
    contrastive_anchors: int = 64  # anchors per class and step (scaled by tail sampling)
    contrastive_negatives: int = 128  # negatives per anchor, from the memory bank
    contrastive_memory: int = 512  # embeddings kept per class in the memory bank
    projection_dim: int = 128
    tail_sampling: bool = True  # anchors per class ~ softmax(1 - class confidence) (STAL)
    confidence_bank_alpha: float = 0.999
    # Output-space adversarial alignment (AdaptSegNet, as LabOR uses it; any recipe; 0 = off).
    lambda_adv: float = 0.0
    discriminator_lr: float = 1e-4
    # ProDA: prototype-rectified soft pseudo labels and target structure learning.
    proda_temperature: float = 1.0  # softmax(-distance / T) over prototypes
    prototype_momentum: float = 0.99
    lambda_structure: float = 0.1  # KL between weak and strong prototype assignments
    # distill (ProDA's last stage): a fresh student learns a trained teacher's soft labels.
    teacher_weights: str = ""  # weights of the teacher (local or s3://); distill only
    # ST / ST++ (Yang et al., CVPR 2022)
    labor_selector: bool = False  # train LabOR's two-head pixel selector beside any recipe
    checkpoints_k: int = 3  # ST++: teacher snapshots whose agreement is the stability score
    reliable_ratio: float = 0.5  # ST++: share R of most stable unlabeled images in stage 1

    def validate(self) -> None:
        _one_of("method.name", self.name, METHODS)
        _at_least("method.lambda_u", self.lambda_u, 0.0)
        if not 0 <= self.ema_momentum <= 1:
            _fail("method.ema_momentum", self.ema_momentum, "must be in [0, 1]")
        _at_least("method.cold_start_epochs", self.cold_start_epochs, 0)
        if not 0 < self.image_weight_tau <= 1:
            _fail("method.image_weight_tau", self.image_weight_tau, "must be in (0, 1]")
        _at_least("method.lambda_mix", self.lambda_mix, 0.0)
        _at_least("method.classmix_temperature", self.classmix_temperature, 0.0)
        _at_least("method.replay_buffer", self.replay_buffer, 0)
        _at_least("method.lambda_contrastive", self.lambda_contrastive, 0.0)
        _positive("method.contrastive_temperature", self.contrastive_temperature)
        if not 0 <= self.contrastive_threshold <= 1:
            _fail("method.contrastive_threshold", self.contrastive_threshold, "must be in [0, 1]")
        _at_least("method.contrastive_anchors", self.contrastive_anchors, 1)
        _at_least("method.contrastive_negatives", self.contrastive_negatives, 1)
        _at_least("method.contrastive_memory", self.contrastive_memory, 1)
        _at_least("method.projection_dim", self.projection_dim, 1)
        if not 0 <= self.confidence_bank_alpha < 1:
            _fail("method.confidence_bank_alpha", self.confidence_bank_alpha, "must be in [0, 1)")
        _at_least("method.lambda_adv", self.lambda_adv, 0.0)
        _positive("method.discriminator_lr", self.discriminator_lr)
        _positive("method.proda_temperature", self.proda_temperature)
        if not 0 <= self.prototype_momentum < 1:
            _fail("method.prototype_momentum", self.prototype_momentum, "must be in [0, 1)")
        _at_least("method.lambda_structure", self.lambda_structure, 0.0)
        if self.name == "distill" and not self.teacher_weights:
            _fail("method.teacher_weights", self.teacher_weights, "is required for method.name 'distill'")
        _at_least("method.checkpoints_k", self.checkpoints_k, 2 if self.name == "st_pp" else 1)
        if not 0 < self.reliable_ratio <= 1:
            _fail("method.reliable_ratio", self.reliable_ratio, "must be in (0, 1]")


RETRAIN_MODES = ("from_scratch", "continue")
# Points spread over the pool (PixelPick, Shin et al. 2021, arXiv 2104.06394): al.points_per_image
# clicks in each image the round's click budget reaches.
POINT_ACQUISITIONS = ("random_points", "margin_points", "entropy_points", "pixelpick_points")
ACQUISITIONS = ("random", "entropy", "stability", "region_entropy", "region_impurity", "labor_spl", "labor_ppl",
                *POINT_ACQUISITIONS)
# The whole-image acquisitions whose picks al.spread_candidates can spread.
SPREAD_ACQUISITIONS = ("entropy", "stability")
# The acquisitions that ask for clicks, so that al.budget_unit must be 'clicks' for them and only for them.
CLICK_ACQUISITIONS = ("labor_ppl", *POINT_ACQUISITIONS)


@dataclass(frozen=True)
class ALConfig:
    """The active-learning loop (``jobs/stal_loop.py``): rounds, budget, acquisition, labeling."""

    rounds: int = 2  # selection rounds; a final training round follows the last one
    initial_labeled: int = 8  # images fully labeled before round 0 (random with al.seed)
    initial_ids: str = ""  # or: a file/URI listing them, one id per line
    # or: round 0 asks this many random points (clicks) in every pool image, PixelPick's
    # first round, drawn on the grid training resizes to (data.base_size)
    initial_points_per_image: int = 0
    budget_per_round: float = 0.02
    budget_unit: str = "share"  # share (of the pool's pixels) | pixels | images | clicks (labor_ppl, *_points)
    acquisition: str = "entropy"  # random | entropy | stability | region_entropy | region_impurity
    #                               | labor_spl | labor_ppl | random_points | margin_points
    #                               | entropy_points | pixelpick_points
    region_size: tuple[int, ...] = (32, 32)  # candidate region [h, w] in scoring pixels
    regions_top_r: int = 16  # candidate regions kept per image
    points_per_image: int = 10  # labor_ppl, *_points: clicks per selected image
    # pixelpick_points: the points are drawn at random from this share of an image's most
    # uncertain (margin) unlabeled pixels, PixelPick's top_n_percent, so they do not cluster
    point_top_share: float = 0.05
    class_balance: bool = False  # image selection interleaved over rarest predicted classes
    # entropy / stability images: 0 takes the top-scored images (top-K); m >= 1 spreads the
    # picks over the best-scored images worth m x the round's budget, each the farthest in the
    # model's feature space from the images labeled and picked before (k-center greedy), so that
    # a round does not go to a run of neighbouring video frames. Scoring then writes D floats a frame.
    spread_candidates: float = 0.0
    labeling: str = "oracle"  # oracle (ground truth of the pool) | external (manifest + import)
    # from_scratch: each round trains from model.weights with a whole schedule (the usual AL
    # benchmark protocol: a round's model and scores do not depend on earlier rounds' training);
    # continue: each round resumes the last round's model, optimiser and recipe state, and the
    # rounds share one learning-rate schedule (STAL's incremental retraining).
    retrain: str = "from_scratch"  # from_scratch | continue
    # Round r trains train.steps x (its labeled pixels / round 0's), so later labels get as
    # many steps as the first ones (a fixed count shares them among ever more labels).
    scale_steps: bool = True
    seed: int = 0

    def validate(self) -> None:
        _at_least("al.rounds", self.rounds, 0)
        _at_least("al.initial_labeled", self.initial_labeled, 0)
        _at_least("al.initial_points_per_image", self.initial_points_per_image, 0)
        starts = [name for name, value in (("al.initial_labeled", self.initial_labeled),
                                           ("al.initial_ids", self.initial_ids),
                                           ("al.initial_points_per_image", self.initial_points_per_image)) if value]
        if len(starts) > 1:
            _fail(starts[1], getattr(self, starts[1].split(".")[1]), f"cannot be combined with {starts[0]} "
                  "(round 0 labels either whole images or random points): set the other to 0 or ''")
        if not starts:
            _fail("al.initial_labeled", self.initial_labeled, "must be >= 1 (or set al.initial_ids or "
                  "al.initial_points_per_image): round 0 needs some labels to train on")
        _positive("al.budget_per_round", self.budget_per_round)
        _one_of("al.budget_unit", self.budget_unit, ("share", "pixels", "images", "clicks"))
        if self.budget_unit == "share" and self.budget_per_round > 1:
            _fail("al.budget_per_round", self.budget_per_round, "is a share of the pool's pixels: must be <= 1")
        _one_of("al.acquisition", self.acquisition, ACQUISITIONS)
        if (self.budget_unit == "clicks") != (self.acquisition in CLICK_ACQUISITIONS):
            _fail("al.budget_unit", self.budget_unit, f"must be 'clicks' exactly when al.acquisition "
                  f"(= {self.acquisition!r}) is one of {', '.join(CLICK_ACQUISITIONS)}")
        _hw("al.region_size", self.region_size)
        _at_least("al.regions_top_r", self.regions_top_r, 1)
        _at_least("al.points_per_image", self.points_per_image, 1)
        if not 0 < self.point_top_share <= 1:
            _fail("al.point_top_share", self.point_top_share, "must be in (0, 1]")
        _one_of("al.labeling", self.labeling, ("oracle", "external"))
        _one_of("al.retrain", self.retrain, RETRAIN_MODES)
        if self.spread_candidates:
            if self.spread_candidates < 1:
                _fail("al.spread_candidates", self.spread_candidates, "must be 0 (top-K) or >= 1 (candidates "
                      "worth that many times the round's budget)")
            if self.acquisition not in SPREAD_ACQUISITIONS:
                _fail("al.spread_candidates", self.spread_candidates, f"spreads whole-image picks: al.acquisition "
                      f"(= {self.acquisition!r}) must be one of {', '.join(SPREAD_ACQUISITIONS)}")
            if self.class_balance:
                _fail("al.spread_candidates", self.spread_candidates, "cannot be combined with "
                      "al.class_balance=true (two orders for the same picks): set one of them")


@dataclass(frozen=True)
class AnnotationConfig:
    """What ``al.labeling=external`` writes for annotation tools each round, and image URLs.

    The manifest and PNG masks are always written; ``tools`` adds import files for Label
    Studio (tasks.json + config.xml) and CVAT (annotations.xml + images.txt) under ``rounds/<NN>/labeling/<tool>/``.
    """

    tools: tuple[str, ...] = ()  # label_studio | cvat
    image_urls: str = "local"  # Label Studio image URLs: local | prefix | presign (s3:// images)
    url_root: str = ""  # local: Label Studio's LOCAL_FILES_DOCUMENT_ROOT; prefix: the part of each
    #                     image URI that url_prefix replaces
    url_prefix: str = ""  # prefix: e.g. https://images.example.org/pool
    presign_seconds: int = 7 * 24 * 3600  # presign: how long a URL stays valid

    def validate(self) -> None:
        for i, tool in enumerate(self.tools):
            _one_of(f"annotation.tools[{i}]", tool, ANNOTATION_TOOLS)
        _one_of("annotation.image_urls", self.image_urls, ("local", "prefix", "presign"))
        if "label_studio" in self.tools and self.image_urls == "local" and not self.url_root:
            _fail("annotation.url_root", self.url_root, "must be Label Studio's local files document "
                  "root (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) for annotation.image_urls=local")
        if self.image_urls == "prefix" and not self.url_prefix:
            _fail("annotation.url_prefix", self.url_prefix, "must be set for annotation.image_urls=prefix")
        _at_least("annotation.presign_seconds", self.presign_seconds, 1)


ANNOTATION_TOOLS = ("label_studio", "cvat")


@dataclass(frozen=True)
class ReportConfig:
    """The loop's review page, ``review.html`` (and ``review.json``) beside ``report.md``."""

    frames_per_round: int = 12  # thumbnails per round, best first (a round may ask for thousands)
    thumbnail_width: int = 160  # pixels; thumbnails are JPEG/PNG files under rounds/<NN>/review/
    compare_runs: tuple[str, ...] = ()  # other loop runs (folders or s3:// URIs) on the mIoU curve
    full_supervision_run: str = ""  # a jobs/train.py run whose val mIoU is the full-supervision line

    def validate(self) -> None:
        _at_least("report.frames_per_round", self.frames_per_round, 0)
        if not 32 <= self.thumbnail_width <= 1024:
            _fail("report.thumbnail_width", self.thumbnail_width, "must be in [32, 1024]")


@dataclass(frozen=True)
class StoreConfig:
    """Where runs are written: a local folder or s3://bucket/prefix on any S3 endpoint.

    Credentials never live here: they come from the standard AWS environment/chain.
    """

    root: str = "runs"
    endpoint_url: str = ""  # e.g. http://127.0.0.1:8333; empty = AWS_ENDPOINT_URL or AWS
    region: str = ""
    # An unreachable S3 endpoint (a restart, an outage) is tried again with backoff this long.
    retry_seconds: float = 180.0

    def validate(self) -> None:
        _at_least("store.retry_seconds", self.retry_seconds, 0.0)
        if not self.root:
            _fail("store.root", self.root, "must be a folder or an s3:// URI")
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            _fail("store.endpoint_url", self.endpoint_url, "must start with http:// or https://")


@dataclass(frozen=True)
class ComputeConfig:
    """How many Ray Train workers, on what, and how failures are absorbed."""

    ray_address: str = ""  # empty = connect to RAY_ADDRESS or start a local cluster
    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch intra-op threads at most; 0 = the CPUs Ray grants, rounded up
    # fewer threads while other processes keep the machine's cores busy (segrl/threads.py);
    # false pins them at the most
    adapt_threads: bool = True
    max_failures: int = 2  # worker losses survived by restoring the last checkpoint

    def validate(self) -> None:
        _at_least("compute.num_workers", self.num_workers, 1)
        _one_of("compute.use_gpu", self.use_gpu, ("auto", "true", "false"))
        _positive("compute.cpus_per_worker", self.cpus_per_worker)
        _at_least("compute.threads_per_worker", self.threads_per_worker, 0)
        _at_least("compute.max_failures", self.max_failures, -1)


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the run name plus every concern's section."""

    name: str = "synthetic_supervised"
    run: str = ""  # run folder in the store; empty = name. Rerunning a run resumes it.
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    al: ALConfig = field(default_factory=ALConfig)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    @property
    def run_name(self) -> str:
        return self.run or self.name

    def validate(self) -> None:
        for key, value in (("name", self.name), ("run", self.run)):
            if value and not all(c.isalnum() or c in "-_." for c in value):
                _fail(key, value, "may hold only letters, digits, '-', '_' and '.'")
        if not self.name:
            _fail("name", self.name, "must not be empty")
        sections = (self.data, self.model, self.train, self.method, self.store, self.compute, self.al,
                    self.annotation, self.report)
        for section in sections:
            section.validate()


@dataclass(frozen=True)
class ScoreConfig:
    """One pass of pool scoring (``jobs/score_pool.py``): which frames, which models, where to.

    The dense probability maps never leave the model actors; only per-image rows
    (and the top regions per image) are written.
    """

    name: str = "score"
    pool: str = ""  # manifest (.parquet/.csv), folder of images, or synthetic://<domain>?n=..
    checkpoints: str = ""  # folder of ckpt_* folders (K checkpoints, last = final) or one of them
    out: str = ""  # output folder, local or s3://bucket/prefix
    image_size: tuple[int, ...] = ()  # frames resized to [H, W]; empty = the checkpoint's own
    signals: tuple[str, ...] = ("entropy", "least_confidence", "margin", "confidence", "stability")
    top_q: float = 0.1  # share of most uncertain pixels in the top-q image reduction
    confidence_tau: float = 0.9  # a pixel is confident at max probability >= tau
    region_size: tuple[int, ...] = (32, 32)  # grid cell [h, w] of region scores
    region_score: str = "entropy"  # entropy | impurity_uncertainty
    regions_top_r: int = 0  # candidate regions kept per image in regions.parquet; 0 = none
    pseudo_labels: str = ""  # "", "all", or a file/URI listing one id per line
    batch_size: int = 0  # frames per model call; 0 = 16 on CPU, 64 on GPU
    actors: int = 0  # model actors; 0 = as many as the cluster fits
    cpus_per_actor: float = 0.0  # 0 = derived from the cluster (fractional on small machines)
    decode_memory_mb: int = 0  # memory a decode task reserves from Ray; 0 = the largest decodable frame + its batch
    shard_size: int = 2048  # frames committed together; a rerun skips committed shards
    store: StoreConfig = field(default_factory=StoreConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)

    def validate(self) -> None:
        from segrl.acquisition import PIXEL_SCORES

        for key in ("pool", "checkpoints", "out"):
            if not getattr(self, key):
                _fail(key, getattr(self, key), "is required (a local path or s3:// URI)")
        if self.image_size:
            _hw("image_size", self.image_size)
        known = (*PIXEL_SCORES, "confidence", "stability", "class_hist", "embedding")
        for i, signal in enumerate(self.signals):
            _one_of(f"signals[{i}]", signal, known)
        if not 0 < self.top_q <= 1:
            _fail("top_q", self.top_q, "must be in (0, 1]")
        if not 0 < self.confidence_tau <= 1:
            _fail("confidence_tau", self.confidence_tau, "must be in (0, 1]")
        _hw("region_size", self.region_size)
        _one_of("region_score", self.region_score, ("entropy", "impurity_uncertainty"))
        _at_least("regions_top_r", self.regions_top_r, 0)
        _at_least("batch_size", self.batch_size, 0)
        _at_least("actors", self.actors, 0)
        _at_least("cpus_per_actor", self.cpus_per_actor, 0.0)
        _at_least("decode_memory_mb", self.decode_memory_mb, 0)
        _at_least("shard_size", self.shard_size, 1)
        self.store.validate()
        self.compute.validate()


# --------------------------------------------------------------------------- checks


def _fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"config field '{key}' = {value!r} {why}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, value, f"is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        _fail(key, value, f"must be >= {low}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        _fail(key, value, "must be > 0")


def _hw(key: str, value: tuple) -> None:
    if len(value) != 2 or min(value) < 1:
        _fail(key, list(value), "must be [height, width] with both >= 1")


# --------------------------------------------------------------------------- building


def from_dict(cls: type[T], raw: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking every key and type."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{_join(prefix, unknown[0])}' in {where}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    values = {name: _coerce(hints[name], raw[name], _join(prefix, name)) for name in raw}
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Check ``value`` against ``hint`` (allowing int->float and list->tuple)."""
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                continue
        _fail(key, value, f"has the wrong type (expected {hint})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(key, value, "must be a list")
        item = typing.get_args(hint)[0]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is type(None):
        if value is not None:
            _fail(key, value, "must be null")
        return None
    if hint is float:
        return _float_value(key, value)
    if hint in (int, float) and isinstance(value, bool):
        _fail(key, value, f"must be a number ({hint.__name__}), not a boolean")
    if hint is str and isinstance(value, bool):
        # YAML reads the words true/false of a string field (compute.use_gpu=true) as booleans
        return "true" if value else "false"
    if not isinstance(value, hint):
        _fail(key, value, f"must be of type {hint.__name__}, got {type(value).__name__}")
    return value


def _float_value(key: str, value: Any) -> float:
    """A float field's value: a finite int or float, or a number written as text (``1e-3``).

    NaN and infinity pass every ``<`` range check (``nan < 0`` is false), so they are refused
    here, once for every float field, rather than in each section's checks.
    """
    if isinstance(value, bool):
        _fail(key, value, "must be a number (float), not a boolean")
    if isinstance(value, str):
        value = _number_text(value)
    if not isinstance(value, (int, float)):
        _fail(key, value, f"must be of type float, got {type(value).__name__}")
    if not math.isfinite(value):
        _fail(key, value, "must be a finite number (not NaN or infinity)")
    return float(value)


def _number_text(text: str) -> float | str:
    """``text`` as a float where it writes a number (``1e-3``) or a non-finite one (``inf``,
    ``.nan``, so that the error says what is wrong with it), else ``text`` unchanged."""
    stripped = text.strip()
    if NUMBER_TEXT.fullmatch(stripped):
        return float(stripped)
    if stripped.lower().lstrip("+-.") in ("inf", "infinity", "nan"):
        return math.nan if "nan" in stripped.lower() else (-math.inf if stripped.startswith("-") else math.inf)
    return text


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists), safe for YAML and Ray."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); the value is parsed as YAML."""
    key, sep, raw_value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of nested dict ``raw`` with dotted overrides applied."""
    merged = _deep_copy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return merged


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    cls: type[T] = ExperimentConfig,  # type: ignore[assignment]
) -> T:
    """Load a config (an experiment by default) from a YAML file (or defaults) plus overrides.

    Raises ``ConfigError`` naming the file, the field and the bad value.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(cls, raw)
        cfg.validate()
    except ConfigError as exc:
        if path is not None:
            raise ConfigError(f"{path}: {exc}") from None
        raise
    return cfg


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Rebuild and validate an experiment config from ``to_dict`` output (Ray workers, stores)."""
    cfg = from_dict(ExperimentConfig, raw)
    cfg.validate()
    return cfg


def absolute_local_path(path: str) -> str:
    """``path`` made absolute against the current folder; URIs (``s3://``) and "" unchanged."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def absolute_local_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with local relative paths made absolute against the current folder.

    Ray workers do not run in the driver's folder, so ``data.root=../data`` must be
    resolved where the user typed it. URIs (``s3://``) are left as they are.
    """
    absolute = absolute_local_path
    return replace(
        cfg,
        **{
            "data.root": absolute(cfg.data.root),
            "data.labeled_ids": absolute(cfg.data.labeled_ids),
            "data.exclude_ids": absolute(cfg.data.exclude_ids),
            "data.labeled_manifest": absolute(cfg.data.labeled_manifest),
            "data.unlabeled_pool": absolute(cfg.data.unlabeled_pool),
            "data.pseudo_manifest": absolute(cfg.data.pseudo_manifest),
            "model.weights": absolute(cfg.model.weights),
            "train.resume_from": absolute(cfg.train.resume_from),
            "method.teacher_weights": absolute(cfg.method.teacher_weights),
            "store.root": absolute(cfg.store.root),
            "report.compare_runs": tuple(absolute(run) for run in cfg.report.compare_runs),
            "report.full_supervision_run": absolute(cfg.report.full_supervision_run),
        },
    )


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` that accepts dotted keys: replace(cfg, **{"train.lr": 0.1})."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(cfg, head), **sub)
    return dataclasses.replace(cfg, **flat)
