"""People's answers, from any tool, checked and stored the same way.

Every import (PNG folder, Label Studio export, CVAT export) first turns its files into
one HxW uint8 label map per image id (class ids, ``ignore_index`` where nothing was
labeled) plus a list of problems found on the way. :func:`store_answers` then applies
the checks every source shares (an answer for every selected image, the right size,
known class ids, at least one requested pixel labeled), keeps only the requested
pixels, and writes the sparse label maps and, last, the ``_IMPORTED.json`` marker. Any
problem rejects the whole import and nothing is written.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from segrl.data.labels import IGNORE_INDEX, DataError
from segrl.labeling.oracle import (
    encode_label_png,
    join_key,
    label_key,
    labeled_pixel_count,
    requested_mask,
    rows_by_image,
    sparse_label,
    store_mask_reader,
)

MARKER_NAME = "_IMPORTED.json"
_MAX_LISTED_PROBLEMS = 50  # enough to fix a batch; more would bury the first ones


class LabelImportError(DataError):
    """Imported labels were rejected; the message lists every problem found. Nothing was written."""


def check_class_range(num_classes: int, ignore_index: int) -> None:
    if not 0 <= ignore_index <= 255:
        raise DataError(f"ignore_index {ignore_index} does not fit a uint8 label map")
    if num_classes < 1 or ignore_index < num_classes:  # the ignore value must not be a class id
        raise DataError(
            f"num_classes {num_classes} must be >= 1 and leave the ignore index {ignore_index} free"
        )


def refuse_reimport(store: Any, labels_prefix: str) -> None:
    """Raise :class:`LabelImportError` when this round's labels were already imported."""
    marker = join_key(labels_prefix, MARKER_NAME)
    if store.exists(marker):
        raise LabelImportError(
            f"labels for this round were already imported (marker {store.uri(marker)}); "
            "delete the labels folder to import again"
        )


def label_problem(
    label: np.ndarray, row: dict[str, Any], num_classes: int, ignore_index: int, where: str
) -> str | None:
    """Why HxW ``label`` cannot answer the image of selection ``row``, or None if it can.

    ``where`` names the file (or task) the label came from, for the message.
    """
    height, width = row["height"], row["width"]
    if label.shape != (height, width):
        return (
            f"{where}: size is {label.shape[1]}x{label.shape[0]} (WxH), expected "
            f"{width}x{height} (WxH) for image {row['id']!r}"
        )
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if bad.size:
        return (
            f"{where}: class id(s) {bad.tolist()} outside 0..{num_classes - 1} "
            f"({ignore_index} = unlabeled)"
        )
    return None


def dropped_pixels(
    label: np.ndarray, requested: np.ndarray, ignore_index: int = IGNORE_INDEX
) -> int:
    """Pixels of HxW ``label`` that hold a class but lie outside HxW bool ``requested``.

    They are not taken: a label counts only where it was asked for (and paid for).
    """
    return int(np.count_nonzero((np.asarray(label) != ignore_index) & ~np.asarray(requested, bool)))


def missing_answers(answered: Any, groups: dict[str, Any], what: str) -> list[str]:
    """One problem per selected id that ``answered`` (a container of ids) lacks.

    ``what`` names the missing answer, with ``{id}`` for the id: "{id}.png", "a task".
    """
    return [
        f"missing {what.format(id=i)} for selected image id {i!r}" for i in groups if i not in answered
    ]


def store_answers(
    groups: dict[str, list[dict[str, Any]]],
    labels: dict[str, np.ndarray],
    problems: list[str],
    source: str,
    store: Any,
    labels_prefix: str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    extra: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Check ``labels`` (id -> HxW uint8) against the selection ``groups``; write them all or none.

    ``groups`` is :func:`~segrl.labeling.oracle.rows_by_image` of the selection and
    ``problems`` what the reader of ``source`` already found (ids outside the selection,
    unreadable files, unknown class names); ``origins`` (id -> file or task) names where
    each label came from in messages (default: ``source [id]``). Each label is checked with
    :func:`label_problem`, then cut to its requested pixels. Raises
    :class:`LabelImportError` listing every problem, or when no requested pixel is
    labeled at all, and then writes nothing. Otherwise writes ``<labels_prefix>/<id>.png``
    per image and the marker last, and returns the marker's content: counts (labeled,
    requested and dropped pixels, clicks charged), per-image dropped pixels, source, time.
    """
    check_class_range(num_classes, ignore_index)
    refuse_reimport(store, labels_prefix)
    problems = list(problems)
    read_mask = store_mask_reader(store)
    pngs: dict[str, bytes] = {}
    per_image: dict[str, int] = {}
    dropped: dict[str, int] = {}
    requested_total = clicks = 0
    for image_id, rows in groups.items():
        if image_id not in labels:
            continue
        label = np.asarray(labels[image_id])
        where = (origins or {}).get(image_id, f"{source} [{image_id}]")
        problem = label_problem(label, rows[0], num_classes, ignore_index, where)
        if problem:
            problems.append(problem)
            continue
        requested = requested_mask(rows, read_mask)
        sparse = sparse_label(label, requested, ignore_index)
        pngs[label_key(labels_prefix, image_id)] = encode_label_png(sparse)
        per_image[image_id] = labeled_pixel_count(sparse, ignore_index)
        dropped[image_id] = dropped_pixels(label, requested, ignore_index)
        requested_total += int(requested.sum())
        clicks += sum(int(r["cost_clicks"]) for r in rows)  # a point is charged as a click
    if problems:
        raise LabelImportError(problem_report(source, problems))
    labeled_total = sum(per_image.values())
    if labeled_total == 0:
        raise LabelImportError(
            f"cannot import labels from {source}: all {requested_total} requested "
            f"pixels are unlabeled ({ignore_index}); nothing was written"
        )
    summary = {
        "images": len(pngs),
        "labeled_pixels": labeled_total,
        "requested_pixels": requested_total,
        "dropped_pixels": sum(dropped.values()),
        "clicks": clicks,
        "dropped_pixels_per_image": dropped,
        "unlabeled_images": sorted(i for i, n in per_image.items() if n == 0),
        **(extra or {}),
        "source": source,
        "labels": store.uri(labels_prefix),
        "num_classes": num_classes,
        "ignore_index": ignore_index,
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, png in pngs.items():
        store.write_bytes(key, png)
    store.write_json(join_key(labels_prefix, MARKER_NAME), summary)  # last: the whole import landed
    return summary


def problem_report(source: str, problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED_PROBLEMS]
    lines = [f"cannot import labels from {source}: {len(problems)} problem(s); nothing was written"]
    lines += [f"  - {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


def begin_tool_import(
    selection: Any, store: Any, labels_prefix: str, class_names: list[str], ignore_index: int
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """(rows by image id, class name -> id) for an annotation tool's import, after the checks
    every import starts with: a usable class list, and no earlier import of this round."""
    check_class_range(len(class_names), ignore_index)
    refuse_reimport(store, labels_prefix)
    return rows_by_image(selection), class_index(class_names)


def class_index(class_names: list[str]) -> dict[str, int]:
    """Label name -> class id; raises ``DataError`` on an empty or repeated class list."""
    if not class_names:
        raise DataError("importing from an annotation tool needs the dataset's class names")
    if len(set(class_names)) != len(class_names):
        raise DataError(f"class names repeat: {class_names}")
    return {name: i for i, name in enumerate(class_names)}
