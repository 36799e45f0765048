"""Processes of this test's own Ray cluster, found through /proc.

Tests that kill a Ray worker must not hit another test process's cluster on the same machine
(pytest-xdist runs two): a process counts only if this process is among its ancestors.
"""

from __future__ import annotations

import os
import socket
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


def listening_addresses(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state that one of ``pids`` holds,
    read from /proc (the socket inodes of each process's open files, and the kernel's tables)."""
    owner = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[len("socket:["):-1]] = pid
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            host, port = local.split(":")
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
            found.append((owner[inode], socket.inet_ntop(family, raw), int(port, 16)))
    return found
