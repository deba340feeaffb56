"""Benchmark 6: tickets worth pruning at the library's defaults (issue 15), on MNIST-1D and on a second task.

Every run of :mod:`examples.benchmarks.claims` is made at the defaults: ``sparsity="auto"``, the prune waits for a
ready ticket (``PruneAndFinetune(wait_for="ready", max_wait=10)``), under the two published recipes' learning
rates and weight decays. This section runs the claims on the settings' task (shared with the ``ticket`` and
``end_to_end`` sections) and again on ``settings.second_task`` (MNIST-1D large: dense training needs its learning
rate drop there), and measures each goal of the issue, per task and recipe, against the dense run of the same
seed and recipe:

- the re-calibrated accuracy right after the prune, over the dense run's validation accuracy at that epoch (at
  least 0.9x), and over the random ticket of the same widths pruned at the same point of the same run (at least
  20 points above it);
- the final test accuracy (at least the dense run's minus 0.5 point) and the total training FLOPs (at most 0.6x
  dense's), under the first recipe (the one trained to the end);
- on the second task, the training FLOPs to reach the dense run's final validation accuracy minus 0.5 point (at
  most 0.7x dense's);
- WORM (elbow) against Early-Bird: ticket epoch, epochs to a ready ticket, accuracy at the prune, recovery.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from examples.benchmarks import claims, end_to_end
from examples.benchmarks.common import DATA_NAMES, Section, Settings, device_name, markdown_table, run_threads
from examples.benchmarks.ticket import fmt, median, verdict

GOAL_VS_DENSE = 0.9  # re-calibrated accuracy right after the prune >= 0.9x the dense run's at that epoch
GOAL_VS_RANDOM = 0.20  # ... and >= 20 points above the random ticket of the same widths
GOAL_FINAL_DROP = 0.005  # final test accuracy >= dense's - 0.5 point
GOAL_TOTAL_FLOPS = 0.6  # total training FLOPs <= 0.6x dense's
GOAL_FLOPS_TO_TARGET = 0.7  # second task: training FLOPs to the dense final accuracy - 0.5 point <= 0.7x dense's
PRUNING = ("earlybird", "worm_elbow")


def run(settings: Settings, out_dir: Path) -> Section:
    """The goals of issue 15 on both tasks; returns the section (tables, goals, per-seed numbers)."""
    start = time.perf_counter()
    tasks = {settings.data: (settings, claims.results(settings)["runs"])}
    if settings.second_task and settings.second_task != settings.data:
        second = replace(settings, data=settings.second_task, methods=settings.second_task_methods)
        tasks[second.data] = (second, claims.results(second)["runs"])
    goals: list[list[str]] = []
    worm_rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for task, (task_settings, runs) in tasks.items():
        data[task] = {}
        for position, (recipe_name, per) in enumerate(runs.items()):
            measured = _measure(task_settings, per, full=position == 0)
            data[task][recipe_name] = measured
            label = f"{task}, {claims.RECIPES[recipe_name].label}"
            goals += _goal_rows(label, measured, full=position == 0, second=task != settings.data)
            worm_rows += _worm_rows(label, measured, full=position == 0)
    md = (
        f"At the library's defaults (`sparsity=\"auto\"`, `PruneAndFinetune(wait_for=\"ready\", max_wait=10)`, "
        f"`ready_ratio` {_default_ready_ratio():g}); p = {settings.prune_ratio}, window {settings.window}, threshold "
        f"{settings.threshold}; {settings.epochs} epochs; seeds {', '.join(map(str, settings.seeds))}; on "
        f"{device_name(settings)} ({run_threads(settings)}). Tasks: "
        + "; ".join(f"`{t}`: {DATA_NAMES[t]}" for t in tasks)
        + ". Recipes: " + "; ".join(claims.RECIPES[r].describe() for r in settings.recipes)
        + ". Every ratio is per seed against the dense run of the same seed and recipe, then the median [min, max] "
        "over seeds; \"vs random\" is the Early-Bird (or WORM) run's re-calibrated accuracy minus the random "
        "ticket's, pruned at the same epoch of the same run (the control shares the run up to the prune). A seed "
        "with no prune counts as missing the goal.\n\n**Goals vs measured.**\n\n"
        + markdown_table(["goal (issue 15)", "task, recipe", "method", "measured", "verdict"], goals)
        + "\n\n**WORM (elbow) against Early-Bird at the defaults** (epochs are 0-based; \"waited\": epochs between "
        "the ticket and the prune while it was not ready; \"share\": the pruned units' share of the scores over a "
        "random ticket's at the prune; recovery: epochs after the prune to the dense final val accuracy - 0.5 point, "
        "first recipe only).\n\n"
        + markdown_table(["task, recipe", "method", "ticket epoch", "pruned epoch", "waited", "ready at the prune",
                          "share", "val acc before", "after surgery", "re-calibrated", "recovery epochs"], worm_rows)
        + "\n"
    )
    met = sum(row[-1] == "met" for row in goals)
    headline = [f"Defaults (issue 15): {met} of {len(goals)} goals met on {', '.join(tasks)}."]
    section = Section("Tickets at the defaults (issue 15)", md, [], data, headline)
    section.seconds = time.perf_counter() - start
    return section


def _default_ready_ratio() -> float:
    from lightning_worm import EarlyBirdCallback

    return EarlyBirdCallback().ready_ratio


def _dense_at(dense: dict[str, Any], epoch: int | None) -> float | None:
    if epoch is None:
        return None
    return next((e["val_acc"] for e in dense["curve"] if e["epoch"] == epoch), None)


def _measure(settings: Settings, per: dict[str, list[dict[str, Any]]], full: bool) -> dict[str, Any]:
    """Per pruning method and seed: the numbers the goals are read from."""
    dense = claims.by_seed(per.get("dense", []))
    random = claims.by_seed(per.get("random", []))
    reached = end_to_end.to_target(settings, per) if full and dense else {}
    out: dict[str, Any] = {}
    for method in PRUNING:
        rows = []
        for i, r in enumerate(per.get(method, [])):
            d, rnd = dense.get(r["seed"]), random.get(r["seed"])
            at = _dense_at(d, r["pruned_epoch"]) if d else None
            recal = r["acc_after_recal"]
            rows.append(dict(
                seed=r["seed"], ticket_epoch=r["ticket_epoch"], pruned_epoch=r["pruned_epoch"],
                waited=r.get("waited_epochs"), ready=r.get("ready"), share=r.get("score_share"),
                acc_before=r["acc_before"], acc_after=r["acc_after"], acc_after_recal=recal, dense_at_prune=at,
                vs_dense=None if recal is None or not at else recal / at,
                vs_random=(None if recal is None or rnd is None or rnd.get("acc_after_recal") is None
                           or method != "earlybird" else recal - rnd["acc_after_recal"]),
                test_acc=r.get("test_acc"), dense_test_acc=d.get("test_acc") if d else None,
                total_flops_ratio=(r["train_flops"] / d["train_flops"] if d and full else None),
                flops_to_target=(reached[method][i]["flops_ratio"] if method in reached else None),
                recovery=(claims.recovery_epochs(r, claims.target(settings, d)) if d and full else None),
            ))
        out[method] = rows
    return out


def _goal_rows(label: str, measured: dict[str, Any], full: bool, second: bool) -> list[list[str]]:
    rows = []
    for method, rs in measured.items():
        name = claims.LABELS[method]
        vs_dense = [r["vs_dense"] for r in rs]
        rows.append([f"re-calibrated acc right after the prune >= {GOAL_VS_DENSE}x dense's at that epoch", label,
                     name, fmt(vs_dense, 2), _all(vs_dense, GOAL_VS_DENSE, at_most=False)])
        if method == "earlybird":
            gap = [r["vs_random"] for r in rs]
            rows.append([f"... and >= {100 * GOAL_VS_RANDOM:g} points above the random ticket", label, name,
                         fmt(gap, 1, 100) + " points", _all(gap, GOAL_VS_RANDOM, at_most=False)])
        if not full:
            continue
        drop = [None if r["test_acc"] is None or r["dense_test_acc"] is None else r["test_acc"] - r["dense_test_acc"]
                for r in rs]
        rows.append([f"final test acc >= dense's - {100 * GOAL_FINAL_DROP:g} point", label, name,
                     fmt(drop, 1, 100) + " points vs dense", _all(drop, -GOAL_FINAL_DROP, at_most=False)])
        total = [r["total_flops_ratio"] for r in rs]
        rows.append([f"total training FLOPs <= {GOAL_TOTAL_FLOPS}x dense's", label, name, fmt(total, 2),
                     _all(total, GOAL_TOTAL_FLOPS, at_most=True)])
        if second:
            to_target = [r["flops_to_target"] for r in rs]
            rows.append([f"training FLOPs to dense's final val acc - 0.5 point <= {GOAL_FLOPS_TO_TARGET}x dense's",
                         label, name, fmt(to_target, 2), _all(to_target, GOAL_FLOPS_TO_TARGET, at_most=True)])
    return rows


def _all(values: list[float | None], goal: float, at_most: bool) -> str:
    """The verdict on the median; a seed without a value (no prune, never reached) fails it."""
    if any(v is None for v in values):
        return verdict(None, goal, at_most, missing=f"{sum(v is None for v in values)} seed(s) without a value")
    return verdict(median(values), goal, at_most)


def _worm_rows(label: str, measured: dict[str, Any], full: bool) -> list[list[str]]:
    rows = []
    for method, rs in measured.items():
        rows.append([
            label, claims.LABELS[method], fmt([r["ticket_epoch"] for r in rs], 1),
            fmt([r["pruned_epoch"] for r in rs], 1), fmt([r["waited"] for r in rs], 1),
            f"{sum(bool(r['ready']) for r in rs)} of {len(rs)}", fmt([r["share"] for r in rs], 2),
            fmt([r["acc_before"] for r in rs], 1, 100), fmt([r["acc_after"] for r in rs], 1, 100),
            fmt([r["acc_after_recal"] for r in rs], 1, 100),
            fmt([r["recovery"] for r in rs], 0) if full else "",
        ])
    return rows
