"""Real 2-process DDP on the CPU (gloo): every rank reaches the same decisions in the same epoch."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT


def run_ddp(module: str, out: Path, timeout: int = 300) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, str(out)], cwd=out, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_two_process_ddp_search_agrees(tmp_path):
    r0, r1 = run_ddp("tests.ddp.fit_search", tmp_path)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["ticket_epoch"] is not None and r0["ticket_epoch"] == r1["ticket_epoch"]
    assert r0["epoch"] == r1["epoch"] == r0["ticket_epoch"] + 1  # stop_on_ticket stopped both ranks together
    assert [None if math.isnan(d) else d for d in r0["distances"]] == \
        [None if math.isnan(d) else d for d in r1["distances"]]
    for key in ("ticket", "mask"):
        assert {k: v.tolist() for k, v in r0[key].items()} == {k: v.tolist() for k, v in r1[key].items()}
    assert r0["chi"] == r1["chi"] == 0.003
    assert r0["metrics"] == r1["metrics"] and "earlybird/mask_distance" in r0["metrics"]
    for name, value in r0["state"].items():
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank without SyncBN
            assert torch.equal(value, r1["state"][name]), name


@pytest.mark.slow
def test_two_process_ddp_prunes_mid_fit_and_trains_on(tmp_path):
    r0, r1 = run_ddp("tests.ddp.fit_prune", tmp_path)
    pruned = r0["pruned_epoch"]
    assert r0["ticket_epoch"] == r1["ticket_epoch"] == 1  # window 2, threshold 1
    assert pruned == r1["pruned_epoch"] and 1 <= pruned <= 1 + 3  # waited for readiness, at most max_wait
    assert r0["push"] == r1["push"]  # the strength and the pull, decided alike on every rank
    assert r0["steps_at_epoch_end"] == r1["steps_at_epoch_end"]
    steps = r0["steps_at_epoch_end"]
    assert len(steps) == pruned + 3 and steps[-1] - steps[pruned] == 2 * steps[0] > 0  # two epochs after the prune
    for key in ("units_after", "ready", "forced", "waited_epochs", "score_share"):
        assert r0["report"][key] == r1["report"][key], key
    assert r0["report"]["params_after"] < r0["report"]["params_before"]
    for name, value in r0["state"].items():
        other = r1["state"][name]
        assert value.shape == other.shape, name
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank without SyncBN
            assert torch.equal(value, other), name
    # DDP and the optimizer hold the pruned parameters, not the old ones
    shapes = [tuple(v.shape) for k, v in r0["state"].items() if "running" not in k and "num_batches" not in k]
    assert r0["wrapped_params"] == r0["optimizer_params"] == shapes
