"""WormCallback: truncate the gradients of the channels the ticket search is about to drop."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_worm.callbacks.early_bird import EarlyBirdCallback, check_is_tracker
from lightning_worm.callbacks.strategy import check_strategy, check_tracker_in_trainer, log_prefix
from lightning_worm.core.truncation import ChiSchedule, GradientTruncation


class WormCallback(Callback):
    r"""WORM (Vasudev, 2024): shrink the gradients of masked-out channels while the ticket is searched.

    After each epoch of ``early_bird``'s search, the latest mask is taken and the loss gradients of the
    masked-out channels' BatchNorm weight and bias are multiplied by chi from then on; kept channels are
    untouched. chi follows ``schedule``: ``"elbow"`` (the paper's WORM) is 1 until the epoch's mean mask
    distance falls below ``elbow`` and ``chi`` for good after; ``"fixed"`` is ``chi`` from the first
    mask; ``"greedy"`` is the latest mean distance clipped to [0, 1] (1 while the window fills).

    The truncation is applied once per optimizer step to the final gradient: in ``on_after_backward``
    of the micro-batch that completes a gradient accumulation (so DDP has already reduced it and
    clipping comes after), which makes it independent of ``accumulate_grad_batches`` and of AMP's loss
    scale (the multiply commutes with scaling). Under manual optimization it is applied in
    ``on_before_optimizer_step``. Weight decay inside the optimizer is not a loss gradient and is not
    truncated; neither is the sparsity term of ``early_bird``, added after. Once the model is pruned,
    nothing is truncated any more.

    Logs ``worm/chi`` and ``worm/truncated_channels`` (``worm_<ratio>/...`` when several trackers run).

    Args:
        early_bird: the :class:`~lightning_worm.EarlyBirdCallback` whose masks are used; it must be in the
            same trainer's callbacks.
        schedule: ``"elbow"``, ``"fixed"`` or ``"greedy"``.
        chi: the multiplier of masked-out channels' gradients, in [0, 1].
        elbow: mean-distance threshold of the ``"elbow"`` schedule, in [0, 1].

    Raises:
        ValueError: on an unknown schedule or a value outside [0, 1]; at setup, if ``early_bird`` is not
            in the trainer's callbacks.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5)
        worm = WormCallback(early_bird, schedule="elbow", chi=0.003, elbow=0.15)
        trainer = Trainer(max_epochs=40, callbacks=[early_bird, worm])
    """

    def __init__(
        self, early_bird: EarlyBirdCallback, schedule: str = "elbow", chi: float = 0.003, elbow: float = 0.15
    ) -> None:
        super().__init__()
        check_is_tracker(early_bird, type(self).__name__)
        self.early_bird = early_bird
        self.schedule = ChiSchedule(schedule, chi, elbow)
        self.prefix = "worm"
        self._truncation: GradientTruncation | None = None
        early_bird.subscribe(self._refresh)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            early_bird=self.early_bird.state_key, schedule=self.schedule.schedule,
            chi=self.schedule.chi, elbow=self.schedule.elbow,
        )

    @property
    def chi(self) -> float:
        """The multiplier in use now (1.0 = no truncation)."""
        return self._truncation.chi if self._truncation is not None else 1.0

    @property
    def truncated_channels(self) -> int:
        """How many channels' gradients are multiplied by :attr:`chi` now."""
        return self._truncation.truncated_channels if self._truncation is not None else 0

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        check_tracker_in_trainer(trainer, self)
        self.prefix = log_prefix(trainer, self.early_bird, "worm")
        self._truncation = GradientTruncation(pl_module, self.early_bird.source)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After a checkpoint restore: rebuild the multiply from the restored mask and chi.
        self._set(self.schedule.value)

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Private, pinned by tests (lightning>=2.5,<2.7): is this the last micro-batch before the step?
        if pl_module.automatic_optimization and not trainer.fit_loop._should_accumulate():
            self._truncation.apply()

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not pl_module.automatic_optimization:
            self._truncation.apply()

    def _refresh(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Called by the tracker after each epoch that took a mask, and when the search ends."""
        searching = self.early_bird.searching
        if searching:
            self.schedule.update(self.early_bird.mean_distances[-1])
        self._set(self.schedule.value)
        if searching:
            kwargs: dict[str, Any] = dict(on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
            pl_module.log(f"{self.prefix}/chi", self.chi, prog_bar=True, **kwargs)
            pl_module.log(f"{self.prefix}/truncated_channels", float(self.truncated_channels), **kwargs)

    def _set(self, chi: float) -> None:
        if self._truncation is None:
            return
        mask = self.early_bird.mask if self.early_bird.searching else None
        self._truncation.set(mask, chi if mask is not None else 1.0)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict["schedule"])
