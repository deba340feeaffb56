"""EarlyBirdCallback: find the Early-Bird ticket while the model trains."""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_worm.callbacks.strategy import check_strategy, decide_on_rank_zero, log_prefix
from lightning_worm.core.detector import TicketDetector
from lightning_worm.core.masks import (
    Mask,
    NonFiniteScoreError,
    channel_scores,
    mask_from_scores,
    validate_min_channels,
    validate_ratio,
)
from lightning_worm.core.regularization import add_sparsity_gradient, validate_sparsity
from lightning_worm.core.sources import ScoreSource, resolve_source


class EarlyBirdCallback(Callback):
    r"""Search for the Early-Bird ticket (You et al., ICLR 2020) during ``fit``.

    At the end of every training epoch (or every ``every_n_epochs``) the callback takes a global channel
    mask: over all ``N`` tracked BatchNorm channels, the ``round(prune_ratio * N)`` with the smallest
    ``|gamma|`` are pruned (ties by layer order, then channel index). The mask distance of two epochs
    is the fraction of channels on which their masks differ. Once ``window`` masks are held, the epoch's
    distance is the largest distance between the newest mask and each older one; the ticket emerges at
    the first epoch where it is at most ``threshold``. The search then goes on (masks keep being
    taken for WORM and the plots) until a :class:`~lightning_worm.PruneAndFinetune` prunes the model,
    after which no more masks are taken: the histories stop at the ticket.

    Logs ``earlybird/mask_distance``, ``earlybird/mean_distance`` (both once the window is full) and
    ``earlybird/ticket_found`` (``earlybird_<ratio>/...`` when several trackers run).

    Args:
        prune_ratio: fraction of channels the mask prunes, in (0, 1).
        window: number of recent masks compared, at least 2.
        threshold: the ticket emerges once the distance is at most this, in [0, 1].
        sparsity: network-slimming L1 term: ``sparsity * sign(gamma)`` is added to each tracked gamma's
            (unscaled) gradient once per optimizer step while the search runs. 0 turns it off.
        min_channels: channels every layer keeps at least.
        every_n_epochs: take a mask every this many epochs (epochs in between record NaN).
        stop_on_ticket: stop the fit at the end of the epoch in which the ticket emerges.
        source: what is scored; BatchNorm ``|gamma|`` by default.
        keep_history: keep every epoch's mask (on the CPU, in checkpoints) for the pairwise distance plot.
        verbose: print the ticket's arrival on rank zero.

    Raises:
        ValueError: on an argument out of range (named in the message); at setup, if the model has no
            tracked channel or the strategy shards parameters.

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
        sparsity: float = 0.0,
        min_channels: int = 1,
        every_n_epochs: int = 1,
        stop_on_ticket: bool = False,
        source: str | ScoreSource | None = None,
        keep_history: bool = True,
        verbose: bool = True,
        accept_first_window: bool = True,
    ) -> None:
        super().__init__()
        validate_ratio(prune_ratio)
        validate_sparsity(sparsity)
        validate_min_channels(min_channels)
        if not (isinstance(every_n_epochs, int) and every_n_epochs >= 1):
            raise ValueError(f"`every_n_epochs` must be an integer >= 1, got {every_n_epochs!r}.")
        self.prune_ratio = float(prune_ratio)
        self.sparsity = float(sparsity)
        self.min_channels = min_channels
        self.every_n_epochs = every_n_epochs
        self.stop_on_ticket = stop_on_ticket
        self.source = resolve_source(source)
        self.verbose = verbose
        self.detector = TicketDetector(window, threshold, keep_history=keep_history,
                                       accept_first_window=accept_first_window)
        self.searching = True
        self.prefix = "earlybird"
        self._restored_reported = False
        self._subscribers: list[Callable[["pl.Trainer", "pl.LightningModule"], None]] = []
        self._sparsity_params: weakref.WeakKeyDictionary[Optimizer, list[Tensor]] = weakref.WeakKeyDictionary()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            prune_ratio=self.prune_ratio, window=self.window, threshold=self.threshold, sparsity=self.sparsity,
            min_channels=self.min_channels, every_n_epochs=self.every_n_epochs, source=type(self.source).__name__,
        )

    @property
    def window(self) -> int:
        return self.detector.window

    @property
    def threshold(self) -> float:
        return self.detector.threshold

    @property
    def distances(self) -> list[float]:
        """Per completed epoch, the largest distance of the newest mask to the window (NaN before full)."""
        return self.detector.distances

    @property
    def mean_distances(self) -> list[float]:
        """Per completed epoch, the mean distance of the newest mask to the window (NaN before full)."""
        return self.detector.mean_distances

    @property
    def mask(self) -> Mask | None:
        """The latest mask per tracked module name (``True`` = keep), or ``None`` before the first."""
        return self.detector.mask

    @property
    def ticket(self) -> Mask | None:
        """The Early-Bird ticket, frozen at detection, or ``None`` before."""
        return self.detector.ticket

    @property
    def ticket_epoch(self) -> int | None:
        """The 0-based epoch at whose end the ticket emerged, or ``None``."""
        return self.detector.ticket_epoch

    def subscribe(self, fn: Callable[["pl.Trainer", "pl.LightningModule"], None]) -> None:
        """Call ``fn(trainer, pl_module)`` after each epoch's update and when the search ends."""
        self._subscribers.append(fn)

    def end_search(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Stop taking masks (the model was pruned); ticket and histories stay as they are."""
        self.searching = False
        self._notify(trainer, pl_module)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        self.prefix = log_prefix(trainer, self, "earlybird")
        self._sparsity_params = weakref.WeakKeyDictionary()
        skipped = self.source.skipped(pl_module)
        tracked = self.source.tracked(pl_module)
        pending = [name for name, why in skipped.items() if why.startswith("lazy")]
        if not tracked and not pending:
            left_out = ", ".join(f"{n} ({why})" for n, why in list(skipped.items())[:5]) or "none found"
            raise ValueError(
                f"{type(self).__name__} found no channel to track in {type(pl_module).__name__}: it tracks "
                f"{self.source.description}. Candidates left out: {left_out}. Add BatchNorm layers after "
                "your convolutions, unfreeze their weights, or pass a `source=` that scores your layers."
            )
        rank_zero_info(f"{type(self).__name__}: {self.source.summary(pl_module)}")

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        # After the closure and, under AMP, after unscaling: the true gradient, once per step.
        if self.sparsity == 0.0 or not self.searching:
            return
        params = self._sparsity_params.get(optimizer)
        if params is None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [
                p for m in self.source.tracked(pl_module).values()
                for p in self.source.sparsity_parameters(m) if id(p) in in_optimizer
            ]
            self._sparsity_params[optimizer] = params
        add_sparsity_gradient(params, self.sparsity)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.searching or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        if epoch < self.detector.epoch:
            rank_zero_warn(
                f"{type(self).__name__} already holds {self.detector.epoch} epochs but this fit is at epoch "
                f"{epoch}: starting a new search. Use a new callback per fit, or resume with `ckpt_path`."
            )
            self.detector = TicketDetector(self.window, self.threshold, self.detector.keep_history,
                                           self.detector.accept_first_window)
        while self.detector.epoch < epoch:  # epochs this callback did not see
            self.detector.skip()
        if (epoch + 1) % self.every_n_epochs:
            self.detector.skip()
            return

        outcome = self._take_mask(pl_module)
        if trainer.world_size > 1:
            outcome = self._share_rank_zero_mask(trainer, pl_module, outcome)
        if isinstance(outcome, NonFiniteScoreError):
            rank_zero_warn(f"{type(self).__name__}: epoch {epoch} skipped. {outcome}")
            self.detector.skip()
            return
        found_before = self.ticket is not None
        distance, mean = self.detector.update(outcome)
        self._log(pl_module, distance, mean)
        if not found_before and self.ticket is not None:
            self._announce(trainer)
            if self.stop_on_ticket:
                trainer.should_stop = True
        self._notify(trainer, pl_module)

    def _take_mask(self, pl_module: "pl.LightningModule") -> Mask | NonFiniteScoreError:
        try:
            result = mask_from_scores(channel_scores(pl_module, self.source), self.prune_ratio, self.min_channels)
        except NonFiniteScoreError as err:
            return err
        if result.restored and self.verbose and not self._restored_reported:
            self._restored_reported = True
            rank_zero_info(
                f"{type(self).__name__}: `min_channels={self.min_channels}` keeps back "
                f"{result.requested - result.pruned} of the {result.requested} channels the ratio prunes "
                f"(in {', '.join(result.restored)})."
            )
        return result.mask

    @staticmethod
    def _share_rank_zero_mask(
        trainer: "pl.Trainer", pl_module: "pl.LightningModule", outcome: Mask | NonFiniteScoreError
    ) -> Mask | NonFiniteScoreError:
        # Rank 0 decides; the broadcast pickles, so send the packed bits and place them on this rank's device.
        if not isinstance(outcome, NonFiniteScoreError):
            outcome = (outcome.packed(), outcome.layout)
        outcome = decide_on_rank_zero(trainer, outcome)
        if isinstance(outcome, NonFiniteScoreError):
            return outcome
        packed, layout = outcome
        return Mask.unpack(packed, layout).to(pl_module.device)

    def _log(self, pl_module: "pl.LightningModule", distance: float, mean: float) -> None:
        # Every rank holds the same values; reduce_fx="max" keeps them exact and silences the DDP warning.
        kwargs: dict[str, Any] = dict(on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")
        if not math.isnan(distance):
            pl_module.log(f"{self.prefix}/mask_distance", distance, prog_bar=True, **kwargs)
            pl_module.log(f"{self.prefix}/mean_distance", mean, **kwargs)
        pl_module.log(f"{self.prefix}/ticket_found", float(self.ticket is not None), **kwargs)

    def _announce(self, trainer: "pl.Trainer") -> None:
        if not self.verbose:
            return
        ticket = self.ticket
        kept = sum(int(m.sum()) for m in ticket.values())
        total = sum(m.numel() for m in ticket.values())
        per_layer = ", ".join(f"{n}: {int(m.sum())}/{m.numel()}" for n, m in ticket.items())
        rank_zero_info(
            f"Early-Bird ticket emerged at epoch {self.ticket_epoch} (prune_ratio={self.prune_ratio:g}, "
            f"distance {self.distances[-1]:.4f} <= {self.threshold:g}): keeps {kept}/{total} channels. "
            f"Kept per layer: {per_layer}"
        )

    def _notify(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for fn in self._subscribers:
            fn(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "searching": self.searching}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.searching = state_dict["searching"]


def check_is_tracker(early_bird: Any, who: str) -> None:
    """Raise if ``early_bird`` is not an :class:`EarlyBirdCallback` (for the callbacks that follow one).

    Raises:
        ValueError: saying how to make one.
    """
    if not isinstance(early_bird, EarlyBirdCallback):
        raise ValueError(
            f"`early_bird` must be an EarlyBirdCallback, got {type(early_bird).__name__}: create one and pass "
            f"it here, e.g. `{who}(EarlyBirdCallback(prune_ratio=0.5))`."
        )
