"""Attention heads: :func:`prune_heads` removes the heads a ticket prunes; plans of kind ``"heads"`` replay.

A removed head takes its rows of the query, key and value weights (and biases) and the matching input
columns of the block's output projection with it (a ``Conv1D``'s columns and rows: its weight is in x out).
The output projection is the block's own ``o_proj``/``out_proj``/``proj``/``c_proj``/... projection if it
has one, else the Linear that torch-pruning's dependency graph couples to the query rows (Hugging Face
BERT's ``attention.output.dense``). The cut itself uses torch-pruning's Linear pruners (a ``Conv1D`` is
sliced directly). The module's head count attributes are fixed (``num_heads``, ``num_attention_heads``,
``all_head_size``, ``split_size``, key/value head counts), so that its forward still reshapes right.

A head's other per-head state goes with it:

* per-head projections of relative positions (DeBERTa's ``pos_key_proj`` / ``pos_query_proj``) lose its rows;
* per-head bias tables (Swin's ``relative_position_bias_table``, one column per head) lose its column;
* a module whose forward reads its head counts from its ``config`` (Phi-3 slices its packed projection with
  ``config.num_attention_heads``) is given its own shallow copy of the config, with its counts;
* a module that is passed a bias for all heads of its stack (T5: the first layer's ``relative_attention_bias``
  computes it, every layer uses it and passes it on) keeps the full bias table and selects its own heads
  from the bias by forward hooks, then passes the full bias on, so that each layer can keep other heads.

The plan records the output projection by name (no example input needed to replay) and the packing of
packed projections; the replay repeats all of the above.

Registered as the surgery of :class:`~lightning_worm.AttentionHeadSource`.
"""

from __future__ import annotations

import copy
import inspect
import re
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
    LAYOUTS,
    OUTPUT_NAMES,
    PARTS,
    PRUNED_HEADS_ATTR,
    AttentionBlock,
    AttentionHeadSource,
    is_conv1d,
)
from lightning_worm.core.surgery.equivalence import check_equivalence, run_pruned_forward
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, _measured
from lightning_worm.core.surgery.registry import Surgery, register_surgery
from lightning_worm.core.surgery.transaction import all_or_nothing
from lightning_worm.core.surgery.units import choose_units, unit_report
from lightning_worm.core.validation import check_int

__all__ = ["MHA_REFUSAL", "prune_heads"]

HEADS_HINT = (
    "The block is not laid out as the head source assumes: a packed projection must hold [all queries | all keys | "
    "all values] (`layout=\"qkv\"`) or [q_h | k_h | v_h] head by head (`layout=\"per_head\"`, GPT-NeoX's), the "
    "head count attributes must be what its forward splits the heads by (a config's counts are copied only where "
    "the forward reads them as `self.config.<count>`), and its per-head state must be one the surgery knows "
    "(per-head projections named pos_key_proj/pos_query_proj, a relative_position_bias_table, a T5-style shared "
    "`position_bias`). Pass `AttentionHeadSource(layout=...)`, name the blocks that fit "
    "(`AttentionHeadSource(modules=[...])`) or track another source."
)

#: Child Linear layers that project relative positions per head, as the queries (DeBERTa-v2/v3).
PER_HEAD_PROJECTIONS: tuple[str, ...] = ("pos_key_proj", "pos_query_proj")
#: Parameters anywhere in an attention module with one column per query head (Swin, BEiT), by name: their dim.
PER_HEAD_TABLES: dict[str, int] = {"relative_position_bias_table": -1}
#: Module attributes that hold the query width (heads x head size), set to the new width when they held the old.
WIDTH_ATTRS: tuple[str, ...] = ("all_head_size", "split_size", "inner_dim")
#: Module attributes that hold the key/value width.
KV_WIDTH_ATTRS: tuple[str, ...] = ("kv_dim",)
#: On a module passed a bias of all its stack's heads (T5): ``(heads of that bias, the heads this module kept)``.
BIAS_HEADS_ATTR = "_lightning_worm_bias_heads"
_FULL_BIAS_ATTR = "_lightning_worm_full_bias"
_KEPT_INDEX_ATTR = "_lightning_worm_kept_heads_index"
_CONFIG_READ = re.compile(r"\bself\.config\.(\w+)")

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
        if _in_features(child) == width and name not in block.projections:
            return f"{block.name}.{name}" if block.name else name
    return None


