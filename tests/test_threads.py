"""OpenMP's threads: the wait policy, chosen before torch loads libgomp (which reads it once) unless the user did,
and the thread count, re-chosen from /proc/stat as an engine on the CPU works unless it was fixed (`-t N`,
OMP_NUM_THREADS). Their speed is a measurement (scripts/threads_under_load.py, docs/measurements.md), not a test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moe_local
from moe_local import threads
from moe_local.errors import ConfigError
from moe_local.threads import INTERVAL_S, TICKS_PER_S, CpuSample, ThreadCount, choose_threads, parse_proc_stat

THROUGH_THE_CLI = """
import os, sys
from moe_local import cli
sys.argv = ["moe-local", "--version"]
try:
    cli.main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""

THROUGH_THE_LIBRARY = """
import os, sys
import moe_local
moe_local.load  # what `moe_local.load(...)` does first
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), "torch" in sys.modules)
"""


def environment_seen(script: str, **given: str) -> list[str]:
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", script], env={**env, **given}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1].split()  # the last line: after what the command printed


@pytest.mark.parametrize("script", [THROUGH_THE_CLI, THROUGH_THE_LIBRARY], ids=["cli", "library"])
def test_threads_spin_briefly_before_they_sleep_unless_the_user_chose(script):
    assert environment_seen(script)[:2] == ["None", "300"]
    assert environment_seen(script, OMP_WAIT_POLICY="active")[:2] == ["active", "None"]
    assert environment_seen(script, GOMP_SPINCOUNT="10000")[:2] == ["None", "10000"]


def test_the_library_sets_the_policy_before_torch_is_imported_and_not_after():
    assert environment_seen(THROUGH_THE_LIBRARY) == ["None", "300", "True"]  # set, then the engine imported torch
    late = "import torch\n" + THROUGH_THE_LIBRARY  # libgomp has read its environment already: nothing to set
    assert environment_seen(late)[:2] == ["None", "None"]


def proc_stat(cpus: list[tuple[int, int]]) -> str:
    """/proc/stat as Linux writes it, each CPU's (busy, idle) ticks split over its fields."""
    lines = [f"cpu  {sum(b for b, _ in cpus)} 0 0 {sum(i for _, i in cpus)} 0 0 0 0 0 0"]
    for n, (busy, idle) in enumerate(cpus):
        user, system, irq, steal = busy - busy // 2 - 3, busy // 2, 2, 1
        lines.append(f"cpu{n} {user} 0 {system} {idle - 5} 5 {irq} 0 {steal} 0 0")
    lines += ["intr 8336326 0 0 4 4 15", "ctxt 20197336", "btime 1764750000", "processes 90210", "procs_running 3", "procs_blocked 0"]
    return "\n".join(lines) + "\n"


def test_proc_stat_is_read_as_busy_and_total_ticks_of_the_cpus_this_process_may_use():
    text = proc_stat([(600, 400), (300, 700), (100, 900)])
    assert parse_proc_stat(text) == (1000, 3000, 3)
    assert parse_proc_stat(text, allowed={0, 2}) == (700, 2000, 2)
    assert parse_proc_stat("cpu0 10 0 5 85\n") == (15, 100, 1)  # before Linux 2.6.11: no iowait, irq, softirq, steal
    with pytest.raises(ValueError):
        parse_proc_stat(text, allowed={7})
    niced = "cpu0 10 40 5 45 0 0 0 0\n"  # 40 ticks of work at a lowered priority, which yields its core: idle to us
    assert parse_proc_stat(niced) == (15, 100, 1)
    assert parse_proc_stat(niced, niced_busy=True) == (55, 100, 1)  # unless this process runs niced too


