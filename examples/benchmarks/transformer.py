"""Benchmark: transformers. Mask cost at BERT-base scale, what removing heads saves, and the head search.

Three measurements:

1. **Mask cost at scale.** The element-wise query/key mask of a BERT-base-size model (12 layers, 768 wide:
   14.2 M units) taken by the tracker's own per-epoch call (``EarlyBirdCallback.observe_epoch``) on a
   random-weight ``transformers`` BERT: wall and CPU time of the whole call and of each stage inside it
   (|W| scores, the global ranking and its score checksum, the detector's update), with the current thread
   count and with one thread, interleaved, and the load average; the memory per stored mask (the detector's
   distinct mask tensors) and the checkpoint growth per stored mask (its ``state_dict`` saved with
   ``torch.save``), against the goals of < 250 ms and 1 bit per unit.
2. **Removing half the heads of a BERT-base-size random model** (``transformers``' ``BertModel`` from the
   default config, random weights) on the CPU: latency (median, eval, no grad; batch 4 x 128 tokens) and
   FLOPs, dense against the lowest-scored half of the heads of every layer removed.
3. **The head search on the example ViT** (digits): Early-Bird against WORM (elbow) over seeds: the
   ticket epoch, the validation accuracy right after the prune and the epochs the fine-tuning needs to
   get back to the accuracy before the prune.

Run::

    python -m examples.benchmarks.transformer --quick      # a few minutes
    python -m examples.benchmarks.transformer              # full: 5 seeds, 20 epochs
    python -m examples.benchmarks.run --only transformer --transformer-parts mask_cost   # the mask cost alone,
                                                           # the other rows kept in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from torch import Tensor, nn

from examples.benchmarks.common import (
    Section,
    Spread,
    markdown_table,
    peak_memory_mib,
    process_memory_mib,
    reset_peak_memory,
)
from lightning_worm import AttentionHeadSource, AttentionQKSource, EarlyBirdCallback, PruneAndFinetune, WormCallback

#: mode -> (ViT seeds, ViT epochs, mask-cost rounds, latency repeats)
MODES = {"tiny": (1, 3, 2, 2), "quick": (2, 12, 6, 3), "full": (5, 20, 12, 5)}
#: mode -> (layers, width, heads) of the mask-cost model: BERT-base, or a small BERT for the tests.
MASK_MODEL = {"tiny": (2, 64, 4), "quick": (12, 768, 12), "full": (12, 768, 12)}
#: The parts of this benchmark; ``run(parts=...)`` reruns some and keeps the others' earlier results.
PARTS = ("mask_cost", "bert_heads", "vit")


# ------------------------------------------------------------------------------------- 1. mask cost

#: Where the tracker's per-epoch path spends its time: the functions it calls, by the name the report gives them.
STAGES = ("scores", "ranking", "checksum", "update")
#: Issue 10's goal for the per-epoch mask of a BERT-base-size element-wise query/key source.
GOAL_MS = 250.0


def bert_base_like(layers: int = 12, width: int = 768, heads: int = 12, seed: int = 0) -> tuple[nn.Module, str]:
    """A BERT encoder with random weights (nothing downloaded), and what it is.

    ``transformers``' ``BertModel`` from a ``BertConfig`` of this size (the default is BERT-base) when
    ``transformers`` is installed; else a plain-torch stand-in with BERT's module names and the same query,
    key and value ``Linear`` layers, which is all the element-wise query/key tracker reads.
    """
    torch.manual_seed(seed)
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        class SelfAttention(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.num_attention_heads = heads
                self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))

        layer = lambda: nn.ModuleDict({"attention": nn.ModuleDict({"self": SelfAttention()})})  # noqa: E731
        model = nn.Module()
        model.encoder = nn.Module()
        model.encoder.layer = nn.ModuleList(layer() for _ in range(layers))
        return model, (f"a plain-torch stand-in for BERT ({layers} layers, width {width}: its query/key/value "
                       "Linear layers)")
    config = BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                        intermediate_size=4 * width)
    return BertModel(config), f"a `transformers` `BertModel` ({layers} layers, width {width}, random weights)"


class _EpochEnd:
    """What the tracker reads from its ``Trainer`` at an epoch's end (the Trainer itself is not needed to time it)."""

    def __init__(self, callback: EarlyBirdCallback) -> None:
        self.callbacks = [callback]
        self.current_epoch, self.sanity_checking, self.world_size, self.should_stop = 0, False, 1, False


