"""EarlyBirdCallback: find the Early-Bird ticket while the model trains."""

from __future__ import annotations

import ast
import math
import weakref
from collections import deque
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_worm._deprecation import RenamedAttribute, warn_renamed
from lightning_worm._internals.lightning import attached_trainer, checkpoint_hooks, trainer_callbacks
from lightning_worm.callbacks._strategy import check_strategy, decide_on_rank_zero, is_sharded_strategy, log_shared
from lightning_worm.checkpoint import _raise_for_unloadable_checkpoint, find_pruning_plan
from lightning_worm.core.detector import TicketDetector
from lightning_worm.core.masks import Mask, NonFiniteScoreError, rank_units, unit_scores
from lightning_worm.core.readiness import ScoreShare, score_share
from lightning_worm.core.regularization import GrowingDecay, MaskedDecay, RelativeSparsity, add_sparsity_gradient
from lightning_worm.core.sources import SourceList, SourceSpec, resolve_source
from lightning_worm.core.truncation import GradientTruncation
from lightning_worm.core.validation import check_bool, check_choice, check_int, check_number

__all__ = ["AUTO", "FIRST_MASKS", "EarlyBirdCallback"]

FIRST_MASKS = ("epoch_end", "train_start")
#: ``sparsity=AUTO``: the strength sets itself from the run
#: (:class:`~lightning_worm.core.regularization.RelativeSparsity`).
AUTO: Literal["auto"] = "auto"


