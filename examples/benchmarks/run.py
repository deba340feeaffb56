"""Run the whole benchmark suite and write ``docs/benchmarks.md`` with its plots under ``docs/benchmarks/``.

Usage::

    python examples/benchmarks/run.py --quick          # about 10 minutes on a 2-core CPU (+3-4 for sharded)
    python -m examples.benchmarks.run                  # the full mode
    python -m examples.benchmarks.run --only ticket,end_to_end   # the claims on MNIST-1D, 5 seeds, both recipes
    python -m examples.benchmarks.run --only ticket,end_to_end,defaults --methods dense,earlybird,worm_elbow,random
    python -m examples.benchmarks.run --accelerator gpu    # the GPU rows (batch 128, bf16-mixed)
    python -m examples.benchmarks.run --only latency,overhead --threads 1
    python -m examples.benchmarks.run --only transformer --transformer-parts mask_cost   # keeps the other rows
    python -m examples.benchmarks.run --only sharded --quick   # FSDP2 on 2 CPU processes, under 4 minutes

The ``ticket`` and ``end_to_end`` benchmarks share one set of training runs (:mod:`examples.benchmarks.claims`),
made once per process on ``--workers`` processes.

Each accelerator's results (figures, and ``results.json`` with the raw numbers and the section's Markdown)
are kept apart in ``docs/benchmarks/cpu/`` and ``docs/benchmarks/gpu/``; ``docs/benchmarks.md`` is assembled
from whichever of the two exist, so a GPU run adds its rows next to the CPU ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from examples.benchmarks import BENCHMARKS  # noqa: E402
from examples.benchmarks.common import Section, Settings, environment, environment_markdown, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ACCELERATORS = ("cpu", "gpu")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="mode", default=argparse.SUPPRESS,
                        help="fewer seeds, steps and epochs: the whole suite in about 10 minutes on a 2-core CPU, "
                             "plus 3 to 4 for `sharded`")
    parser.add_argument("--mode", choices=("tiny", "quick", "full"), default="full",
                        help="preset (default: full; 'tiny' is what the tests run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto",
                        help="'auto': the GPU when torch sees one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the usable cores; use 1 on a busy machine)")
    parser.add_argument("--data", choices=("mnist1d", "mnist1d_large", "digits", "cifar10"), default="mnist1d",
                        help="task of the ticket and end-to-end benchmarks (mnist1d: generated offline by the "
                             "`mnist1d` package; cifar10 needs --data-dir)")
    parser.add_argument("--recipes", default=None,
                        help="comma-separated training recipes of the ticket and end-to-end benchmarks (the first runs "
                             "every method to the end, the others the search up to the prune): earlybird, worm, "
                             "earlybird_paper, worm_paper, earlybird_sparse (default: earlybird, worm: the two published "
                             "recipes' learning rates and weight decays at the library's defaults)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods of the ticket and end-to-end benchmarks (default: all: dense, "
                             "earlybird, worm_elbow, worm_fixed, worm_greedy, random, slimming)")
    parser.add_argument("--workers", type=int, default=None,
                        help="training runs in parallel for the ticket and end-to-end benchmarks, one process and "
                             "one torch thread each (default: the usable cores, at most 4; 1 on a GPU)")
    parser.add_argument("--transformer-parts", default=None,
                        help="comma-separated parts of the transformer benchmark to rerun: mask_cost, bert_heads, "
                             "vit (default: all); the others keep their earlier results in the report")
    parser.add_argument("--data-dir", default="data", help="directory holding cifar-10-batches-py")
    parser.add_argument("--docs", type=Path, default=REPO / "docs",
                        help="where benchmarks.md and benchmarks/ are written (default: the repository's docs/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Section]:
    """Run the selected benchmarks, print their headlines and write the report.

    Returns:
        The sections, by benchmark name.

    Raises:
        ValueError: on an unknown benchmark name.
    """
    args = parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}.")
    overrides: dict[str, Any] = dict(data=args.data, data_dir=args.data_dir)
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.recipes is not None:
        overrides["recipes"] = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    if args.methods is not None:
        overrides["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.transformer_parts is not None:
        overrides["transformer_parts"] = tuple(p.strip() for p in args.transformer_parts.split(",") if p.strip())
    if args.workers is not None:
        if args.workers < 1:
            raise ValueError(f"`--workers` must be at least 1, got {args.workers}.")
        overrides["workers"] = args.workers
    settings = Settings.preset(args.mode, args.accelerator, **overrides)
    torch.set_num_threads(settings.threads)
    _quiet()

    out = args.docs / "benchmarks" / settings.accelerator
    out.mkdir(parents=True, exist_ok=True)
    env = environment(settings)
    log(f"mode {settings.mode} on {settings.accelerator}, {settings.threads} torch thread(s): {', '.join(names)}")
    if settings.threads > 1 and _busy(env):
        log(f"the machine is busy (load {env['load_average_1min']} on {env['usable_cores']} cores): with "
            f"{settings.threads} threads, OpenMP waits for "
            "descheduled threads and small kernels slow down by up to 10x here; consider --threads 1")
    start = time.perf_counter()
    sections: dict[str, Section] = {}
    for name in names:
        sections[name] = BENCHMARKS[name](settings, out)
        log(f"{name} took {sections[name].seconds:.0f} s")
        for line in sections[name].headline:
            print(line, flush=True)
    seconds = time.perf_counter() - start
    env["load_average_1min_end"] = environment(settings).get("load_average_1min")
    _write(args.docs, out, settings, env, sections, seconds)
    log(f"{settings.mode} mode took {seconds / 60:.1f} min; wrote {args.docs / 'benchmarks.md'}")
    return sections


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*validation_step.*", ".*GPU available.*",
                    ".*Detected call of `lr_scheduler.step\\(\\)`.*", ".*torch.cuda.amp.*"):
        warnings.filterwarnings("ignore", message=message)


def _write(docs: Path, out: Path, settings: Settings, env: dict[str, Any], sections: dict[str, Section],
           seconds: float) -> None:
    """Write ``results.json`` and the accelerator's part of ``docs/benchmarks.md``.

    Sections of this run replace those of the same name; the sections of earlier runs that this one did not rerun
    are kept, each with its own mode, date and settings (``--only ticket,end_to_end`` leaves the latency results).
    A kept section's ``appendix`` in ``results.json`` (Markdown from another run of that benchmark, such as another
    recipe) is printed after its figures, until the benchmark itself is rerun.
    """
    rel = lambda p: Path(p).relative_to(docs).as_posix()  # noqa: E731
    command = f"python -m examples.benchmarks.run --mode {settings.mode} --accelerator {settings.accelerator}"
    kept, kept_results = _previous_sections(out / "results.json")
    parts = "" if settings.transformer_parts == Settings.transformer_parts else (
        f" --transformer-parts {','.join(settings.transformer_parts)}")
    for name, section in sections.items():
        suffix = parts if name == "transformer" else ""
        kept[name] = dict(title=section.title, markdown=section.markdown, headline=list(section.headline),
                          figures=[rel(f) for f in section.figures], seconds=section.seconds, mode=settings.mode,
                          date=env["date"], command=f"{command} --only {name}{suffix}", settings=settings.to_dict())
        kept_results[name] = section.data
    order = [n for n in BENCHMARKS if n in kept] + [n for n in kept if n not in BENCHMARKS]
    rerun = [n for n in order if n not in sections]
    lines = [
        f"## Results on {settings.accelerator.upper()}"
        + (f": {env['gpu']}" if env.get("gpu") else f": {env['cpu']}"),
        "",
        f"Last produced by `{command} --only {','.join(sections)}"
        + (parts if "transformer" in sections else "")
        + f"` (**{settings.mode} mode**) on {env['date']}; "
        f"the run took {seconds / 60:.1f} min. Load average (1 min) {env.get('load_average_1min')} at the start and "
        f"{env.get('load_average_1min_end')} at the end on {env.get('usable_cores')} usable cores"
        + (": **the machine was shared** with other jobs while this ran, so absolute times are noisy; the "
           "interleaved ratios are the figures to read." if _busy(env) else ".")
        + (f" Kept from earlier runs (each with its own mode and date below): {', '.join(rerun)}." if rerun else ""),
        "",
        environment_markdown(env),
        "",
        "### Headlines",
        "",
        *[f"- {line}" for n in order for line in kept[n]["headline"]],
        "",
    ]
    for i, name in enumerate(order, 1):
        entry = kept[name]
        lines += [f"### {i}. {entry['title']}", "",
                  f"*`{name}`, {entry['mode']} mode, {entry['date']}, {entry['seconds']:.0f} s.*", "",
                  entry["markdown"].strip(), ""]
        lines += [f"![{entry['title']}]({f})" for f in entry["figures"]] + [""]
        if entry.get("appendix"):  # results of another run of the benchmark (another recipe, say), kept with it
            lines += [entry["appendix"].strip(), ""]
    lines += ["<details><summary>Settings of this run</summary>", "", "```json",
              json.dumps(settings.to_dict(), indent=1), "```", "", "</details>", ""]
    # The Markdown goes into results.json, not into a page of its own: docs/ is an mkdocs site (strict).
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "settings": settings.to_dict(), "seconds": seconds, "markdown": "\n".join(lines),
         "sections": kept, "results": kept_results}, indent=1, default=_json_default))
    _assemble(docs)


def _previous_sections(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The sections (and raw results) of an earlier ``results.json``; ``({}, {})`` if there is none or it cannot be
    read. A file of the older format (one Markdown for the run) is split at its ``### i. Title`` headings."""
    if not path.exists():
        return {}, {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        log(f"could not read {path}; its sections are not kept")
        return {}, {}
    results = dict(old.get("results", {}))
    if "sections" in old:
        return dict(old["sections"]), results
    mode, date = old.get("settings", {}).get("mode", "?"), old.get("environment", {}).get("date", "?")
    markdown = old.get("markdown", "")
    headlines = re.findall(r"^- (.+)$", markdown.split("### Headlines", 1)[-1].split("\n### ", 1)[0], re.M)
    owners = {"Overhead": "overhead", "Tracker cost": "overhead", "Latency": "latency", "Ticket search": "ticket",
              "End to end": "end_to_end"}
    sections: dict[str, dict[str, Any]] = {}
    pattern = re.compile(r"^### \d+\. (?P<title>.+?)\n\n\*`(?P<name>\w+)`, (?P<seconds>[\d.]+) s\.\*\n\n(?P<body>.*?)"
                         r"(?=^### \d+\. |^<details><summary>Settings of this run|\Z)", re.S | re.M)
    for m in pattern.finditer(markdown):
        body = m["body"].strip()
        figures = re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", body, re.M)
        body = re.sub(r"^!\[[^\]]*\]\(([^)]+)\)$", "", body, flags=re.M).strip()
        mine = [h for h in headlines if any(h.startswith(k) and v == m["name"] for k, v in owners.items())]
        sections[m["name"]] = dict(title=m["title"], markdown=body, headline=mine, figures=figures,
                                   seconds=float(m["seconds"]), mode=mode, date=date, command="", settings={})
    return sections, results


def _busy(env: dict[str, Any]) -> bool:
    """Whether other jobs kept the machine busy: a 1-minute load above half the usable cores."""
    return (env.get("load_average_1min") or 0.0) > 0.5 * (env.get("usable_cores") or 1)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) or hasattr(value, "item"):
        return float(value)
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)


