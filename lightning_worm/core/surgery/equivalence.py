"""The self-check of a surgery: the pruned model computes what the dense model does with the removed units zeroed.

Removing a unit (a channel, a head) is exact when nothing but the unit's own rows, columns and biases carried
it: the dense model with those entries set to zero then computes the same outputs as the pruned model. When
the two differ, the surgery missed a constraint of the model (a normalisation over channels, a convolution
across the channel dimension, a packed projection laid out otherwise than assumed) and the pruned model is
not the ticket's sub-network: :func:`check_equivalence` refuses it, naming where the outputs first differ.

Both forwards run in eval mode, without gradients, from the same random seed; floating outputs are compared
relative to the dense output's largest magnitude, within :data:`RELATIVE_TOLERANCE` of their dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm.core.measure import eval_mode
from lightning_worm.core.surgery.plan import KeptIndices
from lightning_worm.core.surgery.transaction import ModelState, PruningError

__all__ = ["RELATIVE_TOLERANCE", "check_equivalence", "relative_error", "run_forward", "run_pruned_forward"]

#: Largest difference allowed, relative to the dense output's largest magnitude, per output dtype (a
#: pruned layer adds up fewer terms, in another order: the roundings differ by CPU and kernel).
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2,
}


def _tensors(out: Any) -> Iterator[Tensor]:
    # torch-pruning's flatten_as_list returns any other object as it is (a Hugging Face cache): not usable here.
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, Mapping):
        for value in out.values():
            yield from _tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from _tensors(value)


def _floating(out: Any) -> list[Tensor]:
    """The floating tensors of a model's output (nested tuples, lists, dicts and Hugging Face outputs)."""
    return [t.detach() for t in _tensors(out) if t.is_floating_point()]


