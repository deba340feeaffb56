"""What the callbacks need from Lightning's strategies: which ones are supported, one shared decision."""

from __future__ import annotations

from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

T = TypeVar("T")

SUPPORTED = (
    "single-device strategies and DDP (ddp; the search also ddp_spawn, ddp_fork, ddp_notebook), on any accelerator"
)


def check_strategy(trainer: "pl.Trainer", who: str) -> None:
    """Raise if the strategy shards parameters (FSDP, DeepSpeed, model parallel): channels must be whole.

    Raises:
        ValueError: naming the strategy and the supported ones.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"{who} does not support the {type(strategy).__name__}: it needs every BatchNorm channel whole on "
            f"every rank. Supported: {SUPPORTED}. Use `strategy='ddp'` for multi-GPU or multi-node training."
        )


def decide_on_rank_zero(trainer: "pl.Trainer", obj: T) -> T:
    """Return rank 0's ``obj`` on every rank (a no-op on one process). Every rank must call it together."""
    if trainer.world_size == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


def log_prefix(trainer: "pl.Trainer", callback: Any, name: str) -> str:
    """``name``, namespaced by the tracker's prune ratio when several Early-Bird trackers run."""
    from lightning_worm.callbacks.early_bird import EarlyBirdCallback

    trackers = [c for c in trainer.callbacks if isinstance(c, EarlyBirdCallback)]
    return name if len(trackers) < 2 else f"{name}_{callback.prune_ratio:g}"


def check_tracker_in_trainer(trainer: "pl.Trainer", callback: Any) -> None:
    """Raise if ``callback.early_bird`` is not among the trainer's callbacks.

    Raises:
        ValueError: saying how to add it.
    """
    if not any(c is callback.early_bird for c in trainer.callbacks):
        name = type(callback).__name__
        raise ValueError(
            f"{name} needs its EarlyBirdCallback in the same Trainer: "
            f"`Trainer(callbacks=[early_bird, {name}(early_bird)])`."
        )
