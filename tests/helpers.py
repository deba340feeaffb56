"""Tiny deterministic models and data shared by the tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from tests.models import TinyNet

#: The repository root (subprocesses run with it on PYTHONPATH).
ROOT = Path(__file__).resolve().parents[1]


def tiny_data(n: int = 64, seed: int = 0, classes: int = 4) -> TensorDataset:
    """Images whose label is the brightest of four quadrants: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    quadrants = torch.stack([x[:, :, :4, :4], x[:, :, :4, 4:], x[:, :, 4:, :4], x[:, :, 4:, 4:]], 1)
    y = quadrants.mean(dim=(2, 3, 4)).argmax(1) % classes
    return TensorDataset(x, y)


def tiny_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    return DataLoader(tiny_data(n, seed), batch_size=batch_size, shuffle=False)


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Two computations of one function (other matrix shapes, other kernels) agree within their dtype's rounding.

    ``torch.testing.assert_close``'s tolerances for the dtype, never bit equality: how such computations round
    depends on the CPU's kernels (Intel and AMD machines differ). Bit equality is for one computation run twice.
    """
    torch.testing.assert_close(actual, expected)


def trainer(tmp_path=None, **kwargs) -> L.Trainer:
    """A quiet CPU trainer."""
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh models have every gamma at 1.0; give them distinct ones (and small betas)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in batchnorms(model).values():
        bn.weight.data.uniform_(0.01, 1.0, generator=generator)
        bn.bias.data.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def global_ticket(model: nn.Module, ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """Prune the ``ratio`` lowest |gamma| over all BatchNorm layers."""
    layers = batchnorms(model)
    gammas = torch.cat([bn.weight.detach().abs() for bn in layers.values()])
    threshold = gammas.kthvalue(int(ratio * gammas.numel())).values
    return {name: bn.weight.detach().abs() > threshold for name, bn in layers.items()}


def silence_removed_channels(dense: nn.Module, report) -> nn.Module:
    """Zero gamma and beta of the BatchNorm channels the surgery removed: they then output exactly 0."""
    for name, bn in batchnorms(dense).items():
        kept = report.kept_indices.get(f"{name}.weight")
        if kept is not None:
            removed = torch.ones(bn.num_features, dtype=torch.bool)
            removed[kept[0]] = False
            bn.weight.data[removed] = 0.0
            bn.bias.data[removed] = 0.0
    return dense


def fit_tiny(callbacks, tmp_path=None, model=None, **trainer_kwargs):
    """Fit ``model`` (a seeded ``TinyNet`` by default) on the tiny data with ``callbacks``; the trainer and model."""
    torch.manual_seed(0)
    model = model or TinyNet()
    t = trainer(tmp_path, callbacks=callbacks, **trainer_kwargs)
    t.fit(model, tiny_loader())
    return t, model
