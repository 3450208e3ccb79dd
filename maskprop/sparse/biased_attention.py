"""Attention whose query and value biases live outside ``qkv``, and the Swin Transformer v2's cosine attention, with
their heads' features as a channel group.

timm's BEiT attention and its Swin Transformer v2 window attention run ``qkv`` without a bias of its own and add
``cat(q_bias, k_bias, v_bias)``, two learned vectors and a zero one that the attention module holds. Entry ``j`` of
head ``h``'s part of each belongs to the channel ``j`` of the heads' group, as row ``j`` of the head's slice of
``qkv`` does, so a subnetwork adds the entries of the features it keeps: the bias gathered at the outputs ``qkv``
computes in compact mode (zero at padding), and the bias with the dropped entries zeroed in masked mode, so that a
dropped feature is zero in every query, key and value in both modes. ``k_bias`` is not a tensor of its own here:
timm's is a zero buffer that no state dict holds, so the module gives zeros of ``q_bias``'s shape in its name.
torchvision's Swin Transformer v2 keeps the bias in ``qkv`` and ignores its key part: the module subtracts it.

The Swin Transformer v2's cosine attention normalises each head's query and key over the head's features, multiplies
their products by a learned per-head factor (``exp(logit_scale)``, clamped at 100) and adds ``16 sigmoid`` of a bias
that a small MLP (``cpb_mlp``) computes from each pair of a window's tokens' relative coordinates: one number per head
and pair, whatever features the heads keep. The norm of a compact head's kept features is the norm of the whole
head in masked mode, where the dropped features are zero, so the two modes compute the same attention; the scale is
the learned one, not the head width's.

:func:`maskprop.make_prunable` puts :class:`SparseBeitAttention` in place of timm's ``beit.Attention`` (BEiT,
BEiT v2), :class:`SparseWindowAttentionV2` in place of timm's ``swin_transformer_v2.WindowAttention`` and
:class:`SparseShiftedWindowAttentionV2` in place of torchvision's ``ShiftedWindowAttentionV2`` (``swin_v2_t``),
with the same parameters under the same state-dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SparseAttention, SparseShiftedWindowAttention, SparseWindowAttention
from .modules import SparseModule

__all__ = ["SparseBeitAttention", "SparseShiftedWindowAttentionV2", "SparseWindowAttentionV2"]


class _SubnetworkBias(SparseModule):
    """A module that adds a bias of its own to ``qkv``'s outputs: it follows the subnetwork (the execution state
    :func:`maskprop.use_mask` installs on every maskprop module) to add the bias entries of the outputs ``qkv``
    computes."""

    qkv: nn.Linear

    def _subnetwork_bias(self, bias: Tensor) -> Tensor:
        """``bias`` (one entry per output of the full ``qkv``) as the subnetwork's ``qkv`` outputs take it: whole
        without a mask, its dropped entries zero in masked mode, the entries of the computed outputs in compact mode
        (zero at padding)."""
        state = self.execution_state
        group = getattr(self.qkv, "out_group", None)
        if state is None or group is None:
            return bias
        if state.mode == "masked":
            return state.apply_mask(group, bias, last=True)
        index = state.index(group)
        if index is None:  # the heads keep every feature
            return bias
        gathered = bias.index_select(0, index)
        real = state.real(group)
        return gathered if real is None else gathered * real.to(gathered.dtype)


def _check_biases(q_bias: nn.Parameter | None, v_bias: nn.Parameter | None, width: int) -> None:
    if (q_bias is None) != (v_bias is None) or q_bias is not None and (
            q_bias.shape != (width,) or v_bias.shape != (width,)):
        shapes = [None if b is None else tuple(b.shape) for b in (q_bias, v_bias)]
        raise ValueError(f"q_bias and v_bias have shapes {shapes[0]} and {shapes[1]}; expected both None or both "
                         f"({width},) (heads x head_dim)")


class _SeparateBiases(_SubnetworkBias):
    """timm's ``q_bias`` and ``v_bias`` (parameters of the attention module) and its zero ``k_bias``, added to
    ``qkv``'s output."""

    q_bias: nn.Parameter | None
    v_bias: nn.Parameter | None
    head_feature_tensors = ("q_bias", "v_bias")

    @property
    def k_bias(self) -> Tensor | None:
        """timm's key bias: zeros (a buffer no state dict holds in timm), as many as ``q_bias`` has entries."""
        return None if self.q_bias is None else torch.zeros_like(self.q_bias, requires_grad=False)

    def _project(self, x: Tensor) -> Tensor:
        out = self.qkv(x)
        if self.q_bias is None:
            return out
        return out + self._subnetwork_bias(torch.cat((self.q_bias, self.k_bias, self.v_bias)))


