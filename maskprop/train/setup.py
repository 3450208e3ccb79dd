"""Setting a run up: the datasets, the model, the state to train and its step settings, all checked before anything
is written (bad input gets a one-line error and leaves nothing behind), and the checkpoint to resume from."""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import numbers
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from .._files import check_creatable
from ..check import check_model
from ..cost import CostModel, InputSizeError
from ..models import converted_source, import_models, is_model, list_models, model_entrypoint
from ..models.spec import ModelSpec
from ..sbp import GlobalBudget, convert, sparse_layers
from ..sparse import channel_groups
from ..threads import RunThreads
from .checkpoint import check_compatible, error_reason, load_checkpoint
from .config import SPARSE_BACKWARD_METHODS, Config, SbpConfig, changed_keys, config_to_dict, dotted
from .data import build_datasets, build_loader
from .decode import DecodeLoader, decode_loader
from .device_data import DeviceLoader, augment_seed, data_on_device
from .distributed import all_reduce_sum, check_world_size, current, device_for, resume_command
from .graphs import GraphsChoice, StaticSteps, resolve_cuda_graphs, set_capturable
from .optim import build_schedule, run_optimizer, score_optimizer, weight_optimizer
from .state import PHASES, TrainState, search_scores, seed_host_generators
from .steps import StepContext
from .timing import phase_epochs
from .weights import InitialWeights, load_initial_weights

__all__ = ["Run", "default_run_dir", "phase_epochs", "phase_optimizer", "prepare", "sparse_backward"]

logger = logging.getLogger(__name__)

_AMP = {"none": None, "bf16": torch.bfloat16}


@dataclass
class Run:
    """A prepared run: everything built and checked, nothing written yet.

    ``dense_model`` is an unconverted copy of the model of a sparse-backward run, for the dense reference steps of the
    measured speedup to train and time; ``None`` for the other methods, whose model runs dense without a mask.
    ``static`` runs the steps with static shapes (``graphs.py``: ``cuda_graphs`` resolved on), ``None``: the eager
    steps of ``steps.py``. ``initial_weights``: what ``model.weights`` loaded (for a resumed run, what it started
    from; ``None``: no file). ``given_data``: what identifies datasets passed in by the caller instead of the ones
    ``config.data`` names (``dataset: "custom"``, their types and sizes; ``None``: the config's). ``threads``: torch's
    CPU threads for the steps (``threads.py``; :func:`maskprop.fit` sets its own). ``train_loader`` and
    ``val_loader`` are :class:`~maskprop.train.device_data.DeviceLoader` s where ``data.on_device`` holds the data on
    the device (their ``data``: the images there), :class:`~maskprop.train.decode.DecodeLoader` s where
    ``data.decode: device`` decodes the images there, else torch's DataLoaders over ``train_set`` and its validation
    twin.
    """

    cfg: Config
    state: TrainState
    ctx: StepContext
    train_set: Dataset
    train_loader: torch.utils.data.DataLoader | DeviceLoader | DecodeLoader
    val_loader: torch.utils.data.DataLoader | DeviceLoader | DecodeLoader
    groups: dict[str, int]
    spec: ModelSpec
    run_dir: Path | None
    resumed: bool
    dense_model: nn.Module | None = None
    static: StaticSteps | None = None
    graphs: GraphsChoice = field(default_factory=lambda: GraphsChoice(False, False))
    initial_weights: InitialWeights | None = None
    given_data: dict[str, Any] | None = None
    threads: RunThreads = field(default_factory=lambda: RunThreads(None))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} but MPS is not available; use device=auto or device=cpu")
    return device


