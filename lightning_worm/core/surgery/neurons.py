"""Feed-forward neurons: :func:`prune_neurons` removes the neurons a ticket prunes; plans of kind ``"neurons"`` replay.

A removed neuron takes its rows of the block's input projection weights and biases (both halves of a packed
``[gate | up]`` projection) and its column of the output projection weight with it (transposed for GPT-2's
``Conv1D``). The block owns both projections, so the cut needs no dependency graph and the replay no example
input: the projections' sizes (``out_features``, ``in_features``, ``Conv1D.nf``/``nx``) and the block's neuron
count attributes (``intermediate_size``, ...) are set to the new width.

Registered as the surgery of :class:`~lightning_worm.FeedForwardSource`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm.core.inputs import ExampleInput, as_inputs
from lightning_worm.core.sources import ScoreSource
from lightning_worm.core.sources.feedforward import NEURON_COUNT_ATTRS, FeedForwardBlock, FeedForwardSource
from lightning_worm.core.surgery.equivalence import check_equivalence, run_pruned_forward
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, _measured
from lightning_worm.core.surgery.registry import Surgery, register_surgery
from lightning_worm.core.surgery.transaction import all_or_nothing
from lightning_worm.core.surgery.units import choose_units, unit_report
from lightning_worm.core.validation import check_int

__all__ = ["NEURONS_HINT", "prune_neurons"]

NEURONS_HINT = (
    "The block is not laid out as the neuron source assumes: its neurons must reach the output projection only "
    "through element-wise functions (no normalisation, mixing or reshaping across them between the projections), "
    "and a single packed input projection must hold [gate | up] halves. Name the blocks that are "
    "(`FeedForwardSource(modules=[...])`) or track another source."
)


def _validated_neurons(ticket: Any, blocks: Mapping[str, FeedForwardBlock]) -> dict[str, Tensor]:
    if not isinstance(ticket, Mapping) or not ticket:
        raise ValueError("The ticket is empty: it maps feed-forward block names to 1-D bool neuron masks "
                         "(True = keep), as `EarlyBirdCallback(source=FeedForwardSource()).ticket` does.")
    unknown = [n for n in ticket if n not in blocks]
    if unknown:
        raise ValueError(f"The ticket names {unknown[:5]}, which are not tracked feed-forward blocks of this model "
                         f"(tracked: {list(blocks)[:3]}...). Compute the ticket on this model.")
    masks = {}
    for name, keep in ticket.items():
        if not (isinstance(keep, Tensor) and keep.dtype == torch.bool and keep.dim() == 1):
            raise ValueError(f"Ticket entry {name!r} must be a 1-D torch.bool tensor (True = keep).")
        if keep.numel() != blocks[name].num_neurons:
            raise ValueError(f"Ticket entry {name!r} has {keep.numel()} neurons but the block has "
                             f"{blocks[name].num_neurons}; the ticket comes from another model (or before a prune).")
        masks[name] = keep.detach().cpu()
    return masks


def _shared(model: nn.Module, blocks: Mapping[str, FeedForwardBlock]) -> dict[str, str]:
    """Per block whose neurons cannot be cut alone, why: a projection weight tied to another parameter, or a
    projection that another tracked block uses too."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    owner: dict[int, str] = {}
    problems: dict[str, str] = {}
    for block_name, block in blocks.items():
        for path, weight, _, _ in block.parameters():
            tied = names.get(id(weight), [])
            if len(tied) > 1:
                problems.setdefault(block_name, f"its {path!r} is shared with {tied[1]!r} (tied weights): cutting it "
                                                f"would resize {tied[1]!r} too")
            other = owner.setdefault(id(weight), block_name)
            if other != block_name:
                problems.setdefault(block_name, f"its {path!r} belongs to the block {other!r} too")
    return problems


def _keep_indices(size: int, removed: list[int]) -> Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def _cut(module: nn.Module, attr: str, dim: int, index: Tensor) -> None:
    """Replace ``module.<attr>`` by a new parameter of its entries ``index`` along ``dim`` (the old one untouched)."""
    old = getattr(module, attr)
    new = nn.Parameter(old.detach().index_select(dim, index.to(old.device)), requires_grad=old.requires_grad)
    setattr(module, attr, new)


def _set_width(module: nn.Module, attr: str, old: int, new: int) -> None:
    """Set an integer size attribute that reads ``old`` to ``new`` (left alone if absent or another value)."""
    value = getattr(module, attr, None)
    if isinstance(value, int) and not isinstance(value, bool) and value == old:
        # torch annotates the values of Module.__setattr__ as Tensor | Module; any attribute is accepted.
        setattr(module, attr, new)


