"""``threads: auto``: as many torch CPU threads as the cores other processes leave free, re-chosen as the load moves.

A CPU step of maskprop's compact execution runs many small operations, each an OpenMP parallel region that waits for
all of its threads. When another process holds one of the cores, a thread of ours is parked behind it and every region
waits for it: on the 2-core machine of BENCHMARKS.md ("Notes on measuring on this machine"), beside two busy
processes, a compact VGG-11 step took 1031 ms with 2 threads and 756 ms with 1, and its speedup over the dense step
measured in the same way fell from 2.54x (1 thread) to 1.73x (2 threads). As many threads as there are free cores
avoid that wait.

:class:`RunThreads` measures, between two readings, how many of the cores this process may run on were busy with
anything else (``/proc/stat``'s busy time of those cores, less this process's own CPU time, over the wall time: other
processes, this run's data-loading workers, the hypervisor's steal), and sets ``torch.set_num_threads`` to the free
cores rounded down (a core counts as free when at most :data:`BUSY_SLACK` of it was busy), between 1 and the thread
count torch started with (``OMP_NUM_THREADS`` or the cores). The trainer reads it before each epoch and, within an
epoch, between two steps once :data:`INTERVAL_S` have passed since the last reading (an epoch of a CIFAR recipe on the
CPU lasts minutes, a load can come and go inside it), so a run follows the machine's load; a dense reference step
(``timing.py``) runs right after the step it is paired with, so each pair shares its thread count. Where
``/proc/stat`` cannot be read (not Linux), ``auto`` leaves torch's default. :func:`maskprop.fit` sets the threads back
to what they were when it returns. ``maskprop bench`` states the same measure of the load beside its table
(:func:`busy_by_others`), so that a table measured on a busy machine says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["BUSY_SLACK", "INTERVAL_S", "CpuReading", "RunThreads", "allowed_cores", "busy_by_others", "check_threads",
           "free_cores", "read_cpu", "run_threads"]

logger = logging.getLogger(__name__)

BUSY_SLACK = 0.2
"""The share of a core that others may keep busy and it still counts as free (daemons, a terminal, a logger)."""

MIN_INTERVAL_S = 0.5
"""The shortest wall time a choice is measured over: the first one waits for the rest of it."""

INTERVAL_S = 30.0
"""How long ``auto`` keeps a choice within a stretch of steps before it reads the load again (:meth:`RunThreads.tick`):
long against ``/proc/stat``'s 10 ms ticks and a reading's cost (a file read), short against an epoch on the CPU."""


@dataclass(frozen=True)
class CpuReading:
    """The clocks one reading compares: wall time, busy time of the cores this process may use, its own CPU time
    (all seconds)."""

    wall: float
    busy: float
    own: float


def _allowed_cpus() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def read_cpu(stat: str = "/proc/stat") -> CpuReading | None:
    """The clocks now, or ``None`` where ``stat`` cannot be read or parsed (not Linux).

    Busy time is ``user + nice + system + irq + softirq + steal`` of each core this process may run on (its
    affinity), ``/proc/stat``'s ticks over ``SC_CLK_TCK``; idle and I/O wait are free time.
    """
    cpus = _allowed_cpus()
    try:
        with open(stat, encoding="ascii") as file:
            lines = file.read().splitlines()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy, seen = 0, 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        try:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        except ValueError:
            return None
        busy += user + nice + system + irq + softirq + steal
        seen += 1
    if seen == 0:
        return None
    return CpuReading(wall=time.monotonic(), busy=busy / ticks, own=time.process_time())


def busy_by_others(start: CpuReading, end: CpuReading, cores: int) -> float:
    """How many of ``cores`` other processes kept busy between two readings: busy time less this process's own CPU
    time, over the wall time (between 0 and ``cores``; ``/proc/stat`` counts in ticks of 10 ms)."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    return min(float(cores), max(0.0, (end.busy - start.busy) - (end.own - start.own)) / wall)


def free_cores(cores: int, others: float) -> int:
    """The cores others left free (at least 1): a core counts as free when at most :data:`BUSY_SLACK` of it was
    busy."""
    return max(1, math.floor(cores - others + BUSY_SLACK))


