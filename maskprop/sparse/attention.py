"""Multi-head self-attention whose heads' width is a channel group.

Channel ``j`` of the group is the ``j``-th feature of every head's query, key and value: dropping it removes one
term from every head's query-key dot products and one feature from every head's output. Query, key and value
share the group, so every head keeps the same features and a subnetwork's attention is the full one at a narrower
head width: the ``qkv`` projection writes the group once for each of ``3 x heads`` head slices (a concatenated group,
:func:`~maskprop.sparse.concatenate_groups`) and ``proj`` reads it once for each head. The softmax's scale stays
the full width's, ``head_dim ** -0.5``: in masked mode the dropped features are zero, so both modes compute the same
products, and the narrow model keeps the scale it was trained with.

:func:`maskprop.make_prunable` puts :class:`SparseAttention` in place of timm's ``Attention`` (vision transformers,
DeiT, ...), with the same ``qkv`` and ``proj`` parameters and the same module tree, and
:class:`SparseMultiheadAttention` in place of torch's ``nn.MultiheadAttention`` attending a tensor to itself
(torchvision's vision transformers), with the same parameters under the same state-dict keys, and
:class:`SparseWindowAttention` in place of timm's ``WindowAttention`` (Swin Transformer), whose relative position
bias is one number per head and pair of tokens, whatever features the heads keep, and
:class:`SparseShiftedWindowAttention` in place of torchvision's ``ShiftedWindowAttention`` (the same attention, with
the windows' partition and shift inside). Attention whose query and value biases live outside ``qkv`` (BEiT's) and
the Swin Transformer v2's cosine attention are in :mod:`maskprop.sparse.biased_attention`, torchvision's MaxViT
attention in :mod:`maskprop.sparse.maxvit_attention`, timm's MaxViT and CoAtNet attention in
:mod:`maskprop.sparse.maxxvit_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SparseAttention", "SparseMultiheadAttention", "SparseShiftedWindowAttention", "SparseWindowAttention"]


class SparseAttention(nn.Module):
    """Self-attention over tokens ``(N, L, C)`` at whatever head width its projections run.

    The forward is timm's ``Attention`` (fused ``scaled_dot_product_attention``) with the head width read from the
    projection's output (``reshape(..., -1)``) and the scale given explicitly, so that it runs on the kept features
    of a subnetwork, compact or narrow.

    Args:
        qkv: The query, key and value projection, ``C -> 3 x heads x head_dim`` (a maskprop ``SparseLinear`` writing
            the concatenated group of ``3 x heads`` parts of ``group``, or a plain narrow ``nn.Linear``; a 1x1
            convolution in :class:`~maskprop.sparse.SparseAttention2d`).
        proj: The output projection, ``heads x head_dim -> C_out``.
        num_heads: Attention heads.
        head_dim: The head width (the group's channels): the scale is ``head_dim ** -0.5``. Both stay the full
            width's when :func:`maskprop.materialize` narrows the module, so that a forward computing with them
            computes what it did in training; :attr:`head_width` is the width a head runs at.
        group: The channel group of the head features (``None``: never pruned).
        attn_drop: Dropout on the attention weights (its ``p`` is what the fused kernel applies in training).
        proj_drop: Dropout after ``proj``.
        q_norm, k_norm, norm: timm's modules of those names (identities by default): ``q_norm`` and ``k_norm`` on
            each head's queries and keys ``(N, heads, L, width)``, ``norm`` on all heads' outputs side by side before
            ``proj``. The conversion puts a :class:`~maskprop.sparse.SparseLayerNorm` (or
            :class:`~maskprop.sparse.SparseRMSNorm`) of ``group`` in the first two and of the concatenated group
            ``proj`` reads in ``norm`` (a subnetwork normalises its kept features alone); attention with another
            normalisation keeps its heads whole.
    """

    head_feature_tensors: tuple[str, ...] = ()
    """The names of the module's own tensors (not ``qkv``'s or ``proj``'s) with one entry per feature of every head,
    ``heads x head_dim`` in the heads' order (:class:`~maskprop.sparse.SparseBeitAttention`'s ``q_bias``): a narrow
    model keeps the entries of the kept features (:func:`maskprop.surgery.index_sets`)."""

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 attn_drop: nn.Dropout | None = None, proj_drop: nn.Module | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 norm: nn.Module | None = None) -> None:
        super().__init__()
        if _outputs(qkv) != 3 * num_heads * head_dim or _inputs(proj) != num_heads * head_dim:
            raise ValueError(f"qkv writes {_outputs(qkv)} and proj reads {_inputs(proj)} features; expected "
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

    @property
    def head_width(self) -> int:
        """The features a head runs at: ``head_dim``, or a narrow model's kept features (read from ``qkv``)."""
        return _outputs(self.qkv) // (3 * self.num_heads)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self._output(self._attend(*self._heads(x), attn_mask, is_causal))

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values of tokens ``x`` ``(N, L, C)``, each ``(N, heads, L, width)`` at the width the
        projection runs (the full head width, or the kept features of a subnetwork)."""
        batch, tokens, _ = x.shape
        q, k, v = self._project(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _project(self, x: Tensor) -> Tensor:
        """The queries, keys and values of tokens ``x`` side by side, ``(N, L, 3 x heads x width)``: ``qkv``'s output
        (a subclass adds the biases it holds apart)."""
        return self.qkv(x)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """The fused kernel at the full width's scale, its dropout on the weights in training."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)

    def _output(self, heads: Tensor) -> Tensor:
        """The heads' outputs ``(N, heads, L, width)`` side by side and projected: ``(N, L, C_out)``."""
        batch, _, tokens, _ = heads.shape
        return self.proj_drop(self.proj(self.norm(heads.transpose(1, 2).reshape(batch, tokens, -1))))

    def batch_and_tokens(self, x: Tensor) -> tuple[int, int]:
        """The examples and tokens of the input ``x`` (the cost model prices the two products by them)."""
        return x.shape[0], x.shape[1]

    def extra_repr(self) -> str:
        narrow = f", head_width={self.head_width}" if self.head_width != self.head_dim else ""
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}{narrow}, group={self.group!r}"


