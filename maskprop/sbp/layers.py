"""Sparse-backward layers: meProp, SBP and MSBP.

The forward pass is the ordinary one. In the backward pass only a sparsified output gradient is propagated
(MSBP paper eqs. (15)-(17)):

    g = SI_k(dL/dh + M)            (MSBP paper eqs. (20)-(21); M = 0 for SBP / meProp)
    dL/dW = g^T x,   dL/dx = g W,  dL/db = sum over the batch of g
    M <- gamma * (dL/dh + M - g)   (MSBP paper eq. (22); gamma = ``memory``, 0 switches the memory off)

Only the output units in the kept set take part, so the products run on the gathered ``k`` columns of ``g``:
``dW[kept] = g_k^T x`` and ``dx = g_k W[kept]`` (meProp section 4.8), and the weight gradient is written into a
persistent buffer that is re-zeroed only on the rows written last step (see :mod:`maskprop.sbp.rowgrad` for
the exact contract with optimizers).

**Units, examples and positions.** A unit is an output feature of :class:`SparseBackwardLinear` (any leading
dimensions of the input are flattened into examples, so a token of a sequence counts as an example) or an output
channel of :class:`SparseBackwardConv2d`. A unit's score is ``|dL/dh + M|``, summed over the spatial positions for a
conv layer (whole channel maps are kept or dropped), and, for the unified sparsifiers, summed over the mini-batch
too, giving one index set per mini-batch. The per-example ``topk`` sparsifier keeps ``k`` units per example and the
weight gradient touches the union of those sets.

**MSBP memory layout (one memory row per unit, summed over the mini-batch).** The paper states the memory for
one instance and costs it at O(n) per layer (its Table 1). Here a mini-batch is treated as one "big example", as
meProp does for unified top-k (its section 4.8): ``M`` has one entry per unit (and position, for a conv layer),
shape ``(units,)`` or ``(channels, H*W)``, and stores the unpropagated part of the batch-summed gradient. Each
example receives an equal share, ``H_b = dL/dh_b + M / B``, so that ``sum_b H_b = sum_b dL/dh_b + M`` is the
paper's ``dL/dh + m`` for the big example, and the update is eq. (22) on the batch sums::

    M <- gamma * (sum_b dL/dh_b + M - sum_b g_b)

With unified top-k, ``M`` is zero on the kept units and ``gamma * (sum_b dL/dh_b + M)`` on the dropped ones. For a
batch of one this is exactly the paper's algorithm. In the weight gradient the memory meets the mean input of the
current batch (``(M / B) sum_b x_b``), which is less noisy than pairing it with one unrelated example: a layout
with one memory slot per example position (batch x units) trained worse (BENCHMARKS.md, "Implementation
choices": MSBP memory layout). The memory does not depend on the batch size; a change of the unit or spatial
shape restarts it at zero. It is a non-persistent buffer (``msbp_memory``), so ``state_dict`` keys equal those of
``nn.Linear`` / ``nn.Conv2d``; checkpoint it with :func:`maskprop.sbp.sbp_state_dict`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from maskprop._workarounds import subsampled_pointwise_input
from maskprop.sbp.rowgrad import RowGradBuffer
from maskprop.sbp.sparsifiers import SPARSIFIERS, batch_sum, get_sparsifier, take_units, unit_scores

logger = logging.getLogger(__name__)

__all__ = ["SparseBackwardConv2d", "SparseBackwardLinear", "SparseBackwardMixin", "check_memory_ratio", "keep_count"]


def keep_count(num_units: int, ratio: float) -> int:
    """Units kept for a keep ratio: ``round(ratio * num_units)``, at least 1 (MSBP paper: r = k / n).

    Raises:
        ValueError: ``ratio`` is outside (0, 1].
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} is outside (0, 1]; expected the fraction of output units to keep, e.g. 0.04")
    return max(1, int(ratio * num_units + 0.5))


