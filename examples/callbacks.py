"""Accuracy around the prune, for the main job's summary and the benchmarks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_worm import PruneAndFinetune


class AccuracyAroundPrune(Callback):
    """Record validation accuracy per epoch, and the pruned network's accuracy before it trains again.

    Reads ``val/acc`` after each validation epoch. At the start of the first epoch after ``prune``
    pruned the model, evaluates the pruned network once on the validation data (eval mode, no grad).

    Args:
        prune: the :class:`~lightning_worm.PruneAndFinetune` whose prune is observed; ``None``: the only
            one in the trainer, found when the fit starts (with none, only the validation accuracy is
            recorded).
        monitor: the logged validation accuracy.

    Raises:
        ValueError: at the start of a fit, if ``prune`` is ``None`` and the trainer has several
            PruneAndFinetune callbacks.

    Example::

        trainer = Trainer(callbacks=[EarlyBirdCallback(), PruneAndFinetune(), AccuracyAroundPrune()])
    """

    def __init__(self, prune: PruneAndFinetune | None = None, monitor: str = "val/acc") -> None:
        self._spec = prune
        self.prune = prune
        self.monitor = monitor
        self.val_acc: dict[int, float] = {}
        self.after_prune: float | None = None

    @property
    def before_prune(self) -> float | None:
        """Validation accuracy of the dense network at the epoch it was pruned."""
        pruned_epoch = self.prune.pruned_epoch if self.prune is not None else None
        return None if pruned_epoch is None else self.val_acc.get(pruned_epoch)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._spec is not None:
            return
        found = [c for c in trainer.callbacks if isinstance(c, PruneAndFinetune)]
        if len(found) > 1:
            raise ValueError(f"AccuracyAroundPrune cannot tell which of {len(found)} PruneAndFinetune callbacks "
                             "to observe: pass it, `AccuracyAroundPrune(prune)`.")
        self.prune = found[0] if found else None

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.monitor in trainer.callback_metrics:
            self.val_acc[trainer.current_epoch] = float(trainer.callback_metrics[self.monitor])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (self.after_prune is None and self.prune is not None and self.prune.pruned_epoch is not None
                and trainer.val_dataloaders is not None):
            self.after_prune = evaluate(pl_module, trainer.val_dataloaders)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode; the mode is restored after)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    for images, targets in loader:
        predictions = model(images.to(device)).argmax(dim=1)
        correct += int((predictions == targets.to(device)).sum())
        total += targets.numel()
    model.train(was_training)
    return correct / max(total, 1)
