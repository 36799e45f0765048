"""Processes of this test's own Ray cluster, found through /proc.

Tests that kill a Ray worker must not hit another test process's cluster on the same machine
(pytest-xdist runs two): a process counts only if this process is among its ancestors.
"""

from __future__ import annotations

import os
from pathlib import Path


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state letter


def own_descendants(*markers: str) -> list[int]:
    """PIDs of this process's descendants whose command line contains every marker, oldest first."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if not all(marker in cmdline for marker in markers):
            continue
        pid = ancestor = int(entry.name)
        while ancestor > 1:
            ancestor = _parent(ancestor)
            if ancestor == me:
                found.append(pid)
                break
    return sorted(found)
