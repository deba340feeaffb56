"""Physical removal of attention heads, and element-wise tickets as fixed zeros; both replay from a plan.

Heads (``PruningPlan(kind="heads")``): a removed head takes its rows of the query, key and value
weights (and biases) and the matching input columns of the block's output projection with it.
The output projection is the block's own ``o_proj``/``out_proj``/``proj``/... Linear if it has one,
else the Linear that torch-pruning's dependency graph couples to the query rows (Hugging Face BERT's
``attention.output.dense``). The cut itself uses torch-pruning's Linear pruners. The module's head
count attributes are fixed (``num_heads``, ``num_attention_heads``, ``all_head_size``, key/value head
counts), so that its forward still reshapes right. The plan records the output projection by name, so
the replay needs no example input.

Element-wise (``PruningPlan(kind="elementwise")``): nothing can be removed from a dense matrix, so the
ticket becomes fixed zeros through ``torch.nn.utils.prune`` (``weight = weight_orig * weight_mask``,
the mask a buffer in the ``state_dict``). **This saves no time and no memory.**
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_worm.core.measure import batch_size, forward_flops, latency_ms
from lightning_worm.core.sources.attention import (
    _HEAD_ATTRS,
    _HEAD_DIM_ATTRS,
    _KV_HEAD_ATTRS,
    _PARTS,
    OUTPUT_NAMES,
    PRUNED_HEADS_ATTR,
    AttentionBlock,
    AttentionHeadSource,
    AttentionQKSource,
)
from lightning_worm.core.surgery import PruningPlan, PruningReport, register_replay

KeptIndices = dict[str, list[Optional[Tensor]]]
ExampleInput = Union[Tensor, Sequence[Tensor], None]

ELEMENTWISE_NOTE = (
    "The element-wise query/key ticket was applied as fixed zeros (weight = weight_orig * weight_mask): this saves "
    "no time and no memory, the dense matrix multiplies run as before. Track AttentionHeadSource() to remove "
    "whole heads instead."
)
MHA_REFUSAL = (
    "nn.MultiheadAttention cannot lose heads: its head size is fixed to embed_dim / num_heads, so fewer heads "
    "would change its embedding size. Use AttentionQKSource (element-wise, applied as fixed zeros), or build "
    "the block from separate query/key/value nn.Linear layers (as examples/vit.py does) to remove heads."
)


def _inputs(example_input: ExampleInput) -> tuple[Tensor, ...]:
    if example_input is None:
        return ()
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("`example_input` must be a tensor or a sequence of tensors (run as model(*inputs)).")
    return inputs


def _specs(inputs: tuple[Tensor, ...]) -> list[dict[str, Any]]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own train/eval flag restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _qualified_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _flops(model: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    """FLOPs per example of one eval forward (0 without an example input)."""
    return forward_flops(model, inputs) if inputs else 0


def _latency(model: nn.Module, inputs: tuple[Tensor, ...], measure: bool, repeats: int) -> Optional[float]:
    return latency_ms(model, inputs, repeats=repeats) if measure and inputs else None


# ------------------------------------------------------------------------------------------ heads


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


def _own_output(block: AttentionBlock) -> Optional[str]:
    children = dict(block.module.named_children())
    width = block.num_heads * block.head_dim
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
    with _eval_mode(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, inputs, verbose=False)
    found = {}
    for block in blocks:
        query = block.linear("q")
        own = {block.linear(p) for p in _PARTS}
        group = graph.get_pruning_group(query, tp.prune_linear_out_channels, idxs=list(range(block.head_dim)))
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
    per_unit = block.head_dim * (block.group_size if part == "q" else 1)
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
        rows = [i * size + r for i, part in enumerate(_PARTS) for r in _part_rows(block, removed_units, part)]
        keep = _keep_indices(linear.out_features, rows)
        tp.prune_linear_out_channels(linear, rows)
        name = prefix + block.projections[0]
        kept[f"{name}.weight"] = [keep, None]
        if linear.bias is not None:
            kept[f"{name}.bias"] = [keep]
    else:
        for part in _PARTS:
            linear = block.linear(part)
            rows = _part_rows(block, removed_units, part)
            keep = _keep_indices(linear.out_features, rows)
            tp.prune_linear_out_channels(linear, rows)
            name = prefix + block.projections[_PARTS.index(part)]
            kept[f"{name}.weight"] = [keep, None]
            if linear.bias is not None:
                kept[f"{name}.bias"] = [keep]
    out = model.get_submodule(output)
    keep = _keep_indices(out.in_features, q_rows)
    tp.prune_linear_in_channels(out, q_rows)
    kept[f"{output}.weight"] = [None, keep]

    heads = block.num_heads - len(removed_units) * block.group_size
    kv_heads = block.num_kv_heads - len(removed_units)
    module = block.module
    for attr in _HEAD_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in _KV_HEAD_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    if isinstance(getattr(module, "all_head_size", None), int):  # Hugging Face BERT family
        module.all_head_size = heads * block.head_dim
    # Read back by the sources, before a `num_heads=` given for the unpruned module.
    setattr(module, PRUNED_HEADS_ATTR, (heads, kv_heads))
    block.num_heads, block.num_kv_heads = heads, kv_heads
    return kept


def prune_heads(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    source: Optional[AttentionHeadSource] = None,
    example_input: ExampleInput = None,
    *,
    round_to: Optional[int] = None,
    coupling: Any = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    **unused: Any,
) -> PruningReport:
    r"""Physically remove the heads a ticket prunes, in place.

    Args:
        model: the model; block names in ``ticket`` are relative to it.
        ticket: ``{attention module name: BoolTensor[units]}`` (``True`` = keep), as
            :class:`~lightning_worm.AttentionHeadSource` masks it. Unnamed blocks keep all their heads.
        source: the source that recognised the blocks (its ``modules``/``projections``/``num_heads``, recorded
            in the plan, so that the replay finds the same blocks).
        example_input: one input batch (``model(*inputs)``): FLOPs and latency are measured on it, and the
            dependency graph needs it for blocks without their own output projection.
        round_to: keep a multiple of this many units per block (the next-best heads are kept back).
        coupling: ignored (heads of different blocks are never coupled); accepted for ``PruneAndFinetune``.
        measure_latency: time the model before and after (eval mode, no grad, median of ``latency_repeats``).
        latency_repeats: timed forward passes, after 3 warm-up passes.

    Returns:
        A ``PruningReport`` whose counts are heads (units) and whose plan has ``kind="heads"``.

    Raises:
        NotImplementedError: if the ticket prunes heads of an ``nn.MultiheadAttention`` (the message says
            what to use instead).
        ValueError: on a bad ticket, or if a block's output projection cannot be found.

    Example::

        report = prune_heads(vit, {"blocks.0.attn": torch.tensor([True, False, True, True])}, torch.randn(2, 3, 8, 8))
        vit.blocks[0].attn.num_heads  # 3
    """
    source = source or AttentionHeadSource()
    if round_to is not None and not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"`round_to` must be None or an integer >= 1, got {round_to!r}.")
    blocks = source.tracked(model)
    masks = _validated_heads(ticket, blocks)
    if any(blocks[n].layout == "mha" and not bool(m.all()) for n, m in masks.items()):
        raise NotImplementedError(MHA_REFUSAL)
    inputs = _inputs(example_input)

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
                                               for a in _HEAD_ATTRS + _HEAD_DIM_ATTRS)]
    if unfixable:
        warnings.warn(
            f"The attention modules {unfixable[:3]} say their head count through no attribute the head prune can fix "
            f"({', '.join(_HEAD_ATTRS + _HEAD_DIM_ATTRS)}): after the cut their forward must split the rows into "
            "heads by the head size (e.g. `q.view(b, n, -1, head_size)`). If it uses a head count of its own, name "
            "that attribute `num_heads`.", UserWarning, stacklevel=2)
    outputs = {n: _own_output(blocks[n]) for n in removed}
    missing = [blocks[n] for n, out in outputs.items() if out is None]
    if missing:
        outputs.update(_graph_outputs(model, missing, inputs))

    channels_before = {name: block.num_kv_heads for name, block in blocks.items()}
    heads_before = {name: [block.num_heads, block.num_kv_heads] for name, block in blocks.items()}
    params_before = sum(p.numel() for p in model.parameters())
    flops_before = _flops(model, inputs)
    latency_before = _latency(model, inputs, measure_latency, latency_repeats)

    kept_indices: KeptIndices = {}
    for name, units in removed.items():
        kept_indices.update(_cut_heads(model, blocks[name], units, outputs[name]))

    channels_after = {name: block.num_kv_heads for name, block in blocks.items()}
    plan = PruningPlan(
        model_class=_qualified_name(model),
        input_specs=_specs(inputs),
        pruned_groups=[[name, units, outputs[name]] for name, units in removed.items()],
        channels_before=channels_before,
        channels_after=channels_after,
        kind="heads",
        source=AttentionHeadSource.key,
        options={"heads_before": heads_before, "source_options": source.options()},
    )
    ticket_pruned = sum(int((~m).sum()) for m in masks.values())
    return PruningReport(
        plan=plan,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        flops_before=flops_before,
        flops_after=_flops(model, inputs),
        channels_before=channels_before,
        channels_after=channels_after,
        ticket_pruned=ticket_pruned,
        pruned_from_ticket=ticket_pruned - kept_for_min - kept_for_round,
        pruned_outside_ticket=0,
        kept_for_coupling=0,
        kept_for_min_channels=kept_for_min,
        kept_for_round_to=kept_for_round,
        kept_unprunable=0,
        latency_before_ms=latency_before,
        latency_after_ms=_latency(model, inputs, measure_latency, latency_repeats),
        kept_indices=kept_indices,
        coupling="heads",
        round_to=round_to,
        flops_batch=batch_size(inputs) if inputs else 1,
        prunable=sum(channels_before.values()) - len(blocks),  # every block keeps one head
    )


@register_replay("heads")
def replay_heads(model: nn.Module, plan: Union[PruningPlan, Mapping[str, Any]], source: Any = None) -> KeptIndices:
    """Repeat a head prune on a freshly built model (``apply_plan`` dispatches ``kind="heads"`` here).

    Args:
        model: a model built like the pruned one, not yet pruned.
        plan: the head plan (or its ``to_dict()``).
        source: an ``AttentionHeadSource`` to find the blocks with; by default one built from the options the
            plan recorded (``modules``, ``projections``, ``num_heads`` of the source that pruned).

    Raises:
        ValueError: if the plan does not fit the model (names the block at fault); the model is then unchanged.
    """
    plan = plan if isinstance(plan, PruningPlan) else PruningPlan.from_dict(plan)
    if not isinstance(source, AttentionHeadSource):
        source = _recorded_source(plan)
    blocks = source.tracked(model)
    counts = {name: blocks[name].num_kv_heads for name in plan.channels_before if name in blocks}
    missing = [n for n in plan.channels_before if n not in blocks]
    missing += [out for _, _, out in plan.pruned_groups if not _has_linear(model, out)]
    if missing:
        raise ValueError(f"The head plan names modules this model lacks or does not recognise: {missing[:5]}. "
                         f"Build the model with the same arguments (the plan is for a {plan.model_class}).")
    if counts != plan.channels_before:
        hint = ("It looks already pruned; apply a plan to a freshly built model only."
                if counts == plan.channels_after else "Build the model with the same arguments as the pruned one.")
        raise ValueError(f"The model's head counts {counts} differ from the plan's {plan.channels_before}. {hint}")
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


# ------------------------------------------------------------------------------------ element-wise


def _weight_masks(model: nn.Module, ticket: Mapping[str, Tensor], source: AttentionQKSource) -> dict[tuple[str, str], Tensor]:
    """Per ``(module name, parameter name)``, the full keep-mask of the parameter."""
    entries = source.tracked(model)
    unknown = [n for n in ticket if n not in entries]
    if unknown:
        raise ValueError(f"The ticket names {unknown[:5]}, which are not query/key entries of this model.")
    names = {m: n for n, m in model.named_modules()}
    out: dict[tuple[str, str], Tensor] = {}
    for name, keep in ticket.items():
        entry = entries[name]
        weight, rows, _, _, _ = entry.block.part(entry.part)
        owner = entry.block.linear(entry.part) if entry.block.layout != "mha" else entry.block.module
        param_name = next(n for n, p in owner.named_parameters(recurse=False) if p is weight)
        key = (names[owner], param_name)
        full = out.setdefault(key, torch.ones(weight.shape, dtype=torch.bool))
        if tuple(keep.shape) != tuple(full[rows].shape):
            raise ValueError(f"Ticket entry {name!r} has shape {tuple(keep.shape)}, the weight {tuple(full[rows].shape)}.")
        full[rows] = keep.detach().cpu()
    return out


def prune_elementwise(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    source: Optional[AttentionQKSource] = None,
    example_input: ExampleInput = None,
    *,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    **unused: Any,
) -> PruningReport:
    r"""Apply an element-wise query/key ticket as fixed zeros, in place. **Saves no time and no memory.**

    Each masked weight becomes ``weight_orig * weight_mask`` (``torch.nn.utils.prune``): the pruned
    entries stay exactly zero while training goes on, and the mask is a ``state_dict`` buffer, so a
    checkpoint reloads through the plan (``kind="elementwise"``) and ``load_pruned``.

    Returns:
        A ``PruningReport`` counting weights; parameters and FLOPs are unchanged (dense kernels), and its
        ``note`` says that no time is saved.
    """
    from torch.nn.utils import prune

    source = source or AttentionQKSource()
    inputs = _inputs(example_input)
    masks = _weight_masks(model, ticket, source)
    before = {f"{m}:{p}": int(t.numel()) for (m, p), t in masks.items()}
    latency_before = _latency(model, inputs, measure_latency, latency_repeats)
    flops = _flops(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    for (module_name, param_name), keep in masks.items():
        module = model.get_submodule(module_name)
        prune.custom_from_mask(module, param_name, keep.to(getattr(module, param_name).device))
    warnings.warn(ELEMENTWISE_NOTE, UserWarning, stacklevel=2)
    after = {f"{m}:{p}": int(t.sum()) for (m, p), t in masks.items()}
    ticket_pruned = sum(int((~m).sum()) for m in ticket.values())
    plan = PruningPlan(
        model_class=_qualified_name(model), input_specs=_specs(inputs),
        pruned_groups=[[m, p] for m, p in masks], channels_before=before, channels_after=after,
        kind="elementwise", source=AttentionQKSource.key, options={},
    )
    return PruningReport(
        plan=plan, params_before=params, params_after=params, flops_before=flops, flops_after=flops,
        channels_before=before, channels_after=after, ticket_pruned=ticket_pruned,
        pruned_from_ticket=ticket_pruned, pruned_outside_ticket=0, kept_for_coupling=0, kept_for_min_channels=0,
        kept_for_round_to=0, kept_unprunable=0, latency_before_ms=latency_before,
        latency_after_ms=_latency(model, inputs, measure_latency, latency_repeats),
        kept_indices={}, coupling="elementwise (fixed zeros: no time saved)", round_to=None,
        flops_batch=batch_size(inputs) if inputs else 1, prunable=sum(before.values()), note=ELEMENTWISE_NOTE,
    )


@register_replay("elementwise")
def replay_elementwise(model: nn.Module, plan: Union[PruningPlan, Mapping[str, Any]], **options: Any) -> KeptIndices:
    """Re-create the fixed-zero parametrisations on a fresh model (the masks then load with the ``state_dict``).

    Raises:
        ValueError: if the plan names a parameter this model lacks.
    """
    from torch.nn.utils import prune

    plan = plan if isinstance(plan, PruningPlan) else PruningPlan.from_dict(plan)
    targets = []
    for module_name, param_name in plan.pruned_groups:
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is None or not isinstance(getattr(module, param_name, None), Tensor):
            raise ValueError(f"The element-wise plan names {module_name}.{param_name}, which this model lacks.")
        targets.append((module, param_name))
    for module, param_name in targets:
        prune.identity(module, param_name)  # all-ones mask; the checkpoint's weight_mask replaces it
    return {}
