"""Export a subnetwork as a physically smaller model: ordinary torch layers holding only the kept channels.

The narrow model is :func:`maskprop.surgery.materialize`'s: the same module tree, parameter names and forward code as
the full model, every maskprop layer replaced by the plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.Linear`` of its
kept size (sparse-backward layers too), so ``torch.export``, ``torch.compile``, ONNX and DDP take it as it is, and it
computes what the full model computes under ``use_mask(model, mask)``. The architecture is rebuilt from the run's
:class:`~maskprop.models.spec.ModelSpec`, the one way maskprop builds a model.

An export directory holds:

* ``plan.json``: the width plan (:class:`WidthPlan`): the model spec (registry name, every keyword of its factory, the
  input size; :class:`maskprop.models.spec.ModelSpec`) and for every channel group its kept count and kept channel
  indices;
* ``model.safetensors``: the narrow model's state dict, rebuilt by :func:`load_exported` (the architecture is built
  on the ``meta`` device, narrowed by the plan, and the tensors are assigned to it);
* ``model.pt2``: ``torch.export`` of the model in eval mode, dynamic batch size; ``torch.export.load(p).module()``
  runs it with torch alone;
* ``model.onnx``: ``torch.onnx.export(..., dynamo=True)``, dynamic batch size (needs the ``onnx`` extra);
* ``timm_pruned.txt`` (the ImageNet ResNets: resnet18, resnet34, resnet50): the narrow widths as timm's pruned-model
  string (every conv, BatchNorm and linear weight's shape), which ``timm.models.adapt_model_from_string`` applies to
  ``timm.create_model(name)``; ``model.safetensors`` then loads into it as it is, since these models share timm's
  module tree and state-dict keys (:func:`load_timm`);
* ``export.json``: what was exported and from where, the accuracy the run measured, and the parameters, FLOPs and
  output checks measured on the exported module and on each written file.

This module imports torch alone; safetensors, ONNX, timm and the training package are imported when needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._files import atomic_directory, check_creatable, sha256
from .cost import counted_flops
from .models import converted_source
from .models.spec import ModelSpec
from .sparse import channel_groups
from .surgery import materialize

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "WidthPlan",
    "export_run",
    "load_exported",
    "load_timm",
    "parse_formats",
    "run_input_size",
    "save_exported",
    "timm_twin",
]

FORMATS = ("safetensors", "pt2", "onnx", "timm")
PLAN_FILE, WEIGHTS_FILE, PROGRAM_FILE, ONNX_FILE, TIMM_FILE, INFO_FILE = (
    "plan.json", "model.safetensors", "model.pt2", "model.onnx", "timm_pruned.txt", "export.json")
_FILES = {"safetensors": WEIGHTS_FILE, "pt2": PROGRAM_FILE, "onnx": ONNX_FILE, "timm": TIMM_FILE}
# What an export directory may hold (an ONNX file over 2 GB keeps its weights beside it): all that --force deletes.
_EXPORT_NAMES = {PLAN_FILE, WEIGHTS_FILE, PROGRAM_FILE, ONNX_FILE, ONNX_FILE + ".data", TIMM_FILE, INFO_FILE}
_TIMM_TWINS = ("resnet18", "resnet34", "resnet50")
"""maskprop's models built with timm's module tree and state-dict keys (the ImageNet ResNets, as torchvision's)."""
_TIMM_KWARGS = {"num_classes", "in_chans", "prune_residual", "zero_init_residual"}
"""Keywords of those models that leave the architecture as timm builds it (the last two decide groups and init)."""
_PLAN_FORMAT = 2  # 1: model, model_kwargs, num_classes and input_size at the top (read too)
_INFO_FORMAT = 1
_CHECK_BATCH = 2  # the output checks run a batch of 2 (a batch of 1 would not exercise the dynamic batch dimension)
_CHECK_TOLERANCE = 1e-3  # relative, float32: the checks measure ~1e-6; anything near this is a bug, not rounding


# ---------------------------------------------------------------------------------------------------------------------
# The width plan


def _compact_sizes(text: str) -> str:
    """json text with ``[C, H, W]`` lists on one line."""
    return re.sub(r"\[\s+(\d+),\s+(\d+),\s+(\d+)\s+\]", r"[\1, \2, \3]", text)


def _where(source: str | os.PathLike | None) -> str:
    return f"width plan '{source}'" if source is not None else "width plan"


@dataclass(frozen=True)
class WidthPlan:
    """What :func:`load_exported` needs to rebuild a narrow model: the model spec and the kept channels.

    Attributes:
        spec: How the full-size model is built (:class:`maskprop.models.spec.ModelSpec`): registry name, every
            keyword of its factory (``num_classes`` included), the input size the run trained on.
        channels: ``{group: number of channels}`` of the full model, in network order.
        kept: ``{group: sorted kept channel indices}``, the same groups.
    """

    spec: ModelSpec
    channels: dict[str, int]
    kept: dict[str, list[int]]

    @property
    def model(self) -> str:
        """Registry name of the model."""
        return self.spec.name

    @property
    def num_classes(self) -> int | None:
        """Outputs of the classifier, where the spec names them (else the model's default)."""
        return self.spec.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        return self.spec.input_size

    @classmethod
    def from_mask(cls, spec: ModelSpec, groups: Mapping[str, int], mask: Mapping[str, Tensor] | None) -> WidthPlan:
        """The plan of ``mask`` (``None``: every channel kept) for the model of ``spec`` with channel groups
        ``groups``."""
        kept = {g: list(range(n)) if mask is None else mask[g].nonzero().view(-1).tolist() for g, n in groups.items()}
        return cls(spec, dict(groups), kept)

    def mask(self) -> dict[str, Tensor]:
        """The plan's mask: ``{group: bool tensor}`` on the CPU."""
        mask = {}
        for group, size in self.channels.items():
            m = torch.zeros(size, dtype=torch.bool)
            m[self.kept[group]] = True
            mask[group] = m
        return mask

    def widths(self) -> dict[str, int]:
        """Kept channels per group."""
        return {g: len(k) for g, k in self.kept.items()}

    def build(self, device: torch.device | str | None = None) -> nn.Module:
        """The full-size architecture (``device="meta"``: without allocating or initialising its weights)."""
        return self.spec.build(device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _PLAN_FORMAT,
            "spec": self.spec.to_dict(),
            "groups": {g: {"channels": n, "kept": len(self.kept[g]), "indices": self.kept[g]}
                       for g, n in self.channels.items()},
        }

    def dumps(self) -> str:
        """The plan as json, one line per group (the index lists stay readable)."""
        data = self.to_dict()
        groups = data.pop("groups")
        head = _compact_sizes(json.dumps(data, indent=2))[:-2]
        lines = [f"    {json.dumps(g)}: {json.dumps(entry)}" for g, entry in groups.items()]
        return head + ',\n  "groups": {\n' + ",\n".join(lines) + "\n  }\n}\n"

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike | None = None) -> WidthPlan:
        """Read a plan written by :meth:`to_dict` (or by maskprop 0.1's first plan format), checking every field.

        Raises:
            ValueError: a missing or malformed field, or a model that is not registered (one line naming it).
        """
        where = _where(source)
        if not isinstance(data, Mapping):
            raise ValueError(f"{where} is a {type(data).__name__}; expected a json object")
        if data.get("format") == 1 and isinstance(data.get("model_kwargs"), Mapping):  # before the model spec
            data = {"format": _PLAN_FORMAT, "groups": data.get("groups"),
                    "spec": {"name": data.get("model"), "input_size": data.get("input_size"),
                             "kwargs": {**data["model_kwargs"], "num_classes": data.get("num_classes")}}}
        missing = [k for k in ("format", "spec", "groups") if k not in data]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}; expected a plan written by maskprop export")
        if data["format"] != _PLAN_FORMAT:
            raise ValueError(f"{where} has format {data['format']!r}; this maskprop reads format {_PLAN_FORMAT}")
        spec = ModelSpec.from_dict(data["spec"], source)
        if not isinstance(data["groups"], Mapping):
            raise ValueError(f"{where}: groups must be an object {{group: {{channels, kept, indices}}}}")
        channels, kept = {}, {}
        for group, entry in data["groups"].items():
            n = entry.get("channels") if isinstance(entry, Mapping) else None
            indices = entry.get("indices") if isinstance(entry, Mapping) else None
            valid = (type(n) is int and n > 0 and isinstance(indices, list) and indices
                     and all(type(i) is int for i in indices) and indices == sorted(set(indices))
                     and 0 <= indices[0] and indices[-1] < n and entry.get("kept") == len(indices))
            if not valid:
                raise ValueError(f"{where}: group {group!r} is {entry!r}; expected channels > 0, kept = number of "
                                 f"indices >= 1, and sorted distinct indices in [0, channels)")
            channels[group], kept[group] = n, list(indices)
        return cls(spec, channels, kept)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.dumps())

    @classmethod
    def load(cls, path: str | os.PathLike) -> WidthPlan:
        """Read ``plan.json`` (or the plan inside an export directory).

        Raises:
            FileNotFoundError: no plan there.
            ValueError: it is not valid json or not a valid plan.
        """
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"width plan '{path}' not found; expected a directory written by maskprop export")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"width plan '{path}' is not valid json ({err})") from None
        return cls.from_dict(data, path)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_exported(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild the narrow model of an export directory from its ``plan.json`` and ``model.safetensors``.

    The architecture is built on the ``meta`` device (nothing allocated or initialised), narrowed by the plan with
    :func:`materialize`, and the saved tensors are assigned to it (``load_state_dict(assign=True)``). Buffers that a
    state dict does not hold (non-persistent: a Swin Transformer's relative position index and shifted-window mask,
    which its constructor computes) are taken from the full model built on ``device``, where it has any.

    Args:
        path: the export directory (or its ``plan.json``).
        device: where the tensors are loaded (default: the CPU).

    Returns:
        The narrow model (plain torch layers, the model's own forward) in eval mode.

    Raises:
        FileNotFoundError: the directory lacks ``plan.json`` or ``model.safetensors``.
        ValueError: the plan is malformed, names an unknown model, or does not fit the saved tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.name == PLAN_FILE and path.is_file():  # the plan named instead of its directory
        path = path.parent
    plan = WidthPlan.load(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"'{weights}' not found; export with the safetensors format (--format safetensors, "
                                f"formats='safetensors') to load with maskprop (or load model.pt2 with "
                                f"torch.export.load)")
    try:
        where = torch.device(device or "cpu")
        if where.type == "meta":
            raise TypeError("meta holds no values")
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a device to load weights on ({err}); expected e.g. 'cpu' or "
                         f"'cuda'") from None
    try:
        tensors = load_file(weights, device=str(where))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"'{weights}' is corrupt or truncated ({' '.join(str(err).split())[:200]})") from None
    try:
        full = plan.build("meta")
    except ValueError as err:
        raise ValueError(f"{_where(path / PLAN_FILE)}: {err}") from None
    narrow = materialize(full, plan.mask())
    try:
        narrow.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"'{weights}' does not fit {_where(path / PLAN_FILE)} ({reason})") from None
    plan.spec.build_unsaved_buffers(narrow)
    unsaved = {f"{prefix}.{name}" if prefix else name for prefix, module in narrow.named_modules()
               for name in module._non_persistent_buffers_set}
    left = [name for name, t in (*narrow.named_parameters(), *narrow.named_buffers()) if t.is_meta]
    if any(name not in unsaved for name in left):
        left = [name for name in left if name not in unsaved]
        raise ValueError(f"'{weights}' has no tensor for {', '.join(left[:5])}; expected the narrow model's state dict")
    if left:
        raise ValueError(f"{_where(path / PLAN_FILE)}: the narrow model's buffers {', '.join(left[:5])} are in no "
                         f"state dict, and the model the plan builds has none of their shape; expected buffers its "
                         f"constructor makes whatever the widths (a model with width-dependent ones cannot be loaded)")
    return narrow.eval()


