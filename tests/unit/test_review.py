"""The loop's review page (segrl.loop.review): drawings with known answers, and the page's
data from a small store written with segrl's own writers (tests/_review_store.py, no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from _review_store import IDS, ROUNDS, write_review_run

from segrl.config import ConfigError, replace
from segrl.engine.train import record_config, run_store
from segrl.labeling import selection_table
from segrl.loop.review import (
    DATA,
    PAGE,
    REQUEST_COLOR,
    UNLABELED_COLOR,
    class_palette,
    class_pixel_counts,
    color_labels,
    compare_series,
    draw_request,
    full_supervision_miou,
    render_page,
    thumbnail_size,
    write_review,
)

YELLOW = np.array(REQUEST_COLOR)


def row(unit: str, box=(0, 0, 0, 0), points=()) -> dict:
    y0, x0, y1, x1 = box
    return {"unit": unit, "y0": y0, "x0": x0, "y1": y1, "x1": x1, "points": [list(p) for p in points]}


def test_a_request_is_drawn_as_outlined_boxes_dots_and_a_tinted_mask():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[30:35, 5:10] = True
    rows = [row("region", (10, 10, 20, 30)), row("points", points=[(5, 50)])]
    drawn = np.asarray(draw_request(image, rows, mask, (40, 60))).astype(int)
    assert (drawn[10, 10:30] == YELLOW).all() and (drawn[19, 10:30] == YELLOW).all()  # the box's edges
    assert (drawn[15, 20] == 0).all()  # inside the box the frame shows through
    assert (drawn[5, 50] == YELLOW).all()  # a point's dot
    assert np.abs(drawn[32, 7] - YELLOW / 2).max() <= 1  # half-tinted segment
    assert (drawn[25, 40] == 0).all()  # nothing asked there


def test_a_one_pixel_segment_stays_visible_in_a_thumbnail_four_times_smaller():
    mask = np.zeros((80, 120), bool)
    mask[41, 61] = True
    drawn = np.asarray(draw_request(np.zeros((80, 120, 3), np.uint8), [], mask, (20, 30))).astype(int)
    assert (drawn.sum(axis=2) > 0).sum() == 1 and drawn[10, 15].sum() > 0


def test_labels_are_coloured_by_class_and_unlabeled_pixels_grey():
    palette = class_palette(3)
    label = np.array([[0, 1], [2, 255]], np.uint8)
    colours = np.asarray(color_labels(label, palette, (4, 4)).convert("RGB"))
    assert colours.shape == (4, 4, 3)
    assert (colours[0, 0] == palette[0]).all() and (colours[3, 3] == UNLABELED_COLOR).all()
    assert len({tuple(palette[c]) for c in range(3)} | {UNLABELED_COLOR}) == 4  # all distinct


def test_class_pixel_counts_skip_unlabeled_pixels():
    labels = [np.array([[0, 0, 255], [2, 7, 1]], np.uint8), np.array([[2]], np.uint8)]
    assert class_pixel_counts(labels, 3) == [2, 1, 2]


@pytest.mark.parametrize(("height", "width", "target", "expected"),
                         [(360, 480, 240, (180, 240)), (48, 64, 240, (48, 64)), (1, 1000, 100, (1, 100))])
def test_thumbnail_size_keeps_the_aspect_and_never_enlarges(height, width, target, expected):
    assert thumbnail_size(height, width, target) == expected


@pytest.fixture(scope="module")
def review_run(tmp_path_factory):
    run = write_review_run(tmp_path_factory.mktemp("review"), "report.frames_per_round=2")
    data = write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth, model_of=run.model_of)
    return run, data


def test_each_round_shows_its_first_frames_in_pick_order_with_scores(review_run):
    run, data = review_run
    assert [rd["round"] for rd in data["rounds"]] == [2, 1, 0]  # newest first
    by_round = {rd["round"]: rd for rd in data["rounds"]}
    for r, requests in enumerate(ROUNDS):
        picked = list(dict.fromkeys(request["id"] for request in requests))
        assert [f["id"] for f in by_round[r]["frames"]] == picked[:2]  # frames_per_round = 2
        assert [f["rank"] for f in by_round[r]["frames"]] == [1, 2][: len(picked)]
        assert by_round[r]["images"] == len(picked)
    frame03 = by_round[1]["frames"][0]
    assert frame03["score_name"] == "best region score" and frame03["score"] == pytest.approx(0.6)  # best of its 2
    assert frame03["requests"] == 2 and frame03["cost_pixels"] == 16 * 16 * 2
    assert by_round[0]["frames"][0]["prediction"] is None  # chosen before any model
    assert by_round[1]["frames"][0]["prediction"] == "rounds/01/review/001_prediction.png"
    assert by_round[2]["trained"] is False and by_round[2]["labeled"] is True
    assert by_round[1]["val_miou"] == pytest.approx(0.3)
    assert json.loads(run.store.read_text(DATA)) == data  # the page's data beside it


def test_labeled_pixels_per_class_are_the_answers_added_up_over_rounds(review_run):
    run, data = review_run
    by_round = {rd["round"]: rd for rd in data["rounds"]}
    whole = class_pixel_counts([run.truth(i) for i in IDS[:3]], len(run.state["classes"]))
    assert by_round[0]["class_pixels_added"] == whole  # round 0 asked for three whole images
    clicked = [run.truth(r["id"])[y, x] for r in ROUNDS[2] for y, x in r["points"]]
    assert sum(by_round[2]["class_pixels_added"]) == sum(c < len(run.state["classes"]) for c in clicked)
    total = np.sum([by_round[r]["class_pixels_added"] for r in range(3)], axis=0)
    assert by_round[2]["class_pixels_so_far"] == total.tolist()


def test_the_page_refers_only_to_files_of_the_run_folder_that_exist(review_run):
    run, _ = review_run
    html = run.store.read_text(PAGE)
    root = Path(run.store.uri())
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(re.findall(r'<section class="round"', html)) == 3
    assert refs and not [ref for ref in refs if ref.startswith(("/", "http:", "https:", "file:"))]
    missing = [ref for ref in refs if not (root / ref).exists() and ref not in ("report.md", "metrics.json")]
    assert not missing, missing  # the loop writes report.md and metrics.json itself


def test_thumbnails_are_drawn_once_and_the_page_rewritten(review_run):
    run, _ = review_run
    thumbs = sorted(Path(run.store.uri("rounds")).glob("*/review/*.*"))
    before = {p: p.stat().st_mtime_ns for p in thumbs}
    page_before = Path(run.store.uri(PAGE)).stat().st_mtime_ns
    write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth, model_of=None)  # no model needed now
    assert {p: p.stat().st_mtime_ns for p in thumbs} == before
    assert Path(run.store.uri(PAGE)).stat().st_mtime_ns > page_before


def test_an_external_round_shows_the_answers_once_imported(tmp_path):
    run = write_review_run(tmp_path, "al.labeling=external", with_model=False)
    waiting = {**run.state, "done": [step for step in run.state["done"] if step != "02/label"]}
    data = write_review(run.store, run.cfg, waiting, run.rows, truth=None, model_of=None)
    newest = data["rounds"][0]
    assert newest["round"] == 2 and not newest["labeled"] and newest["class_pixels_added"] is None
    assert all(f["truth"] is None for f in newest["frames"])
    assert "Waiting for labels." in run.store.read_text(PAGE)
    data = write_review(run.store, run.cfg, run.state, run.rows, truth=None, model_of=None)
    assert [f["truth_kind"] for f in data["rounds"][0]["frames"]] == ["answers", "answers"]


def test_ids_and_names_are_escaped_in_the_page(review_run):
    _, data = review_run
    evil = json.loads(json.dumps(data))
    evil["run"] = "<script>alert(1)</script>"
    evil["rounds"][0]["frames"][0]["id"] = '"><img src=x onerror=alert(1)>'
    html = render_page(evil)
    assert "<script>" not in html and "onerror=alert(1)>" not in html and "&lt;script&gt;" in html


def test_compare_runs_draw_their_curve_or_say_they_have_none_yet(tmp_path):
    done, started = tmp_path / "random", tmp_path / "started"
    done.mkdir()
    started.mkdir()
    (done / "metrics.json").write_text(json.dumps({"acquisition": "random", "rounds": [
        {"round": 0, "labeled_share": 0.02, "val_miou": 0.3}, {"round": 1, "labeled_share": 0.05, "val_miou": None}]}))
    series = compare_series([str(done), str(started)], None)
    assert series[0]["label"] == "random (random)"
    assert series[0]["points"] == [{"round": 0, "labeled_share": 0.02, "val_miou": 0.3}]
    assert series[1]["points"] == [] and series[1]["note"] == "no metrics.json yet"


@pytest.mark.parametrize(("content", "message"), [("{not json", "is not JSON"), ('{"val_miou": 0.5}', "no 'rounds' list")])
def test_a_compare_run_that_is_not_a_loop_run_is_an_error_naming_the_field_and_run(tmp_path, content, message):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(ConfigError, match=rf"report.compare_runs.*{re.escape(str(tmp_path))}.*{message}"):
        compare_series([str(tmp_path)], None)


def test_full_supervision_is_the_val_miou_of_a_training_run(tmp_path):
    assert full_supervision_miou("", None) == (None, "")
    assert full_supervision_miou(str(tmp_path), None)[0] is None  # not written yet
    (tmp_path / "metrics.json").write_text(json.dumps({"val_miou": 0.61}))
    assert full_supervision_miou(str(tmp_path), None) == (pytest.approx(0.61), "")
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": []}))
    with pytest.raises(ConfigError, match="report.full_supervision_run.*val_miou"):
        full_supervision_miou(str(tmp_path), None)


def test_a_run_resumes_with_other_report_settings_or_from_before_the_report_section(tmp_path):
    run = write_review_run(tmp_path, with_model=False)
    store = run_store(run.cfg)
    record_config(store, run.cfg)
    record_config(store, replace(run.cfg, **{"report.compare_runs": ("runs/random",), "report.frames_per_round": 3}))
    saved = store.read_yaml("config.yaml")
    del saved["report"]  # a run started before the review page existed
    store.write_yaml("config.yaml", saved)
    record_config(store, run.cfg)
    with pytest.raises(ConfigError, match="train.lr"):
        record_config(store, replace(run.cfg, **{"train.lr": 0.5}))


def test_frames_per_round_zero_shows_no_thumbnails(tmp_path):
    run = write_review_run(tmp_path, "report.frames_per_round=0", with_model=False)
    data = write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth, model_of=run.model_of)
    assert all(rd["frames"] == [] for rd in data["rounds"]) and len(IDS) == 8


def test_other_report_sizes_redraw_a_rounds_frames(tmp_path):
    run = write_review_run(tmp_path, "report.frames_per_round=1", with_model=False)
    first = write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth)
    more = replace(run.cfg, **{"report.frames_per_round": 3})
    second = write_review(run.store, more, run.state, run.rows, truth=run.truth)
    assert [len(rd["frames"]) for rd in first["rounds"]] == [1, 1, 1]
    assert [len(rd["frames"]) for rd in second["rounds"]] == [2, 3, 3]


def test_a_frame_that_cannot_be_read_any_more_is_named_and_the_others_shown(tmp_path):
    run = write_review_run(tmp_path, with_model=False)
    selection = run.store.read_table("rounds/00/selection.parquet").to_pylist()
    selection[1]["uri"] = str(tmp_path / "gone.png")
    run.store.write_table("rounds/00/selection.parquet", selection_table(selection))
    data = write_review(run.store, run.cfg, run.state, run.rows, truth=run.truth)
    frames = data["rounds"][-1]["frames"]
    assert [f["error"] is None for f in frames] == [True, False, True]
    assert "gone.png" in frames[1]["error"] and frames[1]["request"] is None and frames[1]["truth"] is None
    assert "gone.png" in run.store.read_text(PAGE)


def test_the_page_after_the_first_step_shows_round_0_waiting_and_only_the_curve(tmp_path):
    run = write_review_run(tmp_path, with_model=False)
    first = {**run.state, "done": ["00/select"], "log": run.state["log"][:1]}
    data = write_review(run.store, run.cfg, first, [], truth=None)
    assert [rd["round"] for rd in data["rounds"]] == [0] and not data["rounds"][0]["labeled"]
    assert data["plots"] == {"curve": "review/miou_curve.png", "iou_per_class": None,
                             "labeled_pixels_per_class": None}
    html = run.store.read_text(PAGE)
    assert "Waiting for labels." in html and html.count("<img") == 1 + 3  # the curve, 3 requests
