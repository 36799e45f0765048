"""Labeling by people: export a round's selection as a manifest, import their answers.

:func:`export_manifest` writes, under ``<prefix>/`` in the store::

    manifest.csv      one row per image (boxes and points as JSON text)
    manifest.json     the same entries plus the answer format
    masks/<id>.png    uint8 HxW, 255 = label this pixel, 0 = not needed
    README.md         instructions for annotators

Annotators answer with one single-channel PNG per image, ``<id>.png``, at the
image's original size, holding class ids ``0..C-1`` and 255 where unlabeled.

:func:`import_labels` reads those PNGs from a local folder or an ``s3://`` prefix,
checks every one of them before writing anything, and then writes the sparse label
maps (only the requested pixels kept) and, last, the ``_IMPORTED.json`` marker that
makes the import happen once per round.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from segrl.data.labels import IGNORE_INDEX, DataError, decode_label
from segrl.labeling.answers import (
    LabelImportError,
    check_class_range,
    missing_answers,
    refuse_reimport,
    store_answers,
)
from segrl.labeling.oracle import (
    encode_label_png,
    join_key,
    requested_mask,
    rows_by_image,
    store_mask_reader,
)
from segrl.storage import StoreError, filesystem_for, read_uri_bytes

MASK_LABEL = 255  # value in an exported request mask meaning "label this pixel"
CSV_COLUMNS = (
    "id",
    "uri",
    "height",
    "width",
    "unit",
    "boxes",
    "points",
    "mask",
    "requested_pixels",
    "answer_file",
)

# --------------------------------------------------------------------------- export


def export_manifest(
    selection: pa.Table,
    store: Any,
    prefix: str,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Write the labeling manifest of ``selection`` for annotators under ``<prefix>/``.

    One entry per image: ``id, uri, height, width, unit`` (the rows' units joined by
    "+" when an image has several kinds), ``boxes`` ([y0, x0, y1, x1], end-exclusive,
    of its image/region rows), ``points`` ([y, x] of its point rows), ``mask`` (store
    key of the HxW uint8 request mask: 255 = label here, 0 = not needed; it is the
    union of everything asked and so the authority), ``requested_pixels`` and
    ``answer_file`` (``<id>.png``). ``class_names`` (optional) go into README and JSON.

    All masks are computed before the first write. Returns the counts and the keys written.
    """
    read_mask = store_mask_reader(store)
    entries: list[dict[str, Any]] = []
    mask_pngs: dict[str, bytes] = {}
    for image_id, rows in rows_by_image(selection).items():
        requested = requested_mask(rows, read_mask)
        entry = _manifest_entry(
            image_id, rows, requested, join_key(prefix, f"masks/{image_id}.png")
        )
        mask_pngs[entry["mask"]] = encode_label_png(requested.astype(np.uint8) * MASK_LABEL)
        entries.append(entry)
    for key, png in mask_pngs.items():
        store.write_bytes(key, png)
    keys = {
        "manifest_csv": join_key(prefix, "manifest.csv"),
        "manifest_json": join_key(prefix, "manifest.json"),
        "readme": join_key(prefix, "README.md"),
    }
    store.write_text(keys["manifest_csv"], _manifest_csv(entries))
    store.write_json(keys["manifest_json"], _manifest_json(entries, class_names))
    store.write_text(keys["readme"], _readme(len(entries), class_names))
    return {
        "images": len(entries),
        "requested_pixels": sum(e["requested_pixels"] for e in entries),
        "masks_prefix": join_key(prefix, "masks"),
        **keys,
    }


def _manifest_entry(
    image_id: str, rows: list[dict[str, Any]], requested: np.ndarray, mask_key: str
) -> dict[str, Any]:
    """One image's manifest entry (see :func:`export_manifest`)."""
    units = list(dict.fromkeys(r["unit"] for r in rows))  # first-appearance order, no repeats
    return {
        "id": image_id,
        "uri": rows[0]["uri"],
        "height": rows[0]["height"],
        "width": rows[0]["width"],
        "unit": "+".join(units),
        "boxes": [
            [r["y0"], r["x0"], r["y1"], r["x1"]] for r in rows if r["unit"] in ("image", "region")
        ],
        "points": [list(p) for r in rows if r["unit"] == "points" for p in r["points"]],
        "mask": mask_key,
        "requested_pixels": int(requested.sum()),
        "answer_file": f"{image_id}.png",
    }


