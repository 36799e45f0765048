"""What a round asks to label, and the ground-truth oracle that answers it.

A *selection* is a pyarrow Table (:data:`SELECTION_SCHEMA`), one row per selected
item; an image may have several rows (e.g. several regions). A row's ``mask_key``
names a PNG in the same store the functions below are handed. Every label map this
package writes is *sparse*: a uint8 HxW PNG holding the class id where a pixel was
asked for and ``ignore_index`` everywhere else, so training never sees a label that
nobody paid for.

The pure functions (:func:`requested_mask`, :func:`sparse_label`, :func:`merge_sparse`)
take numpy arrays and do no I/O; :func:`oracle_label` reads ground truth through a
callable and writes through an :class:`~segrl.storage.ArtifactStore`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from segrl.data.labels import IGNORE_INDEX, DataError, decode_label

UNITS = ("image", "region", "pixels", "points")

SELECTION_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("unit", pa.string(), nullable=False),
        pa.field("height", pa.int64(), nullable=False),
        pa.field("width", pa.int64(), nullable=False),
        pa.field("y0", pa.int64(), nullable=False),
        pa.field("x0", pa.int64(), nullable=False),
        pa.field("y1", pa.int64(), nullable=False),
        pa.field("x1", pa.int64(), nullable=False),
        pa.field("mask_key", pa.string(), nullable=False),
        pa.field("points", pa.list_(pa.list_(pa.int64())), nullable=False),
        pa.field("cost_pixels", pa.int64(), nullable=False),
        pa.field("cost_clicks", pa.int64(), nullable=False),
    ]
)
SELECTION_COLUMNS = tuple(SELECTION_SCHEMA.names)

Row = Mapping[str, Any]
MaskReader = Callable[[str], np.ndarray]


# --------------------------------------------------------------------------- selection tables


def selection_table(rows: Sequence[Row]) -> pa.Table:
    """A validated selection Table (:data:`SELECTION_SCHEMA`) from a list of row dicts.

    Every row must have exactly the schema's columns (an unknown key is almost always
    a typo, e.g. ``mask`` for ``mask_key``). Raises ``DataError`` naming the row's id
    and the problem.
    """
    for position, row in enumerate(rows):
        missing = [c for c in SELECTION_COLUMNS if c not in row]
        unknown = sorted(set(row) - set(SELECTION_COLUMNS))
        if missing or unknown:
            raise DataError(
                f"selection row {position} (id {row.get('id')!r}): "
                f"missing columns {missing}, unknown columns {unknown}"
            )
    table = pa.Table.from_pylist(list(rows), schema=SELECTION_SCHEMA)
    return validate_selection(table)


def validate_selection(table: pa.Table) -> pa.Table:
    """``table`` cast to :data:`SELECTION_SCHEMA` (extra columns dropped), every row checked.

    For a selection read back from the store. Raises ``DataError`` when a column is
    missing or has the wrong type, or a row is inconsistent (see :func:`check_row`).
    """
    missing = [c for c in SELECTION_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"selection table lacks column(s) {missing}")
    table = table.select(list(SELECTION_COLUMNS))
    for name in SELECTION_COLUMNS:
        if table.column(name).null_count:
            raise DataError(f"selection column {name!r} has null values")
    try:
        table = table.cast(SELECTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"selection table does not match the selection schema: {exc}") from exc
    for row in table.to_pylist():
        check_row(row)
    return table


def check_row(row: Row) -> None:
    """Raise ``DataError`` (naming the id) unless one selection row is self-consistent.

    Checks: a usable id (it becomes a store key), a known unit, a non-empty box inside
    the image, the full image for unit "image", a mask key exactly for "pixels",
    points (inside the box) exactly for "points", non-negative costs.
    """
    image_id, unit = row["id"], row["unit"]
    _check_id(image_id)
    where = f"selection row for image {image_id!r}"
    if unit not in UNITS:
        raise DataError(f"{where}: unit {unit!r} is not one of {list(UNITS)}")
    height, width = row["height"], row["width"]
    if height <= 0 or width <= 0:
        raise DataError(f"{where}: image size {height}x{width} (HxW) must be positive")
    y0, x0, y1, x1 = row["y0"], row["x0"], row["y1"], row["x1"]
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise DataError(
            f"{where}: box (y0, x0, y1, x1) = ({y0}, {x0}, {y1}, {x1}) is empty or outside "
            f"the {height}x{width} (HxW) image"
        )
    if unit == "image" and (y0, x0, y1, x1) != (0, 0, height, width):
        raise DataError(f"{where}: unit 'image' needs the full-image box (0, 0, {height}, {width})")
    if (unit == "pixels") != bool(row["mask_key"]):
        raise DataError(f"{where}: mask_key must be set for unit 'pixels' and only for it")
    points = row["points"] or []
    if (unit == "points") != bool(points):
        raise DataError(f"{where}: points must be given for unit 'points' and only for it")
    for point in points:
        if len(point) != 2 or not (y0 <= point[0] < y1 and x0 <= point[1] < x1):
            raise DataError(f"{where}: point {point} is not a [y, x] inside its box")
    if row["cost_pixels"] < 0 or row["cost_clicks"] < 0:
        raise DataError(f"{where}: costs must be >= 0")


def _check_id(image_id: str) -> None:
    """Ids name files (``<id>.png``) and store keys, so they must be clean relative paths."""
    parts = image_id.split("/")
    if not image_id or image_id.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"image id {image_id!r} cannot name a file: use a non-empty relative name")
    if any(p.startswith(".") for p in parts):
        # Hidden names are skipped by listings (and ".tmp-" is reserved by the store).
        raise DataError(f"image id {image_id!r} cannot name a file: no part may start with '.'")


def rows_by_image(selection: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Validated rows grouped by image id, ids in first-appearance order.

    Raises ``DataError`` when rows of one image disagree on its size or URI.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in validate_selection(selection).to_pylist():
        groups.setdefault(row["id"], []).append(row)
    for image_id, rows in groups.items():
        if len({(r["height"], r["width"], r["uri"]) for r in rows}) > 1:
            raise DataError(f"selection rows for image {image_id!r} disagree on its size or uri")
    return groups


# --------------------------------------------------------------------------- pure label maps


def requested_mask(rows: Iterable[Row], read_mask: MaskReader) -> np.ndarray:
    """HxW bool: the union of every pixel the rows of one image ask to have labeled.

    Unit "image" / "region": the box. "pixels": the nonzero pixels of the HxW mask
    ``read_mask(mask_key)`` returns. "points": the single pixels [y, x]. All rows
    must be of the same image; H, W come from them. Pure apart from ``read_mask``.
    """
    rows = list(rows)
    if not rows:
        raise DataError("requested_mask needs at least one selection row")
    image_id, height, width = rows[0]["id"], rows[0]["height"], rows[0]["width"]
    requested = np.zeros((height, width), dtype=bool)
    for row in rows:
        check_row(row)
        if (row["id"], row["height"], row["width"]) != (image_id, height, width):
            raise DataError(
                f"requested_mask got rows of different images: {image_id!r} and {row['id']!r}"
            )
        _add_request(requested, row, read_mask)
    return requested


def _add_request(requested: np.ndarray, row: Row, read_mask: MaskReader) -> None:
    """OR one row's request into the HxW bool ``requested`` (in place)."""
    unit = row["unit"]
    if unit in ("image", "region"):
        requested[row["y0"] : row["y1"], row["x0"] : row["x1"]] = True
    elif unit == "pixels":
        mask = np.asarray(read_mask(row["mask_key"]))
        if mask.shape != requested.shape:
            raise DataError(
                f"pixel mask {row['mask_key']} of image {row['id']!r} is {_hw(mask.shape)} (HxW), "
                f"expected {_hw(requested.shape)}"
            )
        requested |= mask != 0
    else:
        points = np.asarray(row["points"], dtype=np.int64).reshape(-1, 2)
        requested[points[:, 0], points[:, 1]] = True


