"""Benchmark 3: the ticket search, Early-Bird against WORM and its schedules, over seeds.

Every method is one ``fit`` of the example ``ImageClassifier`` (SGD, lr 0.1, step schedule over the whole
fit) with an ``EarlyBirdCallback`` (p = 0.5, window 5, threshold 0.1, sparsity 1e-4 as in the Early-Bird
code), a ``PruneAndFinetune`` that prunes the ticket the epoch it emerges and fine-tunes to the end, and,
for WORM, a ``WormCallback`` (chi 0.003; elbow 0.15) with the ``elbow`` (the paper's), ``fixed`` or
``greedy`` schedule. The settings are the papers' for every method; nothing is tuned per method. The
methods run interleaved, their order rotated from seed to seed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import seed_everything

from examples.benchmarks.common import (
    Meter, Section, Settings, datamodule, device_name, interleave, log, markdown_table, mean_std,
    new_figure, save_figure, trainer,
)
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback

SPARSITY, CHI, ELBOW, PRUNE_RATIO = 1e-4, 0.003, 0.15, 0.5

#: method name -> WORM schedule (None: Early-Bird alone)
METHODS: dict[str, str | None] = {
    "EarlyBird": None,
    "WORM (elbow)": "elbow",
    "WORM (fixed)": "fixed",
    "WORM (greedy)": "greedy",
}


def search_callbacks(settings: Settings, schedule: str | None, prune: bool = True) -> tuple[list[Any], Meter]:
    """The tracker, WORM if ``schedule``, ``PruneAndFinetune`` if ``prune``, and a :class:`Meter` last."""
    early_bird = EarlyBirdCallback(prune_ratio=PRUNE_RATIO, window=settings.window, threshold=settings.threshold,
                                   sparsity=SPARSITY, verbose=False)
    callbacks: list[Any] = [early_bird]
    if schedule is not None:
        callbacks.append(WormCallback(early_bird, schedule=schedule, chi=CHI, elbow=ELBOW))
    pruner = PruneAndFinetune(early_bird, measure_latency=False) if prune else None
    if pruner is not None:
        callbacks.append(pruner)
    meter = Meter(pruner)
    return [*callbacks, meter], meter


def search_fit(settings: Settings, arch: str, width: float, seed: int, schedule: str | None,
               epochs: int) -> dict[str, Any]:
    """One fit with the ticket search, the prune at the ticket and the fine-tuning; what happened, in numbers."""
    seed_everything(seed, verbose=False)
    module = ImageClassifier(arch=arch, width=width)
    data = datamodule(settings, seed=0)  # one split for every seed: the seeds vary the training only
    callbacks, meter = search_callbacks(settings, schedule)
    early_bird = callbacks[0]
    fit = trainer(settings, callbacks, max_epochs=epochs)
    fit.fit(module, datamodule=data)
    test_acc = float(fit.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    return summarize(meter, early_bird, test_acc, seed)


def summarize(meter: Meter, early_bird: EarlyBirdCallback, test_acc: float, seed: int) -> dict[str, Any]:
    """One fit in numbers: ticket epoch, validation accuracy just before and just after the prune, the epochs
    after the prune until the accuracy just before it is regained (0 if the prune lost nothing, ``None`` if
    never), final and test accuracy, wall seconds, training FLOPs and the final FLOPs ratio."""
    pruned = meter.pruned_epoch
    before = meter.acc_at(pruned) if pruned is not None else None
    recovered = None
    if pruned is not None and before is not None:
        if meter.acc_after_prune is not None and meter.acc_after_prune >= before - 1e-6:
            recovered = 0
        else:
            recovered = next((e["epoch"] - pruned for e in meter.epochs if e["epoch"] > pruned
                              and e["val_acc"] is not None and e["val_acc"] >= before - 1e-6), None)
    before = None if before is None else round(before, 4)  # logged in float32
    after = None if meter.acc_after_prune is None else round(meter.acc_after_prune, 4)
    return dict(
        seed=seed, ticket_epoch=early_bird.ticket_epoch, pruned_epoch=pruned, acc_before=before, acc_after=after,
        recovery_epochs=recovered, final_val_acc=meter.epochs[-1]["val_acc"],
        test_acc=test_acc, seconds=meter.epochs[-1]["seconds"], train_flops=meter.total_flops,
        flops_ratio=meter.epochs[-1]["flops_per_sample"] / meter.epochs[0]["flops_per_sample"],
        mean_distances=list(early_bird.mean_distances), curve=meter.epochs,
    )


def run(settings: Settings, out_dir: Path) -> Section:
    """Every method on every seed; per method the mean and spread of what :func:`summarize` reports.

    Returns:
        A :class:`Section` with the per-method table, the per-seed table and a plot.
    """
    start = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for_method: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, schedule in METHODS.items():
        seeds = iter(settings.search_seeds)

        def one(schedule: str | None = schedule, seeds: Any = seeds, name: str = name) -> dict[str, Any]:
            seed = next(seeds)
            log(f"ticket search: {name}, seed {seed}")
            return search_fit(settings, settings.search_arch, settings.search_width, seed, schedule,
                              settings.search_epochs)

        for_method[name] = one
    results = interleave(for_method, rounds=len(settings.search_seeds))
    section = _section(settings, results, out_dir)
    section.seconds = time.perf_counter() - start
    return section


def _fmt_count(values: list[Any]) -> str:
    found = [v for v in values if v is not None]
    text = mean_std(found)
    return text if len(found) == len(values) else f"{text} ({len(values) - len(found)} of {len(values)} none)"


def _section(settings: Settings, results: dict[str, list[dict[str, Any]]], out_dir: Path) -> Section:
    rows = []
    for name, runs in results.items():
        rows.append([
            name, _fmt_count([r["ticket_epoch"] for r in runs]), _fmt_count([r["acc_before"] for r in runs]),
            _fmt_count([r["acc_after"] for r in runs]),
            _fmt_count([None if r["acc_after"] is None else r["acc_before"] - r["acc_after"] for r in runs]),
            _fmt_count([r["recovery_epochs"] for r in runs]), mean_std([r["final_val_acc"] for r in runs]),
            mean_std([r["test_acc"] for r in runs]), mean_std([r["seconds"] for r in runs]),
            mean_std([r["train_flops"] / 1e12 for r in runs]), mean_std([r["flops_ratio"] for r in runs]),
        ])
    table = markdown_table(
        ["method", "ticket epoch", "val acc before prune", "val acc just after prune", "drop at prune",
         "epochs to regain acc before prune", "final val acc", "test acc", "wall s", "training TFLOPs",
         "final FLOPs ratio"], rows)
    seed_rows = [[name, r["seed"], r["ticket_epoch"], r["acc_before"], r["acc_after"], r["recovery_epochs"],
                  r["test_acc"], f"{r['seconds']:.1f}", f"{r['train_flops'] / 1e12:.3f}"]
                 for name, runs in results.items() for r in runs]
    seed_table = markdown_table(["method", "seed", "ticket epoch", "acc before", "acc after", "recovery epochs",
                                 "test acc", "wall s", "TFLOPs"], seed_rows)
    data_name = "CIFAR-10" if settings.data == "cifar10" else "scikit-learn digits (offline, 32x32)"
    md = (
        f"{data_name}, {settings.search_arch} width {settings.search_width:g}, batch {settings.search_batch}, "
        f"{settings.search_epochs} epochs per fit (search, prune at the ticket, fine-tune to the end), "
        f"{len(settings.search_seeds)} seeds ({', '.join(map(str, settings.search_seeds))}), "
        f"on {device_name(settings)}. "
        f"p = {PRUNE_RATIO}, window {settings.window}, threshold {settings.threshold}, sparsity {SPARSITY:g} for "
        f"every method, chi {CHI}, elbow {ELBOW}. Epochs are 0-based (the ticket can emerge at epoch "
        f"{settings.window - 1} at the earliest). Accuracies are on the validation split; "
        "\"just after prune\" evaluates the pruned model before any fine-tuning; \"epochs to regain\" counts "
        "epochs after the prune until the validation accuracy is back at its value just before the prune. "
        "Training FLOPs: 3 x forward FLOPs per sample (FlopCounterMode) x samples, with the pruned model's FLOPs "
        "after the prune. Mean ± std over seeds.\n\n"
        + f"{table}\n\n<details><summary>Per seed</summary>\n\n{seed_table}\n\n</details>\n"
    )
    figure = _plot(results, out_dir / "ticket_search.png", settings)
    data = {name: [{k: v for k, v in r.items() if k != "curve"} for r in runs] for name, runs in results.items()}
    setup = f"{settings.search_arch} x{settings.search_width:g}, {len(settings.search_seeds)} seeds"
    headline = [f"Ticket search ({setup}): " + "; ".join(
        f"{name}: ticket epoch {row[1]}, acc {row[2]} -> {row[3]} at the prune, test acc {row[7]}"
        for name, row in zip(results, rows)) + "."]
    return Section("Ticket search: Early-Bird vs WORM", md, [figure], data, headline)


def _plot(results: dict[str, list[dict[str, Any]]], path: Path, settings: Settings) -> Path:
    fig, (ax1, ax2, ax3) = new_figure(ncols=3, width=14.0, height=4.0)
    names = list(results)
    for i, name in enumerate(names):
        runs = results[name]
        for r in runs:
            if r["mean_distances"]:
                ax1.plot(r["mean_distances"], color=f"C{i}", alpha=0.5, lw=1,
                         label=name if r is runs[0] else None)
        epochs = [r["ticket_epoch"] for r in runs if r["ticket_epoch"] is not None]
        ax2.scatter([i] * len(epochs), epochs, color=f"C{i}", alpha=0.7)
        if epochs:
            ax2.plot([i - 0.2, i + 0.2], [statistics.fmean(epochs)] * 2, color="black")
        for r in runs:
            if r["acc_before"] is not None and r["acc_after"] is not None:
                ax3.plot([i - 0.15, i + 0.15], [r["acc_before"], r["acc_after"]], "-o", color=f"C{i}", alpha=0.6, ms=3)
    ax1.axhline(ELBOW, ls=":", color="gray", lw=1)
    ax1.set(xlabel="epoch", ylabel="mean mask distance (window)", title="Mask distance")
    ax1.legend(fontsize=7)
    ax2.set_xticks(range(len(names)), names, fontsize=7)
    ax2.set(ylabel="ticket epoch", title="Ticket epoch (line: mean)")
    ax3.set_xticks(range(len(names)), names, fontsize=7)
    ax3.set(ylabel="validation accuracy", title="Accuracy just before -> just after prune")
    fig.suptitle(f"{settings.search_arch} x{settings.search_width:g}, {len(settings.search_seeds)} seeds, "
                 f"{device_name(settings)}", fontsize=9)
    return save_figure(fig, path)
