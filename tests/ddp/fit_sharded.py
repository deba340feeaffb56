"""The search + WORM + prune fit of ``fit_prune`` on 2 CPU processes, under DDP or FSDP2 (``ModelParallelStrategy``
with ``fully_shard`` in ``configure_model``), at the defaults (sparsity "auto", the prune waits for a ready ticket).
Each rank saves what the test compares: the ticket, the steps, the whole pruned weights, the outputs on a fixed
batch, and a single-file checkpoint (rank 0).

Run from the repository root: ``python -m tests.ddp.fit_sharded OUT_DIR ddp|fsdp|fsdp-dcp [RESUME_FROM]``
(``fsdp-dcp`` writes distributed checkpoints; a checkpoint every epoch under ``OUT_DIR/checkpoints``).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.core.sharding import is_sharded, whole
from tests.ddp.fit_prune import CountSteps
from tests.helpers import tiny_loader
from tests.models import ShardedTinyNet


def main(out: Path, kind: str, resume: str | None = None) -> None:
    L.seed_everything(0)
    model = ShardedTinyNet()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
    prune = PruneAndFinetune(eb, max_wait=3, finetune_epochs=2)
    steps = CountSteps()
    strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=kind == "fsdp-dcp")
    every_epoch = ModelCheckpoint(out / "checkpoints", filename="{epoch}", save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=10, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[steps, eb, WormCallback(eb, schedule="fixed", chi=0.01), prune,
                                               every_epoch],
    )
    trainer.fit(model, tiny_loader(n=128), ckpt_path=resume)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    optimizer = trainer.optimizers[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    torch.save({
        "pruned_epoch": prune.pruned_epoch,
        "ticket_epoch": eb.ticket_epoch,
        "push": (eb.relative.strength, eb.decay.decay),
        "steps_at_epoch_end": steps.steps_at_epoch_end,
        "report": prune.report,
        "state": {k: whole(v).clone() for k, v in model.state_dict().items()},
        "outputs": outputs,
        "sharded": [is_sharded(p) for p in model.parameters()],
        "optimizer_holds_model": [id(p) for p in params] == [id(p) for p in model.parameters()],
        "momentum_shapes": [tuple(whole(optimizer.state[p]["momentum_buffer"]).shape) for p in params],
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join gloo's threads now, not during the interpreter's teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])
