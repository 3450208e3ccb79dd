"""The summary of a run: what it produced (accuracy, params and FLOPs kept, widths) and what it saved (train-cost
saving by supplement C.1, measured speedup by ``timing.py``), as one typed, versioned record.

:class:`RunSummary` lists every field with its unit and how it is computed (``dataclasses.fields(RunSummary)``: each
field's ``metadata`` has ``unit`` and ``doc``). The trainer writes it as ``summary.json``; ``maskprop report`` (and
anything else that reads runs) reads it back with :func:`read_summary`, which also reads the summaries of earlier
maskprop versions (no ``schema_version``: version 0) and refuses those of a newer one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import atomic_write
from ..cost import train_cost_saving
from ..sbp import sparse_layers
from ..sparse import kept_counts
from .config import SPARSE_BACKWARD_METHODS, config_to_dict
from .distributed import current
from .setup import Run, phase_epochs
from .state import initial_keep_probability

__all__ = ["SCHEMA_VERSION", "RunSummary", "data_identity", "read_summary", "summarize", "write_json"]

SCHEMA_VERSION = 1
"""Version of :class:`RunSummary` this maskprop writes. 0: the unversioned summaries written before (same keys, no
spread of the measured speedup, no dataset or epochs)."""


def _f(unit: str, doc: str, default: Any = None, factory: Any = None) -> Any:
    metadata = {"unit": unit, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunSummary:
    """What a run produced and saved; written as ``summary.json`` (one key per field)."""

    schema_version: int = _f("", "version of this record (SCHEMA_VERSION when written; 0: an unversioned file)",
                             SCHEMA_VERSION)
    method: str = _f("", "vrpge, dense, meprop, sbp or msbp", "")
    model: str = _f("", "registered model name", "")
    model_kwargs: dict[str, Any] = _f("", "model.kwargs of the config", factory=dict)
    dataset: str | None = _f("", "data.dataset of the config; custom for datasets passed to maskprop.fit")
    data: dict[str, Any] = _f("", "what identifies the data (dataset; for shapes its sizes and seed; for datasets "
                                  "passed to maskprop.fit their types and sizes): runs with equal model, model_kwargs "
                                  "and data are comparable", factory=dict)
    keep_ratio: float = _f("fraction", "sparsity.keep_ratio (vrpge), sbp.ratio (sparse backward), 1 (dense)", 1.0)
    epochs: dict[str, int] = _f("epochs", "configured epochs per phase (search and finetune, or train)", factory=dict)
    accuracy: float | None = _f("%", "top-1 validation accuracy of the final network (the fixed subnetwork after "
                                     "finetuning; the whole network for dense and sparse-backward runs)")
    best_accuracy: float | None = _f("%", "best validation accuracy seen at any evaluation, any phase")
    dense_accuracy: float | None = _f("%", "accuracy of a dense run of the same model and data: the run's own for "
                                           "a dense run; otherwise only where a dense run is known (maskprop report "
                                           "--baseline), never estimated")
    dense_baseline: str | None = _f("", "run directory of the dense run dense_accuracy comes from")
    dense_params: int = _f("parameters", "parameters of the full network", 0)
    subnet_params: int = _f("parameters", "parameters of the final subnetwork (= dense_params when nothing is "
                                          "pruned)", 0)
    dense_flops: int = _f("FLOPs / example", "forward FLOPs of the full network (a multiply-add is 2)", 0)
    subnet_flops: int = _f("FLOPs / example", "forward FLOPs of the final subnetwork", 0)
    kept_ratio: float = _f("fraction", "kept channels of the final subnetwork over all prunable channels", 1.0)
    train_flops: int = _f("FLOPs", "train FLOPs the run cost (supplement C.1: VR-PGE 4 f_S per example and search "
                                   "step, 3 f_S finetuning, dense 3 f_D)", 0)
    dense_train_flops: int = _f("FLOPs", "train FLOPs of the dense baseline (3 f_D per example over the search, or "
                                         "the training, steps)", 0)
    train_cost_saving: float = _f("x", "dense_train_flops / train_flops (1 for a dense run)", 1.0)
    measured_speedup: float | None = _f("x", "dense train time over the run's train time from dense reference steps "
                                             "paired with adjacent run steps: D / sum_p(n_p / median_p(dense / run "
                                             "step)), D the dense baseline's steps (timing.py; 1 for a dense run)")
    measured_speedup_iqr: list[float] | None = _f("x", "[low, high]: measured_speedup with each phase's first and "
                                                       "third quartile of the per-pair ratios")
    measured_speedup_phases: dict[str, dict[str, float]] = _f(
        "x", "per phase: median, q1, q3 of dense step / run step over its pairs, and pairs (their count)",
        factory=dict)
    speedup_warning: str | None = _f("", "why the measured speedup deserves caution (a wide interquartile range), "
                                         "or null")
    dense_reference_s: float | None = _f("s", "time the dense reference steps took (timed and warm-up)")
    dense_reference_share: float | None = _f("fraction", "dense_reference_s / run_time_s")
    data_wait_s: float | None = _f("s", "time the training loop waited for its loader's batches (starting its workers "
                                        "included; the steps' time is not in it)")
    data_wait_share: float | None = _f("fraction", "data_wait_s / run_time_s: above a few percent the loader, not the "
                                                   "steps, sets part of the run's time, which no sparsity saves")
    search_step_ms: float | None = _f("ms", "median time of a search step (forward, backward, updates)")
    finetune_step_ms: float | None = _f("ms", "median time of a finetune step")
    dense_step_ms: float | None = _f("ms", "median time of a dense reference step")
    train_step_ms: float | None = _f("ms", "median time of a train step (dense and sparse-backward runs)")
    warmup_step_ms: float | None = _f("ms", "median time of a dense warm-up step of the search "
                                            "(sparsity.warmup_epochs)")
    anneal_step_ms: float | None = _f("ms", "median time of an anneal step of the search (sparsity.anneal_epochs)")
    step_speedup: float | None = _f("x", "median of dense / run step over the pairs of the run's main kind of step "
                                         "(the search at its budget, or train)")
    steps: dict[str, int] = _f("steps", "optimizer steps per phase (search, finetune, train)", factory=dict)
    widths: dict[str, int] = _f("channels", "kept channels per group of the final network, in network order",
                                factory=dict)
    group_sizes: dict[str, int] = _f("channels", "channels per group of the full network, in network order",
                                     factory=dict)
    fix: dict[str, Any] = _f("", "how the subnetwork was fixed after the search (rule, per-sample accuracies, "
                                 "budget_spent: the share of the budget the final keep probabilities spend; rule "
                                 "random: the random baseline, fixed before the first step)", factory=dict)
    search: dict[str, Any] | None = _f(
        "", "VR-PGE runs: subnetwork ('searched' by VR-PGE, or 'random': the random baseline, no search), "
            "warmup_epochs, anneal_epochs, budget_schedule, budget_unit, initial_keep_probability, and steps of each "
            "kind (warmup: dense; anneal; search: VR-PGE at the budget; random: the fixed random subnetwork)")
    run_time_s: float = _f("s", "wall time of the run over all its processes (evaluation and checkpoints included)",
                           0.0)
    run_dir: str | None = _f("", "where the run was written (null: nothing written)")
    threads: dict[str, Any] | None = _f("threads", "torch CPU threads of the run's steps: setting (auto, a count, or "
                                                   "null: torch's default) and used ([fewest, most]; auto re-chooses "
                                                   "them every epoch from the machine's load); a resumed run's since "
                                                   "its resume")
    world_size: int = _f("processes", "processes the run trained in (torchrun's ranks; 1: one process); a resume "
                                      "needs as many", 1)
    sbp: dict[str, Any] | None = _f("", "sparse-backward runs: ratio, memory, sparsifier, budget, kept_units and "
                                        "units per layer, last_angles (degrees)")
    static_steps: dict[str, Any] | None = _f(
        "", "runs with static-shape steps (CUDA, cuda_graphs auto or true): captured (as CUDA graphs), "
            "not_captured_because (why auto could not), graph_captures, search_windows and search_shapes (capacity "
            "windows and distinct widths met), overflow_steps and overflow_channels (masks cut to a capacity, "
            "channels cut), warmup_capture_s (s: the windows' eager warm-up steps and captures), capacities (the "
            "last window's, per group)")
    initial_weights: dict[str, Any] | None = _f(
        "", "model.weights the run started from: path, sha256, tensors (loaded) and kept_initialisation (the "
            "classifier's keys where the file's is of another shape or absent); null: the seed's initialisation")

    def to_dict(self) -> dict[str, Any]:
        """The json-able dict written as ``summary.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "summary") -> RunSummary:
        """Read a summary dict of this version or an earlier one; unknown keys are ignored.

        Raises:
            ValueError: A newer schema version, or not a summary.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source} is not a run summary (a json object expected, got {type(data).__name__})")
        version = data.get("schema_version", 0)
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"{source} has schema_version={version!r}; expected a non-negative integer")
        if version > SCHEMA_VERSION:
            raise ValueError(f"{source} has summary schema version {version}, newer than this maskprop reads "
                             f"(up to {SCHEMA_VERSION}); upgrade maskprop to read it")
        names = {f.name for f in dataclasses.fields(cls)}
        if not {"method", "model"} <= set(data):
            raise ValueError(f"{source} is not a run summary (no 'method' or 'model' key)")
        values = {k: v for k, v in data.items() if k in names}
        values["schema_version"] = version
        _check_types(values, source)
        return cls(**values)


# The json types each annotation of RunSummary admits: any number for a count or a measure (a count summed on a
# device may come back as a float), never a bool.
_JSON_TYPES = {"int": (int, float), "float": (int, float), "str": (str,), "dict": (dict,), "list": (list,)}
_TYPE_NAMES = {"int": "a number", "float": "a number", "str": "text", "dict": "an object", "list": "a list",
               "None": "null"}


def _check_types(values: Mapping[str, Any], source: str) -> None:
    """Refuse a value of another type than its field's (one line naming it), which would otherwise fail later, in a
    comparison or a format string of whatever reads the summary (a file edited by hand, or not maskprop's)."""
    for spec in dataclasses.fields(RunSummary):
        if spec.name not in values:
            continue
        value, kinds = values[spec.name], [part.strip().split("[")[0] for part in str(spec.type).split("|")]
        if value is None and "None" in kinds:
            continue
        if isinstance(value, bool) or not isinstance(value, tuple(t for k in kinds for t in _JSON_TYPES.get(k, ()))):
            expected = " or ".join(_TYPE_NAMES.get(kind, kind) for kind in kinds)
            raise ValueError(f"{source} has {spec.name}={value!r}; expected {expected} (is it a summary maskprop "
                             f"train wrote?)")


def read_summary(path: str | os.PathLike) -> RunSummary:
    """Read ``summary.json`` (any version up to :data:`SCHEMA_VERSION`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not json, not a summary, or a newer schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no run summary at '{path}'")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is not valid json ({err}); expected a run summary") from None
    return RunSummary.from_dict(data, f"'{path}'")


def data_identity(data: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a run's data, from the ``data`` section of its config (a dict): the dataset, and for the
    generated ``shapes`` its sizes, image size and seed (ImageNet: the crop size)."""
    dataset = data.get("dataset")
    keys = {"shapes": ("train_size", "val_size", "image_size", "seed"), "imagenet": ("crop_size",)}.get(dataset, ())
    return {"dataset": dataset, **{key: data.get(key) for key in keys}}


def summarize(run: Run, elapsed_s: float) -> dict[str, Any]:
    """The summary of a finished run (see :class:`RunSummary`), as the dict written to ``summary.json``."""
    state, cost, counters, cfg = run.state, run.ctx.cost, run.state.counters, run.cfg
    mask = state.fixed_mask
    steps = {kind: counters[f"{kind}_steps"] for kind in ("search", "finetune", "train")}
    times = state.times
    method = cfg.method
    estimate = None
    if method == "dense":
        saving, speedup, iqr = 1.0, 1.0, [1.0, 1.0]
    else:
        saving = train_cost_saving(counters["dense_train_flops"], counters["train_flops"])
        estimate = times.measured_speedup(_timed_steps(run, steps))
        speedup = None if estimate is None else estimate.speedup
        iqr = None if estimate is None else [estimate.low, estimate.high]
    phases = {} if estimate is None else estimate.phases
    first = phases.get("search") or phases.get("train")
    kept = kept_counts(mask) if mask is not None else dict(run.groups)
    keep_ratio = {"vrpge": cfg.sparsity.keep_ratio, "dense": 1.0}.get(method, cfg.sbp.ratio)
    phase_names = ("search", "finetune") if method == "vrpge" else ("train",)
    reference_s = times.overhead_s if method != "dense" else None
    summary = RunSummary(
        method=method, model=cfg.model.name, model_kwargs=dict(cfg.model.kwargs),
        dataset=cfg.data.dataset if run.given_data is None else run.given_data["dataset"],
        data=data_identity(config_to_dict(cfg.data)) if run.given_data is None else dict(run.given_data),
        keep_ratio=keep_ratio,
        epochs={p: phase_epochs(cfg, p) for p in phase_names},
        accuracy=state.final_accuracy, best_accuracy=state.best_accuracy,
        dense_accuracy=state.final_accuracy if method == "dense" else None,
        dense_baseline=None if method != "dense" or run.run_dir is None else str(run.run_dir),
        dense_params=cost.params(), subnet_params=cost.params(mask), dense_flops=cost.flops(),
        subnet_flops=cost.flops(mask), kept_ratio=sum(kept.values()) / max(sum(run.groups.values()), 1),
        train_flops=counters["train_flops"], dense_train_flops=counters["dense_train_flops"],
        train_cost_saving=saving, measured_speedup=speedup, measured_speedup_iqr=iqr,
        measured_speedup_phases=phases, speedup_warning=None if estimate is None else estimate.warning,
        dense_reference_s=reference_s,
        dense_reference_share=None if reference_s is None or elapsed_s <= 0 else reference_s / elapsed_s,
        data_wait_s=times.data_wait_s, data_wait_share=times.data_wait_s / elapsed_s if elapsed_s > 0 else None,
        search_step_ms=_ms(times.median("search")), finetune_step_ms=_ms(times.median("finetune")),
        dense_step_ms=_ms(times.median("dense_ref")),
        train_step_ms=_ms(times.median("train")) if method != "vrpge" else None,
        warmup_step_ms=_ms(times.median("warmup")), anneal_step_ms=_ms(times.median("anneal")),
        step_speedup=None if first is None else first["median"],
        steps=steps, widths=kept, group_sizes=dict(run.groups), fix=state.fix_info, search=_search(run),
        run_time_s=elapsed_s, run_dir=None if run.run_dir is None else str(run.run_dir),
        world_size=current().world_size, threads=run.threads.record(),
        static_steps=None if run.static is None else run.static.report(),
        initial_weights=None if run.initial_weights is None else run.initial_weights.to_dict(),
    )
    if method in SPARSE_BACKWARD_METHODS:
        sbp = cfg.sbp
        summary.sbp = {
            "ratio": sbp.ratio, "memory": sbp.memory if method == "msbp" else 0.0, "sparsifier": sbp.sparsifier,
            "budget": sbp.budget, "kept_units": {name: layer.k for name, layer in sparse_layers(state.model)},
            "units": {name: layer.num_units for name, layer in sparse_layers(state.model)},
            "last_angles": dict(state.diagnostics),
        }
    return summary.to_dict()


def _timed_steps(run: Run, steps: dict[str, int]) -> dict[str, int]:
    """Run steps per kind the step times are kept by (:data:`timing.STEP_KINDS`): a VR-PGE search's steps split into
    its dense warm-up, its anneal and the search at the budget."""
    schedule = run.state.schedule
    if run.cfg.method != "vrpge" or schedule is None:
        return steps
    return dict(steps, **schedule.counts(steps["search"]))


def _search(run: Run) -> dict[str, Any] | None:
    """The ``search`` field: how the subnetwork came about (see :class:`RunSummary`)."""
    cfg, schedule = run.cfg, run.state.schedule
    if cfg.method != "vrpge" or schedule is None:
        return None
    sparsity = cfg.sparsity
    counts = schedule.counts(run.state.counters["search_steps"])
    random = sparsity.fix == "random"
    if random:
        counts = {"warmup": counts["warmup"], "random": counts["anneal"] + counts["search"]}
    return {"subnetwork": "random" if random else "searched", "warmup_epochs": sparsity.warmup_epochs,
            "anneal_epochs": sparsity.anneal_epochs, "budget_schedule": sparsity.budget_schedule,
            "budget_unit": sparsity.budget_unit,
            "initial_keep_probability": None if random else initial_keep_probability(sparsity), "steps": counts}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000.0 * seconds


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write ``data`` as indented json, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
