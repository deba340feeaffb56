"""Several sources pruned at once: :func:`prune_sources` runs every member's surgery in one all-or-nothing prune.

Registered as the surgery of :class:`~lightning_worm.core.sources.SourceList`. Its plan (``kind="sources"``) holds
one plan per member, in order (``options["plans"]``); the replay repeats them in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_worm.core.inputs import ExampleInput, as_inputs
from lightning_worm.core.sources import ScoreSource, SourceList, resolve_source
from lightning_worm.core.surgery.channels import DEFAULT_COUPLING
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, _measured
from lightning_worm.core.surgery.registry import Surgery, _keyword_only, register_surgery, surgery_for
from lightning_worm.core.surgery.transaction import all_or_nothing

__all__ = ["compose_kept", "prune_sources"]

_COUNTS = ("ticket_pruned", "pruned_from_ticket", "pruned_outside_ticket", "kept_for_coupling", "kept_for_min_units",
           "kept_for_round_to", "kept_unprunable", "prunable")


def compose_kept(first: KeptIndices, then: KeptIndices) -> KeptIndices:
    """The kept original indices after two surgeries in a row: ``then``'s indices are into ``first``'s result."""
    out = dict(first)
    for name, dims in then.items():
        before = out.get(name)
        if before is None:
            out[name] = list(dims)
            continue
        out[name] = [b if d is None else d if b is None else b[d] for b, d in zip(before, dims, strict=True)]
    return out


def _member_tickets(model: nn.Module, ticket: Mapping[str, Tensor], source: SourceList) -> list[dict[str, Tensor]]:
    parts = source.parts(model)
    owned = {name for _, names in parts for name in names}
    unknown = [name for name in ticket if name not in owned]
    if unknown:
        raise ValueError(f"The ticket names {unknown[:5]}, which no source of {source!r} tracks in this model. Compute "
                         "the ticket on this model, with the same sources.")
    return [{name: ticket[name] for name in names if name in ticket} for _, names in parts]


def _member_options(member: ScoreSource, given: Mapping[str, Any]) -> dict[str, Any]:
    taken = surgery_for(member).options
    options = {key: value for key, value in given.items() if key in taken}
    if "measure_latency" in taken:
        options["measure_latency"] = False  # measured once, around every member's surgery
    return options


def prune_sources(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    example_input: ExampleInput | None = None,
    *,
    source: SourceList | Sequence[ScoreSource],
    coupling: str = DEFAULT_COUPLING,
    round_to: int | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    check: bool = True,
) -> PruningReport:
    """Remove the units of every member of a :class:`~lightning_worm.core.sources.SourceList` in one prune.

    Each member's registered surgery removes its entries' pruned units in turn (each checks itself: the pruned
    model computes what the model before it does with the removed units zeroed), inside one all-or-nothing block:
    if any fails, the model is as before. Parameters, FLOPs and latency are measured once, around all of them.

    Args:
        model: the model.
        ticket: ``{entry name: keep-mask}`` over the members' entries, as the tracker's ticket is.
        example_input: one input batch; the surgeries that need one (channels) refuse without it.
        source: the ``SourceList`` that tracked the ticket (or the list of its sources).
        coupling: passed to the members whose surgery takes it (BatchNorm channels).
        round_to: passed to the members whose surgery takes it.
        measure_latency: time the model before and after.
        latency_repeats: timed forward passes.
        check: passed to every member's surgery.

    Returns:
        A report over all the members' entries (counts added up, ``kept_indices`` composed), whose plan has
        ``kind="sources"`` and ``options["plans"]``: each member's plan, in order. ``report.plan.options["shares"]``
        gives each member's units before and after.

    Raises:
        ValueError: if ``source`` is not a ``SourceList``, a ticket entry is tracked by no member, or a member's
            surgery refuses (a source without surgery, a bad option).
        PruningError: if a member's surgery fails; the model is then exactly as before.

    Example::

        report = prune_sources(bert, early_bird.ticket, batch, source=early_bird.source)
        report.shares  # {"AttentionHeadSource": {"before": 144, "after": 96, "entries": [...]}, ...}
    """
    resolved = resolve_source(source)
    if not isinstance(resolved, SourceList):
        raise ValueError(f"prune_sources prunes the members of a SourceList, got {type(resolved).__name__}: prune a "
                         "single source with its own surgery (`surgery_for(source).prune`).")
    source = resolved
    tickets = _member_tickets(model, ticket, source)
    given = {"coupling": coupling, "round_to": round_to, "latency_repeats": latency_repeats, "check": check}
    inputs = () if example_input is None else as_inputs(example_input)
    labelled: dict[str, PruningReport] = {}
    with _measured(model, inputs, measure_latency, latency_repeats) as numbers:
        with all_or_nothing(model, "Pruning several sources"):
            for label, member, part in zip(source.labels(), source.sources, tickets, strict=True):
                if part:
                    labelled[label] = surgery_for(member).prune(model, part, example_input, source=member,
                                                                **_member_options(member, given))
    reports = list(labelled.values())
    kept: KeptIndices = {}
    for report in reports:
        kept = compose_kept(kept, report.kept_indices)
    units_before = {n: c for r in reports for n, c in r.units_before.items()}
    units_after = {n: c for r in reports for n, c in r.units_after.items()}
    shares = {label: {"before": sum(r.units_before.values()), "after": sum(r.units_after.values()),
                      "entries": list(r.units_before)} for label, r in labelled.items()}
    plan = PruningPlan.of(model, inputs, pruned_groups=[], units_before=units_before, units_after=units_after,
                          kind="sources", source=SourceList.key,
                          options={"plans": [r.plan.to_dict() for r in reports], "shares": shares})
    notes = [r.note for r in reports if r.note]
    return PruningReport(
        plan=plan, **numbers, units_before=units_before, units_after=units_after, kept_indices=kept,
        **{key: sum(getattr(r, key) for r in reports) for key in _COUNTS},
        coupling="+".join(dict.fromkeys(r.coupling for r in reports)),
        round_to=round_to,
        kept_by_entry={n: c for r in reports for n, c in r.kept_by_entry.items()},
        note=" ".join(notes) or None,
    )


def _replay_sources(model: nn.Module, plan: PruningPlan, *, source: SourceList | None = None) -> KeptIndices:
    """Repeat every member's plan in order on a freshly built model; the model is unchanged if one does not fit."""
    from lightning_worm.core.surgery.registry import apply_plan

    plans = plan.options.get("plans")
    if not isinstance(plans, list) or not all(isinstance(p, Mapping) for p in plans):
        raise ValueError("A 'sources' plan holds its members' plans in options['plans'] (a list of plan dicts). The "
                         "plan was edited or corrupted; re-create it (or restore it from the checkpoint).")
    members = list(source.sources) if isinstance(source, SourceList) else []
    kept: KeptIndices = {}
    with all_or_nothing(model, "Replaying the plan of several sources"):  # a member's plan that does not fit: undone
        for member_plan in plans:
            sub = PruningPlan.from_dict(member_plan)
            options: dict[str, Any] = {}
            match = [m for m in members if surgery_for(m).kind == sub.kind]
            if len(match) == 1 and "source" in _keyword_only(surgery_for(match[0]).replay):
                options["source"] = match[0]
            kept = compose_kept(kept, apply_plan(model, sub, **options))
    return kept


def _check_sources(model: nn.Module, source: ScoreSource) -> None:
    """Every member must have a surgery, and pass its check."""
    assert isinstance(source, SourceList), "registered for SourceList"
    for member in source.sources:
        surgery = surgery_for(member)
        if surgery.check is not None:
            surgery.check(model, member)


def _options_for(source: ScoreSource) -> tuple[str, ...]:
    """The options the members' surgeries take (``measure_latency`` and ``latency_repeats`` always)."""
    assert isinstance(source, SourceList), "registered for SourceList"
    taken = {"measure_latency", "latency_repeats"}.union(*(surgery_for(m).options for m in source.sources))
    return tuple(key for key in surgery_for(source).options if key in taken)


register_surgery(SourceList, Surgery("sources", prune=prune_sources, replay=_replay_sources, check=_check_sources,
                                     accepts=_options_for))
