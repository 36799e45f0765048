"""Label Studio round trip: a round's selection as tasks, Label Studio's JSON export as labels.

:func:`export_label_studio` writes, under ``<prefix>/``::

    tasks.json     one task per image: the image URL, segrl's id and size, and a
                   pre-annotation ("prediction") that shows what to label: the request
                   as a brush (control ``request``) and requested points as keypoints
                   (control ``request_point``)
    config.xml     the labeling config: an <Image>, <BrushLabels name="label"> and
                   <KeyPointLabels name="point"> with the dataset's class names

Annotators paint classes with the ``label`` brush and put ``point`` keypoints on the
requested points. :func:`import_label_studio` reads Label Studio's JSON export (the
"JSON" export type), decodes brushes with the Label Studio SDK's own RLE converter
(``label_studio_sdk.converter.brush``), maps keypoints to pixels, and hands the label
maps to :func:`~segrl.labeling.answers.store_answers`: only requested pixels are kept,
and any problem rejects the whole import.

The SDK is imported on first use: its import pulls pandas, pydantic, httpx and OpenCV,
seconds that a loop which never talks to Label Studio should not pay.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa

from segrl.data.labels import IGNORE_INDEX
from segrl.labeling.answers import (
    LabelImportError,
    begin_tool_import,
    class_index,
    missing_answers,
    store_answers,
)
from segrl.labeling.oracle import join_key, requested_mask, rows_by_image, store_mask_reader
from segrl.storage import StoreError, read_uri_bytes

IMAGE = "image"  # the <Image> tag's name; also the task data key of the image URL
LABEL, POINT = "label", "point"  # the controls annotators answer with
REQUEST, REQUEST_POINT = "request", "request_point"  # the controls that show the request
REQUEST_VALUE = "requested"
REQUEST_COLOR = "#ffd400"
POINT_SNAP_PX = 3  # a keypoint this close (in pixels) to a requested point answers that point
MODEL_VERSION = "segrl-request"
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939",
)  # fmt: skip

ImageUrl = Callable[[str], str]


def _brush() -> Any:
    """The SDK's brush RLE converter, imported on use (see the module docstring)."""
    from label_studio_sdk.converter import brush

    return brush


# --------------------------------------------------------------------------- pure parts


def labeling_config(class_names: list[str]) -> str:
    """The Label Studio labeling config (XML) of a segrl request, classes in id order."""
    def labels(tag: str, name: str) -> str:
        items = "\n".join(
            f'    <Label value="{_xml_attr(c)}" background="{_PALETTE[i % len(_PALETTE)]}"/>'
            for i, c in enumerate(class_names)
        )
        return f'  <{tag} name="{name}" toName="{IMAGE}">\n{items}\n  </{tag}>'

    request = f'<Label value="{REQUEST_VALUE}" background="{REQUEST_COLOR}"/>'
    return "\n".join(
        [
            "<View>",
            '  <Header value="Label the yellow request: paint it with a class, or put a class point '
            'on each yellow point. Labels outside it are ignored."/>',
            f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true"/>',
            labels("BrushLabels", LABEL),
            labels("KeyPointLabels", POINT),
            f'  <BrushLabels name="{REQUEST}" toName="{IMAGE}">{request}</BrushLabels>',
            f'  <KeyPointLabels name="{REQUEST_POINT}" toName="{IMAGE}">{request}</KeyPointLabels>',
            "</View>",
            "",
        ]
    )


def _xml_attr(text: str) -> str:
    return escape(text, {'"': "&quot;"})


def keypoint_value(y: int, x: int, height: int, width: int) -> dict[str, float]:
    """Label Studio's keypoint position (percent of the image) of pixel [y, x]'s centre."""
    return {"x": (x + 0.5) * 100.0 / width, "y": (y + 0.5) * 100.0 / height, "width": 0.6}


def keypoint_pixel(value: dict[str, Any], height: int, width: int) -> tuple[int, int]:
    """The pixel [y, x] a Label Studio keypoint (percent coordinates) falls on."""
    x = min(max(int(float(value["x"]) * width / 100.0), 0), width - 1)
    y = min(max(int(float(value["y"]) * height / 100.0), 0), height - 1)
    return y, x


