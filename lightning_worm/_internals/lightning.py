"""The private Lightning API lightning-worm relies on (lightning>=2.5,<2.7), and why.

Each function names the internal it touches; ``tests/_internals/test_lightning.py`` pins every one of them, so
that a Lightning release that changes one fails there with the name of the change, not deep inside a fit.
Everything else in the callbacks uses public hooks and properties only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "USED",
    "CheckpointHooks",
    "attached_trainer",
    "before_checkpoint_load",
    "checkpoint_hooks",
    "launcher_start_method",
    "optimizers_to_device",
    "rewrap_ddp",
    "trainer_callbacks",
]

#: The internals used here, for the README and the pinning test.
USED = (
    "DDPStrategy.configure_ddp() and assigning DDPStrategy.model: wrap the pruned module in DDP again mid-fit",
    "DDPStrategy.launcher._start_method: refuse spawn/fork launchers, which copy dense weights back",
    "LightningModule.on_load_checkpoint / on_save_checkpoint replaced on the instance: reshape a fresh module "
    "before pruned weights load, and write the pruning plan into weights-only checkpoints too",
    "Strategy.load_checkpoint replaced on the instance: the ModelParallelStrategy loads the weights into the sharded "
    "module inside it, before any hook sees the checkpoint, so a pruned checkpoint's plan is applied just before",
)


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the (pruned) LightningModule in a new ``DistributedDataParallel`` on every rank.

    DDP's reducer holds the old parameters after a prune. Lightning has no public call to re-wrap a model
    mid-fit; ``configure_ddp`` (private) wraps ``strategy.model`` again, and the new wrapper broadcasts
    rank 0's weights. The caller rebuilds the optimizers afterwards.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy):
        strategy.model = cast(DistributedDataParallel, strategy.model).module  # wrapped by configure_ddp at setup
        strategy.configure_ddp()


def before_checkpoint_load(strategy: Any, key: str, fn: Callable[[Any], None]) -> None:
    """Run ``fn(path)`` whenever ``strategy.load_checkpoint(path)`` is about to load a checkpoint (one ``fn`` per
    ``key``, however often it is installed).

    The ModelParallelStrategy loads the weights straight into the (sharded) module inside ``load_checkpoint``,
    after ``on_fit_start`` and before any hook sees the checkpoint: a model pruned in the checkpoint must take
    its pruned shapes first.
    """
    before: dict[str, Callable[[Any], None]] | None = strategy.__dict__.get("_lightning_worm_before_load")
    if before is None:
        before = {}
        original = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            for hook in list(before.values()):
                hook(checkpoint_path)
            return original(checkpoint_path, *args, **kwargs)

        strategy.load_checkpoint = load_checkpoint
        strategy.__dict__["_lightning_worm_before_load"] = before
    before[key] = fn


def launcher_start_method(trainer: pl.Trainer) -> str | None:
    """``"spawn"``, ``"fork"`` or ``"forkserver"`` when the strategy starts its processes that way, else ``None``.

    Such launchers copy the trained weights back into the main process's module at the end of the fit;
    the public ``strategy_name`` does not say which launcher a custom DDPStrategy uses.
    """
    launcher = getattr(trainer.strategy, "launcher", None)
    return getattr(launcher, "_start_method", None)


class CheckpointHooks:
    """Functions run from the LightningModule's own ``on_save_checkpoint`` / ``on_load_checkpoint``.

    Lightning restores the model weights before any callback state, and no callback hook runs in
    between (checked in 2.5/2.6); the module's ``on_load_checkpoint`` is the last hook before
    ``load_state_dict`` and sees the whole checkpoint. Likewise only the module's ``on_save_checkpoint``
    runs for ``save_weights_only`` checkpoints. So the hooks are replaced on the instance (once, however
    many fits and callbacks use them), calling the registered functions and then the user's own hook.
    """

    def __init__(self) -> None:
        self.on_save: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.on_load: dict[str, Callable[[dict[str, Any]], None]] = {}
        #: The pruning plan applied to this module (a dict), kept with the module rather than with the
        #: callback that pruned it, so that every later checkpoint of the module describes it.
        self.plan: dict[str, Any] | None = None


def checkpoint_hooks(pl_module: pl.LightningModule) -> CheckpointHooks:
    """The :class:`CheckpointHooks` of ``pl_module``, installed on first use."""
    hooks = pl_module.__dict__.get("_lightning_worm_checkpoint_hooks")
    if hooks is not None:
        return hooks
    hooks = CheckpointHooks()
    original_save, original_load = pl_module.on_save_checkpoint, pl_module.on_load_checkpoint

    def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
        for fn in list(hooks.on_save.values()):
            fn(checkpoint)
        original_save(checkpoint)

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        for fn in list(hooks.on_load.values()):
            fn(checkpoint)
        original_load(checkpoint)

    # Instance attributes: not saved by `save_hyperparameters`, not pickled into checkpoints.
    object.__setattr__(pl_module, "on_save_checkpoint", on_save_checkpoint)
    object.__setattr__(pl_module, "on_load_checkpoint", on_load_checkpoint)
    pl_module.__dict__["_lightning_worm_checkpoint_hooks"] = hooks
    return hooks


def attached_trainer(pl_module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer ``pl_module`` is attached to now, or ``None`` (public API: ``trainer`` raises when detached)."""
    try:
        return pl_module.trainer
    except RuntimeError:
        return None


def trainer_callbacks(trainer: pl.Trainer) -> list[Callback]:
    """``trainer.callbacks`` (public API), typed: Lightning assigns it in its callback connector and does not
    declare it on ``Trainer``."""
    return trainer.callbacks  # type: ignore[attr-defined]  # undeclared on Trainer (Lightning 2.5/2.6)


def optimizers_to_device(optimizers: list[torch.optim.Optimizer], device: torch.device) -> None:
    """Move every tensor of the optimizers' state to ``device`` (public torch API only)."""
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device != device and key != "step":
                    state[key] = value.to(device)
