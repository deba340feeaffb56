"""Re-estimate BatchNorm statistics after a prune, and random tickets of a ticket's shape (the control).

Pure PyTorch. After channels are removed, every BatchNorm downstream of a pruned layer sees inputs of
another distribution than the one its running statistics were estimated on, and a pruned network
evaluated right after the surgery can fall to chance even when its weights are good.
:func:`recalibrate_batchnorm` re-estimates those statistics on a few training batches (no weight changes).
:func:`random_ticket` draws the control of the Early-Bird claim: a ticket that keeps exactly as many units
per entry as a given one, at random positions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm._internals.torch import BatchNormBase
from lightning_worm.core.inputs import first_input
from lightning_worm.core.validation import check_int

__all__ = ["has_running_statistics", "random_ticket", "recalibrate_batchnorm"]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    inputs = first_input(batch)
    if inputs is None:
        raise TypeError(
            f"recalibrate_batchnorm cannot find the input in a batch of type {type(batch).__name__}: the default "
            "forward takes a tensor or the first item of a tuple/list. Pass `forward=lambda model, batch: ...`."
        )
    device = next((t.device for t in (*model.parameters(), *model.buffers())), inputs.device)
    return model(inputs.to(device))


def _layers_with_statistics(model: nn.Module) -> list[BatchNormBase]:
    return [m for m in model.modules() if isinstance(m, BatchNormBase) and m.track_running_stats
            and m.running_mean is not None]


def has_running_statistics(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (something to recalibrate)."""
    return bool(_layers_with_statistics(model))


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    r"""Re-estimate the running mean and variance of every BatchNorm of ``model`` on ``batches``.

    The running statistics of each BatchNorm that tracks them are reset and replaced by the cumulative
    average over the given batches (``momentum=None``), computed by forward passes in train mode under
    ``torch.no_grad()``. No parameter changes and no gradient is created. Afterwards every BatchNorm's
    ``momentum`` and every module's train/eval flag are what they were before. BatchNorm layers that track
    no running statistics are left alone. Other train-mode layers (dropout) are active during the passes.

    Args:
        model: the (pruned) network.
        batches: an iterable of batches, e.g. a training ``DataLoader`` or ``itertools.islice(loader, 10)``.
        forward: ``forward(model, batch)`` runs the model on one batch; by default ``model(batch)`` for a
            tensor and ``model(batch[0])`` for a tuple or list, moved to the model's device.
        max_batches: stop after this many batches (``None``: all of ``batches``).

    Returns:
        The number of batches used.

    Raises:
        ValueError: if the model has no BatchNorm with running statistics, if ``max_batches`` is not a
            positive integer, or if ``batches`` is empty. On any error the statistics are left as they were.
        TypeError: if the default forward cannot find the input in a batch.

    Example::

        >>> import itertools
        >>> model = torch.nn.Sequential(torch.nn.Conv1d(1, 4, 3), torch.nn.BatchNorm1d(4)).eval()
        >>> batches = [torch.randn(8, 1, 10) for _ in range(3)]
        >>> recalibrate_batchnorm(model, itertools.islice(batches, 2))
        2
        >>> model.training  # modes are restored
        False
    """
    check_int("max_batches", max_batches, minimum=1, allow_none=True)
    layers = _layers_with_statistics(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics: nothing to recalibrate."
        )
    forward = forward or _default_forward
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")
                           if getattr(m, k, None) is not None}) for m in layers]
    used = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches
        model.train()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
                used += 1
                if max_batches is not None and used >= max_batches:
                    break
        if used == 0:
            raise ValueError("`batches` yielded no batch: the BatchNorm statistics are left as they were.")
    except BaseException:  # an empty or failing pass: put the old statistics back
        with torch.no_grad():
            for m, (_, buffers) in zip(layers, saved, strict=True):
                for key, value in buffers.items():
                    getattr(m, key).copy_(value)
        raise
    finally:
        for m, (momentum, _) in zip(layers, saved, strict=True):
            m.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return used


def random_ticket(ticket: Mapping[str, Tensor], generator: torch.Generator | int) -> dict[str, Tensor]:
    """A ticket that keeps exactly as many units per entry as ``ticket``, at uniformly random positions.

    The control of the Early-Bird claim: if a ticket does not beat a random one of the same shape (same
    channels per layer), what the search found is the layer widths, not which channels.

    Args:
        ticket: ``{name: bool tensor}`` of any shapes, ``True`` = keep (a plain dict or a mask).
        generator: a CPU ``torch.Generator`` or an integer seed; the same seed gives the same ticket.

    Returns:
        ``{name: bool tensor}`` in the order of ``ticket``, each of the same shape and device as its entry
        and with the same number of ``True``.

    Raises:
        ValueError: if an entry is not a bool tensor.
        TypeError: if ``generator`` is neither a ``torch.Generator`` nor an integer.

    Example::

        >>> ticket = {"bn1": torch.tensor([True, False, True, False])}
        >>> random_ticket(ticket, 0)["bn1"].sum()
        tensor(2)
    """
    if isinstance(generator, bool) or not isinstance(generator, (torch.Generator, int)):
        raise TypeError(f"`generator` must be a torch.Generator or an integer seed, got {type(generator).__name__}.")
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    out: dict[str, Tensor] = {}
    for name, mask in ticket.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"ticket[{name!r}] must be a bool tensor (True = keep), got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}.")
        kept = int(mask.sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:kept]] = True
        out[name] = flat.reshape(mask.shape).to(mask.device)
    return out