def snap_point(
    pixel: tuple[int, int], requested_points: list[tuple[int, int]], radius: int = POINT_SNAP_PX
) -> tuple[int, int]:
    """``pixel``, moved to the nearest requested point within ``radius`` (Chebyshev) if any.

    A click lands near, rarely exactly on, the one pixel it was asked for.
    """
    near = [
        (max(abs(p[0] - pixel[0]), abs(p[1] - pixel[1])), p)
        for p in requested_points
        if max(abs(p[0] - pixel[0]), abs(p[1] - pixel[1])) <= radius
    ]
    return min(near)[1] if near else pixel


def request_results(
    rows: list[dict[str, Any]], area: np.ndarray | None, brush: Any
) -> list[dict[str, Any]]:
    """Pre-annotation results of one image: HxW bool ``area`` as one brush, points as keypoints.

    ``area`` is the request of the image's region/mask rows (None when it has only
    points): a one-pixel brush dot would be invisible, so points are keypoints.
    """
    height, width = rows[0]["height"], rows[0]["width"]
    common = {"to_name": IMAGE, "original_width": width, "original_height": height,
              "image_rotation": 0, "readonly": True}
    results = []
    if area is not None and area.any():
        rle = brush.mask2rle(area.astype(np.uint8) * 255)
        results.append({**common, "id": "request", "from_name": REQUEST, "type": "brushlabels",
                        "value": {"format": "rle", "rle": rle, "brushlabels": [REQUEST_VALUE]}})
    points = [p for r in rows if r["unit"] == "points" for p in r["points"]]
    for k, (y, x) in enumerate(points):
        results.append({**common, "id": f"request-point-{k}", "from_name": REQUEST_POINT,
                        "type": "keypointlabels",
                        "value": {**keypoint_value(y, x, height, width), "keypointlabels": [REQUEST_VALUE]}})
    return results


def answer_label(
    results: list[dict[str, Any]],
    height: int,
    width: int,
    classes: dict[str, int],
    requested_points: list[tuple[int, int]],
    brush: Any,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, list[str]]:
    """(HxW uint8 label, problems) from one Label Studio annotation's ``results``.

    Brushes of control ``label`` are decoded with the SDK (later strokes over earlier
    ones, as Label Studio draws them); keypoints of control ``point`` become one pixel,
    snapped to a requested point nearby (:func:`snap_point`). The request's own
    controls are skipped. Problems: a size other than HxW, a class name not in
    ``classes``, a brush that is not RLE.
    """
    label = np.full((height, width), ignore_index, np.uint8)
    problems: list[str] = []
    for result in results:
        if result.get("from_name") not in (LABEL, POINT):
            continue
        size = (result.get("original_height"), result.get("original_width"))
        if size != (height, width):
            problems.append(f"result {result.get('id')!r} is {size[1]}x{size[0]} (WxH), expected "
                            f"{width}x{height} (WxH)")
            continue
        value = result.get("value", {})
        names = value.get("brushlabels" if result["from_name"] == LABEL else "keypointlabels") or []
        unknown = [n for n in names if n not in classes]
        if len(names) != 1 or unknown:
            problems.append(f"result {result.get('id')!r} has label(s) {names}: need one of "
                            f"{sorted(classes, key=classes.get)}")
            continue
        try:
            _paint(label, result["from_name"], value, classes[names[0]], requested_points, brush)
        except (KeyError, TypeError, ValueError, IndexError) as exc:  # a hand-edited or cut export
            problems.append(f"result {result.get('id')!r} cannot be read: {exc!r}")
    return label, problems


def _paint(label: np.ndarray, control: str, value: dict[str, Any], class_id: int,
           requested_points: list[tuple[int, int]], brush: Any) -> None:
    """Write one brush or keypoint result's class into HxW ``label`` (in place)."""
    height, width = label.shape
    if control == POINT:
        label[snap_point(keypoint_pixel(value, height, width), requested_points)] = class_id
        return
    if value.get("format") != "rle" or not value.get("rle"):
        raise ValueError("the brush is not in RLE format")
    decoded = np.asarray(brush.decode_rle(value["rle"]))
    if decoded.size != height * width * 4:
        raise ValueError(f"its RLE holds {decoded.size} values, not {height}x{width}x4")
    label[decoded.reshape(height, width, 4)[:, :, 3] > 0] = class_id


