"""MaxViT's attention (torchvision's ``RelativePositionalMultiHeadAttention``) with its heads' features as a channel
group.

torchvision's MaxViT partitions each map into windows (or a grid) of ``P`` tokens outside the attention module, which
reads ``(B, G, P, D)``: ``G`` groups of ``P`` tokens per image. Within each group it attends as the Swin
Transformer's window attention does: ``to_qkv`` writes the queries, keys and values of every head (``(3, heads,
head_dim)`` in that order), head ``h``'s scores of tokens ``i, j`` get ``relative_position_bias_table[
relative_position_index[i, j], h]`` added, and ``merge`` projects the heads' outputs side by side. The bias belongs
to a head, not to its features, and the softmax's scale is a constant of the module (torchvision's ``feat_dim **
-0.5``, the width of the tokens, not of a head), so a subnetwork that drops feature ``j`` of every head's query, key
and value computes, on the kept features, exactly what the full module computes with them zero.

:func:`maskprop.make_prunable` puts :class:`SparseRelativePositionalAttention` in place of torchvision's module, with
the same parameters and buffers under the same state-dict keys (``to_qkv``, ``merge``, the bias table and the saved
index).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .attention import SparseWindowAttention

__all__ = ["SparseRelativePositionalAttention"]


class SparseRelativePositionalAttention(SparseWindowAttention):
    """torchvision's MaxViT attention (``torchvision.models.maxvit.RelativePositionalMultiHeadAttention``) at
    whatever head width its projections run.

    The forward computes torchvision's on tokens ``(B, G, P, D)`` (module docstring): attention within each of the
    ``B x G`` groups of ``P`` tokens, with the relative position bias of every head and pair and the module's scale,
    by the fused kernel. ``to_qkv`` and ``merge`` are the modules :class:`~maskprop.sparse.SparseAttention` calls
    ``qkv`` and ``proj`` (both names read them; the module tree and the state dict hold torchvision's), and
    torchvision's attributes read as its own do (``n_heads``, ``head_dim``, ``size``, ``max_seq_len``,
    ``scale_factor``, :meth:`get_relative_positional_bias`); a narrow model keeps ``head_dim`` and the scale of the
    full one.

    Args:
        to_qkv: The query, key and value projection, ``D -> 3 x heads x head_dim`` (torchvision's layer, or maskprop's
            holding its parameters).
        merge: The output projection, ``heads x head_dim -> D``.
        num_heads, head_dim, group: As :class:`~maskprop.sparse.SparseAttention`'s.
        relative_position_bias_table: ``((2 size - 1)^2, heads)``, torchvision's parameter itself.
        relative_position_index: ``(P, P)``, each pair of a group's tokens' row of the table (torchvision's buffer,
            saved in the state dict as torchvision saves it).
        max_seq_len: ``P``, the tokens of a group: a square of ``size`` on a side.
        scale: The softmax's scale, torchvision's ``scale_factor`` (``D ** -0.5``).
    """

    def __init__(self, to_qkv: nn.Linear, merge: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 relative_position_bias_table: nn.Parameter, relative_position_index: Tensor, max_seq_len: int,
                 scale: float) -> None:
        size = math.isqrt(max_seq_len)
        if size * size != max_seq_len:
            raise ValueError(f"max_seq_len is {max_seq_len}; expected a square (the tokens of a square window)")
        super().__init__(to_qkv, merge, num_heads, head_dim, group,
                         relative_position_bias_table=relative_position_bias_table,
                         relative_position_index=relative_position_index, window_size=(size, size), save_index=True)
        self.scale = float(scale)
        self.size, self.max_seq_len = size, max_seq_len
        modules = dict(self._modules)  # torchvision's names, in its order (the state dict's)
        modules["to_qkv"], modules["merge"] = modules.pop("qkv"), modules.pop("proj")
        self._modules.clear()
        self._modules.update({"to_qkv": modules.pop("to_qkv"), "merge": modules.pop("merge")} | modules)

    @property
    def qkv(self) -> nn.Module:
        """``to_qkv``, under :class:`~maskprop.sparse.SparseAttention`'s name."""
        return self._modules["to_qkv"]

    @property
    def proj(self) -> nn.Module:
        """``merge``, under :class:`~maskprop.sparse.SparseAttention`'s name."""
        return self._modules["merge"]

    @property
    def n_heads(self) -> int:
        """torchvision's name: the attention heads."""
        return self.num_heads

    @property
    def scale_factor(self) -> float:
        """torchvision's name: the softmax's scale."""
        return self.scale

    def get_relative_positional_bias(self) -> Tensor:
        """torchvision's method: the bias of every head and pair of a group's tokens, ``(1, heads, P, P)``."""
        return self._relative_position_bias()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Attention within each group of tokens ``x`` ``(B, G, P, D)``; the output has their shape (``merge``'s
        width)."""
        batch, groups, tokens, channels = x.shape
        out = super().forward(x.reshape(batch * groups, tokens, channels))
        return out.view(batch, groups, tokens, -1)

    def batch_and_tokens(self, x: Tensor) -> tuple[int, int]:
        """The groups of tokens (every image's) and the tokens of one: what the two products run over."""
        return x.shape[0] * x.shape[1], x.shape[2]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.6g}"
