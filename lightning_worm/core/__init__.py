"""Pure-PyTorch core: scores, masks, ticket detection, truncation, regularisation. No Lightning import."""

from lightning_worm.core.detector import TicketDetector
from lightning_worm.core.masks import (
    MaskResult,
    NonFiniteScoreError,
    channel_mask,
    channel_scores,
    mask_distance,
    mask_from_scores,
)
from lightning_worm.core.regularization import add_sparsity_gradient
from lightning_worm.core.scores import BatchNormSource, ChannelSource
from lightning_worm.core.truncation import ChiSchedule, GradientTruncation

__all__ = [
    "BatchNormSource",
    "ChannelSource",
    "ChiSchedule",
    "GradientTruncation",
    "MaskResult",
    "NonFiniteScoreError",
    "TicketDetector",
    "add_sparsity_gradient",
    "channel_mask",
    "channel_scores",
    "mask_distance",
    "mask_from_scores",
]
