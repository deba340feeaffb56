"""Measuring a model: parameters, FLOPs per example, latency; and preparing a model for inference.

One place for the numbers that the pruning report and the benchmarks print, so that they agree:

* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2, as in
  Lightning's model summary) on one eval-mode forward without grad, divided by the batch size (dim 0 of
  the first input): FLOPs *per example*.
* Latency is timed with ``torch.utils.benchmark.Timer`` with a fixed number of threads (device
  synchronisation and warm-up included), in eval mode without grad.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from lightning_worm.core.inputs import ExampleInput, as_inputs, batch_size
from lightning_worm.core.validation import check_int, check_number

T = TypeVar("T")

__all__ = [
    "count_flops",
    "count_params",
    "eval_mode",
    "export_for_inference",
    "forward_flops",
    "latency",
    "latency_ms",
    "or_none",
    "timer",
    "warn_unmeasured",
]

def warn_unmeasured(what: str, error: BaseException) -> None:
    """Warn that a measurement failed and is left empty (measuring never stops the work it describes)."""
    warnings.warn(f"{what} failed ({type(error).__name__}: {error}); the number is left empty (None) and the work "
                  "goes on.", UserWarning, stacklevel=3)


def or_none(what: str, measurement: Callable[[], T]) -> T | None:
    """``measurement()``, or ``None`` with a warning (:func:`warn_unmeasured`) if it raises."""
    try:
        return measurement()
    except Exception as error:  # noqa: BLE001 - a measurement may fail anywhere; it must never block pruning
        warn_unmeasured(what, error)
        return None


def count_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model``; with ``nonzero``, only their non-zero entries (what a mask leaves)."""
    return sum(int((p != 0).sum()) if nonzero else p.numel() for p in model.parameters())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside, each module's own flag restored on exit."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in training.items():
            m.training = flag


def count_flops(model: nn.Module, example_input: ExampleInput) -> tuple[int, Any]:
    """FLOPs of one forward of ``model(*inputs)`` for the whole batch, and the output. Runs as called
    (mode untouched), without grad."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = model(*as_inputs(example_input))
    return counter.get_total_flops(), out


def forward_flops(model: nn.Module, example_input: ExampleInput, per_example: bool = True) -> int:
    """FLOPs of one eval-mode forward, per example (the batch's FLOPs over :func:`batch_size`) by default.

    Args:
        model: the model, called as ``model(*inputs)``; its train/eval flags are restored.
        example_input: a tensor or a sequence of tensors.
        per_example: divide by the batch size (``False``: the whole batch's FLOPs).

    Example::

        >>> forward_flops(nn.Linear(10, 5), torch.zeros(4, 10))  # 2 * 10 * 5 per example
        100
    """
    with eval_mode(model):
        total, _ = count_flops(model, example_input)
    return round(total / batch_size(example_input)) if per_example else total


def timer(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    num_threads: int | None = None,
    label: str = "",
    sub_label: str | None = None,
    description: str | None = None,
) -> benchmark.Timer:
    """A ``torch.utils.benchmark.Timer`` of ``model(*inputs)`` with ``num_threads`` threads (default: now's).

    Call it in eval mode inside ``torch.no_grad()`` (grad mode is per thread; the timer runs in this one).
    ``label``, ``sub_label`` and ``description`` label the measurement.
    """
    threads = num_threads or torch.get_num_threads()
    return benchmark.Timer(stmt="model(*inputs)", globals={"model": model, "inputs": as_inputs(example_input)},
                           num_threads=threads, label=label, sub_label=sub_label, description=description)


def latency(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    repeats: int = 10,
    warmup: int = 3,
    num_threads: int | None = None,
    label: str = "",
    min_run_time: float | None = None,
) -> benchmark.Measurement:
    """Time ``model(*inputs)`` in eval mode without grad with ``torch.utils.benchmark``.

    Args:
        model: the model; its train/eval flags are restored.
        example_input: a tensor or a sequence of tensors.
        repeats: timed forwards; the measurement's median is over them.
        warmup: untimed forwards first (kernel selection, caches, compilation).
        num_threads: intra-op threads while timing (default: ``torch.get_num_threads()`` now).
        label: a label for the measurement.
        min_run_time: time blocks of forwards for at least this many seconds instead
            (``Timer.blocked_autorange``: the median is over the blocks' mean forward times; for models
            too fast to time one forward at a time); ``repeats`` is then not used.

    Returns:
        A ``torch.utils.benchmark.Measurement``; ``.median`` is in seconds (of one forward).
    """
    check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    if min_run_time is not None:
        check_number("min_run_time", min_run_time, low=0.0, low_open=True)
    clock = timer(model, example_input, num_threads=num_threads, label=label)
    with eval_mode(model), torch.no_grad():
        if warmup:
            clock.timeit(warmup)
        if min_run_time is not None:
            return clock.blocked_autorange(min_run_time=min_run_time)
        runs = [clock.timeit(1) for _ in range(repeats)]
    return benchmark.Measurement.merge(runs)[0]


def latency_ms(model: nn.Module, example_input: ExampleInput, **kwargs: Any) -> float:
    """The median latency of :func:`latency`, in milliseconds."""
    return latency(model, example_input, **kwargs).median * 1e3


def export_for_inference(
    model: nn.Module, *, channels_last: bool = True, fuse_batchnorm: bool = True, compile: bool = False
) -> nn.Module:
    """Prepare a (pruned) model for fast inference: eval mode, BatchNorm folded into the convolutions,
    channels-last, optionally compiled.

    A pruned model has odd channel counts; channels-last memory format lets oneDNN (CPU) and cuDNN use
    their fast convolution kernels for any count, and folding each eval-mode BatchNorm into the
    convolution before it removes a pass over every activation (``torch.fx.experimental.optimization.fuse``:
    the model is traced with ``torch.fx``; if it cannot be traced, it is kept unfused with a warning).
    ``torch.compile`` additionally fuses the activations and removes Python overhead (the first call
    compiles, tens of seconds on a CPU; needs a working C++ compiler there).

    Args:
        model: the model; not changed (a prepared copy is returned).
        channels_last: convert 4-D parameters and buffers to ``torch.channels_last``. Feed inputs in that
            format too (``x.contiguous(memory_format=torch.channels_last)``); others work, with a conversion.
        fuse_batchnorm: fold eval-mode BatchNorm layers into the preceding convolutions.
        compile: return ``torch.compile`` of the prepared model.

    Returns:
        A model for inference only (eval mode, no parameter requires grad): a ``torch.fx.GraphModule`` when
        BatchNorm was folded, compiled if asked. Its outputs equal the model's eval-mode outputs up to
        float rounding. It exports with ``torch.export`` like any module.

    Example::

        >>> fast = export_for_inference(pruned_model)
        >>> with torch.inference_mode():
        ...     logits = fast(images.contiguous(memory_format=torch.channels_last))
    """
    import copy
    import warnings

    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse_batchnorm:
        from torch.fx.experimental.optimization import fuse

        try:
            model = fuse(model, inplace=True).eval()
        except Exception as error:  # noqa: BLE001 - any tracing failure: keep the model as it is
            warnings.warn(
                f"BatchNorm left unfused: the model could not be traced with torch.fx ({type(error).__name__}: "
                f"{error}). Pass `fuse_batchnorm=False` to silence this.",
                stacklevel=2,
            )
    if channels_last and any(p.dim() == 4 for p in model.parameters()):
        model = model.to(memory_format=torch.channels_last)
    # A module compiles to an OptimizedModule, an nn.Module: torch annotates the result as a plain callable.
    return cast(nn.Module, torch.compile(model)) if compile else model