def _in_features(module: nn.Module | None) -> int | None:
    """Input features of an ``nn.Linear`` or a ``Conv1D`` (weight in x out); ``None`` for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if module is not None and is_conv1d(module):
        return int(cast(Tensor, module.weight).shape[0])
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
def _slice_features(projection: nn.Module, keep: Tensor, inputs: bool) -> None:
    """Keep the output features (``inputs``: the input features) ``keep`` of a ``Conv1D`` (weight in x out)."""
    weight = cast(nn.Parameter, projection.weight)
    dim = 0 if inputs else 1
    projection.weight = nn.Parameter(weight.index_select(dim, keep.to(weight.device)),
                                     requires_grad=weight.requires_grad)
    bias = getattr(projection, "bias", None)
    if not inputs and isinstance(bias, Tensor):
        projection.bias = nn.Parameter(bias.index_select(0, keep.to(bias.device)), requires_grad=bias.requires_grad)
    # torch annotates the values of Module.__setattr__ as Tensor | Module; any attribute is accepted.
    if inputs and isinstance(getattr(projection, "nx", None), int):
        projection.nx = len(keep)  # type: ignore[assignment]
    if not inputs:
        projection.nf = len(keep)  # type: ignore[assignment]


def _cut_features(projection: nn.Module, removed: Sequence[int], name: str, kept: KeptIndices, *,
                  inputs: bool = False) -> None:
    """Remove output features of a projection (rows of a Linear, columns of a Conv1D), or with ``inputs`` its input
    features (columns of a Linear, rows of a Conv1D); record what is kept."""
    import torch_pruning as tp

    transposed = is_conv1d(projection)
    dim = int(inputs != transposed)  # the weight dim of those features: a Conv1D's weight is in x out
    keep = _keep_indices(cast(Tensor, projection.weight).shape[dim], removed)
    if transposed:
        _slice_features(projection, keep, inputs=inputs)
    else:
        (tp.prune_linear_in_channels if inputs else tp.prune_linear_out_channels)(projection, list(removed))
    kept[f"{name}.weight"] = [keep if d == dim else None for d in range(2)]
    if not inputs and getattr(projection, "bias", None) is not None:
        kept[f"{name}.bias"] = [keep]


@torch.no_grad()
def _cut_tables(block: AttentionBlock, removed_heads: Sequence[int], num_heads: int, kept: KeptIndices) -> None:
    """Remove the removed query heads' entries of the module's per-head tables (:data:`PER_HEAD_TABLES`)."""
    prefix = f"{block.name}." if block.name else ""
    for module_name, module in block.module.named_modules():
        for name, dim in PER_HEAD_TABLES.items():
            table = module._parameters.get(name)
            if table is None or table.shape[dim] != num_heads:
                continue
            dim = dim % table.dim()
            keep = _keep_indices(num_heads, removed_heads)
            setattr(module, name, nn.Parameter(table.index_select(dim, keep.to(table.device)),
                                               requires_grad=table.requires_grad))
            kept[f"{prefix}{module_name + '.' if module_name else ''}{name}"] = [
                keep if d == dim else None for d in range(table.dim())]


def _own_config(module: nn.Module, counts: Mapping[str, int]) -> None:
    """Give ``module`` its own shallow copy of its config with the counts ``counts`` (those it has), if its forward
    reads one of them there (``self.config.num_attention_heads``: a config is shared by every layer)."""
    config = getattr(module, "config", None)
    if config is None:
        return
    try:
        read = set(_CONFIG_READ.findall(inspect.getsource(type(module).forward)))
    except (OSError, TypeError):  # no source (a compiled or built-in forward): nothing known to be read
        return
    present = {a: v for a, v in counts.items() if isinstance(getattr(config, a, None), int)}
    if read & present.keys():  # then every count of the copy, so that it is consistent
        own = copy.copy(config)
        for attr, value in present.items():
            setattr(own, attr, value)
        module.config = own


def _select_passed_bias(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: from a ``position_bias`` of all the stack's heads, the heads this module kept."""
    full, _ = getattr(module, BIAS_HEADS_ATTR)
    bias = kwargs.get("position_bias")
    if not (isinstance(bias, Tensor) and bias.dim() == 4 and bias.shape[1] == full):
        return None
    vars(module)[_FULL_BIAS_ATTR] = bias
    return args, {**kwargs, "position_bias": bias.index_select(1, _kept_index(module, bias.device))}


