"""Carry an optimizer's state across a prune: the kept units keep their momentum and moments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_worm.core.sharding import is_sharded, shard_like, whole
from lightning_worm.core.surgery.plan import KeptIndices

__all__ = ["carry_optimizer_state"]


@torch.no_grad()
def carry_optimizer_state(
    old: torch.optim.Optimizer,
    new: torch.optim.Optimizer,
    params_before: Mapping[str, Tensor],
    params_after: Mapping[str, Tensor],
    kept_indices: KeptIndices,
    *,
    hyperparameters: bool = True,
    state: bool = True,
) -> None:
    r"""Give ``new`` (built on the pruned model's parameters) the state of ``old`` (built before the prune).

    Under FSDP2 (parameters and state sharded as ``DTensor``), each state is gathered whole, sliced, and
    sharded like its new parameter: every rank calls it together.

    A surgery replaces the parameters it cuts with smaller ones. Each parameter's state (SGD's momentum
    buffer, Adam's moments, ...) is found by name and sliced to the kept units with ``kept_indices``
    (``report.kept_indices``); state that is not shaped like its parameter (Adam's ``step``) is copied as
    it is. A parameter the surgery kept as it was (an element-wise ticket renames ``weight`` to
    ``weight_orig`` but keeps the ``Parameter``) is matched by identity.

    Args:
        old: the optimizer of the unpruned model.
        new: an optimizer of the same type over the pruned model's parameters, in the same groups.
        params_before: ``dict(model.named_parameters())`` taken before the prune.
        params_after: ``dict(model.named_parameters())`` taken after it.
        kept_indices: per changed parameter (named as before), the kept original indices along each dim.
        hyperparameters: copy each group's hyperparameters too (the schedule's current ``lr``, momentum, ...).
        state: carry the per-parameter state (``False``: ``new`` starts from zero, e.g. after a re-init).

    Example::

        before = dict(model.named_parameters())
        report = prune_channels(model, ticket, example_input)
        new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        carry_optimizer_state(optimizer, new, before, dict(model.named_parameters()), report.kept_indices)
    """
    if hyperparameters:
        for old_group, new_group in zip(old.param_groups, new.param_groups, strict=True):
            new_group.update({k: v for k, v in old_group.items() if k != "params"})
    if not state:
        return
    same = {id(p): p for p in params_after.values()}
    for name, param in params_before.items():  # in model order: a sharded state is gathered on every rank alike
        values = old.state.get(param)
        new_param = same.get(id(param), params_after.get(name))
        if values is None or new_param is None:
            continue
        new.state[new_param] = {
            key: shard_like(_sliced(whole(value), param, kept_indices.get(name)), new_param) if is_sharded(value)
            else _sliced(value, param, kept_indices.get(name))
            for key, value in values.items()
        }


def _sliced(value: Any, old_param: Tensor, kept: list[Tensor | None] | None) -> Any:
    """An optimizer state tensor shaped like ``old_param``, sliced to the kept indices (other values as they are)."""
    if kept is None or not isinstance(value, Tensor) or value.shape != old_param.shape:
        return value
    for dim, idx in enumerate(kept):
        if idx is not None:
            value = value.index_select(dim, idx.to(value.device))
    return value.clone()
