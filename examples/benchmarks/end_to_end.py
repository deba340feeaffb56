"""Benchmark 4: wall time and training FLOPs to reach a target accuracy, end to end.

Four ways to a model, on the same data, seed and recipe (the example ``ImageClassifier``):

- **dense**: plain training for ``e2e_epochs``;
- **network slimming**: training for ``e2e_epochs`` with the L1 term on the BN gammas (sparsity 1e-4, applied by
  an ``EarlyBirdCallback`` that prunes nothing), ``prune_channels`` of the global mask at p = 0.5 at the end,
  then ``e2e_finetune_epochs`` of fine-tuning (a new fit with the same recipe);
- **EarlyBird + prune + fine-tune**: one fit of ``e2e_epochs`` that prunes at the ticket and fine-tunes to the end;
- **EarlyBird + WORM + prune + fine-tune**: the same with ``WormCallback`` (elbow schedule).

The target accuracy is the dense run's best validation accuracy (same seed) minus ``e2e_target_drop``. A
pruning method reaches it when its *pruned* model does (from the evaluation just after the prune on), so
the time and FLOPs to target include the whole search; the dense run reaches it on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything

from examples.benchmarks.common import (
    Meter, Section, Settings, datamodule, device_name, forward_flops, interleave, log,
    markdown_table, mean_std, new_figure, save_figure, trainer,
)
from examples.benchmarks.ticket import CHI, ELBOW, PRUNE_RATIO, SPARSITY, search_callbacks
from examples.callbacks import evaluate
from examples.module import ImageClassifier
from lightning_worm import channel_mask, prune_channels

CONTENDERS: dict[str, str] = {
    "dense": "dense",
    "network slimming (L1, prune at end, fine-tune)": "slimming",
    "EarlyBird + prune + fine-tune": "earlybird",
    "EarlyBird + WORM + prune + fine-tune": "worm",
}


def train(settings: Settings, arch: str, width: float, seed: int, kind: str) -> dict[str, Any]:
    """One contender's whole training; returns its per-epoch curve, from which epoch it is final, and the totals.

    ``curve`` holds dicts of ``epoch``, ``seconds`` and ``train_flops`` (cumulative) and ``val_acc``; ``final_from``
    is the first curve index whose model is the delivered one (pruned, for the pruning methods).
    """
    seed_everything(seed, verbose=False)
    module = ImageClassifier(arch=arch, width=width)
    data = datamodule(settings, seed=0)
    epochs = settings.e2e_epochs
    if kind == "dense":
        meter = Meter()
        trainer(settings, [meter], max_epochs=epochs).fit(module, datamodule=data)
        curve, final_from = meter.epochs, 0
    elif kind == "slimming":
        callbacks, meter = search_callbacks(settings, None, prune=False)
        # The tracker only applies the L1 term here; its ticket is not used.
        trainer(settings, callbacks, max_epochs=epochs).fit(module, datamodule=data)
        start = time.perf_counter()
        example = torch.zeros(2, 3, 32, 32, device=module.device)
        prune_channels(module, channel_mask(module, PRUNE_RATIO), example, measure_latency=False)
        after = evaluate(module, data.val_dataloader())
        prune_seconds = time.perf_counter() - start
        seconds, flops = meter.epochs[-1]["seconds"] + prune_seconds, meter.total_flops
        finetune = Meter(offset_seconds=seconds, offset_flops=flops)
        trainer(settings, [finetune], max_epochs=settings.e2e_finetune_epochs).fit(module, datamodule=data)
        pruned_point = dict(epoch=epochs - 1, seconds=seconds, train_flops=flops, val_acc=after)
        curve = meter.epochs + [pruned_point] + [dict(e, epoch=e["epoch"] + epochs) for e in finetune.epochs]
        final_from = len(meter.epochs)
    else:
        callbacks, meter = search_callbacks(settings, "elbow" if kind == "worm" else None)
        trainer(settings, callbacks, max_epochs=epochs).fit(module, datamodule=data)
        curve = list(meter.epochs)
        if meter.pruned_epoch is None:
            final_from = len(curve)  # no ticket, nothing pruned: never delivers a pruned model
        else:
            i = next(i for i, e in enumerate(curve) if e["epoch"] == meter.pruned_epoch)
            pruned_point = dict(curve[i], val_acc=meter.acc_after_prune)
            curve = curve[: i + 1] + [pruned_point] + curve[i + 1:]
            final_from = i + 1
    test_acc = evaluate(module, data.test_dataloader())
    example = torch.zeros(1, 3, 32, 32, device=module.device)
    return dict(seed=seed, curve=curve, final_from=final_from, test_acc=test_acc,
                inference_flops=forward_flops(module, example), seconds=curve[-1]["seconds"],
                train_flops=curve[-1]["train_flops"])


def reach(result: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first point of the delivered model at or above ``target``, or ``None``."""
    return next((e for e in result["curve"][result["final_from"]:] if e["val_acc"] is not None
                 and e["val_acc"] >= target), None)


