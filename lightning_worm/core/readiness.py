"""How cheap a mask is to prune: the share of the score mass its pruned units hold, against a random mask's.

The Early-Bird rule says when the mask stopped changing, not whether its pruned units still matter. The score
share says that: a ticket whose pruned units hold almost none of the scores (the sparsity term has pushed their
scaling factors towards zero) loses little when they are removed; one whose pruned units hold as much as a random
mask of the same widths would is no better than the scores' noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_worm.core.masks import MaskLike

__all__ = ["NOISE_RATIO", "ScoreShare", "score_share"]

#: A ticket whose pruned units hold at least this fraction of a random ticket's share looks no better than noise.
NOISE_RATIO = 0.8


@dataclass(frozen=True)
class ScoreShare:
    """The score mass a mask prunes, next to what a random mask of the same per-entry widths would prune.

    Attributes:
        pruned: the share of the total score the mask's pruned units hold, in [0, 1].
        random: the expected share of a random mask that prunes as many units in every entry.
        ratio: ``pruned / random``: 0 when the pruned units hold nothing, about 1 for a ticket no better than a
            random one of the same widths (0 when nothing is pruned).
    """

    pruned: float
    random: float

    @property
    def ratio(self) -> float:
        return self.pruned / self.random if self.random > 0 else 0.0

    @property
    def looks_like_noise(self) -> bool:
        """Whether the ratio is at least :data:`NOISE_RATIO`."""
        return self.random > 0 and self.ratio >= NOISE_RATIO

    def to_dict(self) -> dict[str, float]:
        return {"pruned": self.pruned, "random": self.random, "ratio": self.ratio}


@torch.no_grad()
def score_share(scores: Mapping[str, Tensor], mask: MaskLike, parts: Sequence[Sequence[str]] | None = None
                ) -> ScoreShare:
    """The share of the score mass that ``mask``'s pruned units hold, and a random mask's.

    Args:
        scores: non-negative score tensor per entry (as :func:`~lightning_worm.core.unit_scores` gives).
        mask: keep-mask per entry (``True`` = keep), shaped like the scores; entries it lacks keep every unit.
        parts: the entry names of each source when several are tracked (their scores are on scales of their own: a
            head's mean ``|W|``, a BatchNorm ``|gamma|``): the share is then each source's share, averaged over the
            sources, so that no source outweighs another by the size of its scores. ``None``: one source.

    Raises:
        ValueError: if a mask's shape differs from its entry's scores, or a score is negative or not finite.

    Example::

        share = score_share(unit_scores(model), early_bird.ticket)
        share.pruned, share.random, share.ratio
    """
    groups = [list(names) for names in parts or () if names]
    if len(groups) > 1:
        shares = [score_share({n: scores[n] for n in names}, mask) for names in groups]
        return ScoreShare(sum(s.pruned for s in shares) / len(shares), sum(s.random for s in shares) / len(shares))
    total = pruned = expected = 0.0
    for name, entry in scores.items():
        values = entry.detach().reshape(-1)  # summed in float64, without a float64 copy of a large entry
        keep = mask.get(name)
        if keep is not None and tuple(keep.shape) != tuple(entry.shape):
            raise ValueError(f"The mask of {name!r} has shape {tuple(keep.shape)}, its scores {tuple(entry.shape)}.")
        mass = float(values.sum(dtype=torch.float64))
        if not math.isfinite(mass) or (values.numel() and float(values.min()) < 0):
            raise ValueError(f"The scores of {name!r} must be finite and non-negative to be shared out.")
        total += mass
        if keep is None or values.numel() == 0:
            continue
        kept = keep.reshape(-1).to(values.device)
        pruned += float(values.masked_fill(kept, 0).sum(dtype=torch.float64))
        expected += mass * (values.numel() - int(kept.sum())) / values.numel()
    if total <= 0:
        return ScoreShare(0.0, 0.0)
    return ScoreShare(pruned / total, expected / total)