def _labels(dataset: Dataset) -> Tensor | None:
    """The labels of ``dataset`` where they can be read without loading its examples, else ``None``."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]  # TensorDataset(images, labels)
    if isinstance(dataset, Subset):
        labels = _labels(dataset.dataset)
        return None if labels is None else labels[torch.as_tensor(dataset.indices, dtype=torch.long)]
    return None


def _num_classes(dataset: Dataset) -> int:
    if isinstance(getattr(dataset, "num_classes", None), int):
        return dataset.num_classes
    if getattr(dataset, "classes", None) is not None:
        return len(dataset.classes)
    labels = _labels(dataset)
    if labels is not None and labels.numel() > 0:
        if labels.is_floating_point() or labels.dim() != 1 or int(labels.min()) < 0:
            raise ValueError(f"the labels of {type(dataset).__name__} are not class indices (a {labels.dtype} tensor "
                             f"of shape {tuple(labels.shape)}, smallest {labels.min().item()}); expected one integer "
                             f">= 0 per example")
        return int(labels.max()) + 1
    raise ValueError(f"cannot tell the number of classes of {type(dataset).__name__}: give it a num_classes, classes "
                     f"or targets attribute, or set model.kwargs.num_classes")


def _datasets(cfg: Config, train_set: Dataset | None, val_set: Dataset | None
              ) -> tuple[Dataset, Dataset, int, tuple[int, int, int], tuple[int, int, int]]:
    """The run's datasets, their number of classes, and the training and validation image sizes (``(C, H, W)``; one
    size for the config's datasets)."""
    wanted = cfg.model.kwargs.get("num_classes")
    if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1):
        raise ValueError(f"model.kwargs.num_classes={wanted!r} is not a number of classes; expected an integer >= 1 "
                         f"(at least the data's), or leave it unset (the data's count)")
    if train_set is None and val_set is None:
        train_set, val_set, num_classes, input_size = build_datasets(cfg.data)
        wanted = cfg.model.kwargs.get("num_classes")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted < num_classes:
            # Else the run starts, writes its directory and stops at the first batch, and a rerun with the same
            # --out meets that directory as another run's.
            raise ValueError(f"model.kwargs.num_classes={wanted} is below the {num_classes} classes of "
                             f"data.dataset={cfg.data.dataset!r} (labels 0 to {num_classes - 1}); expected at least "
                             f"{num_classes}, or leave it unset (the data's count)")
        return train_set, val_set, num_classes, input_size, input_size
    if train_set is None or val_set is None:
        raise ValueError("give both train_set and val_set, or neither (then config.data names them)")
    shapes = {}
    for name, dataset in (("train_set", train_set), ("val_set", val_set)):
        if hasattr(dataset, "__len__") and len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{name} has no examples; expected a dataset of (image, label) pairs")
        shapes[name] = _probe_example(name, dataset)
    num_classes = cfg.model.kwargs.get("num_classes") or _num_classes(train_set)
    for name, dataset in (("train_set", train_set), ("val_set", val_set)):
        labels = _labels(dataset)
        if labels is not None and labels.numel() > 0 and not labels.is_floating_point() and (
                int(labels.max()) >= num_classes or int(labels.min()) < 0):
            raise ValueError(f"{name} has labels from {int(labels.min())} to {int(labels.max())}, the model "
                             f"{num_classes} classes; expected labels in [0, {num_classes - 1}] (or set "
                             f"model.kwargs.num_classes)")
    return train_set, val_set, num_classes, shapes["train_set"], shapes["val_set"]