INTRO = """# Benchmarks

What lightning-worm costs and what it saves, measured side by side in one run by the suite in
`examples/benchmarks/`: every contender of a comparison runs interleaved with the
others in one process (ABC, BCA, CAB, ...), and ratios are taken per round, then summarised by their
median and spread, because the machine this was measured on is shared and its background load drifts.

| benchmark | what it measures |
|---|---|
| `overhead` | time per training step and peak memory of a Lightning fit with EarlyBird + WORM (and the sparsity term) against no callback; the tracker's per-epoch mask cost on 100k+ BN channels |
| `latency` | inference latency, params and FLOPs of dense vs pruned VGG-11-BN, ResNet-18 and MobileNetV2 at p = 0.3 / 0.5 / 0.7: lightning-worm (with and without `round_to=8`), torch-pruning's global BN-scale pruner, `ln_structured` masks (Lightning's `ModelPruning` style) and global `l1_unstructured` masks (the WORM code) |
| `ticket` | on MNIST-1D, over seeds and under two named recipes (the Early-Bird code's and the WORM code's): ticket epoch of Early-Bird vs WORM (elbow, fixed, greedy); validation accuracy just before the prune, right after the surgery and after BatchNorm re-calibration, and epochs to recover the dense accuracy, against a random ticket of the same shape and network slimming; the goals of issue 9, met or not |
| `end_to_end` | on MNIST-1D: wall time and training FLOPs to reach the dense run's final accuracy minus 0.5 point, for each method against dense training; final test accuracy, params, FLOPs and latency of what is delivered |
| `defaults` | the goals of issue 15 at the library's defaults (`sparsity="auto"`, the prune waiting for a ready ticket), on MNIST-1D and on MNIST-1D large, under both recipes' learning rates and weight decays: accuracy right after the prune against dense at that epoch and against a random ticket, final accuracy, training FLOPs, WORM against Early-Bird |
| `transformer` | the tracker's own per-epoch call on the 14 M-unit element-wise query/key mask of a random BERT-base (each stage, wall and CPU time, with the run's threads and with one, and the load average) and the memory per stored mask (`mask_cost`); params, FLOPs and latency after removing half of BERT-base's heads (`bert_heads`); the example ViT's head search, Early-Bird vs WORM (`vit`) |
| `sharded` | under FSDP2 (`ModelParallelStrategy` + `fully_shard`, 2 CPU processes over gloo): the per-step time of a fit with EarlyBird + WORM (fixed, with the sparsity term) against without, alternated, and the whole weights gathered per step and per epoch end (`DTensor.full_tensor` counted); `PruneAndFinetune.prune`'s wall time and peak memory per rank under FSDP2 against DDP on the same ticket; the element-wise q/k mask of a sharded random BERT-base per rank (time per stage, bytes gathered) against one unsharded process |

Rerun: `python examples/benchmarks/run.py --quick` (about 10 minutes on a 2-core CPU, plus 3 to 4 for `sharded`) or
`python -m examples.benchmarks.run` (full mode: 5 seeds, more rounds). `python -m examples.benchmarks.run --only
ticket,end_to_end` runs the claims alone (MNIST-1D, 5 seeds, both recipes: under 15 minutes on 2 cores);
`--only ticket,end_to_end,defaults --methods dense,earlybird,worm_elbow,random` is the run of issue 15 below (both
tasks, 24 minutes on 2 cores).
`--accelerator gpu` runs the GPU rows (batch 128, bf16-mixed; `bash .ci/gpu-check` runs them with the CUDA tests and
the main job on a GPU, in under 8 minutes from a fresh checkout); `--data digits` or `--data cifar10 --data-dir DIR`
trains the ticket and end-to-end benchmarks on the digits or CIFAR-10 (VGG-11-BN at width 0.25) instead of
MNIST-1D; `--threads N` sets `torch.set_num_threads`, `--workers N` the training runs in parallel;
`--only transformer --transformer-parts mask_cost` reruns the transformer mask cost alone (its other rows are
kept); `--only sharded` (`--quick`: under 4 minutes on 2 cores) runs the FSDP2 measurements in child processes, 2 ranks
with one torch thread each. Raw numbers: `benchmarks/<accelerator>/results.json`.
"""


