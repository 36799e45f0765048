"""Data: synthetic scenes, file datasets, manifests and joint transforms.

Every dataset yields ``{"image": float32 3xHxW (ImageNet-normalized), "mask": int64 HxW
(ignore 255), "id": str}`` and exposes ``classes`` and ``ignore_index``.
"""

from segrl.data.datasets import CamVid, Cityscapes, FilePairDataset, ManifestDataset, load_pair
from segrl.data.labels import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABEL_TO_TRAIN,
    IGNORE_INDEX,
    DataError,
)
from segrl.data.manifest import iter_manifest_batches, read_bytes, resolve_uri, write_manifest
from segrl.data.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticScenes,
    render_scene,
    write_synthetic_dataset,
)
from segrl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    normalize,
    resize,
    strong_transform,
    to_raw_sample,
    train_transform,
    weak_transform,
)

__all__ = [
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_CLASSES",
    "CamVid",
    "Cityscapes",
    "DataError",
    "FilePairDataset",
    "ManifestDataset",
    "SyntheticScenes",
    "denormalize",
    "eval_transform",
    "iter_manifest_batches",
    "load_pair",
    "normalize",
    "read_bytes",
    "render_scene",
    "resize",
    "resolve_uri",
    "strong_transform",
    "to_raw_sample",
    "train_transform",
    "weak_transform",
    "write_manifest",
    "write_synthetic_dataset",
]
