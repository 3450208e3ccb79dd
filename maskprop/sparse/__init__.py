"""Channel groups, masks, and the compact / masked execution of channel-sparse layers."""

from .execution import MODES, ExecutionState, Mask, check_mask, use_mask
from .groups import ChannelSparseModel, channel_groups, full_mask, kept_counts, random_mask
from .modules import SparseBatchNorm2d, SparseConv2d, SparseLinear, SparseModule

__all__ = [
    "MODES",
    "ChannelSparseModel",
    "ExecutionState",
    "Mask",
    "SparseBatchNorm2d",
    "SparseConv2d",
    "SparseLinear",
    "SparseModule",
    "channel_groups",
    "check_mask",
    "full_mask",
    "kept_counts",
    "random_mask",
    "use_mask",
]
