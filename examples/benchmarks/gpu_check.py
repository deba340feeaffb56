"""The GPU check's report: one table of every GPU row, for ``docs/benchmarks.md``.

``bash .ci/gpu-check`` runs the CUDA tests, the main job on the GPU and the overhead and latency benchmarks on the
GPU, each writing into a results folder, then this module::

    python -m examples.benchmarks.gpu_check --results gpu-check-results          # docs/ of this checkout
    python -m examples.benchmarks.gpu_check --results DIR --docs OTHER_DOCS

It reads what the steps left (``cuda-tests.xml``, the main job's ``summary.json`` and log, ``steps.tsv`` and the
suite's ``benchmarks/gpu/results.json``), writes the table to ``benchmarks/gpu/check.json`` (assembled into
``benchmarks.md`` after the CPU results, before the GPU benchmark section) and to ``RESULTS/gpu-check.md``, and prints
it. A row whose step did not run says so; before any GPU run, every row reads "pending" (:func:`pending_markdown`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "bash .ci/gpu-check"

#: The rows that come from one CUDA test each: (row, test name as pytest reports it, without the module).
TEST_ROWS = (
    ("Search + WORM + prune mid-fit on one GPU; the checkpoint reloaded by `load_pruned`",
     "test_search_worm_prune_on_gpu_then_load_pruned"),
    ("AMP `16-mixed` through the prune (trains on, finite loss, optimizer state on the GPU)",
     "test_amp_through_the_prune[16-mixed]"),
    ("AMP `bf16-mixed` through the prune (trains on, finite loss, optimizer state on the GPU)",
     "test_amp_through_the_prune[bf16-mixed]"),
    ("Example input given on the CPU; every tensor on the GPU after the prune",
     "test_example_input_on_the_cpu_and_every_tensor_on_the_gpu"),
    ("Resume from a pruned checkpoint on the GPU", "test_resume_from_a_pruned_checkpoint_on_gpu"),
    ("FSDP2 (`ModelParallelStrategy` + `fully_shard`) with the three callbacks, on the GPUs present",
     "test_fsdp2_search_worm_prune_on_the_gpus_present"),
    ("DDP on 2 GPUs with SyncBatchNorm, prune mid-fit (needs 2 GPUs)",
     "test_ddp_on_two_gpus_with_syncbatchnorm_prunes_mid_fit"),
)
MAIN_JOB_ROW = "Main job (`python -m examples.main --trainer.accelerator gpu`)"
OVERHEAD_ARCHS = {"resnet18": "ResNet-18", "vgg11_bn": "VGG-11-BN"}
LATENCY_MODELS = {"vgg11_bn": "VGG-11-BN", "resnet18": "ResNet-18", "mobilenet_v2": "MobileNetV2"}
LATENCY_VARIANTS = {"pruned": "", "pruned round_to=8": ", `round_to=8`"}


def row_names() -> list[str]:
    """Every GPU row, in the table's order."""
    names = ["CUDA tests (`pytest -m cuda`), all", *(row for row, _ in TEST_ROWS), MAIN_JOB_ROW]
    names += [f"Callbacks' overhead per step, {label} (batch 128, bf16-mixed), ratio to the fit without them"
              for label in OVERHEAD_ARCHS.values()]
    names += [f"Dense vs pruned latency, {label}, p = 0.5, batch 128, `export_for_inference`{variant}"
              for label in LATENCY_MODELS.values() for variant in LATENCY_VARIANTS.values()]
    return names


def _table(rows: Sequence[tuple[str, str]]) -> str:
    lines = ["| GPU row | result |", "|---|---|"]
    lines += [f"| {name} | {result.replace('|', '/')} |" for name, result in rows]
    return "\n".join(lines)


#: How to run the check and what it does; under the table in both versions of the section.
HOW_TO_RUN = (
    f"`{SCRIPT} [DIR]` (from the repository root of a fresh checkout on a CUDA machine, under 8 minutes) makes "
    "`.venv` and installs the `test` extra into it (it needs no internet beyond the package registry), then runs the "
    "tests marked `cuda` (`python -m pytest -m cuda`: `tests/gpu/test_cuda.py`; the multi-GPU ones where there are "
    "GPUs enough), the main job with `--trainer.accelerator gpu`, the `overhead` and `latency` benchmarks with "
    "`--accelerator gpu --mode quick` and this report, printing each step's wall time. Logs, the JUnit XML, the "
    "main job's run and a copy of this page go to `DIR` (default `gpu-check-results/`, gitignored); this page is "
    "regenerated with the table filled in, and the benchmark rows' details land in \"Results on GPU\" below: commit "
    "`docs/benchmarks.md` and `docs/benchmarks/gpu/`."
)


