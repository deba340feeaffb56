"""A distributed CPU fit (gloo) at the defaults (sparsity "auto", the prune waits for a ready ticket) that searches,
prunes mid-fit and keeps training; each rank saves its state, and rank 0 writes the logs, the pruning report and a
final checkpoint.

Run from the repository root: ``python -m tests.ddp.fit_prune OUT_DIR [--nodes N] [--devices D] [--strategy S]
[--accelerator A] [--sync-batchnorm]`` (by default 1 node x 2 processes, ``ddp``, on the CPU; ``--strategy fsdp``:
FSDP2; ``--accelerator gpu --sync-batchnorm``: two GPUs with SyncBatchNorm, as ``tests/gpu/test_cuda.py`` runs it).
Started once, Lightning relaunches it once per extra rank; started by a launcher (``LOCAL_RANK`` set, with
``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, as torchrun or SLURM do), each process is one rank. Outputs:
``OUT_DIR/rank{global_rank}.pt`` from every rank; ``OUT_DIR/node{NODE_RANK}/`` stands for each node's local disk
(the logger's folder, the report and ``final.ckpt``, all written by rank 0 only).
"""

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.core.sharding import whole
from tests.helpers import tiny_loader
from tests.models import ShardedTinyNet

#: The strategies this fit runs under, by name; each takes the same search, WORM and prune.
STRATEGIES = ("ddp", "fsdp")


class CountSteps(Callback):
    def __init__(self):
        self.steps_at_epoch_end = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps_at_epoch_end.append(trainer.global_step)


def make_strategy(name: str, world_size: int = 2):
    """The ``Trainer``'s ``strategy`` for ``name`` (one of :data:`STRATEGIES`)."""
    if name == "ddp":
        return "ddp"
    if name == "fsdp":  # FSDP2: ShardedTinyNet applies fully_shard in configure_model
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    raise ValueError(f"unknown strategy {name!r}; known: {STRATEGIES}")


def main(out: Path, nodes: int = 1, devices: int = 2, strategy: str = "ddp", accelerator: str = "cpu",
         sync_batchnorm: bool = False) -> None:
    node_dir = out / f"node{os.environ.get('NODE_RANK', '0')}"  # this node's local disk
    L.seed_everything(0)
    model = ShardedTinyNet()  # a plain TinyNet except under FSDP2
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
    prune = PruneAndFinetune(eb, max_wait=3, finetune_epochs=2)
    steps = CountSteps()
    trainer = L.Trainer(
        accelerator=accelerator, num_nodes=nodes, devices=devices, strategy=make_strategy(strategy, nodes * devices),
        sync_batchnorm=sync_batchnorm, max_epochs=10,
        logger=CSVLogger(node_dir), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[steps, eb, WormCallback(eb, schedule="fixed", chi=0.01), prune],
    )
    trainer.fit(model, tiny_loader(n=128))
    trainer.save_checkpoint(node_dir / "final.ckpt")  # every rank calls it; rank 0 writes it
    torch.save({
        "world_size": trainer.world_size,
        "node_rank": trainer.node_rank,
        "local_rank": trainer.local_rank,
        "pruned_epoch": prune.pruned_epoch,
        "ticket_epoch": eb.ticket_epoch,
        "push": (eb.relative.strength, eb.decay.decay),
        "steps_at_epoch_end": steps.steps_at_epoch_end,
        "report": prune.report,
        "report_path": prune.report_path,
        "state": {k: whole(v).clone() for k, v in model.state_dict().items()},  # FSDP2: gathered from the shards
        "wrapped_params": [tuple(p.shape) for p in trainer.strategy.model.parameters()],
        "optimizer_params": [tuple(p.shape) for g in trainer.optimizers[0].param_groups for p in g["params"]],
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join gloo's threads now, not during the interpreter's teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--sync-batchnorm", action="store_true")
    args = parser.parse_args()
    main(args.out, args.nodes, args.devices, args.strategy, args.accelerator, args.sync_batchnorm)
