"""Run configuration: the schema as pydantic models, loaded from yaml with dotted command-line overrides.

A configuration flows yaml -> defaults -> command line (``load_config``) and the resolved result is saved next to the
run (``save_config``). Every section checks its fields when it is built and when one is assigned, so a ``Config``
that exists is a valid one (``validate()`` re-checks one edited in place, e.g. an entry of ``model.kwargs``). Errors
are one line naming the dotted key, the value and what is expected; an unknown key gets the closest valid one.

Types are strict: an integer field takes integers, a switch ``true`` or ``false``, a text field text, and a number
field numbers, or text in exponent form (``5e-4``, ``1.5E+3``: what YAML 1.2 reads as a number and YAML 1.1, e.g.
``yaml.safe_load``, leaves as text), so a recipe loads the same from any yaml reader; other text (``'0.5'``,
``'5e-4x'``) is refused. maskprop reads yaml with YAML 1.2's numbers itself. Bounds are pydantic ``Field``
constraints, and pydantic's first problem (an unknown key before any other) is put in one line by ``_one_line``.

The defaults are the CIFAR recipe of the VR-PGE paper (docs/methods.md, section 1; the paper's supplement B): batch
256, SGD lr 0.1, momentum 0.9, weight decay 5e-4 with a cosine schedule for the weights, Adam lr 12e-3 for the
scores, and a 40-epoch finetune at SGD lr 1e-3 after the subnetwork is fixed. The default dataset is the built-in
``shapes`` one so that a run needs no files; recipes name the real dataset and its ``root``.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from .._files import atomic_write
from ..models._registry import check_module_name

__all__ = [
    "IN_MEMORY_DATASETS",
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
Decode = Literal["cpu", "device"]
Estimator = Literal["vrpge", "vrpge_sym"]
WeightGrad = Literal["first", "both"]
FixRule = Literal["best_of_n", "top_scores", "random"]
BudgetSchedule = Literal["cubic", "linear"]
BudgetUnit = Literal["channels", "flops"]
Schedule = Literal["cosine", "step", "constant"]
Amp = Literal["none", "bf16"]
OptimizerName = Literal["sgd", "adam"]
Sparsifier = Literal["topk", "topk_unified", "randomk"]
Budget = Literal["layer", "balanced"]
BudgetScale = Literal["none", "variance", "rms"]
SPARSE_BACKWARD_METHODS = ("meprop", "sbp", "msbp")
IN_MEMORY_DATASETS = ("shapes", "mnist", "fashion_mnist", "cifar10", "cifar100")
"""The datasets held in memory as whole tensors, which ``data.on_device`` can put on the training device."""

# What YAML 1.2 reads as a number and YAML 1.1 as text: a number with an exponent and no dot needed (``12e-3``).
_EXPONENT_NUMBER = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")


def _exponent_text_to_float(value: Any) -> Any:
    """``'5e-4'`` -> ``5e-4``, so that a recipe read by a YAML 1.1 reader loads; anything else goes on unchanged."""
    return float(value) if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value) else value


# Every float field is a Number: strict, except for the exponent text above.
Number = Annotated[float, BeforeValidator(_exponent_text_to_float)]


class _Section(BaseModel):
    """Base of the config sections: strict types, no unknown keys, checks on assignment, one-line errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise _one_line(error, type(self)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        before = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            if name in self.__dict__:  # a check across fields failed after the value was set: undo it
                self.__dict__[name] = before
            raise _one_line(error, type(self)) from None

    def validate(self) -> None:  # type: ignore[override]  # replaces pydantic v1's deprecated classmethod
        """Re-run every check, for a configuration edited in place (e.g. an entry of ``model.kwargs``)."""
        for name in type(self).model_fields:
            section = getattr(self, name)
            if isinstance(section, _Section):
                section.validate()
        type(self)(**dict(self))  # takes the sections as they are: their checks across sections run on them

    def _key(self, name: str) -> str:
        prefix = _SECTION_NAMES.get(type(self))
        return f"{prefix}.{name}" if prefix else name


class ModelConfig(_Section):
    """Which network to build.

    Attributes:
        name: Name in the model registry (``maskprop.models``), e.g. ``resnet20``, ``resnet32``, ``vgg19_bn``; or
            ``timm:NAME`` / ``torchvision:NAME``, that library's model made prunable by :func:`maskprop.make_prunable`
            (checked like a network of your own).
        kwargs: Keyword arguments for the model factory, e.g. ``{width: 2}`` (timm's ``create_model`` or torchvision's
            ``get_model`` for those names); ``num_classes`` comes from the data.
        weights: Initial weights: a state-dict file (``.safetensors``, or a ``torch.save`` file such as ``.pth``,
            read with ``weights_only=True``; a dict holding it under ``model`` or ``state_dict``, and keys prefixed
            ``module.`` by DDP, are read too), loaded before the first step. torchvision's and timm's ResNet weights
            fit the ImageNet ResNets as they are. A classifier of another shape (another number of classes) keeps its
            initialisation, and the log and the summary say so. A resumed run takes its weights from its checkpoint.
        module: A Python module (``my_nets`` for ``./my_nets.py``, or an installed ``lab.models``) imported before the
            model is built, whose ``@maskprop.register_model`` functions become model names: a network of your own.
            The run checks the model once (:func:`maskprop.check_model`, as for any model registered outside maskprop)
            and records the module, so that ``--resume`` and ``maskprop export`` import it again.
        check: Run that check (13 s for a ResNet-50 at 224x224 on two CPU threads, on every rank). False skips it,
            for a network whose forward draws at random in ways the check cannot align between its passes.
    """

    name: Annotated[str, Field(min_length=1)] = "resnet20"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Annotated[str, Field(min_length=1)] | None = None
    module: str | None = None
    check: bool = True

    @field_validator("module")
    @classmethod
    def _module_name(cls, value: str | None) -> str | None:
        return None if value is None else check_module_name(value)


def _auto_switch(value: Any, key: str) -> Any:
    """A setting of ``auto``, ``true`` or ``false`` as given, else one line naming ``key``."""
    if value is True or value is False or value == "auto":  # `is`: 1 and 0 are no switch (they equal the bools)
        return value
    raise ValueError(f"{key}={value!r} is not a valid choice; expected 'auto', true or false")


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
        on_device: Hold the training and validation images of an in-memory dataset (``shapes``, ``mnist``,
            ``fashion_mnist``, ``cifar10``, ``cifar100``) on the training device as one uint8 tensor each, and make
            every batch there: the batch's examples indexed, then cropped, flipped and normalised as a whole
            (``maskprop.train.device_data``). The batches are the same examples in the same order as the DataLoader's
            (and ``workers`` is unused); only the augmentation draws differ, which come from a generator on the device
            seeded from ``seed`` and saved in the checkpoint. ``true`` (an error for ``imagenet``, for datasets given
            to ``fit``, and for images that would take more than half of the device's free memory), ``false`` (torch's
            DataLoader with per-example transforms), ``auto`` (on for a CUDA device where the data fits, else off; a
            log line says why it is off on CUDA).
        decode: Where ``imagenet``'s images are decoded and augmented: ``cpu`` (PIL in the DataLoader's workers, under
            timm's transforms), or ``device`` (the workers read each file's bytes and its size and draw its crop, flip
            and colour jitter as timm's transforms do; each batch is then decoded on the run's device by one
            ``torchvision.io.decode_jpeg`` call, nvjpeg on a GPU, and cropped, resized, flipped, jittered and normalised
            there: ``maskprop.train.decode``). The same distributions as timm's, not PIL's pixels. ``device`` is for
            ``imagenet`` only.
    """

    dataset: DatasetName = "shapes"
    root: str | None = None
    batch_size: Annotated[int, Field(ge=1)] = 256
    workers: Annotated[int, Field(ge=0)] = 2
    augment: bool = True
    train_size: Annotated[int, Field(ge=1)] = 10000
    val_size: Annotated[int, Field(ge=1)] = 2000
    seed: Annotated[int, Field(ge=0)] = 0
    crop_size: Annotated[int, Field(ge=8)] = 224
    image_size: Annotated[int, Field(ge=8)] = 32
    on_device: Literal["auto", True, False] = "auto"
    decode: Decode = "cpu"

    @field_validator("on_device", mode="before")
    @classmethod
    def _on_device_switch(cls, value: Any) -> Any:
        return _auto_switch(value, "data.on_device")

    @model_validator(mode="after")
    def _check_on_device(self) -> DataConfig:
        if self.on_device is True and self.dataset not in IN_MEMORY_DATASETS:
            raise ValueError(f"data.on_device=true needs an in-memory dataset; got {self.dataset!r} (expected one of "
                             f"{', '.join(IN_MEMORY_DATASETS)}, or data.on_device=auto or false)")
        if self.decode == "device" and self.dataset != "imagenet":
            raise ValueError(f"data.decode='device' decodes image files on the device; got data.dataset="
                             f"{self.dataset!r} (expected data.dataset='imagenet', or data.decode='cpu')")
        return self


class SparsityConfig(_Section):
    """VR-PGE channel sampling (docs/methods.md, section 1).

    Attributes:
        keep_ratio: Budget K as a fraction of all prunable channels: sum of scores <= keep_ratio x channels.
        estimator: ``vrpge`` (supplement eq. (12), default) or ``vrpge_sym`` (the official code's symmetric form).
        alpha: Exponent of H^alpha(s); the variance is bounded for alpha in [1/2, 1) (supplement A.2).
        weight_grad: ``first`` back-propagates the first mask only (paper cost); ``both`` averages the weight
            gradients of both masks (official code).
        init: Constant the scores start at, projected onto the budget of the first step; null: 1 with an anneal
            (the anneal starts from every channel), else 0.5 (the official code).
        score_lr: Adam learning rate of the scores (supplement B: the only grid-searched hyperparameter).
        prune_residual: Prune the channels of residual streams (one shared group per stream) or keep them whole.
        warmup_epochs: Dense epochs at the start of the search (every channel kept, the scores untouched), counted
            inside ``optim.epochs``.
        anneal_epochs: Epochs after the warm-up over which the budget falls from all channels to ``keep_ratio`` along
            ``budget_schedule``; 0: the budget is ``keep_ratio`` from the first step (the paper).
        budget_schedule: Shape of the anneal: ``cubic`` (fast at first, slow near the end, as gradual pruning does)
            or ``linear``.
        budget_unit: What the budget counts: ``channels`` (``sum s <= keep_ratio x channels``, the paper) or
            ``flops``: each channel priced at the forward FLOPs one more of its group's channels adds when every
            group keeps ``keep_ratio`` (``CostModel.channel_prices``), so that a residual stream's channel, which
            every block of its stage reads and writes, costs what it computes. At equal probabilities both budgets
            are the same. Measured worse than ``channels`` and than the random subnetwork on ResNet-32 and VGG-19
            (docs/methods.md, "A budget in FLOPs"): not a default.
        fix: How the final subnetwork is chosen: ``best_of_n`` samples ``fix_samples`` masks and keeps the one with
            the best training accuracy (official), ``top_scores`` keeps the largest scores up to the budget; ``random``
            is the baseline of a random subnetwork of the same budget: fixed before the first step (the warm-up draws no
            mask: the same subnetwork as one drawn after it; each group keeps ``max(1, round(keep_ratio x channels))``
            channels drawn uniformly) and trained for the rest of the search and the finetune epochs, no search at all
            (an anneal has nothing to anneal and is ignored, so a recipe's search and its random baseline differ in this
            key alone).
        fix_samples: Masks sampled by ``best_of_n``.
        fix_examples: Training examples (the first ones, in eval mode) ``best_of_n`` scores each mask on; null: the
            whole training set, as the official code.
        align: Pad each group's kept set up to a multiple of ``align`` channels with dropped channels whose output is
            forced to zero (exact; GPU tensor cores and cuDNN's plan cache want aligned widths); null: 8 on CUDA,
            1 (no padding) on the CPU.
        capacity_quantile: With static shapes (``cuda_graphs`` on): each group's fixed width is this quantile of its
            kept count under the keep probabilities, rounded up to ``align``; a mask that keeps more is cut to it
            (counted in the summary), so about ``1 - capacity_quantile`` of the masks are cut per group. Lower is
            narrower and faster, and samples further from ``p(m|s)`` (docs/methods.md, "How a step runs on a GPU").
    """

    keep_ratio: Annotated[Number, Field(gt=0, le=1, json_schema_extra={"noun": "a fraction"})] = 0.5
    estimator: Estimator = "vrpge"
    alpha: Annotated[Number, Field(ge=0, lt=1)] = 0.5
    weight_grad: WeightGrad = "first"
    init: Annotated[Number | None, Field(gt=0, le=1, json_schema_extra={
        "noun": "a probability", "null": "1 with an anneal, else 0.5"})] = None
    score_lr: Annotated[Number, Field(gt=0)] = 12e-3
    prune_residual: bool = True
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    anneal_epochs: Annotated[int, Field(ge=0, json_schema_extra={"note": "0: no anneal"})] = 0
    budget_schedule: BudgetSchedule = "cubic"
    budget_unit: BudgetUnit = "channels"
    fix: FixRule = "best_of_n"
    fix_samples: Annotated[int, Field(ge=1)] = 10
    fix_examples: Annotated[int | None, Field(ge=1, json_schema_extra={"null": "the whole training set"})] = None
    align: Annotated[int | None, Field(ge=1, json_schema_extra={"null": "8 on CUDA, 1 on the CPU"})] = None
    capacity_quantile: Annotated[Number, Field(ge=0.5, lt=1)] = 0.999


class SbpConfig(_Section):
    """Sparse-backward baselines: meProp, SBP and MSBP (docs/methods.md, sections 4-6; ``maskprop.sbp``).

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
            re-balanced after every backward so that one threshold serves every layer; docs/methods.md, section 6).
        scale: How layer magnitudes are made comparable for ``balanced``: ``rms`` (each layer's own root mean square;
            the default: it trained best, docs/methods.md, section 6), ``variance`` (the variance ratios of eqs.
            (8)-(9) there) or ``none``.
        output_k: Units the output layer propagates, or null to leave it dense (meProp section 2.2.1).
        angle_every: Steps between measurements of the gradient estimation angle (MSBP paper Figure 5), logged to
            TensorBoard per layer and overall; each costs two extra backward passes. 0 never measures it.
    """

    ratio: Annotated[Number, Field(gt=0, le=1, json_schema_extra={"noun": "a fraction"})] = 0.04
    memory: Annotated[Number, Field(ge=0, lt=1)] = 0.8
    sparsifier: Sparsifier = "topk_unified"
    budget: Budget = "layer"
    scale: BudgetScale = "rms"
    output_k: Annotated[int | None, Field(ge=1, json_schema_extra={"null": "dense output layer"})] = None
    angle_every: Annotated[int, Field(ge=0, json_schema_extra={"note": "0: never"})] = 100


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

    optimizer: OptimizerName | None = None
    lr: Annotated[Number | None, Field(gt=0, json_schema_extra={"null": "the optimizer's default"})] = None
    momentum: Annotated[Number, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[Number | None,
                            Field(ge=0, json_schema_extra={"null": "the optimizer's default"})] = None
    nesterov: bool = False
    epochs: Annotated[int, Field(ge=1)] = 300
    schedule: Schedule = "cosine"
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    clip_grad_norm: Annotated[Number | None, Field(gt=0, json_schema_extra={"null": "no clipping"})] = None

    @model_validator(mode="after")
    def _check_together(self) -> OptimConfig:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"{self._key('warmup_epochs')}={self.warmup_epochs!r} is out of range; expected an "
                             f"integer in [0, {self._key('epochs')}={self.epochs}]")
        if self.nesterov and self.momentum == 0.0:
            raise ValueError(f"{self._key('nesterov')}=True needs {self._key('momentum')} > 0; "
                             f"got {self._key('momentum')}=0.0")
        return self

    def resolve(self, method: str) -> None:
        """Fill the null fields with the defaults of ``method`` (see the attributes); warn where a sparse-backward
        method gets Adam by default with a learning rate or weight decay the config set (a recipe's, tuned for SGD)."""
        if self.optimizer is None:
            self.optimizer = "adam" if method in SPARSE_BACKWARD_METHODS else "sgd"
            set_here = [f"{self._key(k)}={v!r}" for k, v in (("lr", self.lr), ("weight_decay", self.weight_decay))
                        if v is not None and (k == "lr" or v > 0)]
            if self.optimizer == "adam" and set_here:
                logging.getLogger(__name__).warning(
                    "method=%s trains with Adam (its papers' optimizer: optim.optimizer is unset) at %s from the "
                    "config, a setting for SGD perhaps; optim.lr=0.001 optim.weight_decay=0 are the papers' Adam, "
                    "optim.optimizer=sgd keeps SGD", method, " and ".join(set_here))
        if self.lr is None:
            self.lr = 1e-3 if self.optimizer == "adam" else 0.1
        if self.weight_decay is None:
            self.weight_decay = 0.0 if self.optimizer == "adam" else 5e-4


class FinetuneConfig(_Section):
    """Finetuning of the fixed subnetwork after the search (SGD, cosine schedule).

    Attributes:
        epochs: Finetune epochs (official: 40); 0 skips finetuning.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        narrow: Train the physically narrow subnetwork (``maskprop.train.narrow``: no gathers, the same updates of
            the kept weights; its widths padded to ``sparsity.align`` with channels that stay zero); false keeps
            compact steps of the full model (for comparison). Under torchrun too (its gradients averaged over the
            ranks).
    """

    epochs: Annotated[int, Field(ge=0, json_schema_extra={"note": "0 skips finetuning"})] = 40
    lr: Annotated[Number, Field(gt=0)] = 1e-3
    momentum: Annotated[Number, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[Number, Field(ge=0)] = 5e-4
    narrow: bool = True


class Config(_Section):
    """A whole run.

    Attributes:
        method: ``vrpge`` (learned channel masks), ``dense``, or a sparse-backward baseline ``meprop``, ``sbp``,
            ``msbp``.
        seed: Seed of weights initialisation, mask sampling and data order.
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        amp: Autocast dtype: ``none`` or ``bf16``.
        channels_last: Carry activations in channels_last memory format (the default: convolutions run faster in
            it on CPU and GPU).
        log_every: Steps between log lines.
        eval_every: Epochs between evaluations (0: only at the end).
        save_every: Epochs between checkpoints (0: only at the end).
        save_every_steps: Optimizer steps between checkpoints within an epoch as well (0: none; for long epochs,
            ImageNet's: a run stopped without warning loses at most that many steps). ``maskprop train --resume``
            continues such a checkpoint from its batch, exactly. A run also saves one within its epoch and stops
            when it receives SIGTERM or SIGUSR1 (``maskprop.train.stopping``).
        out: Run directory, or none to not write anything.
        model: The network.
        data: The data.
        sparsity: VR-PGE settings (method ``vrpge``).
        sbp: Sparse-backward settings (methods ``meprop``, ``sbp``, ``msbp``).
        optim: Weight optimizer and schedule.
        finetune: Finetune phase after the subnetwork is fixed (method ``vrpge``).
        sync_bn: Under DDP, normalise with batch statistics all-reduced over the ranks (SyncBatchNorm semantics);
            false: each rank normalises its own share, as plain DDP does.
        cuda_graphs: Run the training steps with static shapes, each step kind captured as one CUDA graph and replayed
            (``maskprop.train.graphs``): ``auto`` on a CUDA device when the run can be captured (else the static-shape
            steps uncaptured, or the eager steps for the sparse-backward methods, with one log line saying why),
            ``true`` (an error where it cannot), ``false`` (the eager steps).
    """

    method: Method = "vrpge"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
                                 description="'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")] = "auto"
    amp: Amp = "none"
    channels_last: bool = True
    log_every: Annotated[int, Field(ge=1)] = 50
    eval_every: Annotated[int, Field(ge=0, json_schema_extra={"note": "0: only at the end"})] = 1
    save_every: Annotated[int, Field(ge=0, json_schema_extra={"note": "0: only at the end"})] = 1
    save_every_steps: Annotated[int, Field(ge=0, json_schema_extra={"note": "0: at epoch ends only"})] = 0
    out: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    sbp: SbpConfig = Field(default_factory=SbpConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sync_bn: bool = False
    cuda_graphs: Literal["auto", True, False] = "auto"

    @field_validator("model", "data", "sparsity", "sbp", "optim", "finetune", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # a yaml section header with nothing under it: the defaults

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _graphs_switch(cls, value: Any) -> Any:
        return _auto_switch(value, "cuda_graphs")

    @model_validator(mode="after")
    def _check_together(self) -> Config:
        self.optim.resolve(self.method)
        if self.method == "meprop" and self.sbp.sparsifier == "randomk":
            raise ValueError("sbp.sparsifier='randomk' does not fit method='meprop' (top-k by magnitude); expected "
                             "'topk' or 'topk_unified', or method='sbp' for random-k")
        if self.method != "vrpge" and self.sparsity.fix == "random":
            raise ValueError(f"sparsity.fix='random' trains a random subnetwork of the VR-PGE budget, but "
                             f"method={self.method!r} samples no channel mask; expected method='vrpge'")
        sp, epochs = self.sparsity, self.optim.epochs
        if self.method == "vrpge" and sp.warmup_epochs + sp.anneal_epochs > epochs:
            raise ValueError(f"sparsity.warmup_epochs={sp.warmup_epochs} + sparsity.anneal_epochs={sp.anneal_epochs} "
                             f"is longer than the search; expected at most optim.epochs={epochs} in all")
        if self.method == "msbp" and self.sbp.memory == 0.0:
            raise ValueError("sbp.memory=0.0 gives no memory; expected a memory ratio in (0, 1) for method='msbp', "
                             "or method='sbp'")
        return self


# The dotted name of each section, so that a section built or assigned on its own names its keys in full.
_SECTION_NAMES: dict[type, str] = {field.annotation: name for name, field in Config.model_fields.items()
                                   if isinstance(field.annotation, type) and issubclass(field.annotation, _Section)}


# ---------------------------------------------------------------------------------------------------------------------
# Errors: the first problem of pydantic's ValidationError, in one line


def _field_type(path: Sequence[str]) -> Any:
    """Type of the field a dotted path names, ``Any`` below a free-form mapping, ``None`` if there is no such key."""
    tp: Any = Config
    for part in path:
        if not (isinstance(tp, type) and issubclass(tp, _Section)):
            return Any  # inside a free-form mapping such as model.kwargs
        field = tp.model_fields.get(part)
        if field is None:
            return None
        tp = field.annotation
    return tp


def _base(tp: Any) -> Any:
    """A field type without null and its annotations: ``Annotated[float, ...] | None`` -> ``float``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Annotated or (typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1):
        return _base(args[0])
    return tp


def _describe(tp: Any) -> str:
    """What a field type expects, in words."""
    base = _base(tp)
    if typing.get_origin(base) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(base))
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, "a mapping")
    return text + (" or null" if type(None) in typing.get_args(tp) else "")


_INTERVAL = {"ge": "[{}", "gt": "({}", "le": "{}]", "lt": "{})"}
_HALF_LINE = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "lt": "< {}"}


def _expected_range(field: FieldInfo) -> str:
    """The bounds of a field, e.g. ``a fraction in (0, 1]`` or ``an integer >= 1 or null (dense output layer)``."""
    bounds = sorted(((name, getattr(m, name)) for m in field.metadata for name in _INTERVAL
                     if getattr(m, name, None) is not None), key=lambda bound: bound[0] in ("le", "lt"))
    if len(bounds) == 2:
        text = "in " + ", ".join(_INTERVAL[name].format(bound) for name, bound in bounds)
    else:
        text = _HALF_LINE[bounds[0][0]].format(bounds[0][1])
    says: dict[str, Any] = field.json_schema_extra or {}  # type: ignore[assignment]  # a dict where it is set
    text = f"{says.get('noun') or _describe(_base(field.annotation))} {text}"
    if type(None) in typing.get_args(field.annotation):
        text += f" or null ({says['null']})" if "null" in says else " or null"
    return text + (f" ({says['note']})" if "note" in says else "")


def _one_line(error: ValidationError, model: type[_Section]) -> ValueError:
    """The first problem of ``error`` (an unknown key before any other) as a ``ValueError`` of one line."""
    problems = error.errors(include_url=False)
    first = next((p for p in problems if p["type"] == "extra_forbidden"), problems[0])
    kind, value, ctx = first["type"], first["input"], first.get("ctx", {})
    if kind == "value_error":  # a check across fields, worded in full where it is made
        return ValueError(str(ctx["error"]))
    path = [_SECTION_NAMES[model]] if model in _SECTION_NAMES else []
    path += [str(part) for part in first["loc"]]
    if kind == "extra_forbidden":
        return _unknown_key_error(path)
    if path[-1] == "[key]":
        return ValueError(f"{'.'.join(path[:-2])} key {value!r} has the wrong type; expected a string")
    key, field = ".".join(path), _field_type(path[:-1]).model_fields[path[-1]]
    tp, bounded = field.annotation, bool(ctx.keys() & _INTERVAL.keys())  # ctx names the bound broken, e.g. {"gt": 0}
    if _base(tp) is float and (bounded or kind == "finite_number"):
        value = float(value)  # it passed the type check: shown as the field holds it (0 as 0.0, '2e0' as 2.0)
    if bounded:
        problem = f"is out of range; expected {_expected_range(field)}"
    elif kind == "finite_number":
        problem = "is not finite; expected a finite number"
    elif kind == "literal_error":
        problem = f"is not a valid choice; expected {_describe(_base(tp))}"
    elif kind == "string_pattern_mismatch":
        problem = f"is not a valid choice; expected {field.description}"
    elif kind == "string_too_short":
        problem = f"is too short; expected at least {ctx['min_length']} character{'s' * (ctx['min_length'] > 1)}"
    elif isinstance(tp, type) and issubclass(tp, _Section):
        problem = f"has the wrong type; expected a mapping of its keys (e.g. {key}.{next(iter(tp.model_fields))}=...)"
    else:
        problem = f"has the wrong type; expected {_describe(tp)}"
    return ValueError(f"{key}={value!r} {problem}")


def _all_keys(section: type[_Section], prefix: str = "") -> list[str]:
    """Every dotted key of a config section, sections and leaves."""
    keys = []
    for name, field in section.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Section):
            keys.extend(_all_keys(field.annotation, f"{prefix}{name}."))
    return keys


def _unknown_key_error(path: list[str]) -> ValueError:
    """One-line error for an unknown dotted key, suggesting the closest valid key."""
    *parents, key = path
    prefix = "".join(f"{part}." for part in parents)
    names = list(_field_type(parents).model_fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}{close[0]}"
    else:
        # A key at the wrong level (``lr`` for ``optim.lr``): match it against the last part of the other leaf keys.
        others = [k for k in _all_keys(Config) if "." in k and not (prefix and k.startswith(prefix))]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(others)}
        leaf = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.6)
        suggestion = by_leaf[leaf[0]] if leaf else None
    if suggestion is not None:
        return ValueError(f"unknown config key '{prefix}{key}'; did you mean '{suggestion}'?")
    where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
    return ValueError(f"unknown config key '{prefix}{key}'; valid keys {where}: {', '.join(names)}")


# ---------------------------------------------------------------------------------------------------------------------
# Yaml and overrides


class _YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` reading YAML 1.2's exponent numbers (``12e-3``, ``1e3``; yaml 1.1 reads them as text), and
    refusing a key given twice in one mapping (PyYAML keeps the last silently: a second ``sparsity:`` section dropped
    every setting of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            plain = isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge"  # not `<<`
            key = self.construct_object(key_node, deep=True) if plain else None
            if key is not None and key in first:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (first at line {first[key].start_mark.line + 1}); expected "
                            f"each key once", problem_mark=key_node.start_mark)
            first.setdefault(key, key_node)
        return super().construct_mapping(node, deep=deep)


class _YamlDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` quoting the text that ``_YamlLoader`` would read as a number (``'1e3'``)."""


for _yaml_class in (_YamlLoader, _YamlDumper):
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_NUMBER, list("-+.0123456789"))

_NULL_WORDS = ("null", "Null", "NULL", "~", "")


def _wants_raw_string(tp: Any) -> bool:
    """Whether a field takes strings only, so that an override value is kept verbatim (``out=2024``, ``amp=off``)."""
    base = _base(tp)
    return base is str or typing.get_origin(base) is Literal and all(isinstance(a, str) for a in typing.get_args(base))


def _parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its path and its value (parsed as yaml, or kept as a string for string fields)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value, e.g. optim.lr=0.05")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    path = dotted.split(".")
    if not dotted or any(not part for part in path):
        raise ValueError(f"override {text!r} has an empty key; expected dotted keys such as data.root=/path")
    tp = _field_type(path)
    if tp is not None and _wants_raw_string(tp) and raw.strip() not in _NULL_WORDS:
        return path, raw
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else None
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
    if path.is_dir():  # exists, so "not found" would mislead
        raise ValueError(f"config file {str(path)!r} is a directory; expected a yaml file (e.g. "
                         f"recipes/quickstart.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"config file {str(path)!r} is not valid yaml{where}: {problem}") from None
    if data is None:  # an empty file (or comments only) is yaml's null: every default, which `{}` says on purpose
        defaults = Config()
        logging.getLogger(__name__).warning(
            "config file %r holds no settings: the run takes every default (method %s, model %s, dataset %s, %d "
            "epochs); write {} in it to mean that", str(path), defaults.method, defaults.model.name,
            defaults.data.dataset, defaults.optim.epochs)
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys at the top; got {type(data).__name__}")
    return data


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of nested mappings as plain dicts (config sections given as models become dicts)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, _Section):
            value = config_to_dict(value)
        out[key] = _plain(value) if isinstance(value, Mapping) else copy.deepcopy(value)
    return out


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
        ValueError: The yaml path is a directory, an unknown key (with the closest valid key), a value of the wrong
            type or out of range, or a malformed override.
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
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise _one_line(error, Config) from None


def dotted(settings: Mapping[str, Any], leaves: Sequence[str] = (), prefix: str = "") -> dict[str, Any]:
    """Nested settings (a config as dicts) as one flat dict of dotted keys (``optim.lr``); a mapping under a key named
    in ``leaves`` (``kwargs``: a model's keywords, compared whole) or an empty one stays one value."""
    out: dict[str, Any] = {}
    for name, value in settings.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value and name not in leaves:
            out.update(dotted(value, leaves, f"{key}."))
        else:
            out[key] = value
    return out


def changed_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys of two flat settings (:func:`dotted`) whose values differ, a key one of them lacks included; sorted."""
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k] != b[k])


def config_to_dict(cfg: Config | _Section) -> dict[str, Any]:
    """The configuration as nested plain dicts (a deep copy), ready for yaml or a checkpoint."""
    return copy.deepcopy(cfg.model_dump())


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as yaml, atomically (a temp file in the same directory, then a rename).

    Args:
        cfg: The configuration to write.
        path: Destination file; its directory is created if needed.
    """
    text = yaml.dump(config_to_dict(cfg), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
