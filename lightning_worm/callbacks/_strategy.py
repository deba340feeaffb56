"""What the callbacks need from Lightning's strategies: which ones are supported, one shared decision, and the
logging of values that every rank holds alike."""

from __future__ import annotations

from typing import TypeVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

__all__ = ["SUPPORTED", "check_strategy", "decide_on_rank_zero", "is_sharded_strategy", "log_shared"]

T = TypeVar("T")

SUPPORTED = (
    "single-device strategies, DDP (ddp; the search also ddp_spawn, ddp_fork, ddp_notebook) and FSDP2 "
    "(ModelParallelStrategy with tensor_parallel_size=1, fully_shard applied in configure_model), on any accelerator"
)


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Raise for a strategy the callbacks do not support: FSDP1, DeepSpeed, tensor parallelism.

    Raises:
        ValueError: naming the strategy, why, and what to use instead.
    """
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel != 1:
            raise ValueError(
                f"{who} supports the ModelParallelStrategy for FSDP2 only (`tensor_parallel_size=1`), got "
                f"tensor_parallel_size={tensor_parallel}: tensor parallelism splits a head or a channel across "
                "ranks. Use `ModelParallelStrategy(data_parallel_size=..., tensor_parallel_size=1)` and "
                "`fully_shard` in `configure_model`."
            )
        return
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        name = type(strategy).__name__
        instead = ("For sharded training use FSDP2: `strategy=ModelParallelStrategy(data_parallel_size=N, "
                   "tensor_parallel_size=1)` with `fully_shard` applied in `configure_model`"
                   if "FSDP" in name or "DeepSpeed" in name else "Use `strategy='ddp'` for multi-GPU or multi-node")
        raise ValueError(f"{who} does not support the {name}. Supported: {SUPPORTED}. {instead}.")


def is_sharded_strategy(trainer: pl.Trainer) -> bool:
    """Whether the strategy shards parameters (FSDP2 through the ModelParallelStrategy)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def decide_on_rank_zero(trainer: pl.Trainer, obj: T) -> T:
    """Return rank 0's ``obj`` on every rank (a no-op on one process). Every rank must call it together."""
    if trainer.world_size == 1:
        return obj
    return trainer.strategy.broadcast(obj, src=0)


def log_shared(pl_module: pl.LightningModule, name: str, value: float, prog_bar: bool = False) -> None:
    """Log, once per epoch, a value every rank holds alike (``reduce_fx="max"`` keeps it exact under DDP)."""
    pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", prog_bar=prog_bar)
