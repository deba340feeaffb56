"""Benchmark: transformers. Mask cost at BERT-base scale, what removing heads saves, and the head search.

Three measurements:

1. **Mask cost at scale.** The element-wise query/key mask of a BERT-base-size model (12 layers, 768 wide:
   14.2 M units): the time of one epoch's mask (global ranking with ``mask_from_scores``, and the
   detector's update: packing, distances) and the checkpoint growth per stored mask (the detector's
   ``state_dict`` saved with ``torch.save``), against the goal of < 250 ms and 1 bit per unit.
2. **Removing half the heads of a BERT-base-size random model** (``transformers``' ``BertModel`` from the
   default config, random weights) on the CPU: latency (median, eval, no grad; batch 4 x 128 tokens) and
   FLOPs, dense against the lowest-scored half of the heads of every layer removed.
3. **The head search on the example ViT** (digits): Early-Bird against WORM (elbow) over seeds: the
   ticket epoch, the validation accuracy right after the prune and the epochs the fine-tuning needs to
   get back to the accuracy before the prune.

Run::

    python -m examples.benchmarks.transformer --quick      # a few minutes
    python -m examples.benchmarks.transformer              # full: 5 seeds, 20 epochs
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch import seed_everything

from examples.benchmarks.common import Section, markdown_table
from lightning_worm import AttentionHeadSource, EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.core.detector import TicketDetector
from lightning_worm.core.masks import mask_from_scores

#: mode -> (ViT seeds, ViT epochs, mask repeats, latency repeats)
MODES = {"tiny": (1, 3, 1, 2), "quick": (2, 12, 2, 3), "full": (5, 20, 5, 5)}


# ------------------------------------------------------------------------------------- 1. mask cost


def mask_cost(repeats: int, layers: int = 12, width: int = 768, seed: int = 0) -> dict[str, Any]:
    """Per-epoch mask time and checkpoint bytes per stored mask for a BERT-base-size element-wise mask."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(f"encoder.layer.{i}.attention.self.{p}", (width, width)) for i in range(layers) for p in ("query", "key")]
    units = sum(a * b for _, (a, b) in shapes)
    detector = TicketDetector(window=3, threshold=0.01, keep_history=True)
    rank_times, update_times = [], []
    for step in range(repeats + 1):
        scores = {name: torch.randn(shape, generator=g).abs() for name, shape in shapes}
        start = time.perf_counter()
        mask = mask_from_scores(scores, 0.5).mask
        ranked = time.perf_counter()
        detector.update(mask)
        done = time.perf_counter()
        if step:  # the first is a warm-up
            rank_times.append(ranked - start)
            update_times.append(done - ranked)

    def saved_bytes(state: Any) -> int:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getbuffer().nbytes

    masks_held = len(detector.state_dict()["history"]) if "history" in detector.state_dict() else repeats + 1
    with_history = saved_bytes(detector.state_dict())
    one_more = copy.deepcopy(detector)
    one_more.update(mask_from_scores({n: torch.randn(s, generator=g).abs() for n, s in shapes}, 0.5).mask)
    growth = saved_bytes(one_more.state_dict()) - with_history
    return {
        "units": units,
        "rank_ms": 1e3 * statistics.median(rank_times),
        "update_ms": 1e3 * statistics.median(update_times),
        "epoch_ms": 1e3 * statistics.median(r + u for r, u in zip(rank_times, update_times)),
        "checkpoint_bytes": with_history,
        "masks_held": masks_held,
        "bytes_per_stored_mask": growth,
        "bits_per_unit": 8 * growth / units,
    }


# ----------------------------------------------------------------------------- 2. heads on BERT-base


def bert_heads(repeats: int, batch: int = 4, tokens: int = 128) -> dict[str, Any]:
    """Latency and FLOPs of a random BERT-base, dense and with half the heads of every layer removed."""
    from transformers import BertConfig, BertModel  # the benchmark's optional dependency

    from lightning_worm.core.measure import forward_flops
    from lightning_worm.core.sources.attention_surgery import prune_heads

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    ids = torch.randint(0, 30522, (batch, tokens))
    source = AttentionHeadSource()
    ticket = {}
    for name, block in source.tracked(model).items():
        scores = source.scores(block)
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[scores.argsort()[: scores.numel() // 2]] = False
        ticket[name] = keep
    dense = copy.deepcopy(model)
    # A short example is enough to find the output projections; FLOPs and latency are measured below.
    report = prune_heads(model, ticket, source, (ids[:1, :16],), measure_latency=False)

    def latency(m: torch.nn.Module) -> float:
        with torch.no_grad():
            m(ids)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                m(ids)
                times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    dense_ms, pruned_ms = [], []
    for _ in range(2):  # interleaved rounds
        dense_ms.append(latency(dense))
        pruned_ms.append(latency(model))
    flops_dense, flops_pruned = forward_flops(dense, (ids,)), forward_flops(model, (ids,))
    return {
        "heads": f"{sum(report.channels_before.values())} -> {sum(report.channels_after.values())}",
        "params_ratio": report.params_after / report.params_before,
        "flops_ratio": flops_pruned / flops_dense,
        "latency_dense_ms": min(dense_ms),
        "latency_pruned_ms": min(pruned_ms),
        "latency_ratio": min(pruned_ms) / min(dense_ms),
        "batch": f"{batch} x {tokens} tokens",
    }


# ------------------------------------------------------------------------------ 3. the ViT head search


def vit_search(epochs: int, worm: bool, seed: int) -> dict[str, Any]:
    """One fit of the example ViT with the head search (+ WORM), the prune at the ticket and fine-tuning."""
    import lightning as L

    from examples.callbacks import AccuracyAroundPrune
    from examples.data import DigitsDataModule
    from examples.vit import ViTClassifier

    seed_everything(seed, verbose=False)
    module = ViTClassifier(dim=64, depth=4, num_heads=8)
    early_bird = EarlyBirdCallback(prune_ratio=0.5, window=5, threshold=0.1, source=AttentionHeadSource(),
                                   verbose=False)
    callbacks: list[Any] = [early_bird]
    if worm:
        callbacks.append(WormCallback(early_bird, schedule="elbow", chi=0.003, elbow=0.15))
    prune = PruneAndFinetune(early_bird, measure_latency=False)
    accuracy = AccuracyAroundPrune(prune)
    callbacks += [prune, accuracy]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, seed=0))
    before, recovered = accuracy.before_prune, None
    if before is not None:
        recovered = next((e - prune.pruned_epoch for e, acc in sorted(accuracy.val_acc.items())
                          if e > prune.pruned_epoch and acc >= before), None)
    return {"seed": seed, "ticket_epoch": early_bird.ticket_epoch, "before": before, "after": accuracy.after_prune,
            "epochs_to_recover": recovered, "final": accuracy.val_acc.get(max(accuracy.val_acc, default=0))}


