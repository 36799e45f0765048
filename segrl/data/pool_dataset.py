"""A pool of frames as an unlabeled training set, and a training set's frames as a pool.

Kept apart from :mod:`segrl.data.pool` so that the pool's readers stay free of torch: Ray
Data's decode tasks import them, and each task process would otherwise spend seconds of
CPU importing torch and torchvision it never uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset

from segrl.data.build import SplitView
from segrl.data.datasets import FilePairDataset, ManifestDataset
from segrl.data.labels import IGNORE_INDEX, DataError
from segrl.data.pool import iter_pool_batches, load_pool_image, synthetic_frame_uri
from segrl.data.synthetic import SyntheticScenes
from segrl.data.transforms import eval_transform, to_raw_sample


class PoolDataset(Dataset):
    """The frames of a pool as an unlabeled training set (masks all ``ignore_index``).

    Ids and URIs are held as Arrow string arrays, so a pool of millions of frames costs
    tens of MB per worker; images are decoded on access.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        uri: str,
        classes: tuple[str, ...],
        transform: Callable[[dict], dict] | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        batches = list(iter_pool_batches(uri, 65536, endpoint_url))
        if not batches:
            raise DataError(f"pool {uri} holds no images")
        self._ids = pa.concat_arrays([b.column(0) for b in batches])
        self._uris = pa.concat_arrays([b.column(1) for b in batches])
        self.uri, self.classes, self.endpoint_url = uri, tuple(classes), endpoint_url
        self.transform = transform if transform is not None else eval_transform()

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, i: int) -> str:
        return self._ids[i].as_py()

    def image_uri(self, i: int) -> str:
        return self._uris[i].as_py()

    def raw(self, i: int) -> dict:
        """Frame i decoded (mask all ignore), before the transform."""
        image = load_pool_image(self.image_uri(i), self.endpoint_url)
        mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        return to_raw_sample(image, mask, self.sample_id(i))

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.raw(i))


def dataset_frames(dataset: Dataset) -> list[tuple[str, str]]:
    """(id, image URI) of every frame of a segrl dataset, without decoding any image.

    This is how a training split becomes a pool (ST++ scores its unlabeled images).
    """
    if isinstance(dataset, SplitView):
        frames = dataset_frames(dataset.base)
        return [frames[i] for i in dataset.indices]
    if isinstance(dataset, FilePairDataset):
        return [(item[0], item[1]) for item in dataset.items]
    if isinstance(dataset, (ManifestDataset, PoolDataset)):
        return [(dataset.sample_id(i), dataset.image_uri(i)) for i in range(len(dataset))]
    if isinstance(dataset, SyntheticScenes):
        return [
            (dataset.sample_id(i), synthetic_frame_uri(dataset.domain, dataset.seed, i, dataset.size, dataset.split))
            for i in range(len(dataset))
        ]
    raise TypeError(f"cannot list the frames of a {type(dataset).__name__}")


def unlabeled_ids(dataset: Dataset) -> list[str]:
    """Ids of the frames a segrl dataset holds no ground-truth label for: manifest rows
    without a ``label_uri`` (or without the column). Other datasets pair every frame."""
    if isinstance(dataset, SplitView):
        missing = set(unlabeled_ids(dataset.base))
        frames = dataset_frames(dataset)
        return [f[0] for f in frames if f[0] in missing]
    if isinstance(dataset, ManifestDataset):
        return [dataset.sample_id(i) for i in range(len(dataset)) if not dataset.is_labeled(i)]
    return []
