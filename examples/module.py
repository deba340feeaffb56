"""Image classifier LightningModule with the Early-Bird training recipe."""

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch.optim import SGD
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, MultiStepLR
from torchmetrics.classification import MulticlassAccuracy

from examples.models import MODELS, build_model

# Every model of examples.models.MODELS: the CLI lists them in --help and refuses any other name.
Arch = Literal[tuple(MODELS)]  # type: ignore[valid-type]
Schedule = Literal["step", "cosine"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


class ImageClassifier(LightningModule):
    """Classifier trained with SGD as in the Early-Bird code (momentum 0.9, weight decay 1e-4, lr 0.1).

    The ``"step"`` schedule divides the learning rate by 10 at 50 % and 75 % of
    ``trainer.max_epochs`` (:class:`~torch.optim.lr_scheduler.MultiStepLR`); ``"cosine"`` anneals it
    to 0 over ``trainer.max_epochs`` (:class:`~torch.optim.lr_scheduler.CosineAnnealingLR`).

    :meth:`configure_optimizers` builds a fresh optimizer and schedule from ``self.parameters()``
    each time it is called, so a callback that physically shrinks the network can call it again in
    the middle of ``fit`` (``trainer.strategy.setup_optimizers(trainer)``). Continuing the old
    schedule is the caller's choice: :class:`~lightning_worm.PruneAndFinetune` loads the old
    scheduler's state and learning rate into the new ones unless ``restart_schedule=True``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (progress bar), ``test/loss`` and
    ``test/acc`` once per epoch; accuracy is top-1 over all samples.

    Args:
        arch: a model name of :data:`examples.models.MODELS`, e.g. ``"resnet18"`` or ``"vgg11_bn"``.
        num_classes: number of classes.
        width: channel-width multiplier of the model.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay (L2), applied to all parameters as in the Early-Bird code.
        schedule: ``"step"`` or ``"cosine"``.

    Raises:
        ValueError:
            If ``arch`` or ``schedule`` is unknown.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from examples.data import DigitsDataModule
        >>> model = ImageClassifier(arch="vgg11_bn", width=0.25)
        >>> trainer = Trainer(max_epochs=20)
        >>> trainer.fit(model, datamodule=DigitsDataModule())  # doctest: +SKIP

    """

    def __init__(
        self,
        arch: Arch = "resnet18",
        num_classes: int = 10,
        width: float = 1.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        schedule: Schedule = "step",
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}.")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes=num_classes, width=width)
        # one input of the model's own shape (a model may say it in `input_shape`; CIFAR images otherwise)
        self.example_input_array = torch.zeros(1, *getattr(self.model, "input_shape", (3, 32, 32)))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, accuracy: MulticlassAccuracy
    ) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        accuracy(logits, targets)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        optimizer = SGD(self.parameters(), lr=hparams.lr, momentum=hparams.momentum, weight_decay=hparams.weight_decay)
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"The {hparams.schedule!r} schedule needs a finite `Trainer(max_epochs=...)`.")
        scheduler: LRScheduler
        if hparams.schedule == "step":
            milestones = [max(1, int(fraction * max_epochs)) for fraction in (0.5, 0.75)]
            scheduler = MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        else:
            scheduler = CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
