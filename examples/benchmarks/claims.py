"""The training runs behind the claims: every method, seed and recipe on the benchmark task, run once and shared by
the ``ticket`` and ``end_to_end`` sections.

Methods (each one ``fit`` of the example ``ImageClassifier`` on the settings' task, p = ``settings.prune_ratio``):

- ``dense``: plain training for ``settings.epochs``.
- ``earlybird``: ``EarlyBirdCallback`` (window, threshold, the recipe's sparsity: the library's default where the
  recipe sets none) and a prune once the ticket is ready (``settings.wait_for``), then
  fine-tuning to the end of the same fit (optimizer state and schedule carried over).
- ``worm_elbow`` / ``worm_fixed`` / ``worm_greedy``: the same with ``WormCallback`` (chi 0.003, elbow 0.15) and
  that schedule.
- ``random``: the random-ticket control: the ``earlybird`` run (same seed, so the same training up to the ticket),
  but the pruned ticket keeps exactly as many channels per layer at random positions
  (``PruneAndFinetune(ticket="random")``).
- ``slimming``: network slimming: the whole training with the L1 term on the gammas (the recipe's sparsity, or
  1e-4 where the recipe has none), a prune of the global mask at the end, then ``slimming_finetune_epochs`` of
  fine-tuning (a new fit with the recipe from its initial learning rate).

Every prune is measured the same way: validation accuracy just before (the dense network at that epoch), right
after the surgery, and after re-estimating the BatchNorm statistics on ``settings.recalibrate_batches`` training
batches (``PruneAndFinetune(recalibrate_batches=..., evaluate=...)`` in the fits, :func:`measure_prune` with
:func:`~lightning_worm.core.recalibration.recalibrate_batchnorm` after network slimming's prune). The re-calibrated
network is the one that goes on training. A recipe with a search cap (the WORM code's: 20 epochs)
prunes the newest mask at the cap when no ticket emerged by then (counted as "forced").

The first recipe of ``settings.recipes`` runs every method to the end; the others run the ticket search methods up
to the prune only, and a dense run (the dense accuracy at the epoch of the prune). Runs go to ``settings.workers``
processes (one torch thread each), their order rotated from seed to seed so that every method meets the same
background load.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import seed_everything
from torch import Tensor
from torch.utils.data import DataLoader

from examples.benchmarks.common import (
    Meter,
    Settings,
    datamodule,
    example_input,
    log,
    trainer,
)
from examples.callbacks import evaluate
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, prune_channels, unit_mask
from lightning_worm.core import measure
from lightning_worm.core.recalibration import recalibrate_batchnorm

CHI, ELBOW = 0.003, 0.15
SLIMMING_SPARSITY = 1e-4  # network slimming's own default, where the recipe has no sparsity term


@dataclass(frozen=True)
class Recipe:
    """A named training recipe: what the SGD, the schedule, the sparsity term and the search cap are."""

    name: str
    label: str
    lr: float
    momentum: float
    weight_decay: float
    sparsity: float | None  # None: the library's default (``sparsity="auto"``)
    schedule: str
    search_cap: int | None
    source: str

    def describe(self, label: bool = True) -> str:
        cap = f", search capped at {self.search_cap} epochs" if self.search_cap else ""
        prefix = f"{self.label}: " if label else ""
        sparsity = "the default sparsity ('auto')" if self.sparsity is None else f"sparsity {self.sparsity:g}"
        return (f"{prefix}SGD lr {self.lr:g}, momentum {self.momentum:g}, weight decay {self.weight_decay:g}, "
                f"{sparsity}, {self.schedule} schedule{cap}")


RECIPES: dict[str, Recipe] = {
    "earlybird": Recipe(
        "earlybird", "the Early-Bird code's recipe at the defaults", lr=0.1, momentum=0.9, weight_decay=1e-4,
        sparsity=None, schedule="step", search_cap=None,
        source="Early-Bird code (You et al.): 160 epochs on CIFAR, lr / 10 at 50 % and 75 %; its sparsity 1e-4 is "
               "left to the library's default"),
    "worm": Recipe(
        "worm", "the WORM code's recipe at the defaults", lr=0.01, momentum=0.9, weight_decay=0.0, sparsity=None,
        schedule="step", search_cap=20,
        source="WORM code: lr 0.01, no weight decay, at most 20 search epochs (its schedule is not the point here: "
               "the step schedule of the Early-Bird recipe is kept); the sparsity is the library's default"),
    "earlybird_paper": Recipe(
        "earlybird_paper", "the Early-Bird code's recipe", lr=0.1, momentum=0.9, weight_decay=1e-4, sparsity=1e-4,
        schedule="step", search_cap=None,
        source="Early-Bird code (You et al.), its sparsity 1e-4 included"),
    "worm_paper": Recipe(
        "worm_paper", "the WORM code's recipe", lr=0.01, momentum=0.9, weight_decay=0.0, sparsity=0.0,
        schedule="step", search_cap=20,
        source="WORM code: lr 0.01, no weight decay, no sparsity term, at most 20 search epochs"),
    "earlybird_sparse": Recipe(
        "earlybird_sparse", "the Early-Bird code's recipe with sparsity 1e-2", lr=0.1, momentum=0.9,
        weight_decay=1e-4, sparsity=1e-2, schedule="step", search_cap=None,
        source="not a published recipe: the Early-Bird code's with the L1 term 100x stronger. Its 1e-4 was set for "
               "CIFAR's 391 steps per epoch (batch 128); MNIST-1D has 24, and at 1e-4 the gammas barely move before "
               "the ticket"),
}

#: method -> WORM schedule (``None``: none), for the methods with a ticket search.
SEARCH_METHODS: dict[str, str | None] = {
    "earlybird": None, "worm_elbow": "elbow", "worm_fixed": "fixed", "worm_greedy": "greedy", "random": None,
}
METHODS = ("dense", *SEARCH_METHODS, "slimming")
LABELS = {
    "dense": "dense", "earlybird": "Early-Bird", "worm_elbow": "WORM (elbow)", "worm_fixed": "WORM (fixed)",
    "worm_greedy": "WORM (greedy)", "random": "random ticket (control)", "slimming": "network slimming",
}


class _TicketOf:
    """The tracker as ``PruneAndFinetune.prune`` reads it, with another ticket."""

    def __init__(self, tracker: EarlyBirdCallback, ticket: Mapping[str, Tensor]) -> None:
        self._tracker, self.ticket = tracker, ticket

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


class PruneProbe(PruneAndFinetune):
    """``PruneAndFinetune`` with its ``evaluate`` timed and read back, and a search cap.

    The prune itself is the library's: ``recalibrate_batches``, ``ticket="random"`` (the control) and ``evaluate``
    (the validation accuracy before the prune, right after the surgery and after the re-calibration) are
    ``PruneAndFinetune``'s own options. The probe adds what only a benchmark needs: the time of those evaluations
    (not training time) and the re-calibration's FLOPs, and a search cap: at the end of epoch ``search_cap - 1``
    with no ticket, the newest mask is pruned (the WORM code's "at most 20 search epochs").

    Args:
        early_bird: the tracker.
        val_loader: ``() -> DataLoader`` of the validation data for ``evaluate``.
        search_cap: see above (``None``: no cap).
        **kwargs: passed to ``PruneAndFinetune``.

    Attributes:
        acc_after: validation accuracy right after the surgery; ``acc_after_recal`` after the re-calibration.
        eval_seconds: time of the evaluations; ``extra_flops``: re-calibration FLOPs.
        forced: whether the prune came from the search cap rather than a ticket.
    """

    def __init__(self, early_bird: EarlyBirdCallback, val_loader: Callable[[], Any], *,
                 search_cap: int | None = None, **kwargs: Any) -> None:
        super().__init__(early_bird, measure_latency=False, evaluate=self._timed_evaluate, **kwargs)
        self.val_loader, self.search_cap = val_loader, search_cap
        self.acc_before: float | None = None
        self.acc_after: float | None = None
        self.acc_after_recal: float | None = None
        self.eval_seconds = 0.0
        self.extra_flops = 0.0
        self.forced = False

    def _timed_evaluate(self, module: Any) -> float:
        start = time.perf_counter()
        try:
            return evaluate(module, self.val_loader())
        finally:
            self.eval_seconds += time.perf_counter() - start

    def prune(self, trainer: Any, pl_module: Any) -> None:
        tracker = self.early_bird
        if tracker.ticket is None:  # the search cap: the newest mask stands in for the ticket
            self.early_bird = _TicketOf(tracker, tracker.mask)  # type: ignore[assignment]
        try:
            super().prune(trainer, pl_module)
        finally:
            self.early_bird = tracker
        evaluation = self.report["evaluation"]
        self.acc_before, self.acc_after = evaluation["before"], evaluation["after_surgery"]
        self.acc_after_recal = evaluation.get("after_recalibration", self.acc_after)
        used = self.report.get("recalibration_batches", 0)
        batch = trainer.datamodule.batch_size
        self.extra_flops += float(measure.forward_flops(pl_module, example_input(pl_module), per_example=True)
                                  * used * batch)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        cap = self.search_cap
        if (self.plan is None and cap is not None and trainer.current_epoch + 1 >= cap
                and self.early_bird.mask is not None and self.early_bird.searching):
            self.forced = True
            self.prune(trainer, pl_module)


def measure_prune(module: Any, data: Any, batches: int, seed: int) -> tuple[float, float, float, float]:
    """Right after a surgery: validation accuracy, then BatchNorm re-calibration on ``batches`` training batches
    (kept: the network trains on from there) and the accuracy again.

    Returns:
        ``(acc_after, acc_after_recal, seconds of the two evaluations, re-calibration FLOPs)``.
    """
    start = time.perf_counter()
    acc_after = evaluate(module, data.val_dataloader())
    seconds = time.perf_counter() - start
    if not batches:
        return acc_after, acc_after, seconds, 0.0
    flops = recalibrate(module, data, batches, seed)
    start = time.perf_counter()
    acc_after_recal = evaluate(module, data.val_dataloader())
    return acc_after, acc_after_recal, seconds + time.perf_counter() - start, flops


def recalibrate(module: Any, data: Any, batches: int, seed: int) -> float:
    """Re-estimate ``module``'s BatchNorm statistics on ``batches`` shuffled training batches (their own generator:
    the global RNG, and so the rest of the training, is untouched); returns the forward FLOPs spent."""
    loader = DataLoader(data.train_dataset, batch_size=data.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(20_000 + seed))
    used = recalibrate_batchnorm(module, loader, max_batches=batches)
    return float(measure.forward_flops(module, example_input(module), per_example=True)
                 * min(used * data.batch_size, len(data.train_dataset)))


def build(settings: Settings, recipe: Recipe) -> ImageClassifier:
    module = ImageClassifier(arch=settings.arch, width=settings.width, lr=recipe.lr, momentum=recipe.momentum,
                             weight_decay=recipe.weight_decay, schedule=recipe.schedule)
    module.example_input_array = example_input(module)  # the model's own input shape (MNIST-1D: 1 x 40)
    return module


def _final_numbers(module: ImageClassifier, data: Any) -> dict[str, Any]:
    example = example_input(module)
    return dict(test_acc=evaluate(module, data.test_dataloader()), params=measure.count_params(module),
                inference_flops=measure.forward_flops(module, example, per_example=True),
                latency_ms=measure.latency_ms(module, example_input(module, batch=64), warmup=0, min_run_time=0.3))


def fit_one(settings: Settings, recipe_name: str, method: str, seed: int, to_the_end: bool = True) -> dict[str, Any]:
    """One training run; what happened, in numbers (JSON-serialisable).

    Keys: ``recipe``, ``method``, ``seed``, ``curve`` (per epoch: ``epoch``, ``seconds``, ``train_flops``,
    ``val_acc``; for a pruning method a point right after the prune is inserted, with the re-calibrated accuracy),
    ``final_from`` (the first curve index of the delivered, pruned, model), ``ticket_epoch``, ``pruned_epoch``,
    ``forced``, ``acc_before``, ``acc_after``, ``acc_after_recal``, ``channels_after``, ``mean_distances``, and,
    when ``to_the_end``, ``test_acc``, ``params``, ``inference_flops``, ``latency_ms`` of the final model.
    """
    recipe = RECIPES[recipe_name]
    torch.set_num_threads(settings.threads if settings.workers == 1 else 1)
    seed_everything(seed, verbose=False)
    module = build(settings, recipe)
    data = datamodule(settings, seed=0)  # one split for every seed: the seeds vary the training only
    out: dict[str, Any] = dict(recipe=recipe_name, method=method, seed=seed, ticket_epoch=None, pruned_epoch=None,
                               forced=False, acc_before=None, acc_after=None, acc_after_recal=None,
                               channels_after=None, mean_distances=[], ready=None, waited_epochs=None,
                               score_share=None)
    epochs = settings.epochs
    if method == "dense":
        meter = Meter()
        trainer(settings, [meter], max_epochs=epochs).fit(module, datamodule=data)
        out.update(curve=meter.epochs, final_from=0)
    elif method == "slimming":
        sparsity = recipe.sparsity or SLIMMING_SPARSITY  # none or 0 in the recipe: network slimming's own
        tracker = EarlyBirdCallback(prune_ratio=settings.prune_ratio, window=settings.window,
                                    threshold=settings.threshold, sparsity=sparsity, verbose=False)
        meter = Meter()  # the tracker only applies the L1 term here; its ticket is not used
        trainer(settings, [tracker, meter], max_epochs=epochs).fit(module, datamodule=data)
        data.setup("fit")
        before = meter.epochs[-1]["val_acc"]
        start = time.perf_counter()
        report = prune_channels(module, unit_mask(module, settings.prune_ratio), example_input(module, 2),
                                measure_latency=False)
        prune_seconds = time.perf_counter() - start  # the re-calibration's time is left out here (small)
        acc_after, acc_after_recal, _, recal_flops = measure_prune(module, data, settings.recalibrate_batches, seed)
        seconds = meter.epochs[-1]["seconds"] + prune_seconds
        flops = meter.total_flops + recal_flops
        pruned_point = dict(epoch=epochs - 1, seconds=seconds, train_flops=flops, val_acc=acc_after_recal,
                            flops_per_sample=None)
        finetune = Meter(offset_seconds=seconds, offset_flops=flops)
        trainer(settings, [finetune], max_epochs=settings.slimming_finetune_epochs).fit(module, datamodule=data)
        curve = meter.epochs + [pruned_point] + [dict(e, epoch=e["epoch"] + epochs) for e in finetune.epochs]
        out.update(curve=curve, final_from=len(meter.epochs), pruned_epoch=epochs - 1, acc_before=before,
                   acc_after=acc_after, acc_after_recal=acc_after_recal,
                   channels_after=report.units_after, mean_distances=list(tracker.mean_distances))
    else:
        schedule = SEARCH_METHODS[method]
        tracker = EarlyBirdCallback(prune_ratio=settings.prune_ratio, window=settings.window,
                                    threshold=settings.threshold, verbose=False,
                                    **({} if recipe.sparsity is None else {"sparsity": recipe.sparsity}))
        callbacks: list[Any] = [tracker]
        if schedule is not None:
            callbacks.append(WormCallback(tracker, schedule=schedule, chi=CHI, elbow=ELBOW))
        probe = PruneProbe(tracker, data.val_dataloader, search_cap=recipe.search_cap,
                           ticket="random" if method == "random" else "early_bird", seed=10_000 + seed,
                           recalibrate_batches=settings.recalibrate_batches, finetune_epochs=None if to_the_end else 0,
                           wait_for=settings.wait_for)
        meter = Meter(probe)
        trainer(settings, [*callbacks, probe, meter], max_epochs=epochs).fit(module, datamodule=data)
        curve = list(meter.epochs)
        out.update(ticket_epoch=tracker.ticket_epoch, pruned_epoch=probe.pruned_epoch, forced=probe.forced,
                   mean_distances=list(tracker.mean_distances))
        if probe.pruned_epoch is None:
            final_from = len(curve)  # nothing pruned: never delivers a pruned model
        else:
            i = next(i for i, e in enumerate(curve) if e["epoch"] == probe.pruned_epoch)
            pruned_point = dict(curve[i], val_acc=probe.acc_after_recal)
            curve = curve[: i + 1] + [pruned_point] + curve[i + 1:]
            final_from = i + 1
            out.update(acc_before=probe.acc_before, acc_after=probe.acc_after,
                       acc_after_recal=probe.acc_after_recal, channels_after=dict(probe.report["units_after"]),
                       ready=probe.report["ready"], waited_epochs=probe.report["waited_epochs"],
                       score_share=probe.report["score_share"]["ratio"])
        out.update(curve=curve, final_from=final_from)
    if to_the_end:
        out.update(_final_numbers(module, data))
    out["seconds"] = out["curve"][-1]["seconds"]
    out["train_flops"] = out["curve"][-1]["train_flops"]
    return out


def _call(args: tuple[Settings, str, str, int, bool]) -> dict[str, Any]:
    settings, recipe, method, seed, to_the_end = args
    from examples.benchmarks.run import _quiet

    _quiet()
    start, cpu = time.perf_counter(), time.process_time()
    result = fit_one(settings, recipe, method, seed, to_the_end)
    result["cpu_seconds"] = time.process_time() - cpu  # the process's CPU time: the run's cost on an idle core
    log(f"{recipe} recipe, {method}, seed {seed}: {time.perf_counter() - start:.0f} s "
        f"({result['cpu_seconds']:.0f} s CPU)")
    return result


def tasks(settings: Settings) -> list[tuple[Settings, str, str, int, bool]]:
    """Every run, seed by seed, the order of the methods rotated from one seed to the next."""
    out = []
    for k, seed in enumerate(settings.seeds):
        for r, recipe in enumerate(settings.recipes):
            # the later recipes run the search methods up to the prune, and a dense run (the accuracy at the prune)
            methods = [m for m in (METHODS if r == 0 else ("dense", *SEARCH_METHODS))
                       if settings.methods is None or m in settings.methods]
            shift = k % len(methods)
            for method in methods[shift:] + methods[:shift]:
                out.append((settings, recipe, method, seed, r == 0))
    return out


_CACHE: dict[Settings, dict[str, Any]] = {}


def results(settings: Settings) -> dict[str, Any]:
    """All runs of ``settings`` (computed once per process, then shared by the sections).

    With ``settings.workers > 1`` the runs go to spawned processes, which re-import the calling script: call this
    under ``if __name__ == "__main__":`` (``python -m examples.benchmarks.run`` does).

    Returns:
        ``{"runs": {recipe: {method: [run per seed]}}, "seconds": wall seconds of all runs}``.

    Raises:
        ValueError: on an unknown recipe.
    """
    if settings in _CACHE:
        return _CACHE[settings]
    unknown = [r for r in settings.recipes if r not in RECIPES]
    if unknown or not settings.recipes:
        raise ValueError(f"Unknown or no recipes {list(settings.recipes)}; choose from {list(RECIPES)}.")
    todo = tasks(settings)
    start = time.perf_counter()
    log(f"claims: {len(todo)} training runs on {settings.workers} worker(s)")
    if settings.workers > 1:
        context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked OpenMP or Lightning state
        with ProcessPoolExecutor(settings.workers, mp_context=context) as pool:
            done = list(pool.map(_call, todo))
    else:
        done = [_call(t) for t in todo]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    ordered = sorted(zip(todo, done, strict=True), key=lambda pair: (pair[0][1], pair[0][2], pair[0][3]))
    for (_, recipe, method, _seed, _), result in ordered:
        runs.setdefault(recipe, {}).setdefault(method, []).append(result)
    for recipe in runs:  # methods in their canonical order
        runs[recipe] = {m: runs[recipe][m] for m in METHODS if m in runs[recipe]}
    cpu = sum(r["cpu_seconds"] for r in done)
    log(f"claims: {len(todo)} runs took {time.perf_counter() - start:.0f} s ({cpu:.0f} s CPU in all, about "
        f"{cpu / settings.workers:.0f} s of wall time on {settings.workers} idle core(s))")
    _CACHE[settings] = {"runs": {r: runs[r] for r in settings.recipes}, "seconds": time.perf_counter() - start,
                        "cpu_seconds": cpu}
    return _CACHE[settings]


def target(settings: Settings, dense_run: Mapping[str, Any]) -> float:
    """The accuracy to reach: the dense run's final validation accuracy minus ``settings.target_drop``."""
    return float(dense_run["curve"][-1]["val_acc"]) - settings.target_drop


def reach(run: Mapping[str, Any], goal: float) -> dict[str, Any] | None:
    """The first curve point of the delivered model at or above ``goal``, or ``None``."""
    return next((e for e in run["curve"][run["final_from"]:]
                 if e["val_acc"] is not None and e["val_acc"] >= goal - 1e-9), None)


def recovery_epochs(run: Mapping[str, Any], goal: float) -> int | None:
    """Epochs after the prune until the pruned model is at ``goal`` (0: right after the prune and re-calibration;
    ``None``: never)."""
    if run["pruned_epoch"] is None:
        return None
    point = reach(run, goal)
    return None if point is None else point["epoch"] - run["pruned_epoch"]


def by_seed(runs: list[Mapping[str, Any]]) -> dict[int, Mapping[str, Any]]:
    return {r["seed"]: r for r in runs}