class _Host(nn.Module):
    """The model as the tracker sees its LightningModule: its modules, its trainer, ``log`` (a no-op here)."""

    def __init__(self, model: nn.Module, trainer: _EpochEnd) -> None:
        super().__init__()
        self.model = model
        self.__dict__["trainer"] = trainer

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass


class _StageClock:
    """Times, inside the tracker's own per-epoch call, each function it calls (wall and process CPU time).

    The functions are wrapped where the tracker looks them up (its module's globals, the detector's method) for
    as long as the clock is open; each call adds to the current epoch's stage.
    """

    def __init__(self, callback: EarlyBirdCallback) -> None:
        import lightning_worm.callbacks.early_bird as tracker
        import lightning_worm.core.masks as masks

        self._targets: dict[str, tuple[Any, str]] = {"scores": (tracker, "unit_scores"),
                                                     "ranking": (tracker, "rank_units"),
                                                     "update": (callback.detector, "update")}
        if hasattr(masks, "score_checksum"):  # the fingerprint, taken inside the ranking
            self._targets["checksum"] = (masks, "score_checksum")
        self.epoch: dict[str, list[float]] = {}
        self._saved: dict[str, tuple[bool, Any]] = {}

    def __enter__(self) -> _StageClock:
        for stage, (owner, name) in self._targets.items():
            self._saved[stage] = (name in vars(owner), getattr(owner, name))
            setattr(owner, name, self._wrap(stage, self._saved[stage][1]))
        return self

    def __exit__(self, *exc: Any) -> None:
        for stage, (own, original) in self._saved.items():
            owner, name = self._targets[stage]
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the detector's method: dropping the wrapper brings the class's back

    def _wrap(self, stage: str, fn: Any) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = self.epoch.setdefault(stage, [0.0, 0.0])
                spent[0] += time.perf_counter() - wall
                spent[1] += time.process_time() - cpu
        return timed_call


def _held(detector: Any) -> list[Tensor]:
    """The distinct mask tensors a detector holds (window, history and ticket share theirs)."""
    tensors = [*detector._masks, *detector._history, *([] if detector._ticket is None else [detector._ticket])]
    return list({t.data_ptr(): t for t in tensors}.values())


def _saved_bytes(state: Any) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _move(weights: Sequence[Tensor], generator: torch.Generator) -> None:
    """Move every weight a little, as a training step would (by 1 % of BERT's initial spread)."""
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn(w.shape, generator=generator), alpha=2e-4)