def _outputs(layer: nn.Module) -> int:
    """The features a projection writes: a linear layer's, or a 1x1 convolution's channels (timm's ``Attention2d``)."""
    return layer.out_features if hasattr(layer, "out_features") else layer.out_channels


def _inputs(layer: nn.Module) -> int:
    """The features a projection reads (a linear layer's, or a 1x1 convolution's channels)."""
    return layer.in_features if hasattr(layer, "in_features") else layer.in_channels


class SparseWindowAttention(SparseAttention):
    """timm's ``WindowAttention`` (Swin Transformer: self-attention within each window of tokens, with a learned
    relative position bias) at whatever head width its projections run.

    The forward is timm's, fused, at the full width's scale: the scores of head ``h`` for tokens ``i, j`` of a window
    get ``relative_position_bias_table[relative_position_index[i, j], h]`` added, and the shifted windows' mask where
    one is given. The bias belongs to a head, not to its features, so a subnetwork keeps all of it. The parameters and
    buffers are timm's, under its state-dict keys (``qkv``, ``proj``, ``relative_position_bias_table``; the index is
    not saved, as in timm).

    Args:
        qkv, proj, num_heads, head_dim, group, attn_drop, proj_drop: As :class:`SparseAttention`'s.
        relative_position_bias_table: ``((2 Wh - 1)(2 Ww - 1), heads)``, the learned bias (timm's parameter itself;
            ``None`` for a subclass that computes the bias otherwise, :class:`SparseWindowAttentionV2`).
        relative_position_index: ``(Wh Ww, Wh Ww)`` (or flattened), each pair of a window's tokens' row of the table.
        window_size: ``(Wh, Ww)``.
        save_index: Whether the state dict holds the index (torchvision's does; timm's does not).
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 relative_position_bias_table: nn.Parameter | None, relative_position_index: Tensor,
                 window_size: Sequence[int], attn_drop: nn.Dropout | None = None,
                 proj_drop: nn.Module | None = None, save_index: bool = False) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, attn_drop=attn_drop, proj_drop=proj_drop)
        area = window_size[0] * window_size[1]
        table = relative_position_bias_table
        if table is not None and table.shape[-1] != num_heads or relative_position_index.numel() != area * area:
            raise ValueError(f"relative_position_bias_table has shape {None if table is None else tuple(table.shape)} "
                             f"and relative_position_index {tuple(relative_position_index.shape)}; expected (rows, "
                             f"{num_heads}) and {(area, area)} for {num_heads} heads and windows of "
                             f"{tuple(window_size)}")
        self.dim = qkv.in_features  # timm's names, for code that reads them
        self.window_size, self.window_area = window_size, area
        self.relative_position_bias_table = relative_position_bias_table
        self.register_buffer("relative_position_index", relative_position_index, persistent=save_index)

    def set_window_size(self, window_size: int | Sequence[int]) -> None:
        """timm's call when a model's input size is set again (``set_input_size``): the window to attend in. The bias
        table's rows are those of the window the module was made prunable with, so that window is kept (a call with
        it changes nothing) and another is a one-line error."""
        size = (window_size, window_size) if isinstance(window_size, int) else tuple(window_size)
        if size != tuple(self.window_size):
            raise ValueError(f"window_size {size}: a window attention made prunable keeps its window "
                             f"{tuple(self.window_size)}; expected that one (build the model at the new size, "
                             f"e.g. model.kwargs.img_size, and make it prunable then)")

    def _relative_position_bias(self) -> Tensor:
        """The bias of every head and pair of a window's tokens: ``(1, heads, Wh Ww, Wh Ww)``."""
        area = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Attention within windows: ``x`` ``(windows x N, tokens, C)``; ``mask`` ``(windows, tokens, tokens)``, added
        to the scores (the shifted windows' mask: 0, and -100 between tokens of different regions) or ``None``."""
        windows, tokens, _ = x.shape
        attn_mask = self._relative_position_bias()
        if mask is not None:
            count = mask.shape[0]
            mask = mask.view(1, count, 1, tokens, tokens).expand(windows // count, -1, self.num_heads, -1, -1)
            attn_mask = attn_mask + mask.reshape(-1, self.num_heads, tokens, tokens)
        return self._output(self._attend(*self._heads(x), attn_mask, False))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={tuple(self.window_size)}"


class SparseShiftedWindowAttention(SparseWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (its Swin Transformer, v1) at whatever head width its projections run.

    The forward computes what torchvision's ``shifted_window_attention`` does, on maps ``(N, H, W, C)``: pad the map
    to whole windows, shift it cyclically by ``shift_size`` (where the window is smaller than the map), attend within
    each window with the relative position bias and, when shifted, a mask of ``-100`` between tokens that came from
    different regions of the map, then undo the shift and the padding. Its head width is read from ``qkv``'s output,
    its scale is the full width's (torchvision's ``(C / heads) ** -0.5``), and its parameters and buffers are
    torchvision's, under its state-dict keys (the index too, which torchvision saves).

    Args:
        qkv, proj, num_heads, head_dim, group, relative_position_bias_table, relative_position_index, window_size: As
            :class:`SparseWindowAttention`'s.
        shift_size: ``(shift in H, shift in W)``.
        attention_dropout: torch's dropout probability on the attention weights in training.
        dropout: The dropout probability after ``proj``.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 relative_position_bias_table: nn.Parameter, relative_position_index: Tensor,
                 window_size: Sequence[int], shift_size: Sequence[int], attention_dropout: float = 0.0,
                 dropout: float = 0.0) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group,
                         relative_position_bias_table=relative_position_bias_table,
                         relative_position_index=relative_position_index, window_size=window_size,
                         attn_drop=nn.Dropout(attention_dropout), proj_drop=nn.Dropout(dropout), save_index=True)
        self.shift_size = shift_size

    @property
    def attention_dropout(self) -> float:
        """torchvision's name: the dropout probability on the attention weights."""
        return self.attn_drop.p

    @property
    def dropout(self) -> float:
        """torchvision's name: the dropout probability after ``proj``."""
        return self.proj_drop.p

    def _layout(self, height: int, width: int) -> tuple[int, int, list[int]]:
        """The padded map's height and width, and the shift (none along a side no longer than a window, and none at
        all unless the two shifts left sum to more than 0: torchvision's test, which a negative shift can fail)."""
        (wh, ww), shift = self.window_size, list(self.shift_size)
        padded = (height + (-height % wh), width + (-width % ww))
        shift = [0 if size >= side else s for size, side, s in zip((wh, ww), padded, shift)]
        return padded[0], padded[1], shift if sum(shift) > 0 else [0, 0]

    def _region_mask(self, height: int, width: int, shift: list[int], like: Tensor) -> Tensor:
        """``(windows, tokens, tokens)``: 0 between two tokens of a window that come from the same region of the
        shifted map, -100 between tokens of different regions (the cyclic shift put them side by side)."""
        (wh, ww) = self.window_size
        region = like.new_zeros(height, width)
        for i, rows in enumerate((slice(0, -wh), slice(-wh, -shift[0]), slice(-shift[0], None))):
            for j, cols in enumerate((slice(0, -ww), slice(-ww, -shift[1]), slice(-shift[1], None))):
                region[rows, cols] = 3 * i + j
        region = region.view(height // wh, wh, width // ww, ww).transpose(1, 2).reshape(-1, wh * ww)
        apart = region.unsqueeze(1) != region.unsqueeze(2)
        return torch.zeros_like(apart, dtype=like.dtype).masked_fill_(apart, -100.0)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Shifted-window attention on maps ``x`` ``(N, H, W, C)``; the output has their shape."""
        batch, height, width, channels = x.shape
        (wh, ww), (padded_h, padded_w, shift) = self.window_size, self._layout(height, width)
        x = F.pad(x, (0, 0, 0, padded_w - width, 0, padded_h - height))
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = (padded_h // wh) * (padded_w // ww)
        x = x.view(batch, padded_h // wh, wh, padded_w // ww, ww, channels).transpose(2, 3).reshape(
            batch * windows, wh * ww, channels)
        mask = self._region_mask(padded_h, padded_w, shift, x) if any(shift) else None
        out = super().forward(x, mask)
        out = out.view(batch, padded_h // wh, padded_w // ww, wh, ww, -1).transpose(2, 3).reshape(
            batch, padded_h, padded_w, -1)
        if any(shift):
            out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
        return out[:, :height, :width].contiguous()

    def batch_and_tokens(self, x: Tensor) -> tuple[int, int]:
        """The windows (every image's) and the tokens of one window: what the two products run over."""
        padded_h, padded_w, _ = self._layout(x.shape[1], x.shape[2])
        return x.shape[0] * (padded_h // self.window_size[0]) * (padded_w // self.window_size[1]), self.window_area

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shift_size={tuple(self.shift_size)}"


_TORCH_KEYS = {"qkv.weight": "in_proj_weight", "qkv.bias": "in_proj_bias", "proj.weight": "out_proj.weight",
               "proj.bias": "out_proj.bias"}
"""The state-dict keys of :class:`SparseMultiheadAttention`'s tensors in ``nn.MultiheadAttention``, by its own."""


class SparseMultiheadAttention(SparseAttention):
    """torch's ``nn.MultiheadAttention`` attending a tensor to itself, at whatever head width its projections run.

    :func:`maskprop.make_prunable` puts it in place of an ``nn.MultiheadAttention`` called as self-attention
    (``attention(x, x, x)``: torchvision's vision transformers) whose query, key and value projections are one packed
    matrix (``in_proj_weight``) without ``bias_k``, ``bias_v`` or ``add_zero_attn``. The forward is
    :class:`SparseAttention`'s behind torch's call signature: either layout (``batch_first``), unbatched ``(L, E)``
    inputs, torch's ``key_padding_mask`` and ``attn_mask`` (``True`` of a boolean mask is a position not attended, a
    float mask is added; ``is_causal`` a hint that ``attn_mask`` is the causal mask, which runs), and the attention
    weights where ``need_weights`` asks for them (then computed by matrix products, not the fused kernel: the weights
    of the kept features, after dropout as torch returns them, averaged over the heads unless
    ``average_attn_weights=False``). ``qkv`` holds ``in_proj_weight`` and ``in_proj_bias``, ``proj`` is
    ``out_proj``; the state dict has torch's keys (state-dict hooks rename them both ways), so a checkpoint of either
    module loads into the other. torch's attributes read as torch's do (``embed_dim``, ``kdim``, ``vdim``,
    ``num_heads``, ``head_dim``, ``dropout``, ``batch_first``, ``in_proj_weight``, ``in_proj_bias``, ``out_proj``: the
    same tensors and layer); a narrow model keeps ``embed_dim`` and ``head_dim`` the full model's, as it keeps the
    scale, so that a forward computing with them is unchanged (``head_width``: the features a head runs at).

    Args:
        qkv, proj, num_heads, head_dim, group: As :class:`SparseAttention`'s.
        dropout: torch's ``dropout``: the probability of dropping an attention weight in training.
        batch_first: torch's: inputs and output are ``(N, L, E)``; else ``(L, N, E)``.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int, group: str | None = None, *,
                 dropout: float = 0.0, batch_first: bool = False) -> None:
        super().__init__(qkv, proj, num_heads, head_dim, group, attn_drop=nn.Dropout(dropout))
        self.batch_first = batch_first
        # torch's embed_dim (and kdim, vdim): the width of the tokens it was built for, kept by a narrow model (as the
        # scale is), so that a forward computing with it computes what it did in training
        self.embed_dim = self.kdim = self.vdim = qkv.in_features
        self.register_state_dict_post_hook(_to_torch_keys)
        self.register_load_state_dict_pre_hook(_from_torch_keys)
        self.register_load_state_dict_post_hook(_missing_as_torch_keys)

    # nn.MultiheadAttention's settings and parameters under its names, read-only, for code that reads them (a forward
    # reshaping by ``embed_dim``, an initialisation of ``in_proj_weight``): the form this module computes has them so.
    _qkv_same_embed_dim, add_zero_attn = True, False
    bias_k = bias_v = q_proj_weight = k_proj_weight = v_proj_weight = None

    @property
    def dropout(self) -> float:
        """torch's ``dropout``: the probability of dropping an attention weight in training."""
        return self.attn_drop.p

    @property
    def in_proj_weight(self) -> nn.Parameter:
        """torch's packed query, key and value weight: ``qkv.weight`` itself."""
        return self.qkv.weight

    @property
    def in_proj_bias(self) -> nn.Parameter | None:
        return self.qkv.bias

    @property
    def out_proj(self) -> nn.Linear:
        """torch's output projection: ``proj`` itself."""
        return self.proj

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if key is not query or value is not query:
            raise ValueError(f"{type(self).__name__} attends a tensor to itself, got a key or value that is not the "
                             f"query; expected attention(x, x, x) (cross-attention keeps nn.MultiheadAttention)")
        if query.dim() not in (2, 3):
            raise ValueError(f"query has shape {tuple(query.shape)}; expected (L, E) or "
                             f"{'(N, L, E)' if self.batch_first else '(L, N, E)'} (batch_first={self.batch_first})")
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True without attn_mask; expected the causal mask as attn_mask, as "
                             "nn.MultiheadAttention takes it (is_causal is a hint)")
        batched = query.dim() == 3
        x = query.unsqueeze(0) if not batched else query if self.batch_first else query.transpose(0, 1)
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        batch, tokens = x.shape[0], x.shape[1]
        mask = self._mask(key_padding_mask, attn_mask, batch, tokens, x.dtype)
        q, k, v = self._heads(x)
        weights = None
        if need_weights:  # torch's math: the weights it returns are those the values are multiplied by, dropout and all
            weights = torch.softmax(q @ k.transpose(-2, -1) * self.scale + (0.0 if mask is None else mask), dim=-1)
            weights = F.dropout(weights, self.attn_drop.p, self.training)
            heads = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:  # is_causal says attn_mask is causal: it is what runs
            heads = self._attend(q, k, v, mask, False)
        out = self._output(heads)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1).contiguous()), weights

    def _mask(self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, batch: int, tokens: int,
              dtype: torch.dtype) -> Tensor | None:
        """torch's two masks as one additive mask that broadcasts to ``(N, heads, L, L)`` (``None``: neither)."""
        mask = None
        if attn_mask is not None:
            shapes = {2: (tokens, tokens), 3: (batch * self.num_heads, tokens, tokens)}
            if shapes.get(attn_mask.dim()) != tuple(attn_mask.shape):
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected {shapes[2]} or {shapes[3]} "
                                 f"((L, L) or (N x heads, L, L))")
            mask = _additive(attn_mask, "attn_mask", dtype)
            mask = mask.view(batch, self.num_heads, tokens, tokens) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, tokens):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected "
                                 f"{(batch, tokens)} (N, L)")
            padding = _additive(key_padding_mask, "key_padding_mask", dtype).view(batch, 1, 1, tokens)
            mask = padding if mask is None else mask + padding
        return mask

    def batch_and_tokens(self, query: Tensor) -> tuple[int, int]:
        """The examples and tokens of ``query`` in torch's layouts: ``(L, E)``, and ``(N, L, E)`` or ``(L, N, E)``."""
        if query.dim() == 2:
            return 1, query.shape[0]
        return (query.shape[0], query.shape[1]) if self.batch_first else (query.shape[1], query.shape[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """torch's attention mask as the values added to the scores: a boolean mask's ``True`` is ``-inf`` (not
    attended), a float mask is added as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"{name} is a {mask.dtype} tensor; expected a bool or floating-point mask")
    return mask.to(dtype)


def _to_torch_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: the tensors under ``nn.MultiheadAttention``'s keys, in its order (they are the last ones
    written, so popping and writing them again keeps the model's order)."""
    for own, torch_key in _TORCH_KEYS.items():
        if prefix + own in state_dict:
            state_dict[prefix + torch_key] = state_dict.pop(prefix + own)


def _from_torch_keys(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """Load hook: ``nn.MultiheadAttention``'s keys read as the tensors of ``qkv`` and ``proj``."""
    module._load_prefix = prefix  # for the missing keys' names, after the load
    for own, torch_key in _TORCH_KEYS.items():
        if prefix + torch_key in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + torch_key)


def _missing_as_torch_keys(module: nn.Module, incompatible_keys: object) -> None:
    """Load post-hook: a tensor the state dict lacked is named by ``nn.MultiheadAttention``'s key (``in_proj_bias``,
    not ``qkv.bias``) in ``load_state_dict``'s missing keys and its strict error."""
    prefix = module.__dict__.pop("_load_prefix", None)
    if prefix is None:
        return
    names = {prefix + own: prefix + torch_key for own, torch_key in _TORCH_KEYS.items()}
    missing = incompatible_keys.missing_keys
    missing[:] = [names.get(key, key) for key in missing]
