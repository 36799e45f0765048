"""Unlabeled pools: where the frames to score come from, streamed in bounded memory.

A pool is one of

* a manifest (``.parquet`` / ``.csv``, local or ``s3://``) with ``image_uri`` and
  optionally ``id`` columns (see :mod:`segrl.data.manifest`);
* a folder (local or ``s3://``) whose image files, recursively and sorted, are the pool;
* ``synthetic://<domain>?n=<count>&seed=<s>&size=<H>x<W>``: rendered road scenes, the
  zero-download pool for quick starts, tests and scale benchmarks (any size, no disk).

:func:`iter_pool_batches` yields Arrow batches of ``id`` and ``image_uri`` (absolute);
:func:`load_pool_image` turns one URI into an RGB array or a :class:`DataError` that
says why (empty file, truncated, not an image, unsupported mode, missing).
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from segrl.data.labels import DataError
from segrl.data.manifest import (
    ID_COLUMN,
    IMAGE_COLUMN,
    base_of,
    iter_manifest_batches,
    read_bytes,
    resolve_uri,
)
from segrl.storage import DEFAULT_RETRY_SECONDS

SYNTHETIC_SCHEME = "synthetic://"
POOL_SPLIT = "pool"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Camera frames: colour, grey or palette. 16-bit, float and 1-bit images are depth maps,
# masks or scans that a segmentation model trained on photos would score as nonsense.
POOL_IMAGE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr")
POOL_SCHEMA = pa.schema([(ID_COLUMN, pa.string()), (IMAGE_COLUMN, pa.string())])
_MAX_LISTED = 10  # repeated ids named in an error


# --------------------------------------------------------------------------- synthetic pools


def synthetic_pool_uri(
    count: int, domain: str = "target", seed: int = 0, size: tuple[int, int] = (128, 160)
) -> str:
    """The pool spec of ``count`` synthetic frames."""
    return f"{SYNTHETIC_SCHEME}{domain}?n={count}&seed={seed}&size={size[0]}x{size[1]}"


def parse_synthetic_pool(uri: str) -> tuple[str, int, int, tuple[int, int]]:
    """(domain, count, seed, (H, W)) of a ``synthetic://`` pool spec."""
    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        count = int(query.get("n", "0"))
        seed = int(query.get("seed", "0"))
        h, w = (int(v) for v in query.get("size", "128x160").lower().split("x"))
    except ValueError as exc:
        raise DataError(f"pool {uri!r}: n, seed and size=<H>x<W> must be integers ({exc})") from None
    if count < 1:
        raise DataError(f"pool {uri!r} needs n=<count of frames> >= 1")
    return parts.netloc or "target", count, seed, (h, w)


def synthetic_frame_uri(
    domain: str, seed: int, index: int, size: tuple[int, int], split: str = POOL_SPLIT
) -> str:
    """URI of frame ``index`` of a synthetic split (pool frames by default)."""
    uri = f"{SYNTHETIC_SCHEME}{domain}/{seed}/{index}?size={size[0]}x{size[1]}"
    return uri if split == POOL_SPLIT else f"{uri}&split={split}"


def _render_synthetic(uri: str) -> tuple[np.ndarray, np.ndarray]:
    from segrl.data.synthetic import render_scene, split_offset

    parts = urlsplit(uri)
    try:
        seed, index = (int(p) for p in parts.path.strip("/").split("/"))
        query = parse_qs(parts.query)
        h, w = (int(v) for v in query["size"][-1].lower().split("x"))
        split = query.get("split", [POOL_SPLIT])[-1]
        return render_scene(seed, split_offset(split) + index, (h, w), parts.netloc)
    except (ValueError, KeyError) as exc:
        raise DataError(f"{uri} is not a synthetic frame URI ({exc})") from None


def synthetic_label(uri: str) -> np.ndarray:
    """Ground-truth label (H x W uint8) of a synthetic frame URI, for oracle labeling."""
    return _render_synthetic(uri)[1]


