"""Multi-head self-attention whose heads' width is a channel group.

Channel ``j`` of the group is the ``j``-th feature of every head's query, key and value: dropping it removes one
term from every head's query-key dot products and one feature from every head's output. Query, key and value
share the group, so every head keeps the same features and a subnetwork's attention is the full one at a narrower
head width: the ``qkv`` projection writes the group once for each of ``3 x heads`` head slices (a concatenated group,
:func:`~maskprop.sparse.concatenate_groups`) and ``proj`` reads it once for each head. The softmax's scale stays
the full width's, ``head_dim ** -0.5``: in masked mode the dropped features are zero, so both modes compute the same
products, and the narrow model keeps the scale it was trained with.

:func:`maskprop.make_prunable` puts this module in place of timm's ``Attention`` (vision transformers, DeiT, ...),
with the same ``qkv`` and ``proj`` parameters and the same module tree.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseAttention"]


class SparseAttention(nn.Module):
    """Self-attention over tokens ``(N, L, C)`` at whatever head width its projections run.

    The forward is timm's ``Attention`` (fused ``scaled_dot_product_attention``) with the head width read from the
    projection's output (``reshape(..., -1)``) and the scale given explicitly, so that it runs on the kept features
    of a subnetwork, compact or narrow.

    Args:
        qkv: The query, key and value projection, ``C -> 3 x heads x head_dim`` (a maskprop ``SparseLinear`` writing
            the concatenated group of ``3 x heads`` parts of ``group``, or a plain narrow ``nn.Linear``).
        proj: The output projection, ``heads x head_dim -> C_out``.
        num_heads: Attention heads.
        head_dim: The head width (the group's channels): the scale is ``head_dim ** -0.5``, and stays so when
            :func:`maskprop.materialize` narrows the module (``head_dim`` then the kept width).
        group: The channel group of the head features (``None``: never pruned).
        attn_drop: Dropout on the attention weights (its ``p`` is what the fused kernel applies in training).
        proj_drop: Dropout after ``proj``.
        q_norm, k_norm, norm: timm's modules of those names, kept for the module tree (identities: the conversion
            leaves attention with a normalisation whole).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 attn_drop: nn.Dropout | None = None, proj_drop: nn.Module | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if qkv.out_features != 3 * num_heads * head_dim or proj.in_features != num_heads * head_dim:
            raise ValueError(f"qkv writes {qkv.out_features} and proj reads {proj.in_features} features; expected "
                             f"{3 * num_heads * head_dim} and {num_heads * head_dim} for {num_heads} heads of "
                             f"{head_dim}")
        self.num_heads, self.head_dim, self.group = num_heads, head_dim, group
        self.scale = head_dim ** -0.5
        self.qkv = qkv
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = attn_drop if attn_drop is not None else nn.Dropout(0.0)
        self.norm = norm if norm is not None else nn.Identity()
        self.proj = proj
        self.proj_drop = proj_drop if proj_drop is not None else nn.Identity()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal,
                                           scale=self.scale)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, -1))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, group={self.group!r}"