def run_forward(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    """``model(*inputs)`` in eval mode, without gradients, from a fixed seed (the global generators untouched)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model), torch.no_grad():
        torch.manual_seed(0)
        return model(*inputs)


def run_pruned_forward(model: nn.Module, inputs: tuple[Tensor, ...], hint: str) -> Any:
    """:func:`run_forward` of a pruned model; a failure becomes a :class:`PruningError` naming the innermost module
    whose forward was running (the original chained)."""
    running: list[str] = []

    def enter(name: str) -> Any:
        return lambda module, args: running.append(name)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=False))
    try:
        return run_forward(model, inputs)
    except Exception as error:
        name = running[-1] if running else ""
        where = f" in {name!r} ({type(model.get_submodule(name)).__name__})" if name else ""
        raise PruningError(
            f"The model's forward failed after pruning{where} ({type(error).__name__}: {error}). The model was left "
            f"unchanged. {hint}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()


def relative_error(pruned: Tensor, dense: Tensor) -> float:
    """``max |pruned - dense| / max |dense|`` (``inf`` where the shapes or the NaN positions differ)."""
    if pruned.shape != dense.shape:
        return float("inf")
    a, b = pruned.double(), dense.double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    a, b = a.masked_fill(nan_a, 0.0), b.masked_fill(nan_b, 0.0)
    if not a.numel():
        return 0.0
    error = float((a - b).abs().max())
    scale = float(b.abs().max())
    return 0.0 if error == 0.0 else error / scale if scale > 0 else float("inf")


def _worst(pruned: list[Tensor], dense: list[Tensor]) -> tuple[float, float]:
    """The largest relative error over the outputs, and the tolerance of their dtype."""
    if len(pruned) != len(dense):
        return float("inf"), RELATIVE_TOLERANCE[torch.float32]
    pairs = [(relative_error(a, b), RELATIVE_TOLERANCE.get(b.dtype, 1e-4)) for a, b in zip(pruned, dense, strict=True)]
    return max(pairs, key=lambda pair: pair[0] / pair[1], default=(0.0, RELATIVE_TOLERANCE[torch.float32]))


def _zero_removed(model: nn.Module, kept_indices: KeptIndices) -> None:
    """Replace ``model``'s parameters named in ``kept_indices`` by copies with the removed entries zeroed.

    The caller restores the model afterwards (a :class:`ModelState`); the original tensors are never written.
    """
    parameters = dict(model.named_parameters())
    zeroed: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for name, dims in kept_indices.items():
            original = parameters.get(name)
            if original is None:
                continue
            copy = original.detach().clone()
            for dim, keep in enumerate(dims):
                if keep is not None:
                    drop = torch.ones(copy.shape[dim], dtype=torch.bool)
                    drop[keep] = False
                    copy.index_fill_(dim, torch.nonzero(drop).flatten().to(copy.device), 0)
            zeroed[id(original)] = nn.Parameter(copy, requires_grad=False)
    for module in model.modules():
        own = vars(module)["_parameters"]
        for key, value in list(own.items()):
            if value is not None and id(value) in zeroed:
                own[key] = zeroed[id(value)]


def _module_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The first floating output tensor of every module's first call, in the order the calls ended."""
    seen: dict[str, Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: Any, out: Any) -> None:
            first = next(iter(_floating(out)), None)
            if name not in seen and first is not None:
                seen[name] = first.clone()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        run_forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _first_difference(pruned: Mapping[str, Tensor], dense: Mapping[str, Tensor]) -> str | None:
    """The first module (in the order the dense calls ended) whose output keeps its shape and differs."""
    for name, out in dense.items():
        other = pruned.get(name)
        if other is not None and other.shape == out.shape:
            if relative_error(other, out) > RELATIVE_TOLERANCE.get(out.dtype, 1e-4):
                return name
    return None


def check_equivalence(
    model: nn.Module,
    dense: ModelState,
    kept_indices: KeptIndices,
    inputs: tuple[Tensor, ...],
    *,
    what: str,
    hint: str,
) -> float:
    """Check that the pruned ``model`` computes what the dense one (``dense``) does with the removed entries zeroed.

    Args:
        model: the model, pruned.
        dense: the model's state before the surgery (its parameters are the dense ones, untouched).
        kept_indices: per changed parameter (named as before the surgery), the kept indices along each dim.
        inputs: the example input.
        what: the units removed, for the message (``"channels"``).
        hint: what the user can do, for the message.

    Returns:
        The largest relative difference of the outputs.

    Raises:
        PruningError: when the outputs differ by more than the tolerance of their dtype; the message names the
            module where they first differ and the changed modules before it. The model is left pruned: the
            caller undoes the surgery.
    """
    pruned_out = _floating(run_pruned_forward(model, inputs, hint))
    pruned_state = ModelState(model)
    dense.restore()
    try:
        _zero_removed(model, kept_indices)
        dense_out = _floating(run_forward(model, inputs))
        error, tolerance = _worst(pruned_out, dense_out)
        dense_trace = _module_outputs(model, inputs) if error > tolerance else {}
    finally:
        pruned_state.restore()
    if error <= tolerance:
        return error
    pruned_trace = _module_outputs(model, inputs)
    culprit = _first_difference(pruned_trace, dense_trace)
    changed = list(dict.fromkeys(name.rpartition(".")[0] for name in kept_indices))
    order = list(dense_trace)
    if culprit is not None:
        before = sorted((n for n in changed if n in dense_trace and order.index(n) <= order.index(culprit)),
                        key=order.index)
        modules = dict(model.named_modules())
        where = (f"The outputs first differ at {culprit!r} ({type(modules[culprit]).__name__}); the changed modules "
                 f"up to it: "
                 f"{', '.join(before[-5:]) or 'none'}.")
    else:
        where = f"The changed modules: {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}."
    size = "different outputs" if error == float("inf") else f"a relative difference of {error:.2g}"
    raise PruningError(
        f"The {what} surgery does not compute what removing the {what} should: on the example input the pruned "
        f"model and the dense model with the removed {what} zeroed give {size} (tolerance {tolerance:g}). {where} "
        f"The model was left unchanged. {hint}"
    )
