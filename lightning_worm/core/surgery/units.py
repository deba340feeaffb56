"""What the whole-unit surgeries (heads, neurons) share: which of a ticket's units go, and the report of the cut."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport

__all__ = ["UnitChoice", "choose_units", "unit_report"]


@dataclass
class UnitChoice:
    """The units each entry loses, and how many of the ticket's pruned units were kept back, and why."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    kept_for_min: int = 0
    kept_for_round: int = 0


def choose_units(masks: Mapping[str, Tensor], scores: Callable[[str], Tensor], round_to: int | None) -> UnitChoice:
    """The units to remove per entry: the ticket's pruned ones, but every entry keeps its best unit, and with
    ``round_to`` a multiple of it (the next-best units are kept back first).

    Args:
        masks: keep-mask per entry (``True`` = keep), 1-D.
        scores: the scores of an entry's units, by entry name (to pick the best ones to keep back).
        round_to: keep a multiple of this many units per entry, or ``None``.
    """
    choice = UnitChoice()
    for name, keep in masks.items():
        keep = keep.clone()
        values = scores(name).cpu()
        if not keep.any():
            keep[int(torch.argmax(values))] = True
            choice.kept_for_min += 1
        if round_to is not None:
            while int(keep.sum()) % round_to and not keep.all():
                pruned = torch.nonzero(~keep).flatten()
                keep[pruned[torch.argmax(values[pruned])]] = True
                choice.kept_for_round += 1
        units = torch.nonzero(~keep).flatten().tolist()
        if units:
            choice.removed[name] = units
    return choice


def unit_report(plan: PruningPlan, numbers: Mapping[str, Any], masks: Mapping[str, Tensor], choice: UnitChoice,
                kept_indices: KeptIndices, coupling: str, round_to: int | None) -> PruningReport:
    """The report of a whole-unit cut: nothing is coupled or unprunable, and every entry keeps one unit."""
    ticket_pruned = sum(int((~m).sum()) for m in masks.values())
    return PruningReport(
        plan=plan,
        **numbers,
        units_before=dict(plan.units_before),
        units_after=dict(plan.units_after),
        ticket_pruned=ticket_pruned,
        pruned_from_ticket=ticket_pruned - choice.kept_for_min - choice.kept_for_round,
        pruned_outside_ticket=0,
        kept_for_coupling=0,
        kept_for_min_units=choice.kept_for_min,
        kept_for_round_to=choice.kept_for_round,
        kept_unprunable=0,
        kept_indices=kept_indices,
        coupling=coupling,
        round_to=round_to,
        prunable=sum(plan.units_before.values()) - len(plan.units_before),  # every entry keeps one unit
    )
