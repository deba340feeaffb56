"""Two nodes on one machine: 2 nodes x 1 process, every rank started by hand as a cluster launcher starts it, search,
truncate and prune as 1 node x 2 processes do, and rank 0's checkpoint reloads pruned."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_worm import load_pruned
from tests.ddp.fit_prune import STRATEGIES
from tests.helpers import ROOT
from tests.models import TinyNet

#: Variables by which Lightning would detect another cluster (SLURM, torchelastic, Kubeflow, LSF), and the seed of
#: the test process: its environment must not leak into the ranks, which LightningEnvironment must drive.
FOREIGN = ("RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "KUBERNETES_PORT", "LSB_JOBID",
           "JSM_NAMESPACE_RANK", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: Lightning's children too, if any
            except ProcessLookupError:
                pass
        proc.wait()


def launch(out: Path, strategy: str, nodes: int, devices: int, timeout: float = 300) -> list[dict]:
    """Start ``nodes * devices`` ranks of ``tests.ddp.fit_prune`` as a cluster launcher would (``LOCAL_RANK``
    set: Lightning starts no process itself), wait for all with one deadline, and return each rank's results.

    A rank that fails or a deadline passed kills every rank and fails with each rank's stderr."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in FOREIGN}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(nodes * devices))
    command = [sys.executable, "-m", "tests.ddp.fit_prune", str(out), "--nodes", str(nodes), "--devices",
               str(devices), "--strategy", strategy]
    procs, logs, failure = [], [], None
    try:
        for node in range(nodes):
            for local in range(devices):
                log = out / f"rank{node * devices + local}.log"
                with open(log, "w") as f:
                    procs.append(subprocess.Popen(
                        command, cwd=out, env={**env, "NODE_RANK": str(node), "LOCAL_RANK": str(local)},
                        stdout=subprocess.DEVNULL, stderr=f, start_new_session=True,
                    ))
                logs.append(log)
        deadline = time.monotonic() + timeout
        while failure is None and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                failure = "a rank failed"
            elif time.monotonic() > deadline:
                failure = f"timed out after {timeout:.0f} s"
            else:
                time.sleep(0.2)
        if failure is None and any(p.returncode != 0 for p in procs):
            failure = "a rank failed"
    finally:
        _kill(procs)
    if failure is not None:
        stderr = "\n".join(f"--- rank {rank} (exit {p.returncode}) stderr:\n{log.read_text()[-4000:]}"
                           for rank, (p, log) in enumerate(zip(procs, logs, strict=True)))
        pytest.fail(f"{nodes} node(s) x {devices} process(es), {strategy}: {failure}\n{stderr}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nodes * devices)]


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in state.items()}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_nodes_prune_as_one_node_of_two_processes(tmp_path, strategy):
    nodes = launch(tmp_path / "nodes", strategy, nodes=2, devices=1)
    local = launch(tmp_path / "local", strategy, nodes=1, devices=2)
    assert [(r["world_size"], r["node_rank"], r["local_rank"]) for r in nodes] == [(2, 0, 0), (2, 1, 0)]
    assert [(r["world_size"], r["node_rank"], r["local_rank"]) for r in local] == [(2, 0, 0), (2, 0, 1)]

    reference = local[0]
    assert reference["pruned_epoch"] is not None
    assert reference["report"]["params_after"] < reference["report"]["params_before"]
    for rank in (*nodes, *local):  # every rank of both topologies decided alike
        assert rank["ticket_epoch"] == reference["ticket_epoch"]
        assert rank["pruned_epoch"] == reference["pruned_epoch"]
        assert rank["steps_at_epoch_end"] == reference["steps_at_epoch_end"]
        assert rank["report"]["units_after"] == reference["report"]["units_after"]
        assert shapes(rank["state"]) == shapes(reference["state"])
        assert rank["wrapped_params"] == rank["optimizer_params"] == reference["optimizer_params"]

    # Rank 0 (node 0) writes the report, the logs and the checkpoint; node 1's disk gets nothing.
    node0, node1 = tmp_path / "nodes" / "node0", tmp_path / "nodes" / "node1"
    assert nodes[0]["report_path"] == str(node0 / "lightning_logs" / "version_0" / "pruning_report.json")
    assert Path(nodes[0]["report_path"]).is_file() and nodes[1]["report_path"] is None
    assert not node1.exists() or not [p for p in node1.rglob("*") if p.is_file()]

    # The 2-node checkpoint reloads pruned, with rank 0's weights (BatchNorm statistics included).
    model = load_pruned(TinyNet, node0 / "final.ckpt")
    assert shapes(model.state_dict()) == shapes(nodes[0]["state"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, nodes[0]["state"][name]), name
