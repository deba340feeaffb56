"""lightning-worm: Early-Bird lottery tickets and WORM gradient truncation for PyTorch Lightning."""

from lightning_worm.callbacks import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.checkpoint import load_pruned
from lightning_worm.core import (
    BatchNormSource,
    ChannelSource,
    ChiSchedule,
    GradientTruncation,
    Mask,
    NonFiniteScoreError,
    ScoreSource,
    TicketDetector,
    add_sparsity_gradient,
    channel_mask,
    mask_distance,
    unit_mask,
)
from lightning_worm.core.sources import (
    AttentionHeadSource,
    AttentionQKSource,
    FeedForwardSource,
    LayerNormSource,
    SourceList,
    earlybert,
)
from lightning_worm.core.surgery import (
    PruningError,
    PruningPlan,
    PruningReport,
    apply_plan,
    check_prunable,
    prune_channels,
    prune_heads,
    prune_neurons,
    prune_sources,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionHeadSource",
    "AttentionQKSource",
    "BatchNormSource",
    "ChannelSource",
    "ChiSchedule",
    "EarlyBirdCallback",
    "FeedForwardSource",
    "GradientTruncation",
    "LayerNormSource",
    "Mask",
    "NonFiniteScoreError",
    "PruneAndFinetune",
    "PruningError",
    "PruningPlan",
    "PruningReport",
    "ScoreSource",
    "SourceList",
    "TicketDetector",
    "WormCallback",
    "add_sparsity_gradient",
    "apply_plan",
    "channel_mask",
    "check_prunable",
    "earlybert",
    "load_pruned",
    "mask_distance",
    "prune_channels",
    "prune_heads",
    "prune_neurons",
    "prune_sources",
    "unit_mask",
]
