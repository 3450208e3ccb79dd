"""Channel groups: which output channels are kept or dropped together.

Every prunable conv-BN unit writes its output into a named group. Channels that meet in a residual add share one
group (a ResNet stage's stem or projection output and all its block outputs), so every add happens on one index set.
A layer whose group is ``None`` is never pruned (the image input, the classifier's outputs, and residual streams when
a model is built with ``prune_residual=False``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .modules import SparseBatchNorm2d, SparseConv2d, SparseLinear


def channel_groups(model: nn.Module) -> dict[str, int]:
    """Ordered ``{group name: number of channels}`` of a model, in the order the groups are first written.

    Raises:
        ValueError: if two layers disagree on the size of a group (a model-definition bug).
    """
    groups: dict[str, int] = {}

    def add(name: str | None, size: int, where: str) -> None:
        if name is None:
            return
        if groups.setdefault(name, size) != size:
            raise ValueError(f"layer {where!r} gives group {name!r} {size} channels, but it has {groups[name]}")

    for where, module in model.named_modules():
        if isinstance(module, SparseConv2d):
            add(module.out_group, module.out_channels, where)
        elif isinstance(module, SparseLinear):
            add(module.out_group, module.out_features, where)
        elif isinstance(module, SparseBatchNorm2d):
            add(module.group, module.num_features, where)
    for where, module in model.named_modules():  # inputs must read a group that some layer writes
        if isinstance(module, (SparseConv2d, SparseLinear)) and module.in_group is not None:
            size = module.weight.shape[1]
            if module.in_group not in groups:
                raise ValueError(f"layer {where!r} reads group {module.in_group!r} that no layer writes")
            add(module.in_group, size, where)
    return groups


class ChannelSparseModel(nn.Module):
    """Base class of maskprop's models: a ``nn.Module`` that knows its channel groups."""

    def channel_groups(self) -> dict[str, int]:
        """``{group name: number of channels}`` of every prunable group, in network order."""
        return channel_groups(self)


def full_mask(groups: dict[str, int], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """The mask that keeps every channel (runs the dense network)."""
    return {g: torch.ones(n, dtype=torch.bool, device=device) for g, n in groups.items()}


def random_mask(
    groups: dict[str, int], keep_ratio: float, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Keep ``max(1, round(keep_ratio * n))`` channels chosen uniformly at random in every group (benchmarks, tests)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    mask = {}
    for g, n in groups.items():
        kept = torch.randperm(n, generator=generator)[: max(1, round(keep_ratio * n))]
        m = torch.zeros(n, dtype=torch.bool)
        m[kept] = True
        mask[g] = m
    return mask


def kept_counts(mask: dict[str, Tensor]) -> dict[str, int]:
    """Number of kept channels per group."""
    return {g: int(m.sum()) for g, m in mask.items()}
