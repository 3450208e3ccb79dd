"""``threads: auto`` (maskprop/threads.py): the load it reads, the threads it sets, and a run that uses it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_RUN

import maskprop
from maskprop import threads as threads_module
from maskprop.threads import BUSY_SLACK, INTERVAL_S, MIN_INTERVAL_S, CpuReading, RunThreads, read_cpu, run_threads


@pytest.fixture
def set_threads(monkeypatch) -> list[int]:
    """torch's thread count as a plain variable (starting at 2), every set recorded."""
    count, sets = [2], []

    def set_num_threads(n: int) -> None:
        sets.append(n)
        count[0] = n

    monkeypatch.setattr(torch, "set_num_threads", set_num_threads)
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    return sets


class Clocks:
    """Readings where, per second of wall time, the cores were busy ``busy`` and this process ran ``own`` of it."""

    def __init__(self) -> None:
        self.wall = self.busy = self.own = 0.0

    def advance(self, seconds: float, busy: float, own: float) -> None:
        self.wall += seconds
        self.busy += busy * seconds
        self.own += own * seconds

    def read(self) -> CpuReading:
        return CpuReading(self.wall, self.busy, self.own)


def _threads(clocks: Clocks, cores: int = 2, most: int = 2, interval: float = 30.0) -> RunThreads:
    return RunThreads("auto", cores=cores, most=most, read=clocks.read, sleep=lambda s: None,
                      clock=lambda: clocks.wall, interval=interval)


@pytest.mark.parametrize(("cores", "most", "others", "expected"), [
    (2, 2, 0.0, 2),  # a quiet machine: torch's default
    (2, 2, BUSY_SLACK - 0.01, 2),  # a little background work leaves the core free
    (2, 2, BUSY_SLACK + 0.05, 1),  # more does not
    (2, 2, 1.0, 1),  # one busy process
    (2, 2, 5.0, 1),  # an overloaded machine: never fewer than one
    (16, 16, 3.0, 13),
    (16, 8, 3.0, 8),  # never more than torch started with (OMP_NUM_THREADS)
])
def test_auto_sets_the_cores_the_others_leave_free(set_threads, cores, most, others, expected):
    clocks = Clocks()
    choice = _threads(clocks, cores, most)
    own = 1.5  # this process's own threads are not a load: they are subtracted
    clocks.advance(10.0, busy=others + own, own=own)
    assert choice.update() == expected
    assert choice.others == pytest.approx(min(others, cores))  # at most every core
    assert set_threads == ([] if expected == 2 else [expected])
    assert choice.record() == {"setting": "auto", "used": [expected, expected]}


def test_auto_follows_the_load_from_one_update_to_the_next(set_threads, caplog):
    clocks, first_wait = Clocks(), []
    choice = RunThreads("auto", cores=2, most=2, read=clocks.read, sleep=first_wait.append)
    clocks.advance(0.1, busy=1.0, own=0.0)
    with caplog.at_level(logging.INFO, logger="maskprop.threads"):
        assert choice.update() == 1  # one other busy core
    assert "torch threads 2 -> 1: other processes kept 1.0 of the 2 cores busy" in caplog.text
    clocks.advance(30.0, busy=1.0, own=1.0)  # our one thread beside nothing else
    assert choice.update() == 2
    clocks.advance(30.0, busy=2.0, own=1.2)
    assert choice.update() == 1
    assert set_threads == [1, 2, 1] and choice.record()["used"] == [1, 2]
    # the first choice is measured over at least MIN_INTERVAL_S (time.monotonic() since creation: some of it is gone)
    assert len(first_wait) == 1 and 0.0 <= first_wait[0] <= MIN_INTERVAL_S


def test_without_clocks_or_with_a_fixed_setting_the_threads_stay(set_threads):
    assert RunThreads("auto", read=lambda: None).update() == 2  # not Linux: torch's default
    fixed = RunThreads(None)
    assert fixed.update() == 2 and fixed.record() == {"setting": None, "used": [2, 2]}
    assert RunThreads(0).record()["setting"] is None
    assert set_threads == []
    three = RunThreads(3)  # a fixed count: every update sets it (a loop of one's own needs no run_threads)
    assert three.update() == 3 and set_threads == [3] and three.update() == 3 and set_threads == [3]
    assert three.record() == {"setting": 3, "used": [3, 3]}


