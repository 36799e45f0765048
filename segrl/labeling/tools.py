"""One door to the annotation tools: export a round for each configured tool, import any answer.

``al.labeling=external`` always writes the manifest (``external``); :func:`export_tools`
adds, per ``annotation.tools``, ``<prefix>/label_studio/`` and ``<prefix>/cvat/``.
:func:`import_answers` reads a folder of ``<id>.png`` (``png``), a Label Studio JSON export
(``label_studio``) or a CVAT export (``cvat``), telling them apart by name with ``auto``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from segrl.config import AnnotationConfig
from segrl.data.labels import IGNORE_INDEX, DataError
from segrl.labeling.cvat import export_cvat, import_cvat
from segrl.labeling.external import import_labels
from segrl.labeling.label_studio import export_label_studio, import_label_studio
from segrl.labeling.oracle import join_key
from segrl.labeling.urls import image_url_maker

IMPORT_FORMATS = ("auto", "png", "label_studio", "cvat")


def export_tools(
    selection: pa.Table,
    store: Any,
    prefix: str,
    class_names: list[str],
    cfg: AnnotationConfig,
    endpoint_url: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Write each tool of ``cfg.tools`` its import files under ``<prefix>/<tool>/``; tool -> keys."""
    written: dict[str, dict[str, Any]] = {}
    if "label_studio" in cfg.tools:
        url = image_url_maker(cfg.image_urls, cfg.url_root, cfg.url_prefix, cfg.presign_seconds,
                              endpoint_url)
        written["label_studio"] = export_label_studio(
            selection, store, join_key(prefix, "label_studio"), class_names, url
        )
    if "cvat" in cfg.tools:
        written["cvat"] = export_cvat(selection, store, join_key(prefix, "cvat"), class_names)
    return written


def detect_format(source: str) -> str:
    """``label_studio`` for a .json file, ``cvat`` for .xml, .zip or a folder with labelmap.txt,
    else ``png`` (a folder of ``<id>.png``)."""
    name = source.rstrip("/").lower()
    if name.endswith(".json"):
        return "label_studio"
    if name.endswith((".xml", ".zip")):
        return "cvat"
    if "://" not in source and (Path(source) / "labelmap.txt").is_file():
        return "cvat"
    return "png"


def import_answers(
    selection: pa.Table,
    source: str,
    store: Any,
    labels_prefix: str,
    num_classes: int,
    class_names: list[str] | None = None,
    fmt: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Import a round's answers from ``source`` in format ``fmt`` (:data:`IMPORT_FORMATS`).

    PNG answers hold class ids (``num_classes``); the tools' exports hold class names,
    which ``class_names`` (in id order) maps back to ids. Returns the import summary.
    """
    if fmt not in IMPORT_FORMATS:
        raise DataError(f"label format {fmt!r} is not one of {list(IMPORT_FORMATS)}")
    fmt = detect_format(source) if fmt == "auto" else fmt
    if fmt == "png":
        return import_labels(selection, source, store, labels_prefix, num_classes, ignore_index,
                             endpoint_url)
    if not class_names or len(class_names) != num_classes:
        raise DataError(f"importing {fmt} labels needs the run's {num_classes} class names, "
                        f"got {class_names!r}")
    read = import_label_studio if fmt == "label_studio" else import_cvat
    return read(selection, source, store, labels_prefix, class_names, ignore_index, endpoint_url)
