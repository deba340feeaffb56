"""Real 2-process CPU DDP with a transformer source: same masks, decisions and pruned shapes on every rank."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT


def run(out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # In the test's folder, not the checkout: whatever the ranks write lands there (imports go by PYTHONPATH).
    proc = subprocess.run([sys.executable, "-m", "tests.ddp.fit_transformer", str(out), *args], cwd=out, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def same(a, b):
    return [None if math.isnan(x) else x for x in a] == [None if math.isnan(x) else x for x in b]


@pytest.mark.slow
def test_two_process_head_search_agrees(tmp_path):
    r0, r1 = run(tmp_path)
    assert r0["world_size"] == 2 and r0["ticket_epoch"] == r1["ticket_epoch"] == 1
    assert r0["cwd"] == r1["cwd"] == str(tmp_path)  # both ranks ran in the test's folder
    assert same(r0["distances"], r1["distances"])
    assert {k: v.tolist() for k, v in r0["mask"].items()} == {k: v.tolist() for k, v in r1["mask"].items()}
    assert list(r0["mask"]) == ["model.blocks.0.attn", "model.blocks.1.attn"]
    assert r0["chi"] == r1["chi"] == 0.01
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name


@pytest.mark.slow
def test_two_process_head_prune_agrees(tmp_path):
    r0, r1 = run(tmp_path, "prune")
    assert r0["pruned_epoch"] == r1["pruned_epoch"] == 1
    kept = [int(m.sum()) for m in r0["ticket"].values()]
    assert r0["heads"] == r1["heads"] == kept
    for name, value in r0["state"].items():
        assert value.shape == r1["state"][name].shape and torch.equal(value, r1["state"][name]), name
    assert r0["optimizer_params"] == [tuple(v.shape) for v in r0["state"].values()]


@pytest.mark.slow
def test_two_process_search_and_prune_over_several_sources_agree(tmp_path):
    r0, r1 = run(tmp_path, "prune", "sources")
    assert r0["pruned_epoch"] == r1["pruned_epoch"] == 1
    assert list(r0["ticket"]) == ["net.stem.1", "net.blocks.0.attn", "net.blocks.1.attn"]
    assert {k: v.tolist() for k, v in r0["ticket"].items()} == {k: v.tolist() for k, v in r1["ticket"].items()}
    assert r0["heads"] == r1["heads"] == [2, 2]
    assert r0["state"]["net.stem.1.weight"].shape == (6,)
    for name, value in r0["state"].items():  # BatchNorm running statistics are each rank's own (no SyncBatchNorm)
        assert value.shape == r1["state"][name].shape, name
        assert "running" in name or "num_batches" in name or torch.equal(value, r1["state"][name]), name
    assert r0["optimizer_params"] == r1["optimizer_params"] and (6,) in r0["optimizer_params"]
