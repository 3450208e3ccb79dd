"""Make a network written with plain torch layers channel-prunable: trace it, find its channel groups, swap in
maskprop's layers.

:func:`make_prunable` traces the model's forward with ``torch.fx`` (on a ``meta`` copy: nothing is computed), in
training and in eval mode, and follows every tensor whose dimension 1 is a channel dimension through each graph. A
convolution or linear layer starts a new channel space (its output channels); channel-wise operations (a crop of
each channel's map too) pass a space on; an add or multiply of two feature maps of the same width makes their spaces
one (a residual stream, or a gate); a depthwise convolution reads and writes one space; a convolution of ``g`` groups
(ResNeXt's, RegNet's) reads ``g`` copies of one space side by side, the features each of its groups reads (a group
named ``<conv>:in``), and writes ``g`` copies of another (``<conv>:out``): feature ``j`` of every group is pruned
together, so each group keeps as many as the others and a subnetwork runs one convolution of ``g`` groups; a GroupNorm
of ``G`` groups (torch's ``nn.GroupNorm``, timm's ``GroupNorm``, ``GroupNorm1`` and ``GroupNormAct``) reads and passes
on ``G`` copies of one space side by side, the features each of its groups normalises (``<norm>:features``), so a
subnetwork runs one GroupNorm of ``G`` groups on the kept channels, its statistics over them alone
(:class:`~maskprop.sparse.SparseGroupNorm`; one group: the space as it is; one channel per group: no feature to drop,
the space whole; two GroupNorms of other group counts on one space: whole); an in-place operation changes what later
reads of its tensor see.
A linear layer on a tensor of more than two dimensions (tokens, a channels-last map) writes a space held in the last
dimension, which elementwise operations and products with another such space pass on, a LayerNorm or RMSNorm over it
passes on (normalising a subnetwork's kept channels alone: :class:`~maskprop.sparse.SparseLayerNorm`,
:class:`~maskprop.sparse.SparseRMSNorm`) and a linear layer reads (the hidden units of a transformer's or ConvNeXt's
MLP, normalised or not); a ``chunk`` of it into equal parts makes it a concatenation of the parts, which must end as
one space (timm's ``GluMlp``: one half gates the other), else they stay whole; every other operation leaves it whole.
timm's plain multi-head self-attention (its ``q_norm``, ``k_norm`` and ``norm`` LayerNorm, RMSNorm or none) is traced
as one module: its heads' features are a space that ``qkv`` writes once per head slice and ``proj`` reads once per
head, and it becomes :class:`~maskprop.sparse.SparseAttention`, its norms those of the heads' features (the Swin
Transformer's window
attention: timm's ``WindowAttention``, :class:`~maskprop.sparse.SparseWindowAttention`; torchvision's
``ShiftedWindowAttention``, :class:`~maskprop.sparse.SparseShiftedWindowAttention`; torchvision's MaxViT attention,
``RelativePositionalMultiHeadAttention``, whose ``to_qkv`` and ``merge`` are read as ``qkv`` and ``proj``,
:class:`~maskprop.sparse.SparseRelativePositionalAttention`; timm's MaxViT and CoAtNet attention, ``AttentionCl`` on
channels-last tokens, :class:`~maskprop.sparse.SparseAttentionCl`, and ``Attention2d`` on maps, whose 1x1-conv
``qkv`` reads and ``proj`` writes channels in dimension 1, :class:`~maskprop.sparse.SparseAttention2d`, the
relative position module whole); so is attention whose query
and value biases live outside ``qkv`` (timm's BEiT attention, :class:`~maskprop.sparse.SparseBeitAttention`, and
Swin Transformer v2's cosine window attention: timm's ``WindowAttention``,
:class:`~maskprop.sparse.SparseWindowAttentionV2`; torchvision's ``ShiftedWindowAttentionV2``,
:class:`~maskprop.sparse.SparseShiftedWindowAttentionV2`), whose biases of the kept features a subnetwork adds. torch's
``nn.MultiheadAttention`` called on one tensor as query, key and value (torchvision's vision transformers) is traced
so too, its packed in-projection read as ``qkv`` and its ``out_proj`` as ``proj``, and becomes
:class:`~maskprop.sparse.SparseMultiheadAttention`; in another form, or where its heads stay whole, it is left whole
with the tokens it reads and writes.
A concatenation along the channels (``torch.cat(..., dim=1)``) makes a space of its parts side by side, which
channel-wise operations pass on and conv, BatchNorm and linear layers read as a concatenated group
(:func:`~maskprop.sparse.concatenate_groups`): DenseNet's dense blocks, Inception's branches, CSP and DLA stages. The
forward's own ``torch.cat`` of the parts' compact tensors is the compact concatenation. Added to a space of its width
(no part of a concatenation), that space's writers write it, and added to another concatenation of the same part
widths, the two are one, their parts joined pair by pair (GhostNet's residual streams); a depthwise conv on it reads
and writes it. Where it is read in a way a subnetwork cannot run (sliced, added to a space of other part widths, the
model's output) all its parts stay whole.
A space is prunable when each tensor of it is read only in ways a subnetwork computes exactly. It is left whole
(never pruned) when it is

* the model's input or output, or read by an operation that mixes or reorders channels (a concatenation along
  another dimension, a mean over channels, a transpose that moves them, a slice of some channels or a split, a
  linear layer on a feature map's width, a layer maskprop does not convert: a LayerNorm or RMSNorm over anything but
  the channels (a map's width) or of another class, BatchNorm1d, timm's weight-standardised ``StdConv2d`` (whose
  output stays whole too), a module of its own code that ``torch.fx`` keeps whole);
* a one-channel map broadcast over another's channels (a spatial gate: the other keeps its space);
* read by a convolution or linear layer while its dropped channels would not be zero in the masked reference (after
  an operation that is not zero at zero, such as a sigmoid or adding a constant): the masked reference runs the
  dense kernels, which would read them;
* multiplied or added with a tensor indexed by channel that is not a feature map (a per-channel scale parameter);
* a residual stream and ``prune_residual=False``; or written by a layer named in ``exclude``.

Every prunable space becomes a group named after the module path its writers share (``layer2``), or after its first
writer; so does a concatenation that layers write, and one they only read is named after its first reader
(``conv:input``). Its convolutions, BatchNorm, linear, LayerNorm, RMSNorm and GroupNorm layers become
:class:`~maskprop.sparse.SparseConv2d`, :class:`~maskprop.sparse.SparseBatchNorm2d` (timm's ``BatchNormAct2d``:
:class:`~maskprop.sparse.SparseBatchNormAct2d`), :class:`~maskprop.sparse.SparseLinear` and
:class:`~maskprop.sparse.SparseLayerNorm` (torch's ``nn.LayerNorm`` and timm's ``LayerNorm`` over the channels in the
last dimension, or of a vector; :class:`~maskprop.sparse.SparseRMSNorm` for torch's ``nn.RMSNorm`` and timm's
``RmsNorm`` there), :class:`~maskprop.sparse.SparseGroupNorm` (timm's ``GroupNormAct`` and ``GroupNorm1Act``:
:class:`~maskprop.sparse.SparseGroupNormAct`) holding the same parameter tensors (state_dict keys unchanged); a layer
that writes a group and is not followed by its BatchNorm or GroupNorm masks its own output (``mask_output``). The
forward code is not changed: the model computes exactly what it computed before, and :func:`maskprop.check_model`
checks its subnetworks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import operator
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .models.spec import check_input_size
from .sparse import (
    SparseAttention,
    SparseAttention2d,
    SparseAttentionCl,
    SparseBatchNorm2d,
    SparseBatchNormAct2d,
    SparseBeitAttention,
    SparseConv2d,
    SparseGroupNorm,
    SparseGroupNormAct,
    SparseLastDimNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseMultiheadAttention,
    SparseRelativePositionalAttention,
    SparseRMSNorm,
    SparseShiftedWindowAttention,
    SparseShiftedWindowAttentionV2,
    SparseWindowAttention,
    SparseWindowAttentionV2,
)
from .sparse.groups import concatenate_groups
from .sparse.modules import SparseModule

logger = logging.getLogger(__name__)
_SAID: set[str] = set()  # the summaries logged at INFO

__all__ = ["make_prunable"]

# Channel-wise operations: each output channel reads its own input channel (spatially or elementwise). The value says
# whether a channel that is zero stays zero (f(0) = 0): the masked reference holds dropped channels at zero.
_ELEMENTWISE_MODULES: dict[type[nn.Module], bool] = {
    nn.ReLU: True, nn.ReLU6: True, nn.LeakyReLU: True, nn.ELU: True, nn.SELU: True, nn.CELU: True, nn.GELU: True,
    nn.SiLU: True, nn.Mish: True, nn.Hardswish: True, nn.Tanh: True, nn.Softsign: True, nn.Identity: True,
    nn.Dropout: True, nn.Sigmoid: False, nn.Hardsigmoid: False, nn.Softplus: False,
}
# Spatial operations on each channel alone, each 0 at 0 (pooling, zero padding, nearest or bilinear resizing).
_SPATIAL_MODULES = {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout2d, nn.Upsample,
                    nn.ZeroPad2d}
_ELEMENTWISE_FUNCTIONS: dict[object, bool] = {
    **dict.fromkeys([F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, torch.selu,
                     F.celu, F.gelu, F.silu, F.mish, F.hardswish, torch.tanh, F.tanh, F.softsign, F.dropout,
                     torch.dropout], True),
    **dict.fromkeys([torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, torch.exp], False),
}
_SPATIAL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.max_pool2d,
                      F.dropout2d, F.interpolate}
_ELEMENTWISE_METHODS = {"relu": True, "relu_": True, "tanh": True, "tanh_": True, "sigmoid": False,
                        "sigmoid_": False, "exp": False, "contiguous": True, "clone": True, "float": True,
                        "double": True, "half": True, "bfloat16": True, "type_as": True}
_FACTORIES = {"new_empty", "new_zeros", "new_ones", "new_full", torch.empty_like, torch.zeros_like, torch.ones_like,
              torch.rand_like, torch.randn_like, torch.full_like}  # they read the shape, dtype and device alone
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, F.relu_, torch.relu_}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_SUB = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_"}
_FLATTEN = {torch.flatten, "flatten", "view", "reshape", torch.reshape}
_REDUCE = {torch.mean, "mean", torch.sum, "sum", torch.amax, "amax"}
_CONCATENATE = {torch.cat, torch.concat, torch.concatenate}
_TRANSPOSE = {"transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims}
_PERMUTE = {"permute", torch.permute}


@dataclass
class _Value:
    """A tensor of the traced forward whose dimension 1 is the channel space ``space`` (``last``: whose last dimension
    is, a linear layer's output of more than two dimensions); ``zero``: its dropped channels are zero in the masked
    reference (``why_not`` says where that was lost); ``positions``: features per channel of a feature map flattened
    to ``(N, C * positions)`` (0: not flattened); ``unzeroed``: the parts of a concatenation whose dropped channels
    are not zero (``zero`` is about the others), and why."""

    space: int
    zero: bool = True
    why_not: str = ""
    positions: int = 0
    last: bool = False
    unzeroed: tuple[tuple[int, str], ...] = ()


@dataclass
class _Spaces:
    """Channel spaces with union-find; a space's writers and why it is left whole, kept at its root."""

    parent: list[int] = field(default_factory=list)
    writers: dict[int, list[str]] = field(default_factory=dict)
    whole: dict[int, str] = field(default_factory=dict)
    residual: set[int] = field(default_factory=set)
    concatenated: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # its (part space, channels)
    attention: dict[str, int] = field(default_factory=dict)  # attention modules by path: their heads' features
    widths: dict[int, int] = field(default_factory=dict)  # the channels of a space no layer writes whole (features
    # of a grouped conv's groups), at its root
    chunks: list[list[int]] = field(default_factory=list)  # the part spaces of each chunk along the last dimension
    labels: dict[int, str] = field(default_factory=dict)  # what split a concatenation so (a GroupNorm), at its root

    def new(self, writer: str | None = None, whole: str | None = None) -> int:
        self.parent.append(len(self.parent))
        space = len(self.parent) - 1
        self.writers[space] = [] if writer is None else [writer]
        if whole is not None:
            self.whole[space] = whole
        return space

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def concatenation(self, parts: list[tuple[int, int]], label: str | None = None) -> int:
        """A new space made of ``parts`` side by side (a ``torch.cat`` along the channels), which no layer writes
        until a space of its width joins it (:meth:`union`); left whole, so are its parts. ``label`` says what
        splits it so (a GroupNorm's groups), for the reason a mix with another split gives."""
        space = self.new()
        self.concatenated[space] = parts
        if label is not None:
            self.labels[space] = label
        return space

    def union(self, a: int, b: int) -> int:
        """One space of ``a`` and ``b`` (an add or product of their tensors, a layer reading both). A concatenation
        stays one: joined with a space of its own channels (no part of a concatenation), that space's writers write
        the concatenation (a residual stream of concatenations, GhostNet's); joined with another concatenation of as
        many parts of the same widths, their parts are joined pair by pair. Anything else with a concatenation leaves
        both whole."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if a in self.concatenated and b in self.concatenated:
            if [n for _, n in self.concatenated[a]] == [n for _, n in self.concatenated[b]]:
                for x, y in zip(self.concatenated[a], self.concatenated[b]):  # plain spaces: no recursion past one
                    self.union(x[0], y[0])
            else:
                self._mixed(a, b)
            self.concatenated.pop(max(a, b))
            if max(a, b) in self.labels:
                self.labels.setdefault(min(a, b), self.labels.pop(max(a, b)))
            return self._merge(min(a, b), max(a, b))
        if a in self.concatenated or b in self.concatenated:
            concatenation, plain = (a, b) if a in self.concatenated else (b, a)
            if any(self.find(part) == plain for parts in self.concatenated.values() for part, _ in parts):
                self._mixed(a, b)  # a part of a concatenation cannot also be the whole of one
            return self._merge(concatenation, plain)
        return self._merge(min(a, b), max(a, b))  # the older space is the root: writers stay in graph order

    def _mixed(self, a: int, b: int) -> None:
        why = "a concatenation of channel groups mixed with another channel space"
        if a in self.labels or b in self.labels:  # a GroupNorm's: say which splits a subnetwork cannot both keep
            why = f"channels split two ways that a subnetwork cannot both keep: {self._split(a)}, and {self._split(b)}"
        self.leave_whole(a, why)
        self.leave_whole(b, why)

    def _split(self, root: int) -> str:
        """How the channels of ``root`` are split, in words (:meth:`_mixed`)."""
        if root in self.labels:
            return self.labels[root]
        parts = self.concatenated.get(root)
        return f"{len(parts)} parts of {sorted({n for _, n in parts})} channels" if parts else "one channel space"

    def _merge(self, root: int, other: int) -> int:
        """``other`` becomes part of ``root``: its writers (in graph order), whether it is whole or residual."""
        self.parent[other] = root
        writers = self.writers.pop(other)
        older, newer = (writers, self.writers[root]) if other < root else (self.writers[root], writers)
        self.writers[root] = older + [w for w in newer if w not in older]
        if other in self.widths:
            self.widths.setdefault(root, self.widths.pop(other))
        why = self.whole.pop(other, None) or self.whole.pop(root, None)
        if why is not None:
            self.whole.pop(root, None)
            self.leave_whole(root, why)  # a concatenation's parts with it
        if other in self.residual:
            self.residual.discard(other)
            self.residual.add(root)
        return root

    def leave_whole(self, space: int, why: str) -> None:
        root = self.find(space)
        if root in self.whole:
            return
        self.whole[root] = why
        for part, _ in self.concatenated.get(root, ()):  # a concatenation is whole when its parts are
            self.leave_whole(part, why)



@dataclass
class _Layer:
    """What the trace found for one conv, BatchNorm or linear layer: the spaces it reads and writes."""

    kind: str  # "conv", "depthwise", "grouped", "bn", "linear", "ln", "gn", "whole" (a layer not converted)
    reads: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    positions: set[int] = field(default_factory=set)
    nodes: list[fx.Node] = field(default_factory=list)
    whole: bool = False  # a call that no channel space can describe (a linear layer on a feature map's width)
    features: int | None = None  # a grouped conv's (a GroupNorm's): the space of the features each of its groups reads


def make_prunable(model: nn.Module, input_size: Sequence[int], *, prune_residual: bool = True,
                  exclude: Iterable[str] = ()) -> nn.Module:
    """Swap a plain torch network's layers for maskprop's, with the channel groups its forward implies.

    The model's ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``
    layers (exactly those classes: a subclass may compute something else; timm's ``BatchNormAct2d``, ``Linear``,
    ``LayerNorm``, ``RmsNorm``, ``GroupNorm``, ``GroupNorm1``, ``GroupNormAct`` and ``GroupNorm1Act`` too) on prunable
    channels are replaced, in place, by maskprop's layers holding the same parameters and buffers; the rest of the
    model, and its forward code, are left as they are. Which channels can be pruned, and which must stay whole, is read
    from the forward traced with ``torch.fx`` (the module docstring gives the rules); the groups' names follow the
    module paths. The model then trains, exports and reports like a built-in one; :func:`maskprop.check_model` checks
    it (``maskprop train`` does, for a model registered outside maskprop).

    Args:
        model: A network of torch layers whose forward ``torch.fx.symbolic_trace`` can trace (torchvision's ResNets,
            VGGs, MobileNets, timm's ResNets; no control flow on tensor values), in any mode, on any device.
        input_size: ``(C, H, W)`` of one example (for the shapes of the traced forward).
        prune_residual: ``False`` keeps every channel space that meets another in an add (the residual streams) whole.
        exclude: Names of conv or linear layers whose output channels stay whole (e.g. ``["conv1"]``).

    Returns:
        ``model``, its layers replaced.

    Raises:
        ValueError: ``torch.fx`` cannot trace the forward, the model already has maskprop layers, an ``exclude`` name
            is not a conv or linear layer of the model, or no channel can be pruned (one line, naming why the largest
            spaces are left whole).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is {type(model).__name__}; expected a torch.nn.Module")
    input_size = check_input_size(input_size)
    if any(isinstance(m, SparseModule) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has maskprop layers (make_prunable was applied, or it is "
                         f"written with them); expected a model of plain torch layers")
    modules = dict(model.named_modules())
    forms = _attention_forms(model, modules)
    attention = frozenset(name for name, why in forms.items() if not why)
    whole = {name: why for name, why in forms.items() if why}
    modules |= _multihead_projections(modules, attention)  # nn.MultiheadAttention's, as SparseMultiheadAttention's
    renamed = {f"{name}.{own}": f"{name}.{ours}" for name in attention
               for own, ours in _projection_names(modules[name]).items() if own != ours}
    modules |= {ours: modules[own] for own, ours in renamed.items() if own in modules}  # MaxViT's, by maskprop's names
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    exclude = [renamed.get(name, name) for name in exclude]  # an nn.MultiheadAttention's out_proj is its proj
    unknown = [name for name in exclude if not isinstance(modules.get(name), (nn.Conv2d, nn.Linear))]
    if unknown:
        raise ValueError(f"exclude names {unknown} are not nn.Conv2d or nn.Linear layers of {type(model).__name__}")
    spaces, layers = _follow(_trace(model, input_size, frozenset(forms)), modules, attention, whole)
    for parts in spaces.chunks:  # a subnetwork's chunk has equal parts where they keep as many channels: one space
        if len({spaces.find(part) for part in parts}) > 1:
            for part in parts:
                spaces.leave_whole(part, "a part of a chunk along the last dimension whose parts are not one channel "
                                         "space (a subnetwork would keep other counts of them)")
    if not prune_residual:
        for space in list(spaces.residual):
            spaces.leave_whole(space, "a residual stream (prune_residual=False)")
    for name in exclude:
        for space in layers[name].writes if name in layers else ():
            spaces.leave_whole(space, f"written by {name!r}, which exclude names")
    for entry in layers.values():
        if entry.whole:  # a linear layer also run on a feature map's width
            for space in entry.reads + entry.writes:
                spaces.leave_whole(space, "read or written by a linear layer that also runs on a feature map's width")
        if len(entry.positions) > 1:
            spaces.leave_whole(entry.reads[0], f"read by a linear layer with {sorted(entry.positions)} features per "
                                               f"channel in different calls")
    for name, head in spaces.attention.items():  # torch's module, kept, computes with its own parameters
        if isinstance(modules[name], nn.MultiheadAttention) and spaces.find(head) in spaces.whole:
            for space in layers[f"{name}.qkv"].reads + layers[f"{name}.proj"].writes:
                spaces.leave_whole(space, f"read or written by {name!r}, an nn.MultiheadAttention whose heads stay "
                                          f"whole ({spaces.whole[spaces.find(head)]})")
    groups = _group_names(spaces)
    if not groups:
        raise ValueError(f"no channel of {type(model).__name__} can be pruned: {_why_whole(spaces, layers, modules)}")
    concatenated = _concatenations(spaces, layers, groups)
    converted = _replace(model, modules, layers, spaces, groups | {root: name for root, (name, _) in
                                                                   concatenated.items()})
    replaced = len(converted)
    for name, parts in concatenated.values():
        concatenate_groups(model, name, parts)
    for name, head in spaces.attention.items():  # its heads' features a group: maskprop's attention runs them
        group = groups.get(spaces.find(head))
        if group is not None:
            new = _sparse_attention(modules[name], group, converted[f"{name}.qkv"], converted[f"{name}.proj"])
            _put(model, modules[name], new)
            replaced += 1
    prunable = sum(_width(modules, spaces, root) for root in groups)
    joined = f", {len(concatenated)} concatenations of them" if concatenated else ""
    summary = (f"make_prunable: {type(model).__name__} has {len(groups)} channel groups ({prunable} channels{joined}) "
               f"in {replaced} converted layers; left whole: {_why_whole(spaces, layers, modules)}")
    logger.log(logging.DEBUG if summary in _SAID else logging.INFO, summary)  # once a process: a run builds it often
    _SAID.add(summary)
    return model


def _attention_forms(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """``{path: why it stays whole}`` of the attention modules maskprop converts (``""``) or keeps as they are
    (traced as one module, the tokens they read and write whole): timm's plain attention (:func:`_is_timm_attention`)
    whose ``qkv`` and ``proj`` are its own (a projection shared with another module is listed under that module's
    path); torch's ``nn.MultiheadAttention`` in the form :class:`~maskprop.sparse.SparseMultiheadAttention` computes,
    its projections held by no other module, or else why not; a narrow model's
    :class:`~maskprop.sparse.SparseMultiheadAttention`, kept. timm's attention in another form is not listed: it is
    traced through, its heads whole."""
    held = Counter(id(child) for parent in model.modules() for child in parent._modules.values())
    held.update(id(tensor) for module in model.modules() for tensor in module._parameters.values())
    forms = {}
    for name, module in modules.items():
        if any(convertible(module) for convertible in _CONVERTIBLE_ATTENTION):
            if all(modules.get(f"{name}.{own}") is getattr(module, own) for own in _projection_names(module)):
                forms[name] = ""
        elif type(module) is nn.MultiheadAttention:  # a subclass may compute something else
            shared = any(held[id(part)] > 1 for part in (module.in_proj_weight, module.in_proj_bias, module.out_proj)
                         if part is not None)
            forms[name] = _why_multihead_whole(module) or (
                "an nn.MultiheadAttention whose projections another module holds too" if shared else "")
        elif isinstance(module, SparseMultiheadAttention):  # fx cannot trace its forward (it reads the shapes)
            forms[name] = "maskprop's SparseMultiheadAttention, which make_prunable keeps as it is"
    return forms


def _projection_names(module: nn.Module) -> dict[str, str]:
    """``{the module's name: maskprop's}`` of an attention module's query, key and value projection and its output
    projection (torchvision's MaxViT calls them ``to_qkv`` and ``merge``; torch's ``nn.MultiheadAttention`` holds its
    output projection as ``out_proj`` and no module of the first)."""
    if isinstance(module, nn.MultiheadAttention):
        return {"out_proj": "proj"}
    if _of_class(module, "torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"):
        return {"to_qkv": "qkv", "merge": "proj"}
    return {"qkv": "qkv", "proj": "proj"}


def _num_heads(module: nn.Module) -> int:
    """An attention module's heads (torchvision's MaxViT calls them ``n_heads``)."""
    return module.num_heads if hasattr(module, "num_heads") else module.n_heads


def _why_multihead_whole(module: nn.MultiheadAttention) -> str:
    """Why :class:`~maskprop.sparse.SparseMultiheadAttention` does not compute what ``module`` does (``""``: it
    does): its query, key and value projections are separate matrices, or it attends a learnt key and value or a zero
    one besides the tokens."""
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        return (f"an nn.MultiheadAttention with separate query, key and value projections (kdim={module.kdim}, "
                f"vdim={module.vdim}, embed_dim={module.embed_dim})")
    if module.bias_k is not None or module.bias_v is not None:
        return "an nn.MultiheadAttention with add_bias_kv=True"
    if module.add_zero_attn:
        return "an nn.MultiheadAttention with add_zero_attn=True"
    if not isinstance(module.out_proj, nn.Linear):
        return f"an nn.MultiheadAttention whose out_proj is a {type(module.out_proj).__name__}"
    return ""


def _multihead_projections(modules: dict[str, nn.Module], attention: frozenset[str]) -> dict[str, nn.Module]:
    """``{path: layer}`` of the projections of the ``nn.MultiheadAttention`` modules at the paths ``attention``,
    named as :class:`~maskprop.sparse.SparseMultiheadAttention` names them: ``qkv``, a linear layer holding
    ``in_proj_weight`` and ``in_proj_bias`` themselves, and ``proj``, its ``out_proj``."""
    found: dict[str, nn.Module] = {}
    for name in attention:
        module = modules[name]
        if isinstance(module, nn.MultiheadAttention):
            with torch.device("meta"):
                qkv = nn.Linear(module.embed_dim, 3 * module.embed_dim, bias=module.in_proj_bias is not None)
            qkv.weight, qkv.bias = module.in_proj_weight, module.in_proj_bias
            found[f"{name}.qkv"], found[f"{name}.proj"] = qkv.train(module.training), module.out_proj
    return found


def _trace(model: nn.Module, input_size: tuple[int, ...], attention: frozenset[str] = frozenset()) -> list[fx.Graph]:
    """The forward in training and in eval mode (code may differ between them), each traced on a ``meta`` copy, with
    every node's output shape; the modules at the paths ``attention`` traced as one."""
    try:
        copied = copy.deepcopy(model).to(device="meta")
    except Exception as err:  # a model holding something that cannot be copied (a lock, a file)
        raise ValueError(f"{type(model).__name__} could not be copied to trace it ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]})") from None
    for module in copied.modules():  # a cumulative average reads its count on the host, which meta tensors lack
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
            module.momentum = 0.1
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    graphs = []
    for training in (True, False):
        copied.train(training)
        try:
            traced = fx.GraphModule(copied, _Tracer(attention).trace(copied))
        except Exception as err:  # torch.fx's errors are of many types; the first line says what it met
            message = " ".join(str(err).split())[:300]
            raise ValueError(f"torch.fx could not trace {type(model).__name__}'s forward ({type(err).__name__}: "
                             f"{message}); expected a forward without control flow on tensor values (or a model "
                             f"written with maskprop's layers)") from None
        shapes, printed = _shape_propagation(traced), io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):  # torch prints the traceback of a node that fails
                shapes.propagate(torch.zeros(2, *input_size, device="meta", dtype=dtype))
            sys.stderr.write(printed.getvalue())  # what the model's forward printed (a warning): said as it was
        except Exception as err:
            cause = err.__cause__ or err  # torch wraps the node's error in one that prints its metadata
            message = " ".join(str(cause).split())[:300]
            raise ValueError(f"{type(model).__name__} did not run on an input of size {tuple(input_size)} (at "
                             f"{_where(shapes.node) if shapes.node else 'its start'}: {type(cause).__name__}: "
                             f"{message})") from None
        graphs.append(traced.graph)
    return graphs


def _shape_propagation(traced: fx.GraphModule) -> fx.Interpreter:
    """torch.fx's shape propagation of ``traced``, remembering the node it runs (``.node``: where a forward fails)."""
    from torch.fx.passes.shape_prop import ShapeProp

    class Shapes(ShapeProp):
        node: fx.Node | None = None

        def run_node(self, n: fx.Node) -> object:
            self.node = n
            return super().run_node(n)

    return Shapes(traced)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping timm's ``BatchNormAct2d`` (a BatchNorm and its activation, converted as one; its
    ``GroupNormAct`` so too), timm's ``Linear``, ``LayerNorm``, ``RmsNorm``, ``GroupNorm`` and ``GroupNorm1`` and the
    attention modules at the paths ``attention``
    (:func:`_attention_forms`) whole, as it keeps torch's modules (``nn.MultiheadAttention``)."""

    def __init__(self, attention: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.attention = attention

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_batch_norm_act(m) or _is_timm_linear(m) or _is_last_dim_norm(m) or _is_group_norm(m) \
            or _is_std_conv(m) or module_qualified_name in self.attention \
            or super().is_leaf_module(m, module_qualified_name)


_TIMM_ATTENTION = {"timm.layers.attention", "timm.models.vision_transformer"}  # where timm versions define it


def _is_timm_attention(module: nn.Module) -> bool:
    """timm's multi-head self-attention (``Attention``: vision transformers, DeiT, ...) in the form
    :class:`~maskprop.sparse.SparseAttention` computes: ``qkv`` and ``proj`` linear layers, no query-key or output
    normalisation, no gate, dropouts around it. Any other form (and timm's other classes named ``Attention``) is
    traced through, its heads left whole."""
    kind = type(module)
    if kind.__name__ != "Attention" or kind.__module__ not in _TIMM_ATTENTION:
        return False
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, width = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    linear = all(type(m) is nn.Linear or _is_timm_linear(m) for m in (qkv, proj))
    widths = {"q_norm": width, "k_norm": width, "norm": heads * width if isinstance(width, int) and
              isinstance(heads, int) else None}
    plain = all(_normalises(getattr(module, n, nn.Identity()), features) for n, features in widths.items())
    return linear and plain and getattr(module, "gate", None) is None and isinstance(heads, int) \
        and isinstance(width, int) and qkv.out_features == 3 * heads * width and proj.in_features == heads * width \
        and isinstance(getattr(module, "attn_drop", None), nn.Dropout) \
        and isinstance(getattr(module, "proj_drop", None), (nn.Dropout, nn.Identity))


def _normalises(module: nn.Module, features: int | None) -> bool:
    """An attention's ``q_norm``, ``k_norm`` or ``norm`` that maskprop's attention runs: an identity, or a LayerNorm
    or RMSNorm over the ``features`` it reads (:func:`_is_last_dim_norm`), which a subnetwork runs on the kept ones."""
    return isinstance(module, nn.Identity) or _is_last_dim_norm(module) \
        and tuple(module.normalized_shape) == (features,)


def _window_projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear, int] | None:
    """``(qkv, proj, heads)`` of a window attention (timm's or torchvision's) whose projections are ``nn.Linear`` and
    whose relative position bias is one number per head and pair of a window's tokens (a table of one column per head,
    an index of every pair); ``None`` otherwise."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    table = getattr(module, "relative_position_bias_table", None)
    index, size = getattr(module, "relative_position_index", None), getattr(module, "window_size", None)
    if not (all(type(m) is nn.Linear for m in (qkv, proj)) and isinstance(heads, int)
            and isinstance(table, nn.Parameter) and isinstance(index, torch.Tensor)
            and isinstance(size, (list, tuple)) and len(size) == 2):
        return None
    bias_per_head = table.dim() == 2 and table.shape[1] == heads and index.numel() == (size[0] * size[1]) ** 2
    return (qkv, proj, heads) if bias_per_head else None


def _is_timm_window_attention(module: nn.Module) -> bool:
    """timm's ``WindowAttention`` (Swin Transformer) in the form :class:`~maskprop.sparse.SparseWindowAttention`
    computes: :func:`_window_projections`, dropouts around it. Another form is traced through, its heads left whole."""
    parts = _window_projections(module) if _is_window_attention_class(module) else None
    if parts is None:
        return False
    qkv, proj, heads = parts
    return qkv.out_features % (3 * heads) == 0 and proj.in_features == qkv.out_features // 3 \
        and isinstance(getattr(module, "attn_drop", None), nn.Dropout) \
        and isinstance(getattr(module, "proj_drop", None), (nn.Dropout, nn.Identity))


def _is_torchvision_window_attention(module: nn.Module) -> bool:
    """torchvision's ``ShiftedWindowAttention`` (its Swin Transformer, v1; not v2's cosine attention) in the form
    :class:`~maskprop.sparse.SparseShiftedWindowAttention` computes: :func:`_window_projections` on the tokens' width,
    a shift of two sides, its dropout probabilities."""
    parts = _window_projections(module) if _is_shifted_window_attention_class(module) else None
    shift = getattr(module, "shift_size", None)
    if parts is None or not (isinstance(shift, (list, tuple)) and len(shift) == 2):
        return False
    qkv, proj, heads = parts
    dim = qkv.in_features
    return dim % heads == 0 and qkv.out_features == 3 * dim and proj.in_features == proj.out_features == dim \
        and all(isinstance(getattr(module, n, None), float) for n in ("attention_dropout", "dropout"))


def _separate_biases(module: nn.Module, width: int) -> bool:
    """timm's ``q_bias``, ``k_bias`` and ``v_bias`` outside ``qkv`` (which has no bias of its own), each of ``width``
    entries, or none of them; ``k_bias`` zero (the buffer timm's constructor zeroes, which no state dict holds)."""
    q, k, v = (getattr(module, name, None) for name in ("q_bias", "k_bias", "v_bias"))
    if getattr(module.qkv, "bias", None) is not None:
        return False
    if q is None and k is None and v is None:
        return True
    return isinstance(q, nn.Parameter) and isinstance(v, nn.Parameter) and isinstance(k, torch.Tensor) \
        and all(tuple(t.shape) == (width,) for t in (q, k, v)) and (k.is_meta or not bool(k.any()))


def _plain_projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear, int] | None:
    """``(qkv, proj, heads)`` of an attention module whose projections are ``nn.Linear``, ``qkv`` writing three
    times the features ``proj`` reads, a whole number of them per head, and whose dropouts are torch's; ``None``
    otherwise."""
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    if not (all(type(m) is nn.Linear for m in (qkv, proj)) and isinstance(heads, int) and heads > 0
            and qkv.out_features == 3 * proj.in_features and proj.in_features % heads == 0):
        return None
    dropouts = isinstance(getattr(module, "attn_drop", None), nn.Dropout) \
        and isinstance(getattr(module, "proj_drop", None), (nn.Dropout, nn.Identity))
    return (qkv, proj, heads) if dropouts else None


def _is_timm_beit_attention(module: nn.Module) -> bool:
    """timm's BEiT attention (``timm.models.beit.Attention``) in the form
    :class:`~maskprop.sparse.SparseBeitAttention` computes: :func:`_plain_projections`, :func:`_separate_biases`, and
    a relative position bias of one column per head and a square index, or none. Another form is traced through, its
    heads left whole."""
    parts = _plain_projections(module) if _of_class(module, "timm.models.beit", "Attention") else None
    if parts is None or not _separate_biases(module, parts[1].in_features):
        return False
    table, index = module.relative_position_bias_table, module.relative_position_index
    size = getattr(module, "window_size", None)
    if table is None:
        return index is None
    return isinstance(table, nn.Parameter) and table.dim() == 2 and table.shape[1] == parts[2] \
        and isinstance(index, torch.Tensor) and index.dim() == 2 and index.shape[0] == index.shape[1] \
        and isinstance(size, (list, tuple)) and len(size) == 2


def _cosine_parts(module: nn.Module, heads: int) -> bool:
    """A Swin Transformer v2's cosine attention's parts: a ``logit_scale`` per head, a bias MLP (``cpb_mlp``) on a
    table of relative coordinates, an index of every pair of a window's tokens."""
    scale, table = getattr(module, "logit_scale", None), getattr(module, "relative_coords_table", None)
    index, size = getattr(module, "relative_position_index", None), getattr(module, "window_size", None)
    return isinstance(scale, nn.Parameter) and tuple(scale.shape) == (heads, 1, 1) \
        and isinstance(getattr(module, "cpb_mlp", None), nn.Module) and isinstance(table, torch.Tensor) \
        and table.shape[-1] == 2 and isinstance(index, torch.Tensor) and isinstance(size, (list, tuple)) \
        and len(size) == 2 and index.numel() == (size[0] * size[1]) ** 2


def _is_timm_window_attention_v2(module: nn.Module) -> bool:
    """timm's Swin Transformer v2 ``WindowAttention`` in the form :class:`~maskprop.sparse.SparseWindowAttentionV2`
    computes: :func:`_plain_projections` on the tokens' width, :func:`_separate_biases`, :func:`_cosine_parts`.
    Another form is traced through, its heads left whole."""
    parts = _plain_projections(module) if _of_class(module, "timm.models.swin_transformer_v2", "WindowAttention") \
        else None
    return parts is not None and parts[0].in_features == parts[1].in_features \
        and _separate_biases(module, parts[1].in_features) and _cosine_parts(module, parts[2])


def _is_torchvision_window_attention_v2(module: nn.Module) -> bool:
    """torchvision's ``ShiftedWindowAttentionV2`` (``swin_v2_t``) in the form
    :class:`~maskprop.sparse.SparseShiftedWindowAttentionV2` computes: ``nn.Linear`` projections on the tokens'
    width, :func:`_cosine_parts`, a shift of two sides, its dropout probabilities."""
    if not _of_class(module, "torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"):
        return False
    qkv, proj, heads = getattr(module, "qkv", None), getattr(module, "proj", None), getattr(module, "num_heads", None)
    shift = getattr(module, "shift_size", None)
    if not (all(type(m) is nn.Linear for m in (qkv, proj)) and isinstance(heads, int)
            and isinstance(shift, (list, tuple)) and len(shift) == 2):
        return False
    dim = qkv.in_features
    return dim % heads == 0 and qkv.out_features == 3 * dim and proj.in_features == proj.out_features == dim \
        and _cosine_parts(module, heads) \
        and all(isinstance(getattr(module, n, None), float) for n in ("attention_dropout", "dropout"))


def _is_torchvision_maxvit_attention(module: nn.Module) -> bool:
    """torchvision's MaxViT attention (``RelativePositionalMultiHeadAttention``) in the form
    :class:`~maskprop.sparse.SparseRelativePositionalAttention` computes: ``nn.Linear`` projections, ``to_qkv`` writing
    ``3 x n_heads x head_dim`` features and ``merge`` reading ``n_heads x head_dim``, a bias table of one column per
    head, an index of every pair of a square window's ``max_seq_len`` tokens, a number as the scale. Another form (a
    subclass) is traced through, its heads left whole."""
    if not _of_class(module, "torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"):
        return False
    qkv, proj = getattr(module, "to_qkv", None), getattr(module, "merge", None)
    heads, width, tokens = (getattr(module, n, None) for n in ("n_heads", "head_dim", "max_seq_len"))
    table = getattr(module, "relative_position_bias_table", None)
    index = getattr(module, "relative_position_index", None)
    if not (all(type(m) is nn.Linear for m in (qkv, proj)) and all(isinstance(n, int) and n > 0
                                                                  for n in (heads, width, tokens))):
        return False
    return qkv.out_features == 3 * heads * width and proj.in_features == heads * width \
        and math.isqrt(tokens) ** 2 == tokens and isinstance(table, nn.Parameter) and table.dim() == 2 \
        and table.shape[1] == heads and isinstance(index, torch.Tensor) and index.numel() == tokens * tokens \
        and isinstance(getattr(module, "scale_factor", None), float)


_TIMM_REL_POS = ("RelPosBias", "RelPosMlp", "RelPosBiasTf")
"""timm's relative position modules (``timm.layers.pos_embed_rel``) whose bias is one number per head and pair of
tokens, whatever features the heads keep."""


def _is_timm_maxxvit_attention(module: nn.Module) -> bool:
    """timm's MaxViT and CoAtNet attention (``timm.models.maxxvit.AttentionCl`` on channels-last tokens,
    ``Attention2d`` on maps) in the form :class:`~maskprop.sparse.SparseAttentionCl` or
    :class:`~maskprop.sparse.SparseAttention2d` computes: ``nn.Linear`` projections (``AttentionCl``) or 1x1
    ``nn.Conv2d`` ones (``Attention2d``), ``qkv`` writing ``3 x num_heads x dim_head`` features and ``proj`` reading
    ``num_heads x dim_head``, timm's scale (``dim_head ** -0.5``), a relative position module of timm's
    (:data:`_TIMM_REL_POS`) or none, dropouts around it. Another form (a subclass) is traced through, its heads left
    whole."""
    if _of_class(module, "timm.models.maxxvit", "AttentionCl"):
        projection = _is_plain_linear
    elif _of_class(module, "timm.models.maxxvit", "Attention2d"):
        projection = _is_pointwise_conv
    else:
        return False
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, width = getattr(module, "num_heads", None), getattr(module, "dim_head", None)
    rel_pos = getattr(module, "rel_pos", None)
    if not (projection(qkv) and projection(proj) and all(isinstance(n, int) and n > 0 for n in (heads, width))):
        return False
    return qkv.weight.shape[0] == 3 * heads * width and proj.weight.shape[1] == heads * width \
        and isinstance(getattr(module, "head_first", None), bool) and getattr(module, "scale", None) == width ** -0.5 \
        and (rel_pos is None or any(_of_class(rel_pos, "timm.layers.pos_embed_rel", n) for n in _TIMM_REL_POS)) \
        and isinstance(getattr(module, "attn_drop", None), nn.Dropout) \
        and isinstance(getattr(module, "proj_drop", None), (nn.Dropout, nn.Identity))


def _is_plain_linear(module: object) -> bool:
    return type(module) is nn.Linear


def _is_pointwise_conv(module: object) -> bool:
    """``nn.Conv2d`` of one position per output: a 1x1 kernel, stride 1, no padding, one group."""
    return type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1) \
        and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1


