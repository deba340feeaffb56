"""Several sources in one search: :class:`SourceList`, the source a tracker follows when given a list."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from torch import Tensor, nn

from lightning_worm.core.sources.base import ScoreSource

__all__ = ["Member", "SourceList"]


class Member(NamedTuple):
    """The handle of a :class:`SourceList` entry: the member source that tracks it (its position), and its handle."""

    position: int
    handle: Any


class SourceList(ScoreSource):
    r"""Several score sources tracked as one: one mask over all their units, one distance, one ticket, one prune.

    Each member ranks its own units with its own ``prune_ratio`` (else the tracker's) and ``scope``, so that a
    transformer can lose 1/3 of the heads of every layer and 40 % of its feed-forward neurons overall (EarlyBERT's
    ticket), or a CNN be tracked by its BatchNorm channels and something else at once. The mask distance is taken
    over every unit of every member. WORM truncates, and the sparsity term regularises, what each member says;
    :class:`~lightning_worm.PruneAndFinetune` removes every member's units in one prune (all or nothing), whose
    plan (``kind="sources"``) holds one plan per member and replays them in order.

    Entries keep their members' names (``"bert.encoder.layer.0.attention.self"``,
    ``"bert.encoder.layer.0"``): two members must not track an entry of the same name. A tracker given a list
    (``EarlyBirdCallback(source=[...])``) builds one.

    Args:
        sources: the member sources (instances, classes or names in ``lightning_worm.core.SOURCES``), at least one;
            a nested ``SourceList`` is flattened.

    Raises:
        ValueError: on an empty list, a member that is not a source, or one source given twice.

    Example::

        heads_and_neurons = [AttentionHeadSource(prune_ratio=1 / 3, scope="layer"), FeedForwardSource(prune_ratio=0.4)]
        early_bird = EarlyBirdCallback(source=heads_and_neurons)
        early_bird.ticket  # one Mask: {attention block: heads, ..., feed-forward block: neurons, ...}
    """

    key = "sources"

    def __init__(self, sources: Sequence[str | ScoreSource | type[ScoreSource]]) -> None:
        from lightning_worm.core.sources import resolve_source  # the registry of names imports this module

        super().__init__()
        if isinstance(sources, (str, ScoreSource)) or not isinstance(sources, Sequence) or not sources:
            raise ValueError(f"A SourceList takes a non-empty list of sources, got {sources!r}: e.g. "
                             "`[AttentionHeadSource(scope='layer'), FeedForwardSource(prune_ratio=0.4)]`.")
        members: list[ScoreSource] = []
        for source in sources:
            resolved = resolve_source(source)
            members.extend(resolved.sources if isinstance(resolved, SourceList) else [resolved])
        if len({id(s) for s in members}) != len(members):
            raise ValueError("A SourceList holds one source twice: give each member once (one instance per source).")
        self.sources: tuple[ScoreSource, ...] = tuple(members)
        self.description = " + ".join(s.description for s in members)

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, Member]]:
        for index, source in enumerate(self.sources):
            for name, handle in source.candidates(model):
                yield name, Member(index, handle)

    def tracked(self, model: nn.Module) -> dict[str, Member]:
        """The tracked entries of every member, member by member.

        Raises:
            ValueError: if two members track an entry of the same name.
        """
        out: dict[str, Member] = {}
        for index, source in enumerate(self.sources):
            for name, handle in source.tracked(model).items():
                if name in out:
                    raise ValueError(
                        f"{type(self.sources[out[name].position]).__name__} and {type(source).__name__} both track an "
                        f"entry named {name!r}: a SourceList needs distinct entries. Name the modules of one of them "
                        "(`modules=[...]`) so that they do not overlap."
                    )
                out[name] = Member(index, handle)
        return out

    def skipped(self, model: nn.Module) -> dict[str, str]:
        out: dict[str, str] = {}
        for source in self.sources:
            out.update(source.skipped(model))
        return out

    def parts(self, model: nn.Module) -> list[tuple[ScoreSource, list[str]]]:
        tracked = self.tracked(model)
        return [(source, [n for n, m in tracked.items() if m.position == i]) for i, source in enumerate(self.sources)]

    def summary(self, model: nn.Module) -> str:
        return "; ".join(f"{type(s).__name__}: {s.summary(model)}" for s in self.sources)

    def labels(self) -> list[str]:
        """Each member's name in plans, reports and figures: its class name, numbered when a class is there twice."""
        names = [type(s).__name__ for s in self.sources]
        return [n if names.count(n) == 1 else f"{n}[{i}]" for i, n in enumerate(names)]

    def member(self, entry: Member) -> ScoreSource:
        return self.sources[entry.position]

    def skip_reason(self, entry: Member) -> str | None:
        return self.member(entry).skip_reason(entry.handle)

    def scores(self, entry: Member) -> Tensor:
        return self.member(entry).scores(entry.handle)

    def count(self, entry: Member) -> int:
        return self.member(entry).count(entry.handle)

    def gradient_factors(self, entry: Member, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        return self.member(entry).gradient_factors(entry.handle, keep, chi)

    def sparsity_parameters(self, entry: Member) -> list[Tensor]:
        return self.member(entry).sparsity_parameters(entry.handle)

    def prepare(self, model: nn.Module) -> None:
        for source in self.sources:
            source.prepare(model)

    def fold(self, model: nn.Module) -> None:
        for source in self.sources:
            source.fold(model)

    def ranking(self) -> dict[str, Any]:
        return {}

    def label(self) -> str:
        return f"[{', '.join(s.label() for s in self.sources)}]"

    def __repr__(self) -> str:
        return f"SourceList([{', '.join(map(repr, self.sources))}])"
