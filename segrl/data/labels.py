"""Label validation, id mapping and image decoding helpers shared by all datasets.

Every dataset maps its on-disk label ids to contiguous train ids ``0..C-1`` plus the
ignore index through a 256-entry lookup table (LUT). Raw values that are not valid for
the dataset map to ``INVALID`` in the table so a single vectorized lookup both maps and
validates a label file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255
INVALID = -1  # LUT entry for raw values the dataset does not define

CAMVID_CLASSES: tuple[str, ...] = (
    "sky",
    "building",
    "pole",
    "road",
    "pavement",
    "tree",
    "sign_symbol",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic_light",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# Standard cityscapesScripts table: labelId -> trainId for the 19 evaluated classes.
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
CITYSCAPES_MAX_LABEL_ID = 33  # labelIds files hold 0..33; anything else is corrupt


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


def build_lut(
    mapping: Mapping[int, int], valid_raw: Iterable[int], ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """A 256-entry int16 LUT: raw id -> train id.

    Raw ids in ``mapping`` map to their value; other ids in ``valid_raw`` map to
    ``ignore_index``; every remaining id (and nothing else) maps to ``INVALID``.
    The raw value ``ignore_index`` itself is always valid and stays ignored.
    """
    lut = np.full(256, INVALID, dtype=np.int16)
    for raw in valid_raw:
        lut[raw] = ignore_index
    lut[ignore_index] = ignore_index
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


def identity_lut(num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """LUT for labels already stored as train ids ``0..num_classes-1`` (+ ignore)."""
    return build_lut({i: i for i in range(num_classes)}, (), ignore_index)


CAMVID_LUT = build_lut({i: i for i in range(11)}, valid_raw=(11,))  # 11 = void -> ignore
CITYSCAPES_LUT = build_lut(CITYSCAPES_LABEL_TO_TRAIN, valid_raw=range(CITYSCAPES_MAX_LABEL_ID + 1))


def apply_lut(raw: np.ndarray, lut: np.ndarray, source: str) -> np.ndarray:
    """Map a raw HxW label through ``lut`` and reject values the dataset does not define.

    Returns a uint8 HxW array of train ids / ignore. Raises ``DataError`` naming
    ``source`` (the file) and the offending raw values.
    """
    mapped = lut[raw]
    if (mapped == INVALID).any():
        bad = np.unique(raw[mapped == INVALID])
        valid = np.flatnonzero(lut != INVALID).tolist()
        raise DataError(
            f"label {source} contains class id(s) {bad.tolist()} not defined for this dataset "
            f"(valid raw ids: {_ranges(valid)})"
        )
    return mapped.astype(np.uint8)


def check_label_values(
    mask: np.ndarray, num_classes: int, source: str, ignore_index: int = IGNORE_INDEX
) -> None:
    """Raise ``DataError`` if ``mask`` holds a value outside ``0..num_classes-1`` / ignore."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        raise DataError(
            f"label {source} contains class id(s) {bad.tolist()} outside 0..{num_classes - 1} "
            f"(ignore index {ignore_index})"
        )


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Decode an image file's bytes to an HxWx3 uint8 RGB array.

    Truncated files raise (we never set ``ImageFile.LOAD_TRUNCATED_IMAGES``), so a
    half-written PNG cannot silently become a partly-grey training image.
    """
    img = _open(data, source)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def decode_label(data: bytes, source: str) -> np.ndarray:
    """Decode a single-channel label image to an HxW array of raw ids (uint8).

    Palette ("P") images give their palette indices, which is how ids are stored.
    """
    img = _open(data, source)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(
            f"label {source} must be a single-channel image of class ids, got mode {img.mode}"
        )
    raw = np.asarray(img)
    if raw.dtype != np.uint8:
        too_big = np.unique(raw[(raw < 0) | (raw > 255)])
        if too_big.size:
            raise DataError(
                f"label {source} contains class id(s) {too_big[:20].tolist()} outside 0..255"
            )
        raw = raw.astype(np.uint8)
    return raw


def check_same_size(image: np.ndarray, mask: np.ndarray, image_src: str, label_src: str) -> None:
    """Raise ``DataError`` unless image (HxWx3) and mask (HxW) cover the same pixels."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(
            f"image {image_src} is {image.shape[1]}x{image.shape[0]} (WxH) but its label "
            f"{label_src} is {mask.shape[1]}x{mask.shape[0]} (WxH)"
        )


def _open(data: bytes, source: str) -> Image.Image:
    """Open and fully decode ``data`` with PIL; any decoding failure becomes ``DataError``."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncation errors surface here, not later in a worker
    except UnidentifiedImageError as exc:
        raise DataError(f"cannot decode image file {source}: not a readable image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"cannot decode image file {source}: {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"image file {source} is too large to decode: {exc}") from exc
    return img


def _ranges(values: Sequence[int]) -> str:
    """Compact text for sorted ints: [0,1,2,3,7] -> '0-3, 7'."""
    parts: list[str] = []
    start = prev = None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = v
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ", ".join(parts)
