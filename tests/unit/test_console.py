"""What reaches the console: segrl's lines once, Ray's INFO and known-harmless records hidden."""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import ray

from segrl.console import (
    VERBOSE_ENV,
    _filter_console,
    _HideHarmless,
    _HideRayInfo,
    _OnlyProgressInfo,
    add_verbose_flag,
    say,
    verbose,
)

RAY_DIR = os.path.dirname(ray.__file__) + os.sep


def record(name: str, level: int, pathname: str, message: str = "m") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, message, None, None)


def test_ray_info_is_hidden_but_its_warnings_and_everyone_elses_info_are_kept():
    hide = _HideRayInfo(RAY_DIR)
    context_py = RAY_DIR + "train/v2/_internal/execution/context.py"
    # Ray Train names this logger after its file, so no logger-name rule can catch it
    assert not hide.filter(record(context_py, logging.INFO, context_py, "Reporting training result 1"))
    assert hide.filter(record(context_py, logging.WARNING, context_py))
    assert hide.filter(record("root", logging.INFO, "/work/main/segrl/engine/train.py"))
    assert hide.filter(record("x", logging.ERROR, RAY_DIR + "data/dataset.py"))


def test_ray_data_keeps_its_total_progress_line_and_warnings_only():
    keep = _OnlyProgressInfo()
    progress = "ray.data._internal.progress.logging_progress"
    assert keep.filter(record(progress, logging.INFO, "p.py", "Total Progress: 40/96"))
    assert not keep.filter(record(progress, logging.INFO, "p.py", "MapBatches(ScoreActor): 0/1"))
    assert not keep.filter(record("ray.data._internal.execution.streaming_executor", logging.INFO, "e.py"))
    assert keep.filter(record("ray.data._internal.execution.streaming_executor", logging.WARNING, "e.py"))


def test_known_harmless_warnings_are_dropped_and_others_kept():
    drop = _HideHarmless()
    assert not drop.filter(record("ray", logging.WARNING, "a.py", "Token authentication is enabled for this "
                                                                   "Ray cluster. Set RAY_AUTH_MODE=disabled"))
    assert drop.filter(record("ray", logging.WARNING, "a.py", "object store is full"))


@pytest.mark.parametrize(("value", "expected"), [("", False), ("0", False), ("false", False), ("1", True),
                                                 ("yes", True)])
def test_verbose_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(VERBOSE_ENV, value)
    assert verbose() is expected


def test_the_verbose_flag_turns_verbosity_on_for_the_process_and_its_children(monkeypatch):
    monkeypatch.setenv(VERBOSE_ENV, "")  # restored after the test, whatever the flag sets
    parser = argparse.ArgumentParser()
    add_verbose_flag(parser)
    assert parser.parse_args([]).verbose is False and not verbose()
    assert parser.parse_args(["--verbose"]).verbose is True
    assert os.environ[VERBOSE_ENV] == "1" and verbose()


def test_say_writes_one_line_once(capfd):
    say("[segrl] epoch 1/2")
    out, _ = capfd.readouterr()
    assert out == "[segrl] epoch 1/2\n"


def test_a_console_filter_goes_on_console_handlers_once_and_never_on_files(tmp_path):
    logger = logging.getLogger("segrl.test_console")
    console, file = logging.StreamHandler(), logging.FileHandler(tmp_path / "log.txt")
    logger.handlers = [console, file]
    try:
        _filter_console(logger, _HideHarmless())
        _filter_console(logger, _HideHarmless())
        assert [type(f) for f in console.filters] == [_HideHarmless] and file.filters == []
    finally:
        logger.handlers = []
        file.close()
