"""Benchmark 2: the real speed of the pruned network against its FLOPs.

For each model, BN gammas are randomised (fixed seed) and the model is pruned at each ratio by:

- ``lightning-worm``: ``channel_mask`` + ``prune_channels`` (coupling ``"all"``), with and without ``round_to=8``,
  and with coupling ``"mean_rank"`` (coupled channels ranked by their mean ``|gamma|``, as torch-pruning does);
- ``torch-pruning``: its global BN-scale pruner (``BNScalePruner``, ``global_pruning=True``), the method
  behind the "number to beat" measured before this project existed;
- ``ln_structured`` masks on every convolution (what Lightning's ``ModelPruning`` does with
  ``pruning_fn="ln_structured"``), made permanent: zeros in dense tensors;
- global ``l1_unstructured`` masks on every convolution (what the WORM reference code does).

Dense and pruned models are timed interleaved (eval mode, no grad), and every ratio is the per-round
ratio to dense: median and interquartile range over rounds.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

from examples.benchmarks.common import (
    Section, Settings, Spread, count_params, device_name, forward_flops, interleave, log, markdown_table,
    new_figure, paired_ratios, randomize_bn, save_figure, timed,
)
from examples.models import resnet18, vgg11_bn
from lightning_worm import channel_mask, prune_channels

SEED = 0
#: Measured on this project's 2-core CPU before it existed (batch 64, 32x32, torch-pruning global BN-scale, 0.5).
NUMBER_TO_BEAT = {"vgg11_bn": (0.39, 0.72), "resnet18": (0.27, 0.55), "mobilenet_v2": (0.27, 0.67)}


def build(name: str) -> nn.Module:
    """A fresh model with randomised BN gammas: the CIFAR VGG-11-BN / ResNet-18 or torchvision's MobileNetV2."""
    if name == "mobilenet_v2":
        from torchvision.models import mobilenet_v2

        model = mobilenet_v2(num_classes=10)
    else:
        model = {"vgg11_bn": vgg11_bn, "resnet18": resnet18}[name](num_classes=10)
    return randomize_bn(model, SEED).eval()


def _classifiers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def prune_lightning_worm(model: nn.Module, ratio: float, round_to: int | None, coupling: str = "all") -> dict[str, Any]:
    report = prune_channels(model, channel_mask(model, ratio), torch.zeros(1, 3, 32, 32), coupling=coupling,
                            round_to=round_to, measure_latency=False)
    return {"channels_pruned": report.pruned_from_ticket + report.pruned_outside_ticket,
            "ticket_pruned": report.ticket_pruned}


def prune_torch_pruning(model: nn.Module, ratio: float) -> dict[str, Any]:
    pruner = tp.pruner.BNScalePruner(
        model, torch.zeros(1, 3, 32, 32), importance=tp.importance.BNScaleImportance(), pruning_ratio=ratio,
        global_pruning=True, ignored_layers=_classifiers(model),
    )
    pruner.step()
    return {}


def mask_ln_structured(model: nn.Module, ratio: float) -> dict[str, Any]:
    for conv in _convs(model):
        prune.ln_structured(conv, "weight", amount=ratio, n=1, dim=0)
        prune.remove(conv, "weight")
    return {}