@torch.no_grad()
def _cut_neurons(block: FeedForwardBlock, removed: list[int]) -> KeptIndices:
    """Remove the neurons of one block in place; returns the kept indices of every parameter changed."""
    old = block.num_neurons
    keep = _keep_indices(old, removed)
    rows = block.positions(keep)
    kept: KeptIndices = {}
    for child in block.inputs:
        projection = block.projection(child)
        dim = block.input_dim()
        _cut(projection, "weight", dim, rows)
        kept[f"{block.path(child)}.weight"] = [rows, None] if dim == 0 else [None, rows]
        if isinstance(getattr(projection, "bias", None), nn.Parameter):
            _cut(projection, "bias", 0, rows)
            kept[f"{block.path(child)}.bias"] = [rows]
        _set_width(projection, "nf" if block.transposed else "out_features", old * block.packed, rows.numel())
    projection = block.projection(block.output)
    dim = block.output_dim()
    _cut(projection, "weight", dim, keep)
    kept[f"{block.path(block.output)}.weight"] = [keep, None] if dim == 0 else [None, keep]
    _set_width(projection, "nx" if block.transposed else "in_features", old, keep.numel())
    for attr in NEURON_COUNT_ATTRS:
        _set_width(block.module, attr, old, keep.numel())
    block.num_neurons = keep.numel()
    return kept


def prune_neurons(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    example_input: ExampleInput | None = None,
    *,
    source: FeedForwardSource | None = None,
    round_to: int | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    check: bool = True,
) -> PruningReport:
    r"""Physically remove the feed-forward neurons a ticket prunes, in place; all or nothing, checked on an input.

    Args:
        model: the model; block names in ``ticket`` are relative to it.
        ticket: ``{block module name: BoolTensor[neurons]}`` (``True`` = keep), as
            :class:`~lightning_worm.FeedForwardSource` masks it. Unnamed blocks keep all their neurons.
        example_input: one input batch (``model(*inputs)``): FLOPs and latency are measured on it, and the result
            is checked on it.
        source: the source that recognised the blocks (its ``modules``/``inputs``/``output``, recorded in the plan,
            so that the replay finds the same blocks); ``FeedForwardSource()`` by default.
        round_to: keep a multiple of this many neurons per block (the next-best neurons are kept back).
        measure_latency: time the model before and after (eval mode, no grad, median of ``latency_repeats``).
        latency_repeats: timed forward passes, after 3 warm-up passes.
        check: with ``example_input``, check the result (on by default): the pruned model must compute what the
            dense model does with the removed neurons' input rows and biases and output columns zeroed, else the
            prune is undone and refused. Without an input nothing is checked.

    Returns:
        A ``PruningReport`` whose counts are neurons (units) and whose plan has ``kind="neurons"``. A FLOP count or a
        latency that cannot be measured is a warning and ``None`` in the report.

    Raises:
        PruningError: if the surgery fails, the pruned model's forward fails, or the check fails (a normalisation
            or a reshape across the neurons between the projections). The model is then exactly as before.
        ValueError: on a bad ticket or option, or if the ticket prunes a block whose projection is shared (tied
            weights, or a Linear of two blocks). The model is then unchanged.

    Example::

        report = prune_neurons(vit, {"blocks.0.mlp": torch.arange(64) % 2 == 0}, torch.randn(2, 3, 32, 32))
        vit.blocks[0].mlp[0].out_features  # 32
    """
    source = source or FeedForwardSource()
    check_int("round_to", round_to, minimum=1, allow_none=True)
    check_int("latency_repeats", latency_repeats, minimum=1)
    blocks = source.tracked(model)
    masks = _validated_neurons(ticket, blocks)
    inputs = () if example_input is None else as_inputs(example_input)

    choice = choose_units(masks, lambda name: source.scores(blocks[name]), round_to)
    removed = choice.removed
    shared = {name: why for name, why in _shared(model, blocks).items() if name in removed}
    if shared:
        name, why = next(iter(shared.items()))
        raise ValueError(f"The neurons of {name!r} cannot be removed: {why}. Keep all its neurons, or leave the block "
                         "out of the search (`FeedForwardSource(modules=[...])`).")

    units_before = {name: block.num_neurons for name, block in blocks.items()}
    kept_indices: KeptIndices = {}
    with _measured(model, inputs, measure_latency, latency_repeats) as numbers:
        with all_or_nothing(model, "Pruning the neurons", NEURONS_HINT) as dense:
            source.fold(model)  # slimming gates, if any, into the output projection: the pruned model holds none
            for name, units in removed.items():
                kept_indices.update(_cut_neurons(blocks[name], units))
            if inputs:
                if check:
                    check_equivalence(model, dense, kept_indices, inputs, what="neurons", hint=NEURONS_HINT)
                else:
                    run_pruned_forward(model, inputs, NEURONS_HINT)

    units_after = {name: block.num_neurons for name, block in blocks.items()}
    plan = PruningPlan.of(
        model, inputs,
        pruned_groups=[[name, units] for name, units in removed.items()],
        units_before=units_before,
        units_after=units_after,
        kind="neurons",
        source=FeedForwardSource.key,
        options={"source_options": source.options()},
    )
    return unit_report(plan, numbers, masks, choice, kept_indices, coupling="neurons", round_to=round_to)


