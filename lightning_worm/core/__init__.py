"""Pure-PyTorch core: sources, masks, ticket detection, truncation, regularisation. No Lightning import."""

from lightning_worm.core.detector import TicketDetector
from lightning_worm.core.masks import (
    Mask,
    MaskResult,
    NonFiniteScoreError,
    channel_mask,
    channel_scores,
    mask_distance,
    mask_from_scores,
    unit_mask,
    unit_scores,
)
from lightning_worm.core.regularization import add_sparsity_gradient
from lightning_worm.core.sources import SOURCES, BatchNormSource, ChannelSource, ScoreSource, resolve_source
from lightning_worm.core.truncation import ChiSchedule, GradientTruncation

__all__ = [
    "SOURCES",
    "BatchNormSource",
    "ChannelSource",
    "ChiSchedule",
    "GradientTruncation",
    "Mask",
    "MaskResult",
    "NonFiniteScoreError",
    "ScoreSource",
    "TicketDetector",
    "add_sparsity_gradient",
    "channel_mask",
    "channel_scores",
    "mask_distance",
    "mask_from_scores",
    "resolve_source",
    "unit_mask",
    "unit_scores",
]
