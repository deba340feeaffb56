"""A 2-process CPU DDP fit at the defaults (sparsity "auto", the prune waits for a ready ticket) that searches,
prunes mid-fit and keeps training; each rank saves its state.

Run from the repository root: ``python -m tests.ddp.fit_prune OUT_DIR``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from tests.helpers import tiny_loader
from tests.models import TinyNet


class CountSteps(Callback):
    def __init__(self):
        self.steps_at_epoch_end = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps_at_epoch_end.append(trainer.global_step)


def main(out: Path) -> None:
    L.seed_everything(0)
    model = TinyNet()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
    prune = PruneAndFinetune(eb, max_wait=3, finetune_epochs=2)
    steps = CountSteps()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=10, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[steps, eb, WormCallback(eb, schedule="fixed", chi=0.01), prune],
    )
    trainer.fit(model, tiny_loader(n=128))
    torch.save({
        "pruned_epoch": prune.pruned_epoch,
        "ticket_epoch": eb.ticket_epoch,
        "push": (eb.relative.strength, eb.decay.decay),
        "steps_at_epoch_end": steps.steps_at_epoch_end,
        "report": prune.report,
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "wrapped_params": [tuple(p.shape) for p in trainer.strategy.model.parameters()],
        "optimizer_params": [tuple(p.shape) for g in trainer.optimizers[0].param_groups for p in g["params"]],
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join gloo's threads now, not during the interpreter's teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
