"""CVAT task export and the import of CVAT's two exports, on files written as CVAT writes them.

The XML and the mask zip follow CVAT's documented layouts ("CVAT for images 1.1":
<image> elements with <box>, <polygon>, <mask rle left top width height>, <points>;
"Segmentation mask 1.1": labelmap.txt, SegmentationClass/<frame>.png in label colours,
SegmentationObject/, ImageSets/Segmentation/default.txt).
"""

from __future__ import annotations

import importlib.util
import io
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pytest
from _rejects import assert_rejected_whole
from PIL import Image

from segrl.config import AnnotationConfig
from segrl.labeling import encode_label_png, selection_table
from segrl.labeling.cvat import export_cvat, import_cvat, mask_rle_decode, mask_rle_encode
from segrl.labeling.tools import detect_format, export_tools
from segrl.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
H, W = 4, 6
IGNORE = 255
CLASSES = ["x", "y", "z"]


def row(image_id: str, unit: str, box=(0, 0, H, W), mask_key: str = "", points=()) -> dict:
    y0, x0, y1, x1 = box
    return {"id": image_id, "uri": f"/data/frames/{image_id}.jpg", "unit": unit, "height": H, "width": W,
            "y0": y0, "x0": x0, "y1": y1, "x1": x1, "mask_key": mask_key, "points": [list(p) for p in points],
            "cost_pixels": 0, "cost_clicks": len(points)}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(str(tmp_path / "store"))


@pytest.fixture
def selection(store):
    segment = np.zeros((H, W), np.uint8)
    segment[1, 2:5] = 255
    segment[2, 4] = 255
    store.write_bytes("masks/c.png", encode_label_png(segment))
    return selection_table([
        row("a", "region", box=(1, 1, 3, 3)),
        row("b", "points", box=(0, 0, 4, 6), points=[[0, 0], [3, 5]]),
        row("c", "pixels", box=(1, 2, 3, 5), mask_key="masks/c.png"),
    ])


def test_mask_rle_known_answer_and_round_trip():
    mask = np.zeros((H, W), bool)
    mask[1, 2:5] = True
    mask[2, 4] = True
    encoded = mask_rle_encode(mask)
    # box columns 2..4, rows 1..2: row 1 = 1 1 1, row 2 = 0 0 1 -> runs 0(unset), 3, 2, 1
    assert encoded == {"rle": "0, 3, 2, 1", "left": 2, "top": 1, "width": 3, "height": 2}
    np.testing.assert_array_equal(mask_rle_decode(**encoded, image_hw=(H, W)), mask)
    rng = np.random.default_rng(0)
    for _ in range(10):
        random_mask = rng.random((H, W)) < 0.4
        random_mask[0, 0] = True
        np.testing.assert_array_equal(mask_rle_decode(**mask_rle_encode(random_mask), image_hw=(H, W)),
                                      random_mask)


def test_export_writes_the_request_as_cvat_shapes(store, selection):
    out = export_cvat(selection, store, "rounds/01/labeling/cvat", CLASSES)
    assert store.read_text(out["images"]).splitlines() == [f"/data/frames/{i}.jpg" for i in "abc"]
    root = ET.fromstring(store.read_text(out["annotations"]))
    assert root.find("version").text == "1.1"
    assert [n.text for n in root.iter("name") if n.text in [*CLASSES, "requested"]] == [*CLASSES, "requested"]
    images = {i.get("name"): i for i in root.iter("image")}
    assert [images[n].get("id") for n in ("a.jpg", "b.jpg", "c.jpg")] == ["0", "1", "2"]
    box = images["a.jpg"].find("box")
    assert [box.get(k) for k in ("label", "xtl", "ytl", "xbr", "ybr")] == ["requested", "1.00", "1.00", "3.00", "3.00"]
    assert images["b.jpg"].find("points").get("points") == "0.50,0.50;5.50,3.50"
    mask = images["c.jpg"].find("mask")
    decoded = mask_rle_decode(mask.get("rle"), *(int(mask.get(k)) for k in ("left", "top", "width", "height")),
                              image_hw=(H, W))
    assert sorted(zip(*np.nonzero(decoded), strict=True)) == [(1, 2), (1, 3), (1, 4), (2, 4)]


CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta><task><id>7</id><name>segrl</name><size>3</size><mode>annotation</mode>
    <labels><label><name>x</name><color>#fa3253</color><type>any</type><attributes></attributes></label>
    <label><name>y</name><color>#33ddff</color><type>any</type><attributes></attributes></label></labels>
  </task><dumped>2026-12-01 10:00:00.000000+00:00</dumped></meta>
  <image id="0" name="a.jpg" width="6" height="4">
    <box label="requested" source="segrl" occluded="0" xtl="1.00" ytl="1.00" xbr="3.00" ybr="3.00" z_order="0"></box>
    <box label="x" source="manual" occluded="0" xtl="0.00" ytl="0.00" xbr="6.00" ybr="4.00" z_order="0"></box>
    <polygon label="y" source="manual" occluded="0" points="2.00,1.00;2.00,2.00;2.00,1.00" z_order="1"></polygon>
  </image>
  <image id="1" name="b.jpg" width="6" height="4">
    <points label="z" source="manual" occluded="0" points="1.20,0.70;5.40,3.60" z_order="0"></points>
  </image>
  <image id="2" name="c.jpg" width="6" height="4">
    <mask label="y" source="manual" occluded="0" rle="0, 3, 2, 1" left="2" top="1" width="3" height="2" z_order="0"></mask>
  </image>
