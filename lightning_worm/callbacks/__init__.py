"""Thin Lightning adapters over :mod:`lightning_worm.core`."""

from lightning_worm.callbacks.early_bird import EarlyBirdCallback
from lightning_worm.callbacks.prune import PruneAndFinetune
from lightning_worm.callbacks.worm import WormCallback

__all__ = ["EarlyBirdCallback", "PruneAndFinetune", "WormCallback"]
