"""PruneAndFinetune: remove the ticket's pruned channels mid-fit and fine-tune the small network."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_worm.callbacks.early_bird import EarlyBirdCallback, check_is_tracker
from lightning_worm.callbacks.strategy import check_strategy, check_tracker_in_trainer
from lightning_worm.core.sources import BatchNormSource
from lightning_worm.core.surgery import PruningPlan, apply_plan, prune_channels


class PruneAndFinetune(Callback):
    r"""Physically prune the Early-Bird ticket as soon as it emerges, then keep training the small network.

    When ``early_bird`` finds the ticket, the ticket's pruned channels leave the LightningModule in
    place (each BatchNorm channel with the convolution or linear output feeding it and the matching
    inputs of every consumer, through residual sums, concatenations and grouped convolutions, by
    torch-pruning's dependency graph). Training continues in the same ``fit``: the optimizers and LR
    schedulers are rebuilt through ``configure_optimizers``, the schedule continues from the epoch
    reached, and the optimizer state of the kept channels (momentum, Adam moments) is carried over by
    slicing. Under DDP every rank prunes identically and the model is wrapped again. The search is then
    over: ``early_bird`` (and any other tracker in the trainer) takes no more masks and a
    :class:`~lightning_worm.WormCallback` truncates nothing.

    The plan of the prune is kept in checkpoints: ``trainer.fit(fresh_module, ckpt_path=...)`` with the
    same callbacks re-applies it before the pruned weights load, and
    :func:`~lightning_worm.load_pruned` rebuilds the pruned module for inference.

    A report (parameters, FLOPs, channels per layer, ticket channels honoured, latency) is printed on
    rank zero, logged under ``pruning/``, kept as :attr:`report` and written as ``pruning_report.json``
    into the trainer's log directory.

    Args:
        early_bird: the tracker whose ticket is pruned; it must be in the same trainer.
        example_input: a model input used to trace the data flow; by default the first element of the
            first training batch (a tensor, or the first item of a tuple/list batch), else the module's
            ``example_input_array``.
        coupling: ``"all"`` prunes a channel shared by several BN layers (a residual sum) only if the
            ticket prunes it in every one of them; ``"mean_rank"`` ranks such channels by the group's
            mean ``|gamma|``.
        round_to: keep every coupled group's channel count a multiple of this (faster kernels), by keeping
            the next-best channels; ``None`` honours the ticket exactly.
        finetune_epochs: end the fit this many epochs after the prune; ``None`` trains to ``max_epochs``.
        restart_schedule: start the LR schedule afresh instead of continuing it.
        reset_optimizer_state: start the optimizer state (momentum, moments) from zero instead of
            carrying the kept channels' state over.
        reinit: re-initialise the pruned network's weights (the Early-Bird paper's "re-init" variant); the
            optimizer state then starts from zero.
        measure_latency: time inference before and after on the example input (rank zero only).

    Raises:
        ValueError: on a bad argument; at setup if ``early_bird`` is not in the trainer, its source is not
            BatchNorm, the strategy shards parameters (FSDP, DeepSpeed) or launches by spawn/fork
            (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``: use ``ddp``).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5)
        trainer = Trainer(max_epochs=160,
                          callbacks=[early_bird, WormCallback(early_bird), PruneAndFinetune(early_bird)])
        trainer.fit(model, datamodule)  # search, prune at the ticket, fine-tune to the end
    """

    def __init__(
        self,
        early_bird: EarlyBirdCallback,
        example_input: Tensor | tuple[Tensor, ...] | None = None,
        coupling: str = "all",
        round_to: int | None = None,
        finetune_epochs: int | None = None,
        restart_schedule: bool = False,
        reset_optimizer_state: bool = False,
        reinit: bool = False,
        measure_latency: bool = True,
    ) -> None:
        super().__init__()
        check_is_tracker(early_bird, type(self).__name__)
        if coupling not in ("all", "mean_rank"):
            raise ValueError(f"`coupling` must be 'all' or 'mean_rank', got {coupling!r}.")
        if round_to is not None and not (isinstance(round_to, int) and round_to >= 1):
            raise ValueError(f"`round_to` must be None or an integer >= 1, got {round_to!r}.")
        if finetune_epochs is not None and not (isinstance(finetune_epochs, int) and finetune_epochs >= 0):
            raise ValueError(f"`finetune_epochs` must be None or an integer >= 0, got {finetune_epochs!r}.")
        self.early_bird = early_bird
        self.example_input = example_input
        self.coupling = coupling
        self.round_to = round_to
        self.finetune_epochs = finetune_epochs
        self.restart_schedule = restart_schedule
        self.reset_optimizer_state = reset_optimizer_state
        self.reinit = reinit
        self.measure_latency = measure_latency
        self.report: dict[str, Any] | None = None
        self.report_path: str | None = None
        self.plan: PruningPlan | None = None
        self.pruned_epoch: int | None = None
        self.stop_epoch: int | None = None
        early_bird.subscribe(self._on_search_update)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(early_bird=self.early_bird.state_key)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._reshape_before_weights_load(pl_module)
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        check_tracker_in_trainer(trainer, self)
        if sum(isinstance(c, PruneAndFinetune) for c in trainer.callbacks) > 1:
            raise ValueError("One model can be pruned by one PruneAndFinetune: keep one in the Trainer's callbacks.")
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            raise ValueError(
                f"PruneAndFinetune does not support the {trainer.strategy.launcher._start_method!r} launcher: it "
                "copies the trained weights back into the main process's unpruned module. Use `strategy='ddp'` "
                "(one process per device, started as scripts), which supports pruning mid-fit."
            )
        if not isinstance(self.early_bird.source, BatchNormSource):
            raise ValueError(
                f"PruneAndFinetune prunes BatchNorm channels, but the tracker scores "
                f"{type(self.early_bird.source).__name__}. Use the default source, or prune with your own surgery."
            )

    def _reshape_before_weights_load(self, pl_module: "pl.LightningModule") -> None:
        # Lightning restores the model weights before any callback state, and no callback hook runs in
        # between (checked in 2.5/2.6); the LightningModule's `on_load_checkpoint` is the last hook before
        # `load_state_dict`, and it sees the whole checkpoint. Wrap it on this instance (once, whatever the
        # number of fits) so that a pruned checkpoint reshapes the fresh module first, in fit, validate,
        # test and predict alike.
        original = getattr(pl_module.on_load_checkpoint, "__wrapped__", pl_module.on_load_checkpoint)

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and state.get("plan") is not None and self.plan is None:
                self.plan = PruningPlan.from_dict(state["plan"])
                apply_plan(pl_module, self.plan)
            original(checkpoint)

        on_load_checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
        pl_module.on_load_checkpoint = on_load_checkpoint

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.example_input is None and self.plan is None:
            self.example_input = _first_input(batch, fallback=pl_module.example_input_array)

    def _on_search_update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.plan is not None or self.early_bird.ticket is None or not self.early_bird.searching:
            return
        self.prune(trainer, pl_module)

    def prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Prune the ticket now, rebuild the optimizers, end the search. Every rank calls it together."""
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(
                "PruneAndFinetune has no example input to trace the model: pass `example_input=` (or set "
                "`example_input_array` on your LightningModule)."
            )
        example = _to_device(example, pl_module.device)
        old_optimizers = list(trainer.strategy.optimizers)
        old_schedulers = [cfg.scheduler for cfg in trainer.strategy.lr_scheduler_configs]
        params_before = dict(pl_module.named_parameters())
        measure = self.measure_latency and trainer.is_global_zero
        report = prune_channels(pl_module, self.early_bird.ticket, example, coupling=self.coupling,
                                round_to=self.round_to, measure_latency=measure)
        self.plan, self.pruned_epoch = report.plan, trainer.current_epoch
        if self.reinit:
            _reinitialise(pl_module)

        if isinstance(trainer.strategy, DDPStrategy):
            # DDP's reducer holds the old parameters: wrap the pruned module again (private API, pinned
            # by the DDP test for lightning>=2.5,<2.7). The new wrapper broadcasts rank 0's weights.
            trainer.strategy.model = trainer.strategy.model.module
            trainer.strategy.configure_ddp()
        trainer.strategy.setup_optimizers(trainer)
        _optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
        params_after = dict(pl_module.named_parameters())
        self._carry_optimizers(old_optimizers, trainer.strategy.optimizers, params_before, params_after,
                               report.kept_indices)
        if not self.restart_schedule:
            for old, cfg in zip(old_schedulers, trainer.strategy.lr_scheduler_configs):
                cfg.scheduler.load_state_dict(old.state_dict())
        if self.finetune_epochs is not None:
            self.stop_epoch = trainer.current_epoch + 1 + self.finetune_epochs
            trainer.fit_loop.max_epochs = self.stop_epoch

        for tracker in trainer.callbacks:  # every tracker's masks are of the old shapes now
            if isinstance(tracker, EarlyBirdCallback) and tracker.searching:
                tracker.end_search(trainer, pl_module)
        self.report = {"epoch": trainer.current_epoch, "ticket_epoch": self.early_bird.ticket_epoch,
                       "prune_ratio": self.early_bird.prune_ratio, **report.to_dict()}
        self.report.pop("plan", None)
        self._publish(trainer, pl_module)

    def _carry_optimizers(
        self,
        old_optimizers: list[torch.optim.Optimizer],
        new_optimizers: list[torch.optim.Optimizer],
        before: Mapping[str, Tensor],
        after: Mapping[str, Tensor],
        kept: Mapping[str, list[Tensor | None]],
    ) -> None:
        if len(new_optimizers) != len(old_optimizers):
            raise RuntimeError(
                f"`configure_optimizers` returned {len(new_optimizers)} optimizers after pruning but "
                f"{len(old_optimizers)} before: it must build the same optimizers from `self.parameters()`."
            )
        name_of = {id(p): n for n, p in before.items()}
        for old, new in zip(old_optimizers, new_optimizers):
            if not self.restart_schedule:  # the schedule's current lr (and momentum, ...) go on
                for old_group, new_group in zip(old.param_groups, new.param_groups):
                    new_group.update({k: v for k, v in old_group.items() if k != "params"})
            if self.reset_optimizer_state or self.reinit:  # fresh weights: the old momentum means nothing
                continue
            for param, state in old.state.items():
                name = name_of.get(id(param))
                if name is None or name not in after:
                    continue
                new_param = after[name]
                new.state[new_param] = {
                    key: _slice_like(value, param, kept.get(name)) for key, value in state.items()
                }

    def _publish(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        r = self.report
        kwargs: dict[str, Any] = dict(on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        pl_module.log("pruning/params_ratio", r["params_after"] / r["params_before"], **kwargs)
        pl_module.log("pruning/flops_ratio", r["flops_after"] / r["flops_before"], **kwargs)
        directory = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "pruning_report.json")
        with open(path, "w") as f:
            json.dump(r, f, indent=2)
        self.report_path = path
        latency = ""
        if r.get("latency_before_ms") is not None:
            latency = f", latency {r['latency_before_ms']:.2f} -> {r['latency_after_ms']:.2f} ms"
        rank_zero_info(
            f"PruneAndFinetune: pruned the ticket of epoch {r['ticket_epoch']} at the end of epoch {r['epoch']}: "
            f"parameters {r['params_before']:,} -> {r['params_after']:,}, "
            f"FLOPs {r['flops_before']:,} -> {r['flops_after']:,}{latency}. Report: {path}"
        )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.stop_epoch is not None:  # resumed after the prune: the fine-tuning still ends where it should
            trainer.fit_loop.max_epochs = self.stop_epoch

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "plan": None if self.plan is None else self.plan.to_dict(),
            "report": self.report,
            "pruned_epoch": self.pruned_epoch,
            "stop_epoch": self.stop_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = state_dict["report"]
        self.pruned_epoch = state_dict["pruned_epoch"]
        self.stop_epoch = state_dict["stop_epoch"]
        if state_dict["plan"] is not None and self.plan is None:
            raise RuntimeError(
                "The checkpoint holds a pruned model, but its plan was not applied before the weights loaded. "
                "Resume through `trainer.fit(module, ckpt_path=...)` with this PruneAndFinetune in the callbacks."
            )


def _first_input(batch: Any, fallback: Any = None) -> Any:
    if isinstance(batch, Tensor):
        return batch[:2].detach()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0][:2].detach()
    if fallback is not None:
        return fallback
    raise ValueError(
        f"PruneAndFinetune cannot tell the model input in a batch of type {type(batch).__name__}: "
        "pass `example_input=` (a tensor shaped like one input batch)."
    )


def _to_device(example: Any, device: torch.device) -> Any:
    if isinstance(example, Tensor):
        return example.to(device)
    return tuple(_to_device(e, device) for e in example)


def _slice_like(value: Any, old_param: Tensor, kept: list[Tensor | None] | None) -> Any:
    """Slice an optimizer state tensor shaped like ``old_param`` to the kept indices."""
    if kept is None or not isinstance(value, Tensor) or value.shape != old_param.shape:
        return value
    for dim, idx in enumerate(kept):
        if idx is not None:
            value = value.index_select(dim, idx.to(value.device))
    return value.clone()


@torch.no_grad()
def _reinitialise(module: torch.nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()
