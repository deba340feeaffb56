"""Global channel masks and the distance between two of them.

A mask is a ``dict[str, torch.BoolTensor]``: one 1-D tensor per tracked module (``True`` = keep),
keyed by the module's name in ``named_modules()`` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from lightning_worm.core.scores import BatchNormSource, ChannelSource

Mask = dict[str, Tensor]


class NonFiniteScoreError(ValueError):
    """Raised when channel scores hold NaN or infinity; ``layers`` names the offending modules."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers
        super().__init__(
            f"Non-finite channel scores (NaN or inf) in {len(layers)} layer(s): {', '.join(layers[:5])}"
            + (" ..." if len(layers) > 5 else "")
            + ". The training has diverged there; lower the learning rate or enable gradient clipping."
        )


@dataclass
class MaskResult:
    """A mask with the numbers behind it.

    Attributes:
        mask: the mask, ``True`` = keep.
        requested: ``round(prune_ratio * N)``, the channels the global ranking prunes.
        pruned: the channels actually pruned (below ``requested`` when ``min_channels`` kept some back).
        restored: per layer, how many channels ``min_channels`` kept back.
    """

    mask: Mask
    requested: int
    pruned: int
    restored: dict[str, int] = field(default_factory=dict)


def validate_ratio(prune_ratio: float) -> None:
    if not (isinstance(prune_ratio, (int, float)) and 0.0 < prune_ratio < 1.0):
        raise ValueError(f"`prune_ratio` must be in the open interval (0, 1), got {prune_ratio!r}.")


def validate_min_channels(min_channels: int) -> None:
    if not (isinstance(min_channels, int) and min_channels >= 1):
        raise ValueError(f"`min_channels` must be an integer >= 1, got {min_channels!r}.")


def mask_from_scores(scores: Mapping[str, Tensor], prune_ratio: float, min_channels: int = 1) -> MaskResult:
    """Global mask from per-layer channel scores.

    The ``round(prune_ratio * N)`` channels with the smallest score over all ``N`` channels are pruned;
    ties go by layer order, then channel index (a stable ascending sort). A layer left with fewer than
    ``min_channels`` channels keeps its ``min_channels`` best ones instead (ties: lower index kept).

    Args:
        scores: 1-D score tensor per layer, in layer order. Compared in float32 or wider.
        prune_ratio: fraction of channels to prune, in (0, 1).
        min_channels: channels every layer keeps at least (all of them if it has fewer).

    Raises:
        ValueError: on a bad ratio, ``min_channels``, or no channel at all.
        NonFiniteScoreError: if a score is NaN or infinite.
    """
    validate_ratio(prune_ratio)
    validate_min_channels(min_channels)
    names = list(scores)
    if not names:
        raise ValueError("No channels to mask: `scores` is empty.")
    device = scores[names[0]].device
    flat = torch.cat([scores[n].reshape(-1).to(device, torch.promote_types(scores[n].dtype, torch.float32))
                      for n in names])
    sizes = [scores[n].numel() for n in names]
    if not bool(torch.isfinite(flat).all()):
        bad = [n for n in names if not bool(torch.isfinite(scores[n]).all())]
        raise NonFiniteScoreError(bad)

    requested = round(prune_ratio * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
    keep[torch.sort(flat, stable=True).indices[:requested]] = False

    layer_of = torch.repeat_interleave(torch.arange(len(names), device=device),
                                       torch.tensor(sizes, device=device))
    kept_per_layer = torch.zeros(len(names), dtype=torch.long, device=device).index_add_(0, layer_of, keep.long())
    minimum = torch.tensor(sizes, device=device).clamp(max=min_channels)
    segments = list(keep.split(sizes))
    restored = {}
    for i in torch.nonzero(kept_per_layer < minimum).flatten().tolist():
        best = torch.sort(scores[names[i]].reshape(-1).float(), descending=True, stable=True).indices
        segments[i] = torch.zeros_like(segments[i]).index_fill_(0, best[: int(minimum[i])], True)
        restored[names[i]] = int(minimum[i] - kept_per_layer[i])
    mask = {n: seg.clone() for n, seg in zip(names, segments)}
    return MaskResult(mask=mask, requested=requested, pruned=requested - sum(restored.values()), restored=restored)


def channel_scores(model: nn.Module, source: ChannelSource | None = None) -> dict[str, Tensor]:
    """The channel scores of every tracked module of ``model`` (by default BN ``|gamma|``)."""
    source = source or BatchNormSource()
    return {name: source.scores(m) for name, m in source.tracked(model).items()}


def channel_mask(
    model: nn.Module, prune_ratio: float, min_channels: int = 1, source: ChannelSource | None = None
) -> Mask:
    """Global channel mask of ``model`` at ``prune_ratio``.

    Args:
        model: any ``nn.Module``; its tracked channels are scored by ``source``.
        prune_ratio: fraction of channels to prune, in (0, 1).
        min_channels: channels every layer keeps at least.
        source: what is scored; :class:`~lightning_worm.core.scores.BatchNormSource` by default.

    Returns:
        ``dict[str, BoolTensor]`` per tracked module name, ``True`` = keep.

    Raises:
        ValueError: on bad arguments or if the model has no tracked channel.
        NonFiniteScoreError: if a score is NaN or infinite.

    Example::

        mask = channel_mask(model, prune_ratio=0.5)
        print({name: int(m.sum()) for name, m in mask.items()})  # channels kept per layer
    """
    scores = channel_scores(model, source)
    if not scores:
        raise ValueError(f"The model has no tracked channels ({(source or BatchNormSource()).description}).")
    return mask_from_scores(scores, prune_ratio, min_channels).mask


def flatten_mask(mask: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a mask's layers in their order into one 1-D bool tensor."""
    return torch.cat([m.reshape(-1) for m in mask.values()])


def unflatten_mask(flat: Tensor, like: Mapping[str, int]) -> Mask:
    """Split a flat mask back into layers; ``like`` maps layer name to channel count, in order."""
    if flat.numel() != sum(like.values()):
        raise ValueError(f"A flat mask of {flat.numel()} channels cannot fill layers of {sum(like.values())}.")
    return dict(zip(like, (t.clone() for t in flat.split(list(like.values())))))


def mask_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Normalised Hamming distance: the fraction of channels on which two masks differ.

    Raises:
        ValueError: if the masks do not cover the same layers with the same channel counts.
    """
    if list(a) != list(b) or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("The two masks cover different layers or channel counts; compare masks of one model.")
    fa, fb = flatten_mask(a), flatten_mask(b)
    return float((fa != fb).sum()) / fa.numel() if fa.numel() else math.nan
