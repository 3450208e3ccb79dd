"""Gradient estimation angle of sparse backpropagation (MSBP paper Definition 2, eq. (4); its Figure 5)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from maskprop.sbp.convert import sparse_layers


def angle_degrees(estimate: Tensor, true: Tensor) -> float:
    """The angle between two tensors seen as flat vectors, in degrees (MSBP paper eq. (2)), computed in float64.

    Returns NaN when either vector is zero (the angle is undefined).
    """
    a, b = estimate.detach().reshape(-1).double(), true.detach().reshape(-1).double()
    return _angle(torch.dot(a, b).item(), torch.dot(a, a).item(), torch.dot(b, b).item())


def _angle(dot: float, norm2_a: float, norm2_b: float) -> float:
    if norm2_a == 0.0 or norm2_b == 0.0:
        return math.nan
    cosine = max(-1.0, min(1.0, dot / math.sqrt(norm2_a * norm2_b)))
    return math.degrees(math.acos(cosine))


@contextlib.contextmanager
def probing(model: nn.Module, dense: bool) -> Iterator[None]:
    """Layers return their gradients through autograd and leave memory and recorded scores untouched."""
    layers = [layer for _, layer in sparse_layers(model)]
    saved = [(layer.probe, layer.sparse_enabled) for layer in layers]
    for layer in layers:
        layer.probe, layer.sparse_enabled = True, not dense
    try:
        yield
    finally:
        for layer, (probe, enabled) in zip(layers, saved):
            layer.probe, layer.sparse_enabled = probe, enabled


def gradient_angles(model: nn.Module, loss: Tensor) -> dict[str, float]:
    """Angle between the sparse-backward gradient estimate and the true gradient, per layer and overall.

    Call it on a loss that has not been back-propagated yet, e.g. every N steps before ``loss.backward()``. It
    runs two extra backward passes through the retained graph (one sparse, one dense), so the forward pass is
    shared and dropout masks or BatchNorm statistics do not differ between the two. Nothing is changed: parameter
    ``.grad`` fields, the MSBP memory and recorded scores are left as they were; only ``randomk`` draws consume
    random numbers. The sparse estimate uses the current memory, as the training step itself will
    (MSBP paper eqs. (20)-(21)).

    Args:
        model: a model converted with :func:`maskprop.sbp.convert`.
        loss: scalar loss of the current mini-batch, still attached to its graph.

    Returns:
        Angles in degrees (MSBP paper eq. (4), Figure 5): ``"angle/overall"`` over all parameters that require a
        gradient (the vector w of the paper), and ``"angle/<layer name>"`` over the weight and bias of each
        sparse-backward layer. NaN where a gradient is zero.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    with probing(model, dense=False):
        estimate = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    with probing(model, dense=True):
        true = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    # Per-parameter float64 sums, combined per layer and overall.
    sums: dict[int, tuple[float, float, float]] = {}
    for p, est, ref in zip(params, estimate, true):
        a = torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if est is None else est.reshape(-1).double()
        b = torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if ref is None else ref.reshape(-1).double()
        sums[id(p)] = (torch.dot(a, b).item(), torch.dot(a, a).item(), torch.dot(b, b).item())

    def combine(tensors: list[Tensor]) -> float:
        parts = [sums[id(t)] for t in tensors if id(t) in sums]
        return _angle(*(sum(part[i] for part in parts) for i in range(3))) if parts else math.nan

    angles = {"angle/overall": combine(params)}
    for name, layer in sparse_layers(model):
        angles[f"angle/{name}"] = combine([t for t in (layer.weight, layer.bias) if t is not None])
    return angles
