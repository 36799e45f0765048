"""Segmentation datasets on files: CamVid (SegNet layout), Cityscapes and manifests.

All yield final samples ``{"image": float32 3xHxW normalized, "mask": int64 HxW,
"id": str}`` (after ``transform``, which receives the raw tv_tensors sample; with
``transform=None`` the frame is only converted and normalized), and expose ``classes``
and ``ignore_index``. Frames are decoded with PIL in ``__getitem__``; every label is
validated as it is loaded, and bad files raise :class:`~segrl.data.labels.DataError`
naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset

from segrl.data.labels import (
    CAMVID_CLASSES,
    CAMVID_LUT,
    CITYSCAPES_CLASSES,
    CITYSCAPES_LUT,
    IGNORE_INDEX,
    DataError,
    apply_lut,
    check_same_size,
    decode_image,
    decode_label,
    identity_lut,
)
from segrl.data.manifest import (
    ID_COLUMN,
    IMAGE_COLUMN,
    LABEL_COLUMN,
    base_of,
    manifest_classes,
    open_manifest,
    read_bytes,
    require_columns,
    resolve_uri,
)

Transform = Callable[[dict], dict]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_pair(
    image_uri: str, label_uri: str | None, lut: np.ndarray, endpoint_url: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode an image (HxWx3 uint8) and its label mapped through ``lut`` (HxW uint8).

    Without a label the mask is all ignore. Raises ``DataError`` for unreadable files,
    size mismatches and label values the LUT does not define.
    """
    if image_uri.startswith("synthetic://"):
        from segrl.data.pool import load_pool_image

        image = load_pool_image(image_uri)
    else:
        image = decode_image(read_bytes(image_uri, endpoint_url), image_uri)
    if label_uri is None:
        return image, np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
    raw = decode_label(read_bytes(label_uri, endpoint_url), label_uri)
    check_same_size(image, raw, image_uri, label_uri)
    return image, apply_lut(raw, lut, label_uri)


def _default_transform(transform: Transform | None) -> Transform:
    from segrl.data.transforms import eval_transform

    return transform if transform is not None else eval_transform()


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"dataset folder {path} does not exist (expected {what})")


