"""Label Studio tasks and exports on files: known answers, and bad exports rejected whole."""

from __future__ import annotations

import json
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from _rejects import assert_rejected_whole
from label_studio_sdk.converter import brush
from PIL import Image

from segrl.data.labels import DataError
from segrl.labeling import selection_table
from segrl.labeling.label_studio import (
    answer_label,
    export_label_studio,
    import_label_studio,
    keypoint_pixel,
    keypoint_value,
    labeling_config,
    latest_annotation,
    snap_point,
)
from segrl.labeling.urls import image_url_maker, local_files_url, prefixed_url, presigned_url
from segrl.storage import ArtifactStore

H, W = 4, 6
IGNORE = 255
CLASSES = ["x", "y", "z"]


def row(image_id: str, unit: str, box=(0, 0, H, W), points=()) -> dict:
    y0, x0, y1, x1 = box
    return {"id": image_id, "uri": f"/data/{image_id}.png", "unit": unit, "height": H, "width": W,
            "y0": y0, "x0": x0, "y1": y1, "x1": x1, "mask_key": "", "points": [list(p) for p in points],
            "cost_pixels": (y1 - y0) * (x1 - x0) if unit != "points" else 0, "cost_clicks": len(points)}


def brush_result(mask: np.ndarray, name: str, control: str = "label", size=(H, W)) -> dict:
    return {"id": f"b-{name}", "from_name": control, "to_name": "image", "type": "brushlabels",
            "original_height": size[0], "original_width": size[1],
            "value": {"format": "rle", "rle": brush.mask2rle(mask.astype(np.uint8) * 255),
                      "brushlabels": [name]}}


def point_result(y: int, x: int, name: str) -> dict:
    return {"id": f"k-{y}-{x}", "from_name": "point", "to_name": "image", "type": "keypointlabels",
            "original_height": H, "original_width": W,
            "value": {**keypoint_value(y, x, H, W), "keypointlabels": [name]}}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


# --------------------------------------------------------------------------- pure parts


def test_keypoint_percent_coordinates_round_trip_to_the_pixel():
    assert keypoint_value(2, 5, H, W) == {"x": 5.5 * 100 / 6, "y": 62.5, "width": 0.6}
    for y in range(H):
        for x in range(W):
            assert keypoint_pixel(keypoint_value(y, x, H, W), H, W) == (y, x)
    assert keypoint_pixel({"x": 100.0, "y": -1.0}, H, W) == (0, W - 1)  # clipped into the image


def test_snap_point_moves_a_near_click_onto_the_nearest_requested_point():
    assert snap_point((3, 3), [(1, 1), (4, 4)]) == (4, 4)
    assert snap_point((0, 0), [(9, 9)], radius=3) == (0, 0)  # too far: stays where it landed


def test_labeling_config_lists_the_classes_in_id_order_for_brush_and_points():
    root = ET.fromstring(labeling_config(["sky", 'a "b" & c']))
    controls = {c.get("name"): [label.get("value") for label in c] for c in root if c.get("toName")}
    assert controls == {"label": ["sky", 'a "b" & c'], "point": ["sky", 'a "b" & c'],
                        "request": ["requested"], "request_point": ["requested"]}
    assert root.find("Image").get("value") == "$image"


def test_answer_label_decodes_brushes_keypoints_and_skips_the_request():
    region = np.zeros((H, W), bool)
    region[1:3, 0:4] = True
    later = np.zeros((H, W), bool)
    later[2, 0:2] = True
    results = [brush_result(region, "x"), brush_result(later, "z"),  # the later stroke on top
               brush_result(np.ones((H, W), bool), "requested", control="request"),
               point_result(0, 4, "y")]  # one pixel right of the requested point (0, 5)
    label, problems = answer_label(results, H, W, {n: i for i, n in enumerate(CLASSES)}, [(0, 5)], brush)
    expected = np.full((H, W), IGNORE, np.uint8)
    expected[1:3, 0:4] = 0
    expected[2, 0:2] = 2
    expected[0, 5] = 1
    np.testing.assert_array_equal(label, expected)
    assert problems == []


def test_answer_label_names_unknown_classes_and_wrong_sizes():
    mask = np.ones((H, W), bool)
    results = [brush_result(mask, "cat"), brush_result(np.ones((H, W + 1), bool), "x", size=(H, W + 1))]
    _, problems = answer_label(results, H, W, {"x": 0}, [], brush)
    assert "'b-cat'" in problems[0] and "['cat']" in problems[0] and "need one of ['x']" in problems[0]
    assert "7x4 (WxH), expected 6x4 (WxH)" in problems[1]


def test_answer_label_reports_a_cut_brush_instead_of_failing():
    cut = brush_result(np.ones((H, W), bool), "x")
    cut["value"]["rle"] = cut["value"]["rle"][:3]
    other_size = brush_result(np.ones((H, W + 2), bool), "x")  # an RLE of another image, size lied
    other_size.update(original_width=W)
    _, problems = answer_label([cut, other_size], H, W, {"x": 0}, [], brush)
    assert len(problems) == 2 and all("cannot be read" in p for p in problems)
    assert "not 4x6x4" in problems[1]