def _mean(values: Sequence[Optional[float]], fmt: str = "{:.1f}") -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    text = fmt.format(statistics.mean(present))
    if len(present) > 1:
        text += " ± " + fmt.format(statistics.stdev(present))
    return text + ("" if len(present) == len(values) else f" ({len(values) - len(present)} none)")


def run(settings: Any = None, out_dir: Optional[Path] = None, mode: Optional[str] = None) -> Section:
    """Run the three measurements; ``mode`` (or ``settings.mode``) is ``"tiny"``, ``"quick"`` or ``"full"``."""
    mode = mode or getattr(settings, "mode", "quick")
    seeds, epochs, mask_repeats, latency_repeats = MODES[mode]
    started = time.perf_counter()
    cost = mask_cost(mask_repeats)
    heads = bert_heads(latency_repeats) if mode != "tiny" else None
    fits = {name: [vit_search(epochs, worm, seed) for seed in range(seeds)]
            for name, worm in (("EarlyBird", False), ("WORM (elbow)", True))}

    lines = [
        f"Mode `{mode}`. Element-wise query/key mask of a BERT-base-size model ({cost['units']:,} units): "
        f"ranking {cost['rank_ms']:.0f} ms, detector update {cost['update_ms']:.0f} ms, "
        f"**{cost['epoch_ms']:.0f} ms per epoch** (goal < 250 ms); each stored mask adds "
        f"{cost['bytes_per_stored_mask']:,} bytes to the checkpoint (**{cost['bits_per_unit']:.3f} bits per "
        "unit**).",
        "",
    ]
    if heads:
        lines += [
            f"Random BERT-base (`transformers` default config), heads {heads['heads']} (the lowest-scored half of "
            f"every layer removed), CPU, batch {heads['batch']}:",
            "",
            markdown_table(["", "params", "FLOPs", "latency (ms)"], [
                ["dense", "1.00", "1.00", f"{heads['latency_dense_ms']:.0f}"],
                ["half the heads", f"{heads['params_ratio']:.2f}", f"{heads['flops_ratio']:.2f}",
                 f"{heads['latency_pruned_ms']:.0f} ({heads['latency_ratio']:.2f}x)"],
            ]),
            "",
        ]
    rows = []
    for name, results in fits.items():
        rows.append([name, _mean([r["ticket_epoch"] for r in results]),
                     _mean([None if r["before"] is None else 100 * r["before"] for r in results]),
                     _mean([None if r["after"] is None else 100 * r["after"] for r in results]),
                     _mean([r["epochs_to_recover"] for r in results]),
                     _mean([None if r["final"] is None else 100 * r["final"] for r in results])])
    lines += [
        f"Example ViT on the digits (attention heads, p = 0.5, window 5, threshold 0.1), {seeds} seeds, "
        f"{epochs} epochs, pruned at the ticket:",
        "",
        markdown_table(["method", "ticket epoch", "val acc before prune (%)", "right after prune (%)",
                        "epochs to recover", "final val acc (%)"], rows),
    ]
    headline = [f"transformer: {cost['units'] / 1e6:.1f} M-unit mask in {cost['epoch_ms']:.0f} ms/epoch, "
                f"{cost['bits_per_unit']:.2f} bits/unit stored"]
    if heads:
        headline.append(f"BERT-base, half the heads: FLOPs {heads['flops_ratio']:.2f}x, latency "
                        f"{heads['latency_ratio']:.2f}x")
    return Section(title="Transformers", markdown="\n".join(lines), headline=headline,
                   data={"mask_cost": cost, "bert_heads": heads, "vit": fits},
                   seconds=time.perf_counter() - started)


def main(argv: Optional[Sequence[str]] = None) -> Section:
    parser = argparse.ArgumentParser(description="Transformer benchmark of lightning-worm.")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode", default="full")
    parser.add_argument("--mode", choices=tuple(MODES), dest="mode")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    section = run(mode=args.mode)
    print(section.markdown)
    print(f"\n({section.seconds:.0f} s)")
    return section


if __name__ == "__main__":
    main()
