"""Swap a model's ``nn.Linear`` / ``nn.Conv2d`` modules for their sparse-backward versions, and manage them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from maskprop.sbp.layers import (
    SparseBackwardConv2d,
    SparseBackwardLinear,
    SparseBackwardMixin,
    check_memory_ratio,
    keep_count,
)
from maskprop.sbp.sparsifiers import get_sparsifier
from maskprop.sparse.attention import SparseAttention
from maskprop.sparse.groups import drop_concatenations
from maskprop.sparse.layernorm import SparseChannelNorm
from maskprop.sparse.modules import SparseBatchNorm2d, SparseConv2d, SparseLinear

logger = logging.getLogger(__name__)

_CONVERTIBLE = (nn.Linear, nn.Conv2d)


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseBackwardMixin]]:
    """The sparse-backward layers of ``model`` with their qualified names, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, SparseBackwardMixin):
            yield name, module


def sparse_layer(
    module: nn.Module,
    k: int | None = None,
    ratio: float | None = None,
    sparsifier: str = "topk_unified",
    memory: float = 0.0,
) -> SparseBackwardMixin:
    """The sparse-backward version of one ``nn.Linear`` or ``nn.Conv2d`` (subclasses included).

    The new layer holds the very same parameter tensors (nothing is copied, an optimizer built before the swap
    keeps working, device and dtype are kept) and the same training mode. Hooks registered on ``module`` are not
    carried over.

    Raises:
        ValueError: ``module`` is of a type that cannot be converted (not a Linear/Conv2d, a grouped convolution,
            uninitialised lazy parameters), or the budget/memory arguments are invalid.
    """
    if not isinstance(module, _CONVERTIBLE):
        raise ValueError(f"cannot convert a {type(module).__name__}; expected an nn.Linear or nn.Conv2d (or subclass)")
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"cannot convert a {type(module).__name__} with uninitialised (lazy) parameters; "
                         "expected a module that has run a forward pass or has explicit sizes")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"cannot convert a Conv2d with groups={module.groups}; expected groups=1 "
                         "(exempt grouped or depthwise convolutions by name)")
    common = dict(k=k, ratio=ratio, sparsifier=sparsifier, memory=memory, device="meta")
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        new = SparseBackwardLinear(module.in_features, module.out_features, bias=has_bias, **common)
    else:
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        new = SparseBackwardConv2d(
            module.in_channels, module.out_channels, tuple(module.kernel_size), stride=tuple(module.stride),
            padding=padding, dilation=tuple(module.dilation), groups=1, bias=has_bias,
            padding_mode=module.padding_mode, **common,
        )
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert(
    model: nn.Module,
    k: int | None = None,
    ratio: float | None = None,
    sparsifier: str = "topk_unified",
    memory: float = 0.0,
    exempt: Sequence[str] = ("last",),
    output_k: int | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` (subclasses included) of ``model`` for a sparse-backward layer.

    The output layer is the last convertible module in registration order (``model.named_modules()``), which is
    the classifier in the usual models. meProp applies top-k to every hidden layer and lets the output layer use
    its own k (meProp section 2.2.1): by default the output layer stays dense (``exempt=("last",)``); with
    ``output_k`` it is converted with that ``k`` instead.

    The output projection of an ``nn.MultiheadAttention``, whose weight the attention reads without calling the layer,
    is not converted.

    A sparse-backward layer trains every channel, so a model of maskprop's layers that this converts carries no channel
    groups afterwards: the layers left as they were (BatchNorm, an exempt output layer) stop naming groups
    (``channel_groups(model)`` is empty), rather than reading groups that no layer writes any more.

    Args:
        model: the model, changed in place (returned for convenience; a bare Linear/Conv2d is returned converted).
        k: units kept per hidden layer; give this or ``ratio``.
        ratio: fraction of each hidden layer's units kept, in (0, 1].
        sparsifier: name in :data:`maskprop.sbp.SPARSIFIERS`.
        memory: MSBP memory ratio gamma in [0, 1); 0 is SBP.
        exempt: qualified module names to leave dense, and/or ``"last"`` for the output layer.
        output_k: if given, the output layer is converted with this ``k`` (and not exempted).

    Returns:
        The model with sparse-backward layers.

    Raises:
        ValueError: invalid ``k``/``ratio``/``memory``/``sparsifier``, an exempt name that is not a convertible
            module of the model, or a module that cannot be converted (e.g. a grouped convolution: exempt it).
    """
    get_sparsifier(sparsifier)
    check_memory_ratio(memory)
    if (k is None) == (ratio is None):
        raise ValueError(f"got k={k!r} and ratio={ratio!r}; expected exactly one of them")
    if ratio is not None:
        keep_count(1, ratio)
    # nn.MultiheadAttention reads its out_proj's weight itself, never calling the layer: it stays as it is.
    attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, _CONVERTIBLE)
                  and id(m) not in attention]
    if not candidates:
        logger.warning("convert: %s has no nn.Linear or nn.Conv2d to convert", type(model).__name__)
        return model
    names = {name for name, _ in candidates}
    exempt = (exempt,) if isinstance(exempt, str) else tuple(exempt)  # one name, not its letters
    unknown = [e for e in exempt if e != "last" and e not in names]
    if unknown:
        raise ValueError(f"exempt names {unknown} are not nn.Linear/nn.Conv2d modules of the model; expected names "
                         f"from {sorted(names)[:8]}{' ...' if len(names) > 8 else ''} or 'last'")
    last_name = candidates[-1][0]
    converted = model
    for name, module in candidates:
        is_output = name == last_name
        if is_output and output_k is not None:
            budget = dict(k=output_k, ratio=None)
        elif name in exempt or (is_output and "last" in exempt):
            continue
        else:
            budget = dict(k=k, ratio=ratio)
        try:
            new = sparse_layer(module, sparsifier=sparsifier, memory=memory, **budget)
        except ValueError as err:
            raise ValueError(f"module {name or '<root>'!r}: {err}") from None
        if name:
            _set_submodule(model, name, new)
        else:
            converted = new
    if converted is model and any(isinstance(m, SparseBackwardMixin) for m in model.modules()):
        _drop_channel_groups(model)
    return converted


def _drop_channel_groups(model: nn.Module) -> None:
    """Make the channel-sparse layers of ``model`` name no group (see :func:`convert`)."""
    drop_concatenations(model)
    for module in model.modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            module.in_group = module.out_group = None
        elif isinstance(module, (SparseBatchNorm2d, SparseChannelNorm, SparseAttention)):
            module.group = None


@contextlib.contextmanager
def dense_backward(model: nn.Module) -> Iterator[None]:
    """Within the block every sparse-backward layer of ``model`` runs the exact dense backward (no memory update)."""
    layers = [layer for _, layer in sparse_layers(model)]
    saved = [layer.sparse_enabled for layer in layers]
    for layer in layers:
        layer.sparse_enabled = False
    try:
        yield
    finally:
        for layer, enabled in zip(layers, saved):
            layer.sparse_enabled = enabled


def sbp_state_dict(model: nn.Module) -> dict[str, dict[str, object]]:
    """The state of the sparse-backward layers that ``model.state_dict()`` leaves out: budget and MSBP memory."""
    return {
        name: {"keep_k": layer.keep_k, "keep_ratio": layer.keep_ratio, "memory": layer.msbp_memory}
        for name, layer in sparse_layers(model)
    }


def load_sbp_state_dict(model: nn.Module, state: dict[str, dict[str, object]]) -> None:
    """Restore what :func:`sbp_state_dict` saved.

    Raises:
        ValueError: the names do not match the model's sparse-backward layers.
    """
    layers = dict(sparse_layers(model))
    if set(layers) != set(state):
        raise ValueError(f"sparse-backward state for layers {sorted(state)} does not match the model's layers "
                         f"{sorted(layers)}; expected a state saved from the same converted model")
    for name, layer in layers.items():
        entry = state[name]
        layer.set_keep(k=entry["keep_k"], ratio=entry["keep_ratio"])
        memory = entry["memory"]
        layer.msbp_memory = memory.to(layer.weight.device) if isinstance(memory, Tensor) else None