def _assemble(docs: Path) -> None:
    """``benchmarks.md`` from the intro, the CPU results, the GPU check's table (``benchmarks/gpu/check.json``, written
    by :mod:`examples.benchmarks.gpu_check`; every row pending before a GPU run) and the GPU results."""
    from examples.benchmarks.gpu_check import pending_markdown

    parts = [INTRO]
    for accelerator in ACCELERATORS:
        results = docs / "benchmarks" / accelerator / "results.json"
        if accelerator == "gpu":
            check = docs / "benchmarks" / "gpu" / "check.json"
            parts.append(json.loads(check.read_text())["markdown"] if check.exists() else pending_markdown())
        if results.exists():
            parts.append(json.loads(results.read_text())["markdown"])
        elif accelerator == "gpu":
            parts.append(
                "## Results on GPU\n\n**Pending a GPU run.** No GPU was available where these numbers were taken. "
                "`bash .ci/gpu-check` runs the overhead and latency rows on the GPU with the rest of the GPU check "
                "(above); `python -m examples.benchmarks.run --accelerator gpu` (or `--quick`) runs any section on "
                "the GPU (batch 128, bf16-mixed, CUDA peak memory, the device named in every table) and adds it here "
                "without touching the CPU results.\n"
            )
        else:
            parts.append(f"## Results on {accelerator.upper()}\n\nNot run yet.\n")
    (docs / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
