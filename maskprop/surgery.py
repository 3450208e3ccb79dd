"""Surgery: cutting a maskprop model down to the channels a mask keeps.

One set of rules says which entries of every tensor a subnetwork keeps (:func:`index_sets`): a conv or linear weight
keeps its output group's channels along dim 0 and its input group's along dim 1, its bias the output group's; a
BatchNorm the group's entries of every per-channel tensor, a LayerNorm (RMSNorm, GroupNorm) those of its weight and
bias; an attention module's biases of its heads' features (BEiT's ``q_bias`` and ``v_bias``) the kept features of
every head; everything else (``num_batches_tracked`` included) stays whole. :func:`materialize` slices by those sets
to build the physically narrow model (the export, and the model the finetune phase trains); :func:`gather` and
:func:`scatter_` move tensors of the same shapes between the full and the narrow model (weights, BatchNorm statistics,
optimizer state) by the same sets.

Because maskprop masks after BatchNorm, a dropped channel is exactly zero in the full model and removing it changes
nothing (a LayerNorm, RMSNorm or GroupNorm of a group takes its statistics over the kept channels alone: the narrow
model's LayerNorm, RMSNorm or GroupNorm of the kept width computes them so): no bias folding is needed, and the narrow
model computes what the full model computes under ``use_mask(model, mask)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .sbp.layers import SparseBackwardMixin
from .sparse import (
    BatchNormAct2d,
    SparseBatchNorm2d,
    SparseBatchNormAct2d,
    SparseChannelNorm,
    SparseConv2d,
    SparseGroupNormAct,
    SparseLinear,
    channel_groups,
    check_mask,
)
from .sparse.attention import SparseAttention
from .sparse.groups import concatenated_masks, concatenations, drop_concatenations

__all__ = ["IndexSets", "gather", "index_sets", "materialize", "scatter_"]

IndexSets = tuple[Tensor | None, Tensor | None]
"""Kept indices of a tensor along dim 0 and dim 1; ``None`` keeps that dimension whole."""


def _kept(mask: Mapping[str, Tensor] | None, group: str | None, device: torch.device) -> Tensor | None:
    """Sorted kept indices of ``group`` on ``device``; ``None`` for no mask, no group or a group kept whole."""
    if mask is None or group is None or bool(mask[group].all()):
        return None
    return mask[group].nonzero().view(-1).to(device)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (SparseConv2d, SparseBackwardMixin)) and isinstance(module, nn.Conv2d)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (SparseLinear, SparseBackwardMixin)) and isinstance(module, nn.Linear)


def _with_concatenations(model: nn.Module, mask: Mapping[str, Tensor] | None) -> Mapping[str, Tensor] | None:
    """``mask`` and the masks of the model's concatenated groups (the layers reading them keep their parts' kept
    channels, side by side)."""
    concatenated = concatenations(model)
    return concatenated_masks(mask, concatenated) if mask is not None and concatenated else mask


def _layer_sets(module: nn.Module, mask: Mapping[str, Tensor] | None) -> dict[str, IndexSets] | None:
    """The index sets of a maskprop layer's own tensors by name; ``None`` for any other module."""
    tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    device = next((t.device for t in tensors.values() if t is not None), torch.device("cpu"))
    if _is_conv(module) or _is_linear(module):
        rows = _kept(mask, getattr(module, "out_group", None), device)
        columns = _kept(mask, getattr(module, "weight_in_group", getattr(module, "in_group", None)), device)
        positions = getattr(module, "in_positions", 1)
        if columns is not None and positions > 1:  # a flattened feature map: every position of each kept channel
            columns = (columns.unsqueeze(1) * positions + torch.arange(positions, device=device)).flatten()
        return {"weight": (rows, columns), "bias": (rows, None)}
    if isinstance(module, SparseBatchNorm2d):
        rows = _kept(mask, getattr(module, "group", None), device)
        return {name: (rows if tensor is not None and tensor.dim() == 1 else None, None)
                for name, tensor in tensors.items()}
    if isinstance(module, SparseChannelNorm):  # its weight and bias (either may be None): the kept channels' entries
        rows = _kept(mask, module.group, device)
        return {"weight": (rows, None), "bias": (rows, None)}
    return None


def _attention_sets(module: nn.Module, mask: Mapping[str, Tensor] | None) -> dict[str, IndexSets] | None:
    """The index sets of an attention module's own tensors indexed by its heads' features (``q_bias``, ``v_bias``:
    :attr:`~maskprop.sparse.SparseAttention.head_feature_tensors`), the kept features of every head; ``None`` for any
    other module."""
    names = getattr(module, "head_feature_tensors", ()) if isinstance(module, SparseAttention) else ()
    tensors = [getattr(module, name) for name in names if getattr(module, name) is not None]
    if not tensors:
        return None
    kept = _kept(mask, module.group, tensors[0].device)
    rows = None if kept is None else (
        torch.arange(module.num_heads, device=kept.device)[:, None] * module.head_dim + kept).flatten()
    return {name: (rows, None) for name in names}


