"""What is scored: the seam between a model and the ticket search.

A :class:`ChannelSource` says which modules of a model own prunable channels, the importance score of
each channel, and which parameters carry one entry per channel (the ones WORM truncates and the
sparsity term regularises). Detection, truncation and checkpoints only ever see the source's output,
so another source (LayerNorm scales, attention query/key weights) plugs in without touching them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import UninitializedParameter


class ChannelSource:
    """Base class of channel sources. Subclasses override the four methods below."""

    #: A short human name of what is tracked, for messages.
    description: str = "channels"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(name, module)`` for every module of the kind this source scores, tracked or not."""
        raise NotImplementedError

    def skip_reason(self, module: nn.Module) -> str | None:
        """Why a candidate is not tracked (``None`` if it is)."""
        return None

    def scores(self, module: nn.Module) -> Tensor:
        """The 1-D importance score of each channel of ``module``, in float32 or wider."""
        raise NotImplementedError

    def channel_parameters(self, module: nn.Module) -> list[Tensor]:
        """Parameters with one entry per channel along dim 0 (truncated by WORM)."""
        raise NotImplementedError

    def sparsity_parameters(self, module: nn.Module) -> list[Tensor]:
        """Parameters that the sparsity term ``s * sign(p)`` regularises."""
        raise NotImplementedError

    def tracked(self, model: nn.Module) -> dict[str, nn.Module]:
        """The tracked modules of ``model`` by name, in ``named_modules()`` order."""
        return {name: m for name, m in self.candidates(model) if self.skip_reason(m) is None}

    def skipped(self, model: nn.Module) -> dict[str, str]:
        """The candidates left out, by name, with the reason."""
        out = {}
        for name, m in self.candidates(model):
            reason = self.skip_reason(m)
            if reason is not None:
                out[name] = reason
        return out


class BatchNormSource(ChannelSource):
    """Channels are the output channels of BatchNorm layers, scored by ``|gamma|``.

    Tracks every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants once materialised)
    that is affine and whose weight requires grad. WORM truncates the gradients of its weight and bias;
    the sparsity term regularises its weight (network slimming).
    """

    description = "BatchNorm channels (affine BN layers whose weight requires grad)"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if isinstance(module, _BatchNorm):
                yield name, module

    def skip_reason(self, module: nn.Module) -> str | None:
        if not module.affine or module.weight is None:
            return "not affine"
        if isinstance(module.weight, UninitializedParameter):
            return "lazy, not materialised yet"
        if not module.weight.requires_grad:
            return "weight frozen (requires_grad=False)"
        return None

    def scores(self, module: nn.Module) -> Tensor:
        weight = module.weight.detach()
        return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))

    def channel_parameters(self, module: nn.Module) -> list[Tensor]:
        return [p for p in (module.weight, module.bias) if p is not None and p.requires_grad]

    def sparsity_parameters(self, module: nn.Module) -> list[Tensor]:
        return [module.weight]
