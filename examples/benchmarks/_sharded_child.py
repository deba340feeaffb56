"""The child processes of the ``sharded`` benchmark (:mod:`examples.benchmarks.sharded`); each writes its numbers as
JSON, one file per rank. Not a benchmark of its own, and not imported by the suite (Lightning starts rank 1 by
running this module's command line again).

Run from the repository root::

    python -m examples.benchmarks._sharded_child overhead OUT_DIR CONFIG_JSON   # (a) 2 ranks, Lightning launches
    python -m examples.benchmarks._sharded_child prune OUT_DIR CONFIG_JSON      # (b) ddp or fsdp, in CONFIG_JSON
    python -m examples.benchmarks._sharded_child qk OUT_DIR CONFIG_JSON         # (c) RANK / WORLD_SIZE from the env

Every rank writes ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from examples.benchmarks.common import process_memory_mib, randomize_bn, reset_peak_memory, synthetic_loader
from examples.module import ImageClassifier
from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback

#: The callbacks' per-step hooks (what WORM's truncation and the sparsity term run in).
PER_STEP_HOOKS = ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")


class ShardedClassifier(ImageClassifier):
    """:class:`~examples.module.ImageClassifier`, sharded with FSDP2 under Lightning's ``ModelParallelStrategy``:
    every convolution, BatchNorm and the classifier in its own ``fully_shard`` call, then the root (as Lightning's
    FSDP2 guide does, layer by layer). Under any other strategy (DDP) a plain ImageClassifier."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class Calls:
    """Counts ``DTensor.full_tensor`` (calls and bytes) and ``DTensor.to_local`` calls per phase of the fit.

    The phase is set by the clock callbacks (``"step"``: from a batch's start to its end; ``"hooks"``: inside the
    tracker's and WORM's per-step hooks; ``"epoch_end"``: the epoch-end hooks, where the tracker takes its mask;
    ``"other"``: the rest). The methods are wrapped on the class, in this process, for its whole life.
    """

    def __init__(self) -> None:
        self.phase = "other"
        self.full: dict[str, int] = defaultdict(int)
        self.full_bytes: dict[str, int] = defaultdict(int)  # the whole tensors the gathers return
        self.received_bytes: dict[str, int] = defaultdict(int)  # of which the other ranks' shards
        self.to_local: dict[str, int] = defaultdict(int)

    def install(self) -> Calls:
        from torch.distributed.tensor import DTensor

        full_tensor, to_local = DTensor.full_tensor, DTensor.to_local
        calls = self

        def counted_full_tensor(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = full_tensor(self, *args, **kwargs)
            calls.full[calls.phase] += 1
            size = out.element_size()
            calls.full_bytes[calls.phase] += out.numel() * size
            calls.received_bytes[calls.phase] += (out.numel() - self._local_tensor.numel()) * size
            return out

        def counted_to_local(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.to_local[calls.phase] += 1
            return to_local(self, *args, **kwargs)

        DTensor.full_tensor = counted_full_tensor  # type: ignore[method-assign]
        DTensor.to_local = counted_to_local  # type: ignore[method-assign]
        return self

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"full_tensor": dict(self.full), "full_tensor_bytes": dict(self.full_bytes),
                "received_bytes": dict(self.received_bytes), "to_local": dict(self.to_local)}

    def reset(self) -> None:
        for counts in (self.full, self.full_bytes, self.received_bytes, self.to_local):
            counts.clear()


class StepStart(pl.Callback):
    """First in the list: starts each batch's clock (``perf_counter`` and the process's CPU time) and the phases."""

    def __init__(self, calls: Calls, first_epoch: int) -> None:
        self.calls, self.first_epoch = calls, first_epoch
        self.start = self.cpu_start = 0.0
        self.full_at_start = self.to_local_at_start = 0
        self.epoch_ends = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.calls.phase = "step"
        self.full_at_start = sum(self.calls.full.values())
        self.to_local_at_start = self.calls.to_local["hooks"]
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls.phase = "epoch_end"
        self.epoch_ends += 1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.calls.phase = "other"


class StepEnd(pl.Callback):
    """Last in the list: stops each batch's clock; keeps the steps of epochs ``first_epoch`` on, with the
    ``full_tensor`` calls of each (anywhere in the step) and the ``to_local`` calls of the callbacks' hooks."""

    def __init__(self, start: StepStart, worm: WormCallback | None, hook_seconds: dict[str, float]) -> None:
        self.clock, self.worm, self.hook_seconds = start, worm, hook_seconds
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.full_tensor: list[int] = []
        self.to_local: list[int] = []
        self.truncated: list[int] = []
        self.steps = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.clock.first_epoch:
            self.hook_seconds.clear()  # the hooks' time over the timed epochs only

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        wall, cpu = time.perf_counter() - self.clock.start, time.process_time() - self.clock.cpu_start
        calls = self.clock.calls
        calls.phase = "other"
        self.steps += 1
        if trainer.current_epoch >= self.clock.first_epoch:
            self.times.append(wall)
            self.cpu_times.append(cpu)
            self.full_tensor.append(sum(calls.full.values()) - self.clock.full_at_start)
            self.to_local.append(calls.to_local["hooks"] - self.clock.to_local_at_start)
            if self.worm is not None:
                self.truncated.append(self.worm.truncated_units if self.worm.chi < 1.0 else 0)


def instrument(callback: pl.Callback, calls: Calls, spent: dict[str, float]) -> None:
    """Wrap the callback's per-step hooks (instance attributes shadow the class's): sum their seconds per hook
    (``Class.hook``) and count what they call in the ``"hooks"`` phase."""
    for hook in PER_STEP_HOOKS:
        if getattr(type(callback), hook) is getattr(pl.Callback, hook):
            continue
        original = getattr(callback, hook)
        name = f"{type(callback).__name__}.{hook}"

        def wrapped(*args: Any, _original: Callable[..., Any] = original, _name: str = name, **kwargs: Any) -> Any:
            phase, calls.phase = calls.phase, "hooks"
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - start
                calls.phase = phase

        setattr(callback, hook, wrapped)


def peak_resets() -> bool:
    """Whether this process can reset its peak resident set size (Linux's ``/proc/self/clear_refs``, which
    :func:`~examples.benchmarks.common.reset_peak_memory` writes). Without it ``VmHWM`` (like ``ru_maxrss``) is the
    peak since the process started: it only grows, and a peak read after a step is not that step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _trainer(strategy: Any, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=callbacks, **kwargs)


def _model_parallel() -> Any:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _write(out: Path, rank: int, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


def _quiet() -> None:
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


# ------------------------------------------------------------------------------ (a) per-step overhead


#: The fits of each round of (a): without the callbacks, with them, and without them again (the A/A control).
CONTENDERS = ("without", "with", "control")


def overhead(out: Path, config: dict[str, Any]) -> None:
    """Fits of the same FSDP2 model with and without the tracker + WORM (and without again), interleaved."""
    calls = Calls().install()
    loader = synthetic_loader(2 * config["batch"] * config["steps"], config["batch"])  # each rank gets half
    fits: list[dict[str, Any]] = []
    rank = 0
    # An untimed fit first: the process's first fit pays for its warm-up (allocator, kernels, gloo's buffers). Then
    # per round the fit without callbacks, with them, and without them again (the A/A control: the noise floor), in
    # a rotating order (ABC, BCA, CAB, ...).
    plan = [(-1, "warm-up")] + [(r, name) for r in range(config["rounds"])
                                for name in CONTENDERS[r % 3:] + CONTENDERS[:r % 3]]
    for r, contender in plan:
        with_callbacks = contender == "with"
        pl.seed_everything(0, verbose=False)
        module = ShardedClassifier(arch=config["arch"], width=config["width"])
        randomize_bn(module, 0)
        spent: dict[str, float] = {}
        start = StepStart(calls, first_epoch=1)
        middle: list[pl.Callback] = []
        worm = None
        if with_callbacks:
            early_bird = EarlyBirdCallback(prune_ratio=0.5, window=config["window"], threshold=0.0,
                                           sparsity=config["sparsity"], verbose=False)
            worm = WormCallback(early_bird, schedule="fixed", chi=0.003)
            middle = [early_bird, worm]
            for callback in middle:
                instrument(callback, calls, spent)
        end = StepEnd(start, worm, spent)
        epochs = 1 + (config["timed_epochs"] if r >= 0 else 0)
        trainer = _trainer(_model_parallel(), [start, *middle, end], max_epochs=epochs,
                           limit_train_batches=config["steps"])
        calls.reset()
        trainer.fit(module, train_dataloaders=loader)
        rank = trainer.global_rank
        if r < 0:
            continue
        timed = max(len(end.times), 1)
        fits.append(dict(
            round=r, contender=contender, callbacks=with_callbacks, step=statistics.median(end.times),
            cpu_step=statistics.median(end.cpu_times), times=[round(t, 6) for t in end.times],
            cpu_times=[round(t, 6) for t in end.cpu_times], steps=end.steps, timed_steps=len(end.times),
            epoch_ends=start.epoch_ends, hook_seconds=sum(spent.values()) / timed,
            hooks={name: seconds / timed for name, seconds in spent.items()},
            step_full_tensor=end.full_tensor, step_to_local=end.to_local,
            truncated_min=min(end.truncated) if end.truncated else None, calls=calls.snapshot(),
            tracked=len(early_bird.source.tracked(module)) if with_callbacks else None,
        ))
    _write(out, rank, {"rank": rank, "fits": fits, "threads": torch.get_num_threads()})
    _destroy()


# ----------------------------------------------------------------------------------- (b) the prune


def prune(out: Path, config: dict[str, Any]) -> None:
    """A fit of the search that prunes at the ticket (epoch 1) under DDP or FSDP2; the prune timed on every rank."""
    calls = Calls().install()
    kind = config["kind"]
    pl.seed_everything(0, verbose=False)
    module = ShardedClassifier(arch=config["arch"], width=config["width"], lr=config["lr"])
    randomize_bn(module, 0)
    params = sum(p.numel() for p in module.parameters())
    early_bird = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, sparsity=0.0, verbose=False)
    finetune = PruneAndFinetune(early_bird, wait_for="ticket", finetune_epochs=0, measure_latency=False)
    measured: dict[str, Any] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            rss = process_memory_mib("VmRSS")
            reset_peak_memory(torch.device("cpu"))  # VmHWM from here (Linux's clear_refs)
            phase, calls.phase = calls.phase, name
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                calls.phase = phase
                measured[name] = dict(seconds=wall, cpu_seconds=cpu, rss_before_mib=rss,
                                      rss_after_mib=process_memory_mib("VmRSS"), peak_mib=process_memory_mib("VmHWM"),
                                      peak_reset=peak_resets())
        return call

    finetune.prune = timed("prune", finetune.prune)  # type: ignore[method-assign]
    finetune._try_surgery = timed("trial", finetune._try_surgery)  # type: ignore[method-assign]
    strategy = "ddp" if kind == "ddp" else _model_parallel()
    trainer = _trainer(strategy, [early_bird, finetune], max_epochs=4, limit_train_batches=config["steps"])
    loader = synthetic_loader(2 * config["batch"] * config["steps"], config["batch"])
    trainer.fit(module, train_dataloaders=loader)
    ticket = early_bird.ticket
    digest = None if ticket is None else hashlib.sha1(ticket.packed().numpy().tobytes()).hexdigest()[:12]
    report = finetune.report or {}
    _write(out, trainer.global_rank, {
        "rank": trainer.global_rank, "kind": kind, "params": params, "param_mib": params * 4 / 2**20,
        "pruned_epoch": finetune.pruned_epoch, "ticket_epoch": early_bird.ticket_epoch, "ticket": digest,
        "kept": None if ticket is None else ticket.kept, "units": None if ticket is None else ticket.total,
        "params_after": report.get("params_after"), "measured": measured, "calls": calls.snapshot(),
        "threads": torch.get_num_threads(),
    })
    _destroy()


# ------------------------------------------------------------------------- (c) the q/k mask of BERT


class _Broadcast:
    """What the tracker asks of a Lightning strategy on several processes: rank 0's object on every rank (timed)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        self.seconds[0] += time.perf_counter() - wall
        self.seconds[1] += time.process_time() - cpu
        return box[0]


def qk(out: Path, config: dict[str, Any]) -> None:
    """The tracker's epoch-end call on a random BERT-base-size model, sharded per layer on every process of the
    group (or whole on one process): its time per stage, the bytes gathered, the memory it adds for a moment."""
    from examples.benchmarks.transformer import _EpochEnd, _Host, _move, _StageClock, bert_base_like
    from lightning_worm import AttentionQKSource
    from lightning_worm.core.sharding import local

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    calls = Calls().install()
    started = time.perf_counter()
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, model_name = bert_base_like(config["layers"], config["width"], config["heads"], seed=0)
    built = time.perf_counter() - started
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    sharded_at = time.perf_counter() - started
    early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01, source=AttentionQKSource(),
                                   accept_first_window=False, verbose=False)
    trainer = _EpochEnd(early_bird)
    trainer.world_size = world
    broadcast = _Broadcast()
    trainer.strategy = broadcast  # type: ignore[attr-defined]
    host = _Host(model, trainer)
    host.__dict__["device"] = torch.device("cpu")  # where the tracker puts rank 0's mask (a LightningModule's device)
    weights = [h.block.part(h.part)[0] for h in early_bird.source.tracked(host).values()]
    units = sum(w.numel() for w in weights)
    local_units = sum(local(w).numel() for w in weights)
    generator = torch.Generator().manual_seed(rank)
    warmup = early_bird.window - 1
    epochs: list[dict[str, Any]] = []
    import lightning_worm.callbacks.early_bird as tracker

    clock = _StageClock(early_bird)
    clock._targets["share"] = (tracker, "score_share")  # the score mass the mask's (and the ticket's) pruned units hold
    with clock:
        for epoch in range(warmup + config["epochs"]):
            with torch.no_grad():
                _move([local(w) for w in weights], generator)  # each rank moves its own shard, as training would
            trainer.current_epoch = epoch
            clock.epoch = {}
            broadcast.seconds = [0.0, 0.0]
            calls.reset()
            if world > 1:
                torch.distributed.barrier()  # every rank starts the epoch's end together
            rss = process_memory_mib("VmRSS")
            reset_peak_memory(torch.device("cpu"))
            wall, cpu = time.perf_counter(), time.process_time()
            early_bird.observe_epoch(trainer, host)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peak = process_memory_mib("VmHWM")
            if epoch < warmup:
                continue
            counts = calls.snapshot()
            stages = {k: list(v) for k, v in clock.epoch.items()}
            if world > 1:
                stages["broadcast"] = list(broadcast.seconds)
            epochs.append(dict(seconds=wall, cpu_seconds=cpu, stages=stages,
                               full_tensor=sum(counts["full_tensor"].values()),
                               full_tensor_bytes=sum(counts["full_tensor_bytes"].values()),
                               received_bytes=sum(counts["received_bytes"].values()),
                               transient_peak_mib=peak - rss))
    mask = early_bird.mask
    _write(out, rank, {
        "rank": rank, "world": world, "model": model_name, "units": units, "local_units": local_units,
        "build_seconds": built, "shard_seconds": sharded_at - built, "epochs": epochs,
        "mask_packed_bytes": None if mask is None else int(mask.packed().numel() * mask.packed().element_size()),
        "threads": torch.get_num_threads(), "rss_mib": process_memory_mib("VmRSS"),
    })
    _destroy()


def _destroy() -> None:
    """Leave the process group once every rank has written its file (the parent reads them when rank 0 exits)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # join gloo's threads now, not in the interpreter's teardown


KINDS = {"overhead": overhead, "prune": prune, "qk": qk}


def main(argv: list[str]) -> None:
    kind, out, config = argv[0], Path(argv[1]), json.loads(argv[2])
    torch.set_num_threads(int(config.get("threads", 1)))
    _quiet()
    KINDS[kind](out, config)


if __name__ == "__main__":
    main(sys.argv[1:])