def window(others_cores: float, own_cores: float = 0.0, cpus: int = 2, seconds: float = 1.0):
    """Two readings `seconds` apart on a machine of `cpus` cores where the other processes kept `others_cores` of
    them busy and this one `own_cores`."""
    ticks = round(seconds * TICKS_PER_S)
    busy = round((others_cores + own_cores) * ticks)
    spread = [(busy // cpus + (n < busy % cpus), ticks - busy // cpus - (n < busy % cpus)) for n in range(cpus)]
    before = CpuSample(*parse_proc_stat(proc_stat([(1000, 1000)] * cpus)), own_s=10.0)
    after = CpuSample(*parse_proc_stat(proc_stat([(1000 + b, 1000 + i) for b, i in spread])), own_s=10.0 + own_cores * seconds)
    return before, after


def test_every_core_while_the_others_leave_them_idle():
    assert choose_threads(*window(others_cores=0.0), most=2) == 2
    assert choose_threads(*window(others_cores=0.2, own_cores=1.8), most=2) == 2  # our own work is not theirs
    assert choose_threads(*window(others_cores=0.5, cpus=16), most=8) == 8  # never more than torch's count


def test_a_core_another_program_keeps_busy_is_left_to_it():
    assert choose_threads(*window(others_cores=1.0, own_cores=1.0), most=2) == 1
    # while two threads of ours share the cores with it, the program gets less than its core, still most of it
    assert choose_threads(*window(others_cores=0.6, own_cores=1.4), most=2) == 1
    assert choose_threads(*window(others_cores=3.0, own_cores=5.0, cpus=8), most=8) == 5


def test_one_thread_on_a_machine_crowded_with_other_work():
    # each step of two threads waits for both to be scheduled among the others' tasks
    assert choose_threads(*window(others_cores=1.8, own_cores=0.2), most=2) == 1
    assert choose_threads(*window(others_cores=2.0), most=2) == 1  # never fewer than one


class Machine:
    """/proc/stat and the clock for a ThreadCount, moved by the test: `others_cores` busy from now on."""

    def __init__(self, cpus: int = 2):
        self.now, self.ticks, self.cpus, self.others_cores = 100.0, 0, cpus, 0.0

    def wait(self, seconds: float) -> None:
        self.now += seconds
        self.ticks += round(self.others_cores * seconds * TICKS_PER_S)

    def read(self) -> CpuSample:
        return CpuSample(self.ticks, round(self.now * TICKS_PER_S) * self.cpus, self.cpus, own_s=0.0)

    def started(self) -> ThreadCount:
        """A ThreadCount on this machine after the engine's first step (its first window began at the build)."""
        count = ThreadCount(self.read, lambda: self.now)
        count.check()
        return count

    def step(self, count: ThreadCount, after_s: float) -> int:
        """The engine's next step `after_s` later: the thread count it runs on."""
        self.wait(after_s)
        count.check()
        return torch.get_num_threads()


@pytest.fixture
def torch_threads():
    """torch's count set to 2 for the test (as on a 2-core machine), and put back after, with threads.py's memory."""
    before, changed = torch.get_num_threads(), threads._changed
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    threads._changed = changed


def test_the_count_follows_the_machine_as_the_engine_steps(torch_threads):
    machine = Machine()
    count = machine.started()
    machine.others_cores = 1.0  # a program starts on one core
    assert machine.step(count, INTERVAL_S / 2) == 2  # not read yet: once every INTERVAL_S
    assert machine.step(count, INTERVAL_S) == 1
    machine.others_cores = 0.0  # it ends
    assert machine.step(count, INTERVAL_S) == 2


def test_a_pause_between_steps_is_a_window_to_choose_from(torch_threads):
    """What the others did while the engine waited (a chat's user typing, the server between requests, the load)
    chooses the next step's count: a run that began on every core beside a busy program spent its first window
    ~10x slower, where one thread too few costs 2x at worst."""
    machine = Machine()
    count = machine.started()
    machine.others_cores = 1.0  # a program works on one core while the engine waits
    machine.wait(10.0)
    assert machine.step(count, 0.0) == 1  # the first step after the pause already leaves it its core
    machine.others_cores = 0.0
    machine.wait(10.0)
    assert machine.step(count, 0.0) == 2


def test_the_first_step_is_chosen_from_the_load(torch_threads):
    machine = Machine()
    machine.others_cores = 1.0
    count = ThreadCount(machine.read, lambda: machine.now)  # built as the engine loads
    assert machine.step(count, 2.0) == 1  # its first step


def test_an_engine_built_after_another_lowered_the_count_may_use_every_core_again(torch_threads):
    machine = Machine()
    first = machine.started()
    machine.others_cores = 1.0
    assert machine.step(first, INTERVAL_S) == 1
    assert ThreadCount(machine.read).most == 2
    torch.set_num_threads(1)  # a program's own choice after that is its ceiling again
    threads._changed = (2, 3)
    assert ThreadCount(machine.read).most == 1


def test_threads_given_are_fixed_and_otherwise_chosen_on_the_cpu(tiny, torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite's conftest fixes the count: not here
    engine = moe_local.load(tiny[0], device="cpu", threads=1)
    assert engine.threads is None and torch.get_num_threads() == 1
    assert isinstance(threads.thread_count(None, "cpu"), ThreadCount)
    assert threads.thread_count(None, "cuda") is None  # beside a GPU: the count the CPU channel was measured with
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's count, as torch took it: fixed as -t
    assert threads.thread_count(None, "cpu") is None

    def no_proc_stat():
        raise OSError("no /proc/stat")  # not Linux: torch's count, as before

    monkeypatch.setattr(threads, "read_sample", no_proc_stat)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.thread_count(None, "cpu") is None
    with pytest.raises(ConfigError, match="--threads must be at least 1"):
        moe_local.Options(threads=0)
