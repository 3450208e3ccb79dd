"""Stopping a run cleanly: SIGTERM or SIGUSR1 make it save a checkpoint after the step it is in and stop.

A cluster's scheduler warns a job before it ends it (SLURM sends SIGTERM, or a signal chosen with ``--signal``, some
time before SIGKILL; torchrun passes SIGTERM on to its workers). While :func:`maskprop.fit` trains a run that has a
directory, :class:`StopSignals` catches both signals: the run finishes the step it is in, writes ``last.pt`` in the
middle of its epoch (the epoch's position and sums with it: ``maskprop train --resume`` continues from that batch,
exactly) and raises :class:`RunStopped`, which ``maskprop train`` reports in one line, exiting with ``128 + signal``
as a process the signal had ended would. More of them change nothing (a scheduler that signals every process of a job
and torchrun, which passes the signal on, reach each rank twice); Ctrl-C (SIGINT) and SIGKILL still end a run at
once.

Under torchrun the ranks must stop at the same step (the checkpoint is a collective): they agree on it every
``log_every`` steps, where the step statistics are read anyway (a collective and a host read at every step would
slow the steps), so a signal that reaches some ranks first stops all of them at the same step, at most ``log_every``
steps later.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

from .distributed import current

__all__ = ["STOP_SIGNALS", "RunStopped", "StopSignals"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
"""The signals that stop a run after its step, with a checkpoint."""


class RunStopped(Exception):
    """A run stopped by a signal after saving its checkpoint.

    Attributes:
        signum: The signal.
        step: The run's optimizer steps when it stopped (the checkpoint's).
    """

    def __init__(self, signum: int, step: int, where: str) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} ({where}), its checkpoint saved")


class StopSignals:
    """Catches :data:`STOP_SIGNALS` while entered (in the main thread; elsewhere, and where there is nothing to save,
    it does nothing) and says, between steps, whether the run is to stop (:meth:`pending`)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            logger.warning("received %s: the run stops after this step and saves its checkpoint (Ctrl-C stops it at "
                           "once, without one)", signal.Signals(signum).name)

    def pending(self, device: torch.device) -> int | None:
        """The signal to stop on after this step, or ``None``. Under torchrun a collective (every rank calls it at the
        same step): the ranks agree, and a signal any of them received stops them all."""
        place = current()
        if not place.enabled:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
