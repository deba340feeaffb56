"""A 2-process CPU DDP fit (gloo) with EarlyBird + WORM; each rank saves what it decided.

Run from the repository root: ``python -m tests.ddp.fit_search OUT_DIR``. Lightning relaunches this
module once per extra rank.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from lightning_worm import EarlyBirdCallback, WormCallback
from tests.helpers import tiny_loader
from tests.models import TinyNet


def main(out: Path) -> None:
    L.seed_everything(0)
    model = TinyNet()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=0.3, sparsity=1e-4, stop_on_ticket=True)
    worm = WormCallback(eb, schedule="fixed", chi=0.003)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=12, callbacks=[eb, worm], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=2,
    )
    trainer.fit(model, tiny_loader(n=128))
    torch.save({
        "world_size": trainer.world_size,
        "epoch": trainer.current_epoch,
        "distances": eb.distances,
        "ticket_epoch": eb.ticket_epoch,
        "ticket": eb.ticket,
        "mask": eb.mask,
        "chi": worm.chi,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("earlybird", "worm"))},
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join gloo's threads now, not during the interpreter's teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
