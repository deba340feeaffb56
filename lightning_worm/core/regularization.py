"""Sparsity regularisation of channel scores (network slimming, as the Early-Bird code uses)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_worm._internals.torch import foreach_add_sign_
from lightning_worm.core.validation import check_number

__all__ = ["add_sparsity_gradient"]


@torch.no_grad()
def add_sparsity_gradient(params: Iterable[Tensor], sparsity: float) -> None:
    """Add the L1 subgradient ``sparsity * sign(p)`` to each parameter's gradient, in place.

    Call it once per optimizer step on the true (unscaled) gradient, after the backward passes and
    before ``optimizer.step()``. Parameters without a gradient are skipped.

    Raises:
        ValueError: if ``sparsity`` is negative.

    Example::

        loss.backward()
        add_sparsity_gradient([bn.weight for bn in batchnorms], 1e-4)
        optimizer.step()
    """
    check_number("sparsity", sparsity, low=0.0)
    pairs = [(p, p.grad) for p in params if p.grad is not None]
    if sparsity == 0.0 or not pairs:
        return
    foreach_add_sign_([grad for _, grad in pairs], [p for p, _ in pairs], alpha=sparsity)