def sparse_label(
    truth: np.ndarray, requested: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """HxW uint8: ``truth`` (HxW class ids) where ``requested`` (HxW bool), ignore elsewhere."""
    truth = np.asarray(truth)
    requested = np.asarray(requested, dtype=bool)
    if truth.shape != requested.shape or truth.ndim != 2:
        raise DataError(
            f"label is {truth.shape} but the request is {requested.shape}: both must be HxW"
        )
    return np.where(requested, truth, ignore_index).astype(np.uint8)


def merge_sparse(
    old: np.ndarray | None, new: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """HxW uint8: ``old`` with its ignored pixels filled from ``new``.

    A pixel labeled in ``old`` keeps its value even if ``new`` disagrees: labels are
    paid for once and never lost by a later round. ``old`` None means nothing yet.
    """
    new = np.asarray(new)
    if old is None:
        return new.astype(np.uint8, copy=True)
    old = np.asarray(old)
    if old.shape != new.shape:
        raise DataError(f"cannot merge label maps of shapes {old.shape} and {new.shape}")
    return np.where(old == ignore_index, new, old).astype(np.uint8)


def labeled_pixel_count(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> int:
    """Pixels of HxW ``label`` that hold a class id (not ``ignore_index``)."""
    return int(np.count_nonzero(np.asarray(label) != ignore_index))


# --------------------------------------------------------------------------- PNG and store helpers


def encode_label_png(label: np.ndarray) -> bytes:
    """PNG bytes of an HxW uint8 label map (single-channel, mode "L")."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DataError(f"a label map must be HxW uint8, got {label.shape} {label.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(label).save(buffer, format="PNG")
    return buffer.getvalue()


def store_mask_reader(store: Any) -> MaskReader:
    """``read_mask`` for :func:`requested_mask`: decode the PNG at a key of ``store``."""

    def read_mask(key: str) -> np.ndarray:
        return decode_label(store.read_bytes(key), store.uri(key))

    return read_mask


def join_key(prefix: str, name: str) -> str:
    """``prefix/name``, or ``name`` alone when ``prefix`` is the store root ("")."""
    prefix = prefix.rstrip("/")
    return f"{prefix}/{name}" if prefix else name


def label_key(labels_prefix: str, image_id: str) -> str:
    """Store key of the sparse label map of ``image_id``."""
    return join_key(labels_prefix, f"{image_id}.png")


def _hw(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


# --------------------------------------------------------------------------- the oracle


def oracle_label(
    selection: pa.Table,
    truth: Callable[[str], np.ndarray],
    store: Any,
    labels_prefix: str,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, int]:
    """Answer a selection from ground truth: write ``<labels_prefix>/<id>.png`` per image.

    ``truth(id)`` returns the image's full HxW uint8 label map; each written PNG keeps
    its values only at the requested pixels (:func:`sparse_label`). Everything is read
    and checked before the first write, so a failed truth lookup or a truth map whose
    shape is not (height, width) (``DataError`` naming the id) writes nothing.

    Returns counts: ``images``; ``labeled_pixels`` (requested pixels whose truth is a
    class, not ignore); ``requested_pixels``; ``clicks`` (sum of ``cost_clicks``).
    """
    read_mask = store_mask_reader(store)
    pngs: dict[str, bytes] = {}
    counts = {"images": 0, "labeled_pixels": 0, "requested_pixels": 0, "clicks": 0}
    for image_id, rows in rows_by_image(selection).items():
        requested = requested_mask(rows, read_mask)
        label = sparse_label(_truth_of(truth, image_id, requested.shape), requested, ignore_index)
        pngs[label_key(labels_prefix, image_id)] = encode_label_png(label)
        counts["images"] += 1
        counts["labeled_pixels"] += labeled_pixel_count(label, ignore_index)
        counts["requested_pixels"] += int(requested.sum())
        counts["clicks"] += sum(int(r["cost_clicks"]) for r in rows)
    for key, png in pngs.items():
        store.write_bytes(key, png)
    return counts


def _truth_of(
    truth: Callable[[str], np.ndarray], image_id: str, shape: tuple[int, ...]
) -> np.ndarray:
    """``truth(image_id)`` checked to be an HxW map of ``shape`` with values 0..255."""
    try:
        label = np.asarray(truth(image_id))
    except DataError:
        raise
    except (LookupError, OSError) as exc:  # a dict's KeyError, a missing file or object
        raise DataError(f"no ground truth for image {image_id!r}: {exc}") from exc
    if label.shape != tuple(shape):
        raise DataError(
            f"ground truth of image {image_id!r} is {_hw(label.shape)} (HxW), "
            f"but the selection says {_hw(shape)}"
        )
    if label.size and (label.min() < 0 or label.max() > 255):
        raise DataError(f"ground truth of image {image_id!r} has values outside 0..255")
    return label
