"""Benchmark 4: end to end, wall time and training FLOPs to reach the dense accuracy, and what is delivered.

Each method of :mod:`examples.benchmarks.claims` under the first recipe of the settings (the runs are shared with
the ticket section): dense training, Early-Bird and WORM (prune at the ticket, fine-tune to the end), the
random-ticket control, and network slimming (train with the L1 term, prune at the end, fine-tune). The target is
the dense run's final validation accuracy (same seed) minus ``target_drop``; a pruning method reaches it only once
its *pruned* model does (from the re-calibrated network right after the prune on), so its time and FLOPs to the
target include the whole search. The dense run reaches it on its own curve. Then the final test accuracy and the
delivered network's parameters, inference FLOPs and latency.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from examples.benchmarks import claims
from examples.benchmarks.common import (
    DATA_NAMES,
    Section,
    Settings,
    device_name,
    markdown_table,
    new_figure,
    run_threads,
    save_figure,
)
from examples.benchmarks.ticket import fmt, median, verdict

GOAL_FLOPS = 0.6  # end to end at most 0.6x dense training's FLOPs at equal accuracy


def run(settings: Settings, out_dir: Path) -> Section:
    """Time and FLOPs to the target, per method and seed; medians and ranges over seeds.

    Returns:
        A :class:`Section` with the table, the goal measured and the accuracy-vs-FLOPs curves.
    """
    start = time.perf_counter()
    res = claims.results(settings)
    recipe = settings.recipes[0]
    section = _section(settings, recipe, res["runs"][recipe], out_dir)
    section.seconds = time.perf_counter() - start
    return section


def to_target(settings: Settings, per: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Per method and seed: the target, the point that reaches it (or ``None``), and the ratios to dense."""
    dense = claims.by_seed(per["dense"])
    out: dict[str, list[dict[str, Any]]] = {}
    for method, rs in per.items():
        rows = []
        for r in rs:
            d = dense[r["seed"]]
            goal = claims.target(settings, d)
            hit, dense_hit = claims.reach(r, goal), claims.reach(d, goal)
            rows.append(dict(
                seed=r["seed"], target=goal, reached=hit,
                flops_ratio=None if hit is None or dense_hit is None else hit["train_flops"] / dense_hit["train_flops"],
                time_ratio=None if hit is None or dense_hit is None else hit["seconds"] / dense_hit["seconds"],
                total_flops_ratio=r["train_flops"] / d["train_flops"],
                inference_flops_ratio=r["inference_flops"] / d["inference_flops"],
                params_ratio=r["params"] / d["params"], latency_ratio=r["latency_ms"] / d["latency_ms"],
            ))
        out[method] = rows
    return out


