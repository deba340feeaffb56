"""What every benchmark shares: settings, the timing helper, statistics, FLOPs, the table writer, the
environment stamp and a Lightning callback that meters training runs.

Nothing here is a benchmark; each benchmark module imports from here and returns a :class:`Section`.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_worm.core import measure

T = TypeVar("T")

# ------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Every knob of the suite; :meth:`preset` gives the ``tiny`` (tests), ``quick`` and ``full`` modes.

    Args:
        mode: the preset's name, printed next to every number.
        accelerator: ``"cpu"`` or ``"gpu"`` (``"auto"`` is resolved by :meth:`preset`).
        threads: ``torch.set_num_threads`` for the whole run.
        data: ``"mnist1d"`` (offline, generated; the default), ``"digits"`` (offline) or ``"cifar10"`` (needs the
            data in ``data_dir``): the task of the ticket-search and end-to-end benchmarks.
        data_dir: where ``cifar-10-batches-py`` lies.
        overhead_archs: models of the overhead benchmark (full width).
        overhead_batch: batch size of the overhead fits.
        overhead_steps: steps per epoch of each overhead fit; the first epoch is the untimed warm-up (WORM's mask
            is taken at its end), the second is timed.
        overhead_rounds: rounds of interleaved fits (each round runs every contender once).
        mask_channels: BN channels of the synthetic model of the mask-cost measurement.
        mask_repeats: repeats of the mask-cost measurement.
        latency_models: models of the latency benchmark.
        latency_ratios: prune ratios of the latency benchmark.
        latency_masked_ratios: ratios at which the mask-only contenders are timed (their compute does not
            depend on the ratio).
        latency_batches: batch sizes timed.
        latency_rounds: interleaved rounds; each contender runs ``latency_repeats`` forwards per round.
        latency_repeats: forwards per contender per round (their median is the round's time).
        arch: model of the ticket-search and end-to-end benchmarks (``"cnn1d"`` for MNIST-1D; ``vgg11_bn`` at
            width 0.25 is used for the image tasks unless given).
        width: its width multiplier.
        batch: batch size of the training benchmarks.
        epochs: epochs of every training (dense, and search + prune + fine-tune in one fit).
        seeds: training seeds (the data split is the same for all).
        recipes: training recipes (:data:`examples.benchmarks.claims.RECIPES`); the first one runs every method to
            the end (recovery and end to end), the others the ticket search and the prune only.
        prune_ratio: the fraction of BN channels pruned (p).
        slimming_finetune_epochs: fine-tuning epochs after network slimming's prune.
        recalibrate_batches: training batches of the BatchNorm re-calibration right after each prune.
        target_drop: the target accuracy is the dense run's final validation accuracy minus this.
        limit_train_batches: Lightning's ``limit_train_batches`` of the training benchmarks.
        window: Early-Bird window (the paper's 5; ``tiny`` shortens it so the tests find a ticket).
        threshold: Early-Bird threshold.
        workers: training runs in parallel, one process each with one torch thread (1: in this process).
        transformer_parts: the parts of the transformer benchmark to rerun (``mask_cost``, ``bert_heads``,
            ``vit``); the others are kept from the earlier results.
        wait_for: ``PruneAndFinetune(wait_for=...)`` of the claims runs (the default ``"ready"``; ``tiny`` prunes at
            the ticket, its runs are too short to wait).
        methods: the methods of the claims runs (``None``: all of :data:`examples.benchmarks.claims.METHODS`).
        second_task: the task on which the ``defaults`` section runs the claims again (``""``: none).
        second_task_methods: the methods run there.
    """

    mode: str = "quick"
    accelerator: str = "cpu"
    threads: int = 2
    data: str = "mnist1d"
    data_dir: str = "data"
    overhead_archs: tuple[str, ...] = ("resnet18", "vgg11_bn")
    overhead_batch: int = 8
    overhead_steps: int = 10
    overhead_rounds: int = 3
    mask_channels: int = 131_072
    mask_repeats: int = 21
    latency_models: tuple[str, ...] = ("vgg11_bn", "resnet18", "mobilenet_v2")
    latency_ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    latency_masked_ratios: tuple[float, ...] = (0.5,)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_rounds: int = 5
    latency_repeats: int = 1
    arch: str = "cnn1d"
    width: float = 1.0
    batch: int = 128
    epochs: int = 40
    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: tuple[str, ...] = ("earlybird", "worm")
    prune_ratio: float = 0.5
    slimming_finetune_epochs: int = 20
    recalibrate_batches: int = 10
    target_drop: float = 0.005
    limit_train_batches: int | None = None
    window: int = 5
    threshold: float = 0.1
    workers: int = 1
    transformer_parts: tuple[str, ...] = ("mask_cost", "bert_heads", "vit")
    methods: tuple[str, ...] | None = None
    wait_for: str = "ready"
    second_task: str = "mnist1d_large"
    second_task_methods: tuple[str, ...] = ("dense", "earlybird", "worm_elbow", "random")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.accelerator == "gpu" else "cpu")

    @property
    def on_gpu(self) -> bool:
        return self.accelerator == "gpu"

    @property
    def precision(self) -> str:
        """bf16 mixed precision on a GPU (the GPU rows of issue 5), fp32 on the CPU."""
        return "bf16-mixed" if self.on_gpu else "32-true"

    @classmethod
    def preset(cls, mode: str, accelerator: str = "auto", **overrides: Any) -> Settings:
        """The settings of ``mode`` (``"tiny"``, ``"quick"`` or ``"full"``) on ``accelerator``.

        Raises:
            ValueError: on an unknown mode or accelerator.
        """
        if accelerator == "auto":
            accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        if accelerator not in ("cpu", "gpu"):
            raise ValueError(f"`accelerator` must be 'cpu', 'gpu' or 'auto', got {accelerator!r}.")
        if accelerator == "gpu" and not torch.cuda.is_available():
            raise ValueError("`accelerator='gpu'` but torch sees no CUDA device.")
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(threads, 4)) if accelerator == "cpu" else 1
        base = cls(mode=mode, accelerator=accelerator, threads=threads, workers=workers)
        if mode == "quick":
            s = replace(base, seeds=(0, 1, 2), epochs=24, slimming_finetune_epochs=12)
            s = replace(s, recipes=("earlybird", "worm"))
        elif mode == "full":
            s = replace(
                base, overhead_batch=32, overhead_steps=20, overhead_rounds=5,
                mask_repeats=51, latency_masked_ratios=(0.3, 0.5, 0.7), latency_rounds=7, latency_repeats=3,
                seeds=(0, 1, 2, 3, 4), epochs=40, slimming_finetune_epochs=20,
                recipes=("earlybird", "worm"),
            )
        elif mode == "tiny":
            s = replace(
                base, overhead_batch=4, overhead_steps=2, overhead_rounds=1,
                mask_channels=4096, mask_repeats=3, latency_models=("vgg11_bn", "mobilenet_v2"),
                latency_ratios=(0.5,), latency_batches=(1,), latency_rounds=1, width=0.5,
                seeds=(0,), epochs=3, limit_train_batches=2, window=2, threshold=0.5, slimming_finetune_epochs=1,
                recalibrate_batches=2, workers=1, wait_for="ticket",
            )
        else:
            raise ValueError(f"Unknown mode {mode!r}; choose 'tiny', 'quick' or 'full'.")
        if accelerator == "gpu":  # the GPU rows: CIFAR-shaped batch 128, bf16-mixed
            # A forward of these models at 32x32 takes well under a millisecond on a GPU: time 20 per round (their
            # mean is the round's time), not one, so that launch jitter does not decide the ratios.
            s = replace(s, overhead_batch=128, latency_batches=(1, 128),
                        latency_repeats=s.latency_repeats if mode == "tiny" else 20)
        data = overrides.get("data", s.data)
        if not data.startswith("mnist1d") and "arch" not in overrides:  # the image tasks: the narrow CIFAR VGG-11
            s = replace(s, arch="vgg11_bn", width=0.0625 if mode == "tiny" else 0.25, batch=64)
        return replace(s, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------- sections


@dataclass
class Section:
    """What a benchmark hands back: Markdown (tables and notes), the figures it wrote, the headline numbers
    (one line each, for the summary and the console) and the raw numbers (for ``results.json``)."""

    title: str
    markdown: str
    figures: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    headline: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------- timing and spread


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int = 1, warmup: int = 0, device: torch.device | None = None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls, device-synchronised.

    This is the suite's one stopwatch for code it calls; training steps, which Lightning calls, are read
    with the same ``perf_counter`` at the batch boundaries (``overhead.StepClock``).
    """
    device = device or torch.device("cpu")
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def interleave(contenders: Mapping[str, Callable[[], T]], rounds: int) -> dict[str, list[T]]:
    """Run every contender once per round, rotating the order (ABC, BCA, CAB, ...); results per contender.

    On a shared machine the background load drifts: interleaving puts every contender under the same
    drift, and per-round ratios (:func:`paired_ratios`) cancel most of it.
    """
    names = list(contenders)
    out: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(contenders[name]())
    return out


@dataclass(frozen=True)
class Spread:
    """Median with its interquartile range and extremes."""

    median: float
    q1: float
    q3: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        values = [float(v) for v in values if v == v]  # NaN left out
        if not values:
            nan = float("nan")
            return cls(nan, nan, nan, nan, nan, 0)
        if len(values) == 1:
            v = values[0]
            return cls(v, v, v, v, v, 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, min(values), max(values), len(values))

    def fmt(self, digits: int = 3, scale: float = 1.0, spread: str = "iqr") -> str:
        """``median [q1, q3]`` (or ``[min, max]`` with ``spread="range"``), values times ``scale``."""
        if self.n == 0:
            return "n/a"
        m = f"{self.median * scale:.{digits}f}"
        if self.n == 1:
            return m
        lo, hi = (self.q1, self.q3) if spread == "iqr" else (self.lo, self.hi)
        return f"{m} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def paired_ratios(samples: Mapping[str, Sequence[float]], reference: str) -> dict[str, Spread]:
    """Per contender, the spread of its per-round ratio to ``reference`` (same round, same background)."""
    ref = samples[reference]
    return {name: Spread.of([v / r for v, r in zip(values, ref, strict=True)]) for name, values in samples.items()}


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (population std over seeds), ``n/a`` if empty; NaNs are left out."""
    values = [float(v) for v in values if v is not None and v == v]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3g} ± {std:.2g}"


