"""Benchmark 1: what the callbacks cost while the ticket is searched.

Training-step time and peak memory of a real ``lightning.Trainer`` fit of the full-width CIFAR
ResNet-18 and VGG-11-BN with no callback, with ``EarlyBirdCallback`` + ``WormCallback`` and with the
sparsity term on as well, interleaved in one process (ABC, BCA, CAB, ...). Each fit runs two epochs of
``overhead_steps`` steps on fixed synthetic CIFAR-shaped data: the first is the warm-up, at its end the
tracker takes its first mask and WORM's ``"fixed"`` schedule switches the truncation on, so every timed
step (the second epoch) runs with truncation active (checked and reported). Step time is read with
``perf_counter`` at the batch boundaries (batch start to batch end: forward, backward, callbacks,
optimizer step). The callbacks' own hooks are timed too, which is the overhead without the noise.

Second part: the per-epoch cost of the tracker's work (``unit_mask`` and the window distances)
on a model with 100k+ BatchNorm channels, and on the two real models.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from examples.benchmarks.common import (
    Section,
    Settings,
    Spread,
    device_name,
    interleave,
    log,
    markdown_table,
    new_figure,
    paired_ratios,
    peak_memory_mib,
    randomize_bn,
    reset_peak_memory,
    save_figure,
    synchronize,
    synthetic_loader,
    timed,
    trainer,
)
from examples.models import build_model
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, TicketDetector, WormCallback, unit_mask

PER_STEP_HOOKS = ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")


class StepClock(pl.Callback):
    """Seconds from each batch start to its end, from epoch ``first_epoch`` on (device-synchronised), as wall
    time and as the process's CPU time; also records how many channels WORM truncates at every timed step."""

    def __init__(self, first_epoch: int = 1, worm: WormCallback | None = None,
                 hook_seconds: dict[str, float] | None = None) -> None:
        self.first_epoch, self.worm = first_epoch, worm
        self.hook_seconds = hook_seconds if hook_seconds is not None else {"seconds": 0.0}
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.truncated: list[int] = []
        self._start = self._cpu_start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.first_epoch:
            self.hook_seconds["seconds"] = 0.0  # the hooks' time is summed over the timed epoch only

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.current_epoch >= self.first_epoch:
            synchronize(pl_module.device)
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch >= self.first_epoch:
            synchronize(pl_module.device)
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)
            if self.worm is not None:
                self.truncated.append(self.worm.truncated_units if self.worm.chi < 1.0 else 0)


def instrument(callback: pl.Callback, spent: dict[str, float]) -> None:
    """Wrap the callback's per-step hooks (instance attributes shadow the class's) to sum their seconds."""
    for hook in PER_STEP_HOOKS:
        if getattr(type(callback), hook) is getattr(pl.Callback, hook):
            continue
        original = getattr(callback, hook)

        def wrapped(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        setattr(callback, hook, wrapped)


CONTENDERS = {
    "no callback": None,
    "no callback (A/A control)": None,  # the same fit again: the noise floor of the comparison
    "EarlyBird + WORM (fixed)": 0.0,
    "EarlyBird (sparsity 1e-4) + WORM (fixed)": 1e-4,
}


def fit_once(settings: Settings, arch: str, sparsity: float | None, loader: Any) -> dict[str, Any]:
    """One fit of two epochs; returns the timed steps, peak memory, the hooks' seconds and WORM's truncation."""
    torch.manual_seed(0)
    module = ImageClassifier(arch=arch, width=1.0)
    callbacks: list[pl.Callback] = []
    worm = None
    spent = {"seconds": 0.0}
    if sparsity is not None:
        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=settings.window, threshold=settings.threshold,
                                       sparsity=sparsity, verbose=False)
        worm = WormCallback(early_bird, schedule="fixed", chi=0.003)
        callbacks = [early_bird, worm]
        for cb in callbacks:
            instrument(cb, spent)
    clock = StepClock(first_epoch=1, worm=worm, hook_seconds=spent)
    fit = trainer(settings, [*callbacks, clock], max_epochs=2, limit_train_batches=settings.overhead_steps,
                  limit_val_batches=0)
    reset_peak_memory(settings.device)
    fit.fit(module, train_dataloaders=loader)
    return dict(step=statistics.median(clock.times), cpu_step=statistics.median(clock.cpu_times),
                steps=len(clock.times), peak_mib=peak_memory_mib(settings.device),
                hook_seconds=spent["seconds"] / max(len(clock.times), 1),
                truncated_min=min(clock.truncated) if clock.truncated else None)


