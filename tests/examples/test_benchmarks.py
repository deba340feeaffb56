"""The benchmark suite runs end to end on a tiny setting. Nothing here is timed: the numbers are not checked,
only that every benchmark produces its tables, figures and raw results (into tmp_path, never into docs/)."""

import dataclasses
import json

import pytest

pytest.importorskip("mnist1d")

from examples.benchmarks import BENCHMARKS, claims, ticket  # noqa: E402
from examples.benchmarks.common import (  # noqa: E402
    Settings,
    Spread,
    interleave,
    markdown_table,
    paired_ratios,
)
from examples.benchmarks.run import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return Settings.preset("tiny", accelerator="cpu", threads=1)


@pytest.mark.parametrize("name", sorted(set(BENCHMARKS) - {"sharded"}))  # sharded: its own test, below (slow)
def test_benchmark_runs_on_a_tiny_setting(name, tiny, tmp_path):
    section = BENCHMARKS[name](tiny, tmp_path)
    assert section.title and section.headline
    assert "|---|" in section.markdown  # at least one Markdown table
    assert section.figures or name in ("transformer", "defaults", "earlybert")  # these sections are tables only
    assert all(f.exists() and f.parent == tmp_path for f in section.figures)
    json.dumps(section.data, default=lambda v: vars(v) if hasattr(v, "__dict__") else str(v))


@pytest.mark.slow
def test_sharded_benchmark_runs_on_a_tiny_setting(tiny, tmp_path):
    """The FSDP2 benchmark (2 processes per measurement, about a minute): its tables, and what it counts: no whole
    weight gathered in a training step, one per tracked BatchNorm at each epoch end, the same ticket under DDP and
    FSDP2, and every query and key weight's scores gathered whole once per epoch."""
    section = BENCHMARKS["sharded"](tiny, tmp_path)
    assert section.title and len(section.headline) == 3
    assert sum(line.startswith("|---") for line in section.markdown.splitlines()) == 6  # six tables
    assert not section.figures and not list(tmp_path.iterdir())  # tables only; the children write elsewhere
    json.dumps(section.data)
    for rank in section.data["overhead"]:
        assert rank["full_per_step_max"] == 0 and rank["without_full"] == 0 and rank["full_elsewhere"] == 0
        assert rank["full_per_epoch_end"] == rank["tracked"] == 8  # VGG-11-BN's BatchNorm layers
        assert rank["steps_with"] == rank["steps_without"] > 0 and min(rank["truncated"]) > 0
    prune = section.data["prune"]
    assert len({ticket for r in prune for ticket in r["tickets"]}) == 1
    assert all((r["gathers"] > 0) == (r["kind"] == "fsdp") for r in prune)
    sharded = [r for r in section.data["qk"] if r["world"] == 2]
    one = next(r for r in section.data["qk"] if r["world"] == 1)
    assert len(sharded) == 2 and one["gathers"] == 0
    for rank in sharded:
        assert rank["gathers"] == 4 and rank["gathered_mib"] * 2**20 == 4 * rank["units"] == 8 * rank["local_units"]


def test_claims_measure_every_method_under_both_recipes(tiny):
    """Every method runs; each prune is measured before, after the surgery and after re-calibration; the pruned
    network is really smaller; the random control prunes as many channels per layer as Early-Bird's ticket."""
    runs = claims.results(tiny)["runs"]
    assert list(runs) == ["earlybird", "worm"]
    assert list(runs["earlybird"]) == list(claims.METHODS)
    # the second recipe: up to the prune only, and dense (its accuracy at the prune)
    assert list(runs["worm"]) == ["dense", *claims.SEARCH_METHODS]
    dense = runs["earlybird"]["dense"][0]
    for recipe, per in runs.items():
        for method, (r,) in per.items():
            if method == "dense":
                continue
            assert r["pruned_epoch"] is not None, (recipe, method)
            assert all(0.0 <= r[k] <= 1.0 for k in ("acc_before", "acc_after", "acc_after_recal"))
            assert r["curve"][r["final_from"]]["val_acc"] == r["acc_after_recal"]
            if recipe == "earlybird":
                assert r["inference_flops"] < 0.9 * dense["inference_flops"] and r["params"] < dense["params"]
                assert 0.0 <= r["test_acc"] <= 1.0 and r["latency_ms"] > 0
            else:
                assert "test_acc" not in r and r["curve"][-1]["epoch"] == r["pruned_epoch"]
        eb, rnd = per["earlybird"][0], per["random"][0]
        assert rnd["ticket_epoch"] == eb["ticket_epoch"] and rnd["channels_after"] == eb["channels_after"]
        assert rnd["acc_before"] == eb["acc_before"]  # same seed: the same training up to the ticket


