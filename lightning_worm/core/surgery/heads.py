"""Attention heads: :func:`prune_heads` removes the heads a ticket prunes; plans of kind ``"heads"`` replay.

A removed head takes its rows of the query, key and value weights (and biases) and the matching input
columns of the block's output projection with it. The output projection is the block's own
``o_proj``/``out_proj``/``proj``/... Linear if it has one, else the Linear that torch-pruning's dependency
graph couples to the query rows (Hugging Face BERT's ``attention.output.dense``). The cut itself uses
torch-pruning's Linear pruners. The module's head count attributes are fixed (``num_heads``,
``num_attention_heads``, ``all_head_size``, key/value head counts), so that its forward still reshapes
right. The plan records the output projection by name, so the replay needs no example input.

Registered as the surgery of :class:`~lightning_worm.AttentionHeadSource`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_worm.core.inputs import ExampleInput, as_inputs
from lightning_worm.core.measure import eval_mode
from lightning_worm.core.sources import ScoreSource
from lightning_worm.core.sources.attention import (
    HEAD_COUNT_ATTRS,
    HEAD_SIZE_ATTRS,
    KV_HEAD_COUNT_ATTRS,
    OUTPUT_NAMES,
    PARTS,
    PRUNED_HEADS_ATTR,
    AttentionBlock,
    AttentionHeadSource,
)
from lightning_worm.core.surgery.equivalence import check_equivalence, run_pruned_forward
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, _measured
from lightning_worm.core.surgery.registry import Surgery, register_surgery
from lightning_worm.core.surgery.transaction import all_or_nothing
from lightning_worm.core.validation import check_int

__all__ = ["MHA_REFUSAL", "prune_heads"]

HEADS_HINT = (
    "The block is not laid out as the head source assumes: a packed projection must hold [all queries | all keys | "
    "all values] (GPT-NeoX's per-head [q_h | k_h | v_h] is not), and the head count must be the only thing that "
    "knows the heads (a per-head bias, as T5's and Swin's, or slice sizes from a config, as Phi-3's, are not cut). "
    "Name the blocks that are (`AttentionHeadSource(modules=[...])`) or track another source."
)

MHA_REFUSAL = (
    "nn.MultiheadAttention cannot lose heads: its head size is fixed to embed_dim / num_heads, so fewer heads "
    "would change its embedding size. Use AttentionQKSource (element-wise, applied as fixed zeros), or build "
    "the block from separate query/key/value nn.Linear layers (as examples/vit.py does) to remove heads."
)


def _validated_heads(ticket: Any, blocks: Mapping[str, AttentionBlock]) -> dict[str, Tensor]:
    if not isinstance(ticket, Mapping) or not ticket:
        raise ValueError("The ticket is empty: it maps attention module names to 1-D bool head masks "
                         "(True = keep), as `EarlyBirdCallback(source=AttentionHeadSource()).ticket` does.")
    unknown = [n for n in ticket if n not in blocks]
    if unknown:
        raise ValueError(f"The ticket names {unknown[:5]}, which are not tracked attention blocks of this model "
                         f"(tracked: {list(blocks)[:3]}...). Compute the ticket on this model.")
    masks = {}
    for name, keep in ticket.items():
        block = blocks[name]
        if not (isinstance(keep, Tensor) and keep.dtype == torch.bool and keep.dim() == 1):
            raise ValueError(f"Ticket entry {name!r} must be a 1-D torch.bool tensor (True = keep).")
        if keep.numel() != block.num_kv_heads:
            raise ValueError(f"Ticket entry {name!r} has {keep.numel()} heads but the block has "
                             f"{block.num_kv_heads}; the ticket comes from another model (or before a prune).")
        masks[name] = keep.detach().cpu()
    return masks


def _own_output(block: AttentionBlock) -> str | None:
    children = dict(block.module.named_children())
    num_heads, _, head_dim = block._counts()
    width = num_heads * head_dim
    for name in OUTPUT_NAMES:
        child = children.get(name)
        if isinstance(child, nn.Linear) and child.in_features == width and name not in block.projections:
            return f"{block.name}.{name}" if block.name else name
    return None


def _graph_outputs(model: nn.Module, blocks: Sequence[AttentionBlock], inputs: tuple[Tensor, ...]) -> dict[str, str]:
    """The output projection of each block, as torch-pruning's dependency graph couples it to the query rows."""
    if not inputs:
        raise ValueError(
            f"The attention block {blocks[0].name!r} does not own its output projection, so the dependency graph "
            "must find it: pass `example_input=` (one input batch)."
        )
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    with eval_mode(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, inputs, verbose=False)
    found = {}
    for block in blocks:
        query = block.linear("q")
        own = {block.linear(p) for p in PARTS}
        group = graph.get_pruning_group(query, tp.prune_linear_out_channels, idxs=list(range(block._counts()[2])))
        outputs = {
            item.dep.target.module for item in group
            if isinstance(item.dep.target.module, nn.Linear) and item.dep.target.module not in own
            and item.dep.handler.__name__ == "prune_in_channels"
        }
        coupled = {item.dep.target.module for item in group if item.dep.target.module in own}
        if len(outputs) != 1 or coupled != own:
            raise ValueError(
                f"The dependency graph does not couple the heads of {block.name!r} to one output projection "
                f"(found {sorted(names[m] for m in outputs)}): name the block's output Linear one of {OUTPUT_NAMES} "
                "or prune these heads with your own surgery."
            )
        found[block.name] = names[outputs.pop()]
    return found


