"""Benchmark 2: the real speed of the pruned network against its FLOPs, and the fastest way to export it.

Two measurements, both timed with ``torch.utils.benchmark`` (fixed threads), eval mode, no grad, through
:mod:`lightning_worm.core.measure` (FLOPs per example, as Lightning's model summary counts them):

**Export paths** (:func:`export_paths`, also ``python -m examples.benchmarks.latency``): dense vs pruned at
p = 0.5 (``unit_mask`` + ``prune_channels`` with the default coupling), with and without ``round_to=8``,
each run in eager mode (contiguous), channels-last, channels-last with BatchNorm folded into the
convolutions (``export_for_inference(model)``), and that compiled (``export_for_inference(model, compile=True)``),
batch 64 on the CPU, batch 128 on a GPU (``--device cuda``; the suite's ``--accelerator gpu`` runs the same
measurement). Every pruned variant's latency is
divided by the dense model's in the same path, per interleaved round; the goal is a latency ratio of at
most 1.25x the FLOPs ratio. The full measurement (estimated 5-6 minutes on 2 quiet cores, half of it
compiling; it prints its duration)::

    OMP_NUM_THREADS=2 python -m examples.benchmarks.latency --threads 2 --rounds 5 --repeats 2

``--rounds 2 --repeats 1 --no-compile`` is a quick look (about a minute); on a GPU,
``python -m examples.benchmarks.latency --device cuda --batch 128 --no-compile``.

On a GPU, the models are pruned on the CPU and then moved; every timed call is synchronised
(``torch.utils.benchmark.Timer`` calls ``torch.accelerator.synchronize()`` before reading its clock, so a round is
the kernels' time, not their launch) and comes after untimed warm-up forwards (cuDNN's kernel choice, the
allocator's first blocks; ``Timer.timeit`` adds two more of its own).

**Methods** (:func:`run`, in the benchmark suite): for each model, BN gammas are randomised (fixed seed)
and the model is pruned at each ratio by:

- ``lightning-worm``: ``unit_mask`` + ``prune_channels`` (default coupling ``"vote"``), with and without
  ``round_to=8``, and with coupling ``"all"`` (a coupled channel goes only if the ticket prunes it everywhere);
- ``torch-pruning``: its global BN-scale pruner (``BNScalePruner``, ``global_pruning=True``), the method
  behind the "number to beat" measured before this project existed;
- ``ln_structured`` masks on every convolution (what Lightning's ``ModelPruning`` does with
  ``pruning_fn="ln_structured"``), made permanent: zeros in dense tensors;
- global ``l1_unstructured`` masks on every convolution (what the WORM reference code does).

Dense and pruned models are timed interleaved, and every ratio is the per-round ratio to dense: median and
interquartile range over rounds.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune

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
    randomize_bn,
    save_figure,
)
from examples.models import resnet18, vgg11_bn
from lightning_worm import prune_channels, unit_mask
from lightning_worm.core import measure

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


def prune_lightning_worm(
    model: nn.Module, ratio: float, round_to: int | None, coupling: str | None = None
) -> dict[str, Any]:
    options = {} if coupling is None else {"coupling": coupling}
    report = prune_channels(model, unit_mask(model, ratio), torch.zeros(1, 3, 32, 32), round_to=round_to,
                            measure_latency=False, **options)
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
    "lightning-worm coupling=all": (lambda m, r: prune_lightning_worm(m, r, None, "all"), True),
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
        flops_dense, params_dense = measure.forward_flops(dense, example, per_example=True), measure.count_params(dense)
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
                info[key] = dict(method=method, ratio=ratio,
                                 params=measure.count_params(model, nonzero=not structural),
                                 flops=measure.forward_flops(model, example, per_example=True),
                                 prune_seconds=time.perf_counter() - t0,
                                 **extra)
        for model in variants.values():
            model.to(device)
        log(f"latency: {model_name}: {len(variants)} variants pruned, timing on {device_name(settings)}")
        for batch in settings.latency_batches:
            x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)).to(device)

            contenders = {k: _seconds(measure.timer(m, x, num_threads=settings.threads), settings.latency_repeats)
                          for k, m in variants.items()}
            with torch.no_grad():
                for model in variants.values():  # one untimed warm-up each
                    model(x)
                samples = interleave(contenders, settings.latency_rounds)
            ratios = paired_ratios(samples, "dense")
            for key in variants:
                info[key][f"ms_b{batch}"] = Spread.of(samples[key]).median * 1e3
                info[key][f"ratio_b{batch}"] = ratios[key]
        for key, i in info.items():
            rows.append(dict(model=model_name, name=key, params_ratio=i["params"] / params_dense,
                             flops_ratio=i["flops"] / flops_dense, **i))
    section = _section(settings, rows, out_dir)
    # Dense vs pruned at p = 0.5 with and without round_to=8 through every export path: batch 64 on the CPU, 128 on a
    # GPU (the largest of `latency_batches`). The compiled path only in the full mode: compiling takes minutes.
    paths = PATHS if settings.mode == "full" else tuple(p for p in PATHS if p != "compile")
    batch = max(settings.latency_batches)
    export_rows = export_paths(settings.latency_models, batch=batch, rounds=settings.latency_rounds,
                               repeats=settings.latency_repeats, threads=settings.threads, paths=paths, echo=log,
                               device=settings.device, warmup=5 if settings.on_gpu else 2)
    where = device_name(settings) if settings.on_gpu else f"{settings.threads} thread(s)"
    section.markdown += (
        f"\n**Export paths** (dense vs pruned at p = 0.5, default coupling, batch {batch}, {where}; `export` is "
        "`export_for_inference(model)`: channels-last with BatchNorm folded into the convolutions; `compile` is "
        "`export_for_inference(model, compile=True)`"
        + ("" if "compile" in paths else ", timed in the full mode only") + "):\n\n"
        + export_table(export_rows) + "\n"
    )
    section.data["export_paths"] = [_jsonable(r) for r in export_rows]
    exported = [r for r in export_rows if r["path"] == "export" and "error" not in r and r["variant"] != "dense"]
    if exported:
        section.headline.append(
            f"Exported (`export_for_inference`), p = 0.5, batch {batch}, {device_name(settings)}: latency ratio "
            "(FLOPs ratio) " + "; ".join(f"{r['model']} {r['variant']} {r['ratio'].median:.2f} "
                                         f"({r['flops_ratio']:.2f})" for r in exported) + ".")
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
        for method in ("lightning-worm", "lightning-worm round_to=8", "lightning-worm coupling=all",
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
        "Coupling `all` removes a channel shared by several BN layers (a residual sum, MobileNetV2's expand and "
        "depthwise pair) only if the ticket prunes it in all of them: with independent random gammas that is rare, "
        "so it removes fewer FLOPs than the default `vote`, which removes as many as the ticket asks on average "
        "(those the ticket prunes in most coupled layers first). Timed with `torch.utils.benchmark`, "
        f"{settings.threads} thread(s). oneDNN's primitive cache is raised to "
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
    markers = dict(zip(list(METHODS), "osPD^v", strict=False))
    colors = dict(zip(settings.latency_models, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=False))
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



def _seconds(timer: Any, repeats: int) -> Callable[[], float]:
    """One round of a contender: the mean seconds per forward over ``repeats`` forwards."""
    return lambda: timer.timeit(repeats).mean


# ------------------------------------------------------------------------------------- export paths

#: eager: as built; channels_last: only the memory format; export: ``export_for_inference(model)`` (channels-last,
#: BatchNorm folded); compile: ``export_for_inference(model, compile=True)``.
PATHS = ("eager", "channels_last", "export", "compile")
VARIANTS = {"dense": None, "pruned": 0, "pruned round_to=8": 8}


def _prepared(model: nn.Module, path: str) -> nn.Module:
    if path == "eager":
        return copy.deepcopy(model).eval()
    if path == "channels_last":
        return measure.export_for_inference(model, fuse_batchnorm=False)
    return measure.export_for_inference(model, compile=path == "compile")


def export_paths(
    models: Sequence[str] = ("vgg11_bn", "resnet18", "mobilenet_v2"),
    *,
    ratio: float = 0.5,
    batch: int = 64,
    rounds: int = 5,
    repeats: int = 2,
    threads: int = 2,
    paths: Sequence[str] = PATHS,
    echo: Callable[[str], None] = print,
    device: torch.device | str = "cpu",
    warmup: int = 2,
) -> list[dict[str, Any]]:
    """Dense vs pruned (with and without ``round_to=8``) in every export path, timed interleaved per model.

    Pruned on the CPU, then moved to ``device`` with the inputs; ``warmup`` untimed forwards per contender (the
    first compiles the compiled path). A path's output is checked against the eager model's: within 1e-3 on the
    CPU, within 1 % of the largest logit on a GPU (cuDNN may use TF32 and other kernels per memory format).

    Returns:
        One row per (model, variant, path): ``flops_ratio``, ``ms`` (median), ``ratio`` (latency / dense in the
        same path, a :class:`Spread` over rounds), ``vs_eager`` (latency / dense eager), ``compile_seconds``.
        A path that fails (``torch.compile`` without a working compiler, say) gets an ``error`` instead.
    """
    torch.set_num_threads(threads)
    device = torch.device(device)
    rows = []
    for name in models:
        dense = build(name)
        example = torch.zeros(1, 3, 32, 32)
        variants = {"dense": dense}
        for variant, round_to in VARIANTS.items():
            if round_to is not None:
                variants[variant] = copy.deepcopy(dense)
                prune_lightning_worm(variants[variant], ratio, round_to or None)
        flops = {k: measure.forward_flops(m, example, per_example=True) for k, m in variants.items()}
        variants = {k: m.to(device) for k, m in variants.items()}
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)).to(device)
        contenders: dict[tuple[str, str], Callable[[], float]] = {}
        errors: dict[str, str] = {}
        compile_seconds: dict[tuple[str, str], float] = {}
        for path in paths:
            inputs = x if path == "eager" else x.contiguous(memory_format=torch.channels_last)
            for variant, model in variants.items():
                t0 = time.perf_counter()
                try:
                    ready = _prepared(model, path)
                    with torch.no_grad():
                        expected = model.eval()(x)
                        for _ in range(warmup):  # warm-up; compiles the compiled path
                            out = ready(inputs)
                    if device.type == "cpu":
                        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
                    else:
                        scale = float(expected.abs().max())
                        torch.testing.assert_close(out, expected, rtol=1e-2, atol=1e-2 * scale)
                except Exception as error:  # noqa: BLE001 - reported in the table
                    errors[path] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    break
                compile_seconds[(variant, path)] = time.perf_counter() - t0
                contenders[(variant, path)] = _seconds(measure.timer(ready, inputs, num_threads=threads), repeats)
        echo(f"{name}: {len(contenders)} contenders ready, timing {rounds} rounds x {repeats} forwards, batch {batch}")
        with torch.no_grad():
            samples = interleave(contenders, rounds)
        for path in paths:
            if path in errors:
                rows.append(dict(model=name, variant="all", path=path, error=errors[path]))
                continue
            dense_key = ("dense", path)
            for variant in variants:
                per_round = [v / d for v, d in zip(samples[(variant, path)], samples[dense_key], strict=True)]
                eager = samples.get(("dense", "eager"))
                vs_eager = [v / d for v, d in zip(samples[(variant, path)], eager, strict=True)] if eager else []
                rows.append(dict(
                    model=name, variant=variant, path=path, flops_ratio=flops[variant] / flops["dense"],
                    ms=Spread.of(samples[(variant, path)]).median * 1e3, ratio=Spread.of(per_round),
                    vs_eager=Spread.of(vs_eager) if vs_eager else None,
                    compile_seconds=compile_seconds[(variant, path)],
                ))
    return rows


def export_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`export_paths` as a Markdown table, a failing path with its reason."""
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["variant"], r["path"], "n/a", "n/a", "n/a", "n/a", "n/a", r["error"]])
            continue
        goal = "" if r["variant"] == "dense" else ("yes" if r["ratio"].median <= 1.25 * r["flops_ratio"] else "no")
        lines.append([
            r["model"], r["variant"], r["path"], f"{r['flops_ratio']:.2f}", f"{r['ms']:.1f}", r["ratio"].fmt(2),
            "" if r["vs_eager"] is None else r["vs_eager"].fmt(2),
            "" if r["variant"] == "dense" else f"{r['ratio'].median / r['flops_ratio']:.2f}", goal,
        ])
    return markdown_table(["model", "variant", "path", "FLOPs ratio", "ms", "latency ratio (same path)",
                           "latency / dense eager", "latency / FLOPs", "<= 1.25"], lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Print the export-path table (see the module docstring for the full command)."""
    parser = argparse.ArgumentParser(description="Dense vs pruned latency in eager, channels-last and compiled form.")
    parser.add_argument("--models", nargs="+", default=["vgg11_bn", "resnet18", "mobilenet_v2"],
                        choices=["vgg11_bn", "resnet18", "mobilenet_v2"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ratios are per round)")
    parser.add_argument("--repeats", type=int, default=2, help="forwards per contender per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile path")
    parser.add_argument("--device", default="cpu", help="where the models run: cpu, or cuda (a GPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per contender before the rounds")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    start = time.perf_counter()
    paths = [p for p in PATHS if not (args.no_compile and p == "compile")]
    rows = export_paths(args.models, ratio=args.ratio, batch=args.batch, rounds=args.rounds, repeats=args.repeats,
                        threads=args.threads, paths=paths, device=args.device, warmup=args.warmup)
    where = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"\n{where}, batch {args.batch}, 32x32, {args.threads} thread(s), p = {args.ratio} (default coupling), "
          f"{args.rounds} rounds x {args.repeats} forwards; ratios: pruned / dense, median [IQR] over rounds\n")
    print(export_table(rows))
    compiled = [r["compile_seconds"] for r in rows if r.get("path") == "compile" and "error" not in r]
    if compiled:
        print(f"\ncompiling took {sum(compiled):.0f} s in all")
    print(f"{time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
