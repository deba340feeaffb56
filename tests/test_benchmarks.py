"""The benchmark suite runs end to end on a tiny setting. Nothing here is timed: the numbers are not checked,
only that every benchmark produces its tables, figures and raw results (into tmp_path, never into docs/)."""

import json

import pytest

from examples.benchmarks import BENCHMARKS
from examples.benchmarks.common import (
    Settings, Spread, interleave, markdown_table, paired_ratios,
)
from examples.benchmarks.run import main


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return Settings.preset("tiny", accelerator="cpu", threads=1)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_on_a_tiny_setting(name, tiny, tmp_path):
    section = BENCHMARKS[name](tiny, tmp_path)
    assert section.title and section.headline
    assert "|---|" in section.markdown  # at least one Markdown table
    assert section.figures and all(f.exists() and f.parent == tmp_path for f in section.figures)
    json.dumps(section.data, default=lambda v: vars(v) if hasattr(v, "__dict__") else str(v))


def test_ticket_benchmark_prunes_the_example_module(tiny, tmp_path):
    """The ticket is found and PruneAndFinetune really shrinks the ImageClassifier (FLOPs ratio below 1)."""
    section = BENCHMARKS["ticket"](tiny, tmp_path)
    for runs in section.data.values():
        assert all(r["ticket_epoch"] is not None and r["flops_ratio"] < 0.9 for r in runs)


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
    assert len(Settings.preset("full", "cpu").search_seeds) >= 5
    with pytest.raises(ValueError, match="Unknown mode"):
        Settings.preset("huge", "cpu")