def pending_markdown() -> str:
    """The GPU check's section before any GPU run: every row pending, and how to run it."""
    return (
        "## GPU check\n\n**Pending a GPU run.** This code has not run on a GPU yet; every row below is pending.\n\n"
        + _table([(name, "pending") for name in row_names()]) + "\n\n" + HOW_TO_RUN + "\n"
    )


# ------------------------------------------------------------------------------------------- readers


def read_junit(path: Path) -> dict[str, tuple[str, str]]:
    """``{test name: (outcome, detail)}`` from a JUnit XML file; outcome is passed, failed or skipped."""
    if not path.exists():
        return {}
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome, detail = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, detail = "failed", (child.get("message") or child.text or "").strip()
            elif child.tag == "skipped":
                outcome, detail = "skipped", (child.get("message") or "").strip()
        outcomes[name] = (outcome, detail.splitlines()[0][:200] if detail else "")
    return outcomes


def _test_result(outcomes: dict[str, tuple[str, str]], name: str) -> str:
    found = [v for k, v in outcomes.items() if k == name or k.startswith(f"{name}[")]
    if not outcomes:
        return "not run (no cuda-tests.xml)"
    if not found:
        return "not run"
    failed = [d for o, d in found if o == "failed"]
    if failed:
        return f"**failed**: {failed[0]}"
    if all(o == "skipped" for o, _ in found):
        return f"skipped: {found[0][1]}"
    return "passed" if len(found) == 1 else f"passed ({len(found)} cases)"