def mask_cost(repeats: int, layers: int = 12, width: int = 768, heads: int = 12, seed: int = 0,
              threads: Sequence[int] | None = None) -> dict[str, Any]:
    """The tracker's real per-epoch path on a BERT-base-size model: time per stage and memory per stored mask.

    An ``EarlyBirdCallback`` with the paper's element-wise query/key source (ratio 0.5, window 3, threshold 0.01)
    takes its mask through its own epoch-end call (``observe_epoch``, as the ``Trainer`` calls it; logging is a
    no-op here) on a random BERT of this size. Between epochs every query and key weight moves a little, as
    training would move it. The first ``window - 1`` epochs fill the window (untimed); then ``repeats`` rounds
    each time one epoch per thread count of ``threads`` (default: the current count and 1), in a rotating order:
    the whole call, and each function the tracker calls inside it (|W| scores of every entry, the global
    ranking with its checksum of the scores, the detector's update: packing and the window's distances).

    Returns:
        ``units``; per thread count (a string key), per stage and for the whole call (``epoch``) the wall and
        CPU milliseconds per epoch (:class:`Spread`, ``wall_ms`` and ``cpu_ms``; CPU time is the process's, all
        threads); the load averages around the timed epochs; the memory: the detector's bytes per stored mask
        (``bits_per_unit``), the checkpoint state's size and its growth per stored mask, and the peak resident
        memory one epoch's mask adds for a moment (``transient_peak_mib``).
    """
    counts = list(dict.fromkeys(threads or (torch.get_num_threads(), 1)))
    model, model_name = bert_base_like(layers, width, heads, seed)
    early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01, source=AttentionQKSource(),
                                   accept_first_window=False, verbose=False)
    trainer = _EpochEnd(early_bird)
    host = _Host(model, trainer)
    weights = [h.block.part(h.part)[0] for h in early_bird.source.tracked(host).values()]
    units = sum(w.numel() for w in weights)
    g = torch.Generator().manual_seed(seed)
    warmup = early_bird.window - 1
    order = [counts[0]] * warmup + [counts[(i + r) % len(counts)] for r in range(repeats) for i in range(len(counts))]
    samples: dict[int, dict[str, list[tuple[float, float]]]] = {n: {} for n in counts}
    peaks: list[float] = []
    before = torch.get_num_threads()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    try:
        with _StageClock(early_bird) as clock:
            for epoch, count in enumerate(order):
                _move(weights, g)
                torch.set_num_threads(count)
                trainer.current_epoch = epoch
                clock.epoch = {}
                rss = process_memory_mib("VmRSS")
                reset_peak_memory(torch.device("cpu"))
                wall, cpu = time.perf_counter(), time.process_time()
                early_bird.observe_epoch(trainer, host)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                peak = peak_memory_mib(torch.device("cpu"))
                if epoch < warmup:
                    continue
                peaks.append(peak - rss)
                spent = {"epoch": (wall, cpu), **{k: tuple(v) for k, v in clock.epoch.items()}}
                spent["rest"] = (wall - sum(spent[k][0] for k in ("scores", "ranking", "update") if k in spent),
                                 cpu - sum(spent[k][1] for k in ("scores", "ranking", "update") if k in spent))
                for stage, value in spent.items():
                    samples[count].setdefault(stage, []).append(value)
    finally:
        torch.set_num_threads(before)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    held = _held(early_bird.detector)  # the window, the history and the ticket share their tensors
    held_bytes = sum(t.numel() * t.element_size() for t in held)
    checkpoint = _saved_bytes(early_bird.state_dict())
    one_more = copy.deepcopy(early_bird)  # one epoch more: what one more stored mask adds to the checkpoint
    trainer.current_epoch += 1
    _move(weights, g)
    one_more.observe_epoch(trainer, host)
    added = len(_held(one_more.detector)) - len(held)
    growth = (_saved_bytes(one_more.state_dict()) - checkpoint) / max(added, 1)
    ms = lambda values: Spread.of([1e3 * v for v in values])  # noqa: E731
    wall_ms = {str(n): {k: ms([w for w, _ in v]) for k, v in per.items()} for n, per in samples.items()}
    return {
        "model": model_name,
        "units": units,
        "threads": counts,
        "rounds": repeats,
        "wall_ms": wall_ms,
        "cpu_ms": {str(n): {k: ms([c for _, c in v]) for k, v in per.items()} for n, per in samples.items()},
        "load_average_start": None if load_start is None else [round(x, 2) for x in load_start],
        "load_average_end": None if load_end is None else [round(x, 2) for x in load_end],
        "masks_held": len(held),
        "held_bytes": held_bytes,
        "bits_per_unit": 8 * held_bytes / (units * len(held)),
        "checkpoint_bytes": checkpoint,
        "bytes_per_stored_mask": growth,
        "checkpoint_bits_per_unit": 8 * growth / units,
        "transient_peak_mib": Spread.of(peaks),
        "goal_ms": GOAL_MS,
        "goal_met": {n: per["epoch"].median < GOAL_MS for n, per in wall_ms.items()},
    }


# ----------------------------------------------------------------------------- 2. heads on BERT-base


def bert_heads(repeats: int, batch: int = 4, tokens: int = 128) -> dict[str, Any]:
    """Latency and FLOPs of a random BERT-base, dense and with half the heads of every layer removed."""
    from transformers import BertConfig, BertModel  # the benchmark's optional dependency

    from lightning_worm.core.surgery import prune_heads

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
    report = prune_heads(model, ticket, (ids[:1, :16],), source=source, measure_latency=False)
    return {"heads": f"{sum(report.units_before.values())} -> {sum(report.units_after.values())}",
            **_side_by_side(dense, model, ids, repeats)}