def _section(settings: Settings, recipe_name: str, per: dict[str, list[dict[str, Any]]], out_dir: Path) -> Section:
    recipe = claims.RECIPES[recipe_name]
    reached = to_target(settings, per)
    rows, goal_rows = [], []
    for method, rs in per.items():
        hits = reached[method]
        pts: list[dict[str, Any] | None] = [h["reached"] for h in hits]
        never = sum(p is None for p in pts)
        rows.append([
            claims.LABELS[method], fmt([h["target"] for h in hits], 1, 100),
            fmt([None if p is None else p["epoch"] + 1 for p in pts], 0),
            fmt([None if p is None else p["train_flops"] / 1e9 for p in pts], 2),
            fmt([h["flops_ratio"] for h in hits], 2), fmt([None if p is None else p["seconds"] for p in pts], 1),
            fmt([h["time_ratio"] for h in hits], 2), fmt([h["total_flops_ratio"] for h in hits], 2),
            fmt([r["test_acc"] for r in rs], 1, 100), fmt([r["params"] for r in rs], 0),
            fmt([h["inference_flops_ratio"] for h in hits], 2), fmt([r["latency_ms"] for r in rs], 3),
            fmt([h["latency_ratio"] for h in hits], 2),
        ])
        if method != "dense":
            # A seed that never reaches the target counts as missing the goal.
            values = [float("inf") if h["flops_ratio"] is None else h["flops_ratio"] for h in hits]
            m = median(values)
            shown = "target never reached (median)" if m is None or m == float("inf") else f"{m:.2f}x (median)"
            if never:
                shown += f"; {never} of {len(pts)} seeds never reached it"
            goal_rows.append([f"training FLOPs to the target <= {GOAL_FLOPS}x dense's", claims.LABELS[method], shown,
                              verdict(None if m == float("inf") else m, GOAL_FLOPS, at_most=True,
                                      missing="the target was never reached")])
    table = markdown_table(
        ["method", "target val acc %", "epochs to target", "training GFLOPs to target", "vs dense",
         "wall s to target", "vs dense", "total training FLOPs vs dense", "final test acc %", "params",
         "inference FLOPs vs dense", "latency ms (batch 64)", "vs dense"], rows)
    goals = markdown_table(["goal (issue 9)", "method", "measured", "verdict"], goal_rows)
    md = (
        f"{DATA_NAMES[settings.data]}; {settings.arch} width {settings.width:g}, batch {settings.batch}, "
        f"{recipe.describe()} ({recipe.source}); {settings.epochs} epochs (network slimming: + "
        f"{settings.slimming_finetune_epochs} fine-tuning epochs after its prune), p = {settings.prune_ratio}, seeds "
        f"{', '.join(map(str, settings.seeds))}, on {device_name(settings)} "
        f"({run_threads(settings)}). Target: the dense run's final validation accuracy minus "
        f"{100 * settings.target_drop:g} point (same seed); a pruning method counts only once its pruned model "
        "reaches it. Wall time includes validation, the prune and the re-calibration (not the extra evaluations of "
        "the measurement); training FLOPs are 3 x forward FLOPs per example (FlopCounterMode) x examples, with the "
        "pruned model's FLOPs after the prune, plus the re-calibration's forward passes. \"vs dense\": median of "
        "per-seed ratios to the dense run of the same seed. Latency: the final model, eval mode, batch 64, "
        "`torch.utils.benchmark` with the run's threads (median; runs in parallel share the machine). "
        "Medians [min, max] over seeds.\n\n**Goals vs measured.**\n\n" + goals + "\n\n" + table + "\n"
    )
    figure = _plot(per, out_dir / "end_to_end.png", settings)
    data = {m: [dict({k: v for k, v in r.items() if k != "curve"}, **{k: v for k, v in h.items() if k != "reached"},
                     curve=r["curve"]) for r, h in zip(rs, reached[m], strict=True)] for m, rs in per.items()}
    headline = [f"End to end ({settings.data}, {recipe.label}, {len(settings.seeds)} seeds, target: dense final "
                f"val acc - {100 * settings.target_drop:g} pt): " + "; ".join(
                    f"{row[0]}: training FLOPs to the target {row[4]} (x dense's), test acc {row[8]} %, inference "
                    f"FLOPs {row[10]} (x dense's)" for row in rows if row[0] != "dense") + "."]
    return Section("End to end: time and training FLOPs to the dense accuracy", md, [figure], data, headline)


def _plot(per: dict[str, list[dict[str, Any]]], path: Path, settings: Settings) -> Path:
    fig, (ax,) = new_figure(ncols=1, width=8.0, height=4.5)
    for i, (method, rs) in enumerate(per.items()):
        for r in rs:
            xs = [e["train_flops"] / 1e9 for e in r["curve"]]
            ys = [e["val_acc"] for e in r["curve"]]
            ax.plot(xs, ys, "-", color=f"C{i}", alpha=0.6, lw=1, label=claims.LABELS[method] if r is rs[0] else None)
            f = r["final_from"]
            if 0 < f < len(xs):
                ax.plot(xs[f], ys[f], "v", color=f"C{i}", ms=5)
    dense = per["dense"][0]
    ax.axhline(claims.target(settings, dense), ls=":", color="gray", lw=1, label="target (first seed)")
    ax.set(xlabel="cumulative training GFLOPs", ylabel="validation accuracy", ylim=(0, 1.02),
           title=f"{settings.data}, {device_name(settings)}; v: right after the prune (re-calibrated)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
