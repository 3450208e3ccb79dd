"""timm's MaxViT and CoAtNet attention (``timm.models.maxxvit.AttentionCl`` on channels-last tokens, ``Attention2d``
on maps) with its heads' features as a channel group.

timm's MaxViT partitions each channels-last map into windows (or a grid) outside the attention module, which reads
``(B, ..., C)``: every example's tokens, flattened. ``qkv`` writes the queries, keys and values of every head, laid out
``(heads, 3, dim_head)`` (``head_first``, timm's own models) or ``(3, heads, dim_head)`` (the TensorFlow ports); either
way feature ``j`` of every head's query, key and value is one channel of the heads' group, written once per head
slice. The scores of head ``h`` get one number per pair of tokens added: the ``rel_pos`` module's bias (a learned
table, ``RelPosBias`` or ``RelPosBiasTf``, or a small MLP on the pairs' relative coordinates, ``RelPosMlp``) belongs to
a head, not to its features. The softmax's scale is ``dim_head ** -0.5``, a constant of the module (timm's fused path
takes the default scale of ``scaled_dot_product_attention``, the reciprocal square root of the full head width,
the same number), so a subnetwork that drops feature ``j`` of every head computes, on the kept features, exactly
what the full module computes with them zero.

``Attention2d`` computes the same on maps ``(B, C, H, W)`` with 1x1 convolutions as ``qkv`` and ``proj``, attending
among every position of the map (CoAtNet's transformer blocks; MaxViT's partitions with ``use_nchw_attn``), its
channels laid out as ``AttentionCl``'s features.

:func:`maskprop.make_prunable` puts :class:`SparseAttentionCl` and :class:`SparseAttention2d` in place of timm's
modules, with the same parameters under the same state-dict keys (``qkv``, ``rel_pos``, ``proj``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import SparseAttention

__all__ = ["SparseAttention2d", "SparseAttentionCl"]


class SparseAttentionCl(SparseAttention):
    """timm's channels-last MaxViT attention (``timm.models.maxxvit.AttentionCl``) at whatever head width its
    projections run.

    The forward is timm's, fused, at the full width's scale, on tokens ``(B, ..., C)`` (module docstring): the heads
    read from ``qkv``'s output in timm's layout (``head_first``), the ``rel_pos`` module's bias of every head and pair
    of tokens (or the ``shared_rel_pos`` given, where the module has none) added to the scores, the output in the
    input's shape at ``proj``'s width (``dim_out``, which may be wider than the tokens). The parameters are timm's,
    under its state-dict keys; timm's attribute names read as its own do (``num_heads``, ``dim_head``,
    ``head_first``, ``scale``, ``rel_pos``); a narrow model keeps ``dim_head`` and the scale of the full one.

    Args:
        qkv, proj, num_heads, head_dim, group, attn_drop, proj_drop: As :class:`SparseAttention`'s.
        rel_pos: timm's relative position module (its ``get_bias()``: ``(1, heads, L, L)``, one number per head and
            pair of tokens), kept whole, or ``None``.
        head_first: timm's setting: ``qkv``'s outputs laid out ``(heads, 3, head_dim)`` (``True``) or
            ``(3, heads, head_dim)``.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 rel_pos: nn.Module | None = None, head_first: bool = True, attn_drop: nn.Dropout | None = None,
                 proj_drop: nn.Module | None = None) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, attn_drop=attn_drop, proj_drop=proj_drop)
        self.head_first = bool(head_first)
        self.fused_attn = True  # timm's flag: the fused kernel runs (the same computation as timm's other path)
        modules = dict(self._modules)  # timm's order (the state dict's): qkv, rel_pos, attn_drop, proj, proj_drop
        self._modules.clear()
        self._modules.update({"qkv": modules.pop("qkv"), "rel_pos": rel_pos} | modules)

    @property
    def dim_head(self) -> int:
        """timm's name: the full head width (the scale's)."""
        return self.head_dim

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values of tokens ``x`` ``(N, L, C)`` in timm's layout of ``qkv``'s outputs, each
        ``(N, heads, L, width)``."""
        return self._split(self._project(x))

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values in ``qkv``'s outputs ``(N, L, 3 x heads x width)``, laid out as timm lays
        them out, each ``(N, heads, L, width)``."""
        batch, tokens, _ = out.shape
        if self.head_first:
            out = out.reshape(batch, tokens, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        else:
            out = out.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = out.unbind(0)
        return q, k, v

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Attention among the tokens of each example of ``x`` ``(B, ..., C)``; the output has its shape at
        ``proj``'s width. ``shared_rel_pos`` (added to the scores) counts only where the module has no ``rel_pos``,
        as in timm."""
        restore = x.shape[:-1]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        out = self._output(self._attend(*self._heads(x), bias, False))
        return out.reshape(*restore, out.shape[-1])

    def batch_and_tokens(self, x: Tensor) -> tuple[int, int]:
        """The examples and the tokens of one (all dimensions between the first and the last)."""
        return x.shape[0], x[0, ..., 0].numel()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head_first={self.head_first}"


class SparseAttention2d(SparseAttentionCl):
    """timm's MaxViT and CoAtNet attention on maps (``timm.models.maxxvit.Attention2d``) at whatever head width its
    projections run.

    The same attention as :class:`SparseAttentionCl`'s among the ``H x W`` positions of each map ``(B, C, H, W)``,
    with ``qkv`` and ``proj`` 1x1 convolutions (maskprop's ``SparseConv2d``, or plain narrow ``nn.Conv2d``): the heads
    read from ``qkv``'s output channels in timm's layout, their outputs side by side as the channels ``proj`` reads,
    the output a map at ``proj``'s width. CoAtNet's transformer blocks attend among every position of the map, their
    bias (``rel_pos``) of every pair.

    Args:
        qkv: ``C -> 3 x heads x head_dim``, a 1x1 convolution.
        proj: ``heads x head_dim -> C_out``, a 1x1 convolution.
        num_heads, head_dim, group, rel_pos, head_first, attn_drop, proj_drop: As :class:`SparseAttentionCl`'s.
    """

    def forward(self, x: Tensor, shared_rel_pos: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Attention among the positions of each map ``x`` ``(B, C, H, W)``; the output is ``(B, C_out, H, W)``.
        ``shared_rel_pos`` counts only where the module has no ``rel_pos``, as in timm."""
        batch, _, height, width = x.shape
        out = self._project(x).reshape(batch, -1, height * width).transpose(1, 2)  # (B, H W, 3 heads width)
        q, k, v = self._split(out)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos
        heads = self._attend(q, k, v, bias, False)  # (B, heads, H W, width)
        heads = heads.transpose(-1, -2).reshape(batch, -1, height, width)
        return self.proj_drop(self.proj(heads))

    def batch_and_tokens(self, x: Tensor) -> tuple[int, int]:
        """The maps and the positions of one."""
        return x.shape[0], x.shape[2] * x.shape[3]