def _replay_neurons(model: nn.Module, plan: PruningPlan, *, source: FeedForwardSource | None = None) -> KeptIndices:
    """Repeat a neuron prune on a freshly built model (``apply_plan`` dispatches ``kind="neurons"`` here).

    Args:
        model: a model built like the pruned one, not yet pruned.
        plan: the neuron plan, its fields validated.
        source: a ``FeedForwardSource`` to find the blocks with; by default one built from the options the plan
            recorded (``modules``, ``inputs``, ``output`` of the source that pruned).

    Raises:
        ValueError: if the plan does not fit the model (names the block at fault); the model is then unchanged.
    """
    fix = "The plan was edited or corrupted; re-create it with prune_neurons (or restore it from the checkpoint)."
    seen: set[str] = set()
    for i, group in enumerate(plan.pruned_groups):
        if not (isinstance(group, (list, tuple)) and len(group) == 2 and isinstance(group[0], str)
                and isinstance(group[1], (list, tuple))
                and all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in group[1])):
            raise ValueError(f"Plan pruned_groups[{i}] must be [block name, neuron indices], got {group!r}. {fix}")
        if group[0] in seen:
            raise ValueError(f"Plan pruned_groups[{i}] names the block {group[0]!r} a second time. {fix}")
        if group[0] not in plan.units_before:
            raise ValueError(f"Plan pruned_groups[{i}] names the block {group[0]!r}, which units_before does not "
                             f"count. {fix}")
        seen.add(group[0])
    if not isinstance(source, FeedForwardSource):
        source = _recorded_source(plan)
    blocks = source.tracked(model)
    missing = [n for n in plan.units_before if n not in blocks]
    if missing:
        raise ValueError(f"The neuron plan names feed-forward blocks this model lacks or does not recognise: "
                         f"{missing[:5]}. Build the model with the same arguments (the plan is for a "
                         f"{plan.model_class}).{plan.made_for(model)}")
    counts = {name: blocks[name].num_neurons for name in plan.units_before}
    if counts != plan.units_before:
        hint = ("It looks already pruned; apply a plan to a freshly built model only."
                if counts == plan.units_after else "Build the model with the same arguments as the pruned one.")
        raise ValueError(f"The model's neuron counts {counts} differ from the plan's {plan.units_before}. {hint}")
    for name, units in plan.pruned_groups:
        if not units or max(units) >= counts[name] or len(set(units)) != len(units) or len(units) >= counts[name]:
            raise ValueError(f"The plan's neurons {list(units)[:8]}{'...' if len(units) > 8 else ''} do not fit "
                             f"{name!r} with {counts[name]} neurons (distinct indices below {counts[name]}, at least "
                             f"one neuron kept). {fix}")
        if plan.units_after[name] != counts[name] - len(units):
            raise ValueError(f"The plan removes {len(units)} neurons of {name!r} but says {plan.units_after[name]} of "
                             f"{counts[name]} are left. {fix}")
    shared = {name: why for name, why in _shared(model, blocks).items() if name in seen}
    if shared:
        name, why = next(iter(shared.items()))
        raise ValueError(f"The plan removes neurons of {name!r}, but in this model {why}.")
    source.fold(model)  # a fresh model given slimming gates (a resumed search): the pruned model holds none
    kept: KeptIndices = {}
    for name, units in plan.pruned_groups:
        kept.update(_cut_neurons(blocks[name], list(units)))
    return kept


def _recorded_source(plan: PruningPlan) -> FeedForwardSource:
    """The source a neuron plan was made with (plans without recorded options: the default source)."""
    options = plan.options.get("source_options") or {}
    try:
        return FeedForwardSource(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The neuron plan records source options {options!r} that FeedForwardSource does not take "
                         f"({error}): pass the source as `apply_plan(model, plan, source=FeedForwardSource(...))`."
                         ) from error


def _check_neurons(model: nn.Module, source: ScoreSource) -> None:
    """Refuse a model whose tracked blocks share a projection (tied weights, a Linear of two blocks)."""
    assert isinstance(source, FeedForwardSource), "registered for FeedForwardSource and its subclasses"
    shared = _shared(model, source.tracked(model))
    if shared:
        listed = "; ".join(f"{name!r}: {why}" for name, why in list(shared.items())[:3])
        more = "; ..." if len(shared) > 3 else ""
        raise ValueError(
            f"{len(shared)} tracked feed-forward block(s) cannot lose neurons ({listed}{more}), so PruneAndFinetune "
            "could not remove them at the ticket. Name the other blocks: `FeedForwardSource(modules=[...])`."
        )


register_surgery(FeedForwardSource, Surgery("neurons", prune=prune_neurons, replay=_replay_neurons,
                                            check=_check_neurons))