def _tests_total(outcomes: dict[str, tuple[str, str]]) -> str:
    if not outcomes:
        return "not run (no cuda-tests.xml)"
    counts = {o: sum(1 for v, _ in outcomes.values() if v == o) for o in ("passed", "failed", "skipped")}
    text = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    return f"**{text}**" if counts["failed"] else text


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def main_job_result(results: Path) -> str:
    """One line from the main job's ``summary.json`` (the newest under ``RESULTS/main-job``)."""
    found = sorted((results / "main-job").rglob("summary.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return "not run (no summary.json)"
    s = json.loads(found[-1].read_text())
    params = s.get("params") or [None, None]
    dense = (s.get("dense_reference") or {}).get("test_acc")
    goals = s.get("goals") or []
    parts = [f"ticket at epoch {s.get('ticket_epoch')}, pruned at the end of epoch {s.get('pruned_epoch')}"]
    if all(params):
        parts.append(f"params {params[0]:.3g} -> {params[1]:.3g} ({params[1] / params[0]:.2f}x)")
    parts.append(f"test acc {_pct(s.get('accuracy', {}).get('test_end'))} (dense reference {_pct(dense)})")
    if goals:
        parts.append(f"goals met: {sum(1 for g in goals if g.get('met'))} of {len(goals)}")
    return "; ".join(parts)


def _spread(d: dict[str, Any], digits: int = 2) -> str:
    return f"{d['median']:.{digits}f}x [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def overhead_results(bench: dict[str, Any]) -> dict[str, str]:
    """Per model, the callbacks' per-step wall-time ratio to the fit without them (median [min, max])."""
    out: dict[str, str] = {}
    for arch, per in (bench.get("results", {}).get("overhead") or {}).items():
        if arch not in OVERHEAD_ARCHS:
            continue
        parts = []
        for name, label in (("EarlyBird + WORM (fixed)", "EarlyBird + WORM"),
                            ("EarlyBird (sparsity 1e-4) + WORM (fixed)", "with the sparsity term"),
                            ("no callback (A/A control)", "A/A control")):
            if name in per:
                parts.append(f"{label} {_spread(per[name]['wall_ratio'], 3)}")
        out[arch] = "; ".join(parts)
    return out


def latency_results(bench: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Per (model, variant), the exported pruned model's latency over the exported dense one's, with FLOPs."""
    out: dict[tuple[str, str], str] = {}
    for r in (bench.get("results", {}).get("latency") or {}).get("export_paths", []):
        if r.get("path") != "export":
            continue
        if "error" in r:
            for variant in LATENCY_VARIANTS:
                out[(r["model"], variant)] = f"**failed**: {r['error']}"
            continue
        if r["variant"] in LATENCY_VARIANTS:
            ratio = r["ratio"]
            out[(r["model"], r["variant"])] = (
                f"{_spread({**ratio, 'lo': ratio['q1'], 'hi': ratio['q3']})} of dense ({r['ms']:.2f} ms) at "
                f"{r['flops_ratio']:.2f}x the FLOPs (latency / FLOPs {ratio['median'] / r['flops_ratio']:.2f})")
    return out


def steps_line(results: Path) -> str:
    path = results / "steps.tsv"
    if not path.exists():
        return ""
    steps = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return "; ".join(f"{name} {float(seconds):.0f} s" + ("" if status == "0" else f" (**exit {status}**)")
                     for name, seconds, status in steps)


def _main_job_text(results: Path) -> str:
    log = results / "main-job.log"
    if not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"=+", line.strip()) and len(line.strip()) > 20]
    return "\n".join(lines[rules[0]:rules[-1] + 1]) if len(rules) >= 2 else ""


def _environment() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
            device = f"{torch.cuda.device_count()} x {', '.join(names)}, CUDA {torch.version.cuda}"
        else:
            device = "no CUDA device seen by the report"
        import lightning

        return f"{device}; torch {torch.__version__}, Lightning {lightning.__version__}"
    except Exception as error:  # noqa: BLE001 - the table matters more than the stamp
        return f"environment unknown ({type(error).__name__})"


def report(results: Path, docs: Path) -> str:
    """The GPU check's Markdown section from the files in ``results`` and ``docs/benchmarks/gpu/results.json``."""
    outcomes = read_junit(results / "cuda-tests.xml")
    bench_path = docs / "benchmarks" / "gpu" / "results.json"
    bench = json.loads(bench_path.read_text()) if bench_path.exists() else {}
    overhead, latency = overhead_results(bench), latency_results(bench)
    missing = "not run (no benchmarks/gpu/results.json)" if not bench else "not measured"
    rows = [("CUDA tests (`pytest -m cuda`), all", _tests_total(outcomes))]
    rows += [(row, _test_result(outcomes, test)) for row, test in TEST_ROWS]
    rows.append((MAIN_JOB_ROW, main_job_result(results)))
    names = iter(row_names()[len(rows):])
    rows += [(next(names), overhead.get(arch, missing)) for arch in OVERHEAD_ARCHS]
    rows += [(next(names), latency.get((model, variant), missing))
             for model in LATENCY_MODELS for variant in LATENCY_VARIANTS]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    steps = steps_line(results)
    md = (f"## GPU check\n\n`{SCRIPT}` on {date}: {_environment()}."
          + (f" Wall time per step: {steps}." if steps else "")
          + " Overhead: per-round ratios of the median step time (wall) to the fit without callbacks, median "
          "[min, max]; latency: per-round ratios to the dense model in the same export path, median [IQR]. The "
          "benchmark rows' details are in \"Results on GPU\" below.\n\n" + _table(rows) + "\n\n" + HOW_TO_RUN + "\n")
    text = _main_job_text(results)
    if text:
        md += f"\n<details><summary>The main job's summary on the GPU</summary>\n\n```text\n{text}\n```\n\n</details>\n"
    return md


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Write the GPU check's table into docs/benchmarks.md.")
    parser.add_argument("--results", type=Path, default=Path("gpu-check-results"),
                        help="the folder the GPU check's steps wrote into (default: gpu-check-results)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs",
                        help="the docs folder whose benchmarks.md is regenerated (default: the repository's docs/)")
    args = parser.parse_args(argv)
    from examples.benchmarks.run import _assemble

    md = report(args.results, args.docs)
    out = args.docs / "benchmarks" / "gpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps({"markdown": md}, indent=1))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "gpu-check.md").write_text(md)
    _assemble(args.docs)
    print(md)
    return md


if __name__ == "__main__":
    main()