class EarlyBirdCallback(Callback):
    r"""Search for the Early-Bird ticket (You et al., ICLR 2020) during ``fit``.

    At the end of every training epoch (or every ``every_n_epochs``) the callback takes a global mask:
    over all ``N`` units the ``source`` scores (by default the BatchNorm channels, by ``|gamma|``), the
    ``round(prune_ratio * N)`` with the smallest score are pruned (ties by entry order, then index). The
    mask distance of two epochs is the fraction of units on which their masks differ. Once ``window``
    masks are held, the epoch's distance is the largest distance between the newest mask and each older
    one; the ticket emerges at the first epoch where it is at most ``threshold``. The search goes on
    (masks keep being taken for WORM and the plots) until a :class:`~lightning_worm.PruneAndFinetune`
    prunes the model; the histories then stop at the ticket.

    Every mask also says how cheap it is to prune: the share of the score mass its pruned units hold, against a
    random mask of the same widths (:func:`~lightning_worm.core.readiness.score_share`; the ratio is 1 for a mask
    no better than noise, 0 when the pruned units hold nothing). Once the ticket has emerged, the ticket is
    :attr:`ready` when its pruned units' ratio on the epoch's scores is at most ``ready_ratio``;
    :class:`~lightning_worm.PruneAndFinetune` waits for that by default.

    The default ``sparsity="auto"`` is network slimming's L1 term at a strength set from the run
    (:class:`~lightning_worm.core.regularization.RelativeSparsity`): the first epoch measures the mean
    loss-gradient magnitude of the scored parameters (for BatchNorm, the gammas) and trains without the term; the
    strength then starts at that magnitude and is steered, once per epoch, by how fast the newest mask's score
    share falls (1 to 4 times the measure), and lowered while polarised masks still move. What decides which units
    the term drives to zero is its strength against the loss gradient, so one setting carries over between data
    sets, batch sizes and models where a fixed number does not (the Early-Bird code's ``1e-4`` was set for CIFAR-10
    at 391 steps per epoch). While a ticket waits to be ready, its pruned units' parameters (those WORM truncates)
    are also pulled to zero by a growing L2 term (:class:`~lightning_worm.core.regularization.GrowingDecay`). A
    number keeps its exact meaning: network slimming's per-step L1 strength (``1e-4`` is the Early-Bird code's;
    ``0`` turns the term off), and no pull. The measurements behind the default are in ``docs/benchmarks.md``
    and the settings guide.

    Logs ``earlybird/mask_distance``, ``earlybird/mean_distance`` (both once the window is full),
    ``earlybird/ticket_found``, ``earlybird/share_ratio`` (the newest mask's), ``earlybird/ready`` (once the
    ticket has emerged: its ratio is at most ``ready_ratio``) and, with ``sparsity="auto"``,
    ``earlybird/sparsity`` (the per-step strength) and ``earlybird/pull_decay`` (the pull's decay per epoch
    while the ticket waits, 0 once ready) (``earlybird_<ratio>/...`` when several trackers run).

    Args:
        prune_ratio: fraction of units the mask prunes, in (0, 1).
        window: number of recent masks compared, at least 2.
        threshold: the ticket emerges once the distance is at most this, in [0, 1].
        sparsity: network-slimming L1 term: ``sparsity * sign(score parameter)`` is added to the source's
            sparsity parameters' (unscaled) gradient once per optimizer step while the search runs. 0: off.
            ``"auto"`` (default): the strength is measured from the run's first epoch (see above).
        ready_ratio: the ticket is ready once its pruned units hold at most this fraction of the score mass a
            random ticket of the same widths would hold, in [0, 1] (1: ready as soon as it emerges).
        min_units: units every entry keeps at least.
        min_channels: deprecated name of ``min_units`` (removed in 0.3).
        every_n_epochs: take a mask every this many epochs (epochs in between record NaN).
        stop_on_ticket: stop the fit at the end of the epoch in which the ticket emerges.
        source: what is scored: a :class:`~lightning_worm.ScoreSource` or the name of one (``"batchnorm"``,
            the default, and the names in ``lightning_worm.core.SOURCES``), or a list of those: several sources in
            one search (:class:`~lightning_worm.core.sources.SourceList`), each ranked with its own ``prune_ratio``
            (else this one) and ``scope``, one mask distance over all their units, one prune.
        keep_history: keep every epoch's mask (packed, on the CPU, in checkpoints) for the distance plots.
        verbose: print what is tracked at setup and the ticket's arrival, on rank zero.
        accept_first_window: accept a ticket at the first epoch the window is full (``False``: the WORM
            code's rule, never at the first full-window check).
        first_mask: ``"epoch_end"`` takes the first mask at the end of epoch 0; ``"train_start"`` (the
            reference codes' timing) also takes one from the initial weights before epoch 0, so the
            window fills one epoch sooner.

    Raises:
        ValueError: on an argument out of range (named in the message); at setup, if the model has no
            tracked unit, the strategy is one the callbacks do not support (FSDP1, DeepSpeed, tensor parallelism) or
            slimming gates are asked for under FSDP2; on resume, if the checkpoint's search ran with other settings.

    Example::

        from lightning import Trainer
        from lightning_worm import EarlyBirdCallback

        early_bird = EarlyBirdCallback(prune_ratio=0.5)
        trainer = Trainer(max_epochs=40, callbacks=[early_bird])
        trainer.fit(model, datamodule)
        early_bird.ticket_epoch, early_bird.distances
    """

    def __init__(
        self,
        prune_ratio: float = 0.5,
        window: int = 5,
        threshold: float = 0.1,
        sparsity: float | Literal["auto"] = AUTO,
        min_units: int = 1,
        every_n_epochs: int = 1,
        stop_on_ticket: bool = False,
        source: SourceSpec = None,
        keep_history: bool = True,
        verbose: bool = True,
        accept_first_window: bool = True,
        first_mask: Literal["epoch_end", "train_start"] = "epoch_end",
        min_channels: int | None = None,
        ready_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if min_channels is not None:
            warn_renamed("EarlyBirdCallback(min_channels=...)", "min_units=")
            min_units = min_channels
        self.prune_ratio = check_number("prune_ratio", prune_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
        if sparsity != AUTO:
            if isinstance(sparsity, str):
                raise ValueError(f"`sparsity` must be a number >= 0 or {AUTO!r}, got {sparsity!r}.")
            sparsity = check_number("sparsity", sparsity, low=0.0)
        self.sparsity: float | str = sparsity
        #: With ``sparsity="auto"``: the strength, measured from the loss gradients of the first epoch.
        self.relative: RelativeSparsity | None = RelativeSparsity() if sparsity == AUTO else None
        #: With ``sparsity="auto"``: how hard a ticket that is not ready yet has its pruned units pulled to zero.
        self.decay: GrowingDecay | None = GrowingDecay() if sparsity == AUTO else None
        self._pull: MaskedDecay | None = None
        self._pull_version = -1  # the `version` whose ticket the pull was set to
        self._steps_per_epoch = 1.0
        self._steps_this_epoch: dict[int, int] = {}
        self._last_epoch_steps: int | None = None
        self.ready_ratio = check_number("ready_ratio", ready_ratio, low=0.0, high=1.0)
        #: The newest mask's score share, and the ticket's pruned units' share of the same scores.
        self.share: ScoreShare | None = None
        self.ticket_share: ScoreShare | None = None
        self.min_units = check_int("min_units", min_units, minimum=1)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.stop_on_ticket = check_bool("stop_on_ticket", stop_on_ticket)
        self.verbose = check_bool("verbose", verbose)
        self.first_mask = check_choice("first_mask", first_mask, FIRST_MASKS)
        self.source = resolve_source(source)
        self.detector = TicketDetector(window, threshold, keep_history=keep_history,
                                       accept_first_window=accept_first_window)
        self.searching = True
        #: Bumped whenever the search state changes; followers (WormCallback) re-read the state then.
        self.version = 0
        self._observed_epoch: int | None = None
        self._offset = 0  # 1 once a mask was taken from the initial weights (first_mask="train_start")
        self._fingerprints: deque[int] = deque(maxlen=self.detector.window)
        self._restored_reported = False
        self._sparsity_params: weakref.WeakKeyDictionary[Optimizer, list[Tensor]] = weakref.WeakKeyDictionary()
        #: WORM's truncation, handed over by the WormCallback that follows this tracker in the running fit. The
        #: tracker owns every per-step gradient edit, so that their order is fixed here and not by the callbacks' list.
        self.truncation: GradientTruncation | None = None
        self._batch_idx = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._settings())

    def _settings(self) -> dict[str, Any]:
        return dict(
            prune_ratio=self.prune_ratio, window=self.window, threshold=self.threshold, sparsity=self.sparsity,
            # `min_channels` is the name this setting has in the state keys of earlier checkpoints: kept, so they
            # resume.
            min_channels=self.min_units, every_n_epochs=self.every_n_epochs, source=self.source.label(),
        )

    min_channels = RenamedAttribute("min_units")

    @property
    def window(self) -> int:
        return self.detector.window

    @property
    def threshold(self) -> float:
        return self.detector.threshold

    @property
    def distances(self) -> list[float]:
        """Per completed epoch, the largest distance of the newest mask to the window (NaN before full)."""
        return self.detector.distances[self._offset:]

    @property
    def mean_distances(self) -> list[float]:
        """Per completed epoch, the mean distance of the newest mask to the window (NaN before full)."""
        return self.detector.mean_distances[self._offset:]

    @property
    def mask(self) -> Mask | None:
        """The latest mask per tracked entry name (``True`` = keep), or ``None`` before the first."""
        return self.detector.mask

    @property
    def ticket(self) -> Mask | None:
        """The Early-Bird ticket, frozen at detection, or ``None`` before."""
        return self.detector.ticket

    @property
    def ticket_epoch(self) -> int | None:
        """The 0-based epoch at whose end the ticket emerged, or ``None``."""
        epoch = self.detector.ticket_epoch
        return None if epoch is None else epoch - self._offset

    @property
    def ready(self) -> bool:
        """Whether the ticket has emerged and its pruned units' score-share ratio is at most ``ready_ratio``."""
        share = self.ticket_share
        return self.ticket is not None and share is not None and share.ratio <= self.ready_ratio

    @property
    def strength(self) -> float:
        """The per-step strength of the sparsity term now: the number given, or with ``"auto"`` the one measured
        (0 during the first epoch, which measures it); 0 once the search is over."""
        if not self.searching:
            return 0.0
        return self.relative.strength if self.relative is not None else float(self.sparsity)

    def end_search(self) -> None:
        """Stop taking masks (the model was pruned); ticket and histories stay as they are."""
        self.searching = False
        self.version += 1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        members = self.source.sources if isinstance(self.source, SourceList) else (self.source,)
        slimming = [repr(s) for s in members if getattr(s, "score", None) == "slimming"]
        sharded = is_sharded_strategy(trainer)
        if slimming and sharded:
            raise ValueError(
                f"{type(self).__name__}: slimming gates ({', '.join(slimming)}) are not supported under sharded "
                "training (FSDP2): score the units by weight magnitude (`score='magnitude'`, the default), or train "
                "with DDP."
            )
        self._sparsity_params = weakref.WeakKeyDictionary()
        self._pull, self._pull_version = None, -1
        self.truncation = None  # a WormCallback in this fit hands its own over at `on_fit_start`, after every setup
        self._observed_epoch = None
        if not sharded:  # sharded, `score="auto"` scores by magnitude: the gates are not sharded
            self.source.prepare(pl_module)
        skipped = self.source.skipped(pl_module)
        tracked = self.source.tracked(pl_module)
        pending = [name for name, why in skipped.items() if why.startswith("lazy")]
        if not tracked and not pending:
            left_out = ", ".join(f"{n} ({why})" for n, why in list(skipped.items())[:5]) or "none found"
            raise ValueError(
                f"{type(self).__name__} found no channel (or unit) to track in {type(pl_module).__name__}: it tracks "
                f"{self.source.description}. Candidates left out: {left_out}. Add BatchNorm layers after "
                "your convolutions, unfreeze their weights, or pass a `source=` that scores your layers."
            )
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: {self.source.summary(pl_module)}")
        # One check per module, whatever the trackers: it reads the trainer the module is in when it runs, so a
        # module fitted again (new Trainer, other callbacks) is not judged by an earlier fit's callbacks.
        checkpoint_hooks(pl_module).on_load[type(self).__name__] = partial(_check_resumable, pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning matches states by key; a tracker whose settings changed would silently start afresh.
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        mine = {k for t in trainer_callbacks(trainer) if isinstance(t, EarlyBirdCallback) for k in (t.state_key,)}
        orphans = [key for key in states if isinstance(key, str) and key.startswith(type(self).__name__ + "{")
                   and key not in mine]
        if not orphans:
            return
        theirs = _settings_from_key(orphans[0])
        differ = [f"{k}={theirs[k]!r} in the checkpoint, {k}={v!r} now" for k, v in self._settings().items()
                  if k in theirs and theirs[k] != v]
        raise ValueError(
            f"The checkpoint's ticket search ran with other settings ({'; '.join(differ) or orphans[0]}). Resume "
            "with the checkpoint's settings, or start a new run (no `ckpt_path`) to search with the new ones."
        )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A checkpoint that cannot be read fails inside Lightning with a bare EOFError or OSError: name it.
        _raise_for_unloadable_checkpoint(trainer, exception)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.first_mask == "train_start" and self.detector.epoch == 0 and self.searching:
            self._offset = 1
            self._record(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._steps_per_epoch = _steps_per_epoch(trainer, pl_module, self._last_epoch_steps)
        self._steps_this_epoch = {}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # WORM's truncation, once per optimizer step on the final loss gradient: the backward that completes an
        # accumulation (DDP has reduced it; clipping comes later). It commutes with AMP's loss scale.
        if (self.truncation is not None and pl_module.automatic_optimization
                and _completes_accumulation(trainer, self._batch_idx)):
            self.truncation.apply()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # After the closure and, under AMP, after unscaling: the true gradient, once per step. The edits in their
        # one order: WORM's truncation (here under manual optimization), then the sparsity term, never truncated.
        if self.truncation is not None and not pl_module.automatic_optimization:
            self.truncation.apply()
        if not self.searching or self.sparsity == 0.0:
            return
        if self.decay is not None:
            self._steps_this_epoch[id(optimizer)] = self._steps_this_epoch.get(id(optimizer), 0) + 1
            if self.ticket is not None and not self.ready:  # pull the waiting ticket's pruned units to zero
                self._waiting_pull(pl_module).apply(self.pull_strength(optimizer))
        params = self._sparsity_params.get(optimizer)
        if params is None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [
                p for h in self.source.tracked(pl_module).values()
                for p in self.source.sparsity_parameters(h) if id(p) in in_optimizer
            ]
            self._sparsity_params[optimizer] = params
        if self.relative is not None:
            self.relative.observe(params)
        add_sparsity_gradient(params, self.strength)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_epoch_steps = max(self._steps_this_epoch.values(), default=self._last_epoch_steps)
        self.observe_epoch(trainer, pl_module)

    def pull_strength(self, optimizer: Optimizer | None = None) -> float:
        """With ``"auto"``, the per-step ``lam`` of the pull on a waiting ticket's pruned units, for ``optimizer``'s
        first parameter group (its schedule's initial learning rate and its momentum); else 0."""
        if self.decay is None or not self.searching:
            return 0.0
        group = optimizer.param_groups[0] if optimizer is not None else {}
        lr = group.get("initial_lr", group.get("lr", 1.0))
        momentum = group.get("momentum", group["betas"][0] if "betas" in group else 0.0)
        return self.decay.strength(self._steps_per_epoch, float(lr), float(momentum or 0.0))

    def _waiting_pull(self, pl_module: pl.LightningModule) -> MaskedDecay:
        """The pull on the pruned units of the ticket (set again whenever the search state changes)."""
        if self._pull is None:
            self._pull = MaskedDecay(pl_module, self.source)
        if self._pull_version != self.version:
            self._pull_version = self.version
            self._pull.set(None if self.ticket is None else self.ticket.to(pl_module.device))
        return self._pull

    def observe_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take this epoch's mask (once per epoch; later calls in the same epoch do nothing).

        Followers that act at the end of an epoch call it first, so that the tracker's state is that of
        the epoch whatever the order of the callbacks. Every rank calls it together.
        """
        if not self.searching or trainer.sanity_checking or self._observed_epoch == trainer.current_epoch:
            return
        self._observed_epoch = trainer.current_epoch
        epoch = trainer.current_epoch + self._offset
        if epoch < self.detector.epoch:
            rank_zero_warn(
                f"{type(self).__name__} already holds {self.detector.epoch} epochs but this fit is at epoch "
                f"{epoch}: starting a new search. Use a new callback per fit, or resume with `ckpt_path`."
            )
            self.detector = TicketDetector(self.window, self.threshold, self.detector.keep_history,
                                           self.detector.accept_first_window)
            self._fingerprints.clear()
        while self.detector.epoch < epoch:  # epochs this callback did not see
            self.detector.skip()
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            self.detector.skip()
            self.version += 1
            return
        self._record(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outcome = self._take_mask(pl_module)
        if trainer.world_size > 1:
            outcome = self._share_rank_zero_mask(trainer, pl_module, outcome)
        self.version += 1
        if isinstance(outcome, NonFiniteScoreError):
            rank_zero_warn(f"{type(self).__name__}: epoch {trainer.current_epoch} skipped. {outcome}")
            self.detector.skip()
            return
        mask, fingerprint, share, ticket_share = outcome
        found_before = self.ticket is not None
        distance, mean = self.detector.update(mask)
        self._fingerprints.append(fingerprint)
        self.share = share
        self.ticket_share = (ticket_share if found_before else share) if self.ticket is not None else None
        if self.relative is not None:  # steered by how fast the scores polarise, then by whether the masks settle
            self.relative.end_epoch(share.ratio, settled=self.ticket is not None or not distance > self.threshold)
        if self.decay is not None and found_before:  # the pull grows while the ticket waits
            self.decay.end_epoch(ready=self.ready)
        self._log(pl_module, distance, mean)
        if not found_before and self.ticket is not None:
            self._announce()
            if self.stop_on_ticket:
                trainer.should_stop = True

    def _take_mask(
        self, pl_module: pl.LightningModule
    ) -> tuple[Mask, int, ScoreShare, ScoreShare | None] | NonFiniteScoreError:
        scores = unit_scores(pl_module, self.source)
        if not scores:
            lazy = [n for n, why in self.source.skipped(pl_module).items() if why.startswith("lazy")]
            raise ValueError(
                f"{type(self).__name__}: nothing to score at the end of the epoch: "
                + (f"the lazy layers {', '.join(lazy)} were never materialised (no forward pass reached them). "
                   if lazy else "")
                + "Run the model once before the fit, use non-lazy layers, or pass a `source=` that scores your layers."
            )
        parts = self.source.parts(pl_module)
        try:
            result = rank_units(scores, parts, self.prune_ratio, self.min_units)
        except NonFiniteScoreError as err:
            return err
        if result.restored and self.verbose and not self._restored_reported:
            self._restored_reported = True
            rank_zero_info(
                f"{type(self).__name__}: `min_units={self.min_units}` keeps back "
                f"{result.requested - result.pruned} of the {result.requested} units the ratio prunes "
                f"(in {', '.join(result.restored)})."
            )
        # Whether any score moved: the ranking's exact checksum of the scores' bits, taken in its pass over them.
        ticket = self.ticket
        names = [entries for _, entries in parts]
        ticket_share = score_share(scores, ticket.to(result.mask.flat.device), names) if ticket is not None else None
        return result.mask, result.checksum, score_share(scores, result.mask, names), ticket_share

    @staticmethod
    def _share_rank_zero_mask(
        trainer: pl.Trainer, pl_module: pl.LightningModule, outcome: Any
    ) -> tuple[Mask, int, ScoreShare, ScoreShare | None] | NonFiniteScoreError:
        # Rank 0 decides; the broadcast pickles, so send the packed bits and place them on this rank's device.
        if not isinstance(outcome, NonFiniteScoreError):
            mask, *rest = outcome
            outcome = (mask.packed(), mask.layout, *rest)
        outcome = decide_on_rank_zero(trainer, outcome)
        if isinstance(outcome, NonFiniteScoreError):
            return outcome
        packed, layout, fingerprint, share, ticket_share = outcome
        return Mask.unpack(packed, layout).to(pl_module.device), fingerprint, share, ticket_share

    def _log(self, pl_module: pl.LightningModule, distance: float, mean: float) -> None:
        prefix = self.log_prefix(pl_module.trainer, "earlybird")
        if not math.isnan(distance):
            log_shared(pl_module, f"{prefix}/mask_distance", distance, prog_bar=True)
            log_shared(pl_module, f"{prefix}/mean_distance", mean)
        log_shared(pl_module, f"{prefix}/ticket_found", float(self.ticket is not None))
        if self.share is not None:
            log_shared(pl_module, f"{prefix}/share_ratio", self.share.ratio)
        if self.ticket is not None:
            log_shared(pl_module, f"{prefix}/ready", float(self.ready))
        if self.relative is not None:
            log_shared(pl_module, f"{prefix}/sparsity", self.strength)
        if self.decay is not None and self.ticket is not None:
            log_shared(pl_module, f"{prefix}/pull_decay", self.decay.decay if not self.ready else 0.0)

    def log_prefix(self, trainer: pl.Trainer, name: str) -> str:
        """``name``, namespaced by this tracker's prune ratio when several trackers run in ``trainer``."""
        several = sum(isinstance(c, EarlyBirdCallback) for c in trainer_callbacks(trainer)) > 1
        return f"{name}_{self.prune_ratio:g}" if several else name

    def _announce(self) -> None:
        if len(self._fingerprints) == self.window and len(set(self._fingerprints)) == 1:
            rank_zero_warn(
                f"{type(self).__name__}: the ticket emerged at epoch {self.ticket_epoch}, but no score moved over "
                f"the last {self.window} masks: the masks agree only because nothing is learning there. Check that "
                "the scored parameters train (requires_grad, optimizer, a learning rate that moves them, a "
                "precision that can represent their updates, e.g. not bf16-true with a tiny learning rate)."
            )
        if not self.verbose:
            return
        ticket = self.ticket
        assert ticket is not None, "announced once the ticket has emerged"
        per_entry = ", ".join(f"{n}: {int(m.sum())}/{m.numel()}" for n, m in list(ticket.items())[:20])
        rank_zero_info(
            f"Early-Bird ticket emerged at epoch {self.ticket_epoch} ({self._ratios()}, "
            f"distance {self.distances[-1]:.4f} <= {self.threshold:g}): keeps {ticket.kept}/{ticket.total} units. "
            f"Kept per entry: {per_entry}" + (" ..." if len(ticket) > 20 else "")
        )

    def _ratios(self) -> str:
        """The ratios the masks are taken at, for messages: the tracker's, or each source's with a list of sources."""
        if not isinstance(self.source, SourceList):
            return f"prune_ratio={self.prune_ratio:g}"
        return ", ".join(f"{label} prune_ratio={s.prune_ratio if s.prune_ratio is not None else self.prune_ratio:g}"
                         + (f" per {s.scope}" if s.scope == "layer" else "")
                         for label, s in zip(self.source.labels(), self.source.sources, strict=True))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "searching": self.searching, "offset": self._offset,
                "settings": self._settings(),
                "relative": None if self.relative is None else self.relative.state_dict(),
                "decay": None if self.decay is None else self.decay.state_dict(),
                "last_epoch_steps": self._last_epoch_steps,
                "share": None if self.share is None else self.share.to_dict(),
                "ticket_share": None if self.ticket_share is None else self.ticket_share.to_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.searching = state_dict["searching"]
        self._offset = state_dict.get("offset", 0)
        if self.relative is not None and state_dict.get("relative") is not None:
            self.relative.load_state_dict(state_dict["relative"])
        if self.decay is not None and state_dict.get("decay") is not None:
            self.decay.load_state_dict(state_dict["decay"])
        self._last_epoch_steps = state_dict.get("last_epoch_steps")
        for name in ("share", "ticket_share"):
            saved = state_dict.get(name)
            setattr(self, name, None if saved is None else ScoreShare(saved["pruned"], saved["random"]))
        self._fingerprints.clear()
        self.version += 1


def _completes_accumulation(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the backward of batch ``batch_idx`` is the last before an optimizer step (public state only).

    Lightning steps after every ``accumulate_grad_batches`` batches and on the last batch of the epoch.
    """
    accumulate = trainer.accumulate_grad_batches
    if accumulate == 1 or (batch_idx + 1) % accumulate == 0:
        return True
    total = trainer.num_training_batches
    return total is not None and not math.isinf(total) and batch_idx + 1 == int(total)


def _steps_per_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule, last: int | None) -> float:
    """Optimizer steps this epoch will take: the batches over ``accumulate_grad_batches`` under automatic
    optimization; else the steps the last epoch took (manual optimization decides its own), else one per batch."""
    batches = trainer.num_training_batches
    known = batches is not None and not math.isinf(batches) and batches > 0
    if known and pl_module.automatic_optimization:
        return float(math.ceil(int(batches) / trainer.accumulate_grad_batches))
    if last:
        return float(last)
    return float(batches) if known else 1.0


def _settings_from_key(key: str) -> dict[str, Any]:
    """The settings a state key such as ``EarlyBirdCallback{'prune_ratio': 0.5, ...}`` was built from."""
    try:
        settings = ast.literal_eval(key[key.index("{"):])
    except (ValueError, SyntaxError):
        return {}
    return settings if isinstance(settings, dict) else {}


def _check_resumable(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Run before the weights load: a pruned checkpoint needs a PruneAndFinetune in the module's Trainer."""
    trainer = attached_trainer(pl_module)
    if trainer is None or checkpoint_hooks(pl_module).plan is not None:
        return  # no fit, or the module object is pruned already and its weights fit as they are
    if find_pruning_plan(checkpoint) is not None and not any(
        getattr(c, "applies_pruning_plans", False) for c in trainer_callbacks(trainer)
    ):
        raise ValueError(
            "The checkpoint holds a pruned model (a PruneAndFinetune pruned it), but this Trainer has no "
            "PruneAndFinetune to rebuild it before its weights load. Resume with the same callbacks, "
            "PruneAndFinetune included, or load it for inference with `lightning_worm.load_pruned`."
        )
