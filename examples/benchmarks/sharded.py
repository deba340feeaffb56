"""Benchmark: the callbacks under FSDP2 (issue 17), on 2 CPU processes (gloo), measured side by side in one run.

Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard`` applied in
the LightningModule's ``configure_model`` (every convolution, BatchNorm and the classifier, then the root). Three
measurements, each in child processes this module starts (:mod:`examples.benchmarks._sharded_child`, one torch
thread per rank, ``OMP_NUM_THREADS=1``), each rank writing its numbers as JSON:

(a) **Per-step overhead of the search + WORM under FSDP2.** The same FSDP2 fit of VGG-11-BN with and without
    ``EarlyBirdCallback`` + ``WormCallback(schedule="fixed")`` (WORM truncates from the first mask, taken at the
    end of the warm-up epoch; the sparsity term on), alternated in one pair of processes (AB, BA, AB, ...). Each
    rank times its steps from ``on_train_batch_start`` to ``on_train_batch_end`` (the epoch-end mask is not in a
    step). ``DTensor.full_tensor`` is wrapped in the children to count the whole weights gathered per step and per
    epoch end, and ``DTensor.to_local`` to count what the callbacks' hooks call per step. Goal: at most 1.02x.
(b) **The prune under FSDP2 against DDP.** The same model and ticket (window 2, threshold 1: the ticket at the end
    of epoch 1, pruned then) under DDP and under FSDP2: wall time of ``PruneAndFinetune.prune`` on each rank and
    the peak resident memory it adds, the whole weights it gathers, and the trial prune of the first batch.
(c) **Element-wise q/k masks of a sharded BERT-base.** A random BERT-base-size ``BertModel`` (12 layers, 768
    wide, 12 heads, 3072 intermediate; nothing downloaded), ``fully_shard`` per layer then the root, on 2
    processes: the tracker's own epoch-end call (``observe_epoch``, source ``AttentionQKSource``) timed per stage
    on each rank, with the bytes gathered; next to the same call on one unsharded process.

Run::

    python -m examples.benchmarks.run --only sharded --quick     # about 4 minutes on a 2-core CPU
    python -m examples.benchmarks.run --only sharded             # full: more rounds and steps
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from examples.benchmarks.common import Section, Settings, Spread, cpu_model, log, markdown_table, scratch_dir

REPO = Path(__file__).resolve().parents[2]
CHILD = "examples.benchmarks._sharded_child"
#: Issue 17's goal for the per-step time with the search + WORM under FSDP2, against without.
GOAL_RATIO = 1.02

#: mode -> settings of the three measurements.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "overhead": dict(arch="vgg11_bn", width=0.0625, batch=2, steps=2, rounds=1, timed_epochs=1, window=2,
                         sparsity=1e-4),
        "prune": dict(arch="vgg11_bn", width=0.0625, batch=2, steps=2, lr=0.01, rounds=1),
        "qk": dict(layers=2, width=64, heads=4, epochs=1),
    },
    "quick": {
        "overhead": dict(arch="vgg11_bn", width=0.5, batch=8, steps=15, rounds=6, timed_epochs=1, window=3,
                         sparsity=1e-4),
        "prune": dict(arch="vgg11_bn", width=1.0, batch=8, steps=6, lr=0.01, rounds=1),
        "qk": dict(layers=12, width=768, heads=12, epochs=4),
    },
    "full": {
        "overhead": dict(arch="vgg11_bn", width=0.5, batch=8, steps=20, rounds=10, timed_epochs=2, window=3,
                         sparsity=1e-4),
        "prune": dict(arch="vgg11_bn", width=1.0, batch=8, steps=6, lr=0.01, rounds=3),
        "qk": dict(layers=12, width=768, heads=12, epochs=8),
    },
}


# ------------------------------------------------------------------------------------- the children


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                              "NODE_RANK")}
    path = env.get("PYTHONPATH")
    env.update(PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", **extra)
    return env


def _read(out: Path, ranks: int, what: str, proc: Any) -> list[dict[str, Any]]:
    missing = [r for r in range(ranks) if not (out / f"rank{r}.json").exists()]
    if proc.returncode != 0 or missing:
        raise RuntimeError(f"The {what} child failed (exit code {proc.returncode}); its output ends with:\n"
                           f"{(proc.stderr or '')[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def _run(commands: list[tuple[list[str], dict[str, str]]], timeout: float) -> list[SimpleNamespace]:
    """Start every command (each in a session of its own) and wait for all (the children write their files before
    they leave the process group together); on a timeout, kill every process of their sessions (a rank that Lightning
    started as well) and raise ``subprocess.TimeoutExpired``."""
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for command, env in commands]
    finished = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=timeout)
            finished.append(SimpleNamespace(returncode=proc.returncode, stderr=stderr))
    except BaseException:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its whole session: a rank Lightning started too
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        raise
    return finished


def launch(kind: str, config: dict[str, Any], out: Path, timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``kind`` on 2 processes that Lightning starts (the command runs once; Lightning starts rank 1 by running
    it again); every rank's JSON.

    Raises:
        RuntimeError: if the child fails (with the end of its output).
    """
    out.mkdir(parents=True, exist_ok=True)
    (proc,) = _run([([sys.executable, "-m", CHILD, kind, str(out), json.dumps(config)], _env())], timeout)
    return _read(out, 2, kind, proc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_group(kind: str, config: dict[str, Any], out: Path, world: int,
                 timeout: float = 600) -> list[dict[str, Any]]:
    """Run ``kind`` on ``world`` processes started here (``RANK`` / ``WORLD_SIZE`` in their environment, gloo);
    every rank's JSON.

    Raises:
        RuntimeError: if a child fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    finished = _run([([sys.executable, "-m", CHILD, kind, str(out), json.dumps(config)],
                      _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(world)))
                     for r in range(world)], timeout)
    return _read(out, world, kind, next((f for f in finished if f.returncode != 0), finished[0]))


# ------------------------------------------------------------------------------------ measurements


def measure_overhead(config: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    log(f"sharded: (a) {config['rounds']} rounds x 3 FSDP2 fits of {config['arch']} at width {config['width']}")
    return launch("overhead", config, out / "overhead")


def measure_prune(config: dict[str, Any], out: Path) -> dict[str, list[list[dict[str, Any]]]]:
    runs: dict[str, list[list[dict[str, Any]]]] = {"ddp": [], "fsdp": []}
    for r in range(config["rounds"]):
        for kind in (("ddp", "fsdp") if r % 2 == 0 else ("fsdp", "ddp")):
            log(f"sharded: (b) the prune under {kind}, round {r + 1} of {config['rounds']}")
            runs[kind].append(launch("prune", {**config, "kind": kind}, out / f"prune-{kind}-{r}"))
    return runs


def measure_qk(config: dict[str, Any], out: Path) -> dict[str, list[dict[str, Any]]]:
    log(f"sharded: (c) q/k mask of a {config['layers']}-layer BERT, sharded on 2 processes and whole on one")
    return {"sharded": launch_group("qk", config, out / "qk-sharded", world=2),
            "one process": launch_group("qk", config, out / "qk-one", world=1)}


# ------------------------------------------------------------------------------------------ report


def _ms(spread: Spread, digits: int = 1) -> str:
    return spread.fmt(digits, 1e3)


def summarise_overhead(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank: the step times with and without the callbacks, their ratios, the hooks and the gathers."""
    rows = []
    for result in ranks:
        fits = result["fits"]
        by = {name: [f for f in fits if f["contender"] == name] for name in ("without", "with", "control")}
        with_, without = by["with"], by["without"]
        wall = {name: [t for f in fs for t in f["times"]] for name, fs in by.items()}
        cpu = {name: [t for f in fs for t in f["cpu_times"]] for name, fs in by.items()}
        base = {f["round"]: f for f in without}
        per_round = {name: [f["step"] / base[f["round"]]["step"] for f in fs] for name, fs in by.items()}
        per_round_cpu = {name: [f["cpu_step"] / base[f["round"]]["cpu_step"] for f in fs] for name, fs in by.items()}
        pooled = {name: statistics.median(wall[name]) / statistics.median(wall["without"]) for name in by}
        pooled_cpu = {name: statistics.median(cpu[name]) / statistics.median(cpu["without"]) for name in by}
        hooks: dict[str, list[float]] = {}
        for f in with_:
            for name, seconds in f["hooks"].items():
                hooks.setdefault(name, []).append(seconds)
        epoch_ends = sum(f["epoch_ends"] for f in with_)
        calls = [f["calls"] for f in with_]
        rows.append(dict(
            rank=result["rank"], steps_with=len(wall["with"]), steps_without=len(wall["without"]),
            rounds=len(with_), step_with=Spread.of(wall["with"]), step_without=Spread.of(wall["without"]),
            step_control=Spread.of(wall["control"]), ratio=pooled["with"], per_round=Spread.of(per_round["with"]),
            cpu_ratio=pooled_cpu["with"], per_round_cpu=Spread.of(per_round_cpu["with"]),
            control_ratio=pooled["control"], control_per_round=Spread.of(per_round["control"]),
            control_cpu_ratio=pooled_cpu["control"], control_per_round_cpu=Spread.of(per_round_cpu["control"]),
            hook_ms=1e3 * statistics.median(f["hook_seconds"] for f in with_),
            hooks_ms={name: 1e3 * statistics.median(v) for name, v in hooks.items()},
            full_per_step_max=max((n for f in with_ for n in f["step_full_tensor"]), default=0),
            full_per_step_mean=statistics.fmean(n for f in with_ for n in f["step_full_tensor"]),
            full_per_epoch_end=sum(c["full_tensor"].get("epoch_end", 0) for c in calls) / max(epoch_ends, 1),
            bytes_per_epoch_end=sum(c["full_tensor_bytes"].get("epoch_end", 0) for c in calls) / max(epoch_ends, 1),
            full_elsewhere=sum(n for c in calls for p, n in c["full_tensor"].items() if p not in ("epoch_end",
                                                                                                  "step", "hooks")),
            to_local_per_step=statistics.median(n for f in with_ for n in f["step_to_local"]),
            tracked=with_[0]["tracked"], truncated=sorted({f["truncated_min"] for f in with_}),
            without_full=sum(sum(f["calls"]["full_tensor"].values()) for f in without + by["control"]),
        ))
    return rows


def summarise_prune(runs: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for kind, launches in runs.items():
        for rank in (0, 1):
            results = [ranks[rank] for ranks in launches]
            prune = [r["measured"]["prune"] for r in results]
            trial = [r["measured"].get("trial") for r in results]
            calls = [r["calls"] for r in results]
            rows.append(dict(
                kind=kind, rank=rank, runs=len(results), seconds=Spread.of([p["seconds"] for p in prune]),
                cpu_seconds=Spread.of([p["cpu_seconds"] for p in prune]),
                peak_increase=Spread.of([p["peak_mib"] - p["rss_before_mib"] for p in prune]),
                rss_change=Spread.of([p["rss_after_mib"] - p["rss_before_mib"] for p in prune]),
                rss_before=Spread.of([p["rss_before_mib"] for p in prune]),
                peak_resets=all(p["peak_reset"] for p in prune),
                gathered_mib=statistics.fmean(c["full_tensor_bytes"].get("prune", 0) for c in calls) / 2**20,
                gathers=statistics.fmean(c["full_tensor"].get("prune", 0) for c in calls),
                trial_seconds=Spread.of([t["seconds"] for t in trial if t]),
                trial_gathered_mib=statistics.fmean(c["full_tensor_bytes"].get("trial", 0) for c in calls) / 2**20,
                tickets=sorted({r["ticket"] for r in results}), kept=results[0]["kept"], units=results[0]["units"],
                params=results[0]["params"], params_after=results[0]["params_after"],
                param_mib=results[0]["param_mib"], pruned_epoch=results[0]["pruned_epoch"],
            ))
    return rows


QK_STAGES = (("scores", "|W| scores, gathered whole (`unit_scores`)"),
             ("ranking", "global ranking (`rank_units`)"),
             ("share", "score shares of the mask and, once found, the ticket (`score_share`)"),
             ("update", "detector update"),
             ("broadcast", "rank 0's mask to every rank"), ("rest", "rest of the call"),
             ("epoch", "**the tracker's per-epoch call** (`observe_epoch`)"))


def summarise_qk(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for setup, ranks in runs.items():
        for result in ranks:
            epochs = result["epochs"]
            stages: dict[str, list[tuple[float, float]]] = {"epoch": [(e["seconds"], e["cpu_seconds"]) for e in epochs]}
            for e in epochs:
                for name, (wall, cpu) in e["stages"].items():
                    stages.setdefault(name, []).append((wall, cpu))
            named = [n for n in ("scores", "ranking", "share", "update", "broadcast") if n in stages]
            stages["rest"] = [(e["seconds"] - sum(e["stages"].get(n, (0, 0))[0] for n in named),
                               e["cpu_seconds"] - sum(e["stages"].get(n, (0, 0))[1] for n in named)) for e in epochs]
            rows.append(dict(
                setup=setup, rank=result["rank"], world=result["world"], epochs=len(epochs), units=result["units"],
                local_units=result["local_units"], model=result["model"],
                wall={k: Spread.of([w for w, _ in v]) for k, v in stages.items()},
                cpu={k: Spread.of([c for _, c in v]) for k, v in stages.items()},
                gathers=statistics.fmean(e["full_tensor"] for e in epochs),
                gathered_mib=statistics.fmean(e["full_tensor_bytes"] for e in epochs) / 2**20,
                received_mib=statistics.fmean(e["received_bytes"] for e in epochs) / 2**20,
                mask_mib=(result["mask_packed_bytes"] or 0) / 2**20,
                peak=Spread.of([e["transient_peak_mib"] for e in epochs]),
                build_seconds=result["build_seconds"], shard_seconds=result["shard_seconds"],
            ))
    return rows


def _verdict(ratio: float) -> str:
    return f"met ({ratio:.3f}x)" if ratio <= GOAL_RATIO else f"**not met** ({ratio:.3f}x)"


def _reading(overhead: list[dict[str, Any]]) -> str:
    """What the wall-time ratios of (a) can tell: the noise floor the A/A control shows, against the hooks' cost."""
    noise = max(abs(r["control_ratio"] - 1) for r in overhead)
    spread = max(max(abs(r["control_per_round"].lo - 1), abs(r["control_per_round"].hi - 1)) for r in overhead)
    worst = max(overhead, key=lambda r: r["ratio"])
    hooks = max(r["hook_ms"] / (1e3 * r["step_without"].median) for r in overhead)
    resolved = abs(worst["ratio"] - 1) > noise
    return (
        f"Reading: the pooled A/A control differs from 1 by up to {100 * noise:.1f} % and single rounds by up to "
        f"{100 * spread:.0f} %, so the wall-time comparison resolves differences of about {100 * noise:.1f} % here; "
        f"the ratio with the callbacks ({worst['ratio']:.3f}x, worst rank) is "
        + ("outside" if resolved else "within") + " that noise. The callbacks' hooks, timed inside the fit, take "
        f"{100 * hooks:.2f} % of a step: that is their cost, without the machine's noise."
    )


def render(settings: Settings, config: dict[str, dict[str, Any]], overhead: list[dict[str, Any]],
           prune: list[dict[str, Any]], qk: list[dict[str, Any]], stamp: dict[str, Any]) -> tuple[str, list[str]]:
    """The section's Markdown and its headline lines."""
    a, b, c = config["overhead"], config["prune"], config["qk"]
    load = lambda v: "n/a" if v is None else f"{v:g}"  # noqa: E731
    lines = [
        f"Mode `{settings.mode}`, measured on {stamp['cpu']} ({stamp['cores']} usable cores, shared) on "
        f"{stamp['date']}; load average (1 min) {load(stamp['load_start'])} at the start and "
        f"{load(stamp['load_end'])} at the end. CPU only: 2 processes (gloo), one torch thread each "
        "(`OMP_NUM_THREADS=1`), Lightning's `ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)` with "
        "`fully_shard` in `configure_model` (every convolution, BatchNorm and the classifier, then the root), unless "
        "said otherwise.",
        "",
        f"**(a) Per-step overhead of the search + WORM under FSDP2.** {a['arch']} at width {a['width']:g} "
        f"({a['batch']} synthetic 3x32x32 images per rank and step), fits of 1 warm-up epoch + {a['timed_epochs']} "
        f"timed epoch(s) of {a['steps']} steps, with and without `EarlyBirdCallback(sparsity={a['sparsity']:g})` + "
        "`WormCallback(schedule=\"fixed\", chi=0.003)`, and without them again (the A/A control: its distance from "
        f"1 is the noise floor of the comparison), interleaved in one pair of processes over {a['rounds']} rounds "
        "(ABC, BCA, CAB, ...; an untimed fit first). The tracker's first mask is taken at the end of the warm-up "
        "epoch, so WORM truncates at every timed step (its own column). Each rank times every step from "
        "`on_train_batch_start` to `on_train_batch_end` (forward, backward with FSDP2's all-gathers and "
        "reduce-scatters, the callbacks' hooks, the optimizer step; not the epoch-end mask). Ratio: the median of all "
        "timed steps with the callbacks over the median without; the per-round ratios (each fit's median step over "
        "that of the round's fit without) give the spread [min, max]. CPU time is the process's (`time.process_time`; "
        "time spent waiting for the other rank's collectives is not in it). The callbacks' hooks are also timed "
        "inside the fit: 1 + hooks / step is their cost without the noise of the machine. "
        f"Goal: at most {GOAL_RATIO:.2f}x.",
        "",
        markdown_table(
            ["rank", "step ms without, median [IQR]", "step ms with", "ratio median(with) / median(without), "
             "per-round [min, max]", "A/A control ratio, per-round [min, max]", "CPU-time ratio, per-round",
             "A/A CPU-time ratio, per-round", "callbacks' hooks ms/step (1 + hooks / step)",
             "channels truncated at every timed step", f"goal <= {GOAL_RATIO:.2f}x"],
            [[r["rank"], _ms(r["step_without"]), _ms(r["step_with"]),
              f"{r['ratio']:.3f}, {r['per_round'].fmt(3, spread='range')}",
              f"{r['control_ratio']:.3f}, {r['control_per_round'].fmt(3, spread='range')}",
              f"{r['cpu_ratio']:.3f}, {r['per_round_cpu'].fmt(3, spread='range')}",
              f"{r['control_cpu_ratio']:.3f}, {r['control_per_round_cpu'].fmt(3, spread='range')}",
              f"{r['hook_ms']:.3f} ({1 + r['hook_ms'] / (1e3 * r['step_without'].median):.4f}x)",
              ", ".join(str(t) for t in r["truncated"]), _verdict(r["ratio"])] for r in overhead]),
        "",
        _reading(overhead),
        "",
        "Where the callbacks' per-step time goes (ms per timed step, median over the fits; WORM's truncation runs in "
        "the tracker's `on_after_backward`, the sparsity term in its `on_before_optimizer_step`, WORM's factors are "
        "rebuilt in its `on_train_batch_start` once per epoch):",
        "",
        markdown_table(["rank", *sorted(overhead[0]["hooks_ms"])],
                       [[r["rank"], *[f"{r['hooks_ms'][k]:.3f}" for k in sorted(overhead[0]["hooks_ms"])]]
                        for r in overhead]),
        "",
        "Whole weights gathered (`DTensor.full_tensor`, wrapped in the children) and local shards taken "
        "(`DTensor.to_local`) with the callbacks:",
        "",
        markdown_table(
            ["rank", "full_tensor per training step (max over the timed steps)", "full_tensor per epoch end",
             "tracked BN layers", "bytes gathered per epoch end", "full_tensor elsewhere", "to_local per step in the "
             "callbacks' hooks (median)", "full_tensor in the fits without callbacks"],
            [[r["rank"], r["full_per_step_max"], f"{r['full_per_epoch_end']:g}", r["tracked"],
              f"{r['bytes_per_epoch_end']:,.0f}", r["full_elsewhere"], f"{r['to_local_per_step']:g}", r["without_full"]]
             for r in overhead]),
        "",
    ]
    p0 = next(r for r in prune if r["kind"] == "ddp")
    same = len({t for r in prune for t in r["tickets"]}) == 1
    resets = all(r["peak_resets"] for r in prune)
    lines += [
        f"**(b) The prune under FSDP2 against DDP.** {b['arch']} at width {b['width']:g} ({p0['params']:,} "
        f"parameters, {p0['param_mib']:.1f} MiB in fp32; BatchNorm gammas drawn at random, learning rate "
        f"{b['lr']:g}), `EarlyBirdCallback(window=2, threshold=1, sparsity=0)` + `PruneAndFinetune(wait_for="
        "\"ticket\", finetune_epochs=0, measure_latency=False)`: the ticket at the end of epoch "
        f"{p0['pruned_epoch']}, pruned then ({p0['kept']:,} of {p0['units']:,} channels kept, {p0['params']:,} -> "
        f"{p0['params_after']:,} parameters); the same ticket under both strategies: "
        f"{'**yes**' if same else '**no**'} ({', '.join(sorted({t for r in prune for t in r['tickets']}))}). "
        f"{b['rounds']} launch(es) per strategy, alternated. `PruneAndFinetune.prune` is timed on each rank (the "
        "surgery, BatchNorm re-calibration on 10 batches, the optimizers rebuilt with their state carried; under "
        "FSDP2 also the gather of the whole weights and the momentum, and `fully_shard` applied again). Memory: "
        + ("the peak resident set size during the prune (`VmHWM`, reset at its start through `/proc/self/clear_refs`; "
           "`ru_maxrss` would only grow, and Linux resets it too) minus the resident size at its start. It counts "
           "what the heap had to grow by: memory freed earlier in the process is reused first, so it is a lower "
           "bound of what the prune allocates; the bytes of the whole tensors gathered are the exact figure of what "
           "FSDP2 adds. "
           if resets else
           "**the peak could not be reset on this system** (no `/proc/self/clear_refs`): the peak column is the "
           "process's peak since its start, which only grows. ")
        + "The trial prune (a random ticket at the first batch, tried on the whole model and undone) is timed too.",
        "",
        markdown_table(
            ["strategy", "rank", "prune s, median [min, max]", "prune CPU s", "peak RSS increase MiB", "RSS after - "
             "before MiB", "whole tensors gathered (calls, MiB)", "trial prune s", "trial gathered MiB"],
            [["DDP" if r["kind"] == "ddp" else "FSDP2", r["rank"], r["seconds"].fmt(3, spread="range"),
              r["cpu_seconds"].fmt(3, spread="range"), r["peak_increase"].fmt(1, spread="range"),
              r["rss_change"].fmt(1, spread="range"), f"{r['gathers']:g}, {r['gathered_mib']:.1f}",
              r["trial_seconds"].fmt(3, spread="range"), f"{r['trial_gathered_mib']:.1f}"] for r in prune]),
        "",
    ]
    one = next(r for r in qk if r["world"] == 1)
    sharded = [r for r in qk if r["world"] > 1]
    header = ["stage"] + [f"{'sharded, rank ' + str(r['rank']) if r['world'] > 1 else 'one process'} {kind} ms"
                          for r in [*sharded, one] for kind in ("wall", "CPU")]
    stage_rows = [[label] + [r[kind][stage].fmt(0, 1e3, spread="range") if stage in r[kind] else "n/a"
                             for r in [*sharded, one] for kind in ("wall", "cpu")] for stage, label in QK_STAGES]
    lines += [
        f"**(c) Element-wise q/k masks of a sharded BERT-base.** {one['model']}: {one['units']:,} query/key weights, "
        f"each a unit ({sharded[0]['local_units']:,} in each rank's shard). Sharded: `fully_shard` per encoder layer, "
        "then the root, on 2 processes (a device mesh over gloo, no Lightning); one process: the same model whole. "
        "The tracker's own epoch-end call (`EarlyBirdCallback.observe_epoch`, `AttentionQKSource`, ratio 0.5, window "
        f"3), each stage timed inside it; {c['epochs']} timed epochs after the window filled, every rank moving "
        "its shard of the weights between epochs as training would; median [min, max]. The scores are |W| of the "
        "shards, gathered whole on every rank (one `full_tensor` per query and key weight); rank 0 ranks them and "
        "broadcasts its mask (packed bits).",
        "",
        markdown_table(header, stage_rows),
        "",
        markdown_table(
            ["", "full_tensor calls per epoch", "whole scores gathered per rank MiB",
             "of which received from the other rank MiB", "mask broadcast MiB (packed)", "transient peak RSS MiB",
             "model built s", "sharded s"],
            [[f"sharded, rank {r['rank']}" if r["world"] > 1 else "one process", f"{r['gathers']:g}",
              f"{r['gathered_mib']:.1f}", f"{r['received_mib']:.1f}", f"{r['mask_mib']:.2f}" if r["world"] > 1 else "0",
              r["peak"].fmt(0, spread="range"), f"{r['build_seconds']:.1f}", f"{r['shard_seconds']:.2f}"]
             for r in [*sharded, one]]),
        "",
    ]
    worst = max(overhead, key=lambda r: r["ratio"])
    fsdp = {r["rank"]: r for r in prune if r["kind"] == "fsdp"}
    ddp = {r["rank"]: r for r in prune if r["kind"] == "ddp"}
    headline = [
        f"FSDP2 (2 CPU processes), search + WORM per step: {worst['ratio']:.3f}x the step without "
        f"(worst rank; per-round {worst['per_round'].fmt(3, spread='range')}; A/A control "
        f"{worst['control_ratio']:.3f}), goal <= {GOAL_RATIO:.2f}x: "
        + ("met" if worst["ratio"] <= GOAL_RATIO else "not met")
        + f"; the hooks {worst['hook_ms']:.2f} ms of a {1e3 * worst['step_without'].median:.0f} ms step; "
        f"{worst['full_per_step_max']} full_tensor per step, {worst['full_per_epoch_end']:g} per epoch end.",
        "FSDP2 prune vs DDP: " + ", ".join(
            f"rank {k} {fsdp[k]['seconds'].median:.2f} s vs {ddp[k]['seconds'].median:.2f} s "
            f"(peak +{fsdp[k]['peak_increase'].median:.0f} vs +{ddp[k]['peak_increase'].median:.0f} MiB)"
            for k in sorted(fsdp)) + ".",
        "Sharded BERT-base q/k mask per epoch: "
        + ", ".join(f"rank {r['rank']} {1e3 * r['wall']['epoch'].median:.0f} ms" for r in sharded)
        + f" vs {1e3 * one['wall']['epoch'].median:.0f} ms on one process; {sharded[0]['gathered_mib']:.0f} MiB "
        "gathered per rank.",
    ]
    return "\n".join(lines), headline


#: The per-step lists of (a)'s fits, summarised in the section and left out of its raw numbers.
PER_STEP = ("times", "cpu_times", "step_full_tensor", "step_to_local")


def run(settings: Settings, out_dir: Path) -> Section:
    """Run (a), (b) and (c) in child processes and assemble the section.

    Returns:
        A :class:`Section` of tables (no figure).
    """
    start = time.perf_counter()
    title = "FSDP2: the search, WORM and the prune on sharded parameters"
    if settings.accelerator != "cpu":  # its children run gloo on the CPU: GPU numbers would be mislabelled
        note = ("Not run with `--accelerator gpu`: this benchmark's 2 ranks run on the CPU (gloo). On GPUs, FSDP2 runs "
                "in the GPU check's `cuda` tests (`tests/gpu/test_cuda.py`).")
        return Section(title, note, [], {"skipped": note}, [], time.perf_counter() - start)
    config = MODES[settings.mode if settings.mode in MODES else "quick"]
    work = scratch_dir() / f"sharded-{os.getpid()}-{time.monotonic_ns()}"
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    stamp = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_model(),
                 cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                 load_start=load_start)
    overhead_raw = measure_overhead(config["overhead"], work)
    prune_raw = measure_prune(config["prune"], work)
    qk_raw = measure_qk(config["qk"], work)
    stamp["load_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    overhead, prune, qk = summarise_overhead(overhead_raw), summarise_prune(prune_raw), summarise_qk(qk_raw)
    markdown, headline = render(settings, config, overhead, prune, qk, stamp)
    raw = lambda rows: [{k: (vars(v) if isinstance(v, Spread) else v) for k, v in row.items()} for row in rows]  # noqa: E731
    data = dict(config=config, stamp=stamp, overhead=raw(overhead), prune=raw(prune),
                qk=[{**row, "wall": {k: vars(v) for k, v in row["wall"].items()},
                     "cpu": {k: vars(v) for k, v in row["cpu"].items()}} for row in raw(qk)],
                overhead_fits=[[{k: v for k, v in f.items() if k not in PER_STEP} for f in r["fits"]]
                               for r in overhead_raw],
                goal_ratio=GOAL_RATIO)
    return Section(title, markdown, [], data, headline, time.perf_counter() - start)