def timm_twin(spec: ModelSpec) -> str | None:
    """The timm model that builds ``spec``'s architecture with the same module names and state-dict keys, or ``None``.

    The ImageNet ResNets (``resnet18``, ``resnet34``, ``resnet50``, with their default ImageNet stem) have one: timm's
    model of the same name, created with the spec's ``num_classes`` and ``in_chans``. A model named ``timm:ARCH``
    (timm's own, made prunable) is its own twin: ``ARCH`` with the spec's keywords (:func:`_timm_kwargs`).
    """
    if converted_source(spec.name) == "timm":
        return spec.name.partition(":")[2]
    kwargs = dict(spec.kwargs)
    if spec.name not in _TIMM_TWINS or kwargs.pop("stem", "imagenet") != "imagenet":
        return None
    return spec.name if set(kwargs) <= _TIMM_KWARGS else None


def _timm_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The keywords of ``timm.create_model`` for ``spec``'s twin: a ``timm:ARCH`` model's own (``prune_residual`` is
    make_prunable's), else the classes and input channels."""
    if converted_source(spec.name) == "timm":
        return {k: v for k, v in spec.kwargs.items() if k != "prune_residual"}
    return {"num_classes": spec.num_classes or 1000, "in_chans": spec.input_size[0]}


def timm_pruned_string(narrow: nn.Module) -> str:
    """``narrow``'s widths as timm's pruned-model string: ``name.weight:[shape]`` of every conv, BatchNorm and linear
    layer, joined by ``***`` (what ``timm.models.adapt_model_from_string`` reads)."""
    layers = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    return "***".join(f"{name}.weight:{list(module.weight.shape)}" for name, module in narrow.named_modules()
                      if isinstance(module, layers))


def load_timm(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """Rebuild an export directory's narrow model as a timm model, the way timm alone does it:
    ``adapt_model_from_string(timm.create_model(name, num_classes=..., in_chans=...), timm_pruned.txt)``, then
    ``model.safetensors`` loaded into it (built on the ``meta`` device here, so nothing is initialised twice).

    Args:
        path: an export directory with ``plan.json``, ``timm_pruned.txt`` and ``model.safetensors``.
        device: where the tensors are loaded (default: the CPU).

    Returns:
        timm's model with the narrow widths and the exported weights, in eval mode.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the plan's model has no timm twin, or the files do not fit it.
    """
    import timm
    from safetensors.torch import load_file
    from timm.models import adapt_model_from_string

    path = Path(path)
    plan = WidthPlan.load(path)
    twin = timm_twin(plan.spec)
    if twin is None:
        raise ValueError(f"{plan.model} with {plan.spec.kwargs} has no timm twin; expected one of "
                         f"{', '.join(_TIMM_TWINS)} with the ImageNet stem")
    missing = [name for name in (TIMM_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"'{path}' lacks {', '.join(missing)}; export with --format timm")
    with torch.device("meta"):
        parent = timm.create_model(twin, pretrained=False, **_timm_kwargs(plan.spec))
    try:
        model = adapt_model_from_string(parent, (path / TIMM_FILE).read_text())
    except (KeyError, IndexError, ValueError) as err:  # a layer missing, or a shape timm cannot read
        raise ValueError(f"'{path / TIMM_FILE}' does not describe timm {timm.__version__}'s {twin} "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); expected the file maskprop "
                         f"export wrote, unedited") from None
    try:
        model.load_state_dict(load_file(path / WEIGHTS_FILE, device=str(torch.device(device or "cpu"))),
                              strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"'{path / WEIGHTS_FILE}' does not fit timm's {twin} adapted by {TIMM_FILE} "
                         f"({' '.join(str(err).split())[:300]})") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Writing an export directory


def parse_formats(formats: str | Iterable[str] | None) -> list[str]:
    """``"safetensors,pt2"`` or a list of names -> the checked list, in :data:`FORMATS` order.

    ``None`` is every format this installation can write for any model (``onnx`` only with the ``onnx`` extra
    installed; ``timm`` is added by :func:`save_exported` for models with a timm twin). ``timm`` brings
    ``safetensors`` with it (the weights timm loads).

    Raises:
        ValueError: an unknown or empty format list, or ``onnx`` without the ``onnx`` extra.
    """
    if formats is None:
        return [f for f in FORMATS if f != "timm" and (f != "onnx" or _missing_onnx() is None)]
    if not isinstance(formats, (str, list, tuple, set, frozenset)):
        raise ValueError(f"formats={formats!r}; expected None, a comma-separated string or a list of "
                         f"{', '.join(FORMATS)}")
    names = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else [str(f).strip() for f in formats]
    if "" in names and any(names):  # "safetensors,,pt2", a trailing comma
        raise ValueError(f"export formats {formats!r} have an empty entry; expected a comma-separated list of "
                         f"{', '.join(FORMATS)} (no empty name between commas)")
    names = [f for f in names if f]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown export format(s) {', '.join(map(repr, unknown)) or '(none given)'}; expected a "
                         f"comma-separated list of {', '.join(FORMATS)}")
    if "onnx" in names:
        missing = _missing_onnx()
        if missing is not None:
            raise ValueError(f"format 'onnx' needs the onnx extra ({missing} is not installed): pip install "
                             f"'maskprop[onnx]', or export the other formats (--format safetensors,pt2, "
                             f"formats='safetensors,pt2')")
    if "timm" in names:
        if importlib.util.find_spec("timm") is None:
            raise ValueError("format 'timm' needs timm, which is not installed: pip install timm")
        names.append("safetensors")
    return [f for f in FORMATS if f in names]


def _missing_onnx() -> str | None:
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _relative_error(output: Tensor, reference: Tensor) -> float:
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _export_program(model: nn.Module, x: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (x,), dynamic_shapes=({0: batch},))


def _write_onnx(model: nn.Module, x: Tensor, path: Path) -> None:
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1)
    sink = io.StringIO()
    # The exporter prints its progress and its graph passes log every rewrite at INFO: keep the command's output short.
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    try:
        with contextlib.redirect_stdout(sink):
            torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, verbose=False, report=False)
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    logger.debug("torch.onnx.export: %s", sink.getvalue().strip())