def _part_rows(block: AttentionBlock, removed_units: Sequence[int], part: str) -> list[int]:
    per_unit = block._counts()[2] * (block.group_size if part == "q" else 1)
    return [u * per_unit + i for u in removed_units for i in range(per_unit)]


def _keep_indices(size: int, removed: Sequence[int]) -> Tensor:
    gone = set(removed)
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


@torch.no_grad()
def _cut_heads(model: nn.Module, block: AttentionBlock, removed_units: list[int], output: str) -> KeptIndices:
    """Remove the units of one block in place; returns the kept indices of every parameter changed."""
    import torch_pruning as tp

    kept: KeptIndices = {}
    prefix = f"{block.name}." if block.name else ""
    q_rows = _part_rows(block, removed_units, "q")
    if block.layout == "packed":
        linear = block.linear("q")
        size = linear.out_features // 3
        rows = [i * size + r for i, part in enumerate(PARTS) for r in _part_rows(block, removed_units, part)]
        keep = _keep_indices(linear.out_features, rows)
        tp.prune_linear_out_channels(linear, rows)
        name = prefix + block.projections[0]
        kept[f"{name}.weight"] = [keep, None]
        if linear.bias is not None:
            kept[f"{name}.bias"] = [keep]
    else:
        for part in PARTS:
            linear = block.linear(part)
            rows = _part_rows(block, removed_units, part)
            keep = _keep_indices(linear.out_features, rows)
            tp.prune_linear_out_channels(linear, rows)
            name = prefix + block.projections[PARTS.index(part)]
            kept[f"{name}.weight"] = [keep, None]
            if linear.bias is not None:
                kept[f"{name}.bias"] = [keep]
    out = cast(nn.Linear, model.get_submodule(output))  # found as, or checked to be, a Linear
    keep = _keep_indices(out.in_features, q_rows)
    tp.prune_linear_in_channels(out, q_rows)
    kept[f"{output}.weight"] = [None, keep]

    num_heads, num_kv_heads, head_dim = block._counts()
    heads = num_heads - len(removed_units) * block.group_size
    kv_heads = num_kv_heads - len(removed_units)
    module = block.module
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in KV_HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    if isinstance(getattr(module, "all_head_size", None), int):  # Hugging Face BERT family
        # torch annotates the values of Module.__setattr__ as Tensor | Module; any attribute is accepted.
        module.all_head_size = heads * head_dim  # type: ignore[assignment]
    # Read back by the sources, before a `num_heads=` given for the unpruned module.
    setattr(module, PRUNED_HEADS_ATTR, (heads, kv_heads))
    block.num_heads, block.num_kv_heads = heads, kv_heads
    return kept


