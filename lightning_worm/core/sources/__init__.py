"""Score sources: what the ticket search tracks (BatchNorm channels, attention, LayerNorm)."""

from __future__ import annotations

from lightning_worm.core.sources.attention import AttentionHeadSource, AttentionQKSource
from lightning_worm.core.sources.base import ChannelSource, ScaleSource, ScoreSource
from lightning_worm.core.sources.batchnorm import BatchNormSource
from lightning_worm.core.sources.layernorm import LayerNormSource

#: The sources selectable by name (``EarlyBirdCallback(source="batchnorm")``, YAML).
SOURCES: dict[str, type[ScoreSource]] = {
    BatchNormSource.key: BatchNormSource,
    AttentionQKSource.key: AttentionQKSource,
    AttentionHeadSource.key: AttentionHeadSource,
    LayerNormSource.key: LayerNormSource,
}


def resolve_source(source: str | ScoreSource | None) -> ScoreSource:
    """A source instance from a name in :data:`SOURCES`, an instance, or ``None`` (BatchNorm).

    Raises:
        ValueError: on an unknown name or an object that is not a :class:`ScoreSource`.
    """
    if source is None:
        return BatchNormSource()
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"Unknown `source` {source!r}: use one of {sorted(SOURCES)} or a ScoreSource instance.")
        return SOURCES[source]()
    if isinstance(source, type) and issubclass(source, ScoreSource):
        return source()
    if not isinstance(source, ScoreSource):
        raise ValueError(
            f"`source` must be a ScoreSource (e.g. BatchNormSource()) or one of {sorted(SOURCES)}, got "
            f"{type(source).__name__}: subclass lightning_worm.ScoreSource to score your own layers."
        )
    return source


__all__ = [
    "SOURCES", "AttentionHeadSource", "AttentionQKSource", "BatchNormSource", "ChannelSource", "LayerNormSource",
    "ScaleSource", "ScoreSource", "resolve_source",
]
