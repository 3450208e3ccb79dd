"""Analytic FLOPs of dense and channel-sparse models, and the train-step costs of VR-PGE (supplement C.1).

FLOPs count a multiply-add as 2, the way ``torch.utils.flop_counter`` counts them. A conv keeping ``i`` of its input
and ``o`` of its output channels costs ``2 * i * o * k*k * H_out * W_out`` per example: its cost scales with kept_in x
kept_out, hence about rho^2 of dense for a keep ratio rho. The two matrix products of a
:class:`~maskprop.sparse.SparseAttention` (``q k^T`` and the weights times ``v``; its subclass
:class:`~maskprop.sparse.SparseMultiheadAttention` too) cost ``4 * heads * tokens^2`` per kept head feature, linear in
its group's count. FLOPs that ``torch.utils.flop_counter`` finds elsewhere (the products
of attention left whole) are counted once, at their dense value, for every mask: a subnetwork never prunes them
(:func:`maskprop.check_model` checks that it does not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .models.spec import check_input_size
from .sparse import SparseAttention, SparseBatchNorm2d, SparseChannelNorm, channel_groups, check_mask, kept_counts
from .sparse.groups import concatenated_counts, concatenations


@dataclass(frozen=True)
class LayerShape:
    """What the cost of one conv or linear layer depends on (or of an attention's two products: a "depthwise" layer
    of its head features, ``positions`` multiply-adds per kept feature, no weights)."""

    name: str
    in_group: str | None
    out_group: str | None
    in_channels: int
    out_channels: int
    positions: int  # kernel area x output positions (conv), features per channel (linear): multiply-adds per pair
    kernel_area: int  # weights per (in, out) channel pair
    bias: bool
    reads_input: bool  # reads the network input (its backward computes no input gradient)
    groups: int = 1  # a grouped conv's output channel reads in_channels / groups of the inputs: all above / groups
    depthwise: bool = False  # a depthwise conv of one group: output channel j reads input j alone, at any width

    def flops(self, counts: Mapping[str, int]) -> int:
        """Forward multiply-adds x 2 for one example with ``counts`` channels kept per group."""
        kept_out = counts.get(self.out_group, self.out_channels)
        if self.depthwise:
            return 2 * kept_out * self.positions
        return 2 * counts.get(self.in_group, self.in_channels) * kept_out * self.positions // self.groups

    def params(self, counts: Mapping[str, int]) -> int:
        """Weights and bias kept with ``counts`` channels kept per group."""
        kept_out = counts.get(self.out_group, self.out_channels)
        kept_in = 1 if self.depthwise else counts.get(self.in_group, self.in_channels) // self.groups
        return kept_in * kept_out * self.kernel_area + (kept_out if self.bias else 0)


class CostModel:
    """FLOPs and parameters of a model for any mask, from one shape-recording forward pass.

    Args:
        model: a maskprop model (or any model; layers that are not maskprop layers count as never pruned).
        input_size: ``(C, H, W)`` of one example.

    Example:
        >>> cost = CostModel(model, (3, 32, 32))
        >>> cost.flops(mask) / cost.flops()  # about keep_ratio ** 2
    """

    def __init__(self, model: nn.Module, input_size: Sequence[int]) -> None:
        self.input_size = check_input_size(input_size)
        self.groups = channel_groups(model)
        self.concatenated = concatenations(model)  # a layer reading one keeps the sum of its parts' channels
        try:
            self.layers, counted = _record_shapes(model, self.input_size)
        except (RuntimeError, AssertionError) as err:  # the model does not take this input (channels, a too-small
            # image, features; a transformer built for another image size asserts it)
            raise InputSizeError(model, self.input_size, " ".join(str(err).split())[:160]) from None
        self._other_params = _unprunable_params(model)
        self._norm = [(m.group, m.num_features, sum(t is not None for t in (m.weight, m.bias)))  # per channel
                      for m in model.modules() if isinstance(m, (SparseBatchNorm2d, SparseChannelNorm))]
        self._dense_layer_flops = self._layer_flops({})
        # FLOPs outside the conv and linear layers: the same in every subnetwork.
        self.other_flops = max(counted - sum(self._dense_layer_flops), 0)
        self._dense_flops = sum(self._dense_layer_flops) + self.other_flops

    def _counts(self, mask: Mapping[str, Tensor | int] | None) -> dict[str, int]:
        # Counted once per mask (not per layer): this runs for every mask of every training step. A mask may also be
        # given as kept counts per group (ints), e.g. the aligned widths a compact step computes (the trainer's, not
        # checked again); a mask of bool tensors is checked as use_mask checks it (one line for a missing or unknown
        # group, a wrong shape or dtype, an empty group).
        if mask is None:
            return {}
        if not any(isinstance(m, int) for m in mask.values()):
            check_mask(mask, self.groups)
        counts = kept_counts(mask)
        return concatenated_counts(counts, self.concatenated) if self.concatenated else counts

    def _layer_flops(self, counts: Mapping[str, int]) -> list[int]:
        return [layer.flops(counts) for layer in self.layers]

    def by_layer(self, mask: Mapping[str, Tensor] | None = None) -> dict[str, int]:
        """Forward FLOPs of each conv and linear layer for one example."""
        per_layer = self._dense_layer_flops if mask is None else self._layer_flops(self._counts(mask))
        return {layer.name: f for layer, f in zip(self.layers, per_layer)}

    def flops(self, mask: Mapping[str, Tensor | int] | None = None, batch_size: int = 1) -> int:
        """Forward FLOPs for ``batch_size`` examples (dense when ``mask`` is None; a mask, or channels computed per
        group as ints).

        Raises:
            ValueError: a mask that does not fit the model (as :func:`maskprop.check_mask` says), or ``batch_size``
                below 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if mask is None:
            return batch_size * self._dense_flops
        return batch_size * (sum(self._layer_flops(self._counts(mask))) + self.other_flops)

    def channel_prices(self, keep_ratio: float) -> dict[str, float]:
        """Forward FLOPs per example that one more kept channel of each group adds, when every group keeps
        ``keep_ratio`` of its channels: ``dF/dn_g`` at ``n = keep_ratio x channels``, with ``F`` the FLOPs as a
        function of the kept counts ``n`` (bilinear: a conv costs ``2 n_in n_out k*k H W``). A channel of a residual
        stream, which every block of its stage reads and writes, costs several times a channel inside a block. These
        are the prices of a budget counted in FLOPs (``sparsity.budget_unit: flops``; docs/methods.md, "A budget in
        FLOPs"). Groups that no conv or linear layer touches are absent.

        Raises:
            ValueError: ``keep_ratio`` is outside ``(0, 1]``.
        """
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")

        def parts(group: str | None, channels: int) -> tuple[tuple[str | None, int], ...]:
            # A concatenated group is its parts, each of whose groups keeps keep_ratio of its channels.
            return self.concatenated.get(group, ((group, channels),))

        def kept(sides: tuple[tuple[str | None, int], ...]) -> float:
            return sum(n * (keep_ratio if g is not None else 1.0) for g, n in sides)

        prices: dict[str, float] = {}
        for layer in self.layers:
            outputs = parts(layer.out_group, layer.out_channels)
            if layer.depthwise:  # 2 n k*k H W: linear in its one group's count
                pairs = [(g, 2.0 * layer.positions) for g, _ in outputs]
            else:  # 2 n_in n_out k*k H W / groups: bilinear
                inputs = parts(layer.in_group, layer.in_channels)
                scale = 2.0 * layer.positions / layer.groups
                pairs = [(g, scale * kept(outputs)) for g, _ in inputs]
                pairs += [(g, scale * kept(inputs)) for g, _ in outputs]
            for group, price in pairs:  # a group that is two parts of a concatenation is priced for both
                if group is not None:
                    prices[group] = prices.get(group, 0.0) + price
        return prices

    def backward_flops(self, mask: Mapping[str, Tensor] | None = None, batch_size: int = 1) -> int:
        """FLOPs autograd executes in backward: weight gradients (= forward) plus input gradients (= forward) of
        every layer except those reading the network input, which need no input gradient; and twice the FLOPs outside
        the layers (a product of two activations has a gradient for each)."""
        per_layer = self.by_layer(mask)
        return batch_size * (sum(2 * f if not layer.reads_input else f
                                 for layer, f in zip(self.layers, per_layer.values())) + 2 * self.other_flops)

    def params(self, mask: Mapping[str, Tensor] | None = None) -> int:
        """Parameters of the subnetwork: kept slices of conv/linear/BatchNorm/LayerNorm/RMSNorm/GroupNorm parameters
        plus everything else."""
        counts = self._counts(mask)
        total = self._other_params
        for layer in self.layers:
            total += layer.params(counts)
        for group, features, tensors in self._norm:
            total += tensors * counts.get(group, features)
        return total


