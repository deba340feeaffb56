"""A 2-process CPU DDP fit (gloo) of a tiny ViT with attention-head Early-Bird + WORM (+ the head prune).

Run with the repository root importable: ``PYTHONPATH=ROOT python -m tests.ddp.fit_transformer OUT_DIR
[prune] [sources]``. ``sources``: a conv-BatchNorm stem and attention blocks, tracked by BatchNorm channels and
heads (per layer) at once. Each rank saves its masks, decisions, (pruned) weights and working directory.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

from examples.vit import ViTClassifier
from lightning_worm import AttentionHeadSource, BatchNormSource, EarlyBirdCallback, PruneAndFinetune, WormCallback
from tests.helpers import tiny_loader
from tests.models import HybridClassifier


def main(out: Path, prune: bool, sources: bool) -> None:
    L.seed_everything(0)
    if sources:
        model = HybridClassifier()
        source = [BatchNormSource(), AttentionHeadSource(prune_ratio=0.5, scope="layer")]
        eb = EarlyBirdCallback(prune_ratio=0.25, window=2, threshold=1.0, source=source)
    else:
        model = ViTClassifier(num_classes=4, image_size=8, patch_size=2, dim=16, depth=2, num_heads=4)
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source="attention_heads")
    worm = WormCallback(eb, schedule="fixed", chi=0.01)
    callbacks = [eb, worm]
    pruner = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket") if prune else None
    callbacks += [pruner] if pruner else []
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, tiny_loader(n=128))
    torch.save({
        "world_size": trainer.world_size,
        "cwd": os.getcwd(),
        "distances": eb.distances,
        "ticket_epoch": eb.ticket_epoch,
        "ticket": None if eb.ticket is None else eb.ticket.to_dict(),
        "mask": eb.mask.to_dict(),
        "chi": worm.chi,
        "pruned_epoch": pruner.pruned_epoch if pruner else None,
        "heads": [blk.attn.num_heads for blk in (model.net if sources else model.model).blocks],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer_params": [tuple(p.shape) for g in trainer.optimizers[0].param_groups for p in g["params"]],
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # join gloo's threads now, not during the interpreter's teardown
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), prune="prune" in sys.argv[2:], sources="sources" in sys.argv[2:])