def prune_heads(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    example_input: ExampleInput | None = None,
    *,
    source: AttentionHeadSource | None = None,
    round_to: int | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    check: bool = True,
) -> PruningReport:
    r"""Physically remove the heads a ticket prunes, in place; all or nothing, checked on ``example_input``.

    Args:
        model: the model; block names in ``ticket`` are relative to it.
        ticket: ``{attention module name: BoolTensor[units]}`` (``True`` = keep), as
            :class:`~lightning_worm.AttentionHeadSource` masks it. Unnamed blocks keep all their heads.
        example_input: one input batch (``model(*inputs)``): FLOPs and latency are measured on it, and the
            dependency graph needs it for blocks without their own output projection.
        source: the source that recognised the blocks (its ``modules``/``projections``/``num_heads``, recorded
            in the plan, so that the replay finds the same blocks); ``AttentionHeadSource()`` by default.
        round_to: keep a multiple of this many units per block (the next-best heads are kept back).
        measure_latency: time the model before and after (eval mode, no grad, median of ``latency_repeats``).
        latency_repeats: timed forward passes, after 3 warm-up passes.
        check: with ``example_input``, check the result (on by default): the pruned model must compute what the
            dense model does with the removed heads' rows of the query, key and value and columns of the output
            projection zeroed, else the prune is undone and refused. Without an input nothing is checked.

    Returns:
        A ``PruningReport`` whose counts are heads (units) and whose plan has ``kind="heads"``. A FLOP count or a
        latency that cannot be measured is a warning and ``None`` in the report.

    Raises:
        PruningError: if the surgery fails, the pruned model's forward fails (a per-head bias or a slice size the
            surgery does not cut), or the check fails (a packed projection not laid out ``[q | k | v]``). The
            model is then exactly as before.
        NotImplementedError: if the ticket prunes heads of an ``nn.MultiheadAttention`` (the message says
            what to use instead).
        ValueError: on a bad ticket or option, or if a block's output projection cannot be found.

    Example::

        report = prune_heads(vit, {"blocks.0.attn": torch.tensor([True, False, True, True])}, torch.randn(2, 3, 8, 8))
        vit.blocks[0].attn.num_heads  # 3
    """
    source = source or AttentionHeadSource()
    check_int("round_to", round_to, minimum=1, allow_none=True)
    check_int("latency_repeats", latency_repeats, minimum=1)
    blocks = source.tracked(model)
    masks = _validated_heads(ticket, blocks)
    if any(blocks[n].layout == "mha" and not bool(m.all()) for n, m in masks.items()):
        raise NotImplementedError(MHA_REFUSAL)
    inputs = () if example_input is None else as_inputs(example_input)

    removed: dict[str, list[int]] = {}
    kept_for_min = kept_for_round = 0
    for name, keep in masks.items():
        keep = keep.clone()
        scores = source.scores(blocks[name]).cpu()
        if not keep.any():
            keep[int(torch.argmax(scores))] = True
            kept_for_min += 1
        if round_to is not None:
            while int(keep.sum()) % round_to and not keep.all():
                pruned = torch.nonzero(~keep).flatten()
                keep[pruned[torch.argmax(scores[pruned])]] = True
                kept_for_round += 1
        units = torch.nonzero(~keep).flatten().tolist()
        if units:
            removed[name] = units

    unfixable = [n for n in removed if not any(isinstance(getattr(blocks[n].module, a, None), int)
                                               for a in HEAD_COUNT_ATTRS + HEAD_SIZE_ATTRS)]
    if unfixable:
        warnings.warn(
            f"The attention modules {unfixable[:3]} say their head count through no attribute the head prune can fix "
            f"({', '.join(HEAD_COUNT_ATTRS + HEAD_SIZE_ATTRS)}): after the cut their forward must split the rows into "
            "heads by the head size (e.g. `q.view(b, n, -1, head_size)`). If it uses a head count of its own, name "
            "that attribute `num_heads`.", UserWarning, stacklevel=2)
    units_before = {name: block.num_kv_heads for name, block in blocks.items()}
    heads_before = {name: [block.num_heads, block.num_kv_heads] for name, block in blocks.items()}
    kept_indices: KeptIndices = {}
    with _measured(model, inputs, measure_latency, latency_repeats) as numbers:
        with all_or_nothing(model, "Pruning the heads", HEADS_HINT) as dense:
            own = {n: _own_output(blocks[n]) for n in removed}
            missing = [blocks[n] for n, out in own.items() if out is None]
            outputs = {n: out for n, out in own.items() if out is not None}
            if missing:
                outputs.update(_graph_outputs(model, missing, inputs))
            for name, units in removed.items():
                kept_indices.update(_cut_heads(model, blocks[name], units, outputs[name]))
            if inputs:
                if check:
                    check_equivalence(model, dense, kept_indices, inputs, what="heads", hint=HEADS_HINT)
                else:
                    run_pruned_forward(model, inputs, HEADS_HINT)

    units_after = {name: block.num_kv_heads for name, block in blocks.items()}
    plan = PruningPlan.of(
        model, inputs,
        pruned_groups=[[name, units, outputs[name]] for name, units in removed.items()],
        units_before=units_before,
        units_after=units_after,
        kind="heads",
        source=AttentionHeadSource.key,
        options={"heads_before": heads_before, "source_options": source.options()},
    )
    ticket_pruned = sum(int((~m).sum()) for m in masks.values())
    return PruningReport(
        plan=plan,
        **numbers,
        units_before=units_before,
        units_after=units_after,
        ticket_pruned=ticket_pruned,
        pruned_from_ticket=ticket_pruned - kept_for_min - kept_for_round,
        pruned_outside_ticket=0,
        kept_for_coupling=0,
        kept_for_min_units=kept_for_min,
        kept_for_round_to=kept_for_round,
        kept_unprunable=0,
        kept_indices=kept_indices,
        coupling="heads",
        round_to=round_to,
        prunable=sum(units_before.values()) - len(blocks),  # every block keeps one head
    )