def _probe_example(name: str, dataset: Dataset) -> tuple[int, int, int]:
    """The image size of ``dataset[0]``, after checking it is an ``(image, label)`` pair with a float ``(C, H, W)``
    tensor image (one line naming what it is instead)."""
    with torch.random.fork_rng(devices=[]):  # reading an augmented example must not move the global RNG
        sample = dataset[0]
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        what = f"a {type(sample).__name__} of {len(sample)}" if isinstance(sample, (tuple, list)) else \
            f"a {type(sample).__name__}"
        raise ValueError(f"{name}[0] is {what}; expected an (image, label) pair")
    image = sample[0]
    if not isinstance(image, Tensor) or image.dim() != 3:
        raise ValueError(f"{name}[0] must be (image, label) with a (C, H, W) tensor image; got "
                         f"{type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    if image.dtype != torch.float32:
        raise ValueError(f"{name}[0]'s image is a {image.dtype} tensor; expected float32 (e.g. torchvision's "
                         f"v2.ToDtype(torch.float32, scale=True))")
    label = sample[1]
    integer = isinstance(label, numbers.Integral) and not isinstance(label, bool) or (
        isinstance(label, Tensor) and label.numel() == 1 and not label.is_floating_point()
        and not label.is_complex() and label.dtype != torch.bool)
    if not integer:
        what = f"a {label.dtype} tensor of shape {tuple(label.shape)}" if isinstance(label, Tensor) else \
            f"{type(label).__name__} {label!r}"[:80]
        raise ValueError(f"{name}[0]'s label is {what}; expected a class index (an int, or an integer tensor of one "
                         f"element)")
    return tuple(image.shape)  # type: ignore[return-value]


def _model_spec(cfg: Config, num_classes: int, input_size: tuple[int, int, int]) -> ModelSpec:
    if not is_model(cfg.model.name):  # the name itself, before the keywords
        imported = (" (a network of your own: model.module names the module that registers it)"
                    if cfg.model.module is None else f" (with model.module={cfg.model.module!r} imported)")
        raise ValueError(f"model.name={cfg.model.name!r} is not a registered model; expected one of "
                         f"{', '.join(list_models())}, or timm:NAME or torchvision:NAME{imported}")
    try:
        model_entrypoint(cfg.model.name)  # timm:NAME and torchvision:NAME: does the library have the model?
    except ValueError as err:
        raise ValueError(f"model.name={cfg.model.name!r}: {err}") from None
    try:
        return ModelSpec.resolve(cfg.model.name, cfg.model.kwargs, num_classes=num_classes, input_size=input_size,
                                 prune_residual=cfg.sparsity.prune_residual, module=cfg.model.module)
    except ValueError as err:
        unknown = _unknown_keyword(str(err), cfg.model.name, cfg.model.kwargs)
        raise ValueError(f"model.kwargs={dict(cfg.model.kwargs)} do not fit model {cfg.model.name!r} "
                         f"({unknown or err})") from None


_UNEXPECTED_KEYWORD = re.compile(r"(?:(\w+)\.__init__|\w+)\(\) got an unexpected keyword argument '(\w+)'")


def _unknown_keyword(message: str, name: str, kwargs: Mapping[str, Any]) -> str | None:
    """For a factory's "unexpected keyword argument 'KEY'" with ``KEY`` in ``model.kwargs``: which keyword was not
    taken, and the closest one the factory or the model's class takes, else that class; ``None`` for any other error.
    (The raw message listed every keyword passed, the run's own ``num_classes`` and ``prune_residual`` among them.)"""
    found = _UNEXPECTED_KEYWORD.search(message)
    if found is None or found.group(2) not in kwargs:
        return None
    owner, key = found.groups()
    entrypoint = model_entrypoint(name)
    takes = {p.name: None for p in inspect.signature(entrypoint).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    source = converted_source(name)  # the class the message names: of that library, else of the factory's module
    place = vars(sys.modules.get(f"{source}.models", sys)) if source else getattr(entrypoint, "__globals__", {})
    cls = place.get(owner) if owner else None
    if not isinstance(cls, type):
        cls = None
    if cls is not None:
        takes.update({p.name: None for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)})
    for own in ("prune_residual", key):  # sparsity.prune_residual sets the first
        takes.pop(own, None)
    close = difflib.get_close_matches(key, list(takes), n=1)
    if close:
        expected = f"did you mean model.kwargs.{close[0]}?"
    else:
        expected = f"expected a keyword that {f'{cls.__module__}.{cls.__qualname__}' if cls else name} takes"
    return f"it takes no keyword {key!r}; {expected}"


def _size_keyword(model: nn.Module) -> str | None:
    """The keyword that sets the image size a timm or torchvision model is built for, as its class takes it: timm's
    ``img_size``, torchvision's ``image_size`` (ViT) or ``input_size`` (MaxViT, ``[H, W]``); ``None`` if none."""
    try:
        takes = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):
        return None
    return next((key for key in ("img_size", "image_size", "input_size") if key in takes), None)


def _cost_model(model: nn.Module, cfg: Config, input_size: tuple[int, int, int], data: str | None = None
                ) -> CostModel:
    """The run's cost model at ``input_size``: one line where the model does not take that input (``data`` names
    whose inputs they are; default the config's dataset)."""
    try:
        return CostModel(model, input_size)
    except InputSizeError as err:
        raise ValueError(f"model {cfg.model.name!r} does not take {data or cfg.data.dataset} inputs of size "
                         f"{input_size} ({err.reason}); expected a model built for that input (model.kwargs.in_chans "
                         f"for other than 3 channels)") from None