# ---------------------------------------------------------------------------------------------- memory
# (parameters, FLOPs and latency: `lightning_worm.core.measure`, which the pruning report uses too)


def reset_peak_memory(device: torch.device) -> None:
    """Start a peak-memory window: CUDA's allocator peak, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak resident set size)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory`: CUDA max allocated, else peak RSS (MiB; NaN if unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_memory_mib("VmHWM")


def process_memory_mib(field: str = "VmRSS") -> float:
    """A memory field of ``/proc/self/status`` in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (its peak); NaN
    where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Draw every BatchNorm gamma from U(0.05, 1) with a fixed seed (fresh models have all gammas 1.0,
    and a ranking of ties prunes by layer order, which says nothing about a trained network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.95 + 0.05)
    return model


# ------------------------------------------------------------------------------------------ data, fits


def synthetic_loader(n: int, batch_size: int, seed: int = 0) -> DataLoader:
    """``n`` random CIFAR-shaped images (3x32x32) with random labels of 10 classes (for timing only)."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


DATA_NAMES = {"mnist1d": "MNIST-1D (generated offline by `mnist1d`, 3000 train / 1000 val / 1000 test)",
              "mnist1d_large": "MNIST-1D large (generated offline by `mnist1d`, 4x the signals, noisier and more "
                               "sheared, pinned by a checksum: 15000 train / 1000 val / 4000 test)",
              "digits": "scikit-learn digits (offline, 32x32)", "cifar10": "CIFAR-10"}


def datamodule(settings: Settings, seed: int) -> pl.LightningDataModule:
    """The data of the training benchmarks: MNIST-1D (generated offline), the offline digits, or CIFAR-10 from
    ``settings.data_dir``.

    Raises:
        ValueError: on an unknown ``settings.data``.
    """
    from examples.data import CIFAR10DataModule, DigitsDataModule, MNIST1DDataModule

    if settings.data == "mnist1d":
        return MNIST1DDataModule(batch_size=settings.batch, seed=seed)
    if settings.data == "mnist1d_large":
        return MNIST1DDataModule(batch_size=settings.batch, seed=seed, variant="large")
    if settings.data == "cifar10":
        return CIFAR10DataModule(data_dir=settings.data_dir, batch_size=settings.batch, num_workers=2, seed=seed)
    if settings.data == "digits":
        return DigitsDataModule(batch_size=settings.batch, seed=seed)
    raise ValueError(f"Unknown data {settings.data!r}; choose one of: {', '.join(DATA_NAMES)}.")


def example_input(module: nn.Module, batch: int = 1) -> torch.Tensor:
    """Zeros of one example's shape and dtype (the module's ``example_input_array``, else the model's ``input_shape``,
    else a CIFAR image) on the module's device."""
    given = getattr(module, "example_input_array", None)
    if isinstance(given, torch.Tensor):
        return torch.zeros(batch, *given.shape[1:], dtype=given.dtype, device=next(module.parameters()).device)
    model = getattr(module, "model", module)
    shape = tuple(getattr(model, "input_shape", (3, 32, 32)))
    device = next(module.parameters()).device
    return torch.zeros(batch, *shape, device=device)


