"""PruneAndFinetune: remove the ticket's pruned units mid-fit and fine-tune the small network."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_worm._internals.lightning import (
    attached_trainer,
    before_checkpoint_load,
    checkpoint_hooks,
    launcher_start_method,
    optimizers_to_device,
    rewrap_ddp,
    trainer_callbacks,
)
from lightning_worm.callbacks._strategy import check_strategy, decide_on_rank_zero, is_sharded_strategy, log_shared
from lightning_worm.callbacks._tracking import (
    TrackerSpec,
    check_tracker_spec,
    end_every_search,
    find_tracker,
    tracker_key,
)
from lightning_worm.callbacks.early_bird import EarlyBirdCallback
from lightning_worm.checkpoint import (
    CHECKPOINT_KEY,
    PLAN_OWNER,
    _raise_for_unloadable_checkpoint,
    find_pruning_plan,
    read_checkpoint_metadata,
)
from lightning_worm.core.inputs import ExampleInput, as_inputs, first_input, inputs_to
from lightning_worm.core.masks import Mask, unit_scores
from lightning_worm.core.measure import eval_mode
from lightning_worm.core.readiness import score_share
from lightning_worm.core.serialization import strict_json
from lightning_worm.core.surgery import (
    DEFAULT_COUPLING,
    PruningError,
    PruningPlan,
    Surgery,
    apply_plan,
    carry_optimizer_state,
    check_prunable,
    surgery_for,
    trial_prune,
)
from lightning_worm.core.surgery.decision import COUPLINGS
from lightning_worm.core.surgery.sharded import unsharded
from lightning_worm.core.validation import check_bool, check_callable, check_choice, check_int

__all__ = ["TICKETS", "WAIT_FOR", "PruneAndFinetune"]

TICKETS = ("early_bird", "random")
WAIT_FOR = ("ready", "ticket")


class PruneAndFinetune(Callback):
    r"""Physically prune the Early-Bird ticket once it is ready, then keep training the small network.

    By default (``wait_for="ready"``) the prune waits, after the ticket has emerged, until the tracker says it
    is :attr:`~lightning_worm.EarlyBirdCallback.ready` (its pruned units hold little of the score mass: pruning
    them costs little), at most ``max_wait`` epochs; at the cap it prunes with a warning that says what to
    change. ``wait_for="ticket"`` is the paper's plain rule: prune at the end of the epoch in which the ticket
    emerges.

    At the end of the epoch chosen, the ticket's pruned units leave
    the LightningModule in place (for BatchNorm channels: each channel with the convolution or linear
    output feeding it and the matching inputs of every consumer, through residual sums, concatenations
    and grouped convolutions, by torch-pruning's dependency graph). Training continues in the same
    ``fit``: the optimizers and LR schedulers are rebuilt through ``configure_optimizers``, the schedule
    continues from the epoch reached, and the optimizer state of the kept units (momentum, Adam moments)
    is carried over by slicing. BatchNorm running statistics are then re-estimated on
    ``recalibrate_batches`` training batches. Under DDP every rank prunes identically and the model is
    wrapped again. The search is then over: every tracker takes no more masks and a
    :class:`~lightning_worm.WormCallback` truncates nothing.

    Every checkpoint written after the prune holds the pruning plan (``save_weights_only`` ones too):
    ``trainer.fit(fresh_module, ckpt_path=...)`` with the same callbacks re-applies it before the pruned
    weights load, and :func:`~lightning_worm.load_pruned` rebuilds the pruned module for inference.

    A report (parameters, FLOPs, units per layer, ticket units honoured, latency, the ``evaluate``
    results before / right after the surgery / after the re-calibration, the ticket's ``score_share`` and
    the epochs waited for it, and a ``note`` where the numbers need one: an element-wise ticket saves no time,
    a ticket no better than its scores' noise) is printed on rank zero, logged under ``pruning/``, kept as
    :attr:`report` and written as ``pruning_report.json`` into ``report_dir`` (by default the logger's
    directory; without a logger no file is written). Its ``savings`` (the training FLOPs and wall time spent
    so far against a dense run's estimate for the same epochs, from the examples trained on and the dense
    epochs' mean time) are brought up to date at every epoch end and written again when the fit ends. A
    report that cannot be written is a warning, never a failed run.

    Args:
        early_bird: the tracker whose ticket is pruned, its ``prune_ratio``, or ``None``: the only tracker in
            the trainer.
        example_input: a model input used to trace the data flow (a tensor or a tuple of tensors); by
            default the first element of the first training batch, else the module's ``example_input_array``.
        coupling: how channels shared by several scored layers (a residual sum, grouped convolutions) are
            decided: ``"vote"`` (default) prunes as many as the ticket does on average, those most of whose
            layers the ticket prunes first (then by mean score); ``"mean_rank"`` the same count ranked by
            mean score; ``"all"`` only channels the ticket prunes in every coupled layer (removes far less
            on ResNets and MobileNets). See ``prune_channels``.
        round_to: keep every coupled group's channel count a multiple of this (faster kernels), by keeping
            the next-best channels; ``None`` honours the ticket exactly.
        finetune_epochs: end the fit this many epochs after the prune (the fit's ``max_epochs`` is set to
            that epoch, so it may end before or after the Trainer's own ``max_epochs``: the prune's epoch is
            not known in advance); ``None`` trains to ``max_epochs``.
            On resume the current value is used.
        restart_schedule: start the LR schedule afresh instead of continuing it.
        reset_optimizer_state: start the optimizer state (momentum, moments) from zero instead of
            carrying the kept units' state over.
        reinit: re-initialise the pruned network's weights (the Early-Bird paper's "re-init" variant); the
            optimizer state then starts from zero.
        measure_latency: time inference before and after on the example input (rank zero only).
        recalibrate_batches: training batches on which BatchNorm running statistics are re-estimated right
            after the surgery (0: off; the default 10 lifts the accuracy right after the prune, see the
            benchmarks).
        recalibrate_forward: ``fn(pl_module, batch)`` runs the model on one training batch for the
            recalibration; by default the batch itself or its first item (a tensor), else a warning.
        evaluate: ``fn(pl_module) -> float``, called before the prune, right after the surgery and after the
            recalibration (on every rank, in eval mode, without gradients); the results go in the report.
        ticket: ``"early_bird"`` prunes the tracker's ticket; ``"random"`` prunes a random ticket with the
            same number of kept units in every entry (a control for benchmarks), drawn with ``seed``.
        seed: the seed of the ``"random"`` ticket.
        report_dir: the folder of ``pruning_report.json``; ``None``: the logger's ``log_dir`` (no file
            without a logger).
        wait_for: ``"ready"`` (default) waits for the tracker's readiness after the ticket has emerged;
            ``"ticket"`` prunes as soon as it emerges (the Early-Bird paper's rule).
        max_wait: epochs after the ticket's epoch that ``wait_for="ready"`` waits at most; the ticket is then
            pruned as it is, with a warning.
        trial: at the end of the first training batch, try the surgery on the model with a random ticket at
            the tracker's ratio, checked and then undone (:func:`~lightning_worm.core.surgery.trial_prune`), so
            that a model the surgery cannot prune is refused before the search, not at the ticket; it warns when
            the surgery would remove far less than the ratio. It costs about one prune (seconds on small models).

    Raises:
        ValueError: on a bad argument (named in the message); at setup if the tracker is not in the
            trainer, its source's surgery cannot remove units from this model
            (:func:`~lightning_worm.core.surgery.check_prunable`: a source without surgery, LayerNorm
            channels, heads of ``nn.MultiheadAttention``), ``coupling`` or ``round_to`` is set but the
            surgery does not take it (heads take no ``coupling``), the strategy shards
            parameters (FSDP, DeepSpeed) or launches by spawn/fork (``ddp_spawn``, ``ddp_fork``,
            ``ddp_notebook``: use ``ddp``).
        PruningError: at the end of the first training batch, if the trial prune fails (the message names the
            module and the reason; the model is unchanged); at the ticket, if the prune fails (the model is then
            unchanged too: every prune is all or nothing).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5)
        trainer = Trainer(max_epochs=160,
                          callbacks=[early_bird, WormCallback(), PruneAndFinetune(recalibrate_batches=10)])
        trainer.fit(model, datamodule)  # search, prune at the ticket, fine-tune to the end
    """

    #: Marks callbacks that rebuild a pruned module from a checkpoint's plan (see EarlyBirdCallback).
    applies_pruning_plans = True

    def __init__(
        self,
        early_bird: TrackerSpec = None,
        example_input: Tensor | tuple[Tensor, ...] | None = None,
        coupling: Literal["vote", "mean_rank", "all"] = DEFAULT_COUPLING,
        round_to: int | None = None,
        finetune_epochs: int | None = None,
        restart_schedule: bool = False,
        reset_optimizer_state: bool = False,
        reinit: bool = False,
        measure_latency: bool = True,
        recalibrate_batches: int = 10,
        evaluate: Callable[[pl.LightningModule], float] | None = None,
        recalibrate_forward: Callable[[pl.LightningModule, Any], Any] | None = None,
        ticket: Literal["early_bird", "random"] = "early_bird",
        seed: int = 0,
        report_dir: str | None = None,
        wait_for: Literal["ready", "ticket"] = "ready",
        max_wait: int = 10,
        trial: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_tracker_spec(early_bird, name)
        if example_input is not None:
            as_inputs(example_input)  # refused now if it is not a tensor or a sequence of tensors
        self.coupling = check_choice("coupling", coupling, COUPLINGS)
        self.round_to = check_int("round_to", round_to, minimum=1, allow_none=True)
        self.finetune_epochs = check_int("finetune_epochs", finetune_epochs, minimum=0, allow_none=True)
        self.restart_schedule = check_bool("restart_schedule", restart_schedule)
        self.reset_optimizer_state = check_bool("reset_optimizer_state", reset_optimizer_state)
        self.reinit = check_bool("reinit", reinit)
        self.measure_latency = check_bool("measure_latency", measure_latency)
        self.recalibrate_batches = check_int("recalibrate_batches", recalibrate_batches, minimum=0)
        check_callable("recalibrate_forward", recalibrate_forward, "fn(pl_module, batch)")
        check_callable("evaluate", evaluate, "fn(pl_module) -> float")
        self.ticket = check_choice("ticket", ticket, TICKETS)
        self.seed = check_int("seed", seed)
        self.wait_for = check_choice("wait_for", wait_for, WAIT_FOR)
        self.max_wait = check_int("max_wait", max_wait, minimum=0)
        self.trial = check_bool("trial", trial)
        if report_dir is not None and (not isinstance(report_dir, (str, os.PathLike)) or not os.fspath(report_dir)):
            raise ValueError(f"`report_dir` must be None or a folder path, got {report_dir!r}.")
        self._spec = early_bird
        self.early_bird: EarlyBirdCallback | None = early_bird if isinstance(early_bird, EarlyBirdCallback) else None
        # Or, from the first batch on, the module's `example_input_array` (Lightning allows a dict too).
        self.example_input: Tensor | tuple[Any, ...] | dict[Any, Any] | None = example_input
        self.evaluate = evaluate
        self.recalibrate_forward = recalibrate_forward
        self.report_dir = None if report_dir is None else os.fspath(report_dir)
        self.report: dict[str, Any] | None = None
        self.report_path: str | None = None
        self.plan: PruningPlan | None = None
        self.pruned_epoch: int | None = None
        self.stop_epoch: int | None = None
        self._surgery: Surgery | None = None
        #: Whether the prune came at ``max_wait`` with a ticket that was not ready.
        self.forced = False
        #: What the trial prune on the first training batch found (``removed_fraction``, ratios), or ``None``.
        self.trial_report: dict[str, Any] | None = None
        self._meter = _SavingsMeter()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(early_bird=tracker_key(self._spec, self.early_bird))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        hooks = checkpoint_hooks(pl_module)
        # The hooks live on the module and outlast this fit: they read the trainer the module is in when they
        # run, and the plan is the module's (any later checkpoint of the pruned module describes it).
        hooks.on_load[type(self).__name__] = partial(self._apply_checkpoint_plan, pl_module)
        hooks.on_save["pruning_plan"] = partial(_save_module_plan, hooks)
        adopted = False
        if hooks.plan is not None and self.plan is None:  # fitted (or evaluated) again after an earlier prune
            self.plan = PruningPlan.from_dict(hooks.plan)
            adopted = True
        if stage != "fit":
            return
        name = type(self).__name__
        check_strategy(trainer, name)
        if is_sharded_strategy(trainer):  # the strategy loads a checkpoint's weights before any hook sees it
            before_checkpoint_load(trainer.strategy, name, partial(self._prune_sharded_before_load, trainer, pl_module))
        self.early_bird = find_tracker(trainer, self._spec, name)
        if sum(isinstance(c, PruneAndFinetune) for c in trainer_callbacks(trainer)) > 1:
            raise ValueError("One model can be pruned by one PruneAndFinetune: keep one in the Trainer's callbacks.")
        method = launcher_start_method(trainer)
        if method is not None:
            raise ValueError(
                f"PruneAndFinetune does not support the {method!r} launcher: it copies the trained weights back "
                "into the main process's unpruned module. Use `strategy='ddp'` (one process per device, started "
                "as scripts), which supports pruning mid-fit."
            )
        if not adopted:  # refused now, not at the ticket after a whole search
            self._surgery = check_prunable(pl_module, self.early_bird.source)
            self._check_options(self._surgery)
        else:
            rank_zero_info(f"{name}: {type(pl_module).__name__} was pruned in an earlier fit; it is fine-tuned as it "
                           "is (no second search, no second prune).")
            end_every_search(trainer)

    def _check_options(self, surgery: Surgery) -> None:
        """Refuse an option set away from its default that the source's surgery does not take."""
        given = {"coupling": self.coupling != DEFAULT_COUPLING, "round_to": self.round_to is not None}
        assert self.early_bird is not None, "checked at setup, once the tracker is found"
        source = self.early_bird.source
        taken = surgery.options_for(source)
        unused = [f"{key}={getattr(self, key)!r}" for key, is_set in given.items() if is_set and key not in taken]
        if unused:
            raise ValueError(
                f"PruneAndFinetune({', '.join(unused)}) does not apply to {type(source).__name__}: its surgery "
                f"({surgery.kind!r}) takes {list(taken)}. Leave the option at its default."
            )

    def _record_plan(self, pl_module: pl.LightningModule, plan: PruningPlan) -> None:
        """The plan now applied to ``pl_module``: this callback's, and the module's (its later checkpoints')."""
        self.plan = plan
        checkpoint_hooks(pl_module).plan = plan.to_dict()

    def _apply_checkpoint_plan(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        trainer = attached_trainer(pl_module)
        if trainer is None or not any(c is self for c in trainer_callbacks(trainer)):
            return  # an earlier fit's callback: the callbacks of the module's current Trainer decide
        self._adopt_plan(trainer, pl_module, checkpoint)

    def _prune_sharded_before_load(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Any) -> None:
        """Under FSDP2, give the sharded module the checkpoint's pruned shapes before the strategy loads it, and
        rebuild the optimizers on the pruned parameters (the checkpoint's optimizer state then loads into them)."""
        if path is not None and self._adopt_plan(trainer, pl_module, read_checkpoint_metadata(path)) \
                and trainer.optimizers:
            trainer.strategy.setup_optimizers(trainer)
            optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)

    def _adopt_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> bool:
        """Prune ``pl_module`` by the checkpoint's plan (sharded or not) unless it is pruned already; whether it was."""
        plan = find_pruning_plan(checkpoint)
        if plan is None or self.plan is not None:
            return False
        with unsharded(pl_module):
            apply_plan(pl_module, plan)
        self._record_plan(pl_module, plan)
        end_every_search(trainer)  # a weights-only checkpoint has no tracker state to say so
        return True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _raise_for_unloadable_checkpoint(trainer, exception)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop_epoch is not None:  # resumed after the prune: the fine-tuning still ends where it should
            trainer.fit_loop.max_epochs = self.stop_epoch

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.example_input is None and self.plan is None:
            self.example_input = first_input(batch, limit=2)
            if self.example_input is None:
                self.example_input = pl_module.example_input_array
            if self.example_input is None:
                raise ValueError(
                    f"PruneAndFinetune cannot tell the model input in a batch of type {type(batch).__name__}: pass "
                    "`example_input=` (a tensor shaped like one input batch) or set `example_input_array` on your "
                    "LightningModule."
                )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.early_bird is None or trainer.sanity_checking:
            return
        self.early_bird.observe_epoch(trainer, pl_module)  # whatever the callbacks' order
        self._meter.end_epoch(dense=self.plan is None)
        if self._ticket_waiting() and self._prune_now(trainer):
            start = time.perf_counter()
            self.prune(trainer, pl_module)
            self._meter.prune_seconds = time.perf_counter() - start
        if self.report is not None and self.plan is not None:
            self._update_savings(trainer, pl_module)

    def _prune_now(self, trainer: pl.Trainer) -> bool:
        tracker = self.early_bird
        assert tracker is not None and tracker.ticket_epoch is not None, "a ticket is waiting"
        if self.wait_for == "ticket" or tracker.ready:
            return True
        waited = trainer.current_epoch - tracker.ticket_epoch
        if waited < self.max_wait:
            return False
        share = tracker.ticket_share
        held = f"{share.ratio:.2f}x" if share is not None else "an unknown share of"
        rank_zero_warn(
            f"PruneAndFinetune: pruning the ticket of epoch {tracker.ticket_epoch} after {waited} epochs of waiting "
            f"(`max_wait={self.max_wait}`) although it is not ready: its pruned units hold {held} the score mass "
            f"of a random ticket of the same widths (ready at <= {tracker.ready_ratio:g}). Expect a larger "
            "accuracy drop at the prune. To get a ready ticket: keep `sparsity='auto'` (or raise an explicit "
            "`sparsity`), lower `prune_ratio`, or raise `max_wait`; `wait_for='ticket'` prunes without waiting."
        )
        self.forced = True
        return True

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._meter.start_epoch()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        inputs = first_input(batch)
        if inputs is not None and inputs.ndim:
            self._meter.add_examples(inputs.shape[0] * trainer.world_size, dense=self.plan is None)
        if self.trial and self.trial_report is None and self._surgery is not None and self.plan is None:
            self._try_surgery(trainer, pl_module)  # after the first batch: lazy layers are materialised

    def _try_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before the search, a model the surgery cannot prune (every rank, rank zero's outcome)."""
        tracker = self.early_bird
        assert tracker is not None and self._surgery is not None, "found at setup"
        error: Exception | None = None
        try:
            with unsharded(pl_module, undo=True):  # under FSDP2: tried on the whole model, then sharded as it was
                report = trial_prune(pl_module, self._example(pl_module), source=tracker.source,
                                     ratio=tracker.prune_ratio, min_units=tracker.min_units,
                                     **self._options(self._surgery))
        except (PruningError, ValueError) as failure:
            error = failure
        message = decide_on_rank_zero(trainer, None if error is None else str(error))
        if message is not None:
            raise PruningError(
                f"PruneAndFinetune refuses to start the search: the model's units cannot be removed. {message}"
            ) from error
        self.trial_report = {"prune_ratio": tracker.prune_ratio, "removed_fraction": report.removed_fraction,
                             "params_ratio": report.params_after / report.params_before,
                             "flops_ratio": _ratio(report.flops_after, report.flops_before)}
        if report.shortfall is not None:
            rank_zero_warn(f"PruneAndFinetune (a trial prune at ratio {tracker.prune_ratio:g}, undone): "
                           f"{report.shortfall}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = self.early_bird
        if self.report is not None:
            self._update_savings(trainer, pl_module, log=False)
            if trainer.is_global_zero:
                self._write_report(self.report_path)
        elif tracker is not None and tracker.ticket is not None and tracker.searching:
            rank_zero_warn(
                f"PruneAndFinetune: the fit ended while the ticket of epoch {tracker.ticket_epoch} was waiting to be "
                "ready: nothing was pruned. Train longer, lower `max_wait`, or use `wait_for='ticket'`."
            )

    def _update_savings(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool = True) -> None:
        r = self.report
        assert r is not None, "after the prune"
        savings = self._meter.savings(r["flops_before"], r["flops_after"])
        if savings is None:
            return
        r["savings"] = savings
        if log:
            log_shared(pl_module, "pruning/train_flops_ratio", savings["flops_ratio"])
            if savings["time_ratio"] is not None:
                log_shared(pl_module, "pruning/time_ratio", savings["time_ratio"])

    def _ticket_waiting(self) -> bool:
        tracker = self.early_bird
        return self.plan is None and tracker is not None and tracker.searching and tracker.ticket is not None

    def _example(self, pl_module: pl.LightningModule) -> tuple[Tensor, ...]:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            raise ValueError(
                "PruneAndFinetune has no example input to trace the model: pass `example_input=` (or set "
                "`example_input_array` on your LightningModule)."
            )
        return inputs_to(cast(ExampleInput, example), pl_module.device)  # which refuses a dict

    def _options(self, surgery: Surgery) -> dict[str, Any]:
        options = {"coupling": self.coupling, "round_to": self.round_to}
        return {key: value for key, value in options.items() if key in surgery.options}

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune the ticket now, rebuild the optimizers, end the search. Every rank calls it together."""
        example = self._example(pl_module)
        tracker = self.early_bird
        assert tracker is not None, "prune() follows the tracker found at setup"
        ticket = tracker.ticket
        assert ticket is not None, "prune() runs once the tracker has found its ticket"
        if self.ticket == "random":
            from lightning_worm.core.recalibration import random_ticket

            ticket = Mask.from_dict(random_ticket(ticket, torch.Generator().manual_seed(self.seed)))
        share = score_share(unit_scores(pl_module, tracker.source), ticket,
                            [names for _, names in tracker.source.parts(pl_module)])
        evaluation = {"before": self._evaluate(pl_module)}
        old_optimizers = list(trainer.strategy.optimizers)
        old_schedulers = [cfg.scheduler for cfg in trainer.strategy.lr_scheduler_configs]
        params_before = dict(pl_module.named_parameters())
        surgery = self._surgery or surgery_for(tracker.source)
        options = self._options(surgery)
        if "measure_latency" in surgery.options:
            options["measure_latency"] = self.measure_latency and trainer.is_global_zero
        with unsharded(pl_module):  # under FSDP2: pruned whole on every rank, then sharded again the same way
            names = {id(p): n for n, p in pl_module.named_parameters()}
            report = surgery.prune(pl_module, ticket, example, source=tracker.source, **options)
            # A parameter the surgery keeps under a new name (an element-wise ticket's `weight_orig`) is found by
            # its old name: under FSDP2 it is a new object once sharded again.
            renamed = {names[id(p)]: n for n, p in pl_module.named_parameters() if names.get(id(p), n) != n}
            self._record_plan(pl_module, report.plan)
            self.pruned_epoch = trainer.current_epoch
            if self.reinit:
                _reinitialise(pl_module)
            evaluation["after_surgery"] = self._evaluate(pl_module)
            used = self._recalibrate(trainer, pl_module)
        self._meter.add_recalibration(used)
        if used:
            evaluation["after_recalibration"] = self._evaluate(pl_module)

        rewrap_ddp(trainer)
        trainer.strategy.setup_optimizers(trainer)
        optimizers_to_device(trainer.strategy.optimizers, trainer.strategy.root_device)
        params_after = dict(pl_module.named_parameters())
        params_after.update({old: params_after[new] for old, new in renamed.items()})
        for what, before, after in (("optimizers", old_optimizers, trainer.strategy.optimizers),
                                    ("LR schedulers", old_schedulers, trainer.strategy.lr_scheduler_configs)):
            if len(after) != len(before):
                raise RuntimeError(
                    f"`configure_optimizers` returned {len(after)} {what} after pruning but {len(before)} before: it "
                    f"must build the same {what} from `self.parameters()` every time."
                )
        for old, new in zip(old_optimizers, trainer.strategy.optimizers, strict=True):
            carry_optimizer_state(old, new, params_before, params_after, report.kept_indices,
                                  hyperparameters=not self.restart_schedule,  # the schedule's current lr goes on
                                  state=not (self.reset_optimizer_state or self.reinit))
        if not self.restart_schedule:
            for old_scheduler, cfg in zip(old_schedulers, trainer.strategy.lr_scheduler_configs, strict=True):
                cfg.scheduler.load_state_dict(old_scheduler.state_dict())
        if self.finetune_epochs is not None:
            self.stop_epoch = self.pruned_epoch + 1 + self.finetune_epochs
            trainer.fit_loop.max_epochs = self.stop_epoch

        end_every_search(trainer)
        ticket_epoch = tracker.ticket_epoch
        self.report = {"epoch": self.pruned_epoch, "ticket_epoch": ticket_epoch,
                       "prune_ratio": tracker.prune_ratio, "ticket": self.ticket, "source": tracker.source.key,
                       "recalibration_batches": used, "wait_for": self.wait_for,
                       "waited_epochs": None if ticket_epoch is None else self.pruned_epoch - ticket_epoch,
                       "ready": tracker.ready, "forced": self.forced, "score_share": share.to_dict(),
                       "trial": self.trial_report,
                       **report.to_dict()}
        if self.evaluate is not None:
            self.report["evaluation"] = evaluation
        if share.looks_like_noise:
            noise = (f"The ticket's pruned units held {100 * share.pruned:.0f} % of the scores, a random ticket of the "
                     f"same widths {100 * share.random:.0f} %: it looked no better than its scores' noise (train with "
                     "the sparsity term, `sparsity='auto'`, and wait for readiness, `wait_for='ready'`).")
            self.report["note"] = f"{self.report['note']} {noise}" if self.report.get("note") else noise
        self.report.pop("plan", None)
        self._publish(trainer, pl_module)

    def _evaluate(self, pl_module: pl.LightningModule) -> float | None:
        if self.evaluate is None:
            return None
        with eval_mode(pl_module), torch.no_grad():
            value = self.evaluate(pl_module)
        return float(value) if isinstance(value, (int, float, Tensor)) else value

    def _recalibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if not self.recalibrate_batches:
            return 0
        from lightning_worm.core.recalibration import has_running_statistics, recalibrate_batchnorm

        loader = trainer.train_dataloader
        if loader is None or not has_running_statistics(pl_module):  # no BatchNorm: nothing to re-estimate
            return 0
        precision = trainer.precision_plugin

        def forward(model: Any, batch: Any) -> Any:
            if self.recalibrate_forward is not None:
                return self.recalibrate_forward(model, batch)
            inputs = first_input(batch)
            if inputs is None:
                raise _NoInput(f"the model input cannot be told in a batch of type {type(batch).__name__}.")
            return model(precision.convert_input(inputs.to(pl_module.device)))

        # Drawing batches from a shuffled loader (and dropout) consumes random numbers: fork the generators so
        # that the training after the prune is the same with and without the recalibration.
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), precision.forward_context():
                used = recalibrate_batchnorm(pl_module, loader, max_batches=self.recalibrate_batches, forward=forward)
        except _NoInput as missing:
            rank_zero_warn(
                f"PruneAndFinetune: BatchNorm statistics not re-estimated: {missing} Pass `recalibrate_forward="
                "lambda module, batch: module(batch[...])`, or `recalibrate_batches=0` to turn it off."
            )
            return 0
        if trainer.world_size > 1:  # every rank keeps rank 0's statistics
            buffers = {n: b.cpu() for n, b in pl_module.named_buffers()}
            for name, value in decide_on_rank_zero(trainer, buffers).items():
                pl_module.get_buffer(name).copy_(value)
        return used

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        r = self.report
        assert r is not None, "published right after prune() has made the report"
        log_shared(pl_module, "pruning/params_ratio", r["params_after"] / r["params_before"])
        flops_ratio = _ratio(r["flops_after"], r["flops_before"])
        if flops_ratio is not None:
            log_shared(pl_module, "pruning/flops_ratio", flops_ratio)
        # log_dir is a collective under DDP: every rank asks. Without a logger it would be the working directory.
        directory = self.report_dir or (trainer.log_dir if trainer.loggers else None)
        if not trainer.is_global_zero:
            return
        self.report_path = None
        if directory is None:
            where = "kept in `PruneAndFinetune.report` and in checkpoints (no logger, no `report_dir`: no file)"
        else:
            self.report_path = self._write_report(os.path.join(directory, "pruning_report.json"))
            where = self.report_path or "not written"
        share = r["score_share"]
        waited = f" after waiting {r['waited_epochs']} epoch(s)" if r.get("waited_epochs") else ""
        latency = ""
        if r.get("latency_before_ms") is not None:
            latency = f", latency {r['latency_before_ms']:.2f} -> {r['latency_after_ms']:.2f} ms"
        note = f" {r['note']}" if r.get("note") else ""
        rank_zero_info(
            f"PruneAndFinetune: pruned the ticket of epoch {r['ticket_epoch']} at the end of epoch {r['epoch']}: "
            f"parameters {r['params_before']:,} -> {r['params_after']:,}, "
            f"FLOPs {_count(r['flops_before'])} -> {_count(r['flops_after'])}{latency}{waited}, "
            f"{100 * r['removed_fraction']:.1f} % of the units removed; its pruned units held "
            f"{100 * share['pruned']:.1f} % of the scores (a random ticket of the same widths: "
            f"{100 * share['random']:.1f} %).{note} Report: {where}"
        )

    def _write_report(self, path: str | None) -> str | None:
        """Write the report as JSON into ``path`` (rank zero); the path, or ``None`` with a warning."""
        if path is None:
            return None
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                json.dump(strict_json(self.report), f, indent=2, allow_nan=False)
        except (OSError, ValueError) as error:
            rank_zero_warn(f"PruneAndFinetune: could not write the pruning report into {os.path.dirname(path)!r} "
                           f"({error}); the fit goes on, the report is in `PruneAndFinetune.report` and in "
                           "checkpoints.")
            return None
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "owner": PLAN_OWNER,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "report": self.report,
            "pruned_epoch": self.pruned_epoch,
            "stop_epoch": self.stop_epoch,
            "finetune_epochs": self.finetune_epochs,
            "forced": self.forced,
            "trial": self.trial_report,
            "savings_meter": self._meter.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.report = state_dict["report"]
        self.pruned_epoch = state_dict["pruned_epoch"]
        self.stop_epoch = state_dict["stop_epoch"]
        self.forced = state_dict.get("forced", False)
        self.trial_report = state_dict.get("trial")
        if state_dict.get("savings_meter") is not None:
            self._meter.load_state_dict(state_dict["savings_meter"])
        if state_dict["plan"] is not None and self.plan is None:
            raise RuntimeError(
                "The checkpoint holds a pruned model, but its plan was not applied before the weights loaded. "
                "Resume through `trainer.fit(module, ckpt_path=...)` with this PruneAndFinetune in the callbacks."
            )
        if self.pruned_epoch is not None:  # the current `finetune_epochs` decides where the fit ends
            stop = None if self.finetune_epochs is None else self.pruned_epoch + 1 + self.finetune_epochs
            if stop != self.stop_epoch:
                rank_zero_info(
                    f"PruneAndFinetune: `finetune_epochs` is {self.finetune_epochs} now "
                    f"({state_dict.get('finetune_epochs', 'not recorded')} in the checkpoint): the fit ends "
                    + (f"after epoch {stop - 1}." if stop is not None else "at `max_epochs`.")
                )
            self.stop_epoch = stop


def _ratio(after: float | None, before: float | None) -> float | None:
    return None if after is None or not before else after / before


def _count(value: int | None) -> str:
    return "not measured" if value is None else f"{value:,}"


def _save_module_plan(hooks: Any, checkpoint: dict[str, Any]) -> None:
    """Write the module's pruning plan into the module's part of the checkpoint (weights-only ones too)."""
    if hooks.plan is not None:
        checkpoint.setdefault(CHECKPOINT_KEY, {})["pruning_plan"] = hooks.plan


class _SavingsMeter:
    """What the run has spent so far: examples trained on by the dense and the pruned network, epoch times."""

    def __init__(self) -> None:
        self.examples = {"dense": 0, "pruned": 0}
        self.recalibration_examples = 0
        self.batches = 0
        self.seconds = {"dense": 0.0, "pruned": 0.0}
        self.epochs = {"dense": 0, "pruned": 0}
        self.prune_seconds = 0.0
        self._started: float | None = None

    def start_epoch(self) -> None:
        self._started = time.perf_counter()

    def add_examples(self, count: int, dense: bool) -> None:
        self.examples["dense" if dense else "pruned"] += int(count)
        self.batches += 1

    def add_recalibration(self, batches: int) -> None:
        """Forward passes of the re-calibration, counted at the mean training batch size seen so far."""
        if self.batches:
            seen = self.examples["dense"] + self.examples["pruned"]
            self.recalibration_examples += round(batches * seen / self.batches)

    def end_epoch(self, dense: bool) -> None:
        if self._started is None:
            return
        phase = "dense" if dense else "pruned"
        self.seconds[phase] += time.perf_counter() - self._started
        self.epochs[phase] += 1
        self._started = None

    def savings(self, flops_dense: float, flops_pruned: float) -> dict[str, Any] | None:
        """Training FLOPs (3 x forward per example) and wall time against a dense run's estimate, or ``None``."""
        seen = self.examples["dense"] + self.examples["pruned"]
        if not seen or not flops_dense:
            return None
        spent = 3 * (self.examples["dense"] * flops_dense + self.examples["pruned"] * flops_pruned)
        spent += self.recalibration_examples * flops_pruned
        dense_flops = 3 * seen * flops_dense
        epochs = self.epochs["dense"] + self.epochs["pruned"]
        wall = self.seconds["dense"] + self.seconds["pruned"] + self.prune_seconds
        dense_wall = self.seconds["dense"] / self.epochs["dense"] * epochs if self.epochs["dense"] else None
        return {"epochs": epochs, "train_flops": spent, "dense_train_flops": dense_flops,
                "flops_ratio": spent / dense_flops, "wall_s": wall, "dense_wall_s": dense_wall,
                "time_ratio": None if not dense_wall else wall / dense_wall}

    def state_dict(self) -> dict[str, Any]:
        return {"examples": dict(self.examples), "recalibration_examples": self.recalibration_examples,
                "batches": self.batches,
                "seconds": dict(self.seconds), "epochs": dict(self.epochs), "prune_seconds": self.prune_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples = dict(state["examples"])
        self.recalibration_examples = int(state["recalibration_examples"])
        self.batches = int(state.get("batches", 0))
        self.seconds = dict(state["seconds"])
        self.epochs = dict(state["epochs"])
        self.prune_seconds = float(state["prune_seconds"])


class _NoInput(ValueError):
    """The model input cannot be found in a batch."""


@torch.no_grad()
def _reinitialise(module: torch.nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if m is not module and reset is not None:
            reset()
