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

    def epoch(self, record: Mapping[str, Any]) -> None:
        """Append one epoch's metrics to ``metrics.jsonl`` and flush TensorBoard."""
        logger.info("%s", " ".join(f"{k}={_short(v)}" for k, v in record.items() if not isinstance(v, Mapping)))
        if self._writer is None:
            return
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _short(value: Any) -> str:
    """A value as the epoch's log line shows it: 4 significant digits for floats and for integers past a million
    (the FLOP counters: ``2.277e+10``); ``metrics.jsonl`` keeps every digit."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**6:
        return f"{value:.4g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
