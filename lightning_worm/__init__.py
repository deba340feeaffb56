"""lightning-worm: Early-Bird lottery tickets and WORM gradient truncation for PyTorch Lightning."""

from lightning_worm.callbacks import EarlyBirdCallback, WormCallback
from lightning_worm.core import (
    BatchNormSource,
    ChannelSource,
    ChiSchedule,
    GradientTruncation,
    NonFiniteScoreError,
    TicketDetector,
    add_sparsity_gradient,
    channel_mask,
    mask_distance,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNormSource",
    "ChannelSource",
    "ChiSchedule",
    "EarlyBirdCallback",
    "GradientTruncation",
    "NonFiniteScoreError",
    "TicketDetector",
    "WormCallback",
    "add_sparsity_gradient",
    "channel_mask",
    "mask_distance",
]
