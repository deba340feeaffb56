"""Deprecated location of the score sources; import them from :mod:`lightning_worm.core.sources`."""

from lightning_worm.core.sources import BatchNormSource, ChannelSource, ScoreSource

__all__ = ["BatchNormSource", "ChannelSource", "ScoreSource"]
