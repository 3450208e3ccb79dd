"""Running a model as one channel subnetwork: masks, their validation, and the ``use_mask`` context."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .gather import flat_index
from .groups import channel_groups
from .modules import SparseConv2d, SparseLinear, SparseModule

Mask = dict[str, Tensor]
MODES = ("compact", "masked")


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_mask(mask: Mapping[str, Tensor], groups: Mapping[str, int]) -> list[int]:
    """Raise a one-line ``ValueError`` unless ``mask`` is a valid mask for ``groups``; return the kept counts.

    A valid mask has exactly the model's groups as keys, and for each a 1-d bool tensor with one entry per channel
    that keeps at least one channel. An empty group is an error rather than a silent zero network: a sampler must
    decide which channel survives (``maskprop.vrpge.ChannelScores.sample`` keeps the highest-scoring one).

    Returns:
        The number of kept channels of each group, in the order of ``groups``.
    """
    if not isinstance(mask, Mapping):
        raise TypeError(f"a mask is a dict of group name -> bool tensor, got {type(mask).__name__}")
    unknown = [g for g in mask if g not in groups]
    if unknown:
        raise ValueError(
            f"mask has unknown group(s) {_names(unknown)}; this model's groups are {_names(list(groups))} "
            "(was the mask made for another model?)"
        )
    missing = [g for g in groups if g not in mask]
    if missing:
        raise ValueError(f"mask is missing group(s) {_names(missing)}; a mask names every group of the model")
    for name, size in groups.items():
        m = mask[name]
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != (size,):
            got = f"{tuple(m.shape)} {m.dtype}" if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"mask for group {name!r} is {got}; expected a bool tensor of shape ({size},)")
    counts = kept_counts([mask[g] for g in groups])
    empty = [g for g, count in zip(groups, counts) if count == 0]
    if empty:
        raise ValueError(f"mask keeps no channel of group(s) {_names(empty)}; every group must keep at least one")
    return counts


def _on_host(masks: list[Tensor]) -> Tensor:
    """The masks concatenated into one host tensor."""
    return torch.cat([m if m.device.type == "cpu" else m.cpu() for m in masks])


def kept_counts(masks: list[Tensor]) -> list[int]:
    """Number of kept channels of each 1-d bool mask, with a fixed number of tensor calls whatever their count."""
    if not masks:
        return []
    last = [end - 1 for end in itertools.accumulate(m.numel() for m in masks)]
    totals = _on_host(masks).cumsum(0, dtype=torch.int64)[last].tolist()
    return [b - a for a, b in zip([0, *totals[:-1]], totals)]


def kept_indices(masks: list[Tensor], counts: list[int]) -> list[Tensor]:
    """Sorted kept positions of each mask (host tensors), from one ``nonzero`` over all of them."""
    if not masks:
        return []
    starts = torch.tensor([0, *itertools.accumulate(m.numel() for m in masks[:-1])])
    positions = _on_host(masks).nonzero().view(-1)
    positions -= starts.repeat_interleave(torch.tensor(counts), output_size=positions.numel())
    return list(positions.split(counts))


class ExecutionState:
    """Index sets of one mask, prepared once so the layers' forward does no index arithmetic.

    The index sets are built on the CPU and moved to the model's device in one copy; the flat weight-row indices are
    built from them on that device. ``index(group)`` is ``None`` for a group that is kept whole (or never pruned), so
    a fully kept group runs the dense kernel with no gather at all.
    """

    def __init__(
        self, mask: Mapping[str, Tensor], model: nn.Module, mode: str, device: torch.device,
        counts: list[int] | None = None,
    ) -> None:
        """``counts``: the kept count of each mask entry in the order of ``mask`` (as :func:`check_mask` returns
        them), or ``None`` to count here."""
        self.mode = mode
        names = list(mask)
        masks = [mask[g] for g in names]
        counts = kept_counts(masks) if counts is None else counts
        kept: dict[str, Tensor | None] = {
            g: (None if count == m.numel() else index)
            for g, m, count, index in zip(names, masks, counts, kept_indices(masks, counts))
        }
        self._kept = kept
        self._flat: dict[tuple[str | None, str | None], Tensor] = {}
        self.masks: dict[str, Tensor] = {}
        if mode == "masked":
            self.masks = {g: m.to(device, non_blocking=True) for g, m in mask.items() if kept[g] is not None}
            self._mask_values: dict[tuple[str, torch.dtype], Tensor] = {}
            return
        gathered = [g for g, k in kept.items() if k is not None]
        if device.type != "cpu" and gathered:  # one host-to-device copy of the index sets
            moved = torch.cat([kept[g] for g in gathered]).to(device).split([kept[g].numel() for g in gathered])
            kept.update(zip(gathered, moved))
        # Flat weight-row indices for every (in_group, out_group) pair whose both sides are gathered, built where the
        # weights are: for ResNet-50 they are 3.4M entries at keep 0.5, too many to build on the host and copy over.
        flat: dict[tuple[str | None, str | None], Tensor] = {}
        for module in model.modules():
            if isinstance(module, (SparseConv2d, SparseLinear)):
                key = (module.in_group, module.out_group)
                out_index, in_index = self.index(module.out_group), self.index(module.in_group)
                if key not in flat and out_index is not None and in_index is not None:
                    flat[key] = flat_index(out_index, in_index, module.weight.shape[1])
        self._flat = flat

    def index(self, group: str | None) -> Tensor | None:
        """Kept channel indices of ``group``; ``None`` when all its channels are kept or it is never pruned."""
        return None if group is None else self._kept[group]

    def flat(self, in_group: str | None, out_group: str | None) -> Tensor | None:
        return self._flat.get((in_group, out_group))

    def apply_mask(self, group: str | None, y: Tensor) -> Tensor:
        """``y`` with the dropped channels of ``group`` (dim 1) set to zero (``masked`` mode)."""
        mask = self.masks.get(group) if group is not None else None
        if mask is None:
            return y
        key = (group, y.dtype)
        values = self._mask_values.get(key)
        if values is None:
            values = mask.to(y.dtype).view(-1, *([1] * (y.dim() - 2)))
            self._mask_values[key] = values
        return y * values


@contextlib.contextmanager
def use_mask(model: nn.Module, mask: Mapping[str, Tensor] | None, mode: str = "compact") -> Iterator[nn.Module]:
    """Run ``model`` as the subnetwork ``mask`` inside the ``with`` block.

    Args:
        model: a maskprop model (its layers are :mod:`maskprop.sparse.modules` layers).
        mask: group name -> bool tensor (one entry per channel); ``None`` runs the dense model.
        mode: ``"compact"`` (gathered channels: the cost follows the kept channels) or ``"masked"`` (dense kernels,
            mask after BatchNorm: the reference semantics).

    Example:
        >>> with maskprop.use_mask(model, mask):
        ...     loss = criterion(model(images), labels)
        >>> loss.backward()  # gradients land in the full-size parameters, zero for dropped channels
    """
    if mode not in MODES:
        raise ValueError(f"unknown execution mode {mode!r}; expected one of {MODES}")
    if mask is None:
        yield model
        return
    groups = channel_groups(model)
    counts = check_mask(mask, groups)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    state = ExecutionState({g: mask[g] for g in groups}, model, mode, device, counts)
    layers = [m for m in model.modules() if isinstance(m, SparseModule)]
    previous = [m._state for m in layers]
    for m in layers:
        m._state = state
    try:
        yield model
    finally:
        for m, p in zip(layers, previous):
            m._state = p
