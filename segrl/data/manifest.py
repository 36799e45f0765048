"""Manifests: Parquet or CSV tables listing the frames of a pool, local or on S3.

Columns: ``id`` (str), ``image_uri`` (str), optional ``label_uri`` (str or null =
unlabeled), and any extra metadata columns (``domain``, ``sequence``, ...). URIs may be
absolute (``/path``, ``file://``, ``s3://``) or relative to the manifest's folder.
Parquet manifests written by :func:`write_manifest` carry the class names in their
schema metadata (key ``segrl.classes``).

Pools can hold millions of rows, so nothing here loads images, and readers project
only the columns they need; :func:`iter_manifest_batches` streams record batches.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from segrl.data.labels import DataError
from segrl.storage import DEFAULT_RETRY_SECONDS, filesystem_for, read_uri_bytes

ID_COLUMN = "id"
IMAGE_COLUMN = "image_uri"
LABEL_COLUMN = "label_uri"
# Optional columns of a sparse-label manifest (the loop's labeled set): labeled pixels and all
# pixels of each image, so training can draw images by their labels without decoding them.
LABELED_PIXELS_COLUMN = "labeled_pixels"
IMAGE_PIXELS_COLUMN = "image_pixels"
CLASSES_KEY = b"segrl.classes"


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    """Absolute local path of a plain path or file:// URI."""
    return os.path.abspath(uri[len("file://") :] if uri.startswith("file://") else uri)


def manifest_format(uri: str) -> str:
    """'parquet' or 'csv' from the file extension; anything else is a ``DataError``."""
    name = uri.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise DataError(f"manifest {uri} must end in .parquet or .csv")


def _filesystem(uri: str, endpoint_url: str | None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI segrl.storage understands."""
    if is_local(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    return filesystem_for(uri, endpoint_url)


def base_of(uri: str) -> str:
    """The folder relative URIs in manifest ``uri`` resolve against."""
    if is_local(uri):
        return os.path.dirname(local_path(uri))
    return uri.rsplit("/", 1)[0]


def resolve_uri(base: str, uri: str) -> str:
    """``uri`` if absolute (a path from /, or with a scheme), else joined onto ``base``."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base, uri))


def read_bytes(uri: str, endpoint_url: str | None = None, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> bytes:
    """Bytes of a local file or remote object; a missing/unreadable one is a ``DataError``.

    An unreachable S3 endpoint is tried again for ``retry_seconds`` (``store.retry_seconds``).
    """
    if is_local(uri):
        path = local_path(uri)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise DataError(f"cannot read file {path}: {exc.strerror or exc}") from exc
    try:
        return read_uri_bytes(uri, endpoint_url, retry_seconds)
    except DataError:
        raise
    except Exception as exc:  # storage errors vary by backend; name the object either way
        raise DataError(f"cannot read {uri}: {exc}") from exc


def open_manifest(
    uri: str, endpoint_url: str | None = None, string_columns: Sequence[str] = ()
) -> pads.Dataset:
    """A lazy pyarrow dataset over one manifest file (nothing is read but the schema).

    ``string_columns`` are forced to strings when reading CSV, so ids like ``0001`` keep
    their zeros and empty cells are null rather than inferred as numbers.
    """
    fmt = manifest_format(uri)
    filesystem, path = _filesystem(uri, endpoint_url)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        raise DataError(f"manifest {uri} does not exist (expected a .{fmt} file)")
    if fmt == "csv":
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in string_columns},
            strings_can_be_null=True,
        )
        file_format: pads.FileFormat = pads.CsvFileFormat(convert_options=convert)
    else:
        file_format = pads.ParquetFileFormat()
    try:
        return pads.dataset(path, filesystem=filesystem, format=file_format)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read manifest {uri}: {exc}") from exc


def require_columns(dataset: pads.Dataset, columns: Iterable[str], uri: str) -> None:
    """Raise ``DataError`` naming the missing column(s) and the manifest."""
    names = set(dataset.schema.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"manifest {uri} has no column(s) {missing}; its columns are {sorted(names)}"
        )


def manifest_classes(dataset: pads.Dataset) -> tuple[str, ...] | None:
    """Class names stored in a Parquet manifest's schema metadata, if any."""
    meta = dataset.schema.metadata or {}
    if CLASSES_KEY not in meta:
        return None
    return tuple(json.loads(meta[CLASSES_KEY]))


def iter_manifest_batches(
    uri: str,
    batch_size: int,
    endpoint_url: str | None = None,
    columns: Sequence[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream a manifest as record batches of at most ``batch_size`` rows.

    Uses a pyarrow scanner, so only about one batch is in memory at a time, whatever
    the table size. ``columns`` projects (default: all).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = open_manifest(
        uri, endpoint_url, string_columns=(ID_COLUMN, IMAGE_COLUMN, LABEL_COLUMN)
    )
    if columns is not None:
        require_columns(dataset, columns, uri)
    scanner = dataset.scanner(
        columns=list(columns) if columns is not None else None, batch_size=batch_size
    )
    for batch in scanner.to_batches():
        # Scanners may yield empty batches at fragment boundaries, and CSV blocks bigger
        # than batch_size; re-slice so callers get exactly what they asked for.
        for start in range(0, batch.num_rows, batch_size):
            yield batch.slice(start, batch_size)


def write_manifest(
    rows: Iterable[Mapping[str, Any]] | pa.Table,
    uri: str,
    classes: Sequence[str] | None = None,
    endpoint_url: str | None = None,
) -> str:
    """Write rows (dicts with ``id``, ``image_uri``, optional ``label_uri`` and metadata)
    as a Parquet or CSV manifest at a local path or URI; returns ``uri``.

    ``id``, ``image_uri`` and ``label_uri`` are stored as strings (label null when
    absent). ``classes`` goes into Parquet schema metadata (CSV cannot hold it).
    """
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    if table.num_rows and IMAGE_COLUMN not in table.column_names:
        raise DataError(f"manifest rows for {uri} have no '{IMAGE_COLUMN}' field")
    table = _string_columns(table, (ID_COLUMN, IMAGE_COLUMN, LABEL_COLUMN))
    fmt = manifest_format(uri)
    filesystem, path = _filesystem(uri, endpoint_url)
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if fmt == "parquet":
        if classes is not None:
            meta = dict(table.schema.metadata or {})
            meta[CLASSES_KEY] = json.dumps(list(classes)).encode()
            table = table.replace_schema_metadata(meta)
        pq.write_table(table, path, filesystem=filesystem)
    else:
        with filesystem.open_output_stream(path) as sink:
            pacsv.write_csv(table, sink)
    return uri


def _string_columns(table: pa.Table, names: Sequence[str]) -> pa.Table:
    """Cast the named columns (where present) to string; all-null columns included."""
    for name in names:
        if name in table.column_names and table.schema.field(name).type != pa.string():
            idx = table.column_names.index(name)
            table = table.set_column(idx, name, table.column(name).cast(pa.string()))
    return table
