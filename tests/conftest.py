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