def _run_onnx(path: Path, x: Tensor) -> Tensor:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])


@torch.no_grad()
def _write_files(narrow: nn.Module, plan: WidthPlan, formats: Sequence[str], folder: Path, x: Tensor,
                 reference: Tensor) -> dict[str, Any]:
    """Write the chosen formats into ``folder``; return each file's size, digest and measured output error."""
    checks: dict[str, float] = {}
    plan.save(folder / PLAN_FILE)
    if "safetensors" in formats:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in narrow.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "maskprop_plan": PLAN_FILE})
        checks[WEIGHTS_FILE] = _relative_error(load_exported(folder, x.device)(x), reference)
    if "pt2" in formats:
        program = _export_program(narrow, x)
        torch.export.save(program, str(folder / PROGRAM_FILE))
        checks[PROGRAM_FILE] = _relative_error(torch.export.load(str(folder / PROGRAM_FILE)).module()(x), reference)
    if "onnx" in formats:
        _write_onnx(narrow, x, folder / ONNX_FILE)
        checks[ONNX_FILE] = _relative_error(_run_onnx(folder / ONNX_FILE, x), reference)
    if "timm" in formats:
        (folder / TIMM_FILE).write_text(timm_pruned_string(narrow))  # no newline: timm reads the text as is
        failure = ""
        try:
            checks[TIMM_FILE] = _relative_error(load_timm(folder, x.device)(x), reference)
        except (ValueError, RuntimeError) as err:  # the rebuilt model does not take the weights or the input
            checks[TIMM_FILE] = float("inf")
            failure = f"the model it builds does not take the exported weights and input ({type(err).__name__})"
            logger.debug("load_timm: %s", err)
        if not checks[TIMM_FILE] <= _CHECK_TOLERANCE and converted_source(plan.spec.name) == "timm":
            found = failure or f"the model it builds computes other outputs, relative error {checks[TIMM_FILE]:.3g}"
            raise ValueError(f"timm's adapt_model_from_string does not rebuild {plan.spec.name}'s narrow model "
                             f"({found}): it sets each layer's width from the weights' shapes where the model's own "
                             f"code may not follow them (a grouped convolution narrowed as a depthwise one, an MLP "
                             f"built from one hidden ratio); leave out the 'timm' format")
    bad = {name: err for name, err in checks.items() if not err <= _CHECK_TOLERANCE}
    if bad:
        raise RuntimeError(f"exported files do not reproduce the narrow model's output (relative error {bad}); "
                           f"this is a maskprop bug, please report it")
    return checks