def _synthetic_batches(uri: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    from segrl.data.synthetic import synthetic_id

    domain, count, seed, size = parse_synthetic_pool(uri)
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        ids = [synthetic_id(domain, seed, POOL_SPLIT, i) for i in range(start, stop)]
        uris = [synthetic_frame_uri(domain, seed, i, size) for i in range(start, stop)]
        yield pa.record_batch([pa.array(ids), pa.array(uris)], schema=POOL_SCHEMA)


def write_synthetic_pool_manifest(
    uri: str, count: int, domain: str = "target", seed: int = 0,
    size: tuple[int, int] = (128, 160), endpoint_url: str | None = None,
) -> str:
    """Write a Parquet manifest of ``count`` synthetic frames, streaming (any count)."""
    from segrl.storage import filesystem_for

    filesystem, path = filesystem_for(uri, endpoint_url)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    spec = synthetic_pool_uri(count, domain, seed, size)
    with pq.ParquetWriter(path, POOL_SCHEMA, filesystem=filesystem) as writer:
        for batch in _synthetic_batches(spec, 65536):
            writer.write_batch(batch)
    return uri


# --------------------------------------------------------------------------- folders


def _folder_batches(uri: str, batch_size: int, endpoint_url: str | None) -> Iterator[pa.RecordBatch]:
    from segrl.storage import filesystem_for

    filesystem, path = filesystem_for(uri, endpoint_url)
    selector = pafs.FileSelector(path, recursive=True)
    try:
        infos = filesystem.get_file_info(selector)
    except FileNotFoundError:
        raise DataError(f"pool {uri} does not exist (expected a manifest, a folder or synthetic://)") from None
    except OSError as exc:
        raise DataError(f"pool folder {uri} cannot be listed: {exc}") from exc
    paths = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise DataError(f"pool folder {uri} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    prefix = "s3://" if uri.startswith("s3://") else ""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        ids = [posixpath.splitext(posixpath.basename(p))[0] for p in chunk]
        uris = [prefix + p for p in chunk]
        yield pa.record_batch([pa.array(ids), pa.array(uris)], schema=POOL_SCHEMA)


# --------------------------------------------------------------------------- any pool


def pool_kind(uri: str) -> str:
    """'synthetic', 'manifest' or 'folder'."""
    if uri.startswith(SYNTHETIC_SCHEME):
        return "synthetic"
    if uri.lower().endswith((".parquet", ".pq", ".csv")):
        return "manifest"
    return "folder"


def iter_pool_batches(
    uri: str, batch_size: int, endpoint_url: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream a pool as Arrow batches of (``id``, absolute ``image_uri``), in a fixed order.

    Only about one batch is in memory at a time for manifests and synthetic pools (a
    folder's listing is held once). Ids missing from a manifest become file stems.
    """
    kind = pool_kind(uri)
    if kind == "synthetic":
        yield from _synthetic_batches(uri, batch_size)
        return
    if kind == "folder":
        yield from _folder_batches(uri, batch_size, endpoint_url)
        return
    base = base_of(uri)
    for batch in iter_manifest_batches(uri, batch_size, endpoint_url):
        names = batch.schema.names
        if IMAGE_COLUMN not in names:
            raise DataError(f"pool manifest {uri} has no '{IMAGE_COLUMN}' column; it has {names}")
        images = batch.column(IMAGE_COLUMN).to_pylist()
        uris = [resolve_uri(base, u) if u else "" for u in images]
        if ID_COLUMN in names:
            ids = [str(v) if v is not None else None for v in batch.column(ID_COLUMN).to_pylist()]
        else:
            ids = [None] * len(uris)
        ids = [i or posixpath.splitext(posixpath.basename(u))[0] for i, u in zip(ids, uris, strict=True)]
        yield pa.record_batch([pa.array(ids, pa.string()), pa.array(uris, pa.string())], schema=POOL_SCHEMA)


def duplicate_ids(ids: Iterable[str] | pa.ChunkedArray) -> dict[str, int]:
    """Each id that occurs more than once, with its count, in first-seen order (Arrow's hash
    count: a pool of millions of ids costs their bytes, not millions of Python objects)."""
    column = ids if isinstance(ids, pa.ChunkedArray) else pa.chunked_array([pa.array(list(ids), pa.string())])
    counts = pc.value_counts(column)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    return dict(zip(repeated.field("values").to_pylist(), repeated.field("counts").to_pylist(), strict=True))


def check_unique_ids(ids: Iterable[str], source: str) -> None:
    """``DataError`` naming the repeated ids of a pool: with one, a label would be taken
    for the wrong image, a frame never scored and the budget charged twice."""
    repeated = duplicate_ids(ids)
    if repeated:
        shown = ", ".join(f"{i!r} ({n}x)" for i, n in list(repeated.items())[:_MAX_LISTED])
        more = f" and {len(repeated) - _MAX_LISTED} more" if len(repeated) > _MAX_LISTED else ""
        raise DataError(f"{source} repeats {len(repeated)} id(s): {shown}{more}; every frame needs its own id "
                        "(give the rows distinct 'id' values, or rename files whose names only differ "
                        "in folder or extension)")


def id_file_problem(sample_id: str) -> str:
    """Why an id cannot name the files segrl keeps per frame (``<folder>/<id>.png``): ''
    if it can. An id must stay inside its folder: a path-traversal id like ``../x`` is refused."""
    parts = sample_id.split("/")
    if (not sample_id or sample_id.startswith("/") or "\\" in sample_id
            or any(p in ("", ".", "..") or p.startswith(".tmp-") for p in parts)):
        return (f"id {sample_id!r} cannot name a file: it is empty or absolute, or has an empty, '.', '..', "
                "'.tmp-' or '\\' part (an id's files must stay inside their folder)")
    return ""


def check_pool_ids(uri: str, endpoint_url: str | None = None) -> None:
    """Read a pool's ids once (no image) and refuse repeated ones; synthetic pools cannot repeat."""
    if pool_kind(uri) == "synthetic":
        return
    ids = pa.chunked_array([batch.column(0) for batch in iter_pool_batches(uri, 65536, endpoint_url)], pa.string())
    check_unique_ids(ids, f"pool {uri}")


# Bytes per pixel at a decode's peak: the widest accepted mode (4, RGBA/CMYK) plus its RGB copy (3).
DECODE_PEAK_BYTES_PER_PIXEL = 7
PIL_DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default, used when a user has disabled the limit


def largest_frame_decode_bytes() -> int:
    """Peak memory one frame may take while it decodes: PIL refuses frames of more than twice
    ``Image.MAX_IMAGE_PIXELS`` (a DecompressionBombError, which becomes an error row), so no
    accepted frame is larger than that at :data:`DECODE_PEAK_BYTES_PER_PIXEL` bytes a pixel."""
    limit = Image.MAX_IMAGE_PIXELS or PIL_DEFAULT_MAX_IMAGE_PIXELS
    return 2 * int(limit) * DECODE_PEAK_BYTES_PER_PIXEL


def decode_pool_frame(
    data: bytes, uri: str, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file's bytes -> (H' x W' x 3 uint8 RGB, the file's own (H, W)), or a
    ``DataError`` with the reason (empty, truncated, not an image, unsupported mode,
    more pixels than PIL's decompression-bomb limit).

    With ``size`` (H, W), the frame the model wants, a larger file is decoded smaller
    but never below ``size``: a JPEG by its DCT at 1/2, 1/4 or 1/8 scale (``draft``, the
    full frame never exists in memory), others by an integer box reduction right after
    decoding, before the RGB and float copies that used to cost several times the frame.
    """
    if not data:
        raise DataError(f"{uri}: file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        mode = img.mode
        if mode not in POOL_IMAGE_MODES:
            raise DataError(
                f"{uri}: unsupported image mode {mode} (expected a colour or grey photo: "
                f"{', '.join(POOL_IMAGE_MODES)})"
            )
        original = (img.height, img.width)
        if size and img.format == "JPEG":
            img.draft(None, (size[1], size[0]))  # (W, H); a scale that keeps at least size
        img.load()  # decode now so truncation is reported here
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # a frame this large would exhaust a decode task's memory
        raise DataError(f"{uri}: too large to decode ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{uri}: not a readable image ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{uri}: cannot decode image ({exc})") from None
    if size:
        img = _reduce_to(img, size)
    return np.array(img.convert("RGB"), dtype=np.uint8), original  # writable: torch wraps it without copying


def _reduce_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` box-reduced by the largest integer factor that keeps it at least ``size`` (H, W)."""
    factor = min(img.height // size[0], img.width // size[1])
    if factor < 2:
        return img
    if img.mode not in ("RGB", "L"):  # palette indices, alpha and CMYK must not be averaged as they are
        img = img.convert("RGB")
    return img.reduce(factor)


def decode_pool_image(data: bytes, uri: str) -> np.ndarray:
    """An image file's bytes -> H x W x 3 uint8 RGB at full size, or a ``DataError`` with the reason."""
    return decode_pool_frame(data, uri)[0]


def load_pool_frame(
    uri: str, endpoint_url: str | None = None, size: tuple[int, int] | None = None,
    retry_seconds: float = DEFAULT_RETRY_SECONDS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """(frame, its own (H, W)) of a pool frame at any URI, decoded no smaller than ``size``
    but no larger than it needs to be (see :func:`decode_pool_frame`); an unreachable S3
    endpoint is tried again for ``retry_seconds`` (``store.retry_seconds``)."""
    if not uri:
        raise DataError("row has an empty image_uri")
    if uri.startswith(SYNTHETIC_SCHEME):
        frame = _render_synthetic(uri)[0]
        return frame, frame.shape[:2]
    return decode_pool_frame(read_bytes(uri, endpoint_url, retry_seconds), uri, size)


def load_pool_image(uri: str, endpoint_url: str | None = None) -> np.ndarray:
    """H x W x 3 uint8 of a pool frame at any URI (file, s3://, synthetic://)."""
    return load_pool_frame(uri, endpoint_url)[0]
