"""WormCallback: truncate the gradients of the units the ticket search is about to drop."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_worm._deprecation import RenamedAttribute
from lightning_worm._internals.lightning import trainer_callbacks
from lightning_worm.callbacks._strategy import check_strategy, log_shared
from lightning_worm.callbacks._tracking import TrackerSpec, check_tracker_spec, find_tracker, tracker_key
from lightning_worm.callbacks.early_bird import EarlyBirdCallback
from lightning_worm.core.truncation import ChiSchedule, GradientTruncation

__all__ = ["WormCallback"]


class WormCallback(Callback):
    r"""WORM (Vasudev, 2024): shrink the gradients of masked-out units while the ticket is searched.

    After each epoch of the tracker's search, the latest mask is taken and the loss gradients of the
    masked-out units (for BatchNorm: the channels' weight and bias) are multiplied by chi from then on;
    kept units are untouched. chi follows ``schedule``: ``"elbow"`` (the paper's WORM) is 1 until the
    epoch's mean mask distance falls below ``elbow`` and ``chi`` for good after; ``"fixed"`` is ``chi``
    from the first mask; ``"greedy"`` is the latest mean distance clipped to [0, 1] (1 while the window
    fills); ``"two_stage"`` (the WORM code's transformer schedule) is the mean distance, or ``low`` while
    it is below ``low_below``, recomputed every epoch.

    The callback reads the tracker's state in its own hooks (at the first batch after the state
    changed), so the result does not depend on the order the callbacks are built or listed in. The
    tracker owns every per-step gradient edit, in one fixed order: it applies this truncation once per
    optimizer step to the final gradient, in ``on_after_backward`` of the micro-batch that completes a
    gradient accumulation (so DDP has already reduced it and clipping comes after), which makes it
    independent of ``accumulate_grad_batches`` and of AMP's loss scale; under manual optimization in
    ``on_before_optimizer_step``. Its sparsity term comes after, under both, and is never truncated;
    neither is weight decay inside the optimizer. Once the model is pruned, nothing is truncated any more.

    Logs ``worm/chi`` (the multiplier in use during the epoch) and ``worm/truncated_units``
    (``worm_<ratio>/...`` when several trackers run).

    Args:
        early_bird: the :class:`~lightning_worm.EarlyBirdCallback` whose masks are used, its ``prune_ratio``
            (when several trackers run), or ``None``: the only tracker in the trainer. It must be in the
            same trainer; one WormCallback per tracker.
        schedule: ``"elbow"``, ``"fixed"``, ``"greedy"`` or ``"two_stage"``.
        chi: the multiplier of masked-out units' gradients, in [0, 1].
        elbow: mean-distance threshold of the ``"elbow"`` schedule, in [0, 1].
        low: the ``"two_stage"`` multiplier once the mean distance is below ``low_below``.
        low_below: the ``"two_stage"`` mean distance under which ``low`` is used.

    Raises:
        ValueError: on an unknown schedule or a value outside [0, 1]; at setup, if the tracker is not in
            the trainer (or cannot be told apart), or another WormCallback follows the same tracker.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5)
        trainer = Trainer(max_epochs=40, callbacks=[early_bird, WormCallback(schedule="elbow", chi=0.003)])
    """

    def __init__(
        self,
        early_bird: TrackerSpec = None,
        schedule: Literal["elbow", "fixed", "greedy", "two_stage"] = "elbow",
        chi: float = 0.003,
        elbow: float = 0.15,
        low: float = 0.01,
        low_below: float = 0.015,
    ) -> None:
        super().__init__()
        check_tracker_spec(early_bird, type(self).__name__)
        self._spec = early_bird
        self.early_bird: EarlyBirdCallback | None = early_bird if isinstance(early_bird, EarlyBirdCallback) else None
        self.schedule = ChiSchedule(schedule, chi, elbow, low, low_below)
        self._truncation: GradientTruncation | None = None
        self._consumed = 0  # how many of the tracker's mask epochs the schedule has seen
        self._seen_version = -1
        self._logged_chi: float | None = None

    @property
    @override
    def state_key(self) -> str:
        s = self.schedule
        return self._generate_state_key(
            early_bird=tracker_key(self._spec, self.early_bird), schedule=s.schedule, chi=s.chi, elbow=s.elbow,
            **({"low": s.low, "low_below": s.low_below} if s.schedule == "two_stage" else {}),
        )

    @property
    def chi(self) -> float:
        """The schedule's multiplier after the latest mask (1.0 = no truncation)."""
        self._sync_schedule()
        return self.schedule.value

    @property
    def truncated_units(self) -> int:
        """How many units' gradients are multiplied by :attr:`chi` now (0 once the model is pruned)."""
        return self._truncation.truncated_units if self._truncation is not None else 0

    truncated_channels = RenamedAttribute("truncated_units")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        check_strategy(trainer, name)
        self.early_bird = find_tracker(trainer, self._spec, name)
        for other in trainer_callbacks(trainer):
            if isinstance(other, WormCallback) and other is not self:
                if find_tracker(trainer, other._spec, name) is self.early_bird:
                    raise ValueError(
                        f"Two WormCallbacks follow the EarlyBirdCallback(prune_ratio={self.early_bird.prune_ratio:g}): "
                        "their factors would multiply. Keep one WormCallback per tracker."
                    )
        self._truncation = GradientTruncation(pl_module, self.early_bird.source)
        self._seen_version = -1
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1 and math.isinf(
            trainer.num_training_batches if trainer.num_training_batches is not None else 0
        ):
            rank_zero_warn(f"{name}: with a training set of unknown length, a last, incomplete gradient "
                           "accumulation of an epoch is not truncated.")

    def _sync_schedule(self) -> None:
        tracker = self.early_bird
        if tracker is None:
            return
        detector = tracker.detector
        for epoch in detector.mask_epochs[self._consumed:]:
            self.schedule.update(detector.mean_distances[epoch])
        self._consumed = len(detector.mask_epochs)

    def _sync(self, pl_module: pl.LightningModule) -> None:
        """Re-read the tracker's state if it changed: advance the schedule, rebuild the factors."""
        tracker = self.early_bird
        if tracker is None or self._truncation is None or tracker.version == self._seen_version:
            return
        self._seen_version = tracker.version
        self._sync_schedule()
        mask = tracker.mask if tracker.searching else None
        self._truncation.set(mask, self.schedule.value if mask is not None else 1.0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)  # after a checkpoint restore

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._sync(pl_module)
        if self._logged_chi is None and self.early_bird is not None and self.early_bird.searching:
            self._logged_chi = self.schedule.value
            prefix = self.early_bird.log_prefix(trainer, "worm")
            log_shared(pl_module, f"{prefix}/chi", self._logged_chi, prog_bar=True)
            log_shared(pl_module, f"{prefix}/truncated_units", float(self.truncated_units))

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged_chi = None

    @override
    def state_dict(self) -> dict[str, Any]:
        self._sync_schedule()
        return {"schedule": self.schedule.state_dict(), "consumed": self._consumed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict["schedule"])
        # lightning-worm 0.1 did not record it: its schedule had seen every mask of the tracker's state.
        self._consumed = state_dict.get("consumed", -1)
        self._seen_version = -1

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The tracker applies the truncation in its own hooks, in one order with its sparsity term; every setup
        # has run by now, so the tracker's own (which forgets an earlier fit's truncation) cannot undo this.
        tracker = self.early_bird
        assert tracker is not None, "setup('fit') has found the tracker"
        tracker.truncation = self._truncation
        if self._consumed == -1:
            self._consumed = len(tracker.detector.mask_epochs)

