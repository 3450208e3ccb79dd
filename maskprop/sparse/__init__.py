"""Channel groups, masks, and the compact / masked execution of channel-sparse layers."""

from .attention import SparseAttention, SparseMultiheadAttention, SparseShiftedWindowAttention, SparseWindowAttention
from .biased_attention import SparseBeitAttention, SparseShiftedWindowAttentionV2, SparseWindowAttentionV2
from .execution import MODES, ExecutionState, Mask, ModelPlan, check_mask, model_plan, prepare_mask, use_mask
from .groupnorm import GroupNormAct, SparseGroupNorm, SparseGroupNormAct
from .groups import (
                     ChannelSparseModel,
                     aligned_width,
                     channel_groups,
                     check_align,
                     concatenate_groups,
                     concatenations,
                     full_mask,
                     kept_counts,
                     kept_ratio,
                     random_mask,
)
from .layernorm import SparseChannelNorm, SparseLastDimNorm, SparseLayerNorm, SparseRMSNorm
from .maxvit_attention import SparseRelativePositionalAttention
from .maxxvit_attention import SparseAttention2d, SparseAttentionCl
from .modules import BatchNormAct2d, SparseBatchNorm2d, SparseBatchNormAct2d, SparseConv2d, SparseLinear, SparseModule

__all__ = [
    "MODES",
    "BatchNormAct2d",
    "ChannelSparseModel",
    "ExecutionState",
    "GroupNormAct",
    "Mask",
    "ModelPlan",
    "SparseAttention",
    "SparseAttention2d",
    "SparseAttentionCl",
    "SparseBatchNorm2d",
    "SparseBatchNormAct2d",
    "SparseBeitAttention",
    "SparseChannelNorm",
    "SparseConv2d",
    "SparseGroupNorm",
    "SparseGroupNormAct",
    "SparseLastDimNorm",
    "SparseLayerNorm",
    "SparseLinear",
    "SparseModule",
    "SparseMultiheadAttention",
    "SparseRMSNorm",
    "SparseRelativePositionalAttention",
    "SparseShiftedWindowAttention",
    "SparseShiftedWindowAttentionV2",
    "SparseWindowAttention",
    "SparseWindowAttentionV2",
    "aligned_width",
    "channel_groups",
    "check_align",
    "check_mask",
    "concatenate_groups",
    "concatenations",
    "full_mask",
    "kept_counts",
    "kept_ratio",
    "model_plan",
    "prepare_mask",
    "random_mask",
    "use_mask",
]
