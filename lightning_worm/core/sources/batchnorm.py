"""BatchNorm channels scored by ``|gamma|``: the Early-Bird papers' source."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter

from lightning_worm.core.sources.base import ChannelSource


class BatchNormSource(ChannelSource):
    """Channels are the output channels of BatchNorm layers, scored by ``|gamma|``.

    Tracks every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants once materialised)
    that is affine and whose weight requires grad. WORM truncates the gradients of its weight and bias;
    the sparsity term regularises its weight (network slimming). Pruned channels are removed with
    :func:`~lightning_worm.prune_channels`.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5, source=BatchNormSource())  # the default
    """

    key = "batchnorm"
    description = "BatchNorm channels (affine BN layers whose weight requires grad)"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                yield name, module

    def skip_reason(self, module: nn.Module) -> str | None:
        if not module.affine or module.weight is None:
            return "not affine"
        if isinstance(module.weight, UninitializedParameter):
            return "lazy, not materialised yet: run one forward pass before the fit"
        if not module.weight.requires_grad:
            return "weight frozen (requires_grad=False)"
        return None

    def scores(self, module: nn.Module) -> Tensor:
        weight = module.weight.detach()
        return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))

    def count(self, module: nn.Module) -> int:
        return module.weight.numel()

    def channel_parameters(self, module: nn.Module) -> list[Tensor]:
        return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]

    def sparsity_parameters(self, module: nn.Module) -> list[Tensor]:
        return [module.weight]

    def prune(self, model: nn.Module, ticket: Any, example_input: Any, **options: Any) -> Any:
        from lightning_worm.core.surgery import prune_channels

        return prune_channels(model, ticket, example_input, **options)
