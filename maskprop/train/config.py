"""Run configuration: validated dataclasses, loaded from yaml with dotted command-line overrides.

A configuration flows yaml -> defaults -> command line (``load_config``) and the resolved result is saved next to the
run (``save_config``). Every section validates itself when it is constructed, so a ``Config`` that exists is a valid
one; errors are one line naming the dotted key, the value and what is expected.

The defaults are the CIFAR recipe of the VR-PGE paper (``METHODS.md`` section 1, supplement B): batch 256, SGD lr 0.1,
momentum 0.9, weight decay 5e-4 with a cosine schedule for the weights, Adam lr 12e-3 for the scores, and a 40-epoch
finetune at SGD lr 1e-3 after the subnetwork is fixed. The default dataset is the built-in ``shapes`` one so that a
run needs no files; recipes name the real dataset and its ``root``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from .files import atomic_write

__all__ = [
    "SPARSE_BACKWARD_METHODS",
    "Config",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "SbpConfig",
    "SparsityConfig",
    "config_to_dict",
    "load_config",
    "save_config",
]

Method = Literal["vrpge", "dense", "meprop", "sbp", "msbp"]
DatasetName = Literal["shapes", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"]
Estimator = Literal["vrpge", "vrpge_sym"]
WeightGrad = Literal["first", "both"]
FixRule = Literal["best_of_n", "top_scores"]
Schedule = Literal["cosine", "step", "constant"]
Amp = Literal["none", "bf16"]
OptimizerName = Literal["sgd", "adam"]
Sparsifier = Literal["topk", "topk_unified", "randomk"]
Budget = Literal["layer", "balanced"]
BudgetScale = Literal["none", "variance", "rms"]
SPARSE_BACKWARD_METHODS = ("meprop", "sbp", "msbp")

_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# yaml 1.1 reads "12e-3" (no dot) as a string; numbers written that way are accepted for numeric fields.
_FLOAT_PATTERN = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NULL_WORDS = ("null", "Null", "NULL", "~", "")


class _Section:
    """Mixin for config dataclasses: type coercion and checks at construction time.

    ``_prefix`` is the section's dotted name inside ``Config`` so that errors name the full key.
    """

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            key = self._key(f.name)
            value = _check_type(key, getattr(self, f.name), _field_types(type(self))[f.name])
            object.__setattr__(self, f.name, value)
        self._check_ranges()

    def validate(self) -> None:
        """Re-run the type and range checks (for a config edited after construction)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value.validate()
        self.__post_init__()

    def _key(self, name: str) -> str:
        return f"{self._prefix}.{name}" if self._prefix else name

    def _check_ranges(self) -> None:
        """Section-specific range checks; raise ``ValueError`` naming the key."""

    def _require(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ValueError(f"{self._key(name)}={getattr(self, name)!r} is out of range; expected {expected}")


@dataclass
class ModelConfig(_Section):
    """Which network to build.

    Attributes:
        name: Name in the model registry (``maskprop.models``), e.g. ``resnet20``, ``resnet32``, ``vgg19``.
        kwargs: Keyword arguments for the model factory, e.g. ``{width: 2}``; ``num_classes`` comes from the data.
    """

    _prefix: ClassVar[str] = "model"

    name: str = "resnet20"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def _check_ranges(self) -> None:
        self._require("name", bool(self.name), "a non-empty model name")
        for key in self.kwargs:
            if not isinstance(key, str):
                raise ValueError(f"model.kwargs key {key!r} must be a string (a keyword argument name)")


@dataclass
class DataConfig(_Section):
    """Which data, and how it is loaded.

    Attributes:
        dataset: ``shapes`` (built in, generated in memory), ``mnist`` / ``fashion_mnist`` (IDX files under
            ``root/MNIST/raw`` / ``root/FashionMNIST/raw``), ``cifar10``, ``cifar100`` (python pickle format under
            ``root``) or ``imagenet`` (ImageFolder ``root/train`` and ``root/val``).
        root: Directory holding the dataset; unused for ``shapes``.
        batch_size: Global mini-batch size.
        workers: DataLoader worker processes (0 loads in the main process).
        augment: Training augmentation (random crop and flip; random resized crop for ImageNet; none for MNIST).
        train_size: Number of ``shapes`` training images.
        val_size: Number of ``shapes`` validation images.
        seed: Seed of the ``shapes`` generator (train and validation use different streams derived from it).
        crop_size: ImageNet crop size (evaluation resizes to ``crop_size / 0.875`` and center-crops).
        image_size: Side of the ``shapes`` images in pixels.
    """

    _prefix: ClassVar[str] = "data"

    dataset: DatasetName = "shapes"
    root: str | None = None
    batch_size: int = 256
    workers: int = 2
    augment: bool = True
    train_size: int = 10000
    val_size: int = 2000
    seed: int = 0
    crop_size: int = 224
    image_size: int = 32

    def _check_ranges(self) -> None:
        self._require("batch_size", self.batch_size >= 1, "an integer >= 1")
        self._require("workers", self.workers >= 0, "an integer >= 0")
        self._require("train_size", self.train_size >= 1, "an integer >= 1")
        self._require("val_size", self.val_size >= 1, "an integer >= 1")
        self._require("seed", self.seed >= 0, "an integer >= 0")
        self._require("crop_size", self.crop_size >= 8, "an integer >= 8")
        self._require("image_size", self.image_size >= 8, "an integer >= 8")


@dataclass
class SparsityConfig(_Section):
    """VR-PGE channel sampling (``METHODS.md`` section 1).

    Attributes:
        keep_ratio: Budget K as a fraction of all prunable channels: sum of scores <= keep_ratio x channels.
        estimator: ``vrpge`` (paper eq. 12, default) or ``vrpge_sym`` (the official code's symmetric form).
        alpha: Exponent of H^alpha(s); the variance is bounded for alpha in [1/2, 1) (supplement A.2).
        weight_grad: ``first`` back-propagates the first mask only (paper cost); ``both`` averages the weight
            gradients of both masks (official code).
        init: Constant the scores start at (official: 0.5), projected onto the budget before the first step.
        score_lr: Adam learning rate of the scores (supplement B: the only grid-searched hyperparameter).
        prune_residual: Prune the channels of residual streams (one shared group per stream) or keep them whole.
        fix: How the final subnetwork is chosen: ``best_of_n`` samples ``fix_samples`` masks and keeps the one with
            the best training accuracy (official), ``top_scores`` keeps the largest scores up to the budget.
        fix_samples: Masks sampled by ``best_of_n``.
        fix_examples: Training examples (the first ones, in eval mode) ``best_of_n`` scores each mask on; null: the
            whole training set, as the official code.
        align: Pad each group's kept set up to a multiple of ``align`` channels with dropped channels whose output is
            forced to zero (exact; GPU tensor cores and cuDNN's plan cache want aligned widths); null: 8 on CUDA,
            1 (no padding) on the CPU.
    """

    _prefix: ClassVar[str] = "sparsity"

    keep_ratio: float = 0.5
    estimator: Estimator = "vrpge"
    alpha: float = 0.5
    weight_grad: WeightGrad = "first"
    init: float = 0.5
    score_lr: float = 12e-3
    prune_residual: bool = True
    fix: FixRule = "best_of_n"
    fix_samples: int = 10
    fix_examples: int | None = None
    align: int | None = None

    def _check_ranges(self) -> None:
        self._require("keep_ratio", 0.0 < self.keep_ratio <= 1.0, "a fraction in (0, 1]")
        self._require("alpha", 0.0 <= self.alpha < 1.0, "a number in [0, 1)")
        self._require("init", 0.0 < self.init <= 1.0, "a probability in (0, 1]")
        self._require("score_lr", self.score_lr > 0.0, "a number > 0")
        self._require("fix_samples", self.fix_samples >= 1, "an integer >= 1")
        self._require("fix_examples", self.fix_examples is None or self.fix_examples >= 1, "an integer >= 1 or null")
        self._require("align", self.align is None or self.align >= 1, "a positive integer or null (auto)")


@dataclass
class SbpConfig(_Section):
    """Sparse-backward baselines: meProp, SBP and MSBP (``METHODS.md`` sections 2-4, ``maskprop.sbp``).

    Every ``nn.Linear`` / ``nn.Conv2d`` of the model runs its ordinary forward and propagates only ``k`` of its output
    units (conv: channels) in the backward; the output layer stays dense unless ``output_k`` is set.

    Attributes:
        ratio: Fraction r = k / n of each layer's output units that propagate a gradient (MSBP paper's sparse ratio;
            meProp's MNIST setting k = 20 of 500 is 0.04). With ``budget: balanced`` it is the global fraction.
        memory: MSBP memory ratio gamma in (0, 1) (method ``msbp``); ``meprop`` and ``sbp`` run without memory.
        sparsifier: ``topk_unified`` (one index set per mini-batch from magnitudes summed over it, meProp section 4.8),
            ``topk`` (per example, original meProp) or ``randomk`` (uniformly random units; methods ``sbp`` and
            ``msbp`` only).
        budget: ``layer`` (the same ratio in every layer) or ``balanced`` (one total budget shared by all layers,
            re-balanced after every backward so that one threshold serves every layer; paper 003).
        scale: How layer magnitudes are made comparable for ``balanced``: ``variance`` (paper 003 eqs. (8)-(9)),
            ``rms`` (each layer's own root mean square) or ``none``.
        output_k: Units the output layer propagates, or null to leave it dense (meProp section 2.2.1).
        angle_every: Steps between measurements of the gradient estimation angle (MSBP paper Figure 5), logged to
            TensorBoard per layer and overall; each costs two extra backward passes. 0 never measures it.
    """

    _prefix: ClassVar[str] = "sbp"

    ratio: float = 0.04
    memory: float = 0.8
    sparsifier: Sparsifier = "topk_unified"
    budget: Budget = "layer"
    scale: BudgetScale = "variance"
    output_k: int | None = None
    angle_every: int = 100

    def _check_ranges(self) -> None:
        self._require("ratio", 0.0 < self.ratio <= 1.0, "a fraction in (0, 1]")
        self._require("memory", 0.0 <= self.memory < 1.0, "a number in [0, 1)")
        self._require("output_k", self.output_k is None or self.output_k >= 1,
                      "an integer >= 1 or null (dense output layer)")
        self._require("angle_every", self.angle_every >= 0, "an integer >= 0 (0: never)")


@dataclass
class OptimConfig(_Section):
    """Weight optimizer and schedule of the search phase (or of the whole run for dense and sparse-backward methods).

    Attributes:
        optimizer: ``sgd`` or ``adam``; null: Adam for the sparse-backward methods (as in their papers), SGD otherwise.
        lr: Peak learning rate (per ``batch_size`` as configured; no implicit scaling); null: 0.1 for SGD (the
            VR-PGE CIFAR recipe), 1e-3 for Adam (the meProp and MSBP papers).
        momentum: SGD momentum (Adam keeps its default betas).
        weight_decay: L2 weight decay on the weights (never on the scores); null: 5e-4 for SGD, 0 for Adam.
        nesterov: Nesterov momentum.
        epochs: Epochs of training (official CIFAR runs: 300).
        schedule: Learning-rate schedule after warmup: ``cosine`` to 0, ``step`` (x0.1 at 50% and 75%), ``constant``.
        warmup_epochs: Linear warmup epochs (ImageNet recipe), counted inside ``epochs``.
        label_smoothing: Cross-entropy label smoothing (ImageNet recipe: 0.1).
        clip_grad_norm: Clip the joint gradient norm at this value (the official code uses 3), or no clipping.
    """

    _prefix: ClassVar[str] = "optim"

    optimizer: OptimizerName | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    nesterov: bool = False
    epochs: int = 300
    schedule: Schedule = "cosine"
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    clip_grad_norm: float | None = None

    def _check_ranges(self) -> None:
        self._require("lr", self.lr is None or self.lr > 0.0, "a number > 0 or null (the optimizer's default)")
        self._require("momentum", 0.0 <= self.momentum < 1.0, "a number in [0, 1)")
        self._require("weight_decay", self.weight_decay is None or self.weight_decay >= 0.0,
                      "a number >= 0 or null (the optimizer's default)")
        self._require("epochs", self.epochs >= 1, "an integer >= 1")
        self._require("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs,
                      f"an integer in [0, optim.epochs={self.epochs}]")
        self._require("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "a number in [0, 1)")
        self._require("clip_grad_norm", self.clip_grad_norm is None or self.clip_grad_norm > 0.0,
                      "a number > 0 or null (no clipping)")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("optim.nesterov=True needs optim.momentum > 0; got optim.momentum=0.0")

    def resolve(self, method: str) -> None:
        """Fill the null fields with the defaults of ``method`` (see the attributes)."""
        if self.optimizer is None:
            self.optimizer = "adam" if method in SPARSE_BACKWARD_METHODS else "sgd"
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adam" else 0.1
        if self.weight_decay is None:
            self.weight_decay = 0.0 if self.optimizer == "adam" else 5e-4


@dataclass
class FinetuneConfig(_Section):
    """Finetuning of the fixed subnetwork after the search (SGD, cosine schedule).

    Attributes:
        epochs: Finetune epochs (official: 40); 0 skips finetuning.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
    """

    _prefix: ClassVar[str] = "finetune"

    epochs: int = 40
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def _check_ranges(self) -> None:
        self._require("epochs", self.epochs >= 0, "an integer >= 0 (0 skips finetuning)")
        self._require("lr", self.lr > 0.0, "a number > 0")
        self._require("momentum", 0.0 <= self.momentum < 1.0, "a number in [0, 1)")
        self._require("weight_decay", self.weight_decay >= 0.0, "a number >= 0")


@dataclass
class Config(_Section):
    """A whole run.

    Attributes:
        method: ``vrpge`` (learned channel masks), ``dense``, or a sparse-backward baseline ``meprop``, ``sbp``,
            ``msbp``.
        seed: Seed of weights initialisation, mask sampling and data order.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: Autocast dtype: ``none`` or ``bf16``.
        channels_last: Carry activations in channels_last memory format (the default: convolutions run faster in
            it on CPU and GPU; on this project's CPU an MSBP ResNet-32 step took 1.44 s instead of 1.90 s).
        log_every: Steps between log lines.
        eval_every: Epochs between evaluations (0: only at the end).
        save_every: Epochs between checkpoints (0: only at the end).
        out: Run directory, or none to not write anything.
        model: The network.
        data: The data.
        sparsity: VR-PGE settings (method ``vrpge``).
        sbp: Sparse-backward settings (methods ``meprop``, ``sbp``, ``msbp``).
        optim: Weight optimizer and schedule.
        finetune: Finetune phase after the subnetwork is fixed (method ``vrpge``).
        sync_bn: Under DDP, normalise with batch statistics all-reduced over the ranks (SyncBatchNorm semantics);
            false: each rank normalises its own share, as plain DDP does.
    """

    method: Method = "vrpge"
    seed: int = 0
    device: str = "auto"
    amp: Amp = "none"
    channels_last: bool = True
    log_every: int = 50
    eval_every: int = 1
    save_every: int = 1
    out: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    sbp: SbpConfig = field(default_factory=SbpConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sync_bn: bool = False

    def _check_ranges(self) -> None:
        self._require("seed", self.seed >= 0, "an integer >= 0")
        if _DEVICE_PATTERN.fullmatch(self.device) is None:
            raise ValueError(f"device={self.device!r} is not a device; "
                             "expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        self._require("log_every", self.log_every >= 1, "an integer >= 1")
        self._require("eval_every", self.eval_every >= 0, "an integer >= 0 (0: only at the end)")
        self._require("save_every", self.save_every >= 0, "an integer >= 0 (0: only at the end)")
        self.optim.resolve(self.method)
        if self.method == "meprop" and self.sbp.sparsifier == "randomk":
            raise ValueError("sbp.sparsifier='randomk' does not fit method='meprop' (top-k by magnitude); expected "
                             "'topk' or 'topk_unified', or method='sbp' for random-k")
        if self.method == "msbp" and self.sbp.memory == 0.0:
            raise ValueError("sbp.memory=0.0 gives no memory; expected a memory ratio in (0, 1) for method='msbp', "
                             "or method='sbp'")


# ---------------------------------------------------------------------------------------------------------------------
# Type checking


_TYPE_CACHE: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved types of the dataclass fields of ``cls`` (annotations are strings in this module)."""
    if cls not in _TYPE_CACHE:
        hints = typing.get_type_hints(cls)
        _TYPE_CACHE[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return _TYPE_CACHE[cls]


def _describe(tp: Any) -> str:
    """What a field type expects, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of its keys"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _WrongType(ValueError):
    """A config value of the wrong type (as opposed to a value of the right type out of range)."""


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless, or raise a one-line ``ValueError``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ValueError:
        return _WrongType(f"{key}={value!r} has the wrong type; expected {_describe(tp)}")

    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{key}={value!r} is not a valid choice; expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ValueError as err:
                errors.append(err)
        # A value of a fitting type but a bad value (not finite, not a valid choice) says so; otherwise list the types.
        raise next((err for err in errors if not isinstance(err, _WrongType)), bad())
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise bad()
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _FLOAT_PATTERN.fullmatch(value.strip()):
            number = float(value)
            if number.is_integer():
                return int(number)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FLOAT_PATTERN.fullmatch(value.strip()):
            number = float(value)
        else:
            raise bad()
        if not math.isfinite(number):
            raise ValueError(f"{key}={value!r} is not finite; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug in this module, not in the input


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config class, sections and leaves."""
    keys = []
    for name, tp in _field_types(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _unknown_key_error(key: str, level_names: Sequence[str], prefix: str) -> ValueError:
    """One-line error for an unknown dotted key, suggesting the closest valid key."""
    dotted = f"{prefix}{key}"
    close = difflib.get_close_matches(str(key), level_names, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}{close[0]}"
    else:
        # A key at the wrong level (``lr`` for ``optim.lr``): match it against the last part of the other leaf keys.
        others = [k for k in _all_keys(Config) if "." in k and not (prefix and k.startswith(prefix))]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(others)}
        leaf = difflib.get_close_matches(str(key), list(by_leaf), n=1, cutoff=0.6)
        suggestion = by_leaf[leaf[0]] if leaf else None
    if suggestion is not None:
        return ValueError(f"unknown config key '{dotted}'; did you mean '{suggestion}'?")
    where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
    return ValueError(f"unknown config key '{dotted}'; valid keys {where}: {', '.join(level_names)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Construct config dataclass ``cls`` from a nested mapping, rejecting unknown keys at every level."""
    field_types = _field_types(cls)
    names = list(field_types)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(key, names, prefix)
        tp = field_types[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                value = config_to_dict(value)
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ValueError(f"{prefix}{key}={value!r} has the wrong type; expected a mapping of its keys "
                                 f"(e.g. {prefix}{key}.{dataclasses.fields(tp)[0].name}=...)")
            value = _build(tp, value, f"{prefix}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def _override_type(path: list[str]) -> Any:
    """Field type addressed by a dotted path, ``Any`` below a free-form mapping, ``None`` if the path is unknown."""
    cls: Any = Config
    for i, part in enumerate(path):
        if not dataclasses.is_dataclass(cls):
            return Any  # inside a free-form mapping such as model.kwargs
        types = _field_types(cls)
        if part not in types:
            return None
        cls = types[part]
        if i < len(path) - 1 and (typing.get_origin(cls) is dict or cls is dict):
            return Any
    return cls


def _wants_raw_string(tp: Any) -> bool:
    """Whether a field takes strings only, so that an override value is kept verbatim (``out=2024``, ``amp=off``)."""
    if tp is str:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _wants_raw_string(rest[0])
    return False


def _parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its path and its value (parsed as yaml, or kept as a string for string fields)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. optim.lr=0.05")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    path = dotted.split(".")
    if not dotted or any(not part for part in path):
        raise ValueError(f"override {text!r} has an empty key; expected dotted keys such as data.root=/path")
    tp = _override_type(path)
    if tp is not None and _wants_raw_string(tp) and raw.strip() not in _NULL_WORDS:
        return path, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"override {text!r}: value is not valid yaml ({problem})") from None
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    """Set ``tree[path] = value``, creating mappings on the way and merging a mapping into a mapping."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {text!r}: '{'.'.join(path[:i + 1])}' is {child!r}, not a mapping")
        node = child
    last = path[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _merge(node[last], value)
    else:
        node[last] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"config file {str(path)!r} is not valid yaml{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys at the top; got {type(data).__name__}")
    return data


def load_config(path_or_dict: str | os.PathLike | Mapping[str, Any] | Config | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Resolve a run configuration: yaml (or a mapping) over the defaults, then dotted overrides.

    Args:
        path_or_dict: A yaml file, a nested mapping, an existing ``Config``, or none for the defaults.
        overrides: ``key=value`` strings with dotted keys, e.g. ``data.root=/x``, ``optim.lr=0.05``,
            ``model.kwargs.width=2``; values are parsed as yaml (numbers, booleans, lists, ``null``), except for
            string fields, which take the text as written.

    Returns:
        The validated configuration.

    Raises:
        FileNotFoundError: The yaml file does not exist.
        ValueError: An unknown key (with the closest valid key), a value of the wrong type or out of range, or a
            malformed override.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    if path_or_dict is None:
        tree: dict[str, Any] = {}
    elif isinstance(path_or_dict, Config):
        tree = config_to_dict(path_or_dict)
    elif isinstance(path_or_dict, Mapping):
        tree = _plain(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        tree = _read_yaml(Path(path_or_dict))
    else:
        raise TypeError(f"load_config takes a yaml path, a mapping or a Config; got {type(path_or_dict).__name__}")
    for text in overrides:
        path, value = _parse_override(text)
        _set_path(tree, path, value, text)
    return _build(Config, tree)


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of nested mappings as plain dicts (config sections given as dataclasses become dicts)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, _Section):
            value = config_to_dict(value)
        out[key] = _plain(value) if isinstance(value, Mapping) else copy.deepcopy(value)
    return out


def config_to_dict(cfg: Config | _Section) -> dict[str, Any]:
    """The configuration as nested plain dicts (a deep copy), ready for yaml or a checkpoint."""
    return dataclasses.asdict(cfg)  # type: ignore[call-overload]


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as yaml, atomically (a temp file in the same directory, then a rename).

    Args:
        cfg: The configuration to write.
        path: Destination file; its directory is created if needed.
    """
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
