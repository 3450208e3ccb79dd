"""Sparsifying functions SI_k: which output units of a layer propagate their gradient.

A sparsifier gets the output gradient ``dL/dh`` of one layer, shape ``(batch, n)`` or ``(batch, n, positions)``,
and optionally an ``offset`` of shape ``(n[, positions])`` that is added to every example (the MSBP memory share,
see :mod:`maskprop.sbp.layers`). It scores each unit by the magnitude ``|dL/dh + offset|`` summed over its
positions (one position for a linear layer, the spatial map of a conv channel) and returns the indices it keeps:

* a 1-D tensor of ``k`` indices, sorted ascending, when one index set serves the whole mini-batch ("unified");
* a 2-D tensor ``(batch, k)``, each row sorted ascending, when every example has its own index set.

Ties at the cut are broken deterministically: among equal scores the **lower unit index wins**, so the result
never depends on the internal order of ``torch.topk``. A NaN score counts as the largest possible score (it is
kept, so a diverging run shows its NaNs instead of hiding them).

The table :data:`SPARSIFIERS` maps the names accepted by the layers and by :func:`maskprop.sbp.convert` to
these functions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Sparsifier = Callable[[Tensor, int, torch.Generator | None, Tensor | None], Tensor]


def top_k_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of every row, ties broken towards the lower index.

    Args:
        scores: ``(rows, n)`` tensor of scores.
        k: how many entries to keep per row, ``1 <= k <= n``.

    Returns:
        ``(rows, k)`` long tensor, each row sorted ascending.
    """
    rows, n = scores.shape
    if k == n:
        return torch.arange(n, device=scores.device).expand(rows, n)
    scores = torch.nan_to_num(scores, nan=float("inf"))
    values, indices = torch.topk(scores, k + 1, dim=1)
    if not bool((values[:, k - 1] == values[:, k]).any()):  # no tie at the cut: the top-k set is unique
        return indices[:, :k].sort(dim=1).values
    # The k-th largest value of each row is the cut; everything strictly above it is kept, and of the entries
    # equal to it only the first (k - #above) in index order, which makes the tie rule independent of topk.
    cut = values[:, k - 1 : k]
    above = scores > cut
    tied = scores == cut
    room = k - above.sum(dim=1, keepdim=True)
    kept = above | (tied & (tied.cumsum(dim=1) <= room))
    return kept.nonzero()[:, 1].view(rows, k)


# On CPU a full-size temporary |g| of a large gradient is expensive (an allocation of tens of MiB is served by
# mmap and page-faults on every step), so above _CHUNK_ABOVE bytes the batch-summed scores are accumulated over
# chunks of about _CHUNK_ELEMENTS elements through one scratch tensor. Smaller gradients are done in one go.
_CHUNK_ABOVE = 16 << 20
_CHUNK_ELEMENTS = 1 << 20


def _units_innermost(t: Tensor) -> bool:
    """Whether the units (dim 1) of a ``(batch, n, positions)`` tensor are its fastest dimension: a channels_last
    conv gradient seen as ``(batch, channels, H*W)``."""
    return t.dim() == 3 and t.shape[2] > 1 and t.stride(1) == 1


def take_units(t: Tensor, index: Tensor) -> Tensor:
    """``t.index_select(1, index)`` for a ``(batch, n[, positions])`` tensor, in the layout of ``t``.

    On a channels_last gradient (units innermost) ``index_select`` along dim 1 would first copy the whole tensor into
    the contiguous layout. Here the ``(batch x positions, n)`` rows view is gathered with ``torch.gather`` (several
    times faster, BENCHMARKS.md, "Implementation choices"), and the result stays channels_last.
    """
    if _units_innermost(t):
        batch, units, positions = t.shape
        rows = t.transpose(1, 2).reshape(batch * positions, units)  # a view for channels_last memory
        kept = torch.gather(rows, 1, index.expand(rows.shape[0], -1))
        return kept.view(batch, positions, -1).transpose(1, 2)
    return t.index_select(1, index)