def _side_by_side(dense: nn.Module, pruned: nn.Module, ids: Tensor, repeats: int) -> dict[str, Any]:
    """Parameters, FLOPs per example and latency (median of ``repeats``, two interleaved rounds, the better one
    of each) of a dense and a pruned model on the same input."""
    from lightning_worm.core.measure import count_params, forward_flops

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
        pruned_ms.append(latency(pruned))
    flops_dense, flops_pruned = (forward_flops(m, (ids,), per_example=True) for m in (dense, pruned))
    return {
        "params_ratio": count_params(pruned) / count_params(dense),
        "flops_ratio": flops_pruned / flops_dense,
        "latency_dense_ms": min(dense_ms),
        "latency_pruned_ms": min(pruned_ms),
        "latency_ratio": min(pruned_ms) / min(dense_ms),
        "batch": f"{ids.shape[0]} x {ids.shape[1]} tokens",
    }


def side_by_side_table(numbers: dict[str, Any], pruned: str, digits: int = 2) -> str:
    """The Markdown table of :func:`_side_by_side`'s numbers: dense and the ``pruned`` row."""
    return markdown_table(["", "params", "FLOPs", "latency (ms)"], [
        ["dense", "1.00", "1.00", f"{numbers['latency_dense_ms']:.0f}"],
        [pruned, f"{numbers['params_ratio']:.{digits}f}", f"{numbers['flops_ratio']:.{digits}f}",
         f"{numbers['latency_pruned_ms']:.0f} ({numbers['latency_ratio']:.2f}x)"],
    ])


#: Issue 18's goals for BERT-base at EarlyBERT's ratios (1/3 of the heads of every layer, 40 % of the neurons).
GOAL_EARLYBERT_FLOPS, GOAL_EARLYBERT_LATENCY = 0.62, 0.70


def bert_earlybert(repeats: int, batch: int = 4, tokens: int = 128, layers: int = 12, width: int = 768,
                   heads: int = 12) -> dict[str, Any]:
    """A random BERT-base, dense and at EarlyBERT's ratios: 1/3 of the heads of every layer and 40 % of the
    feed-forward neurons overall removed (the lowest-scored), in one prune of a ``SourceList``."""
    from transformers import BertConfig, BertModel  # the benchmark's optional dependency

    from lightning_worm import unit_mask
    from lightning_worm.core.sources import earlybert
    from lightning_worm.core.surgery import prune_sources

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                        intermediate_size=4 * width)
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    source = earlybert(score="magnitude")  # random weights: the ratios are what is measured
    ticket = unit_mask(model, 0.5, source=source)  # each member's own ratio; 0.5 is for none
    dense = copy.deepcopy(model)
    report = prune_sources(model, ticket, (ids[:1, :16],), source=source, measure_latency=False)
    shares = report.shares
    return {"heads": "{before} -> {after}".format(**shares["AttentionHeadSource"]),
            "neurons": "{before} -> {after}".format(**shares["FeedForwardSource"]),
            **_side_by_side(dense, model, ids, repeats)}


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


def _mean(values: Sequence[float | None], fmt: str = "{:.1f}") -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    text = fmt.format(statistics.mean(present))
    if len(present) > 1:
        text += " ± " + fmt.format(statistics.stdev(present))
    return text + ("" if len(present) == len(values) else f" ({len(values) - len(present)} none)")


