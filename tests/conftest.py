import logging
import os

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed_quiet_and_isolated(tmp_path, monkeypatch):
    """Seeded, quiet, and in a fresh working directory: nothing a test writes lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    yield


@pytest.fixture
def lightning_info(caplog, monkeypatch):
    """Capture Lightning's INFO messages (its logger does not propagate to the root by default)."""
    logger = logging.getLogger("lightning.pytorch")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        yield caplog


@pytest.fixture
def one_thread():
    """Tiny models: one thread avoids OpenMP oversubscription when jobs share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (``cuda(devices=N)``: N devices) skip, with the reason, where torch sees too few."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is None:
            continue
        needed = marker.kwargs.get("devices", 1)
        if devices == 0:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False"))
        elif devices < needed:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA devices, torch sees {devices}"))


@pytest.fixture(scope="module")
def one_rank_mesh():
    """A gloo process group of one rank and its 1-D CPU device mesh: FSDP2 and DTensor in this process."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
