"""Build the dataset a config names, with the transforms its split needs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch.utils.data import Dataset

from segrl.config import DataConfig
from segrl.data.manifest import IMAGE_PIXELS_COLUMN, LABELED_PIXELS_COLUMN, open_manifest


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

    dataset = _split_dataset(cfg, split, transform, endpoint_url)
    if cfg.exclude_ids and split == cfg.train_split:
        return without_listed_ids(dataset, cfg.exclude_ids, endpoint_url)
    return dataset


def _split_dataset(cfg: DataConfig, split: str, transform, endpoint_url: str) -> Dataset:
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


def read_id_list(uri: str, endpoint_url: str = "") -> list[str]:
    """The ids a file lists, one per line (blank lines skipped, order kept, repeats once)."""
    from segrl.data.manifest import read_bytes

    lines = read_bytes(uri, endpoint_url or None).decode().splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def without_listed_ids(dataset: Dataset, uri: str, endpoint_url: str = "") -> Dataset:
    """``dataset`` without the ids ``uri`` lists (``data.exclude_ids``); every listed id must
    be in it, so that a typo or a file meant for other data is refused, not silently ignored."""
    from segrl.data.labels import DataError

    excluded = set(read_id_list(uri, endpoint_url))
    ids = dataset_ids(dataset)
    unknown = sorted(excluded - set(ids))
    if unknown:
        raise DataError(f"data.exclude_ids file {uri} lists id {unknown[0]!r} that is not in the split "
                        f"({len(unknown)} unknown in all)")
    kept = [i for i, sample_id in enumerate(ids) if sample_id not in excluded]
    if not kept:
        raise DataError(f"data.exclude_ids file {uri} lists every one of the split's {len(ids)} ids")
    return SplitView(dataset, kept)


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


class SplitView(Dataset):
    """Some indices of a dataset, keeping its ``classes`` and ``ignore_index``."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.classes = base.classes
        self.ignore_index = base.ignore_index

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def ids(self) -> list[str]:
        base_ids = dataset_ids(self.base)
        return [base_ids[i] for i in self.indices]

    @property
    def transform(self):
        return self.base.transform

    def raw(self, i: int) -> dict:
        return self.base.raw(self.indices[i])

    def __getitem__(self, i: int) -> dict:
        return self.base[self.indices[i]]


def dataset_ids(dataset: Dataset) -> list[str]:
    """The sample id of every item, without decoding any image."""
    if hasattr(dataset, "ids"):
        return list(dataset.ids)
    return [dataset.sample_id(i) for i in range(len(dataset))]


def split_labeled(
    cfg: DataConfig, train_set: Dataset, seed: int, endpoint_url: str = ""
) -> tuple[Dataset, Dataset | None, list[str]]:
    """(labeled, unlabeled or None, labeled ids) of the train split per ``data.labeled_*``.

    ``labeled_ids`` names a file of ids (every one must exist in the split);
    ``labeled_count`` draws that many with ``seed``. Synthetic data may instead add
    ``synthetic_unlabeled_images`` frames of another domain as the unlabeled set.
    """
    from segrl.data.labels import DataError

    if cfg.dataset == "synthetic" and cfg.synthetic_unlabeled_images:
        from segrl.data.synthetic import SyntheticScenes

        unlabeled = SyntheticScenes(
            cfg.synthetic_unlabeled_images, size=tuple(cfg.synthetic_size),
            domain=cfg.synthetic_unlabeled_domain, seed=cfg.synthetic_seed, split="unlabeled",
            transform=train_set.transform,
        )
        return train_set, unlabeled, dataset_ids(train_set)
    if not (cfg.labeled_ids or cfg.labeled_count):
        return train_set, None, dataset_ids(train_set)
    ids = dataset_ids(train_set)
    if cfg.labeled_ids:
        wanted = read_id_list(cfg.labeled_ids, endpoint_url)
        position = {sample_id: i for i, sample_id in enumerate(ids)}
        missing = [w for w in wanted if w not in position]
        if missing:
            raise DataError(f"data.labeled_ids file {cfg.labeled_ids} lists id {missing[0]!r} "
                            f"that is not in split '{cfg.train_split}' ({len(missing)} unknown in all)")
        chosen = sorted(position[w] for w in wanted)
    else:
        if cfg.labeled_count > len(ids):
            raise DataError(f"data.labeled_count = {cfg.labeled_count} exceeds the {len(ids)} images "
                            f"of split '{cfg.train_split}'")
        import numpy as np

        chosen = sorted(np.random.default_rng(seed).permutation(len(ids))[: cfg.labeled_count].tolist())
    rest = sorted(set(range(len(ids))) - set(chosen))
    unlabeled = SplitView(train_set, rest) if rest else None
    return SplitView(train_set, chosen), unlabeled, [ids[i] for i in chosen]


@dataclass
class TrainingSets:
    """Every dataset one training run draws from (see ``build_training_sets``)."""

    labeled: Dataset  # labeled source images (or the only labeled set)
    val: Dataset
    unlabeled: Dataset | None = None  # images only; masks all ignore
    target_labeled: Dataset | None = None  # few labeled target frames (domain adaptation)
    pseudo: Dataset | None = None  # unlabeled images with offline pseudo labels (ST / ST++)
    labeled_ids: list[str] | None = None  # a drawn or listed split, recorded in the run
    target_eval_ids: list[str] | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.labeled.classes)