def sparse_backward(model: nn.Module, method: str, sbp: SbpConfig) -> GlobalBudget | None:
    """Convert ``model`` in place for a sparse-backward method (docs/methods.md, sections 4-6); the global budget, if
    any.

    Every ``nn.Linear`` / ``nn.Conv2d`` becomes a :mod:`maskprop.sbp` layer propagating ``sbp.ratio`` of its output
    units (``meprop``, ``sbp``: no memory; ``msbp``: memory ``sbp.memory``); the output layer stays dense unless
    ``sbp.output_k`` gives its own k. With ``sbp.budget: balanced`` one budget of ``sbp.ratio`` of all units (the
    output layer's own k aside) is shared by the layers and re-balanced after every backward.
    """
    memory = sbp.memory if method == "msbp" else 0.0
    try:
        convert(model, ratio=sbp.ratio, sparsifier=sbp.sparsifier, memory=memory, output_k=sbp.output_k)
    except ValueError as err:
        if sbp.output_k is None:
            raise
        raise ValueError(f"sbp.output_k={sbp.output_k} does not fit the output layer ({err})") from None
    layers = [layer for _, layer in sparse_layers(model)]
    if sbp.output_k is not None:
        layers = layers[:-1]  # the output layer keeps its own k
    if not layers and (sbp.output_k is None or sbp.budget == "balanced"):  # a dense run under another name
        raise ValueError(f"method={method}: the model has no linear or conv layer besides its output layer, so no "
                         f"backward would be sparse; expected a model with hidden layers (or sbp.output_k for the "
                         f"output layer{', with sbp.budget: layer' if sbp.budget == 'balanced' else ''})")
    if sbp.budget != "balanced":
        return None
    return GlobalBudget(layers, ratio=sbp.ratio, scale=sbp.scale)


