"""What the callbacks need from Lightning's strategies: which ones are supported, one shared decision, and the
logging of values that every rank holds alike."""

from __future__ import annotations

from typing import TypeVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

__all__ = ["SUPPORTED", "check_strategy", "decide_on_rank_zero", "log_shared"]

T = TypeVar("T")

SUPPORTED = (
    "single-device strategies and DDP (ddp; the search also ddp_spawn, ddp_fork, ddp_notebook), on any accelerator"
)


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise if the strategy shards parameters (FSDP, DeepSpeed, model parallel): units must be whole.

    Raises:
        ValueError: naming the strategy and the supported ones.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"{who} does not support the {type(strategy).__name__}: it needs every scored parameter whole on "
            f"every rank. Supported: {SUPPORTED}. Use `strategy='ddp'` for multi-GPU or multi-node training."
        )


def decide_on_rank_zero(trainer: pl.Trainer, obj: T) -> T:
    """Return rank 0's ``obj`` on every rank (a no-op on one process). Every rank must call it together."""
    if trainer.world_size == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


def log_shared(pl_module: pl.LightningModule, name: str, value: float, prog_bar: bool = False) -> None:
    """Log, once per epoch, a value every rank holds alike (``reduce_fx="max"`` keeps it exact under DDP)."""
    pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", prog_bar=prog_bar)
