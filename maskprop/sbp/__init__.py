"""Sparse-backward baselines: meProp, SBP and MSBP (``docs/methods.md`` sections 4-6).

The forward pass of a layer is unchanged; its backward propagates only ``SI_k(dL/dh + M)``, the sparsified output
gradient with the MSBP memory ``M`` (MSBP paper eqs. (19)-(22); meProp is ``topk`` without memory, SBP any
sparsifier without memory). Typical use::

    model = maskprop.sbp.convert(model, ratio=0.04, memory=0.8)   # MSBP, output layer left dense
    ...
    if step % 100 == 0:
        writer_scalars = maskprop.sbp.gradient_angles(model, loss)  # before loss.backward()
    loss.backward()
    optimizer.step()

This subpackage imports torch only.
"""

from maskprop.sbp.budget import (
    Allocation,
    GlobalBudget,
    balance,
    balance_step,
    fixed_allocation,
    layer_geometry,
    proportional_allocation,
    threshold_spread,
    variance_scales,
)
from maskprop.sbp.convert import (
    convert,
    dense_backward,
    load_sbp_state_dict,
    sbp_state_dict,
    sparse_layer,
    sparse_layers,
)
from maskprop.sbp.diagnostics import angle_degrees, gradient_angles
from maskprop.sbp.layers import SparseBackwardConv2d, SparseBackwardLinear, SparseBackwardMixin, keep_count
from maskprop.sbp.rowgrad import RowGradBuffer
from maskprop.sbp.sparsifiers import (
    SPARSIFIERS,
    get_sparsifier,
    randomk,
    top_k_indices,
    topk,
    topk_unified,
    unit_scores,
)

__all__ = [
    "SPARSIFIERS",
    "Allocation",
    "GlobalBudget",
    "RowGradBuffer",
    "SparseBackwardConv2d",
    "SparseBackwardLinear",
    "SparseBackwardMixin",
    "angle_degrees",
    "balance",
    "balance_step",
    "convert",
    "dense_backward",
    "fixed_allocation",
    "get_sparsifier",
    "gradient_angles",
    "keep_count",
    "layer_geometry",
    "load_sbp_state_dict",
    "proportional_allocation",
    "randomk",
    "sbp_state_dict",
    "sparse_layer",
    "sparse_layers",
    "threshold_spread",
    "top_k_indices",
    "topk",
    "topk_unified",
    "unit_scores",
    "variance_scales",
]
