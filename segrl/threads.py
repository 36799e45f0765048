"""How many torch threads a training or scoring process runs: the CPUs it was granted, fewer
while other processes keep the machine's cores busy.

torch's CPU kernels run on OpenMP threads that spin at every barrier. When another process
takes one of their cores, the whole team waits for the preempted thread: on 2 cores with two
other busy processes, an LR-ASPP training step ran at 4.2 images/s with 2 threads and 9.6
with 1 (19.6 with 2 on an idle machine), so a process that keeps as many threads as cores
loses far more than its fair share. A passive OpenMP wait policy (``OMP_WAIT_POLICY=PASSIVE``)
avoided most of that collapse but cost about 10% on an idle machine, so segrl instead runs
as many threads as there are cores nobody else is using, never more than it was granted,
and looks again every few seconds (``torch.set_num_threads`` may change between steps).

The machine's load comes from ``/proc/stat`` (all CPUs' busy time) less the CPU time of this
process and of its child processes (its DataLoader workers, which do its work), so neither
its own threads nor its loaders count against it. Time spent by processes
niced below this one is left out: the kernel gives this process their cores when it wants
them. Where ``/proc/stat`` does not exist the granted count is kept.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROC_STAT = Path("/proc/stat")
CHECK_EVERY_S = 5.0  # between looks at the machine's load: a step is 0.1-1 s on a CPU


@dataclass(frozen=True)
class CpuSample:
    """A moment's CPU clocks: the machine's busy and total seconds over every CPU, in ticks,
    the part of busy spent by niced processes, this process's own CPU seconds and those of
    each of its live child processes."""

    wall: float
    busy_ticks: int
    nice_ticks: int
    total_ticks: int
    own_cpu_s: float
    children_cpu_s: dict[int, float] = field(default_factory=dict)  # live child processes', by pid


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """``(busy, nice, total)`` ticks from ``/proc/stat``'s aggregate ``cpu`` line: busy is
    user + nice + system + irq + softirq + steal; idle and iowait are free time."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (fields[1:9] + ["0"] * 8)[:8])
            busy = user + nice + system + irq + softirq + steal
            return busy, nice, busy + idle + iowait
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def busy_elsewhere(before: CpuSample, after: CpuSample, cpus: int, count_niced: bool) -> float:
    """CPUs (a float, 0..``cpus``) that processes other than this one kept busy between two
    samples. Niced time counts only when ``count_niced`` (this process is niced too)."""
    ticks = after.total_ticks - before.total_ticks
    wall = after.wall - before.wall
    if ticks <= 0 or wall <= 0:
        return 0.0
    busy = after.busy_ticks - before.busy_ticks
    if not count_niced:
        busy -= after.nice_ticks - before.nice_ticks
    machine = cpus * busy / ticks
    # a child that started in between spent all its time in between; one that ended took
    # its last stretch with it (unknowable, and short: the governor looks every few seconds)
    children = sum(cpu - before.children_cpu_s.get(pid, 0.0) for pid, cpu in after.children_cpu_s.items())
    own = (after.own_cpu_s - before.own_cpu_s + children) / wall
    return min(float(cpus), max(0.0, machine - own))


def choose_threads(most: int, cpus: int, elsewhere: float) -> int:
    """Threads to run: the cores nobody else is using (a core counts as taken once another
    process uses more than half of it), at most ``most``, at least one."""
    free = cpus - elsewhere
    return max(1, min(most, math.floor(free + 0.5)))


def granted_threads(threads_per_worker: int, granted_cpus: float) -> int:
    """The most threads a worker runs: ``threads_per_worker`` when set, else the CPUs Ray
    granted it rounded up (at least one)."""
    return threads_per_worker or max(1, math.ceil(granted_cpus))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cpusets), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def children_cpu_s(pid: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) of each live child process of ``pid`` (this process), from
    ``/proc/<pid>/task/*/children`` and each child's ``/proc/<child>/stat``; ``{}`` where
    those cannot be read."""
    tasks = Path(f"/proc/{pid or os.getpid()}/task")
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, float] = {}
    try:
        threads = list(tasks.iterdir())
    except OSError:
        return found
    for thread in threads:
        try:
            kids = (thread / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                # after the command's closing parenthesis: state is field 3, utime 14, stime 15
                fields = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
                found[int(kid)] = (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                continue  # it ended meanwhile
    return found


def read_sample() -> CpuSample | None:
    """Now's clocks, or None where ``/proc/stat`` cannot be read."""
    try:
        busy, nice, total = parse_proc_stat(PROC_STAT.read_text())
    except (OSError, ValueError):
        return None
    return CpuSample(time.monotonic(), busy, nice, total, time.process_time(), children_cpu_s())


class ThreadGovernor:
    """Keeps torch's thread count at :func:`choose_threads` of the machine's current load.

    ``set_threads`` is ``torch.set_num_threads`` (passed in, so that importing this module
    does not import torch). Call :meth:`step` once per training step (or scored batch); it
    looks at the load every ``every_s`` seconds and sets the count only when it changes.
    ``adapt=False`` pins the count at ``most``.
    """

    def __init__(self, most: int, set_threads: Callable[[int], None], adapt: bool = True,
                 every_s: float = CHECK_EVERY_S, sample: Callable[[], CpuSample | None] = read_sample,
                 cpus: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.most, self.every_s, self.sample, self.set_threads = most, every_s, sample, set_threads
        self.clock = clock
        self.cpus = cpus or usable_cpus()
        self.count_niced = os.nice(0) > 0
        self.threads = most
        self.changes = 0
        set_threads(most)
        self.last = sample() if adapt else None  # None: not adapting (or no /proc/stat)

    def step(self) -> int | None:
        """The new thread count if it changed now, else None."""
        # the clock first: reading /proc/stat every step would cost more than it tells
        if self.last is None or self.clock() - self.last.wall < self.every_s:
            return None
        now = self.sample()
        if now is None:
            return None
        elsewhere = busy_elsewhere(self.last, now, self.cpus, self.count_niced)
        self.last = now
        threads = choose_threads(self.most, self.cpus, elsewhere)
        if threads == self.threads:
            return None
        self.threads = threads
        self.changes += 1
        self.set_threads(threads)
        return threads
