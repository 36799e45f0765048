"""Build the dataset a config names, with the transforms its split needs."""

from __future__ import annotations

from torch.utils.data import Dataset

from segrl.config import DataConfig


def build_dataset(cfg: DataConfig, split: str, train: bool, endpoint_url: str = "") -> Dataset:
    """The ``split`` of the dataset in ``cfg``; ``train`` picks the weak augmentation.

    Every returned dataset has ``classes`` and ``ignore_index`` and yields
    ``{"image": 3xHxW float, "mask": HxW int64, "id": str}``.
    """
    from segrl.data.transforms import eval_transform, train_transform

    base = tuple(cfg.base_size) or None
    if train:
        transform = train_transform(
            crop_size=tuple(cfg.crop_size),
            base_size=base,
            scale_range=tuple(cfg.scale_range),
            hflip=cfg.hflip,
        )
    else:
        transform = eval_transform(base_size=base)

    if cfg.dataset == "synthetic":
        from segrl.data.synthetic import SyntheticScenes

        count = cfg.synthetic_train_images if split == cfg.train_split else cfg.synthetic_val_images
        return SyntheticScenes(
            count,
            size=tuple(cfg.synthetic_size),
            domain=cfg.synthetic_domain,
            seed=cfg.synthetic_seed,
            split=split,
            transform=transform,
        )
    if cfg.dataset == "camvid":
        from segrl.data.datasets import CamVid

        return CamVid(cfg.root, split, transform=transform)
    if cfg.dataset == "cityscapes":
        from segrl.data.datasets import Cityscapes

        return Cityscapes(cfg.root, split, transform=transform)
    from segrl.data.datasets import ManifestDataset

    uri = _split_manifest(cfg.root, split, endpoint_url)
    return ManifestDataset(
        uri, transform=transform, endpoint_url=endpoint_url or None, classes=tuple(cfg.classes)
    )


def _split_manifest(root: str, split: str, endpoint_url: str = "") -> str:
    """A manifest dataset's root is a folder holding ``<split>.parquet`` or ``<split>.csv``."""
    from pyarrow import fs as pafs

    from segrl.data.labels import DataError
    from segrl.storage import filesystem_for

    candidates = [f"{root.rstrip('/')}/{split}.{ext}" for ext in ("parquet", "csv")]
    for uri in candidates:
        filesystem, path = filesystem_for(uri, endpoint_url or None)
        if filesystem.get_file_info(path).type == pafs.FileType.File:
            return uri
    raise DataError(f"manifest for split '{split}' not found: looked for {' and '.join(candidates)}")
