"""Drop known-harmless lines that Ray's C++ core writes straight to a process's stderr.

Python's logging filters (segrl.console) cannot reach these lines: Ray's core worker writes
them to file descriptor 2 from C++. ``segrl.console.filter_native_stderr`` points descriptor 2
at a pipe read by this file, run as a child process (as a script, so it imports nothing of
segrl, torch or Ray): it copies everything through to the real stderr, at once, except whole
lines that contain one of the texts given on its command line.

It runs apart from the process it serves so that a crash of that process (a segfault, an
abort) still reaches the console whole: the child drains the pipe to its end and then exits.
"""

from __future__ import annotations

import os
import select
import signal
import sys

# A line with no newline yet is held back this long (it may be the start of a line to drop),
# then written as it is: a prompt or a progress bar without "\r" must still show.
HOLD_SECONDS = 0.2
MAX_HELD_BYTES = 1 << 16


def filter_chunk(pending: bytes, drop: list[bytes]) -> tuple[bytes, bytes]:
    """Split ``pending`` into what to write now and what to hold until more arrives.

    Whole lines are written unless they contain one of ``drop``; a dropped line keeps what a
    progress bar drew before its last carriage return. The unfinished last line is held, but
    for a progress bar's redraw (it has a carriage return) or a very long line.
    """
    *lines, tail = pending.split(b"\n")
    kept = []
    for line in lines:
        redrawn, carriage_return, last = line.rpartition(b"\r")
        if any(text in last for text in drop):
            kept.append(redrawn + carriage_return)
        else:
            kept.append(line + b"\n")
    if b"\r" in tail or len(tail) > MAX_HELD_BYTES:
        kept.append(tail)
        tail = b""
    return b"".join(kept), tail


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def main(drop: list[bytes], source: int = 0, sink: int = 2) -> None:
    # Ctrl-C reaches the whole process group; this process must outlive its parent's last words
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    held = b""
    while True:
        ready, _, _ = select.select([source], [], [], HOLD_SECONDS if held else None)
        if not ready:  # nothing more came: the held line was all there is for now
            _write_all(sink, held)
            held = b""
            continue
        chunk = os.read(source, 1 << 16)
        if not chunk:  # every writer closed the pipe
            _write_all(sink, held)
            return
        out, held = filter_chunk(held + chunk, drop)
        _write_all(sink, out)


if __name__ == "__main__":
    try:
        main([text.encode() for text in sys.argv[1:]])
    except BrokenPipeError:  # the console itself went away
        pass
