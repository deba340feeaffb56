"""Element-wise query/key tickets: applied as fixed zeros, since nothing can be removed from a dense matrix.

:func:`prune_elementwise` makes each masked weight ``weight_orig * weight_mask`` through
``torch.nn.utils.prune`` (the mask is a buffer in the ``state_dict``); plans of kind ``"elementwise"``
replay. **This saves no time and no memory.**

Registered as the surgery of :class:`~lightning_worm.AttentionQKSource`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from lightning_worm.core.inputs import ExampleInput, as_inputs
from lightning_worm.core.sources.attention import AttentionQKSource
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport, _measured
from lightning_worm.core.surgery.registry import Surgery, register_surgery
from lightning_worm.core.validation import check_int

__all__ = ["ELEMENTWISE_NOTE", "prune_elementwise"]

ELEMENTWISE_NOTE = (
    "The element-wise query/key ticket was applied as fixed zeros (weight = weight_orig * weight_mask): this saves "
    "no time and no memory, the dense matrix multiplies run as before. Track AttentionHeadSource() to remove "
    "whole heads instead."
)


def _weight_masks(
    model: nn.Module, ticket: Mapping[str, Tensor], source: AttentionQKSource
) -> dict[tuple[str, str], Tensor]:
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
            raise ValueError(f"Ticket entry {name!r} has shape {tuple(keep.shape)}, the weight "
                             f"{tuple(full[rows].shape)}.")
        full[rows] = keep.detach().cpu()
    return out


def prune_elementwise(
    model: nn.Module,
    ticket: Mapping[str, Tensor],
    example_input: ExampleInput | None = None,
    *,
    source: AttentionQKSource | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
) -> PruningReport:
    r"""Apply an element-wise query/key ticket as fixed zeros, in place. **Saves no time and no memory.**

    Each masked weight becomes ``weight_orig * weight_mask`` (``torch.nn.utils.prune``): the pruned
    entries stay exactly zero while training goes on, and the mask is a ``state_dict`` buffer, so a
    checkpoint reloads through the plan (``kind="elementwise"``) and ``load_pruned``.

    Returns:
        A ``PruningReport`` counting weights; parameters and FLOPs are unchanged (dense kernels), and its
        ``note`` says that no time is saved.
    """
    source = source or AttentionQKSource()
    check_int("latency_repeats", latency_repeats, minimum=1)
    inputs = () if example_input is None else as_inputs(example_input)
    masks = _weight_masks(model, ticket, source)
    before = {f"{m}:{p}": int(t.numel()) for (m, p), t in masks.items()}
    with _measured(model, inputs, measure_latency, latency_repeats) as numbers:
        for (module_name, param_name), keep in masks.items():
            module = model.get_submodule(module_name)
            torch_prune.custom_from_mask(module, param_name, keep.to(getattr(module, param_name).device))
    warnings.warn(ELEMENTWISE_NOTE, UserWarning, stacklevel=2)
    after = {f"{m}:{p}": int(t.sum()) for (m, p), t in masks.items()}
    ticket_pruned = sum(int((~m).sum()) for m in ticket.values())
    plan = PruningPlan.of(model, inputs, pruned_groups=[[m, p] for m, p in masks], units_before=before,
                          units_after=after, kind="elementwise", source=AttentionQKSource.key, options={})
    return PruningReport(
        plan=plan, **numbers, units_before=before, units_after=after, ticket_pruned=ticket_pruned,
        pruned_from_ticket=ticket_pruned, pruned_outside_ticket=0, kept_for_coupling=0, kept_for_min_units=0,
        kept_for_round_to=0, kept_unprunable=0, kept_indices={}, coupling="elementwise (fixed zeros: no time saved)",
        round_to=None, prunable=sum(before.values()), note=ELEMENTWISE_NOTE,
    )


def _replay_elementwise(model: nn.Module, plan: PruningPlan) -> KeptIndices:
    """Re-create the fixed-zero parametrisations on a fresh model (the masks then load with the ``state_dict``).

    Raises:
        ValueError: if the plan names a parameter this model lacks.
    """
    targets = []
    for group in plan.pruned_groups:
        if not (isinstance(group, (list, tuple)) and len(group) == 2 and all(isinstance(g, str) for g in group)):
            raise ValueError(f"Element-wise plan groups are [module name, parameter name], got {group!r}. The plan "
                             "was edited or corrupted; re-create it with prune_elementwise.")
        module_name, param_name = group
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is None or not isinstance(getattr(module, param_name, None), Tensor):
            raise ValueError(f"The element-wise plan names {module_name}.{param_name}, which this model lacks.")
        targets.append((module, param_name))
    for module, param_name in targets:
        torch_prune.identity(module, param_name)  # all-ones mask; the checkpoint's weight_mask replaces it
    return {}


register_surgery(AttentionQKSource, Surgery("elementwise", prune=prune_elementwise, replay=_replay_elementwise))
