"""FSDP2 through Lightning's public API with the three callbacks; each rank saves what it saw.

``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` (FSDP2) with a LightningModule whose
``configure_model`` applies ``torch.distributed.fsdp.fully_shard`` to each of its layers on the mesh
``self.device_mesh["data_parallel"]``: what a user of FSDP2 writes. The search, WORM and the prune mid-fit run
over the sharded parameters (DTensors); ``last.ckpt`` is a single-file checkpoint (``save_distributed_checkpoint=
False``) that ``load_pruned`` reloads.

Run from the repository root: ``python -m tests.gpu.fit_fsdp2 OUT_DIR [ACCELERATOR [DEVICES [plain]]]`` (default:
``gpu`` on every CUDA device; ``plain``: the same fit without the callbacks, which shows that the set-up itself
trains: it does on 2 CPU processes with gloo, ``python -m tests.gpu.fit_fsdp2 OUT cpu 2 plain``). Lightning
relaunches this module once per extra rank.
"""

import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from tests.helpers import tiny_loader
from tests.models import TinyNet


class ShardedTinyNet(TinyNet):
    """TinyNet whose conv, BatchNorm and linear layers are each an FSDP2 unit (sharded on dim 0)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in [*self.features, self.classifier]:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer, mesh=mesh)


class Record(Callback):
    """Global parameter shapes (a DTensor's ``shape`` is the global one) at each epoch end, losses after the
    prune, and the devices every parameter and optimizer state lives on."""

    def __init__(self, prune: PruneAndFinetune | None) -> None:
        self.prune = prune
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.losses_after: list[float] = []
        self.devices: set[str] = set()
        self.dtensor = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pruned = self.prune is not None and self.prune.pruned_epoch is not None
        if pruned and trainer.current_epoch > self.prune.pruned_epoch:
            self.losses_after.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module):
        self.shapes = {n: tuple(p.shape) for n, p in pl_module.named_parameters()}
        self.dtensor = any(type(p).__name__ == "DTensor" for p in pl_module.parameters())
        tensors = [*pl_module.parameters()]
        tensors += [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)
                    and v.dim() > 0]
        self.devices |= {t.device.type for t in tensors}


def main(out: Path, accelerator: str = "gpu", devices: int | None = None, plain: bool = False) -> None:
    if devices is None:
        devices = torch.cuda.device_count() if accelerator == "gpu" else 2
    L.seed_everything(0)
    model = ShardedTinyNet()
    callbacks: list[Callback] = []
    prune = None
    eb = None
    if not plain:
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
        prune = PruneAndFinetune(eb, wait_for="ticket", finetune_epochs=2)
        callbacks = [eb, WormCallback(eb, schedule="fixed", chi=0.003), prune]
    record = Record(prune)
    checkpoint = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, max_epochs=5 if plain else 10,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                       save_distributed_checkpoint=False),
        callbacks=[*callbacks, record, checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, tiny_loader(n=128))
    torch.save({
        "world_size": trainer.world_size,
        "epoch": trainer.current_epoch,
        "ticket_epoch": None if eb is None else eb.ticket_epoch,
        "pruned_epoch": None if prune is None else prune.pruned_epoch,
        "units_after": None if prune is None or prune.report is None else prune.report.get("units_after"),
        "shapes": record.shapes,
        "dtensor": record.dtensor,
        "devices": sorted(record.devices),
        "losses_after": record.losses_after,
        "finite": all(math.isfinite(v) for v in record.losses_after),
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join the process group's threads now, not during teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(Path(argv[0]), *argv[1:2], *[int(d) for d in argv[2:3]], plain="plain" in argv[3:])
