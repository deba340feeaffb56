"""Score sources: what the ticket search tracks (BatchNorm channels, attention, feed-forward neurons, LayerNorm)."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_worm.core.sources.attention import AttentionHeadSource, AttentionQKSource
from lightning_worm.core.sources.base import ChannelSource, ScaleSource, ScoreSource
from lightning_worm.core.sources.batchnorm import BatchNormSource
from lightning_worm.core.sources.combined import SourceList
from lightning_worm.core.sources.feedforward import FeedForwardSource
from lightning_worm.core.sources.layernorm import LayerNormSource

#: The sources selectable by name (``EarlyBirdCallback(source="batchnorm")``, YAML).
SOURCES: dict[str, type[ScoreSource]] = {
    BatchNormSource.key: BatchNormSource,
    AttentionQKSource.key: AttentionQKSource,
    AttentionHeadSource.key: AttentionHeadSource,
    FeedForwardSource.key: FeedForwardSource,
    LayerNormSource.key: LayerNormSource,
}




def earlybert(score: str = "auto") -> SourceList:
    """EarlyBERT's ticket (Chen et al., ACL 2021): 1/3 of the heads of every layer and 40 % of the feed-forward
    neurons overall, scored by slimming gates (the measured better scores: ``docs/benchmarks.md``) or ``score=``.

    Example::

        early_bird = EarlyBirdCallback(source="earlybert")  # the same as EarlyBirdCallback(source=earlybert())
    """
    return SourceList([AttentionHeadSource(prune_ratio=1 / 3, scope="layer", score=score),  # type: ignore[arg-type]
                       FeedForwardSource(prune_ratio=0.4, score=score)])  # type: ignore[arg-type]


#: Named sets of sources (``EarlyBirdCallback(source="earlybert")``, YAML): several sources in one search.
PRESETS = {"earlybert": earlybert}

#: What a tracker, a mask or a surgery accepts as ``source``: a source, its name, a list of those, or ``None``.
SourceSpec = str | ScoreSource | type[ScoreSource] | Sequence[str | ScoreSource | type[ScoreSource]] | None


def resolve_source(source: SourceSpec) -> ScoreSource:
    """A source instance from a name in :data:`SOURCES` or :data:`PRESETS`, an instance, ``None`` (BatchNorm), or a
    list of those (a :class:`SourceList`: several sources in one search).

    Raises:
        ValueError: on an unknown name or an object that is not a :class:`ScoreSource`.
    """
    if source is None:
        return BatchNormSource()
    if isinstance(source, str):
        if source in PRESETS:
            return PRESETS[source]()
        if source not in SOURCES:
            raise ValueError(f"Unknown `source` {source!r}: use one of {sorted(SOURCES) + sorted(PRESETS)} or a "
                             "ScoreSource instance.")
        return SOURCES[source]()
    if isinstance(source, (list, tuple)):
        return SourceList(source)
    if isinstance(source, type) and issubclass(source, ScoreSource):
        return source()
    if not isinstance(source, ScoreSource):
        raise ValueError(
            f"`source` must be a ScoreSource (e.g. BatchNormSource()), one of {sorted(SOURCES)} or a list of those, "
            f"got {type(source).__name__}: subclass lightning_worm.ScoreSource to score your own layers."
        )
    return source


__all__ = [
    "SOURCES", "AttentionHeadSource", "AttentionQKSource", "BatchNormSource", "ChannelSource", "FeedForwardSource",
    "LayerNormSource", "PRESETS", "ScaleSource", "ScoreSource", "SourceList", "SourceSpec", "earlybert",
    "resolve_source",
]