def _is_timm_attention_2d(module: nn.Module) -> bool:
    """Whether ``module`` is of timm's class ``Attention2d`` (attention on maps: channels in dimension 1)."""
    return _of_class(module, "timm.models.maxxvit", "Attention2d")


def _is_shifted_window_attention_class(module: nn.Module) -> bool:
    """Whether ``module`` is of torchvision's class ``ShiftedWindowAttention`` (not a subclass: v2's computes cosine
    attention)."""
    return _of_class(module, "torchvision.models.swin_transformer", "ShiftedWindowAttention")


def _is_window_attention_class(module: nn.Module) -> bool:
    """Whether ``module`` is of timm's class ``WindowAttention``."""
    return _of_class(module, "timm.models.swin_transformer", "WindowAttention")


_CONVERTIBLE_ATTENTION = (_is_timm_attention, _is_timm_window_attention, _is_torchvision_window_attention,
                          _is_timm_beit_attention, _is_timm_window_attention_v2, _is_torchvision_window_attention_v2,
                          _is_torchvision_maxvit_attention, _is_timm_maxxvit_attention)
"""The tests of the attention modules :func:`make_prunable` converts, each of one class in one form."""


def _of_class(module: nn.Module, where: str, name: str) -> bool:
    """Whether ``module``'s class is ``where.name`` exactly (told by its names, so that the library need not be
    imported; a subclass may compute something else)."""
    kind = type(module)
    return kind.__name__ == name and kind.__module__ == where