def build_training_sets(cfg: DataConfig, seed: int, endpoint_url: str = "") -> TrainingSets:
    """The labeled, unlabeled, pseudo-labeled and evaluation sets ``cfg`` describes.

    * default: the train split, or part of it (``labeled_ids`` / ``labeled_count``, the
      rest unlabeled); ``labeled_manifest`` replaces it (the loop's sparse labels);
    * ``target_prefixes``: train frames whose id starts with a prefix are the target
      domain; ``target_eval_count`` of them (a fixed draw, the same for every seed) are
      evaluated instead of the val split, ``target_labeled_count`` keep their labels
      (or ``labeled_manifest`` lists the labeled target frames: the loop's) and the
      rest are the unlabeled target; the other frames are the labeled source;
    * ``unlabeled_pool`` (any pool) and ``pseudo_manifest`` add unlabeled images.
    """
    from segrl.data.labels import DataError

    train = build_dataset(cfg, cfg.train_split, train=True, endpoint_url=endpoint_url)
    val_cfg = cfg
    if cfg.dataset == "synthetic" and cfg.synthetic_val_domain:
        val_cfg = dataclasses.replace(cfg, synthetic_domain=cfg.synthetic_val_domain)
    sets = TrainingSets(labeled=train, val=None)  # type: ignore[arg-type]
    if cfg.target_prefixes:
        _split_domains(cfg, train, seed, endpoint_url, sets)
    elif cfg.labeled_manifest:
        from segrl.data.datasets import ManifestDataset

        sets.labeled = ManifestDataset(cfg.labeled_manifest, transform=train.transform,
                                       endpoint_url=endpoint_url or None, classes=tuple(train.classes),
                                       metadata_columns=_label_count_columns(cfg.labeled_manifest, endpoint_url))
    else:
        labeled, unlabeled, ids = split_labeled(cfg, train, seed, endpoint_url)
        sets.labeled, sets.unlabeled = labeled, unlabeled
        sets.labeled_ids = ids if unlabeled is not None else None
    if sets.val is None:
        sets.val = build_dataset(val_cfg, cfg.val_split, train=False, endpoint_url=endpoint_url)
    if cfg.unlabeled_pool:
        from segrl.data.pool_dataset import PoolDataset  # it imports this module

        sets.unlabeled = PoolDataset(cfg.unlabeled_pool, tuple(train.classes), train.transform, endpoint_url or None)
    if cfg.pseudo_manifest:
        from segrl.data.datasets import ManifestDataset

        sets.pseudo = ManifestDataset(cfg.pseudo_manifest, transform=train.transform,
                                      endpoint_url=endpoint_url or None, classes=tuple(train.classes))
    if len(sets.labeled) == 0:
        raise DataError(f"no labeled training images in {cfg.dataset} at {cfg.root!r}")
    return sets


def _label_count_columns(uri: str, endpoint_url: str) -> tuple[str, ...]:
    """The labeled/all pixel count columns of a sparse-label manifest, when it has both."""
    columns = (LABELED_PIXELS_COLUMN, IMAGE_PIXELS_COLUMN)
    names = set(open_manifest(uri, endpoint_url or None).schema.names)
    return columns if names.issuperset(columns) else ()


def _split_domains(cfg: DataConfig, train: Dataset, seed: int, endpoint_url: str, sets: TrainingSets) -> None:
    import numpy as np

    from segrl.data.labels import DataError

    ids = dataset_ids(train)
    prefixes = tuple(cfg.target_prefixes)
    target = [i for i, sample_id in enumerate(ids) if sample_id.startswith(prefixes)]
    source = [i for i, sample_id in enumerate(ids) if not sample_id.startswith(prefixes)]
    if not target:
        raise DataError(f"data.target_prefixes {list(prefixes)} match no id of split '{cfg.train_split}'")
    if not source:
        raise DataError(f"data.target_prefixes {list(prefixes)} match every id: no source frames left")
    if cfg.target_eval_count + cfg.target_labeled_count > len(target):
        raise DataError(
            f"data.target_eval_count + data.target_labeled_count = "
            f"{cfg.target_eval_count + cfg.target_labeled_count} exceeds the {len(target)} target frames"
        )
    # The held-out target frames must not move with train.seed: every method is compared on them.
    order = [target[j] for j in np.random.default_rng(0).permutation(len(target))]
    held_out = sorted(order[: cfg.target_eval_count])
    rest = order[cfg.target_eval_count :]
    rest = [rest[j] for j in np.random.default_rng(seed).permutation(len(rest))]
    labeled_target = sorted(rest[: cfg.target_labeled_count])
    unlabeled_target = sorted(rest[cfg.target_labeled_count :])
    sets.labeled = SplitView(train, source)
    sets.target_labeled = SplitView(train, labeled_target) if labeled_target else None
    sets.unlabeled = SplitView(train, unlabeled_target) if unlabeled_target else None
    sets.labeled_ids = [ids[i] for i in source + labeled_target]
    if cfg.labeled_manifest:  # the loop: labeled target frames are the ones labeled so far
        from segrl.data.datasets import ManifestDataset

        sets.target_labeled = ManifestDataset(cfg.labeled_manifest, transform=train.transform,
                                              endpoint_url=endpoint_url or None, classes=tuple(train.classes))
    if held_out:
        evaluation = build_dataset(cfg, cfg.train_split, train=False, endpoint_url=endpoint_url)
        sets.val = SplitView(evaluation, held_out)
        sets.target_eval_ids = [ids[i] for i in held_out]
