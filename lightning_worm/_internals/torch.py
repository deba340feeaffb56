"""The private torch API lightning-worm relies on (torch>=2.5), and why.

``tests/_internals/test_torch.py`` pins every use, so that a torch release that changes one fails there with
the name of the change. The core imports these names from here, never from torch's private modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["USED", "BatchNormBase", "ConvNd", "foreach_add_masked_", "foreach_add_sign_", "foreach_mul_",
           "mha_packs_qkv"]

#: The internals used here, for the README and the pinning test.
USED = (
    "torch._foreach_mul_, torch._foreach_mul, torch._foreach_add_, torch._foreach_sign: one fused kernel per step "
    "for the gradient truncation, the sparsity term and the pull of a waiting ticket (what torch's own optimizers "
    "use), instead of a Python loop per parameter",
    "torch.nn.modules.batchnorm._BatchNorm: the base class of BatchNorm1d/2d/3d, SyncBatchNorm and the lazy ones",
    "torch.nn.modules.conv._ConvNd: the base class of Conv1d/2d/3d and the transposed convolutions",
    "nn.MultiheadAttention._qkv_same_embed_dim: whether q, k and v live in one packed in_proj_weight",
)

#: Every BatchNorm layer (1d/2d/3d, SyncBatchNorm, lazy variants), as ``isinstance`` checks need it.
BatchNormBase = _BatchNorm
#: Every convolution (1d/2d/3d, transposed).
ConvNd = _ConvNd


def foreach_mul_(tensors: Sequence[Tensor], factors: Sequence[Tensor]) -> None:
    """``t.mul_(f)`` for each pair, in one fused call."""
    torch._foreach_mul_(list(tensors), list(factors))


def foreach_add_sign_(tensors: Sequence[Tensor], of: Sequence[Tensor], alpha: float) -> None:
    """``t.add_(sign(o), alpha=alpha)`` for each pair, in one fused call."""
    torch._foreach_add_(list(tensors), torch._foreach_sign(list(of)), alpha=alpha)


def foreach_add_masked_(
    tensors: Sequence[Tensor], of: Sequence[Tensor], masks: Sequence[Tensor], alpha: float
) -> None:
    """``t.add_(o * m, alpha=alpha)`` for each triple, in fused calls."""
    torch._foreach_add_(list(tensors), torch._foreach_mul(list(of), list(masks)), alpha=alpha)


def mha_packs_qkv(mha: nn.MultiheadAttention) -> bool:
    """Whether ``mha`` keeps q, k and v in its one ``in_proj_weight`` (else ``q_proj_weight`` etc.)."""
    return bool(mha._qkv_same_embed_dim)
