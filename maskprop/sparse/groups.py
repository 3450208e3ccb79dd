"""Channel groups: which output channels are kept or dropped together.

Every prunable conv-BN unit writes its output into a named group. Channels that meet in a residual add share one
group (a ResNet stage's stem or projection output and all its block outputs), so every add happens on one index set.
A layer whose group is ``None`` is never pruned (the image input, the classifier's outputs, and residual streams when
a model is built with ``prune_residual=False``). A layer that reads channels of several groups side by side (the
``torch.cat`` of a DenseNet block) reads a concatenated group (:func:`concatenate_groups`), and a layer whose output
is added to such a concatenation writes it (GhostNet's residual streams); masks name its parts.
"""

from __future__ import annotations

import itertools
import numbers
import operator
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .attention import SparseAttention
from .groupnorm import SparseGroupNorm
from .layernorm import SparseChannelNorm
from .modules import SparseBatchNorm2d, SparseConv2d, SparseLinear

Part = tuple[str | None, int]
"""One part of a concatenated group: a group (``None``: channels never pruned) and its number of channels."""

_CONCATENATIONS = "_maskprop_concatenations"


def concatenate_groups(model: nn.Module, name: str, parts: Sequence[Part]) -> str:
    """Declare the group ``name``: the channels of ``parts`` side by side, as ``torch.cat(..., dim=1)`` lays them out.

    A layer whose input is such a concatenation reads ``name`` (its ``in_group``; a BatchNorm on it, its ``group``):
    in a subnetwork its input is the concatenation of the parts' kept channels, in order, which is what the forward's
    own ``torch.cat`` makes of the parts' compact tensors. A layer whose output is added to the concatenation writes
    ``name`` (its ``out_group``): its output channels are that same index set. A concatenated group has no channels
    of its own: masks, scores and budgets name its parts. DenseNet's dense blocks, Inception's branches and CSP
    stages read such groups, GhostNet's stem and shortcut convs write them; :func:`maskprop.make_prunable` declares
    them.

    Args:
        model: The model whose layers read or write ``name`` (the declaration is kept on it, a plain attribute).
        name: The group's name (not the name of a group of channels of its own).
        parts: ``(group, channels)`` in channel order; a part whose group is ``None`` is never pruned. At least one
            part names a group.

    Returns:
        ``name``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a concatenated group's name is a non-empty string, got {name!r}")
    parts = tuple(_part(name, p) for p in parts)
    if all(group is None for group, _ in parts):
        raise ValueError(f"concatenated group {name!r} has no part that names a group; expected at least one (a layer "
                         f"reading channels that are never pruned reads in_group=None)")
    declared = dict(getattr(model, _CONCATENATIONS, {}))
    if declared.setdefault(name, parts) != parts:
        raise ValueError(f"concatenated group {name!r} is declared twice on {type(model).__name__}, as "
                         f"{declared[name]} and as {parts}; expected one name per concatenation")
    setattr(model, _CONCATENATIONS, declared)
    return name


def _part(name: str, part: object) -> Part:
    """``part`` as ``(group or None, channels)``: any pair of a name (or ``None``) and a positive integer."""
    try:
        group, channels = part
        channels = 0 if isinstance(channels, bool) else operator.index(channels)
    except (TypeError, ValueError):
        group, channels = None, 0
    if not (group is None or isinstance(group, str)) or channels < 1:
        raise ValueError(f"part {part!r} of {name!r} is not a (group name or None, channels > 0) pair")
    return group, channels


def concatenations(model: nn.Module) -> dict[str, tuple[Part, ...]]:
    """``{name: parts}`` of the concatenated groups declared on ``model`` or any of its submodules (a wrapper such as
    DDP sees its module's), see :func:`concatenate_groups`."""
    return declared_in(model.modules())


def declared_in(modules: Iterable[nn.Module]) -> dict[str, tuple[Part, ...]]:
    """The concatenated groups declared on ``modules`` (:func:`concatenations` of a model, from its module list)."""
    found: dict[str, tuple[Part, ...]] = {}
    for module in modules:
        for name, parts in getattr(module, _CONCATENATIONS, {}).items():
            if found.setdefault(name, parts) != parts:
                raise ValueError(f"concatenated group {name!r} is declared twice, as {found[name]} and as {parts}; "
                                 f"expected one declaration per name")
    return found


def drop_concatenations(model: nn.Module) -> None:
    """Remove every concatenated group declared on ``model`` and its submodules (its layers name no group any more:
    a materialized subnetwork, a sparse-backward conversion)."""
    for module in model.modules():
        if _CONCATENATIONS in module.__dict__:
            delattr(module, _CONCATENATIONS)


def concatenated_counts(counts: Mapping[str, int], concatenated: Mapping[str, Sequence[Part]]) -> dict[str, int]:
    """``counts`` (channels per group) and the channels of each concatenated group: the sum over its parts (a part of
    no group, or of a group ``counts`` lacks, counts whole)."""
    extended = dict(counts)
    for name, parts in concatenated.items():
        extended[name] = sum(n if group is None else counts.get(group, n) for group, n in parts)
    return extended


def concatenated_masks(mask: Mapping[str, Tensor], concatenated: Mapping[str, Sequence[Part]]) -> dict[str, Tensor]:
    """``mask`` and the mask of each concatenated group: its parts' masks side by side (a part of no group keeps
    every channel)."""
    extended = dict(mask)
    for name, parts in concatenated.items():
        like = next(mask[g] for g, _ in parts if g is not None)
        extended[name] = torch.cat([like.new_ones(n) if g is None else mask[g] for g, n in parts])
    return extended


def channel_groups(model: nn.Module) -> dict[str, int]:
    """Ordered ``{group name: number of channels}`` of a model, in the order the groups are first written.
    Concatenated groups (:func:`concatenate_groups`) are not among them: they have no channels of their own.

    Raises:
        ValueError: if two layers disagree on the size of a group, a layer reads a group no layer writes, or a
            concatenated group does not fit its parts, its readers or its writers (a model-definition bug).
    """
    groups: dict[str, int] = {}
    concatenated = concatenations(model)

    def add(name: str | None, size: int, where: str) -> None:
        if name is None:
            return
        if groups.setdefault(name, size) != size:
            raise ValueError(f"layer {where!r} gives group {name!r} {size} channels, but it has {groups[name]}")

    def fits(name: str, size: int, where: str, verb: str = "reads") -> None:
        width = sum(n for _, n in concatenated[name])
        if size != width:
            raise ValueError(f"layer {where!r} {verb} concatenated group {name!r} as {size} channels, but its parts "
                             f"have {width}")

    on_concatenations: list[tuple[str, int, str, str]] = []  # layers writing or normalising one, after its parts
    for where, module in model.named_modules():
        if isinstance(module, SparseAttention):  # its heads' features: a group its qkv writes once per head slice
            add(module.group, module.head_width, where)
        elif isinstance(module, SparseConv2d) and module.groups > 1 and not module.depthwise:
            _check_grouped(module, where, concatenated)  # the features of its convolution groups: groups
            add(module.weight_in_group, module.weight.shape[1], where)
            if module.out_group is not None:
                add(concatenated[module.out_group][0][0], module.out_channels // module.groups, where)
                on_concatenations.append((module.out_group, module.out_channels, where, "writes"))
        elif isinstance(module, (SparseConv2d, SparseLinear, SparseBatchNorm2d)):
            norm = isinstance(module, SparseBatchNorm2d)
            name, size = (module.group, module.num_features) if norm else (module.out_group, module.weight.shape[0])
            if name in concatenated:
                on_concatenations.append((name, size, where, "reads" if norm else "writes"))
            else:
                add(name, size, where)
    for name, _, where, verb in on_concatenations:  # a group that only a layer writing a concatenation of it writes
        for group, size in concatenated[name] if verb == "writes" else ():  # (fc1 of a chunk's parts: GluMlp's)
            if group is not None and group not in groups and group not in concatenated:
                add(group, size, where)
    for name, parts in concatenated.items():  # before its readers: a part's error names the part
        for group, size in parts:
            if group is not None and groups.get(group) != size:
                has = "no layer writes it" if group not in groups else f"it has {groups[group]}"
                also = "; it is a concatenated group: list its parts" if group in concatenated else ""
                raise ValueError(f"concatenated group {name!r} takes {size} channels of group {group!r}, but {has}"
                                 f"{also}")
    for name, size, where, verb in on_concatenations:
        fits(name, size, where, verb)
    for where, module in model.named_modules():  # inputs must read a group that some layer writes
        if isinstance(module, (SparseConv2d, SparseLinear, SparseChannelNorm)):
            name = module.group if isinstance(module, SparseChannelNorm) else module.in_group
            size = module.num_features if isinstance(module, SparseChannelNorm) else module.in_channels  # a linear
            # layer on a flattened map: in_features / in_positions
            if name is None:
                continue
            if isinstance(module, SparseGroupNorm) and module.num_groups > 1:
                _check_group_norm(module, where, concatenated)
            if name in concatenated:
                fits(name, size, where)
                continue
            if name not in groups:
                raise ValueError(f"layer {where!r} reads group {name!r} that no layer writes (if it reads a "
                                 f"torch.cat of groups, declare it: maskprop.sparse.concatenate_groups(model, "
                                 f"{name!r}, [(part, channels), ...]))")
            add(name, size, where)
    return groups


def _check_group_norm(norm: SparseGroupNorm, where: str, concatenated: Mapping[str, Sequence[tuple[str | None, int]]]
                      ) -> None:
    """A GroupNorm of ``G > 1`` groups reads ``G`` copies of one group side by side: each of its groups then keeps as
    many channels as the others, and a subnetwork is one GroupNorm of ``G`` groups on the kept channels."""
    parts = list(concatenated.get(norm.group, ()))
    width = norm.num_channels // norm.num_groups
    features = parts[0][0] if parts else None
    if features is None or parts != [(features, width)] * norm.num_groups:
        raise ValueError(f"layer {where!r} is a GroupNorm of {norm.num_groups} groups, but its group {norm.group!r} is "
                         f"{parts or 'no concatenated group'}; expected a concatenated group of {norm.num_groups} "
                         f"parts ({features or 'one group'!r}, {width}), the features each of its groups normalises")


def _check_grouped(conv: SparseConv2d, where: str, concatenated: Mapping[str, Sequence[tuple[str | None, int]]]
                   ) -> None:
    """A grouped convolution (not depthwise) reads and writes ``groups`` copies of one group each, or whole channels:
    each convolution group then keeps as many features as the others, and a subnetwork is one grouped convolution."""
    for side, name, features, channels in (("in_group", conv.in_group, conv.weight_in_group, conv.in_channels),
                                           ("out_group", conv.out_group, None, conv.out_channels)):
        if name is None:
            continue
        parts = list(concatenated.get(name, ()))
        features = features if features is not None else parts[0][0] if parts else None
        if features is None or parts != [(features, channels // conv.groups)] * conv.groups:
            raise ValueError(f"layer {where!r} is a convolution of {conv.groups} groups, but its {side} {name!r} is "
                             f"{parts or 'no concatenated group'}; expected a concatenated group of {conv.groups} "
                             f"parts ({features or 'one group'!r}, {channels // conv.groups}), the features each of "
                             f"its groups {'reads' if side == 'in_group' else 'writes'}")


class ChannelSparseModel(nn.Module):
    """Base class of maskprop's models: a ``nn.Module`` that knows its channel groups."""

    def channel_groups(self) -> dict[str, int]:
        """``{group name: number of channels}`` of every prunable group, in network order (computed once per model
        structure and cached, see :func:`maskprop.sparse.execution.model_plan`)."""
        from .execution import model_plan

        return dict(model_plan(self).groups)


def _check_group_sizes(groups: Mapping[str, int]) -> None:
    if not isinstance(groups, Mapping):
        hint = " (pass model.channel_groups())" if isinstance(groups, nn.Module) else ""
        raise TypeError(f"groups must be a mapping {{group name: number of channels}}{hint}, got "
                        f"{type(groups).__name__}")
    bad = next(((name, n) for name, n in groups.items()
                if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1), None)
    if bad is not None:
        raise ValueError(f"group {bad[0]!r} has {bad[1]!r} channels; expected a positive integer (groups come from "
                         f"model.channel_groups())")


def full_mask(groups: Mapping[str, int], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The mask that keeps every channel (runs the dense network).

    Args:
        groups: ``{group: channels}`` (``model.channel_groups()``).
        device: where the mask lives (default: the CPU).
    """
    _check_group_sizes(groups)
    return {g: torch.ones(n, dtype=torch.bool, device=device) for g, n in groups.items()}


def random_mask(
    groups: Mapping[str, int], keep_ratio: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Keep ``max(1, round(keep_ratio * n))`` channels chosen uniformly at random in every group (the random
    baseline's subnetwork, benchmarks, tests).

    Args:
        groups: ``{group: channels}`` (``model.channel_groups()``).
        keep_ratio: in ``(0, 1]``.
        generator: the source of randomness (default: torch's global one).
    """
    _check_group_sizes(groups)
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator is {type(generator).__name__}; expected a torch.Generator (e.g. "
                        f"torch.Generator().manual_seed(0)) or None")
    mask = {}
    for g, n in groups.items():
        kept = torch.randperm(n, generator=generator)[: max(1, round(keep_ratio * n))]
        m = torch.zeros(n, dtype=torch.bool)
        m[kept] = True
        mask[g] = m
    return mask


def count_kept(masks: Sequence[Tensor]) -> list[int]:
    """Kept channels of each 1-d bool mask, from one ``cumsum`` over all of them on the host (a fixed number of tensor
    calls whatever their number)."""
    if not masks:
        return []
    flat = torch.cat([m if m.device.type == "cpu" else m.cpu() for m in masks])
    last = [end - 1 for end in itertools.accumulate(m.numel() for m in masks)]
    totals = flat.cumsum(0, dtype=torch.int64)[last].tolist()
    return [b - a for a, b in zip([0, *totals[:-1]], totals)]


def kept_counts(mask: Mapping[str, Tensor | int]) -> dict[str, int]:
    """Number of kept channels per group: the one place maskprop counts them.

    Args:
        mask: group name -> bool tensor; an ``int`` value is a count already known (e.g. an aligned width) and is
            passed through.
    """
    names = [g for g, m in mask.items() if not isinstance(m, int)]
    counts = dict(zip(names, count_kept([mask[g] for g in names])))
    return {g: m if isinstance(m, int) else counts[g] for g, m in mask.items()}


def kept_ratio(mask: Mapping[str, Tensor | int] | None, groups: Mapping[str, int]) -> float:
    """Kept fraction of all the prunable channels of ``groups`` (1.0 for ``None``: the dense model)."""
    if mask is None:
        return 1.0
    return sum(kept_counts(mask).values()) / max(sum(groups[g] for g in mask), 1)


def aligned_width(kept: int, size: int, align: int) -> int:
    """``kept`` rounded up to a multiple of ``align``, but never past the group's ``size`` (padding stops there: a
    group of 12 channels keeping 5 runs 8 wide with ``align=8``, and 12 wide, not 16, when it keeps 9)."""
    return min(-(-kept // align) * align, size)


def check_align(align: object) -> int:
    """``align`` if it is a positive integer, else a one-line ``ValueError``."""
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise ValueError(f"align={align!r} is not a positive integer; expected the multiple kept widths are padded "
                         f"to (8 for GPU tensor cores, 1 for no padding)")
    return align