def _replay_heads(model: nn.Module, plan: PruningPlan, *, source: AttentionHeadSource | None = None) -> KeptIndices:
    """Repeat a head prune on a freshly built model (``apply_plan`` dispatches ``kind="heads"`` here).

    Args:
        model: a model built like the pruned one, not yet pruned.
        plan: the head plan, its fields validated.
        source: an ``AttentionHeadSource`` to find the blocks with; by default one built from the options the
            plan recorded (``modules``, ``projections``, ``num_heads`` of the source that pruned).

    Raises:
        ValueError: if the plan does not fit the model (names the block at fault); the model is then unchanged.
    """
    for i, group in enumerate(plan.pruned_groups):
        if not (isinstance(group, (list, tuple)) and len(group) == 3 and isinstance(group[0], str)
                and isinstance(group[1], (list, tuple)) and isinstance(group[2], str)
                and all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in group[1])):
            raise ValueError(f"Plan pruned_groups[{i}] must be [block name, head indices, output projection name], "
                             f"got {group!r}. The plan was edited or corrupted; re-create it with prune_heads.")
    if not isinstance(source, AttentionHeadSource):
        source = _recorded_source(plan)
    blocks = source.tracked(model)
    counts = {name: blocks[name].num_kv_heads for name in plan.units_before if name in blocks}
    missing = [n for n in plan.units_before if n not in blocks]
    missing += [out for _, _, out in plan.pruned_groups if not _has_linear(model, out)]
    if missing:
        raise ValueError(f"The head plan names modules this model lacks or does not recognise: {missing[:5]}. "
                         f"Build the model with the same arguments (the plan is for a {plan.model_class}).")
    if counts != plan.units_before:
        hint = ("It looks already pruned; apply a plan to a freshly built model only."
                if counts == plan.units_after else "Build the model with the same arguments as the pruned one.")
        raise ValueError(f"The model's head counts {counts} differ from the plan's {plan.units_before}. {hint}")
    for name, units, _ in plan.pruned_groups:
        if not units or max(units) >= counts[name] or len(set(units)) != len(units):
            raise ValueError(f"The plan's heads {units} do not fit {name!r} with {counts[name]} heads.")
    kept: KeptIndices = {}
    for name, units, output in plan.pruned_groups:
        kept.update(_cut_heads(model, blocks[name], list(units), output))
    return kept


def _recorded_source(plan: PruningPlan) -> AttentionHeadSource:
    """The source a head plan was made with (plans without recorded options: the default source)."""
    options = plan.options.get("source_options") or {}
    try:
        return AttentionHeadSource(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The head plan records source options {options!r} that AttentionHeadSource does not take "
                         f"({error}): pass the source as `apply_plan(model, plan, source=AttentionHeadSource(...))`."
                         ) from error


def _has_linear(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def _check_heads(model: nn.Module, source: ScoreSource) -> None:
    """Refuse a model with tracked ``nn.MultiheadAttention`` blocks: they cannot lose heads."""
    mha = [name for name, block in source.tracked(model).items() if block.layout == "mha"]
    if mha:
        raise ValueError(
            f"{len(mha)} tracked attention block(s) are nn.MultiheadAttention ({', '.join(map(repr, mha[:3]))}"
            f"{', ...' if len(mha) > 3 else ''}), so PruneAndFinetune could not remove their heads at the ticket. "
            f"{MHA_REFUSAL} To prune the other blocks' heads, name them: `AttentionHeadSource(modules=[...])`."
        )


register_surgery(AttentionHeadSource, Surgery("heads", prune=prune_heads, replay=_replay_heads, check=_check_heads))
