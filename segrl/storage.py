"""One artifact store for local folders and S3-compatible object stores.

``ArtifactStore`` reads and writes bytes, text, JSON, YAML, Parquet tables, files
and folders under a root that is either a local path or ``s3://bucket/prefix``
on any S3-compatible endpoint (AWS, MinIO, SeaweedFS, ...). It is built on
``pyarrow.fs`` so that ``store.filesystem`` and ``store.fs_path()`` can be handed
straight to Ray (``storage_filesystem=``, ``filesystem=``).

Guarantees:

* Writes are atomic: an object appears under its final name complete or not at
  all, and a failed write leaves the previous version intact. Local writes go to
  a hidden temp file in the same folder and are renamed into place; S3 writes go
  to a hidden temp key next to the final key and are moved (server-side copy)
  into place. Hidden temp names start with ``.tmp-`` and never show in ``list``.
* Errors are ``StoreError`` subclasses whose messages name the URI and, for S3,
  the endpoint; credentials never appear in messages, ``repr`` or logs.
* Transient S3 failures (5xx, throttling, dropped connections) are retried with
  exponential backoff by the AWS SDK. An endpoint that cannot be reached at all
  (a restart, a network outage) is tried again with backoff for ``retry_seconds``
  (``store.retry_seconds``, 3 minutes by default, as S3 clients do), with a log
  line saying so, before ``StoreUnreachableError``. Writes are buffered so that a
  retried write sends the whole object again. The filesystem handed to Ray
  (``ray_filesystem``) has the AWS SDK retry for about as long.

Credentials come from the standard AWS chain (environment, profile, instance
role); the endpoint from the ``endpoint_url`` argument, else the
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` environment variables, else AWS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

__all__ = [
    "ArtifactStore",
    "BucketNotFoundError",
    "ObjectNotFoundError",
    "StoreError",
    "StoreUnreachableError",
    "filesystem_for",
    "open_store",
    "read_uri_bytes",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection failures should surface in seconds, not minutes; the request
# (socket read) timeout is generous enough for a slow multipart part upload.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0
# Attempts per S3 request (first try included). With the SDK's exponential
# backoff four attempts span a few seconds, which rides out throttling and
# restarts without making a dead endpoint slow to report.
MAX_ATTEMPTS = 4
DEFAULT_RETRY_SECONDS = 180.0  # how long an unreachable endpoint is tried again (store.retry_seconds)
RETRY_FIRST_WAIT_S = 0.5  # backoff between tries of an unreachable endpoint: doubling ...
RETRY_MAX_WAIT_S = 8.0  # ... up to this
# The AWS SDK waits a random 0..min(2^n, 20) s before retry n: about 10 s per retry once capped.
SDK_MEAN_RETRY_WAIT_S = 10.0
_SPOOL_BYTES = 64 * 1024 * 1024  # a buffered write stays in memory up to this, then spills to disk
DEFAULT_REGION = "us-east-1"
TMP_PREFIX = ".tmp-"  # hidden in-progress names; reserved, so keys may not use it
_COPY_CHUNK = 8 * 1024 * 1024
_STABLE_READ_ATTEMPTS = 5
_SINGLE_GET_MAX = 64 * 1024 * 1024  # objects up to this size are fetched in one request

# Substrings of AWS SDK / curl messages that mean "could not talk to the endpoint at all".
_UNREACHABLE_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode: 6,",
    "curlCode: 7,",
    "curlCode: 28,",
    "Could not connect to server",
    "Could not resolve host",
    "Couldn't resolve host",
)
_ACCESS_MARKERS = (
    "ACCESS_DENIED",
    "AccessDenied",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
)


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """A store operation failed; the message names the URI or key and the problem."""


class StoreUnreachableError(StoreError):
    """The S3 endpoint could not be reached; the message names the endpoint URL."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The object (or folder) does not exist; the message names its full URI."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket itself does not exist at the endpoint; the message names the bucket."""


# --------------------------------------------------------------------------- endpoints


def _resolve_endpoint(endpoint_url: str | None) -> str | None:
    """Explicit endpoint, else the standard AWS env vars, else None (AWS itself)."""
    for candidate in (
        endpoint_url,
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
    ):
        if candidate and candidate.strip():
            return candidate.strip().rstrip("/")
    return None


def _resolve_region(region: str | None) -> str:
    return (
        region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )


def _split_endpoint(endpoint_url: str) -> tuple[str, str]:
    """(scheme, host:port) of an endpoint URL, rejecting forms pyarrow cannot use."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(
            f"S3 endpoint URL {_display_endpoint(endpoint_url)!r} must look like "
            "http://host:port or https://host"
        )
    if parts.path not in ("", "/"):
        raise StoreError(
            f"S3 endpoint URL {_display_endpoint(endpoint_url)!r} must not have a path"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{parts.port}" if parts.port else host


def _display_endpoint(endpoint_url: str | None, region: str | None = None) -> str:
    """Endpoint for messages: no user:password@ part, AWS's URL when none is set."""
    if not endpoint_url:
        return f"https://s3.{_resolve_region(region)}.amazonaws.com"
    parts = urlsplit(endpoint_url)
    if parts.hostname is None:
        return endpoint_url.split("@")[-1]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}" if parts.scheme else netloc