def test_search_cap_forces_the_prune(tiny, monkeypatch):
    """A recipe with a search cap prunes the newest mask at the cap when no ticket emerged (the WORM code's 20)."""
    capped = dataclasses.replace(claims.RECIPES["worm"], name="capped", search_cap=2)
    monkeypatch.setitem(claims.RECIPES, "capped", capped)
    never = dataclasses.replace(tiny, threshold=0.0, window=3, epochs=3)  # no ticket can emerge by epoch 1
    r = claims.fit_one(never, "capped", "earlybird", seed=0, to_the_end=False)
    assert r["ticket_epoch"] is None and r["forced"] and r["pruned_epoch"] == 1
    assert r["acc_after_recal"] is not None


def test_reach_recovery_and_verdicts():
    curve = [dict(epoch=0, val_acc=0.5, seconds=1, train_flops=10), dict(epoch=1, val_acc=0.9, seconds=2,
             train_flops=20), dict(epoch=1, val_acc=0.2, seconds=2, train_flops=20),
             dict(epoch=2, val_acc=0.7, seconds=3, train_flops=25), dict(epoch=3, val_acc=0.85, seconds=4,
             train_flops=30)]
    run = dict(curve=curve, final_from=2, pruned_epoch=1)
    assert claims.reach(run, 0.8)["epoch"] == 3  # the dense point before the prune does not count
    assert claims.recovery_epochs(run, 0.8) == 2 and claims.recovery_epochs(run, 0.2) == 0
    assert claims.recovery_epochs(run, 0.95) is None
    assert claims.target(Settings(target_drop=0.005), dict(curve=curve)) == pytest.approx(0.845)
    assert ticket.verdict(0.7, 0.8, at_most=True) == "met"
    assert "NOT MET" in ticket.verdict(0.9, 0.8, at_most=True)
    assert ticket.verdict(None, 0.8, at_most=False, missing="no ticket") == "**NOT MET** (no ticket)"
    assert ticket.fmt([1.0, None, 3.0], 1) == "2.0 [1.0, 3.0] (1 of 3 none)"
    assert ticket.fmt([None, None]) == "none" and ticket.fmt([]) == "n/a"


@pytest.mark.slow
def test_claims_run_in_worker_processes(tiny):
    """The full mode's path: runs in spawned processes give the same structure as in-process runs."""
    settings = dataclasses.replace(tiny, workers=2, recipes=("worm",), epochs=2, window=2)
    runs = claims.results(settings)["runs"]["worm"]
    assert list(runs) == list(claims.METHODS)
    assert all(len(rs) == 1 and rs[0]["curve"] for rs in runs.values())


def test_run_writes_the_report_with_the_gpu_rows_pending(tmp_path):
    main(["--mode", "tiny", "--accelerator", "cpu", "--threads", "1", "--only", "latency", "--docs", str(tmp_path)])
    report = (tmp_path / "benchmarks.md").read_text()
    assert "tiny mode" in report and "Pending a GPU run" in report and "torch threads" in report
    assert (tmp_path / "benchmarks" / "cpu" / "latency_vs_flops.png").exists()
    assert [p.name for p in tmp_path.rglob("*.md")] == ["benchmarks.md"]  # one page: docs/ is an mkdocs site
    results = json.loads((tmp_path / "benchmarks" / "cpu" / "results.json").read_text())
    assert results["settings"]["mode"] == "tiny" and "latency" in results["results"]
    assert results["environment"]["torch_threads"] == 1


def test_run_rejects_unknown_benchmarks(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark"):
        main(["--mode", "tiny", "--only", "nope", "--docs", str(tmp_path)])


def test_interleave_rotates_the_order():
    calls = []
    out = interleave({k: (lambda k=k: calls.append(k) or len(calls)) for k in "ABC"}, rounds=3)
    assert "".join(calls) == "ABCBCACAB"
    assert out == {"A": [1, 6, 8], "B": [2, 4, 9], "C": [3, 5, 7]}


def test_spread_and_paired_ratios():
    spread = Spread.of([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert (spread.median, spread.lo, spread.hi, spread.n) == (2.5, 1.0, 4.0, 4)
    ratios = paired_ratios({"ref": [2.0, 4.0], "x": [1.0, 4.0]}, "ref")
    assert ratios["ref"].median == 1.0 and (ratios["x"].lo, ratios["x"].hi) == (0.5, 1.0)
    assert Spread.of([]).fmt() == "n/a"


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 0.12345], ["x|y", float("nan")]]).splitlines() == [
        "| a | b |", "|---|---|", "| 1 | 0.123 |", "| x\\|y | n/a |"]


def test_presets():
    assert Settings.preset("quick", "cpu").mode == "quick"
    full = Settings.preset("full", "cpu")
    assert len(full.seeds) >= 5 and full.data == "mnist1d" and full.recipes == ("earlybird", "worm")
    assert Settings.preset("quick", "cpu", data="digits").arch == "vgg11_bn"
    with pytest.raises(ValueError, match="Unknown mode"):
        Settings.preset("huge", "cpu")