def test_run_threads_sets_a_count_and_puts_the_old_one_back(set_threads):
    with run_threads(3) as choice:
        assert torch.get_num_threads() == 3 and choice.record() == {"setting": 3, "used": [3, 3]}
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), run_threads(1):
        raise RuntimeError("a failed run")
    assert torch.get_num_threads() == 2 and set_threads == [3, 2, 1, 2]


@pytest.mark.parametrize("value", [-1, "two", 1.5, True])
def test_a_bad_setting_is_one_line(value):
    with pytest.raises(ValueError, match=r"^threads=.*: expected 'auto' or an integer >= 0 \(0: torch's default\)$"):
        with run_threads(value):
            pass


def test_read_cpu_sums_the_busy_ticks_of_the_cores_this_process_may_use(tmp_path):
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if not allowed:
        pytest.skip("no CPU affinity on this platform")
    other = max(allowed) + 1  # a core this process may not use: left out
    # user nice system idle iowait irq softirq steal guest guest_nice
    lines = ["cpu  999 999 999 999 999 999 999 999 0 0"]
    lines += [f"cpu{c} {10 + c} 1 2 500 7 3 4 5 0 0" for c in allowed]
    lines += [f"cpu{other} 1000 1000 1000 0 0 1000 1000 1000 0 0", "intr 1 2 3", "ctxt 5"]
    stat = tmp_path / "stat"
    stat.write_text("\n".join(lines) + "\n")
    reading = read_cpu(str(stat))
    ticks = sum(10 + c + 1 + 2 + 3 + 4 + 5 for c in allowed)  # idle and iowait are free time
    assert reading.busy == pytest.approx(ticks / os.sysconf("SC_CLK_TCK"))
    assert read_cpu(str(tmp_path / "missing")) is None
    stat.write_text("cpu0 a b c d e f g h\n")
    assert read_cpu(str(stat)) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_auto_measures_another_busy_process(set_threads):
    """A real reading: a child process spinning on a core for ~1.5 s counts as (about) one busy core."""
    choice = RunThreads("auto", cores=len(os.sched_getaffinity(0)), most=64)
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: "
                              "pass"])
    child.wait()
    choice.update()
    assert 0.5 <= choice.others <= choice.cores  # the spinning child (and whatever else shares the machine)


def test_within_an_epoch_a_choice_is_kept_for_the_interval_then_made_again(set_threads):
    """Between steps, ``tick`` reads the load only once ``interval`` seconds have passed since the last reading, and
    then measures it over those seconds alone; a fixed count never reads it."""
    clocks = Clocks()
    choice = _threads(clocks, interval=30.0)
    clocks.advance(31.0, busy=0.0, own=0.0)
    choice.tick()  # no choice made yet (the trainer's update before the first epoch makes it): nothing to follow,
    assert choice.used == [] and set_threads == []  # however long it has been
    clocks.advance(1.0, busy=0.0, own=0.0)
    assert choice.update() == 2
    clocks.advance(29.0, busy=2.0, own=1.0)  # another process takes a core ...
    choice.tick()  # ... but 29 s are not the interval yet
    assert choice.used == [2] and set_threads == []
    clocks.advance(1.0, busy=2.0, own=1.0)
    choice.tick()  # 30 s: measured over the 30 s since the last reading
    assert choice.used == [2, 1] and set_threads == [1] and choice.others == pytest.approx(1.0)
    clocks.advance(10.0, busy=1.0, own=1.0)
    choice.tick()
    assert choice.used == [2, 1]
    clocks.advance(20.0, busy=1.0, own=1.0)  # the other process has gone
    choice.tick()
    assert choice.used == [2, 1, 2] and set_threads == [1, 2]
    assert INTERVAL_S == RunThreads().interval
    fixed = RunThreads(1, read=clocks.read, clock=lambda: clocks.wall, interval=0.0)
    fixed.update()
    clocks.advance(100.0, busy=2.0, own=0.0)
    fixed.tick()
    assert fixed.used == [1] and fixed.others is None


