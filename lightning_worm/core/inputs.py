"""Example inputs: what the surgery traces and measures a model on, and where a batch keeps the model's input.

An *example input* is a tensor or a sequence of tensors, called as ``model(*inputs)``. Every function that
takes one (the surgery, the measurements, ``PruneAndFinetune(example_input=...)``) reads it through
:func:`as_inputs`, so that they accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ExampleInput", "as_inputs", "batch_size", "first_input", "inputs_to"]

#: A tensor or a sequence of tensors, called as ``model(*inputs)``.
ExampleInput = Tensor | Sequence[Tensor]


def as_inputs(example_input: ExampleInput) -> tuple[Tensor, ...]:
    """``example_input`` as the tuple the model is called with (``model(*inputs)``).

    Raises:
        ValueError: if it is not a tensor or a non-empty sequence of tensors.
    """
    if isinstance(example_input, Tensor):
        return (example_input,)
    if isinstance(example_input, (str, bytes)) or not isinstance(example_input, Sequence):
        raise ValueError(
            "`example_input` must be a tensor or a non-empty sequence of tensors (run as model(*inputs)), got "
            f"{type(example_input).__name__}: e.g. `example_input=torch.randn(2, 3, 32, 32)`."
        )
    inputs = tuple(example_input)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("`example_input` must be a tensor or a non-empty sequence of tensors (run as model(*inputs)).")
    return inputs


def batch_size(example_input: ExampleInput) -> int:
    """The batch size of an example input: dim 0 of its first tensor (1 for a scalar)."""
    first = as_inputs(example_input)[0]
    return int(first.shape[0]) if first.dim() and first.shape[0] else 1


def inputs_to(example_input: ExampleInput, device: torch.device | str) -> tuple[Tensor, ...]:
    """The inputs of ``example_input`` on ``device``."""
    return tuple(x.to(device) for x in as_inputs(example_input))


def first_input(batch: Any, limit: int | None = None) -> Tensor | None:
    """The model input of a training batch: the batch itself if it is a tensor, else its first item if that is
    one (``(inputs, targets)``); ``None`` if neither. ``limit`` keeps its first examples only (detached)."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        return None
    return batch if limit is None else batch[:limit].detach()