def _is_timm_linear(module: nn.Module) -> bool:
    """timm's ``Linear`` (GhostNet's and MobileNetV3's classifiers): ``nn.Linear`` with a cast of its weight to the
    input's dtype under TorchScript alone, so the same layer otherwise (converted as one)."""
    return _of_class(module, "timm.layers.linear", "Linear")


def _is_batch_norm_act(module: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (told by its class, so that timm need not be imported): a BatchNorm, then ``drop``
    and ``act``."""
    return _of_class(module, "timm.layers.norm_act", "BatchNormAct2d")


def _is_layer_norm(module: nn.Module) -> bool:
    """torch's ``nn.LayerNorm`` (not a subclass: it may compute something else) or timm's ``LayerNorm`` without its
    fast-norm kernel (``F.layer_norm`` then), over one dimension: what :class:`~maskprop.sparse.SparseLayerNorm`
    computes."""
    return (type(module) is nn.LayerNorm or _of_class(module, "timm.layers.norm", "LayerNorm")
            and not getattr(module, "_fast_norm", False)) and len(module.normalized_shape) == 1


def _is_rms_norm(module: nn.Module) -> bool:
    """torch's ``nn.RMSNorm`` (not a subclass) or timm's ``RmsNorm`` without its fast-norm kernel, over one dimension:
    what :class:`~maskprop.sparse.SparseRMSNorm` computes (timm's multiplies its input by the reciprocal root of the
    mean of its squares plus ``eps``, then by its weight, as ``F.rms_norm`` does: the same values to the last bit's
    rounding in float32 and float64; in half precision timm takes its statistics in the input's dtype, ``F.rms_norm``
    in float32)."""
    return (type(module) is nn.RMSNorm or _of_class(module, "timm.layers.norm", "RmsNorm")
            and not getattr(module, "_fast_norm", False)) and len(module.normalized_shape) == 1


def _is_group_norm(module: nn.Module) -> bool:
    """torch's ``nn.GroupNorm`` (not a subclass: it may compute something else), timm's ``GroupNorm`` and
    ``GroupNorm1`` without their fast-norm kernel (``F.group_norm`` then), and timm's ``GroupNormAct`` and
    ``GroupNorm1Act`` so (a GroupNorm, then ``drop`` and ``act``: :func:`_is_group_norm_act`): what
    :class:`~maskprop.sparse.SparseGroupNorm` (:class:`~maskprop.sparse.SparseGroupNormAct`) computes."""
    return type(module) is nn.GroupNorm or (any(_of_class(module, "timm.layers.norm", n) for n in ("GroupNorm",
                                                                                                  "GroupNorm1"))
                                            or _is_group_norm_act(module)) and not getattr(module, "_fast_norm", False)


def _is_std_conv(module: nn.Module) -> bool:
    """timm's weight-standardised convolutions (``StdConv2d``, BiT's, and its kin: each filter standardised over all
    its inputs before the convolution), which maskprop does not convert: kept as one module, so that what they write
    stays whole for that reason."""
    return any(_of_class(module, "timm.layers.std_conv", n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                                      "ScaledStdConv2dSame"))


def _is_group_norm_act(module: nn.Module) -> bool:
    """timm's ``GroupNormAct`` or ``GroupNorm1Act`` (told by its class): ``F.group_norm``, then ``drop`` and ``act``."""
    return any(_of_class(module, "timm.layers.norm_act", n) for n in ("GroupNormAct", "GroupNorm1Act"))