def _check_out(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force``, and even then unless it is an earlier export (``export.json`` and
    no file an export does not write) or empty: replacing deletes it, and a run directory or a folder of runs named by
    mistake must survive."""
    if not (out.exists() or out.is_symlink()):
        check_creatable(out.parent, out)  # a file on the way: one line before anything is computed
        return
    if out.is_dir() and not out.is_symlink():
        names = [p.name for p in out.iterdir()]
        others = sorted(n for n in names if n not in _EXPORT_NAMES)
    else:  # a file or a link is no export, even one named like an export's file (export.json)
        raise ValueError(f"'{out}' exists and is {'a link' if out.is_symlink() else 'a file'}, not an earlier maskprop "
                         f"export; expected a new directory for the output (--force, force=True, replaces only an "
                         f"earlier export)")
    if others or (names and INFO_FILE not in names):  # an empty directory holds nothing to lose
        what = f"it holds '{others[0]}'" if others else f"it has no {INFO_FILE}"
        raise ValueError(f"'{out}' exists and is not an earlier maskprop export ({what}); expected a new directory "
                         f"for the output (--force, force=True, replaces only an earlier export)")
    if not force:
        raise ValueError(f"output directory '{out}' exists; pass --force (force=True) to replace it")


def _check_spec(model: nn.Module, spec: ModelSpec) -> None:
    """Raise unless ``spec`` builds ``model``'s architecture (the same channel groups and tensor shapes)."""
    built = spec.build("meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    if channel_groups(built) != channel_groups(model) or ours != theirs:
        differ = next((k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)), "channel groups")
        raise ValueError(f"spec {spec.name} with {spec.kwargs} does not build this model (they differ at {differ}: "
                         f"{theirs.get(differ)} vs the model's {ours.get(differ)}); expected the spec the model was "
                         f"built from")
    try:
        with torch.no_grad():
            built.eval()(torch.zeros(1, *spec.input_size, device="meta"))
    except RuntimeError as err:
        raise ValueError(f"spec {spec.name}'s input_size {tuple(spec.input_size)} does not fit the model "
                         f"({' '.join(str(err).split())[:160]}); expected the input the model takes") from None


def save_exported(model: nn.Module, mask: Mapping[str, Tensor] | None, out: str | os.PathLike, *, spec: ModelSpec,
                  formats: str | Iterable[str] | None = None, force: bool = False,
                  source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Export the subnetwork ``mask`` of ``model`` to the directory ``out``, and check every file written.

    The narrow model (:func:`materialize`) is checked against ``model`` under ``use_mask`` in both modes, and every
    file written is read back and checked against the narrow model, on a batch of 2 seeded normal inputs in eval
    mode; parameters and FLOPs (``torch.utils.flop_counter``, one example) are measured on the narrow model. The
    files are written into a temporary directory beside ``out`` and renamed to ``out`` at the end: an error leaves
    nothing behind.

    Args:
        model: the full maskprop model (``model.channel_groups()``), on any device.
        mask: the subnetwork; ``None`` exports the whole model.
        out: the export directory to create.
        spec: how ``model`` was built (e.g. ``ModelSpec("resnet32", {"num_classes": 10}, (3, 32, 32))``); the plan
            rebuilds the architecture from it, so it is checked to build ``model``'s shapes.
        formats: names from :data:`FORMATS`, a list or ``"safetensors,pt2"``; default every format available for
            the model (``timm`` where it has a timm twin: :func:`timm_twin`).
        force: replace an existing ``out`` that is an earlier export (``export.json`` and only the files an export
            writes; anything else is refused).
        source: extra information recorded in ``export.json`` (checkpoint, accuracy, ...).

    Returns:
        The content of ``export.json``.

    Raises:
        ValueError: a bad mask, format list or spec, or ``out`` exists without ``force``.
        TypeError: ``spec`` is not a :class:`ModelSpec`, or ``out`` not a path.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec is {type(spec).__name__}; expected a ModelSpec, e.g. ModelSpec('resnet32', "
                        f"{{'num_classes': 10}}, (3, 32, 32))")
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out is {type(out).__name__}; expected the export directory's path")
    out = Path(out)
    chosen = parse_formats(formats)
    twin = timm_twin(spec)
    if formats is None and spec.name in _TIMM_TWINS and twin is not None and importlib.util.find_spec("timm"):
        chosen = parse_formats([*chosen, "timm"])  # timm:ARCH models: asked for, as timm rebuilds only some of them
    if "timm" in chosen and twin is None:
        raise ValueError(f"format 'timm' is for models timm builds with the same layers ({', '.join(_TIMM_TWINS)} "
                         f"with the ImageNet stem, or timm:NAME); {spec.name} with {spec.kwargs} has no timm twin")
    _check_out(out, force)
    _check_spec(model, spec)
    input_size, model_name = spec.input_size, spec.name
    plan = WidthPlan.from_mask(spec, channel_groups(model), mask)
    narrow = materialize(model, mask)
    parameter = next(model.parameters())
    x = torch.randn(_CHECK_BATCH, *input_size, generator=torch.Generator().manual_seed(0)).to(
        parameter.device, parameter.dtype)

    was_training = model.training
    from .sparse import use_mask

    try:
        model.eval()
        narrow.eval()
        with torch.no_grad():
            reference = narrow(x)
            against_full = {}
            for mode in ("compact", "masked"):
                with use_mask(model, mask, mode):
                    against_full[mode] = _relative_error(reference, model(x))
            dense_flops = counted_flops(model, x[:1])
        flops = counted_flops(narrow, x[:1])
    finally:
        model.train(was_training)
    num_classes = reference.shape[-1]
    if not bool(reference.isfinite().all()):
        raise ValueError(f"{model_name}'s output is not finite on a normal input (NaN or inf weights?); expected a "
                         f"trained model to export")
    if not max(against_full.values()) <= _CHECK_TOLERANCE:
        raise RuntimeError(f"the narrow model differs from the full model under its mask (relative error "
                           f"{against_full}); this is a maskprop bug, please report it")

    with atomic_directory(out, force) as folder:
        file_checks = _write_files(narrow, plan, chosen, folder, x, reference)
        from . import __version__

        info = {
            "format": _INFO_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "maskprop_version": __version__,
            "torch_version": torch.__version__,
            "model": model_name,
            "spec": spec.to_dict(),
            "num_classes": num_classes,
            "input_size": list(input_size),
            **dict(source or {}),
            "params": sum(p.numel() for p in narrow.parameters()),
            "dense_params": sum(p.numel() for p in model.parameters()),
            "flops": flops,
            "dense_flops": dense_flops,
            "widths": plan.widths(),
            **({"timm": {"model": twin, **_timm_kwargs(spec)}} if "timm" in chosen else {}),
            "check": {
                "input": f"{_CHECK_BATCH} x {list(input_size)} seeded normal, eval mode, {str(parameter.dtype)[6:]}",
                "narrow_vs_full_model_under_mask": against_full,
                "files_vs_narrow_model": file_checks,
            },
            "files": {},
        }
        for name in [PLAN_FILE, *(_FILES[f] for f in chosen)]:
            info["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
        (folder / INFO_FILE).write_text(_compact_sizes(json.dumps(info, indent=2)) + "\n")
    logger.debug("exported %s (%s) to %s", model_name, ", ".join(chosen), out)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Exporting a run


def run_input_size(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` of the examples a run trained on, from its config dict (as ``maskprop.train.data`` decides it).

    Raises:
        ValueError: the config names no dataset this function knows (pass the input size explicitly).
    """
    data = config.get("data") or {}
    name = data.get("dataset", "shapes")
    if name == "shapes":
        size = int(data.get("image_size", 32))
        return (3, size, size)
    if name in ("mnist", "fashion_mnist"):
        return (1, 28, 28)
    if name in ("cifar10", "cifar100"):
        return (3, 32, 32)
    if name == "imagenet":
        size = int(data.get("crop_size", 224))
        return (3, size, size)
    raise ValueError(f"cannot tell the input size of data.dataset={name!r}; expected a maskprop dataset, or pass "
                     f"--input-size C,H,W")


def _measured_accuracy(checkpoint: Mapping[str, Any], which: str, mask_rule: str) -> tuple[float | None, str]:
    """The validation accuracy the run measured for exactly these weights and this mask, and where it comes from."""
    phase, epoch = checkpoint["phase"], checkpoint["epoch"]
    # A checkpoint is written right after its epoch's evaluation, if any; a search evaluates its top-score subnetwork,
    # a run with a fixed subnetwork (after the fix, or the random baseline's) that one.
    evaluated = "top_scores" if phase == "search" and checkpoint.get("fixed_mask") is None else "fixed"
    if which == "best":  # written when that evaluation beat every earlier one
        accuracy = checkpoint.get("best_accuracy")
        if evaluated == mask_rule and accuracy is not None and accuracy >= 0:
            return float(accuracy), (f"best_accuracy of best.pt: validation top-1 (%) of these weights with this "
                                     f"mask, measured in phase {phase!r}")
        return None, (f"not measured: best.pt (phase {phase!r}) was evaluated with the {evaluated} subnetwork, "
                      f"this export is the {mask_rule} one")
    accuracy = checkpoint.get("final_accuracy")
    if phase == "done" and mask_rule == "fixed" and accuracy is not None:
        return float(accuracy), "final_accuracy of last.pt: validation top-1 (%) of the finished run's final network"
    last = checkpoint.get("last_accuracy")
    if phase != "done" and last is not None and evaluated == mask_rule:
        return float(last), (f"last_accuracy of last.pt: validation top-1 (%) of these weights with this mask, "
                             f"measured at epoch {epoch} of phase {phase!r}")
    if phase != "done" and last is not None:
        return None, (f"not measured: last.pt (phase {phase!r}) was evaluated with the {evaluated} subnetwork, this "
                      f"export is the {mask_rule} one")
    if phase != "done":
        return None, (f"not measured: the run stopped in phase {phase!r} at epoch {epoch}, and last.pt records no "
                      f"accuracy of these weights (its epoch did not evaluate, or evaluated the top scores above the "
                      f"final budget, in a warm-up or anneal: export best.pt, or finish the run)")
    return None, "not measured: the run's final accuracy is that of its fixed subnetwork, not of the top scores"


def _checkpoint_mask(checkpoint: Mapping[str, Any], path: Path, model: nn.Module, spec: ModelSpec,
                     mask_rule: str) -> dict[str, Tensor] | None:
    """The subnetwork to export: the fixed one (``None`` for runs that train the whole network), or the top scores."""
    method, phase = checkpoint["method"], checkpoint["phase"]
    scores_state = checkpoint.get("scores")
    if mask_rule == "top_scores":
        if scores_state is None:
            raise ValueError(f"checkpoint '{path}' is a method={method!r} run without channel scores; --mask "
                             f"top_scores needs a VR-PGE run")
        from .vrpge import ChannelScores

        sparsity = checkpoint["config"].get("sparsity") or {}
        keep_ratio = sparsity.get("keep_ratio")
        prices = None  # a budget in FLOPs: the channel prices the run's top-score subnetworks were chosen with
        if sparsity.get("budget_unit") == "flops":
            from .cost import CostModel

            prices = CostModel(model, spec.input_size).channel_prices(keep_ratio)
        scores = ChannelScores(channel_groups(model), keep_ratio, prices=prices)
        scores.load_state_dict(scores_state)
        return {g: m.cpu() for g, m in scores.top_mask().items()}
    if checkpoint.get("fixed_mask") is not None:
        return checkpoint["fixed_mask"]
    if method == "vrpge":
        raise ValueError(f"checkpoint '{path}' is from phase {phase!r} (epoch {checkpoint['epoch']}): the run has "
                         f"not fixed its subnetwork yet; finish it (maskprop train --resume, or fit(..., "
                         f"resume=True)), or export the highest-probability subnetwork (--mask top_scores, "
                         f"mask='top_scores')")
    return None  # dense and sparse-backward runs train the whole network


def _checkpoint_spec(checkpoint: Mapping[str, Any], path: Path, input_size: tuple[int, int, int] | None) -> ModelSpec:
    """The model spec of a checkpoint, with the input size asked for.

    Checkpoints save their spec; one written before the spec existed gets it derived from its config as the trainer
    resolved it then (``model.kwargs``, ``sparsity.prune_residual``, an MLP's ``in_features`` from the input size) and
    the number of classes from its classifier's weight.
    """
    where = f"checkpoint '{path}'"
    config = checkpoint.get("config") or {}
    if checkpoint.get("model_spec") is not None:
        try:
            spec = ModelSpec.from_dict(checkpoint["model_spec"], path, import_module=True)  # the run's own
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if input_size is None or input_size == spec.input_size:
            return spec
        logger.warning("input size %s is not the %s the run trained on: the FLOPs are counted at %s, the accuracy "
                       "recorded was measured at %s", ",".join(map(str, input_size)),
                       ",".join(map(str, spec.input_size)), ",".join(map(str, input_size)),
                       ",".join(map(str, spec.input_size)))
        spec = dataclasses.replace(spec, input_size=input_size)
    else:
        size = input_size or run_input_size(config)
        name, kwargs = checkpoint["model_name"], dict(checkpoint["model_kwargs"] or {})
        residual = bool((config.get("sparsity") or {}).get("prune_residual", True))
        try:
            probe = ModelSpec.resolve(name, kwargs, num_classes=1, input_size=size, prune_residual=residual)
            classifier = [n for n, m in probe.build("meta").named_modules() if isinstance(m, nn.Linear)][-1]
            num_classes = int(checkpoint["model"][f"{classifier}.weight"].shape[0])
            spec = ModelSpec.resolve(name, kwargs, num_classes=num_classes, input_size=size, prune_residual=residual)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{where} does not describe a model maskprop can build ({name} with model.kwargs="
                             f"{kwargs}: {' '.join(str(err).split())[:200]})") from None
    in_features = spec.kwargs.get("in_features")
    if in_features is not None and in_features != math.prod(spec.input_size):
        raise ValueError(f"{where}: {spec.name} reads {in_features} features but the input size {spec.input_size} "
                         f"has {math.prod(spec.input_size)}; pass --input-size C,H,W")
    return spec


def _model_from_checkpoint(checkpoint: Mapping[str, Any], path: Path,
                           input_size: tuple[int, int, int] | None) -> tuple[nn.Module, ModelSpec]:
    """The full model with the checkpoint's weights, and its spec."""
    spec = _checkpoint_spec(checkpoint, path, input_size)
    try:
        model = spec.build("meta")
    except ValueError as err:
        raise ValueError(f"checkpoint '{path}': {err}") from None
    theirs = [(str(g), int(n)) for g, n in checkpoint["groups"]]
    ours = list(channel_groups(model).items())
    if theirs != ours:
        raise ValueError(f"checkpoint '{path}' has {len(theirs)} channel groups ({sum(n for _, n in theirs)} "
                         f"channels), but {spec.name} with {spec.kwargs} has {len(ours)} "
                         f"({sum(n for _, n in ours)}); the checkpoint is from another model")
    try:
        model.load_state_dict(checkpoint["model"], strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint '{path}' holds weights of another model than {spec.name} with {spec.kwargs} "
                         f"({' '.join(str(err).split())[:200]})") from None
    spec.build_unsaved_buffers(model)
    return model.eval(), spec


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               formats: str | Iterable[str] | None = None, *, checkpoint: str = "last", mask: str = "fixed",
               force: bool = False, input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Export the subnetwork of a training run (what ``maskprop export RUN_DIR`` does).

    Which checkpoint: ``last`` (default) is ``last.pt``; when the run has finished (phase ``done``) it holds the final
    network, and export.json records the run's final accuracy. ``best`` is ``best.pt``, the weights of the best
    validation accuracy seen; in a VR-PGE run that may be a search-phase checkpoint, evaluated (and exported) with the
    top-score subnetwork (``mask="top_scores"``). Which mask: ``fixed`` (default) is the subnetwork the run fixed after
    its search; dense and sparse-backward runs export the whole model. A VR-PGE checkpoint from before the fix has
    none and is refused unless ``mask="top_scores"`` asks for the highest-probability subnetwork
    (:meth:`maskprop.vrpge.ChannelScores.top_mask`).

    Args:
        run_dir: the run directory (``maskprop train --out``).
        out: the export directory (default ``RUN_DIR/export``).
        formats: see :func:`save_exported`.
        checkpoint: ``last`` or ``best``.
        mask: ``fixed`` or ``top_scores``.
        force: replace an existing ``out`` that is an earlier export (``export.json`` and only the files an export
            writes; anything else is refused).
        input_size: ``(C, H, W)`` to check and count FLOPs at; default the input the run trained on (its model spec;
            for a checkpoint written before the spec existed, its data config: give it for runs on your own data).

    Returns:
        The content of ``export.json``.

    Raises:
        FileNotFoundError: no run directory or no checkpoint in it.
        ValueError: ``run_dir`` is a file; anything else the user can fix (one line; nothing is written).
    """
    from .train.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    if checkpoint not in ("last", "best"):
        raise ValueError(f"unknown checkpoint {checkpoint!r}; expected 'last' or 'best'")
    if mask not in ("fixed", "top_scores"):
        raise ValueError(f"unknown mask {mask!r}; expected 'fixed' or 'top_scores'")
    parse_formats(formats)  # a bad format list fails before the checkpoint is read
    if run_dir.exists() and not run_dir.is_dir():  # a checkpoint or config file named instead of its directory
        raise ValueError(f"'{run_dir}' is a file, not a run directory; expected the directory of a maskprop train run "
                         f"(the one holding last.pt)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
    path = run_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run directory '{run_dir}' has no checkpoint '{path.name}'; expected the directory "
                                f"of a maskprop train run")
    out = Path(out) if out is not None else run_dir / "export"
    _check_out(out, force)
    state = load_checkpoint(path)
    if input_size is not None and (len(input_size) != 3 or not all(int(s) > 0 for s in input_size)):
        raise ValueError(f"input_size={tuple(input_size)}; expected (C, H, W), positive integers")
    model, spec = _model_from_checkpoint(state, path, None if input_size is None else tuple(map(int, input_size)))
    subnet = _checkpoint_mask(state, path, model, spec, mask)
    accuracy, accuracy_source = _measured_accuracy(state, checkpoint, mask)
    source = {
        "source": {"run_dir": str(run_dir), "checkpoint": str(path), "method": state["method"],
                   "phase": state["phase"], "epoch": state["epoch"], "step": state["step"],
                   "mask": mask if subnet is not None else "none (whole model)"},
        "accuracy": accuracy,
        "accuracy_source": accuracy_source,
    }
    try:
        return save_exported(model, subnet, out, spec=spec, formats=formats, force=force, source=source)
    except ValueError as err:
        if subnet is not None and "mask" in str(err):
            raise ValueError(f"checkpoint '{path}': its mask does not fit the model ({err})") from None
        raise