def mask_cost(settings: Settings) -> list[dict[str, Any]]:
    """Median milliseconds of ``channel_mask`` and of one window update, per model."""
    device = settings.device
    layers = max(1, settings.mask_channels // 1024)
    models = {
        f"synthetic: {layers} x BatchNorm2d(1024)": nn.Sequential(*[nn.BatchNorm2d(1024) for _ in range(layers)]),
        "resnet18": build_model("resnet18"),
        "vgg11_bn": build_model("vgg11_bn"),
    }
    rows = []
    for name, model in models.items():
        model = randomize_bn(model, 0).to(device)
        channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        mask_times = timed(functools.partial(unit_mask, model, 0.5), repeats=settings.mask_repeats, warmup=2,
                           device=device)
        detector = TicketDetector(window=settings.window, threshold=settings.threshold, keep_history=True)
        mask = unit_mask(model, 0.5)
        for _ in range(settings.window):  # fill the window: every update then computes its distances
            detector.update(mask)
        update_times = timed(functools.partial(detector.update, mask), repeats=settings.mask_repeats, device=device)
        rows.append(dict(model=name, channels=channels, mask_ms=Spread.of([t * 1e3 for t in mask_times]),
                         update_ms=Spread.of([t * 1e3 for t in update_times]),
                         total_ms=Spread.of([(a + b) * 1e3 for a, b in zip(mask_times, update_times, strict=True)])))
    return rows


def run(settings: Settings, out_dir: Path) -> Section:
    """Interleaved fits with and without the callbacks, then the mask cost.

    Returns:
        A :class:`Section` with the step-time table, the mask-cost table and a box plot of step times.
    """
    start = time.perf_counter()
    loader = synthetic_loader(settings.overhead_batch * settings.overhead_steps, settings.overhead_batch)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for arch in settings.overhead_archs:
        log(f"overhead: {arch}, {settings.overhead_rounds} rounds x {len(CONTENDERS)} fits")
        results[arch] = interleave(
            {name: (lambda s=sparsity, a=arch: fit_once(settings, a, s, loader))
             for name, sparsity in CONTENDERS.items()},
            settings.overhead_rounds,
        )
    log("overhead: mask cost")
    masks = mask_cost(settings)
    section = _section(settings, results, masks, out_dir)
    section.seconds = time.perf_counter() - start
    return section


def _section(settings: Settings, results: dict[str, Any], masks: list[dict[str, Any]], out_dir: Path) -> Section:
    device = device_name(settings)
    cpu = not settings.on_gpu  # CPU time says nothing about a GPU's work
    rows, data, headline = [], defaultdict(dict), []
    for arch, per in results.items():
        wall = paired_ratios({name: [r["step"] for r in runs] for name, runs in per.items()}, "no callback")
        cpu_time = paired_ratios({name: [r["cpu_step"] for r in runs] for name, runs in per.items()}, "no callback")
        parts = []
        for name, runs in per.items():
            step, hooks = Spread.of([r["step"] for r in runs]), Spread.of([r["hook_seconds"] for r in runs])
            truncated = {r["truncated_min"] for r in runs}
            main = cpu_time[name] if cpu else wall[name]
            rows.append([arch, name, step.fmt(1, 1e3), wall[name].fmt(3, spread="range"),
                         cpu_time[name].fmt(3, spread="range") if cpu else "n/a",
                         f"{100 * (main.median - 1):+.1f} %", f"{hooks.median * 1e3:.3f}",
                         f"{100 * hooks.median / step.median:.3f} %",
                         f"{Spread.of([r['peak_mib'] for r in runs]).median:.0f}",
                         "n/a" if truncated == {None} else ", ".join(str(t) for t in sorted(truncated)), device])
            data[arch][name] = dict(runs=runs, wall_ratio=vars(wall[name]), cpu_time_ratio=vars(cpu_time[name]))
            if name != "no callback":
                parts.append(f"{name}: {100 * (main.median - 1):+.1f} % {'CPU time' if cpu else 'step time'} per step "
                             f"[{100 * (main.lo - 1):+.1f}, {100 * (main.hi - 1):+.1f}] "
                             f"(wall {100 * (wall[name].median - 1):+.1f} %), "
                             f"own hooks {100 * hooks.median / step.median:.2f} % of a step")
        headline.append(f"Overhead, {arch} (batch {settings.overhead_batch}, {device}): " + "; ".join(parts) + ".")
    step_table = markdown_table(
        ["model", "callbacks", "step ms (wall) median [IQR]", "wall-time ratio [min, max]",
         "CPU-time ratio [min, max]", "overhead", "callback hooks ms/step", "hooks / step", "peak memory MiB",
         "channels truncated at every timed step", "device"], rows)
    mask_table = markdown_table(
        ["model", "BN channels", "channel_mask ms", "window update ms", "per-epoch total ms", "device"],
        [[m["model"], f"{m['channels']:,}", m["mask_ms"].fmt(2), m["update_ms"].fmt(2), m["total_ms"].fmt(2), device]
         for m in masks])
    memory = ("CUDA max allocated" if settings.on_gpu else
              "the process's peak resident set size (VmHWM, reset before each fit; it includes everything the "
              "process holds, so only differences between rows mean anything)")
    md = (
        f"Full-width CIFAR models, batch {settings.overhead_batch} of synthetic 3x32x32 images"
        + ("" if settings.on_gpu else " (batch 128 is the GPU setting; a smaller batch on the CPU makes the "
           "callbacks' fixed per-step cost a larger share, so the ratio is conservative)")
        + f", precision {settings.precision}, {settings.overhead_steps} timed steps per fit after a warm-up "
        f"epoch of {settings.overhead_steps} steps, {settings.overhead_rounds} interleaved rounds. WORM runs the "
        "`fixed` schedule (chi = 0.003 from the first mask, taken at the end of the warm-up epoch), so truncation "
        "is active at every timed step; the last column counts the truncated channels seen at each one. "
        "Ratios are per-round ratios to the fit without callbacks (median [min, max]) of the per-fit median step "
        "time, as wall time and"
        + (" as CPU time of the process (`time.process_time`), which a busy machine disturbs far less than wall "
           "time: the `overhead` column is the CPU-time one." if cpu else " (on the GPU) wall time only.")
        + " The A/A control runs the fit without callbacks a second time: its distance from 1 is the noise floor, "
        "and differences below it are not resolved. The callback hooks' own time (`on_after_backward`, "
        "`on_before_optimizer_step`, ...), timed inside the fit, is the overhead without the background noise. "
        f"Memory: {memory}. Target: at most 2 % slower.\n\n{step_table}\n\n"
        f"**Per-epoch cost of the tracker** (`channel_mask` at p = 0.5 on randomised gammas, plus one window "
        f"update with a full window of {settings.window} masks; median [IQR] of {settings.mask_repeats}; "
        f"target < 50 ms for 100k+ channels):\n\n{mask_table}\n"
    )
    figure = _plot(results, out_dir / "overhead_steps.png", device, "cpu_step" if cpu else "step")
    data["mask_cost"] = [{k: (vars(v) if isinstance(v, Spread) else v) for k, v in m.items()} for m in masks]
    big = masks[0]
    headline.append(f"Tracker cost per epoch, {big['channels']:,} BN channels: "
                    f"channel_mask {big['mask_ms'].median:.1f} ms, "
                    f"with the window update {big['total_ms'].median:.1f} ms (target < 50 ms).")
    return Section("Overhead of the callbacks during the search", md, [figure], dict(data), headline)


def _plot(results: dict[str, Any], path: Path, device: str, key: str) -> Path:
    fig, axes = new_figure(ncols=len(results), width=5.0 * len(results), height=3.8)
    for ax, (arch, per) in zip(axes, results.items(), strict=True):
        names = list(per)
        ax.boxplot([[r[key] * 1e3 for r in per[n]] for n in names], showfliers=True)
        ax.set_xticks(range(1, len(names) + 1), [n.replace(" + ", "\n+ ") for n in names], fontsize=7)
        kind = "CPU" if key == "cpu_step" else "wall"
        ax.set(title=f"{arch} ({device})", ylabel=f"median {kind} time per step, per fit (ms)")
    return save_figure(fig, path)
