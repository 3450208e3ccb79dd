"""timm's MaxViT and CoAtNet attention (``timm.models.maxxvit.AttentionCl``) with its heads' features as a channel
group.

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

:func:`maskprop.make_prunable` puts :class:`SparseAttentionCl` in place of timm's module, with the same parameters
under the same state-dict keys (``qkv``, ``rel_pos``, ``proj``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention import SparseAttention

__all__ = ["SparseAttentionCl"]


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
        batch, tokens, _ = x.shape
        out = self._project(x)
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
