"""Slimming coefficients: one learnable scalar gate per unit (EarlyBERT's), and their fold into the weights.

A gate is a parameter of the module that owns the units (an attention block, a feed-forward block), named
:data:`GATE`, one value per unit, initialised to 1. A forward hook multiplies the features that carry each unit by
its gate: the value features of a head (its rows of the value projection's output: scaling them scales the head's
output exactly, since attention weights sum to one), or a neuron's input to the output projection. The gates train
with the model; their magnitude scores the units and the sparsity term pushes them to zero.

At the prune a gate is folded into the weights (the value rows and biases, the output projection's columns are
multiplied by it) and removed with its hook: the pruned model, its ``state_dict`` and its checkpoints hold no trace
of it, and compute what the gated model did.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GATE", "attach_gate", "feature_gate", "gate_of", "remove_gate"]

#: The name of a unit gate parameter on the module that owns the units.
GATE = "slimming_gate"
_HOOK = "_lightning_worm_gate_hook"
_SITE = "_lightning_worm_gate_site"


def gate_of(owner: nn.Module) -> nn.Parameter | None:
    """The gate parameter of ``owner``, or ``None``."""
    gate = owner._parameters.get(GATE)
    return gate if isinstance(gate, nn.Parameter) else None


def feature_gate(gate: Tensor, features: Tensor) -> Tensor:
    """Per feature, the gate of its unit: ``features[i]`` is the unit of feature ``i``, or -1 (not gated: 1)."""
    return _gathered(gate, _gather_index(features, gate.numel()).to(gate.device))


def _gather_index(features: Tensor, units: int) -> Tensor:
    """``features`` with -1 (not gated) as ``units``: the index of a 1 appended to the gate."""
    return features.where(features >= 0, units)


def _gathered(gate: Tensor, index: Tensor | None) -> Tensor:
    """The gate per feature: ``index`` into the gate with a 1 appended, or ``None`` (feature ``i`` is unit ``i``)."""
    return gate if index is None else torch.cat([gate, gate.new_ones(1)])[index]


def attach_gate(owner: nn.Module, target: nn.Module, units: int, features: Tensor, where: str) -> nn.Parameter:
    """Give ``owner`` a gate of ``units`` ones and multiply ``target``'s input or output features by it.

    Args:
        owner: the module that owns the units; the gate is its parameter :data:`GATE` (in its ``state_dict``).
        target: the module whose last-dim features carry the units.
        units: the number of units.
        features: per feature of ``target``'s input (``where="input"``) or output (``"output"``), its unit, or -1.
        where: ``"input"`` (a forward pre-hook on the first argument) or ``"output"`` (a forward hook on the
            output, or on its first item when it is a tuple).

    Returns:
        The gate (an existing one is returned as it is).

    Raises:
        ValueError: if a feature names a unit out of range, or ``where`` is neither.
    """
    if where not in ("input", "output"):
        raise ValueError(f"`where` must be 'input' or 'output', got {where!r}.")
    existing = gate_of(owner)
    if existing is not None:
        return existing
    if features.numel() and int(features.max()) >= units:
        raise ValueError(f"A gate of {units} units cannot gate a feature of unit {int(features.max())}.")
    reference = next(iter(target.parameters()), None)
    gate = nn.Parameter(torch.ones(units, dtype=reference.dtype if reference is not None else torch.float32,
                                   device=reference.device if reference is not None else None))
    owner.register_parameter(GATE, gate)
    # The hook finds its owner and feature map on the module it runs on (not in a closure), so that a deep copy of
    # the model (an EMA, a benchmark's control) gates with its own gate.
    # Each forward gathers the gate per feature with an index computed here once (none where feature i is unit i).
    features = features.detach().cpu().long()
    identity = features.numel() == units and torch.equal(features, torch.arange(units))
    target.__dict__[_SITE] = (owner, None if identity else _gather_index(features, units).to(gate.device))
    handle = target.register_forward_pre_hook(_gate_input) if where == "input" else \
        target.register_forward_hook(_gate_output)
    owner.__dict__[_HOOK] = handle.id
    return gate


def _scaled(module: nn.Module, x: Tensor) -> Tensor:
    site = module.__dict__.get(_SITE)
    if site is None:
        return x
    owner, index = site
    gate = gate_of(owner)
    if gate is None:
        return x
    if index is not None and index.device != gate.device:  # the model moved: move the index once
        index = index.to(gate.device)
        module.__dict__[_SITE] = (owner, index)
    return x * _gathered(gate, index).to(x.dtype)


def _gate_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (_scaled(module, args[0]), *args[1:])


def _gate_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, tuple):
        return (_scaled(module, output[0]), *output[1:])
    return _scaled(module, output)


def remove_gate(owner: nn.Module) -> Tensor | None:
    """Remove ``owner``'s gate and its hook; the gate's values (detached), or ``None`` if it had none.

    The module's parameter and hook dictionaries are replaced, not edited, so that an all-or-nothing surgery that
    fails afterwards puts the gate back as it was.
    """
    gate = gate_of(owner)
    if gate is None:
        return None
    owner._parameters = {k: v for k, v in owner._parameters.items() if k != GATE}
    hook_id = owner.__dict__.pop(_HOOK, None)
    for module in owner.modules():
        site = module.__dict__.get(_SITE)
        if site is not None and site[0] is owner:
            del module.__dict__[_SITE]
        for hooks in ("_forward_hooks", "_forward_pre_hooks"):
            table = getattr(module, hooks)
            if hook_id in table:
                setattr(module, hooks, type(table)((k, v) for k, v in table.items() if k != hook_id))
    return gate.detach()