def index_sets(model: nn.Module, mask: Mapping[str, Tensor] | None) -> dict[str, IndexSets]:
    """``{tensor name: (rows, columns)}`` of every parameter and buffer of ``model`` (names as in its state dict)."""
    sets: dict[str, IndexSets] = {}
    mask = _with_concatenations(model, mask)
    for prefix, module in model.named_modules():
        layer = _layer_sets(module, mask) or _attention_sets(module, mask) or {}
        tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for name, tensor in tensors.items():
            if tensor is not None:
                sets[f"{prefix}.{name}" if prefix else name] = layer.get(name, (None, None))
    return sets


def gather(full: Tensor, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    """The kept entries of ``full`` as a new tensor (detached; a copy even where nothing is dropped)."""
    part = full.detach()
    if rows is not None:
        part = part.index_select(0, rows)
    if columns is not None:
        part = part.index_select(1, columns)
    return part.clone() if rows is None and columns is None else part


def scatter_(full: Tensor, part: Tensor, rows: Tensor | None, columns: Tensor | None) -> None:
    """Write ``part`` into the kept entries of ``full`` (in place; exact, the indices are unique)."""
    if rows is not None and columns is not None:
        full[rows.unsqueeze(1), columns] = part
    elif rows is not None:
        full.index_copy_(0, rows, part)
    elif columns is not None:
        full.index_copy_(1, columns, part)
    else:
        full.copy_(part)


def _parameter(value: Tensor | None, like: Tensor | None) -> nn.Parameter | None:
    return None if value is None else nn.Parameter(value.contiguous(), requires_grad=like.requires_grad)


def _tensor(module: nn.Module, name: str, sets: Mapping[str, IndexSets]) -> Tensor | None:
    tensor = getattr(module, name, None)
    return None if tensor is None else gather(tensor, *sets[name])


_WITH_ACTIVATION = {nn.BatchNorm2d: BatchNormAct2d, SparseBatchNorm2d: SparseBatchNormAct2d}
"""The narrow layer of a :class:`~maskprop.sparse.SparseBatchNormAct2d`, by ``norm_type``."""


def _narrow_layer(module: nn.Module, sets: Mapping[str, IndexSets], conv_type: type[nn.Conv2d],
                  norm_type: type[nn.BatchNorm2d]) -> nn.Module:
    """The plain torch layer of the kept size that replaces a maskprop layer."""
    if isinstance(module, SparseChannelNorm):  # normalising the kept channels alone, as the subnetwork does
        rows = sets["weight"][0]
        new = module.narrow_layer(module.num_features if rows is None else rows.numel())
        for name in ("weight", "bias"):  # those the plain layer has (an nn.RMSNorm has no bias)
            if name in new._parameters:
                setattr(new, name, _parameter(_tensor(module, name, sets), getattr(module, name)))
        if isinstance(module, SparseGroupNormAct):  # its activation (and dropout) come along
            new.drop, new.act = copy.deepcopy(module.drop), copy.deepcopy(module.act)
    elif isinstance(module, SparseBatchNorm2d):
        running_mean = _tensor(module, "running_mean", sets)
        weight = _tensor(module, "weight", sets)
        kept = (weight if weight is not None else running_mean)
        if isinstance(module, SparseBatchNormAct2d):  # its activation (and dropout) come along
            if norm_type not in _WITH_ACTIVATION:
                raise ValueError(f"norm_type={norm_type.__name__} has no variant with an activation after it, which "
                                 f"{type(module).__name__} needs; expected one of "
                                 f"{[t.__name__ for t in _WITH_ACTIVATION]}")
            norm_type = _WITH_ACTIVATION[norm_type]
        new = norm_type(module.num_features if kept is None else kept.shape[0], eps=module.eps,
                        momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats, device="meta")
        if isinstance(module, SparseBatchNormAct2d):
            new.drop, new.act = copy.deepcopy(module.drop), copy.deepcopy(module.act)
        if module.affine:
            new.weight = _parameter(weight, module.weight)
            new.bias = _parameter(_tensor(module, "bias", sets), module.bias)
        # Buffers are assigned as they are (None when the layer tracks no statistics).
        new.running_mean, new.running_var = running_mean, _tensor(module, "running_var", sets)
        new.num_batches_tracked = _tensor(module, "num_batches_tracked", sets)
    else:
        weight, bias = _tensor(module, "weight", sets), _tensor(module, "bias", sets)
        if isinstance(module, nn.Conv2d):
            padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            groups = weight.shape[0] if getattr(module, "depthwise", False) else module.groups
            new = conv_type(weight.shape[1] * groups, weight.shape[0], tuple(module.kernel_size),
                            stride=tuple(module.stride), padding=padding, dilation=tuple(module.dilation),
                            groups=groups, bias=bias is not None, padding_mode=module.padding_mode,
                            device="meta")
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        new.weight, new.bias = _parameter(weight, module.weight), _parameter(bias, module.bias)
    return new.train(module.training)


def materialize(model: nn.Module, mask: Mapping[str, Tensor] | None = None, *,
                conv_type: type[nn.Conv2d] = nn.Conv2d, norm_type: type[nn.BatchNorm2d] = nn.BatchNorm2d
                ) -> nn.Module:
    """A physically narrow copy of ``model`` that computes what ``model`` computes under ``use_mask(model, mask)``.

    Every maskprop layer is replaced by the plain torch layer of its kept size (conv and linear weights sliced on both
    sides, biases, BatchNorm affine parameters and running statistics, LayerNorm weights and biases: an
    ``nn.LayerNorm`` of the kept width, RMSNorm weights: an ``nn.RMSNorm`` of the kept width, GroupNorm weights and
    biases: an ``nn.GroupNorm`` of as many groups on the kept channels, by :func:`index_sets`),
    an attention module's
    biases of its heads' features are sliced to the kept features of every head; sparse-backward layers
    become plain layers of the same size. Every other module, attribute and the forward code are deep-copied
    unchanged, so the result has the same module tree and parameter names, on the same device and dtype, in the same
    train/eval mode. ``model`` is not modified, and the copy shares no tensor with it. Hooks registered on replaced
    layers are not carried over.

    Plain ``nn.Conv2d`` lacks the route around a oneDNN crash that :class:`~maskprop.sparse.SparseConv2d` takes (the
    CPU weight gradient of a strided 1x1 conv with a batch the thread count does not divide,
    ``maskprop._workarounds``): to train the narrow model on the CPU with such batches, pass
    ``conv_type=maskprop.train.narrow.PointwiseSafeConv2d`` (the trainer's finetune phase does). Inference is
    unaffected.

    Args:
        model: A maskprop model (its layers are ``maskprop.sparse`` or ``maskprop.sbp`` layers).
        mask: Group name -> bool tensor, as for :func:`maskprop.use_mask`; ``None`` keeps every channel (the whole
            model as plain torch layers: the export of a dense or sparse-backward run).
        conv_type: The ``nn.Conv2d`` class (or a subclass with the same constructor) the convolutions become.
        norm_type: The ``nn.BatchNorm2d`` class (or a subclass with the same constructor) the BatchNorm layers become
            (the trainer's finetune under torchrun with ``sync_bn`` passes :class:`~maskprop.sparse.SparseBatchNorm2d`,
            whose statistics :mod:`maskprop.sparse.sync_batchnorm` synchronises over the ranks, also on the CPU).

    Returns:
        The narrow model.

    Raises:
        ValueError: ``mask`` is not a valid mask for ``model`` (see :func:`maskprop.check_mask`), or it drops channels
            of a model whose convolutions were converted to sparse-backward layers (they train the whole network).
    """
    if mask is not None and any(isinstance(m, SparseBackwardMixin) for m in model.modules()):
        tensors = [m for m in mask.values() if isinstance(m, Tensor)]
        if not all(bool(m.all()) for m in tensors):
            raise ValueError("cannot drop channels of a model with sparse-backward layers (they train the whole "
                             "network and carry no channel groups); expected mask=None")
        if len(tensors) == len(mask):  # a mask that keeps every channel: the whole model
            mask = None
    if mask is not None:
        check_mask(mask, channel_groups(model))
        mask = _with_concatenations(model, {g: m.detach().cpu() for g, m in mask.items()})
    memo: dict[int, Any] = {}
    for module in model.modules():
        sets = _layer_sets(module, mask)
        if sets is not None:
            memo[id(module)] = _narrow_layer(module, sets, conv_type, norm_type)
        for name, (rows, _) in (_attention_sets(module, mask) or {}).items():  # its biases of the kept features
            tensor = getattr(module, name)
            if tensor is not None:
                memo[id(tensor)] = _parameter(gather(tensor, rows, None), tensor)
    if id(model) in memo:  # a bare layer
        return memo[id(model)]
    narrow = copy.deepcopy(model, memo)
    drop_concatenations(narrow)  # its layers name no group
    for module in narrow.modules():
        if isinstance(module, SparseAttention):  # it runs at the narrow head width (head_width), at the full
            module.group = None  # width's head_dim and scale
    return narrow