def run(settings: Settings, out_dir: Path) -> Section:
    """Every contender on every seed, interleaved (order rotated per seed), for each architecture.

    Returns:
        A :class:`Section` with the table and accuracy-vs-FLOPs curves.
    """
    start = time.perf_counter()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    archs = settings.overhead_archs if settings.on_gpu else (settings.search_arch,)
    width = 1.0 if settings.on_gpu else settings.search_width
    for arch in archs:
        contenders: dict[str, Callable[[], dict[str, Any]]] = {}
        for name, kind in CONTENDERS.items():
            seeds = iter(settings.e2e_seeds)

            def one(kind: str = kind, seeds: Any = seeds, name: str = name, arch: str = arch) -> dict[str, Any]:
                seed = next(seeds)
                log(f"end to end: {arch}: {name}, seed {seed}")
                return train(settings, arch, width, seed, kind)

            contenders[name] = one
        results[arch] = interleave(contenders, rounds=len(settings.e2e_seeds))
    section = _section(settings, results, width, out_dir)
    section.seconds = time.perf_counter() - start
    return section


def _section(settings: Settings, results: dict[str, Any], width: float, out_dir: Path) -> Section:
    rows, data = [], {}
    device = device_name(settings)
    for arch, per in results.items():
        dense_runs = per["dense"]
        targets = [max(e["val_acc"] for e in r["curve"]) - settings.e2e_target_drop for r in dense_runs]
        dense_flops = dense_runs[0]["inference_flops"]
        for name, runs in per.items():
            hits = [reach(r, t) for r, t in zip(runs, targets)]
            reached = [h for h in hits if h is not None]
            note = "" if len(reached) == len(hits) else f" ({len(hits) - len(reached)} of {len(hits)} never)"
            rows.append([
                arch, name, mean_std(targets), mean_std([h["seconds"] for h in reached]) + note,
                mean_std([h["train_flops"] / 1e12 for h in reached]) + note,
                mean_std([r["seconds"] for r in runs]), mean_std([r["train_flops"] / 1e12 for r in runs]),
                mean_std([r["curve"][-1]["val_acc"] for r in runs]), mean_std([r["test_acc"] for r in runs]),
                mean_std([r["inference_flops"] / dense_flops for r in runs]), device,
            ])
            data.setdefault(arch, {})[name] = [
                dict({k: v for k, v in r.items() if k != "curve"}, target=t, reached=h, curve=r["curve"])
                for r, t, h in zip(runs, targets, hits)]
    table = markdown_table(
        ["model", "method", "target val acc", "wall s to target", "training TFLOPs to target", "total wall s",
         "total training TFLOPs", "final val acc", "test acc", "inference FLOPs ratio", "device"], rows)
    data_name = "CIFAR-10" if settings.data == "cifar10" else "scikit-learn digits (offline, 32x32)"
    md = (
        f"{data_name}, width {width:g}, batch {settings.search_batch}, precision {settings.precision}, "
        f"{settings.e2e_epochs} epochs (network slimming: + {settings.e2e_finetune_epochs} fine-tuning epochs "
        f"after its prune), p = {PRUNE_RATIO}, sparsity {SPARSITY:g} for every method with an L1 term, chi {CHI}, "
        f"elbow {ELBOW}, seeds {', '.join(map(str, settings.e2e_seeds))}, contenders interleaved. Target: the dense "
        f"run's best validation accuracy minus {settings.e2e_target_drop:g}; a pruning method counts only once its "
        "pruned model reaches it. Wall time includes validation and the prune; FLOPs are training FLOPs "
        "(3 x forward x samples). Mean ± std over seeds.\n\n"
        + f"{table}\n"
    )
    figure = _plot(results, out_dir / "end_to_end.png", device, settings.e2e_target_drop)
    headline = [f"End to end ({row[0]}, target val acc {row[2]}): " + "; ".join(
        f"{r[1]}: {r[3]} s and {r[4]} TFLOPs to target, inference FLOPs ratio {r[9]}"
        for r in rows if r[0] == row[0]) + "."
        for row in rows if row[1] == "dense"]
    return Section("End to end: time and FLOPs to a target accuracy", md, [figure], data, headline)


def _plot(results: dict[str, Any], path: Path, device: str, drop: float) -> Path:
    fig, axes = new_figure(ncols=len(results), width=6.5 * len(results), height=4.2)
    for ax, (arch, per) in zip(axes, results.items()):
        for i, (name, runs) in enumerate(per.items()):
            for r in runs:
                xs = [e["train_flops"] / 1e12 for e in r["curve"]]
                ys = [e["val_acc"] for e in r["curve"]]
                ax.plot(xs, ys, "-", color=f"C{i}", alpha=0.7, lw=1.2, label=name if r is runs[0] else None)
                f = r["final_from"]
                if 0 < f < len(xs):
                    ax.plot(xs[f], ys[f], "v", color=f"C{i}", ms=7)
        target = max(e["val_acc"] for e in per["dense"][0]["curve"]) - drop
        ax.axhline(target, ls=":", color="gray", lw=1, label="target (first seed)")
        ax.set(xlabel="cumulative training TFLOPs", ylabel="validation accuracy", ylim=(0, 1.02),
               title=f"{arch} ({device}); v: just after the prune")
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)