def mask_l1_unstructured(model: nn.Module, ratio: float) -> dict[str, Any]:
    params = [(conv, "weight") for conv in _convs(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=ratio)
    for conv, name in params:
        prune.remove(conv, name)
    return {}


METHODS: dict[str, tuple[Callable[[nn.Module, float], dict[str, Any]], bool]] = {
    # name: (prune in place, structural?)
    "lightning-worm": (lambda m, r: prune_lightning_worm(m, r, None), True),
    "lightning-worm round_to=8": (lambda m, r: prune_lightning_worm(m, r, 8), True),
    "lightning-worm coupling=mean_rank": (lambda m, r: prune_lightning_worm(m, r, None, "mean_rank"), True),
    "torch-pruning BN-scale (global)": (prune_torch_pruning, True),
    "ln_structured mask (ModelPruning-style)": (mask_ln_structured, False),
    "l1_unstructured mask (global, WORM code)": (mask_l1_unstructured, False),
}


def run(settings: Settings, out_dir: Path) -> Section:
    """Prune every model at every ratio by every method and time them interleaved with dense.

    Returns:
        A :class:`Section` with a table per model, a headline table at ratio 0.5 and a latency-vs-FLOPs plot.
    """
    start = time.perf_counter()
    device = settings.device
    rows: list[dict[str, Any]] = []
    for model_name in settings.latency_models:
        dense = build(model_name)
        example = torch.zeros(1, 3, 32, 32)
        flops_dense, params_dense = forward_flops(dense, example), count_params(dense)
        variants: dict[str, nn.Module] = {"dense": dense}
        info: dict[str, dict[str, Any]] = {"dense": dict(method="dense", ratio=0.0, params=params_dense,
                                                         flops=flops_dense)}
        for method, (apply, structural) in METHODS.items():
            ratios = settings.latency_ratios if structural else settings.latency_masked_ratios
            for ratio in ratios:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                extra = apply(model, ratio)
                key = f"{method} p={ratio:g}"
                variants[key] = model.eval()
                info[key] = dict(method=method, ratio=ratio, params=count_params(model, nonzero=not structural),
                                 flops=forward_flops(model, example), prune_seconds=time.perf_counter() - t0, **extra)
        for model in variants.values():
            model.to(device)
        log(f"latency: {model_name}: {len(variants)} variants pruned, timing on {device_name(settings)}")
        for batch in settings.latency_batches:
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)).to(device)

            def contender(model: nn.Module, x: torch.Tensor = x) -> Callable[[], float]:
                repeats = settings.latency_repeats
                return lambda: statistics.median(timed(lambda: model(x), repeats=repeats, device=device))

            with torch.no_grad():
                for model in variants.values():  # one untimed warm-up each
                    timed(contender(model), repeats=1, device=device)
                samples = interleave({k: contender(m) for k, m in variants.items()}, settings.latency_rounds)
            ratios = paired_ratios(samples, "dense")
            for key in variants:
                info[key][f"ms_b{batch}"] = Spread.of(samples[key]).median * 1e3
                info[key][f"ratio_b{batch}"] = ratios[key]
        for key, i in info.items():
            rows.append(dict(model=model_name, name=key, params_ratio=i["params"] / params_dense,
                             flops_ratio=i["flops"] / flops_dense, **i))
    section = _section(settings, rows, out_dir)
    section.seconds = time.perf_counter() - start
    return section