def _previous(out_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The transformer results of the report's earlier run in ``out_dir`` (``results.json``), and the section's
    stamp (mode and date) for parts that carry none; ``({}, {})`` when there is none."""
    path = None if out_dir is None else Path(out_dir) / "results.json"
    if path is None or not path.exists():
        return {}, {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    section = old.get("sections", {}).get("transformer", {})
    return dict(old.get("results", {}).get("transformer") or {}), {"mode": section.get("mode"),
                                                                    "date": section.get("date")}


def _ms(spread: Any) -> str:
    spread = spread if isinstance(spread, Spread) else Spread(**spread)
    return "n/a" if not spread.n else f"{spread.median:.0f} [{spread.lo:.0f}, {spread.hi:.0f}]"


def _kept(stamp: dict[str, Any], rerun: bool) -> str:
    return "" if rerun else f" *(kept from the {stamp.get('mode')}-mode run of {stamp.get('date')})*"


def render_mask_cost(cost: dict[str, Any], note: str = "") -> list[str]:
    """The mask-cost part of the section: one table of the stages per thread count, and the memory."""
    if "wall_ms" not in cost:  # an earlier run's format: ranking and update on ready-made scores only
        return [f"Mask cost (earlier method: ranking and update on ready-made scores, not the tracker's call): "
                f"{cost.get('epoch_ms', float('nan')):.0f} ms per epoch.{note}", ""]
    counts = [str(n) for n in cost["threads"]]
    names = {"scores": "|W| scores of every entry (`channel_scores`)",
             "ranking": "global ranking (`rank_units`)",
             "checksum": "of which the score checksum (frozen-score check)",
             "update": "detector update (pack, window distances)",
             "rest": "rest of the call (discovery, bookkeeping)",
             "epoch": "**the tracker's per-epoch call** (`observe_epoch`)"}
    header = ["stage"] + [f"{kind} ms, {n} thread{'s' if n != '1' else ''}" for n in counts
                          for kind in ("wall", "CPU")]
    rows = [[label] + [_ms(cost[kind][n][stage]) if stage in cost[kind][n] else "n/a" for n in counts
                       for kind in ("wall_ms", "cpu_ms")]
            for stage, label in names.items()]
    load = lambda a: "n/a" if a is None else " / ".join(f"{x:g}" for x in a)  # noqa: E731
    met = {n: cost["wall_ms"][n]["epoch"]["median"] if isinstance(cost["wall_ms"][n]["epoch"], dict)
           else cost["wall_ms"][n]["epoch"].median for n in counts}
    verdicts = ", ".join(f"{met[n]:.0f} ms with {n} thread{'s' if n != '1' else ''}: "
                         + ("**met**" if met[n] < cost["goal_ms"] else "**not met**") for n in counts)
    peak = cost["transient_peak_mib"]
    peak = peak if isinstance(peak, Spread) else Spread(**peak)
    return [
        f"Element-wise query/key mask of {cost['model']}: {cost['units']:,} units"
        + (" (BERT-base size)" if cost["units"] == 24 * 768 * 768 else "") + ". The "
        "tracker's own epoch-end call (`EarlyBirdCallback.observe_epoch`, source `AttentionQKSource`, ratio 0.5, "
        "window 3), each stage timed inside it; every query and key weight moves between epochs as in training. "
        f"Median [min, max] over {cost['rounds']} epochs per thread count, the thread counts interleaved; CPU time "
        f"is the process's (all threads). Load average (1 / 5 / 15 min) {load(cost['load_average_start'])} "
        f"before and {load(cost['load_average_end'])} after.{note}",
        "",
        markdown_table(header, rows),
        "",
        f"Goal < {cost['goal_ms']:.0f} ms per epoch: {verdicts}.",
        "",
        f"Memory: the detector holds {cost['masks_held']} distinct masks (window, history and ticket share them) in "
        f"{cost['held_bytes']:,} bytes, **{cost['bits_per_unit']:.3f} bits per unit per stored mask**; its "
        f"checkpoint state is {cost['checkpoint_bytes']:,} bytes and grows by {cost['bytes_per_stored_mask']:,.0f} "
        f"bytes per stored mask (**{cost['checkpoint_bits_per_unit']:.3f} bits per unit**). Taking one epoch's mask "
        f"raises the resident memory by {peak.median:.0f} MiB [{peak.lo:.0f}, {peak.hi:.0f}] for a moment (the "
        "scores and the ranking's scratch, freed when the call returns).",
        "",
    ]


def run(settings: Any = None, out_dir: Path | None = None, mode: str | None = None,
        parts: Sequence[str] | None = None) -> Section:
    """Run the measurements; ``mode`` (or ``settings.mode``) is ``"tiny"``, ``"quick"`` or ``"full"``.

    ``parts`` (or ``settings.transformer_parts``; default: all of :data:`PARTS`) are rerun; the others are kept
    from the earlier results in ``out_dir/results.json`` (each with its own mode and date), or left out.

    Raises:
        ValueError: on an unknown part.
    """
    mode = mode or getattr(settings, "mode", "quick")
    parts = tuple(parts or getattr(settings, "transformer_parts", None) or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"Unknown transformer part(s) {unknown}; choose from {list(PARTS)}.")
    seeds, epochs, mask_repeats, latency_repeats = MODES[mode]
    started = time.perf_counter()
    stamp = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    data, old_stamp = _previous(out_dir) if set(parts) != set(PARTS) else ({}, {})
    measured = {part: data.get("measured", {}).get(part, old_stamp) for part in PARTS if part not in parts}
    data = {part: data.get(part) for part in PARTS if part not in parts}
    if "mask_cost" in parts:
        threads = getattr(settings, "threads", None) or torch.get_num_threads()
        data["mask_cost"] = mask_cost(mask_repeats, *MASK_MODEL[mode], threads=(threads, 1))
    if "bert_heads" in parts:
        data["bert_heads"] = bert_heads(latency_repeats) if mode != "tiny" else None
    if "vit" in parts:
        data["vit"] = {name: [vit_search(epochs, worm, seed) for seed in range(seeds)]
                       for name, worm in (("EarlyBird", False), ("WORM (elbow)", True))}
    measured.update({part: stamp for part in parts})
    measured["vit"] = {**measured["vit"], "seeds": len(next(iter((data["vit"] or {"": []}).values()))),
                       "epochs": epochs if "vit" in parts else measured["vit"].get("epochs") or MODES.get(
                           measured["vit"].get("mode"), MODES[mode])[1]}
    cost, heads, fits = data["mask_cost"], data["bert_heads"], data["vit"]

    lines = [f"Mode `{mode}`" + ("" if set(parts) == set(PARTS) else f" (rerun: {', '.join(parts)})") + ".", ""]
    if cost:
        lines += render_mask_cost(cost, _kept(measured["mask_cost"], "mask_cost" in parts))
    if heads:
        lines += [
            f"Random BERT-base (`transformers` default config), heads {heads['heads']} (the lowest-scored half of "
            f"every layer removed), CPU, batch {heads['batch']}:{_kept(measured['bert_heads'], 'bert_heads' in parts)}",
            "",
            side_by_side_table(heads, "half the heads"),
            "",
        ]
    if fits:
        rows = []
        for name, results in fits.items():
            rows.append([name, _mean([r["ticket_epoch"] for r in results]),
                         _mean([None if r["before"] is None else 100 * r["before"] for r in results]),
                         _mean([None if r["after"] is None else 100 * r["after"] for r in results]),
                         _mean([r["epochs_to_recover"] for r in results]),
                         _mean([None if r["final"] is None else 100 * r["final"] for r in results])])
        lines += [
            f"Example ViT on the digits (attention heads, p = 0.5, window 5, threshold 0.1), "
            f"{measured['vit']['seeds']} seeds, {measured['vit']['epochs']} epochs, pruned at the ticket:"
            f"{_kept(measured['vit'], 'vit' in parts)}",
            "",
            markdown_table(["method", "ticket epoch", "val acc before prune (%)", "right after prune (%)",
                            "epochs to recover", "final val acc (%)"], rows),
        ]
    headline = []
    if cost and "wall_ms" in cost:
        per = ", ".join(f"{_median(cost['wall_ms'][str(n)]['epoch']):.0f} ms with {n} thread{'s' if n != 1 else ''}"
                        for n in cost["threads"])
        headline.append(f"transformer: {cost['units'] / 1e6:.1f} M-unit element-wise mask, the tracker's per-epoch "
                        f"call {per} (goal < {cost['goal_ms']:.0f} ms), {cost['bits_per_unit']:.2f} bits/unit "
                        "per stored mask")
    if heads:
        headline.append(f"BERT-base, half the heads: FLOPs {heads['flops_ratio']:.2f}x, latency "
                        f"{heads['latency_ratio']:.2f}x")
    data["measured"] = measured
    return Section(title="Transformers", markdown="\n".join(lines), headline=headline, data=data,
                   seconds=time.perf_counter() - started)


def _median(spread: Any) -> float:
    return spread.median if isinstance(spread, Spread) else spread["median"]


def main(argv: Sequence[str] | None = None) -> Section:
    parser = argparse.ArgumentParser(description="Transformer benchmark of lightning-worm.")
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode", default="full")
    parser.add_argument("--mode", choices=tuple(MODES), dest="mode")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    section = run(mode=args.mode, parts=[p.strip() for p in args.parts.split(",") if p.strip()])
    print(section.markdown)
    print(f"\n({section.seconds:.0f} s)")
    return section


if __name__ == "__main__":
    main()
