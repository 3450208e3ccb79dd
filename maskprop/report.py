"""``maskprop report``: the train-cost savings of a set of runs side by side, as tables and plots.

A run directory (what ``maskprop train`` writes) holds ``config.yaml``, ``metrics.jsonl`` (one json line per epoch)
and, once finished, ``summary.json`` (:class:`maskprop.train.summary.RunSummary`). :func:`build_report` reads runs
and folders of runs into one row per run; :func:`write_report` writes ``report.md``, ``report.csv``, ``report.json``
and the PNG plots (matplotlib, the optional extra ``report``) into a new directory, all or nothing.

A run's accuracy is compared with a dense run of the same model and data (equal ``model``, ``model_kwargs`` and
``data`` in the summaries): the one given as ``baseline``, else the closest finished dense run among those read (the
run's seed first, then the fewest other settings that differ; see :func:`_closest`). Where several are equally close,
a warning names the one chosen; where several are listed, an info line names each run's. No dense run, no gap: the
dense accuracy is never estimated.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ._files import atomic_directory, numbered
from .train.config import SPARSE_BACKWARD_METHODS, changed_keys, dotted
from .train.summary import SCHEMA_VERSION, RunSummary, data_identity, read_summary
from .train.timing import phase_epochs

__all__ = ["REPORT_PLOTS", "Report", "RunRecord", "build_report", "find_runs", "format_table", "load_run",
           "make_plots", "write_report"]

logger = logging.getLogger(__name__)

REPORT_PLOTS = ("accuracy.png", "speedup.png", "curves.png", "widths.png")
"""The plots :func:`write_report` makes (see :func:`make_plots`)."""

_EXTRA = "pip install 'maskprop[report]'"
_RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl")


@dataclass
class RunRecord:
    """One run as read from its directory.

    Attributes:
        path: The run directory.
        name: Its name in the report (the directory's name, with its parent's where two runs share one).
        config: ``config.yaml`` as a dict (empty where missing).
        summary: ``summary.json``, or ``None`` for an unfinished run.
        metrics: The readable lines of ``metrics.jsonl``, in order.
        status: ``finished``, or where the run stopped (phase and epoch), or ``unfinished: no epoch completed``.
    """

    path: Path
    name: str
    config: dict[str, Any]
    summary: RunSummary | None
    metrics: list[dict[str, Any]]
    status: str

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def key(self) -> tuple[str, str, str, int] | None:
        """Model, model kwargs, data and the full network's parameters: runs with equal keys are comparable; ``None``
        where unknown. (The data names a dataset read from disk, not its content: the parameter count tells a
        100-class subset of ImageNet, or a stand-in, from the whole, through the classifier.)"""
        s = self.summary
        if s is None or not s.model:
            return None
        return s.model, json.dumps(s.model_kwargs, sort_keys=True), json.dumps(s.data, sort_keys=True), s.dense_params


@dataclass
class Report:
    """Runs read, one table row per run, and the dense baseline of each (by run name)."""

    runs: list[RunRecord]
    rows: list[dict[str, Any]]
    baselines: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading runs


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("config.yaml", "summary.json"))


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories among ``paths``: each a run directory, or a folder whose subdirectories are runs (both, for a
    run directory whose subdirectories hold runs).

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: A path that is neither a run directory nor a folder holding one; no paths at all.
    """
    found: list[Path] = []
    if isinstance(paths, (str, os.PathLike)):  # one path, not its letters
        paths = [paths]
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"'{path}' does not exist; expected a run directory or a folder of them")
        if _is_run_dir(path):  # and the runs in its subdirectories, if any (a run written into a folder of runs)
            found += [path, *sorted(child for child in path.iterdir() if child.is_dir() and _is_run_dir(child))]
            continue
        if not path.is_dir():
            raise ValueError(f"'{path}' is a file, not a run directory; expected a directory with config.yaml and "
                             f"summary.json or metrics.jsonl (what maskprop train writes), or a folder of them")
        children = sorted(child for child in path.iterdir() if _is_run_dir(child))
        if not children:
            raise ValueError(f"'{path}' is not a run directory (it has no config.yaml or summary.json) and holds "
                             f"none in its subdirectories")
        found += children
    if not found:
        raise ValueError("no runs given; expected run directories or folders of them")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.yaml"
    if not file.is_file():
        return {}
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"'{file}' is not valid yaml ({' '.join(str(err).split())[:200]}); expected the "
                         f"config.yaml that maskprop train writes") from None
    if not isinstance(config, dict):
        raise ValueError(f"'{file}' is not a config (a yaml mapping expected)")
    for section in ("model", "data", "sparsity", "sbp", "optim", "finetune"):  # read with .get(...) below
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ValueError(f"'{file}' has {section}={config[section]!r}; expected a mapping of the {section} "
                             f"settings (the config.yaml that maskprop train writes)")
    return config


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The readable lines of ``metrics.jsonl``; each damaged line is skipped with a warning that names it."""
    file = path / "metrics.jsonl"
    if not file.is_file():
        return []
    records = []
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "phase" not in record or "epoch" not in record:
                logger.warning("skipped line %d of '%s': not a json epoch record (%s)", number, file,
                               _clip(line.strip()))
                continue
            records.append(record)
    return records


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _complete(summary: RunSummary, config: dict[str, Any]) -> RunSummary:
    """Fill what an earlier (unversioned) summary lacks from the run's config.yaml."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    if summary.dataset is None and data:
        summary.dataset = data.get("dataset")
    if not summary.data and data:
        summary.data = data_identity(data)
    if not summary.model_kwargs and isinstance(model.get("kwargs"), dict):
        summary.model_kwargs = dict(model["kwargs"])
    if not summary.epochs and config:
        phases = ("search", "finetune") if summary.method == "vrpge" else ("train",)
        summary.epochs = {p: e for p in phases if (e := phase_epochs(config, p)) is not None}
    return summary


