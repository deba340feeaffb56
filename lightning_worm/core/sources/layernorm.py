"""LayerNorm (and RMSNorm) channels scored by ``|gamma|``: the transformer analogue of network slimming."""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Iterator
from numbers import Real

import torch
from torch import Tensor, nn

from lightning_worm.core.sources.base import ScaleSource

__all__ = ["SCALE_OFFSET_ATTR", "LayerNormSource", "scale_offset"]

#: Set on a norm module that scales by ``(offset + weight)`` (e.g. ``1.0``) to say so; ``0.0`` for ``weight``.
SCALE_OFFSET_ATTR = "worm_scale_offset"
# `(1 + self.weight)` or `self.weight + 1` in a forward: the Gemma convention (weight initialised to 0).
_OFFSET_CODE = re.compile(r"\b1(?:\.0*)?\s*\+\s*self\.weight\b|\bself\.weight(?:\.\w+\(\))?\s*\+\s*1(?:\.0*)?(?![\w.])")


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    # Duck typing for the norms of other libraries (Hugging Face's LlamaRMSNorm, T5LayerNorm, ...).
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (name.endswith("LayerNorm") or name.endswith("RMSNorm")) and isinstance(weight, nn.Parameter)


@functools.cache
def _offset_of_class(cls: type[nn.Module]) -> float | None:
    """1.0 if the class's forward scales by ``(1 + weight)``, else 0.0; ``None`` if that cannot be told.

    Without readable code (a ``.pyc``-only install), a class named like Gemma's norms cannot be told (Gemma 1-3
    scale by ``1 + weight``, Gemma 4 by ``weight``); any other class scales by ``weight``.
    """
    try:
        code = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None if "Gemma" in cls.__name__ else 0.0
    return 1.0 if _OFFSET_CODE.search(code) else 0.0


def scale_offset(module: nn.Module) -> float | None:
    """The ``offset`` of a norm that scales its channels by ``offset + weight`` (``None``: cannot tell).

    ``nn.LayerNorm`` and ``nn.RMSNorm`` scale by ``weight`` (0). Gemma-style RMSNorms (Hugging Face's
    ``GemmaRMSNorm``, ``Gemma2/3RMSNorm``, ``Qwen3NextRMSNorm``, ...) scale by ``1 + weight`` with the weight
    initialised to 0: found by their forward's code (``1.0 + self.weight``). A module's
    ``worm_scale_offset`` attribute, if set, decides.
    """
    offset = getattr(module, SCALE_OFFSET_ATTR, None)
    if isinstance(offset, Real) and not isinstance(offset, bool) and math.isfinite(offset):
        return float(offset)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return 0.0
    cls: type = type(module)  # the cache's key; mypy wrongly finds a `type[nn.Module]` unhashable
    return _offset_of_class(cls)


class LayerNormSource(ScaleSource):
    r"""Channels are the features of LayerNorm / RMSNorm layers, scored by ``|gamma|``.

    Tracks every ``nn.LayerNorm`` and ``nn.RMSNorm`` (and, by class name, other libraries' ``*LayerNorm``
    / ``*RMSNorm`` modules with a ``weight``) that has a 1-D learnable scale whose weight requires grad.
    WORM truncates the gradients of its weight and bias; the sparsity term regularises its weight.

    A Gemma-style RMSNorm scales by ``gamma = 1 + weight`` (its weight starts at 0): its channels are
    scored by ``|1 + weight|``, and the sparsity term leaves it alone (it would pull the scale to 1, not
    0). It is recognised by its forward's code (``1.0 + self.weight``); set ``module.worm_scale_offset =
    1.0`` (or ``0.0``) to say it, which a ``*Gemma*`` norm whose code cannot be read must do to be tracked.

    Pruning LayerNorm channels physically is refused: in a transformer they are the residual stream,
    shared by every block, the embeddings and the classifier, so one channel can only go everywhere at
    once. Use :class:`~lightning_worm.AttentionHeadSource` to make a transformer smaller, or this source to
    watch (and truncate) the residual stream's scales.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.3, source=LayerNormSource())
    """

    key = "layernorm"
    description = "LayerNorm/RMSNorm channels (|gamma| of norms with a learnable 1-D scale)"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if _is_norm(module):
                yield name, module

    def skip_reason(self, module: nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            return "no learnable scale (elementwise_affine=False)"
        if weight.dim() != 1:
            return f"scale of shape {tuple(weight.shape)}, not one per channel (normalized_shape must be 1-D)"
        if not weight.requires_grad:
            return "weight frozen (requires_grad=False)"
        if scale_offset(module) is None:
            return (f"a Gemma-style norm whose forward's code cannot be read, so whether it scales by weight or by "
                    f"1 + weight is unknown: set `module.{SCALE_OFFSET_ATTR} = 1.0` (or 0.0)")
        return None

    def scores(self, module: nn.Module) -> Tensor:
        weight = self._weight(module).detach()
        scale = weight.to(torch.promote_types(weight.dtype, torch.float32))
        offset = scale_offset(module)
        return (scale + offset).abs() if offset else scale.abs()

    def sparsity_parameters(self, module: nn.Module) -> list[Tensor]:
        return [] if scale_offset(module) else [self._weight(module)]