def test_latest_annotation_takes_the_last_submitted_one():
    task = {"annotations": [{"id": 3, "result": "old"}, {"id": 9, "was_cancelled": True},
                            {"id": 5, "result": "new"}]}
    assert latest_annotation(task)["result"] == "new"
    assert latest_annotation({"annotations": [{"id": 1, "was_cancelled": True}]}) is None


def test_image_urls_local_prefix_and_presigned():
    assert local_files_url("/srv/data/camvid/a b.png", "/srv/data") == "/data/local-files/?d=camvid/a%20b.png"
    with pytest.raises(DataError, match="/elsewhere/a.png.*not under"):
        local_files_url("/elsewhere/a.png", "/srv/data")
    assert prefixed_url("s3://b/pool/x/1.png", "s3://b/pool", "https://img.lab/") == "https://img.lab/x/1.png"
    with pytest.raises(DataError, match="does not start with"):
        prefixed_url("/other/1.png", "s3://b/pool", "https://img.lab")

    with pytest.raises(DataError, match="cannot presign"):
        presigned_url("/local/1.png", 60, object())


def test_presigned_url_fetches_the_object_from_a_real_s3_server(s3_server):
    """The URL Label Studio would load: a GET without credentials returns the image's bytes."""
    store = ArtifactStore(s3_server.root("presign-test"), endpoint_url=s3_server.endpoint_url)
    store.write_bytes("frames/a.png", b"\x89PNG fake image")
    url = image_url_maker("presign", presign_seconds=120, endpoint_url=s3_server.endpoint_url)(
        store.uri("frames/a.png"))
    assert "X-Amz-Expires=120" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG fake image"


# --------------------------------------------------------------------------- export and import


def selection():
    return selection_table([row("a", "region", box=(1, 1, 3, 4)), row("b", "points", (0, 1, 4, 6), [[0, 1], [3, 5]])])


def test_export_writes_tasks_whose_pre_annotations_show_the_request(store):
    out = export_label_studio(selection(), store, "ls", CLASSES, lambda uri: "http://img" + uri)
    tasks = store.read_json(out["tasks"])
    assert [t["data"]["segrl_id"] for t in tasks] == ["a", "b"]
    assert tasks[0]["data"]["image"] == "http://img/data/a.png"
    (request,) = tasks[0]["predictions"][0]["result"]
    area = brush.decode_rle(request["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
    expected = np.zeros((H, W), bool)
    expected[1:3, 1:4] = True
    np.testing.assert_array_equal(area, expected)
    points = [keypoint_pixel(r["value"], H, W) for r in tasks[1]["predictions"][0]["result"]]
    assert points == [(0, 1), (3, 5)]
    assert "<BrushLabels" in store.read_text(out["config"])


def export_file(tmp_path: Path, tasks: list[dict]) -> str:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    return str(path)


def task(image_id: str, results: list[dict], task_id: int = 1) -> dict:
    return {"id": task_id, "data": {"segrl_id": image_id}, "annotations": [{"id": 1, "result": results}]}


def good_tasks() -> list[dict]:
    everywhere = np.ones((H, W), bool)
    return [task("a", [brush_result(everywhere, "y")], 1),
            task("b", [point_result(0, 1, "z"), point_result(3, 4, "x")], 2)]


def test_import_keeps_requested_pixels_and_reports_what_it_dropped(store, tmp_path):
    summary = import_label_studio(selection(), export_file(tmp_path, good_tasks()), store, "labels", CLASSES)
    a = np.asarray(Image.open(store.fs_path("labels/a.png")))
    expected_a = np.full((H, W), IGNORE, np.uint8)
    expected_a[1:3, 1:4] = 1
    np.testing.assert_array_equal(a, expected_a)
    b = np.asarray(Image.open(store.fs_path("labels/b.png")))
    assert {(int(y), int(x)): int(b[y, x]) for y, x in zip(*np.nonzero(b != IGNORE), strict=True)} == {
        (0, 1): 2, (3, 5): 0}  # the click at (3, 4) snapped to the requested (3, 5)
    assert summary["dropped_pixels_per_image"] == {"a": H * W - 6, "b": 0}
    assert (summary["labeled_pixels"], summary["clicks"], summary["tasks"]) == (8, 2, 2)
    assert store.exists("labels/_IMPORTED.json")


@pytest.mark.parametrize("case, words", [
    ("not_selected", ["task 7", "'zz' was not selected"]),
    ("missing", ["missing a submitted annotation", "'b'"]),
    ("unknown_class", ["image 'a'", "['cat']"]),
    ("wrong_size", ["image 'a'", "expected 6x4 (WxH)"]),
    ("not_a_list", ["must be a JSON list of tasks"]),
])
def test_bad_export_is_rejected_whole_and_writes_nothing(store, tmp_path, case, words):
    tasks = good_tasks()
    if case == "not_selected":
        tasks.append(task("zz", [], 7))
    elif case == "missing":
        tasks[1]["annotations"][0]["was_cancelled"] = True
    elif case == "unknown_class":
        tasks[0]["annotations"][0]["result"] = [brush_result(np.ones((H, W), bool), "cat")]
    elif case == "wrong_size":
        tasks[0]["annotations"][0]["result"] = [brush_result(np.ones((H + 1, W), bool), "x", size=(H + 1, W))]
    else:
        tasks = {"tasks": tasks}
    assert_rejected_whole(store, lambda: import_label_studio(selection(), export_file(tmp_path, tasks), store, "labels", CLASSES), words)
