"""The pruning decision: which channels of which groups go, given a ticket and its scores.

A *unit* is a set of channels that can only go together: the channels of all layers joined by a
residual sum, the same position in every group of a grouped convolution or GroupNorm, the same
position in every chunk of ``chunk``, a column of a channel shuffle. The score source says which
modules are scored (BatchNorm layers by default) and their per-channel scores; nothing here knows
a module type beyond what the dependency graph needs.

* ``coupling="vote"`` (default): as ``"mean_rank"``, but the units are ranked by the fraction of their
  scored channels that the ticket prunes (most first), then by mean score. Where no channels are coupled
  it removes exactly the ticket; where they are, the channels the ticket prunes in most coupled layers.
* ``coupling="mean_rank"``: within each pruning group (the layers Torch-Pruning prunes together;
  groups sharing a unit, as through a shuffle, rank together), units are ranked by the mean score of
  their scored channels and the lowest go, as many channels as the ticket prunes there on average:
  ``sum over units of size * (fraction of its scored channels the ticket prunes)``, rounded to the
  nearest prefix of the ranking. In a group of coupled layers each with one scored module, that is the
  mean over those layers of the count the ticket prunes.
* ``coupling="all"``: a unit goes when the ticket prunes every one of its scored channels.
* Never pruned: groups with no scored module, groups reaching the model's outputs (the classifier's
  outputs, a returned feature map), units whose chunk or group positions are not all prunable, channels
  through a partial channel slice (``x[:, :c]``, whose bounds the model's code fixes).
* No layer is ever emptied: the unit with the highest mean score is kept back. A unit that holds every
  channel of some layer (through chained chunks and shuffles, a whole ShuffleNet stage's pass-through
  channels are one unit) is not prunable at all.
* ``round_to=N`` keeps back the next-best units until every group keeps a multiple of ``N`` channels.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from torch import Tensor, nn
from torch_pruning.dependency import Node

from lightning_worm._internals import torch_pruning as tpi
from lightning_worm._internals.torch import ConvNd
from lightning_worm.core.surgery.graph import SurgeryGraph

__all__ = ["COUPLINGS", "ROOT_TYPES", "Decision", "decide"]

COUPLINGS = ("vote", "mean_rank", "all")
ROOT_TYPES = (ConvNd, nn.Linear)


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(eq=False)
class _Unit:
    """Channels that go together: root channels ``(group, index)`` and the scored channels they reach."""

    roots: list[tuple[int, int]] = field(default_factory=list)
    scored_channels: list[tuple[str, int]] = field(default_factory=list)
    frozen: bool = False
    score: float = 0.0  # mean score of the scored channels
    ticket_pruned: int = 0  # scored channels the ticket prunes


class _Counts(TypedDict):
    """The channel accounting of a decision: the :class:`PruningReport` fields of the same names."""

    ticket_pruned: int
    pruned_from_ticket: int
    pruned_outside_ticket: int
    kept_for_coupling: int
    kept_for_min_units: int
    kept_for_round_to: int
    kept_unprunable: int
    prunable: int


@dataclass
class Decision:
    pruned_roots: list[tuple[nn.Module, list[int]]]
    counts: _Counts
    #: Per scored module, the ticket-pruned channels it kept, by reason (the report's ``kept_by_entry``).
    kept_by_entry: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Per scored module, the channels the decision removes.
    removed_by_entry: dict[str, int] = field(default_factory=dict)


_ChannelUnits = dict[tuple[Node, bool], dict[int, _Unit]]


def _channel_groups(graph: SurgeryGraph, node: Node, is_out: bool) -> tuple[int, int | None]:
    """(channel groups, channels) of a node on one side; depthwise convolutions count as one group."""
    module = node.module
    if isinstance(module, ConvNd) and module.groups == module.out_channels:
        return 1, None
    pruner = graph.get_pruner_of_module(module)
    groups = pruner.get_out_channel_groups(module) if is_out else pruner.get_in_channel_groups(module)
    if tpi.is_split_op(module):
        return groups, sum(tpi.split_sizes(module) or [0])
    return groups, graph.get_out_channels(node) if is_out else graph.get_in_channels(node)


def _coupled_units(
    graph: SurgeryGraph, output_nodes: set[Node], scored: set[int]
) -> tuple[list, list[_Unit], _ChannelUnits]:
    """Torch-Pruning's groups (full indices), the units, and the unit of every channel ``(node, out side?, index)``."""
    groups = list(graph.get_all_groups(root_module_types=ROOT_TYPES))
    offsets = list(itertools.accumulate((len(group[0].idxs) for group in groups), initial=0))
    union = _UnionFind(offsets[-1])  # element offsets[g] + r is root channel r of group g
    frozen: set[int] = set()

    # Roots reaching the same channel go together (and never groups without a scored module or reaching an output).
    owner: dict[tuple[Node, bool], dict[int, int]] = defaultdict(dict)
    for g, group in enumerate(groups):
        has_scored = reaches_output = False
        for item in group:
            node, is_out = item.dep.target, graph.is_out_channel_pruning_fn(item.dep.handler)
            has_scored |= id(node.module) in scored
            reaches_output |= is_out and node in output_nodes
            channels = owner[(node, is_out)]
            # The model's code fixes a slice's bounds: channels through a partial one are never pruned.
            sliced = tpi.is_partial_channel_slice(node.module, node.grad_fn)
            for idx, root in zip(item.idxs, item.root_idxs, strict=True):
                if root is None:
                    continue
                if sliced:
                    frozen.add(offsets[g] + root)
                if idx in channels:
                    union.union(channels[idx], offsets[g] + root)
                else:
                    channels[idx] = offsets[g] + root
        if not has_scored or reaches_output:
            frozen.update(range(offsets[g], offsets[g + 1]))

    # Grouped convs, GroupNorm, chunks, shuffles: the same position in every channel group goes together.
    for (node, is_out), channels in owner.items():
        n_groups, n_channels = _channel_groups(graph, node, is_out)
        if n_groups <= 1:
            continue
        if not n_channels or n_channels % n_groups:
            frozen.update(channels.values())
            continue
        columns: dict[int, list[int]] = defaultdict(list)
        for idx, element in channels.items():
            columns[idx % (n_channels // n_groups)].append(element)
        for column in columns.values():
            for element in column[1:]:
                union.union(column[0], element)
            if len(column) < n_groups:  # part of the column lies outside every prunable group
                frozen.add(column[0])

    units: dict[int, _Unit] = defaultdict(_Unit)
    for g in range(len(groups)):
        for root, element in enumerate(range(offsets[g], offsets[g + 1])):
            unit = units[union.find(element)]
            unit.roots.append((g, root))
            unit.frozen |= element in frozen
    channel_units = {key: {idx: units[union.find(e)] for idx, e in chs.items()} for key, chs in owner.items()}
    return groups, list(units.values()), channel_units


def _score_units(
    graph: SurgeryGraph,
    channel_units: _ChannelUnits,
    masks: Mapping[str, Tensor],
    modules: Mapping[str, nn.Module],
    scores: Mapping[str, list[float]],
) -> dict[str, int]:
    """Attach scored channels, scores and ticket counts to the units; return, per scored module, the
    ticket-pruned channels that belong to no unit."""
    unowned: dict[str, int] = defaultdict(int)
    for name, mask in masks.items():
        channels = channel_units.get((graph.module2node.get(modules[name]), True), {})
        for idx, (keep, score) in enumerate(zip(mask.tolist(), scores[name], strict=True)):
            unit = channels.get(idx)
            if unit is None:
                unowned[name] += not keep
                continue
            unit.scored_channels.append((name, idx))
            unit.score += score
            unit.ticket_pruned += not keep
    for unit in {id(u): u for chs in channel_units.values() for u in chs.values()}.values():
        unit.score /= max(len(unit.scored_channels), 1)
    return unowned


def _by_rank(candidates: Sequence[_Unit], vote: bool) -> list[_Unit]:
    """Per scope (groups joined by units), the first units of a ranking, as many root channels as the ticket
    prunes on average there: the prefix of the ranking closest to ``sum(len(roots) * pruned fraction)``.

    The ranking: by mean score (``vote=False``), or by the fraction of the unit's scored channels that the
    ticket prunes, most first, then by mean score (``vote=True``).
    """
    scopes = _UnionFind(1 + max((g for unit in candidates for g, _ in unit.roots), default=0))
    for unit in candidates:
        for g, _ in unit.roots[1:]:
            scopes.union(unit.roots[0][0], g)
    by_scope: dict[int, list[_Unit]] = defaultdict(list)
    for unit in candidates:
        by_scope[scopes.find(unit.roots[0][0])].append(unit)
    chosen = []
    for units in by_scope.values():
        target = sum(len(u.roots) * u.ticket_pruned / len(u.scored_channels) for u in units)
        if vote:
            ranked = sorted(units, key=lambda u: (-u.ticket_pruned / len(u.scored_channels), u.score, u.roots[0]))
        else:
            ranked = sorted(units, key=lambda u: (u.score, u.roots[0]))
        sizes = list(itertools.accumulate((len(u.roots) for u in ranked), initial=0))
        chosen.extend(ranked[: min(range(len(sizes)), key=lambda k: abs(sizes[k] - target))])
    return chosen


def _best(units: Any) -> _Unit:
    return max(units, key=lambda u: (u.score, [-g for g in u.roots[0]]))


def _keep_layers_nonempty(graph: SurgeryGraph, channel_units: _ChannelUnits, pruned: dict[int, _Unit]) -> list[_Unit]:
    """Keep back the best unit of every layer that would lose all its channels."""
    kept = []
    for (node, is_out), channels in channel_units.items():
        count = graph.get_out_channels(node) if is_out else graph.get_in_channels(node)
        layer_units = {id(u): u for u in channels.values()}
        if count is not None and len(channels) >= count and layer_units.keys() <= pruned.keys():
            kept.append(pruned.pop(id(_best(layer_units.values()))))
    return kept


def _keep_rounded(group_sizes: Sequence[int], pruned: dict[int, _Unit], round_to: int) -> list[_Unit]:
    """Keep back the best units until every group keeps a multiple of ``round_to`` channels (or all)."""
    kept: list[_Unit] = []
    while True:
        removed = [0] * len(group_sizes)
        for unit in pruned.values():
            for g, _ in unit.roots:
                removed[g] += 1
        short = next((g for g, n in enumerate(removed) if n and (group_sizes[g] - n) % round_to), None)
        if short is None:
            return kept
        kept.append(pruned.pop(id(_best(u for u in pruned.values() if any(h == short for h, _ in u.roots)))))


def decide(
    graph: SurgeryGraph,
    output_nodes: set[Node],
    masks: Mapping[str, Tensor],
    modules: Mapping[str, nn.Module],
    scores: Mapping[str, list[float]],
    coupling: str,
    round_to: int | None,
) -> Decision:
    """Which root channels of which groups go, and the channel accounting of the report.

    Args:
        graph: the traced graph; ``output_nodes``: the nodes producing the model's outputs.
        masks: per scored module name, its keep mask (every scored module, ``True`` = keep).
        modules: the scored modules by name (their output channels are the masks' units).
        scores: per scored module name, the score of each channel (the mean ranks by them).
        coupling: one of :data:`COUPLINGS`; ``round_to``: ``None`` or an integer >= 1.
    """
    groups, units, channel_units = _coupled_units(graph, output_nodes, {id(m) for m in modules.values()})
    unowned = _score_units(graph, channel_units, masks, modules, scores)
    for (node, is_out), channels in channel_units.items():
        # A layer whose channels all lie in one unit could only lose them all: that unit never goes.
        count = graph.get_out_channels(node) if is_out else graph.get_in_channels(node)
        layer_units = {id(u): u for u in channels.values()}
        if len(layer_units) == 1 and count is not None and len(channels) >= count:
            next(iter(layer_units.values())).frozen = True
    candidates = [u for u in units if u.scored_channels and not u.frozen]
    if coupling == "all":
        chosen = [u for u in candidates if u.ticket_pruned == len(u.scored_channels)]
    else:
        chosen = _by_rank(candidates, vote=coupling == "vote")
    pruned = {id(u): u for u in chosen}
    kept_for_min = _keep_layers_nonempty(graph, channel_units, pruned)
    kept_for_round = _keep_rounded([len(group[0].idxs) for group in groups], pruned, round_to) if round_to else []

    roots: dict[int, list[int]] = defaultdict(list)
    for unit in pruned.values():
        for g, root in unit.roots:
            roots[g].append(root)
    kept_by_entry: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, count in unowned.items():
        if count:
            kept_by_entry[name]["unprunable"] += count
    chosen_ids = {id(u) for u in chosen}
    for reason, reason_units in (("unprunable", [u for u in units if u.frozen]),
                                 ("coupling", [u for u in candidates if id(u) not in chosen_ids]),
                                 ("min_units", kept_for_min), ("round_to", kept_for_round)):
        for unit in reason_units:
            for name, idx in unit.scored_channels:
                if not bool(masks[name][idx]):
                    kept_by_entry[name][reason] += 1
    counts = _Counts(
        ticket_pruned=sum(int((~mask).sum()) for mask in masks.values()),
        pruned_from_ticket=sum(u.ticket_pruned for u in pruned.values()),
        pruned_outside_ticket=sum(len(u.scored_channels) - u.ticket_pruned for u in pruned.values()),
        kept_for_coupling=sum(u.ticket_pruned for u in candidates) - sum(u.ticket_pruned for u in chosen),
        kept_for_min_units=sum(u.ticket_pruned for u in kept_for_min),
        kept_for_round_to=sum(u.ticket_pruned for u in kept_for_round),
        kept_unprunable=sum(unowned.values()) + sum(u.ticket_pruned for u in units if u.frozen),
        prunable=sum(len(u.scored_channels) for u in candidates),
    )
    removed_by_entry = dict.fromkeys(masks, 0)
    for unit in pruned.values():
        for name, _ in unit.scored_channels:
            removed_by_entry[name] += 1
    return Decision([(groups[g][0].dep.target.module, sorted(idxs)) for g, idxs in sorted(roots.items())], counts,
                    {name: dict(reasons) for name, reasons in kept_by_entry.items()}, removed_by_entry)
