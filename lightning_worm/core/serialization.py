"""Strict JSON: what the pruning report, the summaries and the benchmarks write."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["strict_json"]


def strict_json(value: Any) -> Any:
    """``value`` as plain JSON types: NaN and infinities become ``None``, tensors and tuples lists, keys strings.

    The result passes ``json.dumps(..., allow_nan=False)`` and every strict JSON reader parses it.

    Example::

        >>> strict_json({"distances": [float("nan"), 0.25], "kept": torch.tensor([1, 2])})
        {'distances': [None, 0.25], 'kept': [1, 2]}
    """
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
