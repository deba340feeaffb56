"""How WormCallback and PruneAndFinetune find the EarlyBirdCallback they follow, in the trainer."""

from __future__ import annotations

from numbers import Real
from typing import Any

import lightning.pytorch as pl

from lightning_worm._internals.lightning import trainer_callbacks
from lightning_worm.callbacks.early_bird import EarlyBirdCallback

__all__ = ["TrackerSpec", "check_tracker_spec", "end_every_search", "find_tracker", "tracker_key", "trackers"]

#: What a follower accepts as ``early_bird``: the tracker itself, its ``prune_ratio``, or ``None`` (the only one).
TrackerSpec = EarlyBirdCallback | float | None


def check_tracker_spec(early_bird: Any, who: str) -> None:
    """Raise at construction if ``early_bird`` is not a tracker, a prune ratio or ``None``.

    Raises:
        ValueError: saying what to pass.
    """
    if early_bird is None or isinstance(early_bird, EarlyBirdCallback):
        return
    if isinstance(early_bird, Real) and not isinstance(early_bird, bool) and 0.0 < float(early_bird) < 1.0:
        return
    raise ValueError(
        f"`early_bird` must be an EarlyBirdCallback, the `prune_ratio` of one in the same Trainer, or None (the "
        f"only one in the Trainer), got {early_bird!r}: e.g. `{who}(early_bird)` or `{who}(early_bird=0.5)`."
    )


def trackers(trainer: pl.Trainer) -> list[EarlyBirdCallback]:
    """The trainer's EarlyBirdCallbacks, in list order."""
    return [c for c in trainer_callbacks(trainer) if isinstance(c, EarlyBirdCallback)]


def end_every_search(trainer: pl.Trainer) -> None:
    """End the search of every tracker in ``trainer`` that still searches (the model was pruned: masks of the
    old shapes mean nothing any more)."""
    for tracker in trackers(trainer):
        if tracker.searching:
            tracker.end_search()


def find_tracker(trainer: pl.Trainer, early_bird: TrackerSpec, who: str) -> EarlyBirdCallback:
    """The tracker ``early_bird`` designates among the trainer's callbacks.

    Raises:
        ValueError: if it is not in the trainer, or ``None``/a ratio does not designate exactly one.
    """
    found = trackers(trainer)
    ratios = [t.prune_ratio for t in found]
    if isinstance(early_bird, EarlyBirdCallback):
        if not any(t is early_bird for t in found):
            raise ValueError(
                f"{who} follows an EarlyBirdCallback that is not in this Trainer's callbacks: add it, "
                f"`Trainer(callbacks=[early_bird, {who}(early_bird)])`, or pass `early_bird=None` to use the one "
                "in the Trainer."
            )
        return early_bird
    if early_bird is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(
                f"{who} needs an EarlyBirdCallback in the same Trainer: `Trainer(callbacks=[EarlyBirdCallback(), "
                f"{who}()])`."
            )
        raise ValueError(
            f"{who} cannot tell which of {len(found)} EarlyBirdCallbacks (prune_ratio {ratios}) to follow: pass "
            f"`early_bird=<its prune_ratio>` or the callback itself."
        )
    matches = [t for t in found if t.prune_ratio == float(early_bird)]
    if len(matches) != 1:
        raise ValueError(
            f"{who}(early_bird={early_bird!r}) designates {len(matches)} of the Trainer's EarlyBirdCallbacks "
            f"(prune_ratio {ratios}); it must designate exactly one: pass the callback itself."
        )
    return matches[0]


def tracker_key(early_bird: TrackerSpec, resolved: EarlyBirdCallback | None) -> str:
    """The part of a follower's state key that names its tracker (stable before and after it is found)."""
    tracker = resolved if resolved is not None else early_bird
    if isinstance(tracker, EarlyBirdCallback):
        return tracker.state_key
    return "auto" if tracker is None else f"prune_ratio={float(tracker):g}"
