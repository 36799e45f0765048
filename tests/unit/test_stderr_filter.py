"""Ray's C++ lines on file descriptor 2: the harmless ones dropped, everything else kept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from segrl.console import HARMLESS_NATIVE_LINES, VERBOSE_ENV
from segrl.stderr_filter import filter_chunk

DROP = [b"object store"]


def test_whole_lines_with_a_dropped_text_go_and_the_rest_stay_in_order():
    out, held = filter_chunk(b"a\n[E] args in the object store\nb\n", DROP)
    assert (out, held) == (b"a\nb\n", b"")


def test_an_unfinished_line_is_held_until_its_newline_then_judged():
    out, held = filter_chunk(b"a\n[E] args in the obj", DROP)
    assert (out, held) == (b"a\n", b"[E] args in the obj")
    out, held = filter_chunk(held + b"ect store\nc", DROP)
    assert (out, held) == (b"", b"c")


def test_a_progress_bar_redraw_is_written_at_once_and_kept_when_a_dropped_line_follows_it():
    out, held = filter_chunk(b"\rscore 1/4", DROP)
    assert (out, held) == (b"\rscore 1/4", b"")
    # the bar drew, then Ray's line came before any newline: the bar stays, the line goes
    out, held = filter_chunk(b"\rscore 2/4\r[E] in the object store\n", DROP)
    assert (out, held) == (b"\rscore 2/4\r", b"")


def run_driver(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """A process that installs the filter, then writes to descriptor 2 as C++ code would."""
    script = textwrap.dedent(f"""
        import os, sys
        from segrl.console import filter_native_stderr
        filter_native_stderr()
        os.write(2, b"[E core_worker.cc] Actor ... {HARMLESS_NATIVE_LINES[0]}. See ...\\n")
        os.write(2, b"[E core_worker.cc] a real error\\n")
        print("a Python warning", file=sys.stderr, flush=True)
        os.abort()  # a crash: what was written before it must still arrive
    """)
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=60)


def test_the_driver_filter_drops_rays_harmless_line_keeps_real_ones_and_survives_a_crash():
    done = run_driver({VERBOSE_ENV: ""})
    assert done.returncode != 0
    assert done.stderr.decode().splitlines() == ["[E core_worker.cc] a real error", "a Python warning"]


def test_verbose_shows_rays_harmless_line_too():
    done = run_driver({VERBOSE_ENV: "1"})
    assert HARMLESS_NATIVE_LINES[0] in done.stderr.decode()
    assert "a real error" in done.stderr.decode()