def _credentials_fingerprint() -> str:
    """Digest of the env credentials, so a changed identity gets a fresh filesystem.

    Only the digest is kept (as a cache key), never the values.
    """
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    raw = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(raw.encode()).hexdigest()


def _redact(text: str) -> str:
    """Belt and braces: strip env secrets should any library ever echo them."""
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


_S3_CACHE: dict[tuple[str | None, str, str], pafs.S3FileSystem] = {}
_S3_CACHE_LOCK = threading.Lock()
_LOCAL_FS = pafs.LocalFileSystem()


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled as the settings it was made from: pyarrow's own pickle
    drops the retry strategy and the timeouts, so the Ray processes that receive it (Ray
    Train's controller and workers write checkpoints and snapshots through it) would give up
    on an outage after the SDK's default attempts instead of ``sdk_attempts``."""

    settings: tuple[str | None, str, int]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_s3_filesystem, self.settings)


def _s3_filesystem(endpoint_url: str | None, region: str, attempts: int = MAX_ATTEMPTS) -> pafs.S3FileSystem:
    """Cached S3 filesystem for (endpoint, region, credentials, attempts per request).

    pyarrow ignores the AWS endpoint env vars, so the endpoint is always passed
    as ``endpoint_override``; credentials are left to the SDK's default chain so
    they are never copied into (picklable, printable) filesystem objects.
    """
    key = (endpoint_url, region, _credentials_fingerprint(), attempts)
    with _S3_CACHE_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            options: dict[str, Any] = {
                "region": region,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "request_timeout": REQUEST_TIMEOUT_S,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
            }
            if endpoint_url:
                scheme, host = _split_endpoint(endpoint_url)
                options.update(endpoint_override=host, scheme=scheme)
            fs = _S3FileSystem(**options)
            fs.settings = (endpoint_url, region, attempts)
            _S3_CACHE[key] = fs
        return fs


def sdk_attempts(retry_seconds: float) -> int:
    """Attempts per request for the AWS SDK to go on for about ``retry_seconds``."""
    return MAX_ATTEMPTS + math.ceil(max(retry_seconds, 0.0) / SDK_MEAN_RETRY_WAIT_S)