@functools.cache
def scratch_dir() -> Path:
    """A temporary directory for what the fits write (``PruneAndFinetune``'s report), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="lightning-worm-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def trainer(settings: Settings, callbacks: Sequence[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A quiet ``Trainer`` on the settings' accelerator and precision, writing only into :func:`scratch_dir`."""
    root = scratch_dir()
    defaults: dict[str, Any] = dict(
        accelerator=settings.accelerator, devices=1, precision=settings.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(root),
    )
    if settings.limit_train_batches is not None:
        defaults["limit_train_batches"] = settings.limit_train_batches
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


class Meter(pl.Callback):
    """Meters a fit epoch by epoch: wall time, validation accuracy and training FLOPs.

    Training FLOPs of an epoch are ``3 x`` (forward + backward) the forward FLOPs per sample of the model
    as it is during that epoch (counted once per architecture with ``FlopCounterMode`` on one example of the
    model's ``input_shape``) times the samples seen. Put it *after* a pruning callback that has the attributes
    ``pruned_epoch``, ``eval_seconds`` and ``extra_flops`` (:class:`examples.benchmarks.claims.PruneProbe`): in
    the epoch of the prune, the time of the probe's extra evaluations is taken out of the wall time and its
    re-calibration FLOPs are added.

    Attributes:
        epochs: one dict per epoch: ``epoch``, ``seconds`` (cumulative since fit start, after validation),
            ``val_acc``, ``train_flops`` (cumulative), ``flops_per_sample``.
    """

    def __init__(self, probe: Any = None, offset_seconds: float = 0.0, offset_flops: float = 0.0) -> None:
        super().__init__()
        self.probe = probe
        self.offset_seconds, self.offset_flops = offset_seconds, offset_flops
        self.epochs: list[dict[str, Any]] = []
        self._flops_cache: dict[int, int] = {}
        self._start = 0.0
        self._samples = 0
        self._flops = offset_flops
        self._epoch_flops = 0
        self._probe_counted = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter() - self.offset_seconds

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        key = measure.count_params(pl_module)
        if key not in self._flops_cache:
            self._flops_cache[key] = measure.forward_flops(pl_module, example_input(pl_module), per_example=True)
        self._epoch_flops = self._flops_cache[key]
        self._samples = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._samples += len(batch[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops += 3 * self._epoch_flops * self._samples
        probe = self.probe
        if probe is not None and probe.pruned_epoch is not None and not self._probe_counted:
            self._probe_counted = True
            self._start += probe.eval_seconds  # the probe's evaluations are not training time
            self._flops += probe.extra_flops
        acc = trainer.callback_metrics.get("val/acc")
        self.epochs.append(dict(
            epoch=trainer.current_epoch, seconds=time.perf_counter() - self._start,
            val_acc=None if acc is None else float(acc), train_flops=self._flops,
            flops_per_sample=self._epoch_flops,
        ))

    @property
    def total_flops(self) -> float:
        return self._flops

    def acc_at(self, epoch: int) -> float | None:
        return next((e["val_acc"] for e in self.epochs if e["epoch"] == epoch), None)


# ------------------------------------------------------------------------------------- tables, stamp


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed with 3 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.3g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(settings: Settings) -> dict[str, Any]:
    """The stamp printed above every result: machine, versions, threads, date, load."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    env: dict[str, Any] = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=cpu_model(), cores=os.cpu_count(),
        usable_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
        torchvision=installed("torchvision"), lightning=installed("lightning"),
        torch_pruning=installed("torch-pruning"), lightning_worm=installed("lightning-worm"),
        platform=platform.platform(), gpu=torch.cuda.get_device_name(0) if settings.on_gpu else None,
        onednn_primitive_cache=os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)"),
    )
    if hasattr(os, "getloadavg"):
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def environment_markdown(env: Mapping[str, Any]) -> str:
    keys = [("date", "Date"), ("cpu", "CPU"), ("cores", "Cores (logical)"), ("usable_cores", "Cores usable"),
            ("torch_threads", "torch threads"), ("gpu", "GPU"), ("python", "Python"), ("torch", "torch"),
            ("torchvision", "torchvision"), ("lightning", "Lightning"), ("torch_pruning", "Torch-Pruning"),
            ("lightning_worm", "lightning-worm"), ("platform", "Platform"),
            ("onednn_primitive_cache", "oneDNN primitive cache capacity"),
            ("load_average_1min", "Load average at start (1 min)"),
            ("load_average_1min_end", "Load average at end (1 min)")]
    return markdown_table(["", ""], [(label, env.get(k) if env.get(k) is not None else "none") for k, label in keys])


def run_threads(settings: Settings) -> str:
    """How the training runs of the claims use the CPU, for the tables' captions."""
    if settings.workers > 1:
        return f"{settings.workers} runs in parallel, one torch thread each"
    return f"one run at a time, {settings.threads} torch thread(s)"


def device_name(settings: Settings) -> str:
    """The device the numbers come from, for the tables' device column."""
    if settings.on_gpu:
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


def new_figure(ncols: int = 1, width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """``(figure, axes)`` of ``ncols`` panels on the non-interactive Agg backend (matplotlib imported late:
    it is an optional extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log(message: str) -> None:
    """Progress on stderr (the tables go to the Markdown file)."""
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