class SparseBeitAttention(_SeparateBiases, SparseAttention):
    """timm's BEiT attention (``timm.models.beit.Attention``) at whatever head width its projections run.

    The forward is timm's, fused, at the full width's scale: ``qkv`` (no bias of its own) plus
    ``cat(q_bias, 0, v_bias)`` for the features computed (module docstring), and, added to the scores, head ``h``'s
    ``relative_position_bias_table[relative_position_index[i, j], h]`` for tokens ``i, j`` (the class token's rows
    too) where the model has a relative position bias in each block, and the bias its blocks share where it is given
    (``shared_rel_pos_bias``). Both belong to a head, not to its features, so a subnetwork keeps all of them. The
    parameters are timm's, under its state-dict keys (``q_bias``, ``v_bias``, ``relative_position_bias_table``,
    ``qkv``, ``proj``; the index is not saved, as in timm).

    Args:
        qkv, proj, num_heads, head_dim, group, attn_drop, proj_drop: As :class:`SparseAttention`'s (``qkv`` without a
            bias).
        q_bias, v_bias: timm's parameters, ``heads x head_dim`` entries each, or both ``None`` (no bias).
        relative_position_bias_table: ``(rows, heads)``, timm's parameter, or ``None`` (no bias in the block).
        relative_position_index: ``(L, L)``: each pair of the ``L`` tokens' row of the table (with the table).
        window_size: timm's ``window_size``: the patch grid the table was made for (with the table).
        qkv_bias_separate: timm's setting (the bias added after ``qkv`` rather than in its ``F.linear``: the same).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 q_bias: nn.Parameter | None, v_bias: nn.Parameter | None,
                 relative_position_bias_table: nn.Parameter | None = None,
                 relative_position_index: Tensor | None = None, window_size: Sequence[int] | None = None,
                 qkv_bias_separate: bool = False, attn_drop: nn.Dropout | None = None,
                 proj_drop: nn.Module | None = None) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, attn_drop=attn_drop, proj_drop=proj_drop)
        if qkv.bias is not None:
            raise ValueError("qkv has a bias of its own; expected qkv without one (BEiT's bias is q_bias and v_bias)")
        _check_biases(q_bias, v_bias, num_heads * head_dim)
        table, index = relative_position_bias_table, relative_position_index
        given = {table is None, index is None, window_size is None}
        if len(given) > 1 or table is not None and (table.dim() != 2 or table.shape[1] != num_heads
                                                   or index.dim() != 2 or index.shape[0] != index.shape[1]):
            raise ValueError(f"relative_position_bias_table has shape {None if table is None else tuple(table.shape)}"
                             f", relative_position_index {None if index is None else tuple(index.shape)} and "
                             f"window_size is {window_size}; expected (rows, {num_heads}), (L, L) and the grid, or "
                             f"all None")
        self.q_bias, self.v_bias = q_bias, v_bias
        self.qkv_bias_separate = qkv_bias_separate
        self.window_size = None if window_size is None else tuple(window_size)
        self.relative_position_bias_table = table
        if index is None:
            self.relative_position_index = None
        else:
            self.register_buffer("relative_position_index", index, persistent=False)

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """timm's call when a model's input size is set again: the grid the relative position bias is for. The bias
        table's rows are those of the grid the module was made prunable with, so that grid is kept (a call with it,
        or any call to a module without the bias, changes nothing) and another is a one-line error."""
        if self.window_size is None:
            return
        size = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        if size != self.window_size:
            raise ValueError(f"window_size {size}: a BEiT attention made prunable keeps the grid {self.window_size} "
                             f"of its relative position bias; expected that one (build the model at the new size, "
                             f"e.g. model.kwargs.img_size, and make it prunable then)")

    def _relative_position_bias(self) -> Tensor | None:
        """The bias of every head and pair of tokens, ``(1, heads, L, L)``; ``None`` without a table."""
        if self.relative_position_bias_table is None:
            return None
        tokens = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Attention over tokens ``x`` ``(N, L, C)``; ``shared_rel_pos_bias`` ``(1, heads, L, L)``: the bias the
        model's blocks share, added to the scores, or ``None``."""
        bias = self._relative_position_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return self._output(self._attend(*self._heads(x), bias, False))

    def extra_repr(self) -> str:
        window = f", window_size={self.window_size}" if self.window_size is not None else ""
        return f"{super().extra_repr()}{window}"