def allowed_cores() -> int:
    """The cores this process may run on (its affinity, else ``os.cpu_count()``)."""
    allowed = _allowed_cpus()
    return len(allowed) if allowed else (os.cpu_count() or 1)


class RunThreads:
    """torch's CPU threads for a run: a fixed count, or (``setting="auto"``) the cores other processes leave free.

    Args:
        setting: ``"auto"``, an integer >= 1 (set by :func:`run_threads`), or ``None`` / 0 (torch's threads as they
            are).
        cores: The cores this process may run on (default: its affinity, else ``os.cpu_count()``).
        most: The most threads ``auto`` sets (default: ``torch.get_num_threads()`` now, torch's default or the user's).
        read: The clock reader (:func:`read_cpu`; a test passes its own).
        sleep: How to wait (``time.sleep``; a test passes its own).
        clock: The wall clock the readings' ``wall`` is on (``time.monotonic``; a test passes its own).
        interval: Seconds between two choices within a stretch of steps (:meth:`tick`).
    """

    def __init__(self, setting: int | str | None = "auto", cores: int | None = None, most: int | None = None,
                 read: Callable[[], CpuReading | None] = read_cpu, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL_S) -> None:
        self.setting = check_threads(setting) or None
        self.cores = cores if cores is not None else allowed_cores()
        self.most = most if most is not None else torch.get_num_threads()
        self._read, self._sleep, self._clock, self.interval = read, sleep, clock, interval
        self._last = read() if self.setting == "auto" else None
        self.used: list[int] = []  # the threads of each stretch of steps, in order
        self.others: float | None = None  # the cores others kept busy over the last interval

    def update(self) -> int:
        """Before a stretch of steps (an epoch): set torch's threads for what comes next (a fixed count; with
        ``auto``, from the load measured since the last update, or since creation).

        Returns:
            The threads now set (``auto`` leaves them as they are where the clocks cannot be read).
        """
        if isinstance(self.setting, int) and self.setting != torch.get_num_threads():
            torch.set_num_threads(self.setting)
        threads = torch.get_num_threads()
        if self._last is not None:
            if not self.used:  # the first choice: measured over at least MIN_INTERVAL_S
                self._sleep(max(0.0, MIN_INTERVAL_S - (self._clock() - self._last.wall)))
            now = self._read()
            if now is not None and now.wall > self._last.wall:
                self.others, self._last = busy_by_others(self._last, now, self.cores), now
                threads = min(self.most, free_cores(self.cores, self.others))
                if threads != torch.get_num_threads():
                    logger.info("torch threads %d -> %d: other processes kept %.1f of the %d cores busy "
                                "(threads: auto)", torch.get_num_threads(), threads, self.others, self.cores)
                    torch.set_num_threads(threads)
        self.used.append(threads)
        return threads

    def tick(self) -> None:
        """Between two steps of a stretch: with ``auto``, :meth:`update` again once :attr:`interval` seconds have passed
        since the last reading (a fixed count, or clocks that cannot be read, cost one comparison)."""
        if self._last is not None and self.used and self._clock() - self._last.wall >= self.interval:
            self.update()

    def record(self) -> dict[str, object]:
        """What the summary says of it: the setting (``null``: torch's default) and the fewest and most threads the
        run's steps used."""
        used = self.used or [torch.get_num_threads()]
        return {"setting": self.setting, "used": [min(used), max(used)]}


def check_threads(value: object) -> int | str | None:
    """``value`` if it is a ``threads`` setting (``"auto"``, an integer >= 0, ``None``), else a one-line
    ``ValueError``."""
    if value == "auto" or value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"threads={value!r}: expected 'auto' or an integer >= 0 (0: torch's default)")


@contextlib.contextmanager
def run_threads(setting: int | str | None) -> Iterator[RunThreads]:
    """A run's :class:`RunThreads` (an integer setting set now), torch's threads set back to what they were on exit.

    Raises:
        ValueError: Not a ``threads`` setting (before anything is set).
    """
    check_threads(setting)
    before = torch.get_num_threads()
    try:
        if setting != "auto" and setting:
            torch.set_num_threads(setting)
        yield RunThreads(setting)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
