"""benchmarks/train_throughput.py's table: ratios to the plain loop, and what a contended run kept."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def tp():
    return load_benchmark("train_throughput")


def row(contender, images_per_s, recipe="supervised"):
    return {"recipe": recipe, "contender": contender, "steps": 10, "seconds": 80.0 / images_per_s,
            "labeled_images_per_s": images_per_s, "seconds_per_step": 8.0 / images_per_s}


def test_ratios_are_against_the_plain_loop_and_steps_against_supervised(tp):
    rows = [row("(a) plain", 20.0), row("(c) segrl", 18.0), row("(a) plain", 10.0, "mean_teacher"),
            row("(c) segrl", 6.0, "mean_teacher")]
    table = tp.format_table(rows, Namespace(threads=2, setting="small", contend=0))
    assert "| supervised | (c) segrl | 18.00 | 0.444 | 0.90x | 1.00x |" in table
    # a mean-teacher step of (c): 8/6 s against 8/18 s supervised = 3x
    assert "| mean_teacher | (c) segrl | 6.00 | 1.333 | 0.60x | 3.00x |" in table
    assert "kept under load" not in table


def test_a_contended_run_shows_the_idle_rows_and_the_share_kept(tp, tmp_path):
    args = Namespace(threads=2, setting="small", contend=2, out_dir=str(tmp_path))
    assert tp.idle_rows(args) == {}  # no idle run yet: no comparison
    (tmp_path / "train_throughput_small.json").write_text(json.dumps(
        {"rows": [row("(a) plain", 20.0), row("(c) segrl", 18.0)]}))
    table = tp.format_table([row("(a) plain", 5.0), row("(c) segrl", 9.0)], args, tp.idle_rows(args))
    assert "beside 2 busy single-threaded processes" in table
    assert "| supervised | (a) plain | 5.00 | 1.600 | 1.00x | 1.00x | 20.00 | 25% |" in table
    assert "| supervised | (c) segrl | 9.00 | 0.889 | 1.80x | 1.00x | 18.00 | 50% |" in table
    assert tp.results_name(args.setting, args.contend) == "train_throughput_small_contend2"


def test_results_are_written_with_the_run_config(tp, tmp_path):
    args = Namespace(threads=2, setting="small", contend=0, out_dir=str(tmp_path), recipes=["supervised"],
                     data_root="../shared/data/camvid")
    tp.write_results([row("(a) plain", 20.0)], tp.SETTINGS["small"], args)
    written = json.loads((tmp_path / "train_throughput_small.json").read_text())
    assert written["rows"][0]["labeled_images_per_s"] == 20.0
    assert written["config"]["compute"]["threads_per_worker"] == 2
    assert (tmp_path / "train_throughput_small.md").read_text().startswith("Training throughput")


def test_the_first_epoch_warms_up_and_is_not_timed(tp, monkeypatch):
    clock = iter([0.0, 9.0, 10.0, 12.0, 20.0, 23.0])  # epochs of 9, 2 and 3 s
    monkeypatch.setattr(tp.time, "perf_counter", lambda: next(clock))
    steps = iter([5, 4, 6])
    assert tp.timed_epochs(3, lambda: next(steps)) == (5.0, 10)
    clock, steps = iter([0.0, 9.0]), iter([5])
    assert tp.timed_epochs(1, lambda: next(steps)) == (9.0, 5)  # one epoch: it is all there is