def batch_sum(t: Tensor) -> Tensor:
    """``t.sum(dim=0)`` in the layout of one example of ``t``.

    A reduction over the batch of a channels_last gradient into a default (contiguous) output runs against the
    grain of the input, many times slower (BENCHMARKS.md, "Implementation choices"). Writing into an output laid
    out like ``t[0]`` keeps input and output in step.
    """
    out = torch.empty_like(t[0])
    return torch.sum(t, dim=0, out=out)


def unit_scores(grad: Tensor, per_example: bool = True, offset: Tensor | None = None) -> Tensor:
    """Unit magnitudes ``|grad + offset|`` of a ``(batch, n[, positions])`` gradient, summed over the positions
    (and over the batch unless ``per_example``).

    Args:
        grad: the output gradient.
        per_example: keep the batch dimension.
        offset: ``(n[, positions])`` added to every example before taking magnitudes; None adds nothing.

    Returns:
        ``(batch, n)`` when ``per_example``, else ``(n,)``.
    """
    position_dims = tuple(range(2, grad.dim()))
    if per_example:
        magnitude = (grad if offset is None else grad + offset).abs()
        return magnitude.sum(dim=position_dims) if position_dims else magnitude
    dims = (0, *position_dims)
    rows = max(1, _CHUNK_ELEMENTS // max(1, grad[0].numel()))
    if grad.device.type != "cpu" or grad.numel() * grad.element_size() < _CHUNK_ABOVE or rows >= grad.shape[0]:
        return (grad if offset is None else grad + offset).abs().sum(dim=dims)
    scratch = torch.empty_like(grad[:rows])  # in the layout of the gradient, so the copy below runs with its grain
    total = None
    for chunk in grad.split(rows):
        part = scratch[: chunk.shape[0]]
        if offset is None:
            torch.abs(chunk, out=part)
        else:
            torch.add(chunk, offset, out=part).abs_()
        part = part.sum(dim=dims)
        total = part if total is None else total.add_(part)
    return total


def topk(grad: Tensor, k: int, generator: torch.Generator | None = None, offset: Tensor | None = None) -> Tensor:
    """Per-example top-k, the original meProp (meProp paper eqs. (5)-(6); MSBP paper Definition 4).

    Every example keeps its own ``k`` largest units, so the weight gradient touches the union of the sets.
    """
    return top_k_indices(unit_scores(grad, per_example=True, offset=offset), k)


def topk_unified(
    grad: Tensor, k: int, generator: torch.Generator | None = None, offset: Tensor | None = None
) -> Tensor:
    """Unified top-k: one index set per mini-batch from the magnitudes summed over the batch (meProp section 4.8).

    The weight gradient then has exactly ``k`` non-zero rows and the backward runs as dense products on the
    gathered ``k`` columns.
    """
    return top_k_indices(unit_scores(grad, per_example=False, offset=offset).unsqueeze(0), k)[0]


def randomk(
    grad: Tensor, k: int, generator: torch.Generator | None = None, offset: Tensor | None = None
) -> Tensor:
    """Random-k: ``k`` units drawn uniformly without replacement, one set per mini-batch (an SI_k of the MSBP paper).

    Kept entries are not rescaled (SI_k(v) = I_k(v) * v, MSBP paper Definition 3). ``generator`` makes the draw
    reproducible; its device is used for the draw.
    """
    n = grad.shape[1]
    device = generator.device if generator is not None else grad.device
    drawn = torch.randperm(n, generator=generator, device=device)[:k]
    return drawn.sort().values.to(grad.device)


SPARSIFIERS: dict[str, Sparsifier] = {
    "topk": topk,
    "topk_unified": topk_unified,
    "randomk": randomk,
}


def get_sparsifier(name: str) -> Sparsifier:
    """The sparsifier registered under ``name`` in :data:`SPARSIFIERS`.

    Raises:
        ValueError: the name is unknown.
    """
    if name not in SPARSIFIERS:
        raise ValueError(f"unknown sparsifier {name!r}; expected one of {sorted(SPARSIFIERS)}")
    return SPARSIFIERS[name]
