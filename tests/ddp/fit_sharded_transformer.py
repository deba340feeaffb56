"""A tiny ViT searched by attention heads or element-wise q/k weights, with WORM and the prune, on 2 CPU processes
under DDP or FSDP2 (``fully_shard`` per block, then the root). Each rank saves the ticket, the pruned shapes,
whole weights and outputs on a fixed batch.

Run from the repository root: ``python -m tests.ddp.fit_sharded_transformer OUT_DIR ddp|fsdp SOURCE``.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from examples.vit import ViTClassifier
from lightning_worm import AttentionHeadSource, EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.core.sharding import is_sharded, whole
from tests.ddp.fit_prune import CountSteps
from tests.helpers import tiny_loader


class ShardedViT(ViTClassifier):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main(out: Path, kind: str, source: str) -> None:
    L.seed_everything(0)
    model = ShardedViT(num_classes=4, image_size=8, patch_size=2, dim=16, depth=2, num_heads=4)
    # Magnitude scores on both strategies: under FSDP2 the tracker gives no slimming gates (the default "auto" then
    # scores by magnitude), under DDP it would, and the two fits are compared for the same ticket.
    tracked = AttentionHeadSource(score="magnitude") if source == "attention_heads" else source
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=tracked)
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket", finetune_epochs=1)
    steps = CountSteps()
    strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[steps, eb, WormCallback(eb, schedule="fixed", chi=0.01), prune],
    )
    trainer.fit(model, tiny_loader(n=64))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        outputs = model(x)
    torch.save({
        "ticket_epoch": eb.ticket_epoch,
        "ticket": eb.ticket.to_dict(),
        "pruned_epoch": prune.pruned_epoch,
        "steps_at_epoch_end": steps.steps_at_epoch_end,
        "heads": [block.attn.num_heads for block in model.model.blocks],
        "state": {k: whole(v).clone() for k, v in model.state_dict().items()},
        "sharded": all(is_sharded(p) for p in model.parameters()) if kind != "ddp" else None,
        "outputs": outputs,
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
