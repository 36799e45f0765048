"""What segrl prints, and what it keeps Ray from printing.

By default a user sees segrl's own progress lines, Ray Data's progress bars, real warnings and
errors; Ray's INFO lines (cluster start, checkpoint and report records of every epoch) and the
warnings known to be harmless are hidden. ``SEGRL_VERBOSE=1`` (``--verbose`` on the jobs) shows
everything Ray says, as Ray would print it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from segrl import stderr_filter

VERBOSE_ENV = "SEGRL_VERBOSE"
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
# Warnings Ray logs on every start that tell a user of a local cluster nothing about the run.
HARMLESS_RAY_WARNINGS = (
    "Token authentication is enabled for this Ray cluster",  # on by default, as intended
    # a streamed training set's own context turns its bars off (segrl.data.stream)
    "Progress bars disabled. To enable, set",
)

# Lines Ray's C++ core writes straight to the driver's stderr, where no logging filter reaches.
HARMLESS_NATIVE_LINES = (
    # Ray Data hands every actor it starts its context and map function as object refs, which
    # it holds for the pool's whole life, and sets max_restarts=-1 for fault tolerance; Ray's
    # core worker flags each such actor with an "E" line (ray-project/ray#57733, one per actor)
    "has constructor arguments in the object store and max_restarts > 0",
)
_native_filter: subprocess.Popen | None = None


def verbose() -> bool:
    """True when the user asked for everything Ray prints."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _VerboseFlag(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        # through the environment: the Ray processes this job starts inherit it
        os.environ[VERBOSE_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` on a job: everything Ray prints (the same as ``SEGRL_VERBOSE=1``)."""
    parser.add_argument("--verbose", nargs=0, action=_VerboseFlag, default=False,
                        help=f"show Ray's INFO lines and every warning (or set {VERBOSE_ENV}=1)")


def say(line: str) -> None:
    """Print one progress line once, from any process.

    Inside a Ray Train worker, ``print`` is patched to log through Ray Train's logger *and*
    tee to the wrapped stdout, so a plain print reaches the driver twice; the process's real
    stdout is written exactly once (Ray forwards it to the driver).
    """
    stream = sys.__stdout__ or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def ray_log_level() -> int:
    return logging.INFO if verbose() else logging.WARNING


def ray_init_kwargs() -> dict:
    """Keyword arguments for ``ray.init`` that keep Ray's INFO lines off the console."""
    return {"logging_level": ray_log_level(), "log_to_driver": True}


def init_ray_quietly(address: str, **init_kwargs) -> None:
    """``ray.init(address, **init_kwargs)`` with the driver's console set up as this module
    describes."""
    import ray

    hide_harmless_warnings()
    filter_native_stderr()
    ray.init(address=address, **ray_init_kwargs(), **init_kwargs)
    quiet_ray_data()


def train_logging_config():
    """Ray Train's logging config: WARNING unless verbose (hides per-report INFO records)."""
    import ray.train

    return ray.train.LoggingConfig(log_level=logging.getLevelName(ray_log_level()))


class _OnlyProgressInfo(logging.Filter):
    """Ray Data's console: warnings and errors, and where stdout is no terminal (no bars), its
    one-line total progress every few seconds; not its plans, per-operator tables or start/stop
    records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name.startswith(RAY_DATA_PROGRESS_LOGGER) and record.getMessage().startswith("Total Progress")


def _filter_console(logger: logging.Logger, console_filter: logging.Filter) -> None:
    """Add ``console_filter`` to the logger's console handlers (not its files), once."""
    for handler in logger.handlers:
        is_console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if is_console and not any(type(f) is type(console_filter) for f in handler.filters):
            handler.addFilter(console_filter)


def quiet_ray_data() -> None:
    """Keep Ray Data's INFO records, all but its progress, off the driver's console unless verbose.

    Its progress bars (a terminal) or total-progress lines (no terminal) stay; its log files
    keep every record.
    """
    import ray.data  # noqa: F401  (configures the ray.data logger on import)

    if not verbose():
        _filter_console(logging.getLogger("ray.data"), _OnlyProgressInfo())


class _HideRayInfo(logging.Filter):
    """Drops INFO and lower records that Ray's own code emits; keeps everything else."""

    def __init__(self, ray_dir: str) -> None:
        super().__init__()
        self.ray_dir = ray_dir

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(self.ray_dir)


def hide_ray_info_on_console() -> None:
    """In a Ray Train worker: keep Ray's INFO records off the root logger's console handlers.

    Ray Train's level setting (``train_logging_config``) filters only loggers named
    ``ray.train.*``; some of its per-report records come from a logger named after the file,
    which reaches the root logger's console handler. Its log files keep every record.
    """
    import ray

    _filter_console(logging.getLogger(), _HideRayInfo(os.path.dirname(ray.__file__) + os.sep))


class _HideHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in HARMLESS_RAY_WARNINGS)


def quiet_cluster_env() -> dict[str, str]:
    """Environment for the processes of a local cluster (``{}`` when verbose).

    Ray Data's console at WARNING but for its progress lines, wherever it runs (the split
    coordinator of a streamed training set prints a start, a plan and an end line per pass
    otherwise); its log files keep every record, as Ray configures them. Ray Data reads its
    logging configuration from the file ``RAY_DATA_LOGGING_CONFIG`` names when a process
    imports it; this one is Ray's own default with those changes. And Python's warnings
    filter drops the deprecation that Ray Train's own DatasetManager raises on every run
    with a dataset, which a user can do nothing about.
    """
    if verbose():
        return {}
    import ray.data._internal.logging as ray_data_logging

    config = copy.deepcopy(ray_data_logging.DEFAULT_CONFIG)
    config["filters"]["segrl_harmless"] = {"()": f"{__name__}.{_HideHarmless.__name__}"}
    console = config["handlers"]["console"]
    console["filters"] = [*console.get("filters", []), "segrl_harmless"]
    config["handlers"]["progress_console"] = dict(console)
    console["level"] = "WARNING"
    config["loggers"][RAY_DATA_PROGRESS_LOGGER] = {
        "level": "INFO", "handlers": ["progress_console"], "propagate": False,
    }
    path = Path(tempfile.gettempdir()) / f"segrl-ray-data-logging-{os.getuid()}.json"  # JSON is YAML
    text = json.dumps(config, indent=1, sort_keys=True)
    if not path.exists() or path.read_text() != text:
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)  # another job starting at the same time reads a whole file
    return {ray_data_logging.RAY_DATA_LOGGING_CONFIG_ENV_VAR_NAME: str(path),
            "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated"}


def hide_harmless_warnings() -> None:
    """Drop Ray's known-harmless warnings from the driver's console (no-op when verbose)."""
    import ray  # noqa: F401  (sets up the ray logger's console handler on import)

    if not verbose():
        _filter_console(logging.getLogger("ray"), _HideHarmless())


def filter_native_stderr(drop: tuple[str, ...] = HARMLESS_NATIVE_LINES) -> None:
    """Drop ``drop``'s lines from what this process writes to file descriptor 2 (no-op when
    verbose, or when already done).

    Descriptor 2 becomes a pipe to ``segrl/stderr_filter.py``, run as a child process that
    writes everything else to the real stderr as it arrives, so Ray's C++ lines are filtered
    too; the processes this one starts inherit the pipe. A terminal's width goes to
    ``COLUMNS``, which progress bars read when their stream is no terminal.
    """
    global _native_filter
    if verbose() or _native_filter is not None:
        return
    if os.isatty(2):
        os.environ.setdefault("COLUMNS", str(os.get_terminal_size(2).columns))
    _native_filter = subprocess.Popen(
        [sys.executable, stderr_filter.__file__, *drop], stdin=subprocess.PIPE, close_fds=True)
    sys.stderr.flush()
    os.dup2(_native_filter.stdin.fileno(), 2)
    _native_filter.stdin.close()  # descriptor 2 is now the pipe's only write end here


def exit_now(code: int) -> None:
    """Flush what was printed and end the process with ``code``, skipping interpreter teardown.

    For jobs that start no Ray and hold no open file (jobs/import_labels.py): pyarrow's
    native thread pools (Arrow, jemalloc, the AWS SDK) can still be winding down while
    C++ static destructors run at a normal exit, which aborts the process ("terminate
    called without an active exception", rc 134) and hides the job's real exit status.
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)
