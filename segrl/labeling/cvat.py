"""CVAT round trip: a round's selection as a CVAT task, CVAT's exports as labels.

:func:`export_cvat` writes, under ``<prefix>/``::

    annotations.xml   "CVAT for images 1.1": the task's labels (the dataset's classes and
                      "requested") and, per image, the request: ``<box>`` for regions,
                      ``<mask>`` for segment masks, ``<points>`` for clicks
    images.txt        the images of the task, one URI per line (upload them, then upload
                      annotations.xml as "CVAT for images 1.1" to show the request)

:func:`import_cvat` reads either CVAT export: "CVAT for images 1.1" (``annotations.xml``
or its zip; polygons, boxes, masks and points with class labels) or "Segmentation mask
1.1" (a zip or folder with ``labelmap.txt`` and ``SegmentationClass/<name>.png``).
Images are matched by file name without extension, as CVAT names them. Shapes labeled
"requested" are the request itself and are skipped.

Both formats are read and written here with the standard library and Pillow, following
CVAT's documented layouts: datumaro, the library that CVAT converts with, pins pyarrow
~= 25 and Pillow ~= 12 (against Label Studio's pyarrow < 25 in the dev environment) and
brings OpenCV, pandas, shapely and pycocotools, out of proportion to two small formats.
"""

from __future__ import annotations

import io
import posixpath
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from segrl.data.labels import IGNORE_INDEX, DataError
from segrl.labeling.answers import (
    LabelImportError,
    begin_tool_import,
    class_index,
    missing_answers,
    store_answers,
)
from segrl.labeling.label_studio import POINT_SNAP_PX, REQUEST_COLOR, REQUEST_VALUE, snap_point
from segrl.labeling.oracle import join_key, rows_by_image, store_mask_reader
from segrl.storage import StoreError, read_uri_bytes

BACKGROUND = "background"  # CVAT's label of unpainted pixels in segmentation masks
SHAPES = ("box", "polygon", "mask", "points")


# --------------------------------------------------------------------------- pure parts


def mask_rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """CVAT's ``<mask>`` attributes of HxW bool ``mask`` (non-empty).

    ``left, top, width, height`` is the mask's bounding box; ``rle`` the run lengths
    inside it, row by row, alternating unset and set, starting with unset.
    """
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise DataError("an empty mask has no CVAT encoding")
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    flat = np.asarray(mask[top:bottom, left:right], bool).ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"rle": ", ".join(map(str, runs)), "left": left, "top": top,
            "width": right - left, "height": bottom - top}


def mask_rle_decode(rle: str, left: int, top: int, width: int, height: int,
                    image_hw: tuple[int, int]) -> np.ndarray:
    """HxW bool of a CVAT ``<mask>`` (see :func:`mask_rle_encode`) in an image of ``image_hw``."""
    runs = [int(v) for v in rle.replace(" ", "").split(",") if v]
    if sum(runs) != width * height or any(r < 0 for r in runs):
        raise DataError(f"mask rle covers {sum(runs)} pixels, its box {width}x{height} has {width * height}")
    if left < 0 or top < 0 or left + width > image_hw[1] or top + height > image_hw[0]:
        raise DataError(f"mask box {left},{top} {width}x{height} lies outside the image")
    values = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    out = np.zeros(image_hw, bool)
    out[top : top + height, left : left + width] = values.reshape(height, width)
    return out


def parse_points(text: str) -> list[tuple[float, float]]:
    """CVAT's ``points`` attribute "x1,y1;x2,y2" as [(x, y)]."""
    pairs = [p.split(",") for p in text.strip().split(";") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"points {text!r} are not 'x,y;x,y'")
    return [(float(x), float(y)) for x, y in pairs]