class _CosineAttention:
    """The Swin Transformer v2's attention (module docstring): cosine similarity of each head's query and key times
    ``exp(logit_scale)``, clamped at 100, plus ``16 sigmoid`` of the bias ``cpb_mlp`` computes from the relative
    coordinates of each pair of a window's tokens."""

    logit_scale: nn.Parameter
    cpb_mlp: nn.Module
    relative_coords_table: Tensor
    relative_position_index: Tensor
    num_heads: int
    window_area: int
    attn_drop: nn.Dropout
    training: bool

    def _relative_position_bias(self) -> Tensor:
        """The bias of every head and pair of a window's tokens: ``(1, heads, Wh Ww, Wh Ww)``."""
        area = self.window_area
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """The fused kernel on the normalised queries times each head's learned scale and the normalised keys, its
        dropout on the weights in training."""
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        q, k = F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=1.0,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)


def _check_cosine(logit_scale: nn.Parameter, relative_coords_table: Tensor, num_heads: int) -> None:
    if tuple(logit_scale.shape) != (num_heads, 1, 1) or relative_coords_table.shape[-1] != 2:
        raise ValueError(f"logit_scale has shape {tuple(logit_scale.shape)} and relative_coords_table "
                         f"{tuple(relative_coords_table.shape)}; expected ({num_heads}, 1, 1) and (..., 2) for "
                         f"{num_heads} heads")


def _put_first(entries: dict, names: Sequence[str]) -> None:
    """Move ``names`` to the front of a module's ``_modules`` or ``_buffers`` (the order of the state dict)."""
    rest = {name: value for name, value in entries.items() if name not in names}
    first = {name: entries[name] for name in names}
    entries.clear()
    entries.update(first | rest)