def latest_annotation(task: dict[str, Any]) -> dict[str, Any] | None:
    """The task's last submitted annotation (highest id), skipped (cancelled) ones left out."""
    done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    return max(done, key=lambda a: a.get("id") or 0) if done else None


# --------------------------------------------------------------------------- export


def export_label_studio(
    selection: pa.Table,
    store: Any,
    prefix: str,
    class_names: list[str],
    image_url: ImageUrl,
) -> dict[str, Any]:
    """Write ``tasks.json`` and ``config.xml`` of ``selection`` for Label Studio under ``<prefix>/``.

    ``image_url(uri)`` gives the URL Label Studio loads each image from (see
    :func:`segrl.labeling.urls.image_url_maker`). Everything is computed before the
    first write. Returns counts and the keys written.
    """
    class_index(class_names)
    brush = _brush()
    read_mask = store_mask_reader(store)
    tasks = []
    for image_id, rows in rows_by_image(selection).items():
        requested = requested_mask(rows, read_mask)
        area_rows = [r for r in rows if r["unit"] != "points"]
        area = requested_mask(area_rows, read_mask) if area_rows else None
        data = {IMAGE: image_url(rows[0]["uri"]), "segrl_id": image_id, "height": rows[0]["height"],
                "width": rows[0]["width"], "requested_pixels": int(requested.sum())}
        prediction = {"model_version": MODEL_VERSION, "score": 1.0,
                      "result": request_results(rows, area, brush)}
        tasks.append({"data": data, "predictions": [prediction]})
    keys = {"tasks": join_key(prefix, "tasks.json"), "config": join_key(prefix, "config.xml")}
    store.write_text(keys["config"], labeling_config(class_names))
    store.write_json(keys["tasks"], tasks)
    return {"images": len(tasks), **keys}


# --------------------------------------------------------------------------- import


def import_label_studio(
    selection: pa.Table,
    export_uri: str,
    store: Any,
    labels_prefix: str,
    class_names: list[str],
    ignore_index: int = IGNORE_INDEX,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Import Label Studio's JSON export at ``export_uri`` (local or s3://) for ``selection``.

    Tasks are matched by ``data.segrl_id``. Rejected whole (:class:`LabelImportError`,
    nothing written) when the file is not a JSON list of tasks, a task names an image
    not selected or repeats one, a selected image has no task or no submitted
    annotation, a result has the wrong size or an unknown class; then as in
    :func:`~segrl.labeling.answers.store_answers`. Returns the import summary.
    """
    groups, classes = begin_tool_import(selection, store, labels_prefix, class_names, ignore_index)
    tasks = _read_tasks(export_uri, endpoint_url)
    brush = _brush()
    labels: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    problems: list[str] = []
    for position, task in enumerate(tasks):
        where = f"task {task.get('id', position)!r}"
        data = task.get("data")
        image_id = data.get("segrl_id") if isinstance(data, dict) else None
        if image_id not in groups:
            problems.append(f"{where}: segrl_id {image_id!r} was not selected this round")
            continue
        if image_id in seen:
            problems.append(f"{where}: a second task for image {image_id!r}")
            continue
        seen.add(image_id)
        annotation = latest_annotation(task)
        if annotation is None:
            continue  # reported below as missing
        rows = groups[image_id]
        points = [tuple(p) for r in rows if r["unit"] == "points" for p in r["points"]]
        label, found = answer_label(annotation.get("result") or [], rows[0]["height"],
                                    rows[0]["width"], classes, points, brush, ignore_index)
        problems += [f"{where} (image {image_id!r}): {p}" for p in found]
        labels[image_id] = label
    problems += missing_answers(labels, groups, "a submitted annotation")
    return store_answers(groups, labels, problems, export_uri, store, labels_prefix,
                         len(class_names), ignore_index, extra={"tasks": len(tasks)})


def _read_tasks(uri: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    try:
        tasks = json.loads(read_uri_bytes(uri, endpoint_url))
    except (StoreError, OSError) as exc:
        raise LabelImportError(f"cannot read the Label Studio export {uri}: {exc}") from exc
    except ValueError as exc:
        raise LabelImportError(f"Label Studio export {uri} is not JSON: {exc}") from exc
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise LabelImportError(
            f"Label Studio export {uri} must be a JSON list of tasks (export type JSON)"
        )
    return tasks