def _section(settings: Settings, rows: list[dict[str, Any]], out_dir: Path) -> Section:
    device = device_name(settings)
    batches = settings.latency_batches
    big = max(batches)
    header = ["model", "method", "ratio", "params", "FLOPs"]
    header += [f"latency b{b} (ratio [IQR])" for b in batches] + [f"b{b} ms" for b in batches] + ["device"]
    table = markdown_table(header, [
        [r["model"], r["method"], f"{r['ratio']:g}", f"{r['params_ratio']:.2f}", f"{r['flops_ratio']:.2f}",
         *[r[f"ratio_b{b}"].fmt(2) for b in batches], *[f"{r[f'ms_b{b}']:.2f}" for b in batches], device]
        for r in rows
    ])
    headline_rows = []
    for model_name in settings.latency_models:
        at = {r["method"]: r for r in rows if r["model"] == model_name and r["ratio"] == 0.5}
        flops_beat, latency_beat = NUMBER_TO_BEAT.get(model_name, (float("nan"), float("nan")))
        for method in ("lightning-worm", "lightning-worm round_to=8", "lightning-worm coupling=mean_rank",
                       "torch-pruning BN-scale (global)"):
            r = at.get(method)
            if r is None:
                continue
            lat = r[f"ratio_b{big}"].median
            headline_rows.append([model_name, method, f"{r['flops_ratio']:.2f}", f"{lat:.2f}",
                                  f"{lat / r['flops_ratio']:.2f}", f"{flops_beat:.2f} / {latency_beat:.2f}"])
    headline = markdown_table(
        ["model", "method (p=0.5)", "FLOPs ratio", f"latency ratio b{big}", "latency / FLOPs",
         "number to beat: FLOPs / latency"], headline_rows)
    figure = _plot(settings, rows, out_dir / "latency_vs_flops.png", big)
    md = (
        f"Dense vs pruned inference on {device}, 32x32 inputs, eval mode, no grad; ratios are pruned / dense, "
        f"per-round ratios over {settings.latency_rounds} interleaved rounds of {settings.latency_repeats} "
        f"forward(s), median [interquartile range]. BN gammas drawn from U(0.05, 1) with seed {SEED}. "
        "`params` of the mask-only methods counts the non-zero weights; their FLOPs are dense (masks do not "
        "skip work). The mask-only methods are timed at p = "
        f"{', '.join(f'{r:g}' for r in settings.latency_masked_ratios)}. "
        "Coupling `all` (lightning-worm's default) removes a channel shared by several BN layers (a residual sum, "
        "MobileNetV2's expand and depthwise pair) only if the ticket prunes it in all of them: with independent "
        "random gammas that is rare, so it removes fewer FLOPs than torch-pruning, which ranks such groups by their "
        "mean score, as `mean_rank` does. oneDNN's primitive cache is raised to "
        f"{os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'its default')} entries: with the default 1024, "
        "timing a dozen variants interleaved evicts the kernels at every forward and made pruned MobileNetV2s "
        "look 1.4-1.8x slower than dense.\n\n"
        f"**At p = 0.5, batch {big}** (a latency / FLOPs of 1 is the physical limit: latency falling as FLOPs do):\n\n"
        f"{headline}\n\nAll rows:\n\n{table}\n"
    )
    headline = [
        f"Latency / FLOPs ratios at p = 0.5, batch {big}, {device}: " + "; ".join(
            f"{m} {method}: {lat} vs {flops}" for m, method, flops, lat, *_ in headline_rows) + "."
    ]
    return Section("Real speed of the pruned network", md, [figure], {"rows": [_jsonable(r) for r in rows]}, headline)


def _plot(settings: Settings, rows: list[dict[str, Any]], path: Path, batch: int) -> Path:
    fig, (ax,) = new_figure(width=7.5, height=5.0)
    markers = dict(zip(list(METHODS), "osPD^v"))
    colors = dict(zip(settings.latency_models, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for r in rows:
        if r["method"] == "dense":
            continue
        spread = r[f"ratio_b{batch}"]
        ax.errorbar(r["flops_ratio"], spread.median, yerr=[[spread.median - spread.q1], [spread.q3 - spread.median]],
                    fmt=markers[r["method"]], color=colors[r["model"]], alpha=0.8, ms=6)
    for model, (flops, latency) in NUMBER_TO_BEAT.items():
        if model in colors:
            ax.plot(flops, latency, "*", color=colors[model], ms=14, mec="black")
    ax.plot([0, 1.05], [0, 1.05], "k--", lw=1)
    for label, m in markers.items():
        ax.plot([], [], m, color="gray", label=label)
    for model, c in colors.items():
        ax.plot([], [], "s", color=c, label=model)
    ax.plot([], [], "*", color="gray", mec="black", ms=12, label="number to beat (tp, p=0.5, before)")
    ax.set(xlabel="FLOPs ratio (pruned / dense)", ylabel=f"latency ratio, batch {batch}", xlim=(0, 1.1), ylim=(0, 1.3),
           title=f"Latency vs FLOPs ({device_name(settings)}; dashed: latency falls as FLOPs do)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (vars(v) if isinstance(v, Spread) else v) for k, v in row.items()}