class SparseWindowAttentionV2(_SeparateBiases, _CosineAttention, SparseWindowAttention):
    """timm's Swin Transformer v2 window attention (``timm.models.swin_transformer_v2.WindowAttention``) at whatever
    head width its projections run.

    The forward is timm's: ``qkv`` (no bias of its own) plus ``cat(q_bias, 0, v_bias)`` for the features computed,
    cosine attention within each window with the continuous position bias (module docstring) and the shifted
    windows' mask where one is given, the fused kernel running it. The parameters and buffers are timm's, under its
    state-dict keys (``logit_scale``, ``q_bias``, ``v_bias``, ``cpb_mlp``, ``qkv``, ``proj``; the coordinates table and
    the index are not saved, as in timm).

    Args:
        qkv, proj, num_heads, head_dim, group, relative_position_index, window_size, attn_drop, proj_drop: As
            :class:`~maskprop.sparse.SparseWindowAttention`'s (``qkv`` without a bias).
        q_bias, v_bias: As :class:`SparseBeitAttention`'s.
        logit_scale: ``(heads, 1, 1)``, timm's parameter.
        cpb_mlp: The MLP from a pair's relative coordinates to its bias of every head (timm's module).
        relative_coords_table: ``(1, 2 Wh - 1, 2 Ww - 1, 2)``, the relative coordinates it reads (timm's buffer).
        pretrained_window_size: timm's setting (the window the coordinates are scaled for, kept for code that reads
            it).
        qkv_bias_separate: timm's setting (the same computation).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 q_bias: nn.Parameter | None, v_bias: nn.Parameter | None, logit_scale: nn.Parameter,
                 cpb_mlp: nn.Module, relative_coords_table: Tensor, relative_position_index: Tensor,
                 window_size: Sequence[int], pretrained_window_size: Sequence[int] = (0, 0),
                 qkv_bias_separate: bool = False, attn_drop: nn.Dropout | None = None,
                 proj_drop: nn.Module | None = None) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, relative_position_bias_table=None,
                         relative_position_index=relative_position_index, window_size=window_size,
                         attn_drop=attn_drop, proj_drop=proj_drop)
        if qkv.bias is not None:
            raise ValueError("qkv has a bias of its own; expected qkv without one (the bias is q_bias and v_bias)")
        _check_biases(q_bias, v_bias, num_heads * head_dim)
        _check_cosine(logit_scale, relative_coords_table, num_heads)
        del self.relative_position_bias_table  # timm's module has none: the MLP computes the bias
        self.logit_scale = logit_scale
        self.q_bias, self.v_bias = q_bias, v_bias
        self.qkv_bias_separate = qkv_bias_separate
        self.pretrained_window_size = tuple(pretrained_window_size)
        self.cpb_mlp = cpb_mlp
        _put_first(self._modules, ["cpb_mlp"])  # timm's order of the state dict
        self.register_buffer("relative_coords_table", relative_coords_table, persistent=False)


class SparseShiftedWindowAttentionV2(_SubnetworkBias, _CosineAttention, SparseShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttentionV2`` (its Swin Transformer v2, ``swin_v2_t``) at whatever head width its
    projections run.

    The forward computes what torchvision's ``shifted_window_attention`` does with a ``logit_scale``: the windows'
    padding, shift and mask of :class:`~maskprop.sparse.SparseShiftedWindowAttention`, ``qkv`` with the key part of its
    bias left out (torchvision zeroes it in every forward: here it is subtracted from ``qkv``'s output, the entries
    of the computed features, so its gradient is zero as in torchvision), and cosine attention with the continuous
    position bias (module docstring). The parameters and buffers are torchvision's, under its state-dict keys (the
    coordinates table and the index too, which torchvision saves).

    Args:
        qkv, proj, num_heads, head_dim, group, relative_position_index, window_size, shift_size, attention_dropout,
            dropout: As :class:`~maskprop.sparse.SparseShiftedWindowAttention`'s.
        logit_scale, cpb_mlp, relative_coords_table: As :class:`SparseWindowAttentionV2`'s (torchvision's).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 logit_scale: nn.Parameter, cpb_mlp: nn.Module, relative_coords_table: Tensor,
                 relative_position_index: Tensor, window_size: Sequence[int], shift_size: Sequence[int],
                 attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, relative_position_bias_table=None,
                         relative_position_index=relative_position_index, window_size=window_size,
                         shift_size=shift_size, attention_dropout=attention_dropout, dropout=dropout)
        _check_cosine(logit_scale, relative_coords_table, num_heads)
        del self.relative_position_bias_table  # torchvision's module has none: the MLP computes the bias
        self.logit_scale = logit_scale
        self.cpb_mlp = cpb_mlp
        self.register_buffer("relative_coords_table", relative_coords_table)
        _put_first(self._buffers, ["relative_coords_table"])  # torchvision's order of the state dict

    def _project(self, x: Tensor) -> Tensor:
        out = self.qkv(x)
        if self.qkv.bias is None:
            return out
        third = self.qkv.bias.shape[0] // 3
        bias = self.qkv.bias
        key = torch.cat((bias.new_zeros(third), bias[third:2 * third], bias.new_zeros(bias.shape[0] - 2 * third)))
        return out - self._subnetwork_bias(key)