def phase_optimizer(cfg: Config, model: nn.Module, phase: str,
                     steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """The weight optimizer and its per-step schedule for ``phase``: the ``optim`` recipe (search, dense and
    sparse-backward training), or the finetune recipe (SGD, cosine)."""
    if phase == "finetune":
        ft = cfg.finetune
        optimizer = weight_optimizer(model.parameters(), ft.lr, ft.momentum, ft.weight_decay, cfg.optim.nesterov)
        return optimizer, build_schedule(optimizer, "cosine" if ft.epochs else "constant", ft.epochs * steps_per_epoch)
    opt = cfg.optim
    optimizer = run_optimizer(model.parameters(), opt)
    return optimizer, build_schedule(optimizer, opt.schedule, opt.epochs * steps_per_epoch,
                                     opt.warmup_epochs * steps_per_epoch)


def _check_run_dir(run_dir: Path | None, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (or ``None``), after checking the run directory fits the request."""
    if run_dir is None:
        if resume:
            raise ValueError("resume needs a run directory (out=...)")
        return None
    last = run_dir / "last.pt"
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory '{run_dir}' does not exist")
        if last.is_file():
            return load_checkpoint(last)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"run directory '{run_dir}' has no checkpoint ('{last}') and no config.yaml; "
                                    f"nothing to resume: start a run with 'maskprop train RECIPE --out {run_dir}' "
                                    f"(from Python: fit(config, out=...))")
        # Killed before its first checkpoint: continuing it means starting it over (same seed, same result).
        logger.warning("run directory '%s' has no checkpoint yet (the run stopped before its first save); starting "
                       "the run over from the beginning", run_dir)
        return None
    if last.exists():
        raise ValueError(f"run directory '{run_dir}' already holds a run ('{last}'); resume it with "
                         f"'{resume_command(run_dir)}' (from Python: fit(..., resume=True)) or choose another "
                         f"output directory")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"output path '{run_dir}' exists and is not a directory")
    check_creatable(run_dir.parent, run_dir)  # before anything is prepared, not when the run starts writing
    found = [name for name in _RUN_FILES if (run_dir / name).exists()]
    if found:  # a run stopped before its first checkpoint, or what is left of one: a new run would overwrite it
        raise ValueError(f"run directory '{run_dir}' holds another run's files ({', '.join(found)}); continue that run "
                         f"with '{resume_command(run_dir)}' (from Python: fit(..., resume=True)) or choose another "
                         f"output directory")
    return None


# The files a run writes into its directory (last.pt aside), which a new run there would overwrite or mix with.
_RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "best.pt")


# Settings a resumed run may change without changing what it computes.
_FREE_ON_RESUME = {"data.root", "data.workers", "device", "log_every", "eval_every", "save_every", "save_every_steps",
                   "out"}


def _check_resumed_epochs(checkpoint: Mapping[str, Any], cfg: Config, run_dir: Path) -> None:
    """A resumed run may lengthen or shorten its current phase, not below the epochs it has trained in it (an epoch
    it stopped within included), nor change a phase it has finished (the summary would report epochs that never
    ran)."""
    phase, epoch = checkpoint["phase"], checkpoint["epoch"]
    begun = epoch + (checkpoint.get("batch", 0) > 0)  # an epoch saved within it is finished first
    phases = [("search", "optim.epochs"), ("finetune", "finetune.epochs")] if cfg.method == "vrpge" else [
        ("train", "optim.epochs")]
    for name, key in phases:
        before, now = phase_epochs(checkpoint["config"], name), phase_epochs(cfg, name)
        if before is None or before == now:
            continue
        if PHASES.get(phase, 0) > PHASES[name]:
            raise ValueError(f"{key}={now}, but the run in '{run_dir}' has finished its {name} phase after {before} "
                             f"epoch{'s' if before != 1 else ''}; expected {key}={before} (a finished phase cannot "
                             f"change)")
        if phase == name and now < begun:
            trained = f"{epoch}" if begun == epoch else f"{epoch} (and part of one more)"
            raise ValueError(f"{key}={now} is below the {trained} {name} epochs the run in '{run_dir}' has trained; "
                             f"expected at least {begun}")


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The settings of ``current`` (a config as dicts) that change what a run saved with ``saved`` computes, as
    ``key: saved -> current``; those a resume may change freely (the data's directory, the workers, the device, how
    often it logs, evaluates and saves) left out. A setting ``saved`` lacks (added to maskprop since it was written)
    at its default is no change the user made, and is left out too."""
    a, b = dotted(saved, leaves=("kwargs",)), dotted(current, leaves=("kwargs",))
    defaults = dotted(config_to_dict(Config()), leaves=("kwargs",))
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in changed_keys(a, b) if key not in _FREE_ON_RESUME
            and not (key not in a and key in defaults and b.get(key) == defaults[key])]


def _warn_changed(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Log the settings that differ from the checkpoint's (:func:`changed_settings`): the run continues, but not as it
    started (``data.on_device``, which a checkpoint of before it lacks: where it moves the data, ``TrainState.load``
    says so)."""
    changed = changed_settings(saved, current)
    if changed:
        logger.warning("resuming with settings changed since the checkpoint (schedules keep their saved lengths): %s",
                       "; ".join(changed))


def prepare(cfg: Config, train_set: Dataset | None = None, val_set: Dataset | None = None,
            run_dir: Path | None = None, resume: bool = False) -> Run:
    """Build and check everything a run needs; raise one-line errors before anything is written."""
    checkpoint = _check_run_dir(run_dir, resume)
    given = None if train_set is None else _given_data(train_set, val_set)
    if checkpoint is not None:
        _check_resumed_data(checkpoint.get("given_data"), given, run_dir)
    device = _resolve_device(cfg.device)  # settings checked before a dataset is read (ImageNet's folder scan: minutes)
    if cfg.model.module is not None:
        registered = import_models(cfg.model.module)
        if registered:
            logger.info("model.module %s registers %s", cfg.model.module, ", ".join(registered))
    if not is_model(cfg.model.name):
        _model_spec(cfg, 0, (0, 0, 0))  # its one-line error
    if given is None and cfg.data.root is not None:  # config.yaml keeps it absolute: a resume from elsewhere finds it
        cfg.data.root = str(Path(cfg.data.root).expanduser().absolute())
    train_set, val_set, num_classes, input_size, val_size = _datasets(cfg, train_set, val_set)
    if num_classes < 2:
        logger.warning("the data has %d class: every prediction is right, and the accuracy (100%%) says nothing; "
                       "expected a classification task of two classes or more (model.kwargs.num_classes)", num_classes)
    place = current()  # under torchrun: one device per rank, and what DDP cannot run is refused here
    device = device_for(device, place)
    if place.enabled and cfg.method in SPARSE_BACKWARD_METHODS:
        raise ValueError(f"method={cfg.method!r} does not run under torch.distributed (world size "
                         f"{place.world_size}): its top-k selections, memories and budgets follow each rank's share of "
                         f"the batch and would differ between ranks; run it in one process")
    if cfg.sync_bn and not place.enabled:
        logger.warning("sync_bn=true synchronises BatchNorm statistics between torchrun's processes; this run is one "
                       "process, so each BatchNorm layer normalises with its own batch's statistics as without it")

    spec = _model_spec(cfg, num_classes, input_size)
    torch.manual_seed(cfg.seed)
    model = spec.build()
    source = converted_source(spec.name) or model_entrypoint(spec.name).__module__
    if cfg.model.check and not source.startswith("maskprop."):  # a network of the user's own (or converted): right?
        try:
            checked = check_model(model, input_size)
        except ValueError as err:
            size = _size_keyword(model) if source in ("timm", "torchvision") else None
            value = f"[{input_size[-2]},{input_size[-1]}]" if size == "input_size" else input_size[-1]
            hint = (f"; a model built for one image size takes model.kwargs.{size}={value}"
                    if size and str(err).startswith("check 'dense' failed") else "")
            raise ValueError(f"model {spec.name} of {source}: {err}{hint} (model.check=false skips this check)") \
                from None
        logger.info("checked %s of %s: %s", spec.name, source, checked)
    if checkpoint is None:
        initial = None if cfg.model.weights is None else load_initial_weights(model, cfg.model.weights, cfg.model.name)
        if initial is not None:  # config.yaml keeps the absolute path: a resume from elsewhere finds the same file
            cfg.model.weights = initial.path
    else:  # a resumed run's weights are in its checkpoint
        saved = checkpoint.get("initial_weights")
        initial = None if saved is None else InitialWeights.from_dict(saved, f"checkpoint '{run_dir / 'last.pt'}'")
    groups = channel_groups(model)
    if place.rank > 0:  # the same initial weights everywhere, then each rank's own augmentation and dropout draws
        torch.manual_seed(cfg.seed * 1_000_003 + place.rank)
    seed_host_generators(cfg.seed * 1_000_003 + place.rank if place.rank else cfg.seed)
    if checkpoint is not None:
        check_world_size(checkpoint, run_dir / "last.pt", place)
        check_compatible(checkpoint, run_dir / "last.pt", spec, cfg.model.kwargs, groups, cfg.method)
        _check_resumed_epochs(checkpoint, cfg, run_dir)
        _warn_changed(checkpoint["config"], config_to_dict(cfg))
    cost = _cost_model(model, cfg, input_size, None if given is None else "train_set")  # before moving it
    if val_size != input_size:  # the validation images must fit the model too (a failure would come after an epoch)
        _cost_model(model, cfg, val_size, "val_set")
        logger.warning("val_set's images are %s, train_set's %s: the model takes both, and evaluates at the former",
                       val_size, input_size)
    model.to(device)
    graphs = resolve_cuda_graphs(cfg, device, model)
    dense_model = budget = None
    if cfg.method in SPARSE_BACKWARD_METHODS:
        dense_model = copy.deepcopy(model)
        budget = sparse_backward(model, cfg.method, cfg.sbp)
    loader_generator = torch.Generator().manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    on_device = data_on_device(cfg.data, device, train_set, val_set, given=given is not None,
                               memory_format=memory_format)
    augment_generator = None
    if cfg.data.decode == "device" and given is not None:
        raise ValueError("data.decode='device' decodes the image files of data.dataset='imagenet'; got datasets given "
                         "to fit (expected data.decode='cpu' with them)")
    if cfg.data.decode == "device":  # the workers read bytes and draw; the device decodes and augments (decode.py)
        train_loader = decode_loader(train_set, cfg.data.batch_size, True, device, memory_format,
                                     workers=cfg.data.workers, generator=loader_generator)
        val_loader = decode_loader(val_set, cfg.data.batch_size, False, device, memory_format,
                                   workers=cfg.data.workers, seed=cfg.seed)
    elif on_device is None:
        train_loader = build_loader(train_set, cfg.data.batch_size, train=True, workers=cfg.data.workers,
                                    generator=loader_generator, pin_memory=device.type == "cuda")
        val_loader = build_loader(val_set, cfg.data.batch_size, train=False, workers=cfg.data.workers,
                                  seed=cfg.seed, pin_memory=device.type == "cuda")
    else:  # the same index batches from the same generator; the crops and flips from a generator on the device
        augment_generator = torch.Generator(device=device).manual_seed(augment_seed(cfg.seed, place.rank))
        train_loader = DeviceLoader(on_device[0], cfg.data.batch_size, train=True, generator=loader_generator,
                                    augment_generator=augment_generator, memory_format=memory_format)
        val_loader = DeviceLoader(on_device[1], cfg.data.batch_size, train=False, seed=cfg.seed,
                                  memory_format=memory_format)

    scores = score_opt = None
    first_phase = "search" if cfg.method == "vrpge" else "train"
    if cfg.method == "vrpge" and cfg.sparsity.fix != "random":  # a random subnetwork learns no keep probabilities
        scores = search_scores(groups, cfg.sparsity, cost)
        if graphs.static:  # static steps sample on the device, inside the step
            scores.to(device)
        score_opt = score_optimizer(scores.scores, cfg.sparsity.score_lr)
    # The weight optimizer of the phase the run is in (a resumed finetune gets the finetune SGD before loading).
    resumed_phase = None if checkpoint is None else checkpoint["phase"]
    finetuning = cfg.method == "vrpge" and resumed_phase in ("finetune", "done")
    optimizer, schedule = phase_optimizer(cfg, model, "finetune" if finetuning else first_phase, len(train_loader))
    state = TrainState(model=model, weight_optimizer=optimizer, weight_schedule=schedule, scores=scores,
                       score_optimizer=score_opt, mask_generator=torch.Generator().manual_seed(cfg.seed + 1),
                       loader_generator=loader_generator, phase=first_phase, budget=budget,
                       augment_generator=augment_generator)
    if checkpoint is not None:
        try:
            state.load(checkpoint)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"checkpoint '{run_dir / 'last.pt'}' does not fit this run ({error_reason(err, 300)})"
                             ) from None
        state.model.to(device)
        if graphs.static and scores is not None:
            scores.to(device)
        within = f", batch {state.batch} of epoch {state.epoch + 1}" if state.batch else ""  # saved within it
        logger.info("resuming %s from %s: phase %s, epoch %d, step %d%s", cfg.model.name, run_dir, state.phase,
                    state.epoch, state.step, within)
    ctx = StepContext(criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing), device=device,
                      cost=cost, amp_dtype=_AMP[cfg.amp], channels_last=cfg.channels_last,
                      clip_grad_norm=cfg.optim.clip_grad_norm,
                      align=cfg.sparsity.align or (8 if device.type == "cuda" else 1),  # null: auto by device
                      num_classes=spec.num_classes)
    if place.enabled:  # each step's loss sums, correct and example counts over the global batch
        ctx.reduce_stats = all_reduce_sum
    static = None
    if graphs.static:
        static = StaticSteps(cfg, ctx, graphs, cfg.seed + 1, world_size=place.world_size)
        if checkpoint is not None and checkpoint.get("static") is not None:
            static.load_state_dict(checkpoint["static"])
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: each convolution's fastest kernel, picked once
    if score_opt is not None:  # after the load: the checkpoint's param groups brought the flag of the run that saved it
        set_capturable(score_opt, graphs.capture)
    return Run(cfg, state, ctx, train_set, train_loader, val_loader, groups, spec, run_dir, checkpoint is not None,
               dense_model, static, graphs, initial, given)


def _check_resumed_data(saved: Mapping[str, Any] | None, given: Mapping[str, Any] | None, run_dir: Path) -> None:
    """A resumed run trains on the data it started on: the datasets given to ``fit`` again (as many examples), or the
    config's when none were given."""
    if saved is None and given is None:
        return
    if given is None:
        raise ValueError(f"the run in '{run_dir}' trained on datasets given to maskprop.fit ({saved['train']} of "
                         f"{saved['train_size']} examples); expected the same train_set and val_set to resume it "
                         f"(maskprop.fit(config, train_set, val_set, out=..., resume=True)), not config.data's")
    if saved is None:
        raise ValueError(f"the run in '{run_dir}' trained on config.data's dataset; expected no train_set and val_set "
                         f"to resume it")
    sizes = [(saved.get(k), given.get(k)) for k in ("train_size", "val_size")]
    if any(a != b for a, b in sizes):
        raise ValueError(f"the run in '{run_dir}' trained on {sizes[0][0]} and validated on {sizes[1][0]} examples, "
                         f"the datasets given now have {sizes[0][1]} and {sizes[1][1]}; expected the same datasets")


def _given_data(train_set: Dataset, val_set: Dataset | None) -> dict[str, Any]:
    """What identifies datasets a caller passed to ``fit`` (the summary's ``data``): not the config's dataset."""
    def size(dataset: Dataset | None) -> int | None:
        return len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]

    return {"dataset": "custom", "train": type(train_set).__name__, "train_size": size(train_set),
            "val": type(val_set).__name__, "val_size": size(val_set)}


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<name>-<timestamp>`` (the CLI's default output directory)."""
    return Path(root) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