def shape_label(
    shape: ET.Element, label: np.ndarray, class_id: int, requested_points: list[tuple[int, int]]
) -> None:
    """Paint one CVAT shape element with ``class_id`` into HxW uint8 ``label`` (in place)."""
    height, width = label.shape
    kind = shape.tag
    if kind == "box":
        y0, y1 = (int(round(float(shape.get(k)))) for k in ("ytl", "ybr"))
        x0, x1 = (int(round(float(shape.get(k)))) for k in ("xtl", "xbr"))
        label[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = class_id
    elif kind == "polygon":
        canvas = Image.fromarray(np.zeros((height, width), np.uint8))
        ImageDraw.Draw(canvas).polygon(parse_points(shape.get("points", "")), fill=1)
        label[np.asarray(canvas) > 0] = class_id
    elif kind == "mask":
        box = [int(float(shape.get(k))) for k in ("left", "top", "width", "height")]
        label[mask_rle_decode(shape.get("rle", ""), *box, image_hw=(height, width))] = class_id
    else:  # points
        for x, y in parse_points(shape.get("points", "")):
            pixel = (min(max(int(y), 0), height - 1), min(max(int(x), 0), width - 1))
            label[snap_point(pixel, requested_points, POINT_SNAP_PX)] = class_id


def image_name_index(groups: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """File name without extension (as CVAT names frames) -> image id; raises on a clash."""
    names: dict[str, str] = {}
    for image_id, rows in groups.items():
        stem = posixpath.splitext(posixpath.basename(rows[0]["uri"]))[0]
        if stem in names:
            raise DataError(f"images {names[stem]!r} and {image_id!r} share the file name {stem!r}: "
                            "CVAT could not tell them apart")
        names[stem] = image_id
    return names


def _stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{v:02x}" for v in rgb)


def _color(i: int) -> tuple[int, int, int]:
    """A distinct colour per class (CVAT needs one per label)."""
    return ((i * 67 + 50) % 256, (i * 137 + 90) % 256, (i * 199 + 30) % 256)


# --------------------------------------------------------------------------- export


def export_cvat(selection: pa.Table, store: Any, prefix: str, class_names: list[str]) -> dict[str, Any]:
    """Write ``annotations.xml`` (CVAT for images 1.1) and ``images.txt`` under ``<prefix>/``."""
    class_index(class_names)
    groups = rows_by_image(selection)
    names = image_name_index(groups)
    read_mask = store_mask_reader(store)
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    task = ET.SubElement(ET.SubElement(root, "meta"), "task")
    ET.SubElement(task, "name").text = prefix or "segrl request"
    ET.SubElement(task, "size").text = str(len(groups))
    ET.SubElement(task, "mode").text = "annotation"
    labels = ET.SubElement(task, "labels")
    for i, name in enumerate([*class_names, REQUEST_VALUE]):
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = name
        ET.SubElement(label, "color").text = REQUEST_COLOR if name == REQUEST_VALUE else _hex(_color(i))
        ET.SubElement(label, "type").text = "any"
        ET.SubElement(label, "attributes")
    uris = []
    for frame, stem in enumerate(sorted(names)):  # CVAT numbers frames in name order
        rows = groups[names[stem]]
        first = rows[0]
        uris.append(first["uri"])
        image = ET.SubElement(root, "image", id=str(frame), name=posixpath.basename(first["uri"]),
                              width=str(first["width"]), height=str(first["height"]))
        for row in rows:
            _request_shape(image, row, read_mask)
    ET.indent(root)
    keys = {"annotations": join_key(prefix, "annotations.xml"), "images": join_key(prefix, "images.txt")}
    xml = ET.tostring(root, encoding="unicode", xml_declaration=True)
    store.write_text(keys["images"], "".join(f"{u}\n" for u in uris))
    store.write_text(keys["annotations"], xml + "\n")
    return {"images": len(uris), **keys}


def _request_shape(image: ET.Element, row: dict[str, Any], read_mask: Any) -> None:
    common = {"label": REQUEST_VALUE, "source": "segrl", "occluded": "0", "z_order": "0"}
    if row["unit"] in ("image", "region"):
        ET.SubElement(image, "box", **common, xtl=f"{row['x0']:.2f}", ytl=f"{row['y0']:.2f}",
                      xbr=f"{row['x1']:.2f}", ybr=f"{row['y1']:.2f}")
    elif row["unit"] == "pixels":
        mask = np.asarray(read_mask(row["mask_key"])) != 0
        ET.SubElement(image, "mask", **common, **{k: str(v) for k, v in mask_rle_encode(mask).items()})
    else:
        points = ";".join(f"{x + 0.5:.2f},{y + 0.5:.2f}" for y, x in row["points"])
        ET.SubElement(image, "points", **common, points=points)


# --------------------------------------------------------------------------- import


def import_cvat(
    selection: pa.Table,
    source: str,
    store: Any,
    labels_prefix: str,
    class_names: list[str],
    ignore_index: int = IGNORE_INDEX,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Import a CVAT export at ``source`` for ``selection``; all or nothing.

    ``source``: ``annotations.xml`` or a zip holding it (CVAT for images 1.1), or a zip
    or local folder with ``labelmap.txt`` (Segmentation mask 1.1). Rejected whole
    (:class:`LabelImportError`) for an image not selected, a selected image missing,
    a label or colour that is no class, a wrong size; then as
    :func:`~segrl.labeling.answers.store_answers`. Returns the import summary.
    """
    groups, classes = begin_tool_import(selection, store, labels_prefix, class_names, ignore_index)
    names = image_name_index(groups)
    files = _read_files(source, endpoint_url)
    if "labelmap.txt" in files:
        answers, problems, kind = _segmentation_masks(files, classes, ignore_index), [], "Segmentation mask 1.1"
    elif "annotations.xml" in files:
        answers, problems, kind = _cvat_images(files["annotations.xml"], groups, names, classes, ignore_index), [], "CVAT for images 1.1"
    else:
        raise LabelImportError(f"{source} holds neither annotations.xml (CVAT for images 1.1) "
                               "nor labelmap.txt (Segmentation mask 1.1)")
    labels: dict[str, np.ndarray] = {}
    for name, (label, found) in answers.items():
        if name not in names:
            problems.append(f"{source} [{name}]: no image named {name!r} was selected this round")
            continue
        labels[names[name]] = label
        problems += [f"{source} [{name}]: {p}" for p in found]
    problems += missing_answers(labels, groups, "a CVAT image")
    return store_answers(groups, labels, problems, source, store, labels_prefix, len(class_names),
                         ignore_index, extra={"format": kind})


def _read_files(source: str, endpoint_url: str | None) -> dict[str, bytes]:
    """Relative name -> bytes of an XML file, a zip's members or a local folder's files."""
    path = Path(source)
    if "://" not in source and path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    try:
        data = read_uri_bytes(source, endpoint_url)
    except (StoreError, OSError) as exc:
        raise LabelImportError(f"cannot read the CVAT export {source}: {exc}") from exc
    if source.endswith(".xml"):
        return {"annotations.xml": data}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {n: archive.read(n) for n in archive.namelist() if not n.endswith("/")}
    except zipfile.BadZipFile as exc:
        raise LabelImportError(f"CVAT export {source} is neither an .xml file nor a zip") from exc


def _cvat_images(
    xml: bytes, groups: dict[str, Any], names: dict[str, str], classes: dict[str, int], ignore_index: int
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Frame name -> (HxW label, problems) of a "CVAT for images 1.1" annotations.xml."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelImportError(f"annotations.xml is not valid XML: {exc}") from exc
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for image in root.iter("image"):
        name = _stem(image.get("name", ""))
        try:
            height, width = int(image.get("height", "")), int(image.get("width", ""))
        except ValueError:
            raise LabelImportError(f"annotations.xml: <image name={image.get('name')!r}> lacks an "
                                   "integer width and height") from None
        label = np.full((height, width), ignore_index, np.uint8)
        problems: list[str] = []
        rows = groups.get(names.get(name), [])
        points = [tuple(p) for r in rows if r["unit"] == "points" for p in r["points"]]
        shapes = sorted((s for s in image if s.tag in SHAPES), key=lambda s: int(s.get("z_order", 0)))
        for shape in shapes:  # higher z_order drawn later, on top
            name_of = shape.get("label")
            if name_of in (REQUEST_VALUE, BACKGROUND):
                continue
            if name_of not in classes:
                problems.append(f"{shape.tag} label {name_of!r} is not one of {sorted(classes, key=classes.get)}")
                continue
            try:
                shape_label(shape, label, classes[name_of], points)
            except (DataError, TypeError, ValueError) as exc:
                problems.append(f"{shape.tag} of label {name_of!r}: {exc}")
        out[name] = (label, problems)
    return out


def _segmentation_masks(
    files: dict[str, bytes], classes: dict[str, int], ignore_index: int
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Frame name -> (HxW label, problems) of a "Segmentation mask 1.1" export."""
    colors = _labelmap(files["labelmap.txt"].decode("utf-8", errors="replace"))
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for member, data in files.items():
        if not (member.startswith("SegmentationClass/") and member.endswith(".png")):
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise LabelImportError(f"{member} is not a readable PNG: {exc}") from exc
        label = np.full(rgb.shape[:2], ignore_index, np.uint8)
        problems = []
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        for value in np.unique(packed):
            color = (int(value) >> 16, (int(value) >> 8) & 255, int(value) & 255)
            name = colors.get(color)
            if name in (BACKGROUND, REQUEST_VALUE):
                continue
            if name not in classes:
                problems.append(f"colour {color} is label {name!r}, not one of {sorted(classes, key=classes.get)}")
                continue
            label[packed == value] = classes[name]
        out[_stem(member)] = (label, problems)
    return out


def _labelmap(text: str) -> dict[tuple[int, int, int], str]:
    """RGB colour -> label name of CVAT's ``labelmap.txt`` ("name:r,g,b:parts:actions" lines)."""
    colors = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(":")
        try:
            rgb = tuple(int(v) for v in fields[1].split(","))
        except (IndexError, ValueError):
            rgb = ()
        if len(rgb) != 3:
            raise LabelImportError(f"labelmap.txt line {number} {line!r} is not 'name:r,g,b::'")
        colors[rgb] = fields[0]
    return colors
