"""The GPU check stays runnable where there is no GPU to run it: ``.ci/gpu-check`` names its steps and runs them all
(stand-ins for Python here), and its report fills every GPU row of ``docs/benchmarks.md`` from the steps' files."""

import json
import os
import shutil
import subprocess

import pytest

from examples.benchmarks import gpu_check
from tests.helpers import ROOT

SCRIPT = ROOT / ".ci" / "gpu-check"
STEPS = ["set-up", "cuda tests", "main job", "benchmarks", "report"]


def test_script_is_executable_and_names_its_steps():
    assert os.access(SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    for command in ('python3 -m venv .venv && .venv/bin/pip install -e ".[test]"', '-m pytest -m cuda',
                    "-m examples.main --trainer.accelerator gpu",
                    "-m examples.benchmarks.run --accelerator gpu --mode quick", "--only overhead,latency",
                    "-m examples.benchmarks.gpu_check"):
        assert command in text, command
    assert "gpu-check-results/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("failing", [None, "examples.main"])
def test_script_runs_every_step_and_records_it(tmp_path, failing):
    """With a stand-in Python (``GPU_CHECK_PYTHON``) that records its arguments: every step runs, in order, even after
    one fails; each one's time and status land in steps.tsv; the exit status says whether any failed."""
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / ".ci" / "gpu-check")
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python"
    fail = f'case "$*" in *{failing}*) exit 3;; esac\n' if failing else ""
    python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n{fail}exit 0\n')
    python.chmod(0o755)
    results = tmp_path / "results"
    env = {**os.environ, "GPU_CHECK_PYTHON": str(python)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", ".ci/gpu-check", str(results)], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=60)
    steps = [line.split("\t") for line in (results / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == STEPS
    assert [s[2] for s in steps] == ["0", "0", "3" if failing else "0", "0", "0"]
    assert proc.returncode == (1 if failing else 0), proc.stderr
    assert "s, exit status" in proc.stdout and "s in all" in proc.stdout
    ran = calls.read_text().splitlines()
    assert ran[1].startswith("-m pytest -m cuda") and ran[-1] == f"-m examples.benchmarks.gpu_check --results {results}"
    assert not (repo / ".venv").exists()  # GPU_CHECK_PYTHON skips the install


def test_pending_lists_every_gpu_row():
    md = gpu_check.pending_markdown()
    assert md.count("| pending |") == len(gpu_check.row_names()) == 1 + 7 + 1 + 2 + 6
    assert "bash .ci/gpu-check" in md and "no internet beyond the package registry" in md
    report = (ROOT / "docs" / "benchmarks.md").read_text()
    assert md in report or "`bash .ci/gpu-check` on " in report  # pending, or filled in by a GPU run


def _results(tmp_path):
    """The files the GPU check's steps leave, for a run where one test failed and the DDP test had one GPU."""
    results = tmp_path / "results"
    cases = [f'<testcase classname="tests.gpu.test_cuda" name="{name}" time="1"/>' for _, name in gpu_check.TEST_ROWS
             if "fsdp2" not in name and "ddp" not in name]
    example = "test_example_input_on_the_cpu_and_every_tensor_on_the_gpu"
    cases = [c.replace(f'name="{example}"', f'name="{example}[example_input]"') for c in cases]
    cases += [
        '<testcase classname="tests.gpu.test_cuda" name="test_fsdp2_search_worm_prune_on_the_gpus_present" time="9">'
        '<failure message="AssertionError: ValueError: EarlyBirdCallback does not support the ModelParallelStrategy">'
        "trace</failure></testcase>",
        '<testcase classname="tests.gpu.test_cuda" name="test_ddp_on_two_gpus_with_syncbatchnorm_prunes_mid_fit" '
        'time="0"><skipped type="pytest.skip" message="needs 2 CUDA devices, torch sees 1"/></testcase>',
    ]
    (results / "main-job" / "lightning_logs" / "version_0").mkdir(parents=True)
    (results / "cuda-tests.xml").write_text(f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite>'
                                            "</testsuites>")
    (results / "main-job" / "lightning_logs" / "version_0" / "summary.json").write_text(json.dumps({
        "ticket_epoch": 12, "pruned_epoch": 12, "params": [579100, 119800],
        "accuracy": {"test_end": 0.996}, "dense_reference": {"test_acc": 0.994},
        "goals": [{"met": True}, {"met": False}]}))
    rule = "=" * 72
    (results / "main-job.log").write_text(f"noise\n{rule}\nlightning-worm: summary\n{rule}\nmodel vgg11_bn\n{rule}\n")
    (results / "steps.tsv").write_text("set-up\t95\t0\ncuda tests\t61\t1\nmain job\t80\t0\nbenchmarks\t170\t0\n")
    docs = tmp_path / "docs"
    (docs / "benchmarks" / "gpu").mkdir(parents=True)
    # The CPU run's raw results have the GPU run's layout (the same code writes both).
    bench = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "results.json").read_text())
    bench["markdown"] = "## Results on GPU: a stand-in\n"
    (docs / "benchmarks" / "gpu" / "results.json").write_text(json.dumps(bench))
    return results, docs


def test_report_fills_every_row_and_regenerates_benchmarks_md(tmp_path, capsys):
    results, docs = _results(tmp_path)
    gpu_check.main(["--results", str(results), "--docs", str(docs)])
    table = (results / "gpu-check.md").read_text()
    rows = dict(line.strip("| ").split(" | ", 1) for line in table.splitlines()
                if line.startswith("| ") and not line.startswith("| GPU row"))
    assert list(rows) == gpu_check.row_names() and "pending" not in table
    assert rows["CUDA tests (`pytest -m cuda`), all"] == "**5 passed, 1 failed, 1 skipped**"
    fsdp2, ddp = (rows[name] for name, test in gpu_check.TEST_ROWS if "fsdp2" in test or "ddp" in test)
    assert fsdp2.startswith("**failed**: AssertionError: ValueError: EarlyBirdCallback does not support")
    assert ddp == "skipped: needs 2 CUDA devices, torch sees 1"
    assert all(rows[name] == "passed" for name, test in gpu_check.TEST_ROWS[:5])
    main_job = rows[gpu_check.MAIN_JOB_ROW]
    assert "ticket at epoch 12" in main_job and "(0.21x)" in main_job and "99.6 %" in main_job
    assert "goals met: 1 of 2" in main_job
    overhead = [v for k, v in rows.items() if k.startswith("Callbacks' overhead")]
    assert len(overhead) == 2 and all("EarlyBird + WORM " in v and "x [" in v and "A/A control" in v for v in overhead)
    latency = [v for k, v in rows.items() if k.startswith("Dense vs pruned latency")]
    assert len(latency) == 6 and all(" of dense (" in v and "x the FLOPs" in v for v in latency)
    assert "cuda tests 61 s (**exit 1**)" in table and "lightning-worm: summary" in table
    report = (docs / "benchmarks.md").read_text()
    assert report.index("## Results on CPU") < report.index("## GPU check") < report.index("## Results on GPU")
    assert table in report and json.loads((docs / "benchmarks" / "gpu" / "check.json").read_text())["markdown"] == table
    assert table in capsys.readouterr().out


def test_report_says_what_did_not_run(tmp_path):
    md = gpu_check.report(tmp_path / "nothing", tmp_path / "docs")
    assert md.count("not run (no cuda-tests.xml)") == 1 + len(gpu_check.TEST_ROWS)
    assert "not run (no summary.json)" in md and md.count("not run (no benchmarks/gpu/results.json)") == 8


@pytest.mark.parametrize("entry", ["gpu_check", "run", "latency"])
def test_entry_points_parse_their_arguments(entry, capsys):
    """The script's Python entry points answer --help without a GPU (the GPU itself is checked when they run; the
    main job's --help is checked with the job)."""
    from examples.benchmarks import latency, run

    main = {"gpu_check": gpu_check.main, "run": run.main, "latency": latency.main}[entry]
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out
