"""Keep probabilities of every channel group, stored as one flat parameter (docs/methods.md, section 1)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .projection import project_scores

_EXTRA_STATE_KEY = "_extra_state"  # the key nn.Module uses for get_extra_state()


class ExpectedKept(NamedTuple):
    """Expected number of kept channels under ``m ~ Bernoulli(s)``."""

    per_group: dict[str, float]
    """``sum_j s_j`` over the channels of each group."""
    ratio: float
    """``sum_j s_j / number of channels`` over the whole network."""


class ScoreStatistics(NamedTuple):
    """How far the keep probabilities have settled (docs/methods.md, "Diagnostics of a search")."""

    near_zero: float
    """Share of the channels with ``s_j <= margin``."""
    near_one: float
    """Share of the channels with ``s_j >= 1 - margin``."""
    entropy: float
    """Mean over the channels of the Bernoulli entropy ``-s ln s - (1 - s) ln(1 - s)``, in nats (``ln 2`` at 0.5, 0 at
    0 and 1): the entropy of ``p(m|s)`` per channel, since the channels are independent."""


@torch.no_grad()
def score_statistics(s: Tensor, margin: float = 0.05) -> ScoreStatistics:
    """The shares of keep probabilities within ``margin`` of 0 and of 1, and their mean Bernoulli entropy.

    Raises:
        ValueError: ``s`` is empty, or ``margin`` is outside ``[0, 0.5)``.
    """
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin!r}")
    if s.numel() == 0:
        raise ValueError("score statistics of no channels: expected at least one keep probability")
    s = s.detach().reshape(-1)
    near_zero, near_one = (s <= margin).double().mean(), (s >= 1 - margin).double().mean()  # in s's own precision
    s = s.double()
    entropy = -(torch.special.xlogy(s, s) + torch.special.xlogy(1 - s, 1 - s))  # xlogy: 0 ln 0 = 0
    return ScoreStatistics(*torch.stack([near_zero, near_one, entropy.mean()]).tolist())  # one transfer


def _check_groups(groups: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(groups, Mapping) or not groups:
        got = type(groups).__name__ if isinstance(groups, torch.nn.Module) else repr(groups)[:80]
        hint = " (pass model.channel_groups())" if isinstance(groups, torch.nn.Module) else ""
        if isinstance(groups, Mapping):  # maskprop.channel_groups of a model of plain torch layers
            hint = " (a model of plain torch layers has none: maskprop.make_prunable(model, input_size) first)"
        raise ValueError(f"groups must be a non-empty mapping {{group name: number of channels}}{hint}, got {got}")
    for name, size in groups.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"group names must be non-empty strings, got {name!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group {name!r} must have a positive integer number of channels, got {size!r}")
    return dict(groups)


def _check_fraction(name: str, value: float, low_open: bool) -> float:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    valid = is_number and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)  # rejects NaN
    if not valid:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


class ChannelScores(nn.Module):
    """Keep probabilities ``s`` of all prunable channels, one flat ``nn.Parameter`` for the whole network.

    Group ``g`` owns the slice ``scores[offset_g : offset_g + size_g]``, groups in the order given. The feasible set is
    ``{0 <= s <= 1, sum s <= K}`` with the global budget ``K = keep_ratio x total channels``; the scores are projected
    onto it at construction and should be projected again (:meth:`project_`) after every optimizer step. With
    ``prices`` the budget is priced: ``sum_j w_j s_j <= K``, the prices ``w`` scaled to a mean of 1 over the channels so
    that ``K`` keeps its meaning (at equal probabilities ``s`` both budgets are the same); a budget in FLOPs prices each
    channel at the FLOPs it adds (``CostModel.channel_prices``; docs/methods.md, "A budget in FLOPs").

    Empty-group policy: a sampled mask that drops every channel of a group would cut the network, so :meth:`sample`
    then keeps that group's channel with the largest score (the lowest index on ties). The mask returned is the
    mask actually used and is the one to feed to the estimator. This changes the sampling distribution only on the
    event "group dropped entirely", whose probability is ``prod_j (1 - s_j)`` over the group's channels (negligible
    for groups of more than a few channels unless their scores are near 0); the estimators stay unbiased except on
    that event. A forced channel with ``s_j`` near 0 gets a large score gradient (``(s_j (1 - s_j))^(alpha - 1)``
    capped by the estimators' ``eps``).

    Args:
        groups: ordered ``{group name: number of channels}``.
        keep_ratio: fraction of channels kept on average, in ``(0, 1]``.
        init: initial probability of every channel, in ``[0, 1]`` (the official code uses 0.5), before projection.
        budget: the budget the scores start under, in ``[0, channels]``; default ``keep_ratio x channels``. A search
            whose budget is annealed starts from every channel (:mod:`maskprop.vrpge.budget`, :meth:`set_budget`).
        prices: ``{group: price of one of its channels}`` for a priced budget, every price positive and finite;
            None: every channel counts 1.
        device: device of the parameter.
        dtype: floating-point dtype of the parameter (default: torch's default dtype).
    """

    def __init__(
        self,
        groups: Mapping[str, int],
        keep_ratio: float,
        init: float = 0.5,
        *,
        budget: float | None = None,
        prices: Mapping[str, float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.groups = _check_groups(groups)
        self.keep_ratio = _check_fraction("keep_ratio", keep_ratio, low_open=True)
        init = _check_fraction("init", init, low_open=False)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.names = list(self.groups)
        self.sizes = list(self.groups.values())
        self.num_channels = sum(self.sizes)
        self.budget = self.keep_ratio * self.num_channels
        if budget is not None:
            self.set_budget(budget)
        self.scores = nn.Parameter(torch.full((self.num_channels,), init, device=device, dtype=dtype))
        group_index = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))
        self.register_buffer("group_index", group_index.to(self.scores.device), persistent=False)
        self.register_buffer("channel_index", torch.arange(self.num_channels, device=self.scores.device),
                             persistent=False)
        self.register_buffer("prices", None if prices is None else self._channel_prices(prices), persistent=False)
        self.project_()

    def _channel_prices(self, prices: Mapping[str, float]) -> Tensor:
        """One price per channel from ``{group: price}``, scaled to a mean of 1, in the scores' dtype and device."""
        if not isinstance(prices, Mapping) or set(prices) != set(self.groups):
            names = sorted(prices) if isinstance(prices, Mapping) else prices
            raise ValueError(f"prices must give every group a price: expected groups {sorted(self.groups)}, got "
                             f"{names!r}")
        for name, price in prices.items():
            valid = isinstance(price, numbers.Real) and not isinstance(price, bool) and 0 < price < math.inf
            if not valid:  # rejects NaN
                raise ValueError(f"the price of group {name!r} must be a positive finite number, got {price!r}")
        per_group = torch.tensor([float(prices[name]) for name in self.names], dtype=torch.float64)
        per_channel = per_group.repeat_interleave(torch.tensor(self.sizes))
        return (per_channel / per_channel.mean()).to(device=self.scores.device, dtype=self.scores.dtype)

    def extra_repr(self) -> str:
        priced = "" if self.prices is None else ", priced budget"
        return f"groups={len(self.groups)}, channels={self.num_channels}, keep_ratio={self.keep_ratio}{priced}"

    def set_budget(self, budget: float) -> ChannelScores:
        """Make ``budget`` the budget of :meth:`project_` and :meth:`top_mask` (an annealed search lowers it step by
        step; ``keep_ratio`` stays the final one); projects nothing. Returns ``self``.

        Raises:
            ValueError: ``budget`` is not a number in ``[0, channels]``.
        """
        valid = isinstance(budget, numbers.Real) and not isinstance(budget, bool) and 0 <= budget <= self.num_channels
        if not valid:  # rejects NaN
            raise ValueError(f"budget must be a number in [0, {self.num_channels}] (the channels), got {budget!r}")
        self.budget = float(budget)
        return self

    @torch.no_grad()
    def project_(self, budget: Tensor | None = None) -> ChannelScores:
        """Project the scores in place onto ``{0 <= s <= 1, sum s <= K}`` (``sum w s <= K`` with prices; no
        autograd); returns ``self``.

        Args:
            budget: ``K`` as a one-element tensor on the scores' device, read there and not on the host (a static
                search step captured as a CUDA graph writes :attr:`budget` into it before each replay); default
                :attr:`budget`.
        """
        self.scores.copy_(project_scores(self.scores, self.budget if budget is None else budget, self.prices))
        return self

    # ----------------------------------------------------------------------------------------------- flat <-> dict

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat per-channel tensor (last dimension = all channels) into ``{group: view}``, in group order.

        Raises:
            ValueError: if the last dimension is not the total number of channels.
        """
        if flat.dim() == 0 or flat.shape[-1] != self.num_channels:
            raise ValueError(f"expected a tensor whose last dimension has {self.num_channels} channels, "
                             f"got shape {tuple(flat.shape)}")
        return dict(zip(self.names, torch.split(flat, self.sizes, dim=-1)))

    def flatten(self, mask: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``{group: tensor}`` along the last dimension in group order (inverse of :meth:`split`).

        Raises:
            ValueError: if groups are missing or unexpected, or a group has the wrong number of channels.
        """
        missing = [name for name in self.names if name not in mask]
        unexpected = [name for name in mask if name not in self.groups]
        if missing or unexpected:
            raise ValueError(f"mask groups do not match the scores: missing {missing}, unexpected {unexpected}")
        for name, size in self.groups.items():
            if mask[name].dim() == 0 or mask[name].shape[-1] != size:
                raise ValueError(f"group {name!r} has {size} channels, got a tensor of shape {tuple(mask[name].shape)}")
        return torch.cat([mask[name] for name in self.names], dim=-1)

    # ------------------------------------------------------------------------------------------------------ masks

    @torch.no_grad()
    def sample_flat(self, generator: torch.Generator) -> Tensor:
        """Flat bool mask ``m ~ Bernoulli(s)`` drawn from ``generator``, with the empty-group policy applied.

        Args:
            generator: the explicit source of randomness, on the scores' device; the same generator state gives the
                same mask (so ranks that share a seed share masks).
        """
        if generator.device.type != self.scores.device.type:
            raise ValueError(f"generator is on {generator.device}, scores are on {self.scores.device}; "
                             f"create the generator with device={self.scores.device.type!r}")
        s = self.scores.detach()
        return self.mask_from_uniforms(torch.rand(s.shape, generator=generator, device=s.device, dtype=s.dtype))

    @torch.no_grad()
    def mask_from_uniforms(self, uniform: Tensor) -> Tensor:
        """Flat bool mask ``m = uniform < s`` with the empty-group policy applied: what :meth:`sample_flat` draws from
        these uniforms. A fixed sequence of device operations with no host read and no output shape that depends on
        the data, so that it can run inside a captured CUDA graph (``maskprop.train.graphs``).

        Args:
            uniform: ``U[0, 1)`` draws, one per channel, on the scores' device; ``(k, channels)`` for ``k`` masks at
                once (one row each, with the launches of one).
        """
        s = self.scores.detach()
        mask = uniform < s  # P(u < s_j) = s_j for u ~ U[0, 1)
        kept = torch.zeros(*mask.shape[:-1], len(self.sizes), dtype=torch.long, device=s.device).index_add_(
            -1, self.group_index, mask.long())
        best = self._group_argmax()
        mask[..., best] |= kept == 0
        return mask

    def sample(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Mask ``{group: BoolTensor of its channels}`` with ``m ~ Bernoulli(s)`` (see :meth:`sample_flat`).

        Every group keeps at least one channel (see the empty-group policy in the class docstring); pass this mask,
        flattened with :meth:`flatten`, to the estimator.
        """
        return self.split(self.sample_flat(generator))

    @torch.no_grad()
    def top_mask(self) -> dict[str, Tensor]:
        """Deterministic mask: the channels with the largest scores, as many as the sampled masks keep on average
        (``round(sum s)``, never more than the budget ``round(K)``; halves rounded up), and at least one per group.

        Keeping ``round(sum s)`` rather than always ``round(K)`` matters once the scores settle below the budget:
        filling the budget would add channels whose keep probability is near zero, which the weights were never
        trained with. Each group first keeps its largest-score channel; the remaining places go to the largest
        remaining scores globally. Ties go to the lower flat index. Exactly
        ``max(min(round(sum s), round(K)), number of groups)`` channels are kept.

        With prices, the same order fills the priced budget instead: the largest scores are kept for as long as
        their total price comes closest to ``min(sum w s, K)`` (at least one channel per group; with every price 1
        this is the count above).
        """
        s = self.scores.detach()
        mask = torch.zeros_like(s, dtype=torch.bool)
        mask[self._group_argmax()] = True
        rest = s.masked_fill(mask, -math.inf)
        order = torch.sort(rest, descending=True, stable=True).indices[: self.num_channels - len(self.sizes)]
        if self.prices is None:
            expected = float(s.sum())
            num_kept = max(min(math.floor(expected + 0.5), math.floor(self.budget + 0.5)), len(self.sizes))
            mask[order[: num_kept - len(self.sizes)]] = True
            return self.split(mask)
        w = self.prices.double()
        target = min(float((w * s.double()).sum()), self.budget)
        total = float(w[mask].sum()) + torch.cat([w.new_zeros(1), torch.cumsum(w[order], 0)])  # price of 0, 1, ... more
        distance = (total - target).abs()
        # The closest total, ties to the larger one (as rounding halves up): the last index at the minimum distance.
        extra = int(distance.numel() - 1 - torch.argmin(distance.flip(0)))
        mask[order[:extra]] = True
        return self.split(mask)

    def _group_argmax(self) -> Tensor:
        """Flat index of each group's largest score (the lowest index on ties)."""
        s = self.scores.detach()
        group_max = torch.full((len(self.sizes),), -math.inf, dtype=s.dtype, device=s.device)
        group_max = group_max.scatter_reduce(0, self.group_index, s, reduce="amax")
        at_max = torch.where(s == group_max[self.group_index], self.channel_index, self.num_channels)
        first = torch.full((len(self.sizes),), self.num_channels, dtype=torch.long, device=s.device)
        return first.scatter_reduce(0, self.group_index, at_max, reduce="amin")

    @property
    def floor(self) -> float:
        """What one channel of every group costs the budget (``number of groups``, or their prices' sum with a priced
        budget): every sampled mask spends at least that much, whatever the scores (the empty-group policy), and
        the projection does not count it."""
        if self.prices is None:
            return float(len(self.sizes))
        first = torch.tensor([0, *self.sizes[:-1]]).cumsum(0)
        return float(self.prices.detach().cpu().double()[first].sum())

    @torch.no_grad()
    def spent(self) -> float:
        """The budget the scores spend: ``sum s`` (``sum w s`` with prices), at most :attr:`budget` after
        :meth:`project_`. The constraint is an inequality, so a search can end below its budget: a probability the
        estimator drove to 0 gets no gradient there (``m_j - s_j = 0`` in every sample) and stays."""
        s = self.scores.detach()
        return float(s.sum() if self.prices is None else (s * self.prices).sum())

    @torch.no_grad()
    def expected_kept(self) -> ExpectedKept:
        """Expected kept channels per group (``sum s``) and the expected kept ratio of the whole network."""
        s = self.scores.detach()
        per_group = torch.zeros(len(self.sizes), dtype=s.dtype, device=s.device).index_add_(0, self.group_index, s)
        values = per_group.tolist()
        return ExpectedKept(dict(zip(self.names, values)), float(s.sum()) / self.num_channels)

    # ------------------------------------------------------------------------------------------------- state dict

    def get_extra_state(self) -> dict[str, Any]:
        # The budget too: the scores are feasible for the budget they were last projected onto (an annealed search's
        # falls step by step), which a load restores. The keep ratio may differ: a resumed run may change it.
        return {"groups": [[name, size] for name, size in self.groups.items()], "budget": self.budget}

    def set_extra_state(self, state: Any) -> None:
        self._check_layout(state)
        if "budget" in state:  # states saved before the budget was kept leave it as it is
            self.set_budget(float(state["budget"]))

    def _check_layout(self, state: Any) -> None:
        groups = state.get("groups") if isinstance(state, Mapping) else None
        if not isinstance(groups, list):
            raise ValueError(f"cannot load ChannelScores: extra state has no group layout, got {state!r}")
        try:
            theirs = [(str(name), int(size)) for name, size in groups]
        except (TypeError, ValueError):
            raise ValueError(f"cannot load ChannelScores: malformed group layout {groups!r}") from None
        ours = list(self.groups.items())
        if theirs == ours:
            return
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        theirs_at = f"{theirs[first][0]!r} ({theirs[first][1]})" if first < len(theirs) else "nothing"
        ours_at = f"{ours[first][0]!r} ({ours[first][1]})" if first < len(ours) else "nothing"
        raise ValueError(
            f"cannot load ChannelScores: the state has {len(theirs)} groups / {sum(n for _, n in theirs)} channels, "
            f"this model has {len(ours)} groups / {self.num_channels} channels; group {first} is {theirs_at} in the "
            f"state but {ours_at} here (was it saved from another model?)"
        )

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Check the layout before any tensor is copied, so a mismatched load changes nothing.
        if prefix + _EXTRA_STATE_KEY in state_dict:
            self._check_layout(state_dict[prefix + _EXTRA_STATE_KEY])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