def test_gpu_preset(monkeypatch):
    """The GPU rows: batch 128 for the overhead fits and the latency, bf16-mixed, 20 forwards per timed round."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    gpu = Settings.preset("quick", "gpu")
    assert (gpu.overhead_batch, max(gpu.latency_batches), gpu.latency_repeats) == (128, 128, 20)
    assert gpu.precision == "bf16-mixed" and gpu.device.type == "cuda" and gpu.workers == 1


def test_run_keeps_the_sections_it_did_not_rerun(tmp_path, monkeypatch):
    """`--only x` replaces section x and keeps the others with their own mode and date (a full run of one benchmark
    does not wipe the rest of the report)."""
    from examples.benchmarks.common import Section

    def fake(title):
        def run(settings, out_dir):
            figure = out_dir / f"{title}.png"
            figure.write_bytes(b"png")
            return Section(title, f"| {title} |\n|---|\n| {settings.mode} |", [figure], {"mode": settings.mode},
                           [f"{title} headline ({settings.mode})"])
        return run

    monkeypatch.setitem(BENCHMARKS, "alpha", fake("Alpha"))
    monkeypatch.setitem(BENCHMARKS, "beta", fake("Beta"))
    main(["--mode", "tiny", "--accelerator", "cpu", "--threads", "1", "--only", "alpha,beta", "--docs", str(tmp_path)])
    results_path = tmp_path / "benchmarks" / "cpu" / "results.json"
    results = json.loads(results_path.read_text())
    results["sections"]["alpha"]["appendix"] = "#### Alpha under another recipe\n\n| other |\n|---|\n| run |"
    results_path.write_text(json.dumps(results))
    main(["--mode", "quick", "--accelerator", "cpu", "--threads", "1", "--only", "beta", "--docs", str(tmp_path)])
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.index("](benchmarks/cpu/Alpha.png)") < report.index("#### Alpha under another recipe") < report.index(
        "### 2. Beta")
    assert "Alpha headline (tiny)" in report and "Beta headline (quick)" in report
    assert "Beta headline (tiny)" not in report and "Kept from earlier runs" in report
    assert "*`alpha`, tiny mode" in report and "*`beta`, quick mode" in report
    assert report.index("### 1. Alpha") < report.index("### 2. Beta")
    results = json.loads((tmp_path / "benchmarks" / "cpu" / "results.json").read_text())
    assert results["results"] == {"alpha": {"mode": "tiny"}, "beta": {"mode": "quick"}}


def test_transformer_mask_cost_alone_keeps_the_other_rows(tmp_path):
    """`--transformer-parts mask_cost` reruns the tracker's per-epoch call alone; the BERT-heads and ViT rows of the
    earlier run stay in the report, each marked with its own mode and date."""
    heads = dict(heads="144 -> 72", params_ratio=0.87, flops_ratio=0.83, latency_dense_ms=579.0,
                 latency_pruned_ms=486.0, latency_ratio=0.84, batch="4 x 128 tokens")
    vit = {name: [dict(seed=0, ticket_epoch=9, before=0.647, after=0.419, epochs_to_recover=2, final=0.844)]
           for name in ("EarlyBird", "WORM (elbow)")}
    out = tmp_path / "benchmarks" / "cpu"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({
        "sections": {"transformer": dict(title="Transformers", markdown="old", headline=["old"], figures=[],
                                         seconds=1.0, mode="full", date="2026-11-25 10:26 UTC", command="",
                                         settings={})},
        "results": {"transformer": {"mask_cost": {"epoch_ms": 135.0}, "bert_heads": heads, "vit": vit}}}))
    main(["--mode", "tiny", "--accelerator", "cpu", "--threads", "1", "--only", "transformer",
          "--transformer-parts", "mask_cost", "--docs", str(tmp_path)])
    report = (tmp_path / "benchmarks.md").read_text()
    assert report.count("*(kept from the full-mode run of 2026-11-25 10:26 UTC)*") == 2
    assert "486 (0.84x)" in report and "| EarlyBird | 9.0 | 64.7 | 41.9 | 2.0 | 84.4 |" in report
    assert "`observe_epoch`" in report and "--transformer-parts mask_cost" in report
    results = json.loads((out / "results.json").read_text())["results"]["transformer"]
    assert results["bert_heads"] == heads and results["vit"] == vit
    cost = results["mask_cost"]
    assert cost["threads"] == [1] and cost["units"] == 2 * 2 * 64 * 64
    assert set(cost["wall_ms"]["1"]) == {"scores", "ranking", "checksum", "update", "rest", "epoch"}
    assert cost["bits_per_unit"] == 1.0 and 1.0 <= cost["checkpoint_bits_per_unit"] < 1.2
    assert results["measured"]["mask_cost"]["mode"] == "tiny" and results["measured"]["vit"]["mode"] == "full"