def _is_last_dim_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm that maskprop converts (:func:`_is_layer_norm`, :func:`_is_rms_norm`)."""
    return _is_layer_norm(module) or _is_rms_norm(module)


def _normalises_channels(node: fx.Node, value: _Value) -> bool:
    """A LayerNorm's call at ``node`` normalises the channels of ``value``: its last dimension is the channel space
    (a linear layer's output on tokens, or the channels of a vector ``(N, C)`` no flatten made)."""
    shape = _shape(node.args[0]) if node.args else None
    return shape is not None and not value.positions and (value.last or len(shape) == 2)


def _keeps_zero(module: nn.Module) -> bool | None:
    """Whether a channel-wise module maps 0 to 0 (``None``: not a module known to act on each channel alone)."""
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return module.min_val <= 0 <= module.max_val
    return _ELEMENTWISE_MODULES.get(type(module))


def _shape(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return repr(node.target)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _follow(graphs: list[fx.Graph], modules: dict[str, nn.Module], attention: frozenset[str] = frozenset(),
            whole: dict[str, str] | None = None) -> tuple[_Spaces, dict[str, _Layer]]:
    """Walk each traced graph once, in order: the channel space of every tensor, and what each layer reads and writes
    (a layer reads and writes the same spaces in every graph; a space left whole in one is whole); the modules at the
    paths ``attention`` as attention, those in ``whole`` (``nn.MultiheadAttention`` by path) whole, for the reason
    given."""
    spaces = _Spaces()
    layers: dict[str, _Layer] = {}
    for graph in graphs:
        _walk_graph(graph, modules, _Walk(spaces, layers, {}, attention, whole or {}))
    return spaces, layers


def _walk_graph(graph: fx.Graph, modules: dict[str, nn.Module], walk: _Walk) -> None:
    values = walk.values
    spaces = walk.spaces
    for node in graph.nodes:
        if walk.item_of_pair(node) or walk.item_of_chunk(node):
            continue
        shape = _shape(node)
        if node.op == "placeholder":
            if shape is not None and len(shape) >= 2:
                values[node] = _Value(spaces.new(whole="the model's input"))
        elif node.op == "output":
            for value in walk.inputs(node):
                spaces.leave_whole(value.space, "the model's output")
        elif node.op == "get_attr":  # a parameter or buffer: a tensor of no channel space
            owner = next((name for name in walk.attention if node.target.startswith(f"{name}.")
                          and isinstance(modules[name], nn.MultiheadAttention)), None)
            if owner is not None:  # a subnetwork's attention runs a gathered in_proj_weight, not the one read here
                walk.keep_whole(owner, modules[owner], f"{node.target} read outside its nn.MultiheadAttention")
        elif node.op == "call_module" and node.target in walk.attention:  # nn.MultiheadAttention's output: a pair
            module = modules[node.target]
            value = walk.module(node, module)
            if value is not None:
                (walk.pairs if isinstance(module, nn.MultiheadAttention) else values)[node] = value
        elif shape is None:  # no tensor: a size or a shape is fine, anything else (a split, a tuple) reads channels
            if not _is_query(node) and not walk.chunked(node):
                whole = walk.whole.get(node.target) if node.op == "call_module" else None
                walk.opaque(node, whole or "an operation that mixes or reorders channels")
        elif (owner := _multihead_owner(node, modules, walk.attention)) is not None:
            why = f"{node.target} called outside its nn.MultiheadAttention"
            walk.opaque(node, why)
            walk.keep_whole(owner, modules[owner], why)
        else:
            module = modules[node.target] if node.op == "call_module" else None
            value = walk.module(node, module) if module is not None else walk.function(node)
            if value is not None:
                values[node] = value
            source = node.args[0] if node.args else None
            if isinstance(source, fx.Node) and source in values and _in_place(node, module):  # later reads see it
                if value is None:
                    del values[source]
                else:
                    values[source] = value


def _multihead_owner(node: fx.Node, modules: dict[str, nn.Module], attention: frozenset[str]) -> str | None:
    """The path of the ``nn.MultiheadAttention`` to convert whose child (its ``out_proj``) ``node`` calls on its own:
    torch's module reads that layer's weight without calling it, so the two stay whole together."""
    owner = node.target.rpartition(".")[0] if node.op == "call_module" else ""
    return owner if owner in attention and isinstance(modules[owner], nn.MultiheadAttention) else None


def _in_place(node: fx.Node, module: nn.Module | None) -> bool:
    """``node`` changes its first argument: a tensor method ending in ``_`` (``y.add_(1)``), an in-place operator, or a
    function or module with ``inplace=True``."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if module is not None:
        return bool(getattr(module, "inplace", False))
    return node.kwargs.get("inplace") is True or node.target in _IN_PLACE_OPERATORS


def _is_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape`` and items of them: they read no channel's values."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and (
        node.target is getattr and node.args[1] in ("shape", "ndim", "dtype", "device")
        or node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _is_query(node.args[0]))


@dataclass
class _Walk:
    """The rules of :func:`_follow`, node by node."""

    spaces: _Spaces
    layers: dict[str, _Layer]
    values: dict[fx.Node, _Value]
    attention: frozenset[str] = frozenset()  # paths of the attention modules to convert
    whole: dict[str, str] = field(default_factory=dict)  # nn.MultiheadAttention left whole by path: why
    pairs: dict[fx.Node, _Value] = field(default_factory=dict)  # nn.MultiheadAttention's (output, weights)
    chunks: dict[fx.Node, list[_Value]] = field(default_factory=dict)  # a chunk's parts, by the chunk's node

    def inputs(self, node: fx.Node, *, in_kwargs: bool = True) -> list[_Value]:
        found: list[_Value] = []
        fx.node.map_arg((node.args, node.kwargs) if in_kwargs else node.args,
                        lambda a: found.append(self.values[a]) if a in self.values else None)
        return found

    def item_of_pair(self, node: fx.Node) -> bool:
        """``output, weights = attention(x, x, x)``: item 0 of an ``nn.MultiheadAttention``'s pair is its output, in
        the space ``proj`` writes, item 1 its weights (``None``, or a tensor of no channel space), and ``node`` is
        done; any other read of the pair reads the output whole (and the rules for ``node`` follow)."""
        pairs = [source for source in node.all_input_nodes if source in self.pairs]
        if not pairs:
            return False
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in pairs \
                and node.args[1] in (0, 1, -1, -2):
            if node.args[1] in (0, -2):
                self.values[node] = dataclasses.replace(self.pairs[node.args[0]])
            return True
        for pair in pairs:
            self.spaces.leave_whole(self.pairs[pair].space, f"nn.MultiheadAttention's (output, weights) read whole at "
                                                            f"{_where(node)}")
        return False

    def chunked(self, node: fx.Node) -> bool:
        """``x.chunk(n, dim=-1)`` of a last-dimension space into ``n`` equal parts (timm's ``GluMlp``: ``fc1``'s
        output halved, one half gating the other): the space becomes a concatenation of ``n`` parts, each a space of
        its own and an item of the tuple, which its writers write. A subnetwork's parts are equal only where they keep
        as many channels: :func:`make_prunable` leaves them whole unless they end as one space (the halves
        multiplied)."""
        key = node.target if node.op == "call_function" else str(node.target)
        source = node.args[0] if node.args else None
        if key not in ("chunk", torch.chunk) or source not in self.values:
            return False
        value, before = self.values[source], _shape(source)
        n = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not value.last or value.positions or before is None or isinstance(n, bool) or not isinstance(n, int) \
                or n < 2 or not isinstance(dim, int) or dim % len(before) != len(before) - 1 or before[-1] % n:
            return False
        width = before[-1] // n
        writer = (self.spaces.writers.get(self.spaces.find(value.space)) or [node.name])[0]
        parts = [self.spaces.new(writer=f"{writer}:chunk{i}") for i in range(n)]
        self.spaces.widths.update(dict.fromkeys(parts, width))
        self.spaces.union(value.space, self.spaces.concatenation([(part, width) for part in parts]))
        self.spaces.chunks.append(parts)
        self.chunks[node] = [_Value(part, value.zero, value.why_not, last=True) for part in parts]
        return True

    def item_of_chunk(self, node: fx.Node) -> bool:
        """``parts[i]`` of a chunk (:meth:`chunked`) is part ``i``'s space, and ``node`` is done; any other read of
        the tuple reads its parts whole."""
        chunks = [source for source in node.all_input_nodes if source in self.chunks]
        if not chunks:
            return False
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in chunks \
                and isinstance(node.args[1], int) and -len(self.chunks[node.args[0]]) <= node.args[1] \
                < len(self.chunks[node.args[0]]):
            self.values[node] = dataclasses.replace(self.chunks[node.args[0]][node.args[1]])
            return True
        for chunk in chunks:
            for part in self.chunks[chunk]:
                self.spaces.leave_whole(part.space, f"a chunk's parts read together at {_where(node)}")
        return False

    def opaque(self, node: fx.Node, why: str) -> None:
        """``node`` reads its channel spaces in a way a subnetwork cannot run: they stay whole."""
        for value in self.inputs(node):
            self.spaces.leave_whole(value.space, f"{why} at {_where(node)}")

    def needs_zero(self, value: _Value, node: fx.Node) -> None:
        if not value.zero:
            self.spaces.leave_whole(value.space, f"read by {_where(node)} after {value.why_not}, which is not 0 at 0")
        for part, why in value.unzeroed:  # a concatenation's parts that are not: those alone
            self.spaces.leave_whole(part, f"read by {_where(node)} after {why}, which is not 0 at 0")

    def layer(self, node: fx.Node, kind: str) -> _Layer:
        entry = self.layers.setdefault(node.target, _Layer(kind))
        entry.nodes.append(node)
        return entry

    def reads(self, entry: _Layer, space: int) -> int:
        """One layer reads one space: a layer called twice makes the spaces it reads one."""
        if entry.reads:
            space = self.spaces.union(entry.reads[0], space)
        entry.reads = [space]
        return space

    def writes(self, entry: _Layer, name: str) -> int:
        if not entry.writes:
            entry.writes = [self.spaces.new(writer=name)]
        return entry.writes[0]

    def module(self, node: fx.Node, module: nn.Module) -> _Value | None:
        """The channel space of a module's output, and what the module reads and writes."""
        name, kind = node.target, nn.Linear if _is_timm_linear(module) else type(module)
        source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)  # its input (``input=x``)
        if name in self.attention:  # it reads its input's last dimension, as a linear layer does
            return self.attended(node, name, module, source)
        values = self.inputs(node)
        first = self.values.get(source) if isinstance(source, fx.Node) else None
        # A layer's call on a tensor no rule follows reads a whole space: a call on a prunable one joins it, whole.
        outside = f"read by {name!r} from a tensor maskprop does not follow"
        if len(values) > (first is not None) or first is not None and first.positions and kind is not nn.Linear \
                and kind not in _ELEMENTWISE_MODULES:
            self.opaque(node, f"{kind.__name__} called on more than one feature map, or on a flattened one")
            return None
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            self.opaque(node, f"{kind.__name__}, which maskprop keeps whole (its inference fast path reads its "
                              f"nn.MultiheadAttention's parameters)")
            return None
        if _is_last_dim_norm(module) and (first is None or _normalises_channels(node, first)):
            # over the channels (a last-dimension space, or the features of a vector): its subnetwork normalises the
            # kept ones alone (SparseLayerNorm, SparseRMSNorm), whatever the dropped ones hold, and its dropped
            # outputs are zero
            space = first.space if first is not None else self.spaces.new(whole=outside)
            space = self.reads(self.layer(node, "ln"), space)
            return None if first is None else _Value(space, last=first.last)
        if first is not None and first.last and kind is not nn.Linear and _keeps_zero(module) is None:
            self.opaque(node, f"{kind.__name__} on channels in the last dimension")
            return None
        if _is_group_norm(module):
            return self.group_normalised(node, name, module, first, outside)
        if _is_std_conv(module):  # its input and output whole
            why = f"{kind.__name__}, a weight-standardised convolution that maskprop does not convert"
            self.opaque(node, f"read by {why}")
            entry = self.layer(node, "whole")
            if not entry.writes:
                entry.writes = [self.spaces.new(writer=name, whole=f"written by {why}")]
            return _Value(entry.writes[0])
        if kind is nn.Conv2d:
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            if module.groups > 1 and not depthwise:
                return self.grouped(node, name, module, first)
            entry = self.layer(node, "depthwise" if depthwise else "conv")
            if depthwise:  # output channel j reads input channel j alone: one space (kept zero by its BatchNorm)
                space = first.space if first is not None else self.spaces.new(whole=f"read by {name!r} from outside")
                space = self.reads(entry, space)
                entry.writes = entry.reads  # it passes the space on: the conv before it names the group
                return _Value(space)
            if first is not None:
                self.needs_zero(first, node)
            self.reads(entry, first.space if first is not None else self.spaces.new(whole=outside))
            return _Value(self.writes(entry, name))
        if kind is nn.Linear:
            entry = self.layer(node, "linear")
            last = len(_shape(source) or ()) > 2  # it reads and writes the last dimension of its input
            if last and first is not None and not first.last:  # a feature map's width: no channel space
                self.opaque(node, "a linear layer on a feature map's width (its last dimension)")
                entry.whole = True
                return None
            if first is not None:
                self.needs_zero(first, node)
                entry.positions.add(first.positions or 1)
            self.reads(entry, first.space if first is not None else self.spaces.new(whole=outside))
            return _Value(self.writes(entry, name), last=last)
        if first is None:
            if kind is nn.BatchNorm2d or _is_batch_norm_act(module):
                self.reads(self.layer(node, "bn"), self.spaces.new(whole=outside))
            return None  # a layer on channels that are whole: its output is whole too
        if kind is nn.BatchNorm2d or _is_batch_norm_act(module):
            after = [] if kind is nn.BatchNorm2d else [_keeps_zero(module.drop), _keeps_zero(module.act)]
            if None in after:
                self.opaque(node, f"{kind.__name__} with {type(module.drop).__name__} and {type(module.act).__name__}"
                                  f" after it, not known to act on each channel alone")
                return None
            if not module.affine or not module.track_running_stats:
                self.spaces.leave_whole(first.space, f"normalised by {name!r} without affine parameters or running "
                                                     f"statistics")
            self.reads(self.layer(node, "bn"), first.space)
            return _channelwise(_Value(first.space), all(after), node)  # the BatchNorm of a group masks its output
        keeps_zero = _keeps_zero(module)
        if keeps_zero is not None:
            return _channelwise(first, keeps_zero, node)
        if kind in _SPATIAL_MODULES:
            return _channelwise(first, True, node)
        if kind is nn.Flatten:
            return self.flattened(node, first)
        self.opaque(node, f"{kind.__name__}, which maskprop does not convert")
        return None

    def grouped(self, node: fx.Node, name: str, module: nn.Conv2d, first: _Value | None) -> _Value:
        """A convolution of ``g`` groups (not depthwise) reads ``g`` copies of the space of the features each of its
        groups reads, side by side (a concatenation, which the space it is given joins: its writers write it), and
        writes ``g`` copies of the space of the features each writes: feature ``j`` of every group is one channel, as
        a head feature is of every attention head. A channel multiplier's (one input channel per group) inputs stay
        whole."""
        entry = self.layer(node, "grouped")
        g = module.groups
        reads, writes = module.in_channels // g, module.out_channels // g  # features of each group
        if entry.features is None:  # its first call
            one = "one input channel per group (a channel multiplier): no feature to drop" if reads == 1 else None
            entry.features = self.spaces.new(writer=f"{name}:in", whole=one)
            output = self.spaces.new(writer=f"{name}:out")
            self.spaces.widths.update({entry.features: reads, output: writes})
            entry.writes = [self.spaces.concatenation([(output, writes)] * g)]
            self.spaces.writers[entry.writes[0]] = [name]
        if first is not None:
            self.needs_zero(first, node)
        given = first.space if first is not None else self.spaces.new(
            whole=f"read by {name!r} from a tensor maskprop does not follow")
        self.reads(entry, self.spaces.union(self.spaces.concatenation([(entry.features, reads)] * g), given))
        return _Value(entry.writes[0])

    def group_normalised(self, node: fx.Node, name: str, module: nn.GroupNorm, first: _Value | None,
                         outside: str) -> _Value | None:
        """A GroupNorm of ``G`` groups reads ``G`` copies of the space of the features each of its groups normalises,
        side by side (a concatenation, which the space it is given joins: its writers write it), and passes that space
        on: feature ``j`` of every group is one channel, so each group keeps as many as the others and a subnetwork runs
        one GroupNorm of ``G`` groups on the kept channels, statistics over them alone. With one group it reads the
        space it is given as it is (a LayerNorm over channels and positions); with one channel per group there is no
        feature to drop, and that space stays whole. Its dropped outputs are zero (then ``drop`` and ``act``, timm's
        ``GroupNormAct``: zero stays zero where they map 0 to 0)."""
        entry = self.layer(node, "gn")
        after = [_keeps_zero(module.drop), _keeps_zero(module.act)] if _is_group_norm_act(module) else []
        if None in after:
            self.opaque(node, f"{type(module).__name__} with {type(module.drop).__name__} and "
                              f"{type(module.act).__name__} after it, not known to act on each channel alone")
            return None
        if first is None:
            self.reads(entry, self.spaces.new(whole=outside))
            return None
        g, width = module.num_groups, module.num_channels // module.num_groups
        space = first.space
        if g > 1 and width == 1:
            self.spaces.leave_whole(space, f"normalised by {name!r}, a GroupNorm of one channel per group ({g} groups "
                                           f"of {module.num_channels} channels): no feature to drop")
        elif g > 1:
            if entry.features is None:  # its first call
                entry.features = self.spaces.new(writer=f"{name}:features")
                self.spaces.widths[entry.features] = width
            copies = self.spaces.concatenation([(entry.features, width)] * g,
                                               f"{g} groups of {width} channels normalised by {name!r}")
            space = self.spaces.union(copies, space)
        return _channelwise(_Value(self.reads(entry, space)), all(after), node)

    def attended(self, node: fx.Node, name: str, module: nn.Module, source: object) -> _Value | None:
        """An attention module on tokens: ``qkv`` reads their features (the last dimension), ``proj`` writes the
        output's (:meth:`attention_layers`). A call maskprop's attention does not compute (cross-attention, a second
        feature map, channels in dimension 1) leaves the module whole, its heads and the tokens it reads and writes."""
        qkv, proj, _ = self.attention_layers(name, module)
        first = self.values.get(source) if isinstance(source, fx.Node) else None
        on_maps = _is_timm_attention_2d(module)  # channels in dimension 1 (timm's Attention2d), else the last
        why = ""
        if isinstance(module, nn.MultiheadAttention) and not _attends_itself(node):
            why = "nn.MultiheadAttention as cross-attention (its query, key and value not one tensor)"
        elif any(n in self.values and n is not source for n in node.all_input_nodes):
            why = f"{type(module).__name__} called on more than one feature map"
        elif first is not None and first.last == on_maps:
            why = "attention on channels in the last dimension" if on_maps else "attention on channels in dimension 1"
        if why:
            self.opaque(node, why)
            self.keep_whole(name, module, f"{why} at {_where(node)}")
            return None
        if first is not None:
            self.needs_zero(first, node)
        self.reads(qkv, first.space if first is not None else
                   self.spaces.new(whole=f"read by {name!r} from a tensor maskprop does not follow"))
        return _Value(proj.writes[0], last=not on_maps)

    def keep_whole(self, name: str, module: nn.Module, why: str) -> None:
        """The attention module ``name`` stays as it is: its heads' features whole, and the tokens its ``qkv`` reads
        and its ``proj`` writes, in every call."""
        qkv, proj, head = self.attention_layers(name, module)
        self.spaces.leave_whole(head, why)
        self.reads(qkv, self.spaces.new(whole=why))
        self.spaces.leave_whole(proj.writes[0], why)

    def attention_layers(self, name: str, module: nn.Module) -> tuple[_Layer, _Layer, int]:
        """The ``qkv`` and ``proj`` layers of the attention module ``name`` and the space of its heads' features
        (``head_dim`` channels), made at its first call: ``qkv`` writes the heads' features ``3 x heads`` times over
        (a concatenation), ``proj`` reads them ``heads`` times and writes a space of its own."""
        qkv = self.layers.setdefault(f"{name}.qkv", _Layer("linear", positions={1}))
        proj = self.layers.setdefault(f"{name}.proj", _Layer("linear", positions={1}))
        if name not in self.spaces.attention:
            heads, width = _num_heads(module), _head_width(module)
            head = self.spaces.attention[name] = self.spaces.new(writer=name)
            qkv.writes = [self.spaces.concatenation([(head, width)] * (3 * heads))]
            self.spaces.writers[qkv.writes[0]] = [f"{name}.qkv"]
            proj.reads = [self.spaces.concatenation([(head, width)] * heads)]
            proj.writes = [self.spaces.new(writer=f"{name}.proj")]
        return qkv, proj, self.spaces.attention[name]

    def flattened(self, node: fx.Node, value: _Value) -> _Value | None:
        """``(N, C, H, W) -> (N, C * H * W)``: the same space, ``H * W`` features per channel, in flatten's order."""
        before, after = _shape(node.args[0]), _shape(node)
        if before is not None and after is not None and len(before) >= 2 and len(after) == 2 \
                and after[0] == before[0]:
            if after == before:  # already (N, features)
                return value
            positions = math.prod(before[2:])
            if not value.positions and after[1] == before[1] * positions:
                return dataclasses.replace(value, positions=positions)
        self.opaque(node, "a reshape that moves the channel dimension")
        return None

    def function(self, node: fx.Node) -> _Value | None:
        """The channel space of a function's or a tensor method's output."""
        target = node.target
        values = self.inputs(node)
        if not values:
            return None  # a tensor of no channel space: noise, a constant
        args = [self.values.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]  # untracked: the node
        first = args[0] if args and isinstance(args[0], _Value) else None
        key = target if node.op == "call_function" else str(target)
        if key in _FACTORIES:
            return None  # a new tensor of no channel space (stochastic depth's noise)
        if key in _CONCATENATE:
            return self.concatenated(node)
        if first is not None and len(values) == 1:
            if node.op == "call_method" and key in _ELEMENTWISE_METHODS:
                return _channelwise(first, _ELEMENTWISE_METHODS[key], node)
            if target in _ELEMENTWISE_FUNCTIONS:
                return _channelwise(first, _ELEMENTWISE_FUNCTIONS[target], node)
            if _is_stochastic_depth(target):  # one factor per example (or batch), 0 or 1 / keep: zero stays zero
                return _channelwise(first, True, node)
            if target is F.hardtanh:
                low, high = node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0)
                return _channelwise(first, low <= 0 <= high, node)
            if first.last and _keeps_last(node, key):  # tokens transposed, indexed or pooled
                return _channelwise(first, True, node)
            if first.last and key not in _ADD | _SUB | _MUL | _DIV:  # the rules below read dimension 1
                self.opaque(node, "an operation on channels in the last dimension that maskprop does not follow")
                return None
            if not first.positions and (target in _SPATIAL_FUNCTIONS or target is F.pad):
                return _channelwise(first, target is not F.pad or not node.kwargs.get("value"), node)
            if key in _FLATTEN:
                return self.flattened(node, first)
            if key in _REDUCE:
                return self.reduced(node, first)
            if target is operator.getitem and not first.positions and _keeps_channels(node):
                return _channelwise(first, True, node)  # a crop of each channel's map
        if key in _ADD | _SUB | _MUL | _DIV and len(node.args) == 2 and len(self.inputs(node, in_kwargs=False)) \
                == len(values):
            return self.binary(node, key, args)
        self.opaque(node, "an operation that mixes or reorders channels")
        return None

    def concatenated(self, node: fx.Node) -> _Value | None:
        """``torch.cat(tensors, dim=1)`` of feature maps: a space of the parts side by side (a part that is itself a
        concatenation gives its parts; a tensor no rule follows, a whole part). Along another dimension the spaces
        stay whole."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        out = _shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out is None or len(out) < 2 \
                or dim % len(out) != 1:
            self.opaque(node, "a concatenation along another dimension than the channels")
            return None
        if len(tensors) == 1 and tensors[0] in self.values:  # a concatenation of one tensor: that tensor
            return dataclasses.replace(self.values[tensors[0]])
        parts: list[tuple[int, int]] = []
        unzeroed: list[tuple[int, str]] = []
        for tensor in tensors:
            shape = _shape(tensor)
            value = self.values.get(tensor) if isinstance(tensor, fx.Node) else None
            if shape is None or len(shape) != len(out) or value is not None and (value.last or value.positions):
                self.opaque(node, "a concatenation of tensors maskprop does not follow along the channels")
                return None
            if value is None:
                parts.append((self.spaces.new(whole=f"concatenated at {_where(node)} from a tensor maskprop does "
                                                    f"not follow"), shape[1]))
                continue
            root = self.spaces.find(value.space)
            parts.extend(self.spaces.concatenated.get(root, [(root, shape[1])]))
            unzeroed.extend(value.unzeroed if value.zero else [(root, value.why_not)])
        # A reader that needs zeros where channels are dropped leaves the parts that are not whole, not the others.
        return _Value(self.spaces.concatenation(parts), unzeroed=tuple(unzeroed))

    def reduced(self, node: fx.Node, value: _Value) -> _Value | None:
        """A mean, sum or maximum over spatial dimensions keeps the channel space."""
        before, after = _shape(node.args[0]), _shape(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is not None and not value.positions:
            dims = {d % len(before) for d in ((dims,) if isinstance(dims, int) else dims)}
            if not dims & {0, 1} and len(after) >= 2 and after[1] == before[1]:
                return dataclasses.replace(value)
        self.opaque(node, "a reduction over channels")
        return None

    def binary(self, node: fx.Node, key: object, operands: list) -> _Value | None:
        """An add, subtract, multiply or divide: two feature maps make one channel space (a residual stream, a gate);
        a number, or a tensor the same for every channel (stochastic depth's per-example factor), keeps the space."""
        a, b = operands
        if isinstance(a, _Value) and isinstance(b, _Value):
            out = _shape(node)
            if a.last != b.last:
                self.opaque(node, "an operation between channels in dimension 1 and in the last dimension")
                return None
            channels = [_broadcast_channels(_shape(arg) or (), out or (), a.last) for arg in node.args[:2]]
            if channels[0] != channels[1] and 1 in channels and key not in _DIV:  # one map broadcast over the other's
                one, other = (a, b) if channels[0] == 1 else (b, a)  # channels: a factor the same for each channel
                self.spaces.leave_whole(one.space, f"broadcast over the channels of another map at {_where(node)}")
                return _channelwise(other, key in _MUL, node)
            if key in _DIV or a.positions != b.positions or channels[0] != channels[1]:
                self.opaque(node, "an operation between channel spaces maskprop does not pair")
                return None
            space = self.spaces.union(a.space, b.space)
            if key in _MUL:  # a product is zero where either factor is
                return _Value(space, a.zero or b.zero, "", a.positions, a.last, a.unzeroed + b.unzeroed)
            self.spaces.residual.add(space)
            return _Value(space, a.zero and b.zero, a.why_not or b.why_not, a.positions, a.last,
                          a.unzeroed + b.unzeroed)
        value, other = (a, b) if isinstance(a, _Value) else (b, a)
        if key in _DIV and value is not a:
            self.opaque(node, "a division by a feature map")
            return None
        if isinstance(other, fx.Node):
            shape, out = _shape(other), _shape(node)
            if shape is None or out is None or _broadcast_channels(shape, out, value.last) != 1:
                self.opaque(node, "a product or sum with a per-channel tensor that is not a feature map")
                return None
            return _channelwise(value, key in _MUL | _DIV, node)
        if isinstance(other, (int, float)):
            return _channelwise(value, key in _MUL | _DIV or other == 0, node)
        self.opaque(node, "an operation maskprop does not follow")
        return None


def _attends_itself(node: fx.Node) -> bool:
    """``attention(x, x, x)``: an ``nn.MultiheadAttention`` called with one tensor as query, key and value."""
    query, key, value = (node.args[i] if i < len(node.args) else node.kwargs.get(name)
                         for i, name in enumerate(("query", "key", "value")))
    return isinstance(query, fx.Node) and query is key is value


def _keeps_channels(node: fx.Node) -> bool:
    """``x[index]`` of a feature map keeps every example and every channel, in order (``x[:, :C]`` of a map of
    ``C`` channels, ``x[:, :, 1:, ::2]``): it crops or subsamples each channel's map alone."""
    before, after = _shape(node.args[0]), _shape(node)
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if before is None or after is None or len(before) != len(after) or len(index) > len(before) \
            or not all(isinstance(i, slice) for i in index):
        return False
    return after[:2] == before[:2] and all(i.step in (None, 1) for i in index[:2])


def _keeps_last(node: fx.Node, key: object) -> bool:
    """An operation on a tensor whose channels are its last dimension that leaves that dimension last and whole (each
    channel's values moved or combined with its own alone, a zero staying zero): a transpose or permutation of the
    other dimensions (a sequence-first layout), an index of them (a class token, ``x[:, 0]``), a new one before the
    last, or their mean, sum or maximum (tokens pooled), into a tensor of two dimensions or more."""
    before, after = _shape(node.args[0]), _shape(node)
    if before is None or after is None or len(after) < 2 or after[-1] != before[-1]:
        return False
    rank, args = len(before), list(node.args[1:])

    def others(dims: object) -> bool:  # dimensions named, none of them the last
        dims = (dims,) if isinstance(dims, int) else dims
        return isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d % rank != rank - 1 for d in dims)

    if key in _TRANSPOSE:
        dims = args if args else [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        return len(dims) == 2 and others(dims)
    if key in _PERMUTE:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args or node.kwargs.get("dims")
        return isinstance(dims, (tuple, list)) and len(dims) == rank and isinstance(dims[-1], int) \
            and dims[-1] % rank == rank - 1
    if key in ("unsqueeze", torch.unsqueeze):
        dim = args[0] if args else node.kwargs.get("dim")
        return isinstance(dim, int) and dim % (rank + 1) != rank
    if key is operator.getitem:
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        return len(index) < rank and all(isinstance(i, (int, slice)) for i in index)
    if key in _REDUCE:
        return others(args[0] if args else node.kwargs.get("dim"))
    return False


def _is_stochastic_depth(target: object) -> bool:
    """torchvision's ``stochastic_depth`` (kept whole by ``torch.fx.wrap``, so the trace does not see its factor)."""
    return getattr(target, "__name__", "") == "stochastic_depth" \
        and getattr(target, "__module__", "").startswith("torchvision.ops")


def _channelwise(value: _Value, keeps_zero: bool, node: fx.Node) -> _Value:
    if value.zero and not keeps_zero:
        return dataclasses.replace(value, zero=False, why_not=_where(node))
    return dataclasses.replace(value)


def _broadcast_channels(other: tuple[int, ...], out: tuple[int, ...], last: bool = False) -> int:
    """How many channels a tensor of shape ``other`` holds when broadcast to ``out`` (1: the same for every channel),
    the channels being dimension 1 of ``out``, or its last dimension where ``last``."""
    if last:
        return other[-1] if other else 1
    axis = 1 - (len(out) - len(other))
    return other[axis] if 0 <= axis < len(other) else 1


def _group_names(spaces: _Spaces) -> dict[int, str]:
    """``{root space: group name}`` of the prunable spaces: the module path their writers share, else the first
    writer (writers are in graph order)."""
    roots = sorted({spaces.find(s) for s in range(len(spaces.parent))})
    prunable = [r for r in roots if r not in spaces.whole and spaces.writers[r] and r not in spaces.concatenated]
    names = {root: _common_path(spaces.writers[root]) for root in prunable}
    taken = [n for n in names.values() if n]
    for root, name in names.items():
        if not name or taken.count(name) > 1:
            names[root] = spaces.writers[root][0]
    return names


def _common_path(modules: list[str]) -> str:
    """The leading module path that all of ``modules`` share (``""``: none)."""
    common = []
    for column in zip(*(m.split(".") for m in modules)):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return ".".join(common)


def _concatenations(spaces: _Spaces, layers: dict[str, _Layer], groups: dict[int, str]
                    ) -> dict[int, tuple[str, list[tuple[str | None, int]]]]:
    """``{root space: (name, parts)}`` of the concatenations a layer reads or writes that have a prunable part; a
    part that is no group is ``(None, channels)``. One that layers write is named as a group is, after its writers
    (``"conv_stem"``); one that layers only read, after its first reader
    (``"features.denseblock1.denselayer2.norm1:input"``)."""
    found: dict[int, tuple[str, list[tuple[str | None, int]]]] = {}
    taken = set(groups.values())
    touched = [(name, spaces.find(side[0])) for name, entry in layers.items() for side in (entry.reads, entry.writes)
               if side]  # written and read by none (a sum left unused), its writers must still write it
    for name, root in touched:
        if root in spaces.concatenated and root not in found and root not in spaces.whole:
            parts = [(groups.get(spaces.find(part)), n) for part, n in spaces.concatenated[root]]
            if any(group is not None for group, _ in parts):
                writers = spaces.writers[root]
                base = (_common_path(writers) or writers[0]) if writers else f"{name}:input"
                unique, n = base, 1
                while unique in taken:  # a group, or a module read so, may be named so too
                    unique, n = f"{base}:{n}" if writers else f"{name}:input{n}", n + 1
                taken.add(unique)
                found[root] = (unique, parts)
    return found


def _width(modules: dict[str, nn.Module], spaces: _Spaces, root: int) -> int:
    if root in spaces.widths:
        return spaces.widths[root]
    writer = spaces.writers[root][0]
    module = modules[writer]
    if writer in spaces.attention:  # an attention's heads' features
        return _head_width(module)
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _head_width(module: nn.Module) -> int:
    """The features a head of an attention module runs at: its ``head_dim`` (timm's ``WindowAttention`` keeps none:
    its ``qkv``'s outputs per head slice), or the kept features of maskprop's narrow attention (whose ``head_dim`` stays
    the full width's)."""
    if isinstance(module, SparseAttention):
        return module.head_width
    if hasattr(module, "head_dim"):
        return module.head_dim
    return module.dim_head if hasattr(module, "dim_head") else module.qkv.out_features // (3 * module.num_heads)


def _why_whole(spaces: _Spaces, layers: dict[str, _Layer], modules: dict[str, nn.Module], limit: int = 3) -> str:
    """The widest spaces left whole (written by a layer), and why."""
    whole = [(root, why) for root, why in spaces.whole.items() if spaces.writers.get(root)]
    if not whole:
        return "none"
    whole.sort(key=lambda item: -_width(modules, spaces, item[0]))
    shown = "; ".join(f"{spaces.writers[r][0]!r} ({_width(modules, spaces, r)} channels): {why}"
                      for r, why in whole[:limit])
    more = f"; and {len(whole) - limit} more" if len(whole) > limit else ""
    return f"{shown}{more}"


def _replace(model: nn.Module, modules: dict[str, nn.Module], layers: dict[str, _Layer], spaces: _Spaces,
             groups: dict[int, str]) -> dict[str, nn.Module]:
    """Put maskprop's layer in place of every conv, BatchNorm and linear layer that reads or writes a group; the new
    layers by path (``nn.MultiheadAttention``'s projections, which its module does not call, are not put in the
    model: its :class:`~maskprop.sparse.SparseMultiheadAttention` holds them)."""

    def group(found: list[int]) -> str | None:  # a layer reads (writes) one space: the trace joined its calls'
        return groups.get(spaces.find(found[0])) if found else None

    replaced: dict[str, nn.Module] = {}
    for name, entry in layers.items():
        old = modules[name]
        in_group, out_group = group(entry.reads), group(entry.writes)
        if entry.kind in ("ln", "gn", "bn") and in_group is None:  # a norm of channels never pruned stays as it is
            continue
        if entry.kind == "ln":
            new = _sparse_norm(old, in_group)
        elif entry.kind == "gn":
            fused = dict(act=old.act, drop=old.drop) if _is_group_norm_act(old) else {}
            with torch.device("meta"):
                new = (SparseGroupNormAct if fused else SparseGroupNorm)(
                    old.num_groups, old.num_channels, eps=old.eps, affine=old.affine, group=in_group, **fused)
        elif entry.kind == "bn":
            fused = dict(act=old.act, drop=old.drop) if _is_batch_norm_act(old) else {}
            with torch.device("meta"):
                new = (SparseBatchNormAct2d if fused else SparseBatchNorm2d)(
                    old.num_features, group=in_group, eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats, **fused)
        elif in_group is None and out_group is None:
            continue
        else:
            masks = out_group is not None and not (entry.nodes and all(  # an attention's qkv has no node: it masks
                _normalised_by(node, out_group, layers, spaces, groups) for node in entry.nodes))
            with torch.device("meta"):
                if isinstance(old, nn.Conv2d):
                    if entry.kind == "depthwise":
                        in_group = out_group
                    features = group([entry.features]) if entry.kind == "grouped" and in_group is not None else None
                    new = SparseConv2d(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                                       padding=old.padding, dilation=old.dilation, groups=old.groups,
                                       bias=old.bias is not None, padding_mode=old.padding_mode, in_group=in_group,
                                       out_group=out_group, mask_output=masks, weight_in_group=features)
                else:
                    positions = next(iter(entry.positions)) if in_group is not None else 1
                    new = SparseLinear(old.in_features, old.out_features, bias=old.bias is not None,
                                       in_group=in_group, out_group=out_group, mask_output=masks,
                                       in_positions=positions)
        new.load_state_dict(old.state_dict(keep_vars=True), assign=True)
        new.train(old.training)
        _put(model, old, new)
        replaced[name] = new
    return replaced


def _sparse_attention(old: nn.Module, group: str, qkv: nn.Module, proj: nn.Module) -> SparseAttention:
    """maskprop's attention in place of timm's or torch's ``old``, running maskprop's ``qkv`` and ``proj`` (holding
    ``old``'s parameters) and holding timm's other modules."""
    if isinstance(old, nn.MultiheadAttention):
        new = SparseMultiheadAttention(qkv, proj, old.num_heads, old.head_dim, group, dropout=old.dropout,
                                       batch_first=old.batch_first)
    elif _of_class(old, "timm.models.beit", "Attention"):  # as _is_timm_beit_attention accepted it
        new = SparseBeitAttention(qkv, proj, old.num_heads, _head_width(old), group, q_bias=old.q_bias,
                                  v_bias=old.v_bias, relative_position_bias_table=old.relative_position_bias_table,
                                  relative_position_index=old.relative_position_index,
                                  window_size=old.window_size if old.relative_position_bias_table is not None else None,
                                  qkv_bias_separate=bool(getattr(old, "qkv_bias_separate", False)),
                                  attn_drop=old.attn_drop, proj_drop=old.proj_drop)
    elif _of_class(old, "timm.models.swin_transformer_v2", "WindowAttention"):
        new = SparseWindowAttentionV2(qkv, proj, old.num_heads, _head_width(old), group, q_bias=old.q_bias,
                                      v_bias=old.v_bias, logit_scale=old.logit_scale, cpb_mlp=old.cpb_mlp,
                                      relative_coords_table=old.relative_coords_table,
                                      relative_position_index=old.relative_position_index,
                                      window_size=old.window_size,
                                      pretrained_window_size=getattr(old, "pretrained_window_size", (0, 0)),
                                      qkv_bias_separate=bool(getattr(old, "qkv_bias_separate", False)),
                                      attn_drop=old.attn_drop, proj_drop=old.proj_drop)
    elif _of_class(old, "torchvision.models.swin_transformer", "ShiftedWindowAttentionV2"):
        new = SparseShiftedWindowAttentionV2(qkv, proj, old.num_heads, _head_width(old), group,
                                             logit_scale=old.logit_scale, cpb_mlp=old.cpb_mlp,
                                             relative_coords_table=old.relative_coords_table,
                                             relative_position_index=old.relative_position_index,
                                             window_size=old.window_size, shift_size=old.shift_size,
                                             attention_dropout=old.attention_dropout, dropout=old.dropout)
    elif _of_class(old, "torchvision.models.maxvit", "RelativePositionalMultiHeadAttention"):
        new = SparseRelativePositionalAttention(qkv, proj, old.n_heads, old.head_dim, group,
                                                relative_position_bias_table=old.relative_position_bias_table,
                                                relative_position_index=old.relative_position_index,
                                                max_seq_len=old.max_seq_len, scale=old.scale_factor)
    elif _of_class(old, "timm.models.maxxvit", "AttentionCl") or _is_timm_attention_2d(old):  # as accepted
        kind = SparseAttention2d if _is_timm_attention_2d(old) else SparseAttentionCl
        new = kind(qkv, proj, old.num_heads, old.dim_head, group, rel_pos=old.rel_pos, head_first=old.head_first,
                   attn_drop=old.attn_drop, proj_drop=old.proj_drop)
    elif _is_shifted_window_attention_class(old):  # as _is_torchvision_window_attention accepted it
        new = SparseShiftedWindowAttention(qkv, proj, old.num_heads, _head_width(old), group,
                                           relative_position_bias_table=old.relative_position_bias_table,
                                           relative_position_index=old.relative_position_index,
                                           window_size=old.window_size, shift_size=old.shift_size,
                                           attention_dropout=old.attention_dropout, dropout=old.dropout)
    elif _is_window_attention_class(old):  # in the form _is_timm_window_attention accepted, its layers converted
        new = SparseWindowAttention(qkv, proj, old.num_heads, _head_width(old), group,
                                    relative_position_bias_table=old.relative_position_bias_table,
                                    relative_position_index=old.relative_position_index, window_size=old.window_size,
                                    attn_drop=old.attn_drop, proj_drop=old.proj_drop)
    else:
        norms = {n: _sparse_norm(m, group if n != "norm" else proj.in_group) if _is_last_dim_norm(m) else m
                 for n in ("q_norm", "k_norm", "norm") if (m := getattr(old, n, None)) is not None}
        new = SparseAttention(qkv, proj, old.num_heads, old.head_dim, group, attn_drop=old.attn_drop,
                              proj_drop=old.proj_drop, **norms)
    return new.train(old.training)


def _sparse_norm(old: nn.Module, group: str | None) -> SparseLastDimNorm:
    """maskprop's LayerNorm (RMSNorm) of ``group`` in place of the LayerNorm (RMSNorm) ``old``, holding its
    parameters (and its ``eps``: timm's ``RmsNorm``'s own default, 1e-6, or ``nn.RMSNorm``'s ``None``)."""
    with torch.device("meta"):
        if _is_rms_norm(old):
            new = SparseRMSNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                                group=group)
        else:
            new = SparseLayerNorm(old.normalized_shape, eps=old.eps, elementwise_affine=old.elementwise_affine,
                                  bias=old.bias is not None, group=group)
    new.load_state_dict(old.state_dict(keep_vars=True), assign=True)
    return new.train(old.training)


def _normalised_by(node: fx.Node, group: str, layers: dict[str, _Layer], spaces: _Spaces,
                   groups: dict[int, str]) -> bool:
    """The layer's output at ``node`` goes to one BatchNorm or GroupNorm of its group and nowhere else (which masks
    it)."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return False
    entry = layers.get(users[0].target)
    return entry is not None and entry.kind in ("bn", "gn") and groups.get(spaces.find(entry.reads[0])) == group


def _put(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """``new`` wherever ``model`` holds ``old`` (under every name, if it is shared)."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):  # every name: named_children lists a child once
            if child is old:
                setattr(parent, child_name, new)
