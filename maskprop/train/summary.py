"""The summary of a finished run: what it produced (accuracy, params and FLOPs kept, widths) and what it saved
(train-cost saving by supplement C.1, measured speedup by ``timing.py``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..cost import train_cost_saving
from ..sbp import sparse_layers
from .config import SPARSE_BACKWARD_METHODS
from .files import atomic_write
from .setup import Run

__all__ = ["summarize", "write_json"]


def summarize(run: Run, elapsed_s: float) -> dict[str, Any]:
    """The summary of a finished run (see :func:`fit`)."""
    state, cost, counters = run.state, run.ctx.cost, run.state.counters
    mask = state.fixed_mask
    steps = {kind: counters[f"{kind}_steps"] for kind in ("search", "finetune", "train")}
    times = state.times
    if run.cfg.method == "dense":
        saving, speedup = 1.0, 1.0
    else:
        saving = train_cost_saving(counters["dense_train_flops"], counters["train_flops"])
        speedup = times.measured_speedup(steps)
    dense_ms, search_ms, finetune_ms, train_ms = (_ms(times.median(k)) for k in ("dense_ref", "search", "finetune",
                                                                                   "train"))
    kept = {g: int(m.sum()) for g, m in mask.items()} if mask is not None else dict(run.groups)
    method = run.cfg.method
    keep_ratio = {"vrpge": run.cfg.sparsity.keep_ratio, "dense": 1.0}.get(method, run.cfg.sbp.ratio)
    summary = {
        "method": method,
        "model": run.cfg.model.name,
        "keep_ratio": keep_ratio,
        "accuracy": state.final_accuracy,
        "best_accuracy": state.best_accuracy,
        "dense_params": cost.params(),
        "subnet_params": cost.params(mask),
        "dense_flops": cost.flops(),
        "subnet_flops": cost.flops(mask),
        "kept_ratio": sum(kept.values()) / max(sum(run.groups.values()), 1),
        "train_flops": counters["train_flops"],
        "dense_train_flops": counters["dense_train_flops"],
        "train_cost_saving": saving,
        "measured_speedup": speedup,
        "search_step_ms": search_ms,
        "finetune_step_ms": finetune_ms,
        "dense_step_ms": dense_ms,
        "train_step_ms": train_ms,
        "step_speedup": None if dense_ms is None or not (search_ms or train_ms) else dense_ms / (search_ms or train_ms),
        "steps": steps,
        "widths": kept,
        "group_sizes": dict(run.groups),
        "fix": state.fix_info,
        "run_time_s": elapsed_s,
        "run_dir": None if run.run_dir is None else str(run.run_dir),
    }
    if method in SPARSE_BACKWARD_METHODS:
        sbp = run.cfg.sbp
        summary["sbp"] = {
            "ratio": sbp.ratio, "memory": sbp.memory if method == "msbp" else 0.0, "sparsifier": sbp.sparsifier,
            "budget": sbp.budget, "kept_units": {name: layer.k for name, layer in sparse_layers(state.model)},
            "units": {name: layer.num_units for name, layer in sparse_layers(state.model)},
            "last_angles": dict(state.diagnostics),
        }
    return summary


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` as indented json, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
