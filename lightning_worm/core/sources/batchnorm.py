"""BatchNorm channels scored by ``|gamma|``: the Early-Bird papers' source."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.parameter import UninitializedParameter

from lightning_worm._internals.torch import BatchNormBase
from lightning_worm.core.sources.base import ScaleSource

__all__ = ["BatchNormSource"]


class BatchNormSource(ScaleSource):
    """Channels are the output channels of BatchNorm layers, scored by ``|gamma|``.

    Tracks every BatchNorm layer (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants once materialised)
    that is affine and whose weight requires grad. WORM truncates the gradients of its weight and bias;
    the sparsity term regularises its weight (network slimming). Pruned channels are removed with
    :func:`~lightning_worm.prune_channels` (the surgery registered for this source and its subclasses).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5, source=BatchNormSource())  # the default
    """

    key = "batchnorm"
    description = "BatchNorm channels (affine BN layers whose weight requires grad)"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if isinstance(module, BatchNormBase):
                yield name, module

    def skip_reason(self, module: nn.Module) -> str | None:
        if not module.affine or module.weight is None:
            return "not affine"
        if isinstance(module.weight, UninitializedParameter):
            return "lazy, not materialised yet: run one forward pass before the fit"
        if not module.weight.requires_grad:
            return "weight frozen (requires_grad=False)"
        return None