def test_the_first_choice_waits_for_the_rest_of_its_interval_on_the_given_clock():
    """The first choice is measured over MIN_INTERVAL_S at least, on the clock the readings are on (the one given)."""
    clocks, slept = Clocks(), []
    clocks.advance(1000.0, busy=0.0, own=0.0)
    choice = RunThreads("auto", cores=2, most=2, read=clocks.read, sleep=slept.append, clock=lambda: clocks.wall)
    clocks.advance(0.2, busy=0.0, own=0.0)
    choice.update()
    assert slept == [pytest.approx(MIN_INTERVAL_S - 0.2)]


def test_a_run_with_the_static_steps_follows_the_load_after_every_step(tmp_path, monkeypatch):
    """The static steps' epochs (what CUDA runs, eagerly here) tick after every step too."""
    from maskprop.train import setup
    from maskprop.train.graphs import GraphsChoice

    monkeypatch.setattr(setup, "resolve_cuda_graphs", lambda cfg, device, model=None: GraphsChoice(True, False))
    ticks = []
    monkeypatch.setattr(threads_module.RunThreads, "update", lambda self: self.used.append(1) or 1)
    monkeypatch.setattr(threads_module.RunThreads, "tick", lambda self: ticks.append(self.setting))
    result = maskprop.fit(TINY_RUN, out=None, threads="auto")
    assert len(ticks) == sum(result["steps"].values()) > 0


def test_a_run_records_its_threads_and_gives_them_back(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    updates, ticks = [], []
    monkeypatch.setattr(threads_module.RunThreads, "update",
                        lambda self: updates.append(self.setting) or self.used.append(1) or 1)
    monkeypatch.setattr(threads_module.RunThreads, "tick", lambda self: ticks.append(self.setting))
    result = maskprop.fit(TINY_RUN, out=tmp_path / "auto", threads="auto")
    epochs = TINY_RUN["optim"]["epochs"] + TINY_RUN["finetune"]["epochs"]
    assert updates == ["auto"] * epochs  # before every epoch
    assert len(ticks) == sum(result["steps"].values()) > epochs  # and after every step within the epochs
    assert result["threads"] == {"setting": "auto", "used": [1, 1]}
    monkeypatch.undo()
    assert maskprop.fit(TINY_RUN, threads=1)["threads"] == {"setting": 1, "used": [1, 1]}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="^threads='all'"):
        maskprop.fit(TINY_RUN, out=tmp_path / "bad", threads="all")
    assert not (tmp_path / "bad").exists()


def test_each_choice_reads_the_load_since_the_last_one_alone(set_threads):
    """The interval starts where the last one ended: a quiet second after 30 busy seconds is a quiet machine; and
    this process's CPU time above the cores' busy ticks (their rounding) is no load, not a negative one."""
    clocks = Clocks()
    choice = _threads(clocks)
    clocks.advance(30.0, busy=2.0, own=1.0)
    assert choice.update() == 1 and choice.others == pytest.approx(1.0)
    clocks.advance(1.0, busy=1.0, own=1.0)
    assert choice.update() == 2 and choice.others == pytest.approx(0.0)
    clocks.advance(1.0, busy=0.95, own=1.0)
    assert choice.update() == 2 and choice.others == 0.0


def test_the_first_choice_waits_for_the_rest_of_min_interval(set_threads):
    waits = []
    now = lambda: CpuReading(time.monotonic(), 0.0, 0.0)  # noqa: E731
    choice = RunThreads("auto", cores=2, most=2, read=now, sleep=waits.append)
    time.sleep(0.2)
    choice.update()
    assert len(waits) == 1 and 0.0 <= waits[0] <= MIN_INTERVAL_S - 0.2 + 1e-3
    late = RunThreads("auto", cores=2, most=2, read=lambda: CpuReading(time.monotonic() - 1.0, 0.0, 0.0),
                      sleep=waits.append)
    late.update()
    assert waits[1] == 0.0  # measured over long enough already
