"""What a run writes while it trains: TensorBoard events and ``metrics.jsonl`` (one json line per epoch).

Both are keyed so that a resumed run overwrites what the killed run wrote after its last checkpoint: TensorBoard
purges events from the resumed step on, and ``metrics.jsonl`` keeps only the epochs the checkpoint covers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunLogger"]

logger = logging.getLogger(__name__)


class RunLogger:
    """TensorBoard scalars and histograms plus a ``metrics.jsonl`` history in a run directory, or nothing at all.

    Args:
        run_dir: The run directory, or ``None`` to log to the Python logger only.
        resume_step: Optimizer steps the resumed checkpoint covers; TensorBoard events after it are purged.
        keep_line: For a resumed run, which existing ``metrics.jsonl`` lines to keep (the epochs the checkpoint
            covers); ``None`` starts a new file.
    """

    def __init__(self, run_dir: str | os.PathLike | None, resume_step: int | None = None,
                 keep_line: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._writer = None
        self._warned_data_bound = False
        if self.run_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        self._metrics_path = self.run_dir / "metrics.jsonl"
        kept = []
        if keep_line is not None and self._metrics_path.is_file():
            with open(self._metrics_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by the kill
                        continue
                    if keep_line(record):
                        kept.append(line if line.endswith("\n") else line + "\n")
        with open(self._metrics_path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars ``{tag: value}`` at ``step``."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """A TensorBoard histogram (e.g. of the keep probabilities)."""
        if self._writer is not None:
            self._writer.add_histogram(tag, values.detach().float().cpu(), step)

    def epoch(self, record: Mapping[str, Any], epochs: int | None = None) -> None:
        """Log one epoch's line (:func:`epoch_line`; every metric at DEBUG level), append its metrics to
        ``metrics.jsonl`` and flush TensorBoard. ``epochs``: the epochs of its phase, for the count and the time
        left."""
        logger.info("%s", epoch_line(record, epochs))
        waited, seconds = record.get("data_wait_s", 0.0), record.get("epoch_time_s", 0.0)
        if waited > DATA_BOUND_SHARE * seconds and not self._warned_data_bound:  # once a run
            self._warned_data_bound = True
            logger.warning("%s epoch %s waited %.0f%% of its %.1f s for data: the loader bounds this run, and the "
                           "measured speedup (of the steps alone) overstates its saving on the clock; more "
                           "data.workers (on free cores), data.decode: device for ImageNet, or data.on_device for an "
                           "in-memory dataset feed it faster",
                           record.get("phase"), record.get("epoch"), 100.0 * waited / seconds, seconds)
        logger.debug("%s", " ".join(f"{k}={_short(v)}" for k, v in record.items() if not isinstance(v, Mapping)))
        if self._writer is None:
            return
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


DATA_BOUND_SHARE = 0.25
"""The share of an epoch's time spent waiting for data above which a run warns, once, that its loader bounds it."""
DATA_WAIT_SHOWN = 0.05
"""The share of an epoch's time spent waiting for data from which its line shows it."""

_STEP_KINDS = {"warmup": "dense warm-up", "anneal": "anneal"}  # a search epoch's kind, where it is not the search's


def epoch_line(record: Mapping[str, Any], epochs: int | None = None) -> str:
    """The line an epoch logs: where the run is, the few figures to watch, and the time left in the phase (its last
    epoch's time for each epoch to come); every metric is in ``metrics.jsonl`` and TensorBoard.

    ``search epoch 10/12, step 230: loss 0.2551, train 90.76%, val 90.80%, kept 0.498 expected (budget 0.5), 27.2 s;
    train-cost saving so far 1.88x; about 55 s left in the search``
    """
    phase, epoch = record.get("phase", "?"), record.get("epoch", "?")
    kind = _STEP_KINDS.get(record.get("step_kind"))
    where = f"{phase} epoch {epoch}" + (f"/{epochs}" if epochs else "") + (f" ({kind})" if kind else "")
    parts = []
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.4g}")
    if "train_accuracy" in record:
        parts.append(f"train {record['train_accuracy']:.2f}%")
    if "val_accuracy" in record:
        parts.append(f"val {record['val_accuracy']:.2f}%")
    if "kept_ratio_expected" in record and phase == "search":
        budget = f" (budget {record['budget_ratio']:.3g})" if "budget_ratio" in record else ""
        parts.append(f"kept {record['kept_ratio_expected']:.3f} expected{budget}")
    if "epoch_time_s" in record:
        waited = record.get("data_wait_s", 0.0)
        share = waited / record["epoch_time_s"] if record["epoch_time_s"] > 0 else 0.0
        parts.append(f"{record['epoch_time_s']:.1f} s" + (f" ({100 * share:.0f}% waiting for data)"
                                                           if share >= DATA_WAIT_SHOWN else ""))
    line = f"{where}, step {record.get('step', '?')}: {', '.join(parts)}"
    saving = record.get("train_cost_saving")
    if saving is not None and abs(saving - 1.0) > 1e-9:  # a dense run saves nothing
        line += f"; train-cost saving so far {saving:.2f}x"
    if epochs and isinstance(epoch, int) and epoch < epochs and "epoch_time_s" in record:
        line += f"; about {_duration((epochs - epoch) * record['epoch_time_s'])} left in the " \
                f"{'training' if phase == 'train' else phase}"
    return line


def _duration(seconds: float) -> str:
    """``55 s``, ``12 min``, ``3 h 05 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


def _short(value: Any) -> str:
    """A value as the epoch's log line shows it: 4 significant digits for floats and for integers past a million
    (the FLOP counters: ``2.277e+10``); ``metrics.jsonl`` keeps every digit."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
        return f"{value:.4g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