</annotations>
"""


def read(store: ArtifactStore, key: str) -> np.ndarray:
    return np.asarray(Image.open(store.fs_path(key)))


def test_import_cvat_for_images_xml_keeps_requested_pixels(store, selection, tmp_path):
    path = tmp_path / "annotations.xml"
    path.write_text(CVAT_XML)
    summary = import_cvat(selection, str(path), store, "labels", CLASSES)
    a = read(store, "labels/a.png")
    expected_a = np.full((H, W), IGNORE, np.uint8)
    expected_a[1:3, 1:3] = 0
    expected_a[1:3, 2] = 1  # the z_order 1 polygon (a line on column 2) drawn over the box
    np.testing.assert_array_equal(a, expected_a)
    b = read(store, "labels/b.png")
    assert sorted(zip(*np.nonzero(b != IGNORE), strict=True)) == [(0, 0), (3, 5)]  # clicks snapped
    assert (b[0, 0], b[3, 5]) == (2, 2)
    c = read(store, "labels/c.png")
    assert sorted(zip(*np.nonzero(c == 1), strict=True)) == [(1, 2), (1, 3), (1, 4), (2, 4)]
    assert summary["dropped_pixels_per_image"] == {"a": H * W - 4, "b": 0, "c": 0}
    assert summary["format"] == "CVAT for images 1.1" and summary["clicks"] == 2


def mask_zip(path: Path, frames: dict[str, np.ndarray], labelmap: str) -> Path:
    """A "Segmentation mask 1.1" zip: labelmap.txt, SegmentationClass/*.png and the rest."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("labelmap.txt", labelmap)
        archive.writestr("ImageSets/Segmentation/default.txt", "\n".join(frames) + "\n")
        for name, rgb in frames.items():
            for folder in ("SegmentationClass", "SegmentationObject"):
                buffer = io.BytesIO()
                Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
                archive.writestr(f"{folder}/{name}.png", buffer.getvalue())
    return path


LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\nx:250,50,83::\ny:51,221,255::\nz:10,20,30::\n"


def colour_frames() -> dict[str, np.ndarray]:
    frames = {n: np.zeros((H, W, 3)) for n in "abc"}
    frames["a"][:, :] = (250, 50, 83)  # x everywhere
    frames["b"][0, 0] = (10, 20, 30)  # z on one requested point
    frames["c"][1] = (51, 221, 255)  # y on row 1
    return frames


def test_import_segmentation_mask_zip(store, selection, tmp_path):
    summary = import_cvat(selection, str(mask_zip(tmp_path / "masks.zip", colour_frames(), LABELMAP)),
                          store, "labels", CLASSES)
    a = read(store, "labels/a.png")
    assert (a[1:3, 1:3] == 0).all() and (a != IGNORE).sum() == 4
    b = read(store, "labels/b.png")
    assert b[0, 0] == 2 and (b != IGNORE).sum() == 1  # the other requested point stays unlabeled
    c = read(store, "labels/c.png")
    assert sorted(zip(*np.nonzero(c != IGNORE), strict=True)) == [(1, 2), (1, 3), (1, 4)]
    assert summary["dropped_pixels_per_image"] == {"a": H * W - 4, "b": 0, "c": W - 3}
    assert summary["format"] == "Segmentation mask 1.1"


@pytest.mark.parametrize("case, words", [
    ("unknown_label", ["[a]", "label 'cat'"]),
    ("not_selected", ["[zz]", "no image named 'zz'"]),
    ("missing", ["missing a CVAT image", "'c'"]),
    ("unknown_colour", ["[a]", "colour (1, 2, 3)", "label None"]),
    ("wrong_size", ["[b]", "size is 7x4 (WxH)"]),
])
def test_bad_cvat_export_is_rejected_whole(store, selection, tmp_path, case, words):
    if case in ("unknown_colour", "wrong_size"):
        frames = colour_frames()
        if case == "unknown_colour":
            frames["a"][0, 0] = (1, 2, 3)
        else:
            frames["b"] = np.zeros((H, W + 1, 3))
        source = mask_zip(tmp_path / "m.zip", frames, LABELMAP)
    else:
        xml = CVAT_XML
        if case == "unknown_label":
            xml = xml.replace('<box label="x"', '<box label="cat"')
        elif case == "not_selected":
            xml = xml.replace('name="b.jpg"', 'name="zz.jpg"')
        else:  # missing: no <image> for c
            xml = xml[: xml.index('  <image id="2"')] + "</annotations>\n"
        source = tmp_path / "annotations.xml"
        source.write_text(xml)
    assert_rejected_whole(store, lambda: import_cvat(selection, str(source), store, "labels", CLASSES), words)


def load_job():
    spec = importlib.util.spec_from_file_location("import_labels_job", REPO / "jobs" / "import_labels.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_import_job_takes_a_cvat_export_by_its_name_and_reports_drops(tmp_path, capsys):
    run = ArtifactStore(str(tmp_path / "run"))
    run.write_json("state.json", {"num_classes": 3, "classes": CLASSES})
    run.write_table("rounds/02/selection.parquet", selection_table([row("a", "region", box=(1, 1, 3, 3))]))
    export = tmp_path / "annotations.xml"
    export.write_text(CVAT_XML.replace(CVAT_XML[CVAT_XML.index('  <image id="1"'):CVAT_XML.index("</annotations>")], ""))
    assert load_job().main(["--run", run.root, "--round", "2", "--labels", str(export)]) == 0
    out = capsys.readouterr().out
    assert "imported 1 label map(s): 4 of 4 requested pixels labeled" in out
    assert f"dropped (labeled outside the request, not taken): a {H * W - 4} px" in out
    assert run.read_json("rounds/02/labels/_IMPORTED.json")["format"] == "CVAT for images 1.1"


def test_export_tools_writes_each_configured_tool(store, selection):
    written = export_tools(selection, store, "rounds/03/labeling", CLASSES,
                           AnnotationConfig(tools=("cvat", "label_studio"), image_urls="prefix",
                                            url_root="/data", url_prefix="https://img.lab"))
    assert sorted(written) == ["cvat", "label_studio"]
    tasks = store.read_json("rounds/03/labeling/label_studio/tasks.json")
    assert tasks[0]["data"]["image"] == "https://img.lab/frames/a.jpg"
    assert store.exists("rounds/03/labeling/cvat/annotations.xml")
    assert [detect_format(s) for s in ("x/project.json", "t.zip", "a.xml", str(tmp_folder(store)))] == [
        "label_studio", "cvat", "cvat", "png"]


def tmp_folder(store: ArtifactStore) -> Path:
    return Path(store.fs_path("rounds/03/labeling/cvat"))