def retry_unreachable(
    op: Callable[[], T], retry_seconds: float, sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``op()``, tried again while it raises ``StoreUnreachableError``, with backoff, for up to
    ``retry_seconds`` in all; then the error, saying how long it was tried."""
    deadline, wait = None, RETRY_FIRST_WAIT_S
    while True:
        try:
            return op()
        except StoreUnreachableError as exc:
            now = clock()
            if deadline is None:
                deadline = now + retry_seconds
                if retry_seconds > 0:
                    log.warning("[segrl] store unreachable, retrying for up to %g s: %s", retry_seconds, exc)
            if now >= deadline:
                raise StoreUnreachableError(
                    f"{exc} (tried again for {retry_seconds:g} s: store.retry_seconds)") from exc
            sleep(min(wait, deadline - now))
            wait = min(2 * wait, RETRY_MAX_WAIT_S)


# --------------------------------------------------------------------------- URIs


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _s3_path(uri: str) -> str:
    """``bucket/prefix`` of an ``s3://bucket/prefix`` URI (no trailing slash)."""
    path = uri[len("s3://") :].strip("/")
    if not path or path.startswith("/") or not path.split("/", 1)[0]:
        raise StoreError(f"S3 URI {uri!r} has no bucket: expected s3://bucket/prefix")
    return path


def _local_path(uri: str) -> str:
    """Absolute local path of a plain path or ``file://`` URI."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StoreError(f"unsupported URI scheme '{scheme}' in {uri!r}: use a local path or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def filesystem_for(
    uri: str, endpoint_url: str | None = None, region: str | None = None
) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI.

    S3 filesystems are cached per (endpoint, region), so this is cheap to call
    per object.
    """
    if _is_s3(uri):
        fs = _s3_filesystem(_resolve_endpoint(endpoint_url), _resolve_region(region))
        return fs, _s3_path(uri)
    return _LOCAL_FS, _local_path(uri)


def read_uri_bytes(uri: str, endpoint_url: str | None = None, retry_seconds: float = DEFAULT_RETRY_SECONDS) -> bytes:
    """Bytes of the object at any absolute URI or local path (e.g. an image in a manifest).

    Meant for immutable inputs: an S3 object up to 64 MiB is one GET (so one
    version), but unlike ``ArtifactStore.read_bytes`` no extra request checks
    that it was not replaced between sizing and fetching it. An unreachable S3
    endpoint is tried again for ``retry_seconds``.
    """
    if _is_s3(uri):
        return retry_unreachable(lambda: _read_uri_once(uri, endpoint_url), retry_seconds)
    return _read_uri_once(uri, endpoint_url)


def _read_uri_once(uri: str, endpoint_url: str | None) -> bytes:
    fs, path = filesystem_for(uri, endpoint_url)
    endpoint = _resolve_endpoint(endpoint_url) if _is_s3(uri) else None
    try:
        return _read_all(fs, path, _is_s3(uri), verify=False)
    except FileNotFoundError as exc:
        if _is_s3(uri):
            _raise_if_bucket_missing(fs, path.split("/", 1)[0], endpoint, "reading", uri)
        raise ObjectNotFoundError(f"{uri} does not exist") from exc
    except OSError as exc:
        raise _classify(exc, "reading", uri, endpoint, _is_s3(uri)) from exc


def _read_all(fs: pafs.FileSystem, path: str, is_s3: bool, verify: bool = True) -> bytes:
    """Whole content of file ``path``, all of it from one version of the file."""
    buffer = io.BytesIO()
    _copy_out(fs, path, is_s3, buffer, verify)
    return buffer.getvalue()


def _copy_out(
    fs: pafs.FileSystem, path: str, is_s3: bool, dst: IO[bytes], verify: bool = True
) -> None:
    """Copy file ``path`` into the seekable ``dst`` without splicing two versions of it.

    A local open file is one inode, so a concurrent ``os.replace`` cannot mix
    versions. S3 objects are read with ranged GETs, and pyarrow's stream reader
    issues one per chunk, so an overwrite during the read could splice two
    versions together; see ``_s3_copy_once`` for how that is avoided.
    """
    if not is_s3:
        # compression=None: a key ending in .gz must come back as stored, not inflated.
        with fs.open_input_stream(path, compression=None) as src:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        return
    for _ in range(_STABLE_READ_ATTEMPTS):
        if _s3_copy_once(fs, path, dst, verify):
            return
        log.debug("%s changed while being read; reading it again", path)
    raise OSError(f"{path} kept changing while being read ({_STABLE_READ_ATTEMPTS} attempts)")


def _s3_copy_once(fs: pafs.FileSystem, path: str, dst: IO[bytes], verify: bool) -> bool:
    """One attempt at copying S3 object ``path``; False if it changed meanwhile.

    Objects up to ``_SINGLE_GET_MAX`` come in one GET, which returns a single
    version; a later size check (``verify``) catches a replacement between the
    HEAD that sized the read and the GET. Bigger objects are copied in chunks
    and re-read if their size or mtime changed (mtime has 1 s resolution, so
    this is best effort for same-size rewrites within a second).
    """
    dst.seek(0)
    dst.truncate()
    with fs.open_input_file(path) as src:
        size = src.size()
        if size <= _SINGLE_GET_MAX:
            data = src.read()
            dst.write(data)
            return not verify or len(data) == size == _current_size(fs, path)
        before = fs.get_file_info(path)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    after = fs.get_file_info(path)
    return before.size == size and (after.size, after.mtime) == (before.size, before.mtime)


def _current_size(fs: pafs.FileSystem, path: str) -> int | None:
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


# --------------------------------------------------------------------------- error mapping


def _classify(exc: OSError, action: str, uri: str, endpoint: str | None, is_s3: bool) -> StoreError:
    """Turn a pyarrow/OS error into the matching StoreError with a readable message."""
    text = _redact(str(exc))
    if is_s3:
        where = _display_endpoint(endpoint)
        if any(marker in text for marker in _UNREACHABLE_MARKERS):
            return StoreUnreachableError(
                f"S3 endpoint {where} is unreachable ({action} {uri}): {text}"
            )
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            bucket = _s3_path(uri).split("/", 1)[0]
            return BucketNotFoundError(
                f"bucket '{bucket}' does not exist at {where} ({action} {uri})"
            )
        if any(marker in text for marker in _ACCESS_MARKERS):
            return StoreError(
                f"access denied by {where} while {action} {uri}: check the AWS credentials "
                f"in the environment ({text})"
            )
    return StoreError(f"{action} {uri} failed: {text}")


def _raise_if_bucket_missing(
    fs: pafs.FileSystem, bucket: str, endpoint: str | None, action: str, uri: str
) -> None:
    """Raise BucketNotFoundError when ``bucket`` is absent (a 404 does not say which is)."""
    try:
        missing = fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return  # e.g. no HeadBucket permission: keep the plain not-found error
    if missing:
        raise BucketNotFoundError(
            f"bucket '{bucket}' does not exist at {_display_endpoint(endpoint)} ({action} {uri})"
        )


def _temp_sibling(path: str) -> str:
    """Hidden unique name in the same folder as ``path`` (same folder: rename stays atomic)."""
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"[:255])


def _discard(fs: pafs.FileSystem, path: str) -> None:
    """Best-effort delete of a temp object; never masks the error being handled."""
    try:
        fs.delete_file(path)
    except OSError as exc:
        log.warning("could not remove temp object %s: %s", path, _redact(str(exc)))


@contextlib.contextmanager
def _local_atomic_output(path: str) -> Iterator[IO[bytes]]:
    """Writable file whose content replaces ``path`` only if the block completes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _temp_sibling(path)
    # os.open with 0o666 applies the umask, so the result gets normal permissions.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())  # content durable before the name points at it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _s3_atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[IO[bytes]]:
    """Writable stream whose content replaces ``path`` only if the block completes.

    pyarrow's S3 output stream *completes* the upload on close even when the
    block raised, so writing straight to ``path`` could publish half an object.
    We write a temp key next to it and move (server-side copy, at most 5 GB per
    object) it into place, deleting the temp key on any failure.
    """
    tmp = _temp_sibling(path)
    # compression=None: pyarrow would otherwise gzip a key ending in .gz on the way out.
    out = fs.open_output_stream(tmp, compression=None)  # on failure nothing to clean up
    try:
        with out:
            yield out
        fs.move(tmp, path)
    except BaseException:
        _discard(fs, tmp)
        raise


def _normalize_key(key: str) -> str:
    """Key with "/" separators, no empty or "." parts; rejects escapes and reserved names."""
    if not isinstance(key, str):
        raise TypeError(f"store keys are str, got {type(key).__name__}: {key!r}")
    if key.startswith("/"):
        raise StoreError(f"key {key!r} is absolute: keys are relative to the store root")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StoreError(f"key {key!r} escapes the store root ('..' is not allowed)")
    if any(p.startswith(TMP_PREFIX) for p in parts):
        raise StoreError(f"key {key!r} uses the reserved prefix '{TMP_PREFIX}'")
    return "/".join(parts)


def json_ready(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- the store


class ArtifactStore:
    """Artifacts under one root: a local folder or ``s3://bucket/prefix``.

    Keys are "/"-separated paths relative to the root. Every write is atomic
    (see the module docstring); every error is a ``StoreError``.
    """

    def __init__(self, root: str, endpoint_url: str | None = None, region: str | None = None,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.is_s3 = _is_s3(root)
        self.region = _resolve_region(region)
        self.endpoint_url = _resolve_endpoint(endpoint_url) if self.is_s3 else None
        self.retry_seconds = retry_seconds
        if self.is_s3:
            self._root_path = _s3_path(root)
            # few SDK attempts: an outage is waited out by retry_unreachable, which says so
            self.filesystem: pafs.FileSystem = _s3_filesystem(self.endpoint_url, self.region)
            self.root = f"s3://{self._root_path}"
            self.bucket: str | None = self._root_path.split("/", 1)[0]
        else:
            self._root_path = _local_path(root)
            self.filesystem = _LOCAL_FS
            self.root = self._root_path
            self.bucket = None
        self._bucket_seen = False  # set once the bucket is known to exist

    def __repr__(self) -> str:
        if self.is_s3:
            return f"ArtifactStore({self.root!r}, endpoint={_display_endpoint(self.endpoint_url, self.region)!r})"
        return f"ArtifactStore({self.root!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the resolved settings so a Ray worker uses its own cached filesystem.
        return (ArtifactStore, (self.root, self.endpoint_url, self.region, self.retry_seconds))

    @property
    def ray_filesystem(self) -> pafs.FileSystem:
        """The filesystem to hand Ray (checkpoint uploads, run snapshots): Ray does not retry
        a failed write, so the AWS SDK retries each request for about ``retry_seconds``."""
        if not self.is_s3:
            return self.filesystem
        return _s3_filesystem(self.endpoint_url, self.region, sdk_attempts(self.retry_seconds))

    def _retry(self, op: Callable[[], T]) -> T:
        """``op()``, waiting out an unreachable S3 endpoint for ``retry_seconds``."""
        return retry_unreachable(op, self.retry_seconds) if self.is_s3 else op()

    # ----------------------------------------------------------------- naming

    def fs_path(self, key: str = "") -> str:
        """Path of ``key`` inside ``self.filesystem`` ("bucket/prefix/key" or "/abs/key")."""
        key = _normalize_key(key)
        if not key:
            return self._root_path
        return f"{self._root_path.rstrip('/')}/{key}"

    def uri(self, key: str = "") -> str:
        """Full URI of ``key``: ``s3://bucket/prefix/key`` or ``/abs/path/key``."""
        path = self.fs_path(key)
        return f"s3://{path}" if self.is_s3 else path

    def child(self, key: str) -> ArtifactStore:
        """Store rooted at ``root/key`` on the same endpoint."""
        return ArtifactStore(self.uri(key), self.endpoint_url, self.region, self.retry_seconds)

    # ----------------------------------------------------------------- queries

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object or a non-empty folder."""
        path = self.fs_path(key)

        def check() -> bool:
            with self._errors("checking", key):
                found = self.filesystem.get_file_info(path).type != pafs.FileType.NotFound
            if not found:
                self._check_bucket("checking", key)
            return found

        return self._retry(check)

    def size(self, key: str) -> int | None:
        """Bytes of object ``key``; None if it does not exist (or is a folder)."""
        path = self._file_key_path(key)

        def check() -> pafs.FileInfo:
            with self._errors("checking", key):
                return self.filesystem.get_file_info(path)

        info = self._retry(check)
        return info.size if info.type == pafs.FileType.File else None

    def list(self, prefix: str = "", recursive: bool = False) -> list[str]:
        """Sorted keys (relative to the root) under folder ``prefix``.

        Non-recursive: the files and folders directly inside ``prefix``.
        Recursive: every file below ``prefix`` (folders are implied by S3 keys,
        so they are not listed). A missing prefix gives ``[]``.
        """
        base = self.fs_path(prefix)
        selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)

        def listing() -> list[pafs.FileInfo]:
            with self._errors("listing", prefix):
                try:
                    infos = self.filesystem.get_file_info(selector)
                except NotADirectoryError:
                    infos = []  # prefix names a local file: nothing is inside it
            if not infos:
                self._check_bucket("listing", prefix)
            return infos

        infos = self._retry(listing)
        root = self._root_path.rstrip("/") + "/"
        keys = [
            info.path[len(root) :]
            for info in infos
            if not posixpath.basename(info.path).startswith(TMP_PREFIX)
            and (not recursive or info.type == pafs.FileType.File)
        ]
        return sorted(keys)

    # ----------------------------------------------------------------- bytes and text

    def read_bytes(self, key: str) -> bytes:
        """Content of object ``key``; ``ObjectNotFoundError`` if it does not exist."""
        path = self._file_key_path(key)

        def read() -> bytes:
            with self._errors("reading", key):
                return _read_all(self.filesystem, path, self.is_s3)

        return self._retry(read)

    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomically replace object ``key`` with ``data``."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write_bytes({key!r}) needs bytes, got {type(data).__name__}")
        with self.open_output(key) as out:
            out.write(data)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, obj: Any) -> None:
        # Serialize first: a non-serializable object fails before anything is written.
        # NaN and infinity become null: they are not JSON, and strict readers reject the file.
        self.write_text(key, json.dumps(json_ready(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    def read_yaml(self, key: str) -> Any:
        return yaml.safe_load(self.read_text(key))

    def write_yaml(self, key: str, obj: Any) -> None:
        self.write_text(key, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))

    # ----------------------------------------------------------------- tables

    def read_table(self, key: str) -> pa.Table:
        """Parquet file ``key`` as a pyarrow Table.

        The file is fetched whole first, so a concurrent overwrite cannot hand
        the Parquet reader a footer and row groups from different versions.
        """
        return pq.read_table(pa.BufferReader(self.read_bytes(key)))

    def write_table(self, key: str, table: pa.Table) -> None:
        """Atomically write ``table`` as Parquet file ``key``."""
        with self.open_output(key) as out:
            pq.write_table(table, out)

    # ----------------------------------------------------------------- streams

    @contextlib.contextmanager
    def open_output(self, key: str) -> Iterator[IO[bytes]]:
        """Writable binary stream for ``key``, published atomically when the block ends.

        If the block raises, nothing appears under ``key`` and its previous
        version is kept. Use for large or incremental payloads, e.g.
        ``with store.open_output("model.pt") as f: torch.save(state, f)``.
        """
        path = self._file_key_path(key)
        if not self.is_s3:
            with self._errors("writing", key, writing=True), _local_atomic_output(path) as out:
                yield out
            log.debug("wrote %s", self.uri(key))
            return
        # Buffered, so that a write tried again after an outage sends the whole object again.
        with tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as buffer:
            with self._errors("writing", key, writing=True):  # e.g. the source of an upload fails
                yield buffer

            def publish() -> None:
                buffer.seek(0)
                with self._errors("writing", key, writing=True), _s3_atomic_output(self.filesystem, path) as out:
                    shutil.copyfileobj(buffer, out, _COPY_CHUNK)

            self._retry(publish)
        log.debug("wrote %s", self.uri(key))

    def open_input(self, key: str) -> pa.NativeFile:
        """Seekable binary file for ``key`` (close it, or use it as a context manager).

        Reads are lazy ranged requests: unlike ``read_bytes``, nothing guards
        against the object being overwritten while it is open.
        """
        path = self._file_key_path(key)

        def open_file() -> pa.NativeFile:
            with self._errors("reading", key):
                return self.filesystem.open_input_file(path)

        return self._retry(open_file)

    # ----------------------------------------------------------------- files and folders

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Atomically copy local file ``local_path`` to ``key``."""
        source = Path(local_path)
        try:
            f = open(source, "rb")  # closed by the with below
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"cannot upload {source}: local file does not exist") from exc
        except OSError as exc:
            raise StoreError(f"cannot upload {source}: {exc.strerror or exc}") from exc
        with f, self.open_output(key) as out:
            shutil.copyfileobj(f, out, _COPY_CHUNK)

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Copy object ``key`` to ``local_path`` (replaced atomically, folders created)."""
        path = self._file_key_path(key)
        target = os.path.abspath(os.fspath(local_path))

        def download() -> None:
            with self._errors("downloading", key), _local_atomic_output(target) as dst:
                _copy_out(self.filesystem, path, self.is_s3, dst)

        self._retry(download)

    def upload_dir(self, local_dir: str | os.PathLike[str], key: str) -> None:
        """Copy every file under ``local_dir`` to ``key/<relative path>``, each atomically.

        Files already under ``key`` that are not in ``local_dir`` are kept.
        """
        source = Path(local_dir)
        if not source.is_dir():
            raise ObjectNotFoundError(f"cannot upload {source}: local folder does not exist")
        for file in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = file.relative_to(source).as_posix()
            self.upload_file(file, f"{key}/{rel}" if key else rel)

    def download_dir(self, key: str, local_dir: str | os.PathLike[str]) -> None:
        """Copy every object under folder ``key`` into ``local_dir``, keeping relative paths."""
        prefix = _normalize_key(key)
        keys = self.list(prefix, recursive=True)
        if not keys and not self.exists(prefix):
            raise ObjectNotFoundError(f"{self.uri(prefix)} does not exist")
        os.makedirs(local_dir, exist_ok=True)
        cut = len(prefix) + 1 if prefix else 0
        for k in keys:
            self.download_file(k, os.path.join(os.fspath(local_dir), *k[cut:].split("/")))

    def delete(self, key: str) -> None:
        """Delete object or folder ``key``; nothing happens if it does not exist."""
        path = self._file_key_path(key)  # refuses "" so the root cannot be wiped by accident

        def delete() -> None:
            with self._errors("deleting", key, writing=True):
                info = self.filesystem.get_file_info(path)
                if info.type == pafs.FileType.File:
                    self.filesystem.delete_file(path)
                elif info.type == pafs.FileType.Directory:
                    self.filesystem.delete_dir(path)

        self._retry(delete)

    # ----------------------------------------------------------------- helpers

    def _file_key_path(self, key: str) -> str:
        """fs_path of a key that must name an object, not the root itself."""
        if not _normalize_key(key):
            raise StoreError(f"a non-empty key is required (store root {self.root})")
        return self.fs_path(key)

    def _check_bucket(self, action: str, key: str) -> None:
        """Once per store, turn an ambiguous S3 not-found into BucketNotFoundError."""
        if self.is_s3 and not self._bucket_seen:
            assert self.bucket is not None
            _raise_if_bucket_missing(
                self.filesystem, self.bucket, self.endpoint_url, action, self.uri(key)
            )
            self._bucket_seen = True

    @contextlib.contextmanager
    def _errors(self, action: str, key: str, writing: bool = False) -> Iterator[None]:
        """Map pyarrow/OS errors raised in the block to StoreErrors naming ``key``'s URI.

        Other exceptions (e.g. from a caller's serializer) pass through unchanged.
        """
        uri = self.uri(key)
        try:
            yield
        except StoreError:
            raise
        except FileNotFoundError as exc:
            if writing:
                raise _classify(exc, action, uri, self.endpoint_url, self.is_s3) from exc
            self._check_bucket(action, key)
            raise ObjectNotFoundError(f"{uri} does not exist") from exc
        except OSError as exc:
            raise _classify(exc, action, uri, self.endpoint_url, self.is_s3) from exc


def open_store(
    root: str, endpoint_url: str | None = None, region: str | None = None,
    retry_seconds: float = DEFAULT_RETRY_SECONDS,
) -> ArtifactStore:
    """The ArtifactStore rooted at ``root`` (local path or ``s3://bucket/prefix``)."""
    return ArtifactStore(root, endpoint_url, region, retry_seconds)