def check_memory_ratio(memory: float) -> float:
    """Validate the MSBP memory ratio gamma (MSBP paper eq. (22)) and return it as a float.

    Raises:
        ValueError: ``memory`` is outside [0, 1).
    """
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not 0.0 <= memory < 1.0:
        raise ValueError(f"memory={memory!r} is outside [0, 1); expected the MSBP memory ratio gamma (0 gives SBP)")
    return float(memory)


def _check_k(k: int, num_units: int, where: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k={k!r} for {where} is not an integer; expected an int with 1 <= k <= {num_units}")
    if not 1 <= k <= num_units:
        raise ValueError(f"k={k} for {where} is out of range; expected 1 <= k <= {num_units} (its output units)")
    return k


class SparseBackwardMixin:
    """Configuration and the sparsify-and-remember step shared by the sparse-backward layers.

    Attributes:
        keep_k: fixed number of kept units, or None when ``keep_ratio`` decides.
        keep_ratio: fraction of units kept, or None when ``keep_k`` decides.
        sparsifier: name of the sparsifying function in :data:`maskprop.sbp.SPARSIFIERS`.
        memory_ratio: MSBP memory ratio gamma; 0 is SBP (no memory).
        sparse_enabled: False runs the exact dense backward (used for the true gradient in diagnostics).
        direct_grad: True writes the weight gradient straight into ``weight.grad`` through a persistent buffer
            (fast; see :mod:`maskprop.sbp.rowgrad`). The layer falls back to returning the gradient through
            autograd by itself for ``torch.autograd.grad``, non-leaf weights and weights with Python hooks. Set it
            to False under DistributedDataParallel, whose C++ gradient hooks it cannot see (slower: one full-size
            tensor per step).
        record_scores: keep the unit scores of the last backward in ``last_scores`` (used by the global budget).
        generator: optional random generator for ``randomk``.
        probe: True while :func:`maskprop.sbp.diagnostics.probing` measures gradient angles: the backward reads the
            MSBP memory without updating it and returns the weight gradient through autograd.
    """

    num_units: int

    def _setup_sparse(
        self, k: int | None, ratio: float | None, sparsifier: str, memory: float
    ) -> None:
        get_sparsifier(sparsifier)  # validates the name
        self.sparsifier = sparsifier
        self.memory_ratio = check_memory_ratio(memory)
        self.set_keep(k=k, ratio=ratio)
        self.sparse_enabled = True
        self.direct_grad = True
        self.record_scores = False
        self.last_scores: Tensor | None = None
        self.generator: torch.Generator | None = None
        self.probe = False  # diagnostics (``probing``): read the memory without updating it, gradients via autograd
        self._weight_grad = RowGradBuffer()
        self.register_buffer("msbp_memory", None, persistent=False)

    def set_keep(self, k: int | None = None, ratio: float | None = None) -> None:
        """Set the budget of this layer: exactly one of a unit count ``k`` or a keep ``ratio``.

        Raises:
            ValueError: both or neither are given, ``k`` is not in [1, units], or ``ratio`` is not in (0, 1].
        """
        where = f"{type(self).__name__} with {self.num_units} output units"
        if (k is None) == (ratio is None):
            raise ValueError(f"got k={k!r} and ratio={ratio!r} for {where}; expected exactly one of them")
        if k is not None:
            self.keep_k, self.keep_ratio = _check_k(k, self.num_units, where), None
        else:
            keep_count(self.num_units, ratio)  # validates
            self.keep_k, self.keep_ratio = None, float(ratio)

    @property
    def k(self) -> int:
        """The number of units kept per backward (per example for ``topk``)."""
        return self.keep_k if self.keep_k is not None else keep_count(self.num_units, self.keep_ratio)

    def reset_sbp_state(self) -> None:
        """Clear the MSBP memory, the recorded scores and the gradient buffer."""
        self.msbp_memory = None
        self.last_scores = None
        self._weight_grad.reset()

    def _sparse_repr(self) -> str:
        budget = f"k={self.keep_k}" if self.keep_k is not None else f"ratio={self.keep_ratio}"
        return f"{budget}, sparsifier={self.sparsifier!r}, memory={self.memory_ratio}"

    def _memory_for(self, grad: Tensor) -> Tensor:
        """The stored memory, ``grad.shape[1:]``; zeros when there is none or its shape, dtype or device differ."""
        memory = self.msbp_memory
        if memory is None or memory.shape != grad.shape[1:] or memory.dtype != grad.dtype or (
            memory.device != grad.device
        ):
            if memory is not None:
                logger.debug("MSBP memory of shape %s restarts at zero for gradient %s", tuple(memory.shape),
                             tuple(grad.shape))
            memory = torch.zeros_like(grad[0])  # the layout of one example's gradient (see sparsifiers.batch_sum)
        return memory

    def select(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Sparsify an output gradient, with the MSBP memory, and update the memory.

        This is the selection step of the backward pass; it changes the layer's state (memory, recorded scores).

        Args:
            grad: ``dL/dh`` of shape ``(batch, units)`` (linear) or ``(batch, units, positions)`` (conv).

        Returns:
            ``(kept, kept_grad)``: the sorted indices of every unit that propagates a gradient (the union over
            the examples for a per-example sparsifier) and ``g`` restricted to them,
            ``(batch, len(kept)[, positions])``.
        """
        gamma = self.memory_ratio
        share = None
        if gamma > 0.0:
            memory = self._memory_for(grad)
            share = memory / grad.shape[0]  # H_b = dL/dh_b + M / B  (MSBP paper eq. (20) for the big example)
        chosen = SPARSIFIERS[self.sparsifier](grad, self.k, self.generator, share)
        kept = chosen if chosen.dim() == 1 else None
        mask = None
        if kept is None:  # per-example sets: propagate the union, zero outside each example's own set
            mask = torch.zeros(grad.shape[:2], dtype=torch.bool, device=grad.device).scatter_(1, chosen, True)
            kept = mask.any(dim=0).nonzero()[:, 0]
        kept_grad = take_units(grad, kept)  # only the kept columns are ever gathered
        if share is not None:
            kept_grad = kept_grad + take_units(share.unsqueeze(0), kept)
        if mask is not None:
            kept_grad = kept_grad * mask.index_select(1, kept).view(*kept_grad.shape[:2], *[1] * (grad.dim() - 2))
        if self.probe:
            return kept, kept_grad
        if self.record_scores:
            self.last_scores = unit_scores(grad.detach(), per_example=False, offset=share)
        if gamma > 0.0:
            # M <- gamma * (sum_b dL/dh_b + M - sum_b g_b), MSBP paper eq. (22) on the batch sums.
            memory = batch_sum(grad).add_(memory)
            if mask is None:
                memory.index_fill_(0, kept, 0.0)  # every example propagated these units entirely
            else:
                memory.index_add_(0, kept, batch_sum(kept_grad), alpha=-1.0)
            self.msbp_memory = memory.mul_(gamma)
        return kept, kept_grad

    def _needs_backward(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    def _weight_route(self, ctx, weight: Tensor) -> str:
        """How the weight gradient leaves the backward: 'skip', 'direct' (our buffer) or 'return' (autograd)."""
        if not ctx.needs_input_grad[1]:
            return "skip"
        node = ctx.next_functions[1][0]
        if node is None:
            return "skip"
        try:
            if not torch._C._will_engine_execute_node(node):
                return "skip"  # e.g. backward(inputs=[x]) or autograd.grad(loss, x): nobody wants dL/dW
        except RuntimeError:
            return "return"  # autograd.grad(..., inputs=[weight]) captures the gradient: hand it over
        except AttributeError:  # private API gone in some torch version: be conservative
            pass
        hooked = bool(getattr(weight, "_backward_hooks", None)) or bool(
            getattr(weight, "_post_accumulate_grad_hooks", None)
        )
        if self.direct_grad and not self.probe and weight.is_leaf and not hooked:
            return "direct"
        return "return"

    def _emit_weight_grad(self, route: str, weight: Tensor, kept: Tensor, rows_grad: Tensor) -> Tensor | None:
        if route == "direct":
            self._weight_grad.accumulate(weight, kept, rows_grad.to(weight.dtype))
            return None
        return weight.new_zeros(weight.shape).index_copy_(0, kept, rows_grad.to(weight.dtype))


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: SparseBackwardLinear) -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        layer: SparseBackwardLinear = ctx.layer
        units, fan_in = weight.shape
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        route = layer._weight_route(ctx, weight)
        g = grad_out.reshape(-1, units)
        x2d = x.reshape(-1, fan_in)
        grad_x = grad_w = grad_b = None
        if not layer.sparse_enabled:  # exact dense backward (MSBP paper eqs. (12)-(14))
            g = g.to(weight.dtype)
            if need_x:
                grad_x = (g @ weight).view(x.shape).to(x.dtype)
            if route != "skip":
                grad_w = g.t() @ x2d.to(weight.dtype)
            if need_b:
                grad_b = g.sum(0)
            return grad_x, grad_w, grad_b, None

        kept, kept_grad = layer.select(g)
        kept_grad = kept_grad.to(weight.dtype)  # g_k, (examples, k)
        if need_x:  # dL/dx = g_k W[kept]  (MSBP paper eq. (17) on the kept columns)
            grad_x = (kept_grad @ weight.index_select(0, kept)).view(x.shape).to(x.dtype)
        if route != "skip":  # dL/dW[kept] = g_k^T x  (MSBP paper eq. (16))
            grad_w = layer._emit_weight_grad(route, weight, kept, kept_grad.t() @ x2d.to(weight.dtype))
        if need_b:
            grad_b = weight.new_zeros(units).index_copy_(0, kept, kept_grad.sum(0))
        return grad_x, grad_w, grad_b, None


class SparseBackwardLinear(SparseBackwardMixin, nn.Linear):
    """``nn.Linear`` whose backward propagates only ``SI_k(dL/dh + M)`` (meProp / SBP / MSBP).

    ``state_dict`` keys and the forward pass are those of ``nn.Linear``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample (the units that are sparsified).
        bias: learn an additive bias.
        k: units kept per backward (per example for ``topk``); give this or ``ratio``.
        ratio: fraction of the output units kept, in (0, 1]; ``k = max(1, round(ratio * out_features))``.
        sparsifier: ``"topk_unified"`` (one set per mini-batch, the fast path), ``"topk"`` (per example, original
            meProp) or ``"randomk"``.
        memory: MSBP memory ratio gamma in [0, 1); 0 is SBP.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: bad ``k``, ``ratio``, ``sparsifier`` or ``memory``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        k: int | None = None,
        ratio: float | None = None,
        sparsifier: str = "topk_unified",
        memory: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.num_units = out_features
        self._setup_sparse(k, ratio, sparsifier, memory)

    def forward(self, x: Tensor) -> Tensor:
        if not self._needs_backward(x):
            return F.linear(x, self.weight, self.bias)
        return _SparseLinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"


class _SparseConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: SparseBackwardConv2d,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
        ctx.layer = layer
        ctx.conv_args = (list(stride), list(padding), list(dilation))
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        layer: SparseBackwardConv2d = ctx.layer
        stride, padding, dilation = ctx.conv_args
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        route = layer._weight_route(ctx, weight)
        grad_x = grad_w = grad_b = None
        batch, channels, height, width = grad_out.shape
        if not layer.sparse_enabled:  # exact dense backward, in the weight's dtype as the sparse one (autocast)
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out.to(weight.dtype), x.to(weight.dtype), weight, [channels], stride, padding, dilation, False,
                [0, 0], 1, [need_x, route != "skip", need_b],
            )
            return None if grad_x is None else grad_x.to(x.dtype), grad_w, grad_b, None, None, None, None

        kept, kept_grad = layer.select(grad_out.reshape(batch, channels, height * width))
        kept_grad = kept_grad.reshape(batch, len(kept), height, width).to(weight.dtype)  # a view, in either layout
        # Convolution backward on the kept output channels only: W[kept] and g_k (MSBP paper eqs. (16)-(17)).
        grad_x, rows_grad, _ = torch.ops.aten.convolution_backward(
            kept_grad, x.to(weight.dtype), weight.index_select(0, kept), None, stride, padding, dilation, False,
            [0, 0], 1, [need_x, route != "skip", False],
        )
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if route != "skip":
            grad_w = layer._emit_weight_grad(route, weight, kept, rows_grad)
        if need_b:
            grad_b = weight.new_zeros(channels).index_copy_(0, kept, kept_grad.sum(dim=(0, 2, 3)))
        return grad_x, grad_w, grad_b, None, None, None, None


class SparseBackwardConv2d(SparseBackwardMixin, nn.Conv2d):
    """``nn.Conv2d`` whose backward propagates only ``SI_k(dL/dh + M)`` over output channels.

    A channel's score is the sum of ``|dL/dh + M|`` over its spatial positions (and over the mini-batch for the
    unified sparsifiers: one channel set per mini-batch); kept channels propagate their whole gradient map,
    dropped channels nothing. ``state_dict`` keys and the forward pass are those of ``nn.Conv2d``.

    Args:
        in_channels: input channels.
        out_channels: output channels (the units that are sparsified).
        kernel_size: as for ``nn.Conv2d``.
        stride: as for ``nn.Conv2d``.
        padding: as for ``nn.Conv2d`` (ints, ``"same"`` or ``"valid"``).
        dilation: as for ``nn.Conv2d``.
        groups: must be 1: grouped and depthwise convolutions are not supported.
        bias: learn an additive bias.
        padding_mode: as for ``nn.Conv2d``.
        k: channels kept per backward (per example for ``topk``); give this or ``ratio``.
        ratio: fraction of the output channels kept, in (0, 1].
        sparsifier: ``"topk_unified"``, ``"topk"`` or ``"randomk"``.
        memory: MSBP memory ratio gamma in [0, 1); 0 is SBP.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        ValueError: ``groups != 1``, or bad ``k``, ``ratio``, ``sparsifier`` or ``memory``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        k: int | None = None,
        ratio: float | None = None,
        sparsifier: str = "topk_unified",
        memory: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups != 1:
            raise ValueError(
                f"groups={groups}: SparseBackwardConv2d gathers output channels and supports groups=1 only; "
                "expected groups=1 (leave grouped or depthwise convolutions dense)"
            )
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self.num_units = out_channels
        self._setup_sparse(k, ratio, sparsifier, memory)

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Apply non-zero or asymmetric padding explicitly; return the input and the symmetric padding left."""
        pads = self._reversed_padding_repeated_twice  # (left, right, top, bottom)
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        if self.padding_mode == "zeros" and symmetric:
            return x, (pads[2], pads[0])
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, pads, mode=mode), (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not self._needs_backward(x):
            return super().forward(x)
        if x.dim() == 3:  # unbatched (C, H, W)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x, padding = self._pad(x)
        stride = self.stride
        subsampled = subsampled_pointwise_input(x, self.kernel_size, stride, padding)
        if subsampled is not None:  # a oneDNN crash (see maskprop._workarounds)
            x, stride = subsampled, (1, 1)
        return _SparseConv2dFunction.apply(x, self.weight, self.bias, self, stride, padding, self.dilation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._sparse_repr()}"