class InputSizeError(ValueError):
    """A model that does not take inputs of the size given (one line; ``reason``: what its forward said)."""

    def __init__(self, model: nn.Module, size: tuple[int, ...], reason: str) -> None:
        super().__init__(f"{type(model).__name__} does not take an input of size {size} ({reason}); expected the "
                         f"(C, H, W) it was built for")
        self.size, self.reason = size, reason


def _record_shapes(model: nn.Module, input_size: tuple[int, ...]) -> tuple[list[LayerShape], int]:
    """The shapes of the conv and linear layers, and every FLOP ``torch.utils.flop_counter`` counts, of the model's
    eval forward on one example."""
    shapes: list[LayerShape] = []
    handles = []
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], keywords: dict, output: Tensor) -> None:
            given = inputs[0] if inputs else next(iter(keywords.values()))  # layer(x) or layer(input=x)
            reads_input = given.data_ptr() == x.data_ptr()
            if isinstance(module, SparseAttention):  # its two products, q k^T and (softmax) v: 2 heads tokens^2
                # multiply-adds per kept head feature, linear in its group's count like a depthwise conv's
                batch, tokens = module.batch_and_tokens(given)  # nn.MultiheadAttention's layouts too
                pairs = 2 * module.num_heads * batch * tokens ** 2
                width = module.head_width  # the width its projection runs at
                shapes.append(LayerShape(f"{name}:products", None, module.group, width, width, pairs, 0, False, False,
                                         depthwise=True))
                return
            if isinstance(module, nn.Conv2d):  # on the example's map, or on several maps stacked as examples
                k = module.weight.shape[2] * module.weight.shape[3]
                positions = k * output.shape[0] * output.shape[2] * output.shape[3]
                kernel_area, groups = k, module.groups
                depthwise = bool(getattr(module, "depthwise", False))
                c_in, c_out = module.in_channels, module.out_channels
            else:
                k = getattr(module, "in_positions", 1)  # features per input channel (a flattened feature map)
                rows = output.numel() // output.shape[-1]  # 1, or the rows of a map it runs on (its last dimension)
                positions, kernel_area, groups = k * rows, k, 1
                c_in, c_out = module.in_features // k, module.out_features
                depthwise = False
            shapes.append(LayerShape(
                name, getattr(module, "in_group", None), getattr(module, "out_group", None), c_in, c_out,
                positions, kernel_area, module.bias is not None, reads_input, groups, depthwise,
            ))
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, SparseAttention)):
            handles.append(module.register_forward_hook(hook(name), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), counting_flops() as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes, counter.get_total_flops()


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCounterMode]:
    """``torch.utils.flop_counter.FlopCounterMode`` with attention computed by the operations it counts: the fused
    kernels of ``scaled_dot_product_attention`` on the CPU and of ``nn.MultiheadAttention``'s inference fast path are
    not in the counter's tables (they would count 0), its math kernels are."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def counted_flops(model: nn.Module, x: Tensor) -> int:
    """The FLOPs ``torch.utils.flop_counter`` counts in ``model(x)`` without autograd, attention included
    (:func:`counting_flops`): what :func:`maskprop.check_model` and ``maskprop export`` compare the cost model with."""
    with torch.no_grad(), counting_flops() as counter:
        model(x)
    return int(counter.get_total_flops())


def _unprunable_params(model: nn.Module) -> int:
    counted = {id(p) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, SparseBatchNorm2d, SparseChannelNorm))
               for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in counted)


def flops(model: nn.Module, input_size: Sequence[int], mask: Mapping[str, Tensor] | None = None) -> int:
    """Forward FLOPs of ``model`` (dense, or the subnetwork ``mask``) on an input of ``input_size``.

    Args:
        model: a maskprop model.
        input_size: ``(C, H, W)`` for one example, or ``(N, C, H, W)`` for a batch.
        mask: group name -> bool tensor; ``None`` for the dense model.
    """
    input_size = check_input_size(input_size, (3, 4), "(C, H, W) or (N, C, H, W)")
    batch = input_size[0] if len(input_size) == 4 else 1
    return CostModel(model, input_size[-3:]).flops(mask, batch_size=batch)


# Train-step costs, VR-PGE supplement C.1: backward costs 2x forward.
def dense_step_flops(f_dense: float) -> float:
    """One dense SGD step: forward + backward = 3 f_D."""
    return 3 * f_dense


def vrpge_step_flops(f_first: float, f_second: float, weight_grad: str = "first") -> float:
    """One VR-PGE step: forward + backward with m, forward only with m' (``weight_grad="first"``: 3 f(m) + f(m'),
    the paper's 4 f_S), or backward with both masks as the official code does (``"both"``: 3 f(m) + 3 f(m'))."""
    if weight_grad == "first":
        return 3 * f_first + f_second
    if weight_grad == "both":
        return 3 * f_first + 3 * f_second
    raise ValueError(f"unknown weight_grad {weight_grad!r}; expected 'first' or 'both'")


def sbp_step_flops(layer_flops: Mapping[str, float], keep_fractions: Mapping[str, float]) -> float:
    """One sparse-backward step (meProp, SBP, MSBP): the dense forward plus each layer's backward at the fraction of its
    output units that propagate a gradient, ``sum_l f_l (1 + 2 k_l / n_l)`` in the convention above.

    A layer's output gradient with ``k`` of ``n`` units kept makes both of its backward products ``k / n`` as large
    (meProp: O(k m) instead of O(n m)); the gradient it passes down is dense again, so layers scale independently.
    The selection itself (O(n log k) per layer) is not counted. With every fraction 1 this is ``3 f_D``.

    Args:
        layer_flops: Forward FLOPs per layer, e.g. ``CostModel.by_layer()`` times the batch size.
        keep_fractions: ``k / n`` of the layers with a sparse backward, by the same names; other layers run a dense
            backward.

    Raises:
        ValueError: A name in ``keep_fractions`` is not a layer, or a fraction is outside (0, 1].
    """
    unknown = [name for name in keep_fractions if name not in layer_flops]
    if unknown:
        raise ValueError(f"sparse-backward layers {unknown[:3]} have no FLOPs entry; expected names from "
                         f"{list(layer_flops)[:5]}")
    bad = {name: r for name, r in keep_fractions.items() if not 0.0 < r <= 1.0}
    if bad:
        raise ValueError(f"keep fractions {bad} are outside (0, 1]; expected k / n of each layer")
    return sum(f * (1 + 2 * keep_fractions.get(name, 1.0)) for name, f in layer_flops.items())


def train_cost_saving(dense_flops_total: float, sparse_flops_total: float) -> float:
    """Train-cost saving = dense train FLOPs / sparse train FLOPs (supplement C.1: 3 f_D / (4 f_S) per step)."""
    if sparse_flops_total <= 0:
        raise ValueError(f"sparse train FLOPs must be positive, got {sparse_flops_total}")
    return dense_flops_total / sparse_flops_total