def _status(config: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    if not metrics:  # killed in its first epoch, or before it (config.yaml is written first): nothing tells them apart
        return "unfinished: no epoch completed"
    last = metrics[-1]
    phase, epoch = last.get("phase"), last.get("epoch")
    total = phase_epochs(config, str(phase))
    return f"unfinished: {phase} epoch {epoch}/{total if total is not None else '?'}"


def load_run(path: str | os.PathLike, name: str | None = None) -> RunRecord:
    """Read one run directory (finished or not).

    Raises:
        ValueError: Not a run directory (says what it lacks), a damaged config or summary, a newer summary schema.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"'{path}' is not a run directory; expected a directory with config.yaml and summary.json or "
                         f"metrics.jsonl")
    if not any((path / f).is_file() for f in _RUN_FILES):
        raise ValueError(f"'{path}' is not a run directory: it has no config.yaml, summary.json or metrics.jsonl")
    config = _read_config(path)
    summary = read_summary(path / "summary.json") if (path / "summary.json").is_file() else None
    if summary is None and not config:
        raise ValueError(f"'{path}' is not a run directory: it has metrics.jsonl but no config.yaml or summary.json")
    if summary is not None:
        summary = _complete(summary, config)
    metrics = _read_metrics(path)
    status = "finished" if summary is not None else _status(config, metrics)
    return RunRecord(path, name or path.name, config, summary, metrics, status)


def _names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


# ---------------------------------------------------------------------------------------------------------------------
# The table


COLUMNS = (
    ("run", "run", ""), ("method", "method", ""), ("model", "model", ""), ("dataset", "data", ""),
    ("keep", "keep", ""), ("epochs", "epochs", ""), ("accuracy", "top-1", "%"), ("dense_accuracy", "dense", "%"),
    ("accuracy_gap", "vs dense", "pp"), ("params_kept", "params kept", "%"), ("flops_kept", "FLOPs kept", "%"),
    ("train_cost_saving", "saving (formula)", "x"), ("measured_speedup", "measured speedup", "x"),
    ("run_time_s", "wall time", "s"), ("status", "status", ""),
)
"""Table columns: (row key, heading, unit)."""


def _keep_text(method: str | None, ratio: Any, backward: bool) -> str | None:
    """The keep column: ``1`` for dense, ``0.1 backward`` for a sparse-backward ratio, else the keep ratio; ``None``
    where the ratio is not a number."""
    if method == "dense":
        return "1"
    if not isinstance(ratio, (int, float)):
        return None
    return f"{ratio:g} backward" if backward else f"{ratio:g}"


def _keep(summary: RunSummary) -> str | None:
    backward = summary.sbp is not None or summary.method in SPARSE_BACKWARD_METHODS
    return _keep_text(summary.method, summary.keep_ratio, backward)


def _config_keep(config: dict[str, Any]) -> str | None:
    """``_keep`` from a run's config.yaml (an unfinished run has no summary)."""
    method = config.get("method", "vrpge")
    section, key = ("sparsity", "keep_ratio") if method == "vrpge" else ("sbp", "ratio")
    values = config.get(section)
    ratio = values.get(key) if isinstance(values, dict) else None
    return _keep_text(method, ratio, method in SPARSE_BACKWARD_METHODS)


def _config_method(config: dict[str, Any]) -> str | None:
    """:func:`_method` from a run's config.yaml (an unfinished run has no summary): ``random`` for method ``vrpge``
    (the default) with ``sparsity.fix: random``, else the config's method (``None`` where it names none)."""
    method = config.get("method")
    sparsity = config.get("sparsity")
    if method in (None, "vrpge") and isinstance(sparsity, dict) and sparsity.get("fix") == "random":
        return "random"
    return method


def _epochs(summary: RunSummary | None, config: dict[str, Any]) -> str:
    if summary is not None and summary.epochs:
        return "+".join(str(e) for e in summary.epochs.values())
    method = config.get("method")
    phases = ("search", "finetune") if method == "vrpge" else ("train",)
    return "+".join(str(phase_epochs(config, p)) for p in phases) if config else ""


def _row(record: RunRecord, baseline: RunRecord | None) -> dict[str, Any]:
    s, config = record.summary, record.config
    model = config.get("model", {}) if isinstance(config.get("model"), dict) else {}
    data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
    row: dict[str, Any] = {key: None for key, _, _ in COLUMNS}
    row.update(run=record.name, status=record.status, path=str(record.path), epochs=_epochs(s, config),
               method=_config_method(config), model=model.get("name"), dataset=data.get("dataset"),
               keep=_config_keep(config),
               measured_speedup_low=None, measured_speedup_high=None, speedup_warning=None, baseline=None,
               ranks=None, schema_version=None)
    if s is None:
        return row
    dense_accuracy = s.dense_accuracy
    if baseline is not None and baseline.summary is not None:
        dense_accuracy = baseline.summary.accuracy
        row["baseline"] = baseline.name
    iqr = s.measured_speedup_iqr
    row.update(
        method=_method(s), model=s.model, dataset=s.dataset, keep=_keep(s), accuracy=s.accuracy,
        dense_accuracy=dense_accuracy,
        accuracy_gap=None if s.accuracy is None or dense_accuracy is None or s.method == "dense"
        else s.accuracy - dense_accuracy,
        params_kept=100.0 * s.subnet_params / s.dense_params if s.dense_params else None,
        flops_kept=100.0 * s.subnet_flops / s.dense_flops if s.dense_flops else None,
        train_cost_saving=s.train_cost_saving, measured_speedup=s.measured_speedup,
        measured_speedup_low=None if iqr is None else iqr[0], measured_speedup_high=None if iqr is None else iqr[1],
        speedup_warning=s.speedup_warning, run_time_s=s.run_time_s, ranks=s.world_size,
        schema_version=s.schema_version,
    )
    return row


def build_report(paths: Iterable[str | os.PathLike], baseline: str | os.PathLike | None = None) -> Report:
    """Read the runs under ``paths`` and make one row per run (see the module docstring).

    Args:
        paths: Run directories, or folders whose subdirectories are runs.
        baseline: A finished dense run whose accuracy the runs of the same model and data are compared with
            (listed too).

    Raises:
        FileNotFoundError: A path that does not exist.
        ValueError: A path that is no run directory nor holds one, a damaged config or summary, a summary of a newer
            schema, a baseline that is not a finished dense run, no runs at all.
    """
    run_paths = find_runs(paths)
    base_path = None
    if baseline is not None:
        base_path = Path(baseline)
        if not base_path.exists():
            raise FileNotFoundError(f"the baseline '{base_path}' does not exist; expected a finished dense run")
        if base_path.resolve() not in {p.resolve() for p in run_paths}:
            run_paths.append(base_path)
    runs = [load_run(path, name) for path, name in zip(run_paths, _names(run_paths))]
    base = None
    if base_path is not None:
        base = next(r for r in runs if r.path.resolve() == base_path.resolve())
        if base.summary is None or base.summary.method != "dense":
            what = "an unfinished run" if base.summary is None else (
                "a random-subnetwork run (method='vrpge', sparsity.fix=random)" if _method(base.summary) == "random"
                else f"a method={base.summary.method!r} run")
            raise ValueError(f"the baseline '{base_path}' is {what}; expected a finished dense run (method=dense) of "
                             f"the same model and data")
        compared = [r for r in runs if r is not base and r.key() is not None and r.summary.method != "dense"]
        if compared and not any(r.key() == base.key() for r in compared):
            theirs = sorted({f"{r.summary.model} on {r.summary.dataset}" for r in compared})
            raise ValueError(f"the baseline '{base_path}' ({base.summary.model} on {base.summary.dataset}) has the "
                             f"model and data of none of the runs ({', '.join(theirs)}): {_nearest(base, compared)}; "
                             f"expected a dense run of the same model and data")
    baselines: dict[str, RunRecord] = {}
    dense = [r for r in runs if r.key() is not None and r.summary.method == "dense"]
    for record in runs:
        key = record.key()
        if key is None or record.summary.method == "dense":
            continue
        if base is not None and base.key() == key:
            baselines[record.name] = base
            continue
        candidates = [r for r in dense if r.key() == key]
        if not candidates:
            continue
        match, tied = _closest(record, candidates)
        baselines[record.name] = match
        what = f"of {record.summary.model} on {record.summary.dataset}"
        if len(tied) > 1:
            logger.warning("%s: the dense runs %s %s are equally close to it (%s); compared with '%s', the first "
                           "listed (pass --baseline to choose)", record.name, ", ".join(f"'{r.name}'" for r in tied),
                           what, _closeness(record, match), match.name)
        elif len(candidates) > 1:
            logger.info("%s: dense baseline '%s', the closest of %d dense runs %s (%s)", record.name, match.name,
                        len(candidates), what, _closeness(record, match))
    for record in runs:  # the summaries (as report.json lists them) gain the dense accuracy, never made up
        match = baselines.get(record.name)
        if match is not None:
            record.summary.dense_accuracy, record.summary.dense_baseline = match.summary.accuracy, str(match.path)
    rows = [_row(record, baselines.get(record.name)) for record in runs]
    return Report(runs, rows, {name: b.name for name, b in baselines.items()})


def _identity(summary: RunSummary) -> dict[str, Any]:
    """What :meth:`RunRecord.key` compares, as dotted settings: ``model``, ``model.kwargs.<name>``, ``data.<name>``,
    ``parameters``."""
    return {"model": summary.model, **{f"model.kwargs.{k}": v for k, v in summary.model_kwargs.items()},
            **{f"data.{k}": v for k, v in summary.data.items()}, "parameters": summary.dense_params}


def _nearest(base: RunRecord, compared: Sequence[RunRecord]) -> str:
    """Where the baseline's model and data differ from those of the nearest of ``compared`` (the fewest settings)."""
    mine = _identity(base.summary)
    nearest = min(compared, key=lambda r: len(changed_keys(mine, _identity(r.summary))))
    theirs = _identity(nearest.summary)
    keys = changed_keys(mine, theirs)
    shown = ", ".join(f"{k} {mine.get(k, 'unset')} vs {theirs.get(k, 'unset')}" for k in keys[:4])
    more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
    return f"it differs from the nearest, '{nearest.name}', in {shown}{more} (baseline vs run)"


_UNCOMPARED = frozenset({"method", "seed", "out", "sparsity", "sbp", "finetune", "optim.epochs", "log_every",
                         "eval_every", "save_every"})
"""Config settings :func:`_closest` leaves out: the method's own, the epochs (compared in total), output and logging."""


def _settings(record: RunRecord) -> dict[str, Any]:
    """A finished run's config.yaml as dotted settings (less :data:`_UNCOMPARED` and what lies under them), with its
    epochs in total."""
    settings = {key: value for key, value in dotted(record.config).items()
                if not any(key == name or key.startswith(f"{name}.") for name in _UNCOMPARED)}
    return {**settings, "epochs": sum(record.summary.epochs.values())}


def _distance(record: RunRecord, dense: RunRecord) -> tuple[bool, int]:
    seed = record.config.get("seed")
    return seed is None or dense.config.get("seed") != seed, len(changed_keys(_settings(record), _settings(dense)))


def _closest(record: RunRecord, candidates: Sequence[RunRecord]) -> tuple[RunRecord, list[RunRecord]]:
    """The dense run among ``candidates`` (of the model and data of ``record``) to compare ``record`` with: one of its
    seed first, then the one with the fewest other config settings that differ (its method's own settings, output and
    logging left out; epochs in total: a dense twin trains as many as the search and finetune); and those as close as
    it, itself first (the first listed)."""
    distances = [_distance(record, c) for c in candidates]
    best = min(distances)
    tied = [c for c, d in zip(candidates, distances) if d == best]
    return tied[0], tied


def _closeness(record: RunRecord, dense: RunRecord) -> str:
    """How close a dense run is to ``record``: its seed, the settings that differ."""
    seed, theirs = record.config.get("seed"), dense.config.get("seed")
    same = seed is not None and theirs == seed
    keys = changed_keys(_settings(record), _settings(dense))
    settings = "no other setting differs" if not keys else (
        f"{len(keys)} other setting{'s' * (len(keys) != 1)} differ{'s' * (len(keys) == 1)}: {', '.join(keys[:4])}"
        + (" ..." if len(keys) > 4 else ""))
    return f"{'the same seed' if same else 'seed'} {theirs}{'' if same else f', the run has {seed}'}; {settings}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return str(value)


def _cells(row: dict[str, Any]) -> list[str]:
    speedup = _fmt(row["measured_speedup"])
    if row["measured_speedup"] is not None:
        speedup += "x"
        if row["measured_speedup_low"] is not None and row["method"] != "dense":
            speedup += f" ({row['measured_speedup_low']:.2f}-{row['measured_speedup_high']:.2f})"
        if row["speedup_warning"]:
            speedup += " !"
    gap = row["accuracy_gap"]
    cells = {
        "accuracy": _fmt(row["accuracy"]), "dense_accuracy": _fmt(row["dense_accuracy"]),
        "accuracy_gap": "-" if gap is None else f"{gap:+.2f}", "params_kept": _fmt(row["params_kept"], 1),
        "flops_kept": _fmt(row["flops_kept"], 1),
        "train_cost_saving": "-" if row["train_cost_saving"] is None else f"{row['train_cost_saving']:.2f}x",
        "measured_speedup": speedup,
        "run_time_s": _fmt(row["run_time_s"], 1 if (row["run_time_s"] or 0) < 10 else 0)
        + (f" on {row['ranks']} ranks" if (row.get("ranks") or 1) > 1 else ""),
    }
    return [cells.get(key, _fmt(row.get(key))) for key, _, _ in COLUMNS]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (headings with units; the measured speedup with its interquartile range, ``!``
    where its spread is wide)."""
    headings = [f"{title} ({unit})" if unit and unit not in ("x",) else title for _, title, unit in COLUMNS]
    body = [_cells(row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headings)]
    numeric = {"accuracy", "dense_accuracy", "accuracy_gap", "params_kept", "flops_kept", "train_cost_saving",
               "measured_speedup", "run_time_s"}

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if COLUMNS[i][0] in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if COLUMNS[i][0] in numeric else "-" * (w + 2)
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headings), rule, *(line(r) for r in body)])


_NOTES = """\
- **method**: `vrpge`, `dense`, a sparse-backward method, or `random`: the random subnetwork of the VR-PGE budget
  (`sparsity.fix: random`), the baseline a search has to beat.
- **top-1**: validation accuracy of the final network: for `vrpge` and `random` the fixed subnetwork after
  finetuning; for `dense` and the sparse-backward methods the full network they trained. **dense**, **vs dense**:
  accuracy of a dense run of the same model and data (`--baseline`, or the dense run among those listed with the run's
  seed, then the fewest other settings differing) and the difference in percentage points; `-` where no such run is
  known (never estimated).
- **params kept**, **FLOPs kept**: the final network's parameters and forward FLOPs per example over the full
  network's (a multiply-add is 2 FLOPs): the fixed subnetwork's for `vrpge` and `random`; 100 for `dense` and the
  sparse-backward methods, which prune nothing (they save train cost in the backward, not size).
- **saving (formula)**: the train-cost saving of supplement C.1 of "Efficient Neural Network Training via Forward
  and Backward Propagation Sparsification" (NeurIPS 2021), dense train FLOPs over the run's (VR-PGE: 4 f_S per
  search step, 3 f_S per finetune step; dense: 3 f_D over as many steps as the search; sparse backward: the dense
  forward plus each layer's backward at k / n).
- **measured speedup**: dense train time over the run's, from dense reference steps timed during the run, each next
  to a step of the run: D / sum over phases of (steps / median of dense-step / run-step ratios), D the dense
  baseline's steps; in brackets the same with the quartiles of the ratios (interquartile range); `!` marks a wide
  range (see the warnings). Runs written before summaries were versioned carry the earlier estimate (no range).
- **keep**: the keep ratio of VR-PGE (expected kept channels), or the fraction of units a sparse-backward method
  propagates in the backward. **epochs**: search+finetune, or train. **wall time**: the whole run, evaluation and
  checkpoints included, and for all but dense runs the dense reference steps timed for the measured speedup too (a
  large share of a short run: `dense_reference_share` of the summaries in `report.json`); `on N ranks` for a run of
  N processes under torchrun (its measured speedup is timed on rank 0, each step on its share of the global batch).
"""


# ---------------------------------------------------------------------------------------------------------------------
# Plots


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"the report's plots need matplotlib, which is not installed: {_EXTRA} (or pass --no-plots "
                          f"for the tables alone)") from None
    return Figure


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_LINES = ("-", "--", "-.", ":")
_DENSE_LINES = ("--", ":", "-.", (0, (8, 2, 1, 2, 1, 2)))


def _style(index: int) -> dict[str, Any]:
    """Run ``index``'s colour, marker, line style of its curves and of its dense reference line: the colours cycle
    every 10 runs; the marker and the line styles change with each cycle, so that runs 0 and 10 differ."""
    cycle = index // len(_COLORS)
    return {"color": _COLORS[index % len(_COLORS)], "marker": _MARKERS[cycle % len(_MARKERS)],
            "linestyle": _LINES[cycle % len(_LINES)], "dense_linestyle": _DENSE_LINES[cycle % len(_DENSE_LINES)]}


def _styles(report: Report) -> dict[str, dict[str, Any]]:
    """Each run's style (:func:`_style`), the same in every plot."""
    return {record.name: _style(i) for i, record in enumerate(report.runs)}


def _legend(fig: Any, handles: Sequence[Any], labels: Sequence[str], ncol: int, height: float) -> None:
    """A legend under the panels with every entry in full: labels wrapped at spaces, as many columns (up to ``ncol``)
    as fit the figure's width, the figure widened where one column does not, and made ``height`` inches (the panels)
    taller by the legend's height."""
    if not handles:
        fig.set_figheight(height)
        return
    labels = [textwrap.fill(label, 60, break_long_words=False, break_on_hyphens=False) for label in labels]
    width = fig.get_figwidth()
    for columns in range(min(ncol, len(labels)), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
        box = legend.get_window_extent()
        if columns == 1 or box.width / fig.dpi <= width - 0.3:
            break
        legend.remove()
    fig.set_size_inches(max(width, box.width / fig.dpi + 0.3), height + box.height / fig.dpi + 0.2)


def _accuracy_figure(report: Report, Figure: Any) -> Any:
    finished = [r for r in report.runs if r.summary is not None and r.summary.accuracy is not None]
    panels: dict[tuple[str, str], list[RunRecord]] = {}
    for record in finished:
        panels.setdefault((record.summary.model, str(record.summary.dataset)), []).append(record)
    rows = max(len(panels), 1)
    fig = Figure(figsize=(10, 3.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False)
    styles = _styles(report)
    handles: dict[str, Any] = {}
    for (model, dataset), ax_row in zip(panels, axes):
        records = panels[(model, dataset)]
        for ax, (attr, what) in zip(ax_row, (("subnet_flops", "FLOPs"), ("subnet_params", "params"))):
            total = "dense_flops" if attr == "subnet_flops" else "dense_params"
            for record in records:
                s = record.summary
                if s.method == "dense":
                    style = styles[record.name]
                    line = ax.axhline(s.accuracy, color=style["color"], linestyle=style["dense_linestyle"],
                                      linewidth=1.2, gid=f"run:{record.name}")
                    handles.setdefault(f"{record.name} (dense, {s.accuracy:.1f}%)", line)
                    continue
                kept = 100.0 * getattr(s, attr) / max(getattr(s, total), 1)
                point = ax.plot([kept], [s.accuracy], linestyle="none", markersize=8, gid=f"run:{record.name}",
                                color=styles[record.name]["color"], marker=styles[record.name]["marker"])[0]
                handles.setdefault(f"{record.name} ({_method(s)}, keep {_keep(s)}, {s.accuracy:.1f}%)", point)
            ax.set_xlim(0, 105)
            ax.set_xlabel(f"{what} kept (% of dense)")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(f"{model} on {dataset}: accuracy vs {what} kept", fontsize=10)
            ax.grid(alpha=0.3)
    if not panels:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no finished run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()  # as the widths plot: no empty axes around the message
    _legend(fig, list(handles.values()), list(handles), 3, 3.6 * rows + 0.6)
    return fig


def _speedup_figure(report: Report, Figure: Any) -> Any:
    records = [r for r in report.runs if r.summary is not None and r.summary.method != "dense"
               and r.summary.measured_speedup is not None]
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.subplots()
    top = max([1.0, *(max(r.summary.train_cost_saving, r.summary.measured_speedup,
                          (r.summary.measured_speedup_iqr or [0, 0])[1]) for r in records)]) * 1.15
    ax.plot([0, top], [0, top], color="0.5", linestyle="--", linewidth=1, label="ideal: measured = formula")
    ax.axhline(1.0, color="0.3", linestyle=":", linewidth=1, label="dense speed (1x)")
    styles = _styles(report)
    for record in records:
        s = record.summary
        style = styles[record.name]
        iqr = s.measured_speedup_iqr
        yerr = None if iqr is None else [[s.measured_speedup - iqr[0]], [iqr[1] - s.measured_speedup]]
        ax.errorbar([s.train_cost_saving], [s.measured_speedup], yerr=yerr, linestyle="none", markersize=8,
                    capsize=4, gid=f"run:{record.name}", label=f"{record.name} ({_method(s)}, keep {_keep(s)})"
                    + (": wide spread" if s.speedup_warning else ""), color=style["color"], marker=style["marker"])
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("train-cost saving, formula (supplement C.1), x")
    ax.set_ylabel("measured speedup against dense steps, x")
    ax.set_title("Train-cost saving: formula vs measured\n(bars: interquartile range of the measurement)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if not records:
        ax.text(0.5, 0.5, "no sparse run with a measured speedup", ha="center", va="center", transform=ax.transAxes)
    handles, labels = ax.get_legend_handles_labels()
    _legend(fig, handles, labels, 2, 5.5)
    return fig


def _method(s: RunSummary) -> str:
    """The run's method as the tables and plots name it: ``random`` for the random-subnetwork baseline (method
    ``vrpge`` with ``sparsity.fix: random``), which searches nothing."""
    return "random" if (s.search or {}).get("subnetwork") == "random" else s.method


def _epoch_points(record: RunRecord) -> list[tuple[int, dict[str, Any]]]:
    """The run's metrics records with the epoch each ends, counted over the run: the record's own epoch, a finetune
    epoch after the search's epochs (as configured; else as many as recorded). A record without an integer epoch is
    left out."""
    records = [m for m in record.metrics if isinstance(m["epoch"], int) and not isinstance(m["epoch"], bool)]
    searched = (record.summary.epochs if record.summary is not None else {}).get("search")
    if not isinstance(searched, int):
        searched = phase_epochs(record.config, "search")
    if not isinstance(searched, int):
        searched = max((m["epoch"] for m in records if m.get("phase") == "search"), default=0)
    return [(m["epoch"] + (searched if m.get("phase") == "finetune" else 0), m) for m in records]


def _curves_figure(report: Report, Figure: Any) -> Any:
    records = [r for r in report.runs if r.metrics]
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    styles = _styles(report)
    finetuned = False
    for record in records:
        style = styles[record.name]
        method = _method(record.summary) if record.summary is not None else _config_method(record.config) or "?"
        color, label = style["color"], f"{record.name} ({method})"
        line = {"color": color, "linestyle": style["linestyle"], "linewidth": 1.5, "marker": style["marker"],
                "markersize": 3, "gid": f"run:{record.name}"}
        points = _epoch_points(record)
        loss = [(x, m["train_loss"]) for x, m in points if m.get("train_loss") is not None]
        axes[0].plot(*(zip(*loss) if loss else ([], [])), label=label, **line)
        val = [(x, m["val_accuracy"]) for x, m in points if m.get("val_accuracy") is not None]
        if val:
            axes[1].plot(*zip(*val), **line)
        kept = [(x, m["kept_ratio_expected"]) for x, m in points
                if m.get("kept_ratio_expected") is not None and m.get("phase") == "search"]
        if kept:
            axes[2].plot(*zip(*kept), **line)
            budget = record.config.get("sparsity", {}).get("keep_ratio")
            if isinstance(budget, (int, float)):
                axes[2].axhline(budget, color=color, linestyle="--", linewidth=1)
                # at the right end, above the line: where the curve, settled at or under its budget, leaves room
                axes[2].annotate(f"budget (keep ratio {budget:g})", (kept[-1][0], budget), xytext=(0, 3),
                                 textcoords="offset points", fontsize=8, color=color, ha="right", va="bottom")
        switch = min((x - m["epoch"] for x, m in points if m.get("phase") == "finetune"), default=None)
        if switch is not None:  # between the search's last epoch and the first finetune epoch
            finetuned = True
            for ax in axes[:2]:
                ax.axvline(switch + 0.5, color=color, linestyle=":", linewidth=1)
    titles = ("training loss", "validation top-1 accuracy", "expected kept ratio (search)")
    ylabels = ("cross entropy (L(m) while searching)", "top-1 accuracy (%)", "expected kept channels / all")
    epoch = "epoch (VR-PGE: search, then finetune after the dotted line)" if finetuned else "epoch"
    xlabels = (epoch, epoch, "search epoch")
    from matplotlib.ticker import MaxNLocator

    for ax, title, ylabel, xlabel in zip(axes, titles, ylabels, xlabels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.5
        ax.grid(alpha=0.3)
    if not any(m.get("kept_ratio_expected") is not None for r in records for m in r.metrics):
        axes[2].text(0.5, 0.5, "no VR-PGE search", ha="center", va="center", transform=axes[2].transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    _legend(fig, handles, labels, 3, 4.2)
    return fig


_WIDTHS_ACROSS = 48  # groups from which the widths plot lays its bars across, a row per group


def _widths_figure(report: Report, Figure: Any) -> Any:
    panels = []
    for record in report.runs:
        s = record.summary
        if s is None:
            continue
        if s.sbp is not None and s.sbp.get("units"):
            units = s.sbp["units"]
            panels.append((record, list(units), [units[k] for k in units],
                           [s.sbp["kept_units"].get(k, 0) for k in units], "units propagated in the backward"))
        elif s.method == "vrpge" and s.group_sizes:
            names = list(s.group_sizes)
            panels.append((record, names, [s.group_sizes[g] for g in names], [s.widths.get(g, 0) for g in names],
                           "channels kept"))
    most = max((len(p[1]) for p in panels), default=0)
    across = most > _WIDTHS_ACROSS  # a network of many groups (DenseNet-121: 120): a row per group, a column per run
    if across:
        fig = Figure(figsize=(6.5 * max(len(panels), 1), 0.16 * most + 1.6), layout="constrained")
        axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0, :]
    else:
        rows = max(len(panels), 1)
        fig = Figure(figsize=(max(8.0, 0.45 * most + 2), 3.4 * rows + 0.6), layout="constrained")
        axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    styles = _styles(report)
    for ax, (record, names, full, kept, what) in zip(axes, panels):
        at = range(len(names))
        bars = ax.barh if across else ax.bar
        bars(at, full, color="none", edgecolor="0.4", linewidth=1 if not across else 0.6, label="full network")
        bars(at, kept, color=styles[record.name]["color"], alpha=0.85, gid=f"run:{record.name}", label=what)
        unit = "channels" if what == "channels kept" else "units"
        if across:
            ax.set_yticks(list(at), names, fontsize=6)
            ax.set_ylim(len(names) - 0.5, -0.5)  # network order from the top
            ax.set_xlabel(unit)
            ax.grid(axis="x", alpha=0.3)
        else:
            ax.set_xticks(list(at), names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(unit)
            ax.grid(axis="y", alpha=0.3)
        kept_share = 100.0 * sum(kept) / max(sum(full), 1)
        ax.set_title(f"{record.name} ({_method(record.summary)}, keep {_keep(record.summary)})\n{what} per "
                     f"{'layer' if record.summary.sbp else 'group'} in network order: {kept_share:.0f}% of all",
                     fontsize=10)
        ax.legend(fontsize=8, loc="lower right" if across else "upper left")
    if not panels:
        axes[0].text(0.5, 0.5, "no pruned run", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    return fig


def make_plots(report: Report) -> dict[str, Any]:
    """The report's figures by file name (:data:`REPORT_PLOTS`), as matplotlib ``Figure`` objects.

    - ``accuracy.png``: accuracy against FLOPs kept and against params kept, a point per run, dense runs as reference
      lines, one row of panels per model and dataset;
    - ``speedup.png``: the formula's train-cost saving against the measured speedup per run (interquartile range as
      error bars), the ideal diagonal drawn;
    - ``curves.png``: training loss, validation accuracy and the expected kept ratio of the search, per epoch;
    - ``widths.png``: each pruned run's kept channels per group against the full widths, in network order (for the
      sparse-backward methods, the units each layer propagates); a network of many groups gets a row per group.

    Every run's marks carry the ``gid`` ``run:<name>``.

    Raises:
        ImportError: matplotlib is not installed (the message names the extra to install).
    """
    Figure = _matplotlib()
    return {"accuracy.png": _accuracy_figure(report, Figure), "speedup.png": _speedup_figure(report, Figure),
            "curves.png": _curves_figure(report, Figure), "widths.png": _widths_figure(report, Figure)}


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def default_report_dir(root: str | os.PathLike = "reports") -> Path:
    """``reports/report-<timestamp>`` (the command's default output directory), or ``-2``, ``-3``, ... after it where
    that name is taken (two reports in one second)."""
    path = Path(root) / f"report-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return next(c for c in numbered(path) if not (c.exists() or c.is_symlink()))


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as a path, after checking that it does not exist yet.

    Raises:
        ValueError: It exists.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ValueError(f"output directory '{out}' already exists; choose a new one (the report is written whole "
                         f"or not at all)")
    return out


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    keys = ["run", "method", "model", "dataset", "keep", "epochs", "accuracy", "dense_accuracy", "accuracy_gap",
            "baseline", "params_kept", "flops_kept", "train_cost_saving", "measured_speedup", "measured_speedup_low",
            "measured_speedup_high", "speedup_warning", "run_time_s", "ranks", "status", "schema_version", "path"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _markdown(report: Report, plots: Sequence[str]) -> str:
    count = len(report.runs)
    lines = ["# maskprop report", "", f"{count} run{'s' * (count != 1)}, {datetime.now().strftime('%Y-%m-%d %H:%M')}.",
             "",
             format_table(report.rows), "", _NOTES]
    warnings = [f"- {row['run']}: {row['speedup_warning']}" for row in report.rows if row["speedup_warning"]]
    if warnings:
        lines += ["Warnings:", "", *warnings, ""]
    if report.baselines:
        lines += ["Dense baselines: " + ", ".join(f"{run} vs {base}" for run, base in report.baselines.items()), ""]
    for name in plots:
        lines += [f"![{name[:-4]}]({name})", ""]
    return "\n".join(lines)


def write_report(report: Report, out: str | os.PathLike, plots: bool = True) -> list[Path]:
    """Write ``report.md``, ``report.csv``, ``report.json`` and (``plots``) the PNGs of :func:`make_plots` into the
    new directory ``out``: everything is written into a temp directory beside it, renamed at the end.

    Returns:
        The files written.

    Raises:
        ValueError: ``out`` exists.
        ImportError: ``plots`` without matplotlib (nothing is written).
    """
    out = check_out_dir(out)
    figures = make_plots(report) if plots else {}
    with atomic_directory(out) as tmp:
        (tmp / "report.md").write_text(_markdown(report, list(figures)), encoding="utf-8")
        (tmp / "report.csv").write_text(_csv(report.rows), encoding="utf-8")
        payload = {"schema_version": SCHEMA_VERSION, "rows": report.rows, "baselines": report.baselines,
                   "runs": [{"name": r.name, "path": str(r.path), "status": r.status,
                             "summary": None if r.summary is None else r.summary.to_dict()} for r in report.runs]}
        (tmp / "report.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        for name, figure in figures.items():
            figure.savefig(tmp / name, dpi=110, bbox_inches="tight")  # nothing cut off, whatever the layout
    return [out / name for name in ("report.md", "report.csv", "report.json", *figures)]
