import os
import signal
import subprocess
import sys
import time

import pytest

from segrl.threads import (
    CpuSample,
    ThreadGovernor,
    busy_elsewhere,
    children_cpu_s,
    choose_threads,
    granted_threads,
    parse_proc_stat,
    read_sample,
    usable_cpus,
)

PROC_STAT = """cpu  1000 200 300 5000 100 10 20 5 0 0
cpu0 500 100 150 2500 50 5 10 3 0 0
cpu1 500 100 150 2500 50 5 10 2 0 0
intr 12345
"""


def test_proc_stat_busy_is_user_nice_system_irq_softirq_steal_and_total_adds_idle_and_iowait():
    busy, nice, total = parse_proc_stat(PROC_STAT)
    assert busy == 1000 + 200 + 300 + 10 + 20 + 5
    assert nice == 200
    assert total == busy + 5000 + 100


def test_proc_stat_without_a_cpu_line_is_an_error():
    with pytest.raises(ValueError, match="cpu"):
        parse_proc_stat("intr 1\n")


def sample(wall, busy, nice, total, own):
    return CpuSample(wall=wall, busy_ticks=busy, nice_ticks=nice, total_ticks=total, own_cpu_s=own)


def test_busy_elsewhere_is_the_machines_busy_cpus_less_this_process_own():
    # 2 CPUs for 10 s (2000 ticks): 1500 busy ticks = 1.5 CPUs, 300 of them niced; this
    # process used 10 CPU-seconds = 1 CPU
    before, after = sample(0.0, 0, 0, 0, 0.0), sample(10.0, 1500, 300, 2000, 10.0)
    assert busy_elsewhere(before, after, cpus=2, count_niced=True) == pytest.approx(0.5)
    # a process at nice 0 is given the niced processes' cores: their time is not a load
    assert busy_elsewhere(before, after, cpus=2, count_niced=False) == pytest.approx(0.2)
    # never below nothing nor above the machine
    assert busy_elsewhere(before, sample(10.0, 100, 0, 2000, 10.0), 2, True) == 0.0
    assert busy_elsewhere(before, sample(10.0, 2000, 0, 2000, -50.0), 2, True) == 2.0
    assert busy_elsewhere(before, before, 2, True) == 0.0  # no time passed


@pytest.mark.parametrize(("most", "cpus", "elsewhere", "threads"), [
    (2, 2, 0.0, 2),   # idle machine: every granted thread
    (2, 2, 0.4, 2),   # daemons' bursts do not take a core
    (2, 2, 0.6, 1),   # more than half a core taken: one thread fewer
    (2, 2, 2.0, 1),   # a fully busy machine still gets one thread
    (4, 8, 1.0, 4),   # never more than granted
    (8, 4, 1.3, 3),
])
def test_threads_are_the_free_cores_at_most_the_granted_at_least_one(most, cpus, elsewhere, threads):
    assert choose_threads(most, cpus, elsewhere) == threads


def test_granted_threads_are_the_configured_count_else_the_granted_cpus_rounded_up():
    assert granted_threads(0, 1.5) == 2
    assert granted_threads(0, 0.25) == 1
    assert granted_threads(3, 1.0) == 3


class FakeMachine:
    """Clocks the governor reads: ``busy_other`` CPUs of 2 used by other processes."""

    def __init__(self):
        self.wall, self.busy, self.total, self.own, self.busy_other = 0.0, 0, 0, 0.0, 0.0

    def advance(self, seconds, own_cpus=1.0):
        self.wall += seconds
        self.total += int(200 * seconds)  # 2 CPUs at 100 ticks a second
        self.busy += int(100 * seconds * (own_cpus + self.busy_other))
        self.own += own_cpus * seconds

    def sample(self):
        return CpuSample(self.wall, self.busy, 0, self.total, self.own)


def test_governor_follows_the_load_only_every_few_seconds_and_sets_threads_only_on_change():
    machine, calls = FakeMachine(), []
    governor = ThreadGovernor(2, calls.append, every_s=5.0, sample=machine.sample, cpus=2,
                              clock=lambda: machine.wall)
    assert calls == [2] and governor.threads == 2
    machine.busy_other = 1.0  # another process takes a core
    machine.advance(3.0)
    assert governor.step() is None  # too soon to look
    machine.advance(3.0)
    assert governor.step() == 1 and calls == [2, 1]
    machine.advance(6.0)
    assert governor.step() is None and calls == [2, 1]  # still busy: nothing to set
    machine.busy_other = 0.0
    machine.advance(6.0)
    assert governor.step() == 2 and calls == [2, 1, 2] and governor.changes == 2


def test_governor_that_does_not_adapt_keeps_the_most():
    machine, calls = FakeMachine(), []
    governor = ThreadGovernor(2, calls.append, adapt=False, sample=machine.sample, cpus=2,
                              clock=lambda: machine.wall)
    machine.busy_other = 2.0
    machine.advance(60.0)
    assert governor.step() is None and calls == [2]


def test_a_real_busy_process_takes_a_core_from_the_governor():
    cpus = usable_cpus()
    # a grandchild (under a shell that waits): another process's work, as a child's is not
    busy = subprocess.Popen(["sh", "-c", f"{sys.executable} -c 'while True: pass'; true"], start_new_session=True)
    try:
        time.sleep(0.5)  # the child is running
        before = read_sample()
        assert before is not None, "this machine has /proc/stat"
        calls = []
        governor = ThreadGovernor(cpus, calls.append, every_s=1.0, cpus=cpus)
        time.sleep(1.5)
        after = read_sample()
        assert busy_elsewhere(before, after, cpus, count_niced=False) >= 0.7
        governor.step()
        assert governor.threads <= max(1, cpus - 1)
    finally:
        os.killpg(busy.pid, signal.SIGKILL)
        busy.wait()


def test_a_busy_child_process_does_its_parents_work_and_takes_no_core_from_it():
    """A DataLoader worker is a child of the training process: its CPU is the process's own."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        before = read_sample()
        time.sleep(1.5)
        after = read_sample()
        assert after.children_cpu_s[child.pid] - before.children_cpu_s[child.pid] >= 0.7  # it ran
        assert busy_elsewhere(before, after, usable_cpus(), count_niced=False) < 0.5
    finally:
        child.kill()
        child.wait()
    assert child.pid not in children_cpu_s()


def test_children_time_counts_only_what_they_spent_between_two_samples():
    # 2 CPUs for 10 s, all busy; this process 5 CPU-s; child 7 ran 4 s of it (6 before),
    # child 9 started in between and ran 3 s, child 8 ended: 2 CPUs - 1.2 = 0.8 elsewhere
    before = CpuSample(0.0, 0, 0, 0, 0.0, {7: 6.0, 8: 1.0})
    after = CpuSample(10.0, 2000, 0, 2000, 5.0, {7: 10.0, 9: 3.0})
    assert busy_elsewhere(before, after, cpus=2, count_niced=True) == pytest.approx(0.8)