class FilePairDataset(Dataset):
    """Frames given as a list of (id, image path, label path or None)."""

    classes: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        items: Sequence[tuple[str, str, str | None]],
        lut: np.ndarray,
        transform: Transform | None = None,
    ) -> None:
        self.items = list(items)
        self.lut = lut
        self.transform = _default_transform(transform)

    @property
    def ids(self) -> list[str]:
        return [item[0] for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame i as numpy: image HxWx3 uint8, mask HxW uint8 (train ids / 255)."""
        _, image_path, label_path = self.items[i]
        return load_pair(image_path, label_path, self.lut)

    def raw(self, i: int) -> dict:
        """Frame i decoded, before the transform (what a frame cache keeps)."""
        from segrl.data.transforms import to_raw_sample

        image, mask = self.load(i)
        return to_raw_sample(image, mask, self.items[i][0])

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.raw(i))


class CamVid(FilePairDataset):
    """CamVid in the SegNet layout (11 classes; raw id 11 = void -> 255).

    Pairs come from ``<root>/<split>.txt`` ("image label" per line, the SegNet prefix
    ``/SegNet/CamVid/`` replaced by ``root``) or, without that file, from the folders
    ``<split>/`` and ``<split>annot/`` matched by file name. Ids are file stems such
    as ``0001TP_006690``; their prefix is the capture sequence (``0001TP`` = dusk).
    """

    classes = CAMVID_CLASSES
    SEGNET_PREFIX = "/SegNet/CamVid/"
    DUSK_SEQUENCES: tuple[str, ...] = ("0001TP",)

    def __init__(self, root: str, split: str = "train", transform: Transform | None = None):
        root = os.fspath(root)
        _require_dir(
            root, "a SegNet CamVid folder: train/, trainannot/, val/, valannot/, train.txt, val.txt"
        )
        list_file = os.path.join(root, f"{split}.txt")
        if os.path.isfile(list_file):
            pairs = self._read_list(root, list_file)
        else:
            pairs = self._pair_folders(root, split)
        if not pairs:
            raise DataError(f"CamVid split '{split}' under {root} lists no images")
        items = [(os.path.splitext(os.path.basename(img))[0], img, lab) for img, lab in pairs]
        super().__init__(items, CAMVID_LUT, transform)
        self.root, self.split = root, split

    @classmethod
    def _read_list(cls, root: str, list_file: str) -> list[tuple[str, str]]:
        pairs = []
        with open(list_file) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise DataError(
                        f"{list_file} line {number}: expected 'image label', got {line.strip()!r}"
                    )
                image, label = (cls._under_root(root, p) for p in parts)
                if not os.path.isfile(image):
                    raise DataError(f"{list_file} line {number}: image {image} does not exist")
                if not os.path.isfile(label):
                    raise DataError(f"image {image} has no label: {label} does not exist")
                pairs.append((image, label))
        return pairs

    @classmethod
    def _under_root(cls, root: str, path: str) -> str:
        """A list entry as a path under root (SegNet lists carry an absolute prefix)."""
        if path.startswith(cls.SEGNET_PREFIX):
            path = path[len(cls.SEGNET_PREFIX) :]
        return os.path.join(root, path.lstrip("/"))

    @staticmethod
    def _pair_folders(root: str, split: str) -> list[tuple[str, str]]:
        image_dir, label_dir = os.path.join(root, split), os.path.join(root, f"{split}annot")
        if not os.path.isdir(image_dir):
            raise DataError(
                f"CamVid split '{split}' not found under {root}: expected {split}.txt or "
                f"the folders {split}/ and {split}annot/"
            )
        pairs = []
        for name in sorted(os.listdir(image_dir)):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image, label = os.path.join(image_dir, name), os.path.join(label_dir, name)
            if not os.path.isfile(label):
                raise DataError(f"image {image} has no label (expected {label})")
            pairs.append((image, label))
        return pairs

    @staticmethod
    def sequence(sample_id: str) -> str:
        """Capture sequence of an id: ``'0001TP_006690'`` -> ``'0001TP'``."""
        return sample_id.split("_", 1)[0]

    @property
    def sequences(self) -> list[str]:
        """Sequence of every frame, in dataset order."""
        return [self.sequence(sample_id) for sample_id in self.ids]

    def indices(self, dusk: bool) -> list[int]:
        """Indices of the dusk (``0001TP``) frames, or of the daylight ones."""
        return [i for i, s in enumerate(self.sequences) if (s in self.DUSK_SEQUENCES) == dusk]


class Cityscapes(FilePairDataset):
    """Cityscapes fine annotations mapped from labelIds to the 19 train ids.

    Images ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` pair with
    ``gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; ids are ``<stem>``
    (e.g. ``aachen_000000_000019``). labelIds outside the 19 classes map to 255;
    values above 33 (except 255) are an error.
    """

    classes = CITYSCAPES_CLASSES
    IMAGE_SUFFIX = "_leftImg8bit.png"
    LABEL_SUFFIX = "_gtFine_labelIds.png"

    def __init__(self, root: str, split: str = "train", transform: Transform | None = None):
        root = os.fspath(root)
        _require_dir(root, "a Cityscapes folder with leftImg8bit/ and gtFine/")
        image_root = os.path.join(root, "leftImg8bit", split)
        _require_dir(
            image_root, f"Cityscapes images leftImg8bit/{split}/<city>/*{self.IMAGE_SUFFIX}"
        )
        items = []
        for city in sorted(os.listdir(image_root)):
            city_dir = os.path.join(image_root, city)
            if not os.path.isdir(city_dir):
                continue
            for name in sorted(os.listdir(city_dir)):
                if name.endswith(self.IMAGE_SUFFIX):
                    items.append(self._pair(root, split, city, name))
        if not items:
            raise DataError(f"no *{self.IMAGE_SUFFIX} images under {image_root}")
        super().__init__(items, CITYSCAPES_LUT, transform)
        self.root, self.split = root, split

    @classmethod
    def _pair(cls, root: str, split: str, city: str, name: str) -> tuple[str, str, str]:
        stem = name[: -len(cls.IMAGE_SUFFIX)]
        image = os.path.join(root, "leftImg8bit", split, city, name)
        label = os.path.join(root, "gtFine", split, city, stem + cls.LABEL_SUFFIX)
        if not os.path.isfile(label):
            raise DataError(f"image {image} has no label (expected {label})")
        return stem, image, label


class ManifestDataset(Dataset):
    """Frames listed in a Parquet/CSV manifest (local or s3://), decoded on access.

    Construction reads only the id/image/label (and requested metadata) columns and
    keeps them as Arrow string arrays, so a pool of millions of rows costs tens of MB.
    Relative URIs resolve against the manifest's folder. Rows with a null/empty label
    are unlabeled: their mask is all ``ignore_index``. ``classes`` defaults to the names
    stored in the manifest's metadata (see ``write_manifest``). Without an id column the
    id is the image file stem. ``metadata_columns`` are also loaded and copied into each
    sample under their own names.
    """

    ignore_index: int = IGNORE_INDEX

    def __init__(
        self,
        uri: str,
        transform: Transform | None = None,
        endpoint_url: str | None = None,
        classes: Sequence[str] | None = None,
        image_column: str = IMAGE_COLUMN,
        label_column: str = LABEL_COLUMN,
        id_column: str = ID_COLUMN,
        metadata_columns: Sequence[str] = (),
    ) -> None:
        uri = os.fspath(uri)
        dataset = open_manifest(uri, endpoint_url, (id_column, image_column, label_column))
        require_columns(dataset, [image_column, *metadata_columns], uri)
        names = set(dataset.schema.names)
        columns = [image_column, *(c for c in (label_column, id_column) if c in names)]
        table = dataset.to_table(columns=list(dict.fromkeys([*columns, *metadata_columns])))
        self._images = _strings(table, image_column)
        self._labels = _strings(table, label_column) if label_column in names else None
        self._ids = _strings(table, id_column) if id_column in names else None
        self._metadata = {c: table.column(c).combine_chunks() for c in metadata_columns}
        if self._images.null_count:
            row = self._images.is_null().to_pylist().index(True)
            raise DataError(f"manifest {uri} row {row}: column '{image_column}' is empty")
        self.classes = self._classes(classes, dataset, uri)
        self.lut = identity_lut(len(self.classes))
        self.uri, self.endpoint_url = uri, endpoint_url
        self.metadata_columns = tuple(metadata_columns)
        self._base = base_of(uri)
        self.transform = _default_transform(transform)

    @staticmethod
    def _classes(classes: Sequence[str] | None, dataset, uri: str) -> tuple[str, ...]:
        found = tuple(classes) if classes else manifest_classes(dataset)
        if not found:
            raise DataError(
                f"manifest {uri} stores no class names; pass classes=(...) to ManifestDataset"
            )
        return found

    def __len__(self) -> int:
        return len(self._images)

    def sample_id(self, i: int) -> str:
        if self._ids is not None and self._ids[i].is_valid:
            return self._ids[i].as_py()
        return os.path.splitext(posix_basename(self._images[i].as_py()))[0]

    def metadata(self, name: str) -> list:
        """The values of metadata column ``name``, one per row."""
        return self._metadata[name].to_pylist()

    def image_uri(self, i: int) -> str:
        """Resolved image URI of row i."""
        return resolve_uri(self._base, self._images[i].as_py())

    def label_uri(self, i: int) -> str | None:
        """Resolved label URI of row i, or None for an unlabeled row."""
        if self._labels is None:
            return None
        value = self._labels[i].as_py()
        return resolve_uri(self._base, value) if value else None

    def is_labeled(self, i: int) -> bool:
        return self.label_uri(i) is not None

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row i as numpy: image HxWx3 uint8, mask HxW uint8 (all 255 if unlabeled)."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        return load_pair(self.image_uri(i), self.label_uri(i), self.lut, self.endpoint_url)

    def raw(self, i: int) -> dict:
        """Row i decoded, with its metadata columns, before the transform."""
        from segrl.data.transforms import to_raw_sample

        image, mask = self.load(i)
        sample = to_raw_sample(image, mask, self.sample_id(i))
        for name, column in self._metadata.items():
            sample[name] = column[i].as_py()
        return sample

    def __getitem__(self, i: int) -> dict:
        return self.transform(self.raw(i))


def posix_basename(uri: str) -> str:
    """Last path component of a local path or URI."""
    return uri.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def _strings(table: pa.Table, name: str) -> pa.Array:
    """A column as one contiguous string array (compact; cheap to pickle to workers)."""
    column = table.column(name).combine_chunks()
    return column if column.type == pa.string() else column.cast(pa.string())