def _manifest_csv(entries: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for entry in entries:
        # Lists do not fit a CSV cell: write them as JSON text, parseable from any language.
        writer.writerow(
            {**entry, "boxes": json.dumps(entry["boxes"]), "points": json.dumps(entry["points"])}
        )
    return out.getvalue()


def _manifest_json(entries: list[dict[str, Any]], class_names: list[str] | None) -> dict[str, Any]:
    return {
        "format_version": 1,
        "answer_format": {
            "file": "<id>.png, one per image",
            "mode": "single-channel 8-bit PNG, original image size",
            "values": "class ids 0..C-1; 255 = unlabeled",
            "outside_request": "ignored",
        },
        "ignore_index": IGNORE_INDEX,
        "classes": class_names,
        "images": entries,
    }


def _readme(n_images: int, class_names: list[str] | None) -> str:
    if class_names:
        classes = "\n".join(f"    {i}  {name}" for i, name in enumerate(class_names))
        class_text = f"Class ids (C = {len(class_names)}):\n\n{classes}\n"
    else:
        class_text = "Class ids are 0..C-1 as in the project's class list.\n"
    return f"""# Labeling request

{n_images} image(s) to label. `manifest.csv` and `manifest.json` list them: id, image
uri, size, and what to label (`boxes` as [y0, x0, y1, x1] end-exclusive, `points` as
[y, x], both in original pixels). `masks/<id>.png` marks every pixel to label with 255
(0 = not needed); it is the complete request.

## What to send back

- One PNG per image, named `<id>.png` (the id from the manifest), all in one folder.
- Single-channel (grayscale or palette) 8-bit PNG, the original image size (height x width
  as in the manifest; do not resize or crop).
- Each pixel holds its class id, 0..C-1. Use 255 for pixels you leave unlabeled.
- Label at least the pixels the mask marks; pixels outside the request are ignored.
- No PNG for ids outside the manifest; every id in the manifest needs its PNG.

{class_text}"""


# --------------------------------------------------------------------------- import


def import_labels(
    selection: pa.Table,
    source_dir_or_uri: str,
    store: Any,
    labels_prefix: str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Import annotators' ``<id>.png`` answers for ``selection`` into ``<labels_prefix>/``.

    ``source_dir_or_uri`` is a local folder or an ``s3://`` prefix (``endpoint_url``
    for S3-compatible servers); ids with "/" live in subfolders. Non-PNG and hidden
    files are skipped. Every answer is checked first: no PNG for an id outside the
    selection, a PNG for every selected id, HxW equal to the selection's size, values
    in ``0..num_classes-1`` or ``ignore_index``, and at least one requested pixel
    labeled overall. Any failure raises :class:`LabelImportError` listing every
    problem, and nothing is written. Otherwise each image's sparse label (uint8 HxW,
    requested pixels only) is written to ``<labels_prefix>/<id>.png``, then the marker
    ``<labels_prefix>/_IMPORTED.json`` last; a marker already there refuses the import
    (:func:`~segrl.labeling.answers.store_answers`).

    Returns the marker's content: counts, source, time, unlabeled and skipped files.
    """
    check_class_range(num_classes, ignore_index)
    refuse_reimport(store, labels_prefix)
    groups = rows_by_image(selection)
    answers, skipped = _list_answer_files(source_dir_or_uri, endpoint_url)
    problems = _unexpected_files(answers, groups) + missing_answers(answers, groups, "{id}.png")
    labels: dict[str, np.ndarray] = {}
    for image_id in groups:
        if image_id not in answers:
            continue
        try:
            labels[image_id] = decode_label(read_uri_bytes(answers[image_id], endpoint_url), answers[image_id])
        except (DataError, StoreError) as exc:
            problems.append(str(exc))
    return store_answers(
        groups, labels, problems, source_dir_or_uri, store, labels_prefix, num_classes, ignore_index,
        extra={"skipped_files": skipped}, origins=answers,
    )


def _list_answer_files(source: str, endpoint_url: str | None) -> tuple[dict[str, str], list[str]]:
    """(id -> URI of ``<id>.png`` under ``source``, skipped relative names).

    Hidden files (any part starting with ".", e.g. .DS_Store) and non-PNG files are skipped.
    """
    fs, root = filesystem_for(source, endpoint_url)
    root = root.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    try:
        infos = fs.get_file_info(selector)
    except NotADirectoryError as exc:
        raise LabelImportError(f"label source {source} is a file, not a folder") from exc
    except OSError as exc:
        raise StoreError(f"cannot list label files under {source}: {exc}") from exc
    if not infos:
        raise LabelImportError(f"label source {source} does not exist or holds no files")
    answers: dict[str, str] = {}
    skipped: list[str] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) + 1 :]
        if not _is_answer_name(relative):
            skipped.append(relative)
            continue
        uri = f"s3://{info.path}" if source.startswith("s3://") else info.path
        answers[relative[: -len(".png")]] = uri
    return answers, sorted(skipped)


def _is_answer_name(relative: str) -> bool:
    """Whether a file's path relative to the source names an answer ``<id>.png``."""
    hidden = any(part.startswith(".") for part in relative.split("/"))
    return relative.endswith(".png") and not hidden


def _unexpected_files(answers: dict[str, str], groups: dict[str, Any]) -> list[str]:
    return [
        f"{answers[i]}: no image with id {i!r} was selected this round"
        for i in sorted(answers)
        if i not in groups
    ]