def _select_table_heads(table: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Forward hook of a relative bias table (an Embedding of one column per head): its module's heads."""
    vars(table)[_FULL_BIAS_ATTR] = out
    return out.index_select(-1, _kept_index(table, out.device))


def _kept_index(module: nn.Module, device: torch.device) -> Tensor:
    """The kept heads of a shared-bias module as an index on ``device``, made once (not at every forward)."""
    index = vars(module).get(_KEPT_INDEX_ATTR)
    if index is None or index.device != device:
        index = torch.tensor(getattr(module, BIAS_HEADS_ATTR)[1], device=device)
        vars(module)[_KEPT_INDEX_ATTR] = index
    return index


def _pass_full_bias(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: pass the bias of all the stack's heads on (``output[1]``), not this module's selection."""
    full, kept = getattr(module, BIAS_HEADS_ATTR)
    if not (isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor)):
        return None
    own = output[1]
    passed = vars(module).pop(_FULL_BIAS_ATTR, None)
    table = getattr(module, "relative_attention_bias", None)
    computed = vars(table).pop(_FULL_BIAS_ATTR, None) if isinstance(table, nn.Module) else None
    if passed is not None:
        whole = passed
    elif computed is not None:  # T5's compute_bias: (query, key, heads) -> (1, heads, query, key)
        whole = computed.permute(2, 0, 1).unsqueeze(0)
    else:  # made by the module for its own heads (zeros, where it has no table): widened with zeros
        whole = own.new_zeros(own.shape[0], full, *own.shape[2:])
        whole[:, kept] = own
    if whole.shape[2:] != own.shape[2:] or whole.shape[1] != full:
        raise RuntimeError(f"The position bias passed on has shape {tuple(whole.shape)}, this module's "
                           f"{tuple(own.shape)}: the shared-bias hooks of the head prune do not fit this module.")
    return (output[0], whole, *output[2:])


def _share_bias(block: AttentionBlock, kept_heads: list[int], num_heads: int) -> None:
    """Let a module passed its stack's ``position_bias`` (T5) use only its kept heads of it, and pass all on."""
    module = block.module
    before = getattr(module, BIAS_HEADS_ATTR, None)
    full, kept = (num_heads, kept_heads) if before is None else (before[0], [before[1][h] for h in kept_heads])
    setattr(module, BIAS_HEADS_ATTR, (full, kept))
    vars(module).pop(_KEPT_INDEX_ATTR, None)  # the kept heads changed: the index is made again
    if before is None:
        module.register_forward_pre_hook(_select_passed_bias, with_kwargs=True)
        module.register_forward_hook(_pass_full_bias)
    table = getattr(module, "relative_attention_bias", None)
    if isinstance(table, nn.Embedding) and getattr(module, "has_relative_attention_bias", False):
        if getattr(table, BIAS_HEADS_ATTR, None) is None:
            table.register_forward_hook(_select_table_heads)
        setattr(table, BIAS_HEADS_ATTR, (full, kept))
        vars(table).pop(_KEPT_INDEX_ATTR, None)


def _passes_bias(module: nn.Module) -> bool:
    """Whether the module is passed a bias of all its stack's heads (T5's ``has_relative_attention_bias``)."""
    return isinstance(getattr(module, "has_relative_attention_bias", None), bool)


@torch.no_grad()
def _cut_heads(model: nn.Module, block: AttentionBlock, removed_units: list[int], output: str) -> KeptIndices:
    """Remove the units of one block in place; returns the kept indices of every parameter changed."""
    kept: KeptIndices = {}
    prefix = f"{block.name}." if block.name else ""
    num_heads, num_kv_heads, head_dim = block._counts()
    q_rows = _part_rows(block, removed_units, "q")
    if block.layout == "packed":
        projection = block.linear("q")
        total = cast(Tensor, projection.weight).shape[1 if is_conv1d(projection) else 0]
        removed: list[int] = []
        for part in PARTS:
            features = torch.arange(total)[block.out_index(part)]
            removed += features[_part_rows(block, removed_units, part)].tolist()
        _cut_features(projection, sorted(removed), prefix + block.projections[0], kept)
    else:
        for part in PARTS:
            _cut_features(block.linear(part), _part_rows(block, removed_units, part),
                     prefix + block.projections[PARTS.index(part)], kept)
    children = dict(block.module.named_children())
    for name in PER_HEAD_PROJECTIONS:  # relative positions projected per head (DeBERTa)
        child = children.get(name)
        if isinstance(child, nn.Linear) and child.out_features == num_heads * head_dim:
            _cut_features(child, q_rows, prefix + name, kept)
    _cut_features(model.get_submodule(output), q_rows, output, kept, inputs=True)
    removed_heads = [u * block.group_size + i for u in removed_units for i in range(block.group_size)]
    _cut_tables(block, removed_heads, num_heads, kept)

    heads = num_heads - len(removed_units) * block.group_size
    kv_heads = num_kv_heads - len(removed_units)
    module = block.module
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in KV_HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, kv_heads)
    # torch annotates the values of Module.__setattr__ as Tensor | Module; any attribute is accepted.
    for attrs, old, new in ((WIDTH_ATTRS, num_heads, heads), (KV_WIDTH_ATTRS, num_kv_heads, kv_heads)):
        for attr in attrs:  # BERT's all_head_size, GPT-2's split_size, ...: only where they held the width
            if getattr(module, attr, None) == old * head_dim:
                setattr(module, attr, new * head_dim)
    _own_config(module, {**dict.fromkeys(HEAD_COUNT_ATTRS, heads), **dict.fromkeys(KV_HEAD_COUNT_ATTRS, kv_heads)})
    if _passes_bias(module):
        removed_set = set(removed_heads)
        _share_bias(block, [h for h in range(num_heads) if h not in removed_set], num_heads)
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

    choice = choose_units(masks, lambda name: source.scores(blocks[name]), round_to)
    removed = choice.removed

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
            source.fold(model)  # slimming gates, if any, into the value rows: the pruned model holds none
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
        options={"heads_before": heads_before, "source_options": source.options(),
                 "layouts": {name: blocks[name].packing for name in removed if blocks[name].layout == "packed"}},
    )
    return unit_report(plan, numbers, masks, choice, kept_indices, coupling="heads", round_to=round_to)

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
    layouts = plan.options.get("layouts") or {}  # as the prune found them (plans before it: as found now)
    if not (isinstance(layouts, Mapping) and all(v in LAYOUTS for v in layouts.values())):
        raise ValueError(f"The head plan records packings {layouts!r}; each must be one of {LAYOUTS}. The plan was "
                         "edited or corrupted; re-create it with prune_heads.")
    for name, packing in layouts.items():
        if name in blocks and blocks[name].layout == "packed":
            blocks[name].packing = packing
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
    source.fold(model)  # a fresh model given slimming gates (a resumed search): the pruned model holds none
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
        return _in_features(model.get_submodule(name)) is not None
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
