"""Where an annotation tool loads each image from: the URL made of a pool image's URI.

Three ways (``annotation.image_urls``):

* ``local``   Label Studio serves files under its ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``
              (``url_root``): ``/data/local-files/?d=<path relative to it>``.
* ``prefix``  a web server the team runs: ``url_prefix`` + the URI with ``url_root`` cut off.
* ``presign`` an ``s3://`` URI as a presigned HTTPS GET, valid ``presign_seconds``.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from urllib.parse import quote

import boto3
from botocore.config import Config as BotoConfig

from segrl.data.labels import DataError
from segrl.storage import _resolve_endpoint, _resolve_region

IMAGE_URL_MODES = ("local", "prefix", "presign")
LOCAL_FILES_PATH = "/data/local-files/?d="


def local_files_url(uri: str, document_root: str) -> str:
    """Label Studio's local-files URL of the file ``uri`` under ``document_root``."""
    if not document_root:
        raise DataError("annotation.url_root must be Label Studio's local files document root")
    root = posixpath.normpath(os.path.abspath(document_root))
    path = posixpath.normpath(os.path.abspath(uri)) if "://" not in uri else uri
    if not path.startswith(root.rstrip("/") + "/"):
        raise DataError(
            f"image {uri} is not under annotation.url_root {document_root}: Label Studio "
            "serves local files only below its document root"
        )
    return LOCAL_FILES_PATH + quote(path[len(root.rstrip("/")) + 1 :])


def prefixed_url(uri: str, url_root: str, url_prefix: str) -> str:
    """``url_prefix`` + ``uri`` without its leading ``url_root``."""
    if not url_prefix:
        raise DataError("annotation.url_prefix must be set for annotation.image_urls=prefix")
    if not uri.startswith(url_root):
        raise DataError(f"image {uri} does not start with annotation.url_root {url_root!r}")
    rest = uri[len(url_root) :].lstrip("/")
    return f"{url_prefix.rstrip('/')}/{quote(rest)}"


def presigned_url(uri: str, seconds: int, client: object) -> str:
    """An HTTPS GET URL of the object ``s3://bucket/key``, valid ``seconds``."""
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise DataError(f"image {uri} is not an s3://bucket/key URI: cannot presign it")
    bucket, key = uri[5:].split("/", 1)
    return client.generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds
    )


def image_url_maker(
    mode: str,
    url_root: str = "",
    url_prefix: str = "",
    presign_seconds: int = 7 * 24 * 3600,
    endpoint_url: str | None = None,
) -> Callable[[str], str]:
    """``uri -> URL`` for one of :data:`IMAGE_URL_MODES` (see the module docstring)."""
    if mode == "local":
        return lambda uri: local_files_url(uri, url_root)
    if mode == "prefix":
        return lambda uri: prefixed_url(uri, url_root, url_prefix)
    if mode == "presign":
        # credentials from the standard AWS chain, as for the store; SigV4, which every
        # AWS region accepts (boto3 may otherwise sign the old way, with an absolute expiry)
        client = boto3.client(
            "s3", endpoint_url=_resolve_endpoint(endpoint_url), region_name=_resolve_region(None),
            config=BotoConfig(signature_version="s3v4"),
        )
        return lambda uri: presigned_url(uri, presign_seconds, client)
    raise DataError(f"image URL mode {mode!r} is not one of {list(IMAGE_URL_MODES)}")
