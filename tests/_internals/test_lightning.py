"""Every private API of Lightning that lightning-worm uses, pinned against the installed release.

A failure here names the internal that changed; see lightning_worm/_internals/lightning.py.
"""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_worm._internals import lightning as internals
from lightning_worm.callbacks.early_bird import _completes_accumulation as completes_accumulation
from tests.helpers import tiny_loader, trainer
from tests.models import TinyNet


def test_configure_ddp_and_model_assignment_exist():
    assert callable(getattr(DDPStrategy, "configure_ddp", None)), "DDPStrategy.configure_ddp() is gone"
    assert isinstance(getattr(DDPStrategy, "model", None), property) and DDPStrategy.model.fset is not None, (
        "DDPStrategy.model can no longer be assigned"
    )


@pytest.mark.parametrize(("strategy", "method"), [("ddp_spawn", "spawn"), ("ddp_fork", "fork"),
                                                  ("ddp_notebook", "fork"), ("ddp", None), ("auto", None)])
def test_launcher_start_method(strategy, method):
    t = L.Trainer(accelerator="cpu", devices=2 if strategy != "auto" else 1, strategy=strategy, logger=False)
    assert internals.launcher_start_method(t) == method, "the launcher's `_start_method` changed"


def test_checkpoint_hooks_run_before_the_users_and_install_once():
    module, seen = TinyNet(), []
    module.on_load_checkpoint = lambda checkpoint: seen.append("user")
    hooks = internals.checkpoint_hooks(module)
    assert internals.checkpoint_hooks(module) is hooks
    hooks.on_load["a"] = lambda checkpoint: seen.append("ours")
    hooks.on_save["a"] = lambda checkpoint: checkpoint.setdefault("ours", 1)
    module.on_load_checkpoint({})
    saved = {}
    module.on_save_checkpoint(saved)
    assert seen == ["ours", "user"] and saved == {"ours": 1}


def test_module_hooks_see_weights_only_checkpoints(tmp_path):
    """Lightning calls the module's on_save_checkpoint for save_weights_only checkpoints too."""
    module = TinyNet()
    internals.checkpoint_hooks(module).on_save["probe"] = lambda checkpoint: checkpoint.setdefault("probe", 1)
    t = trainer(tmp_path, max_epochs=1)
    t.fit(module, tiny_loader())
    t.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    checkpoint = torch.load(tmp_path / "w.ckpt", weights_only=False)
    assert checkpoint["probe"] == 1 and "callbacks" not in checkpoint


class RecordAccumulation(Callback):
    """Compares the public rule with Lightning's own private decision at every backward."""

    def __init__(self):
        self.batch_idx, self.pairs = 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_idx = batch_idx

    def on_after_backward(self, trainer, pl_module):
        private = not trainer.fit_loop.epoch_loop._should_accumulate()
        self.pairs.append((completes_accumulation(trainer, self.batch_idx), private))


@pytest.mark.parametrize(("accumulate", "batches"), [(1, 8), (4, 8), (3, 8), (5, 3), (2, 7)])
def test_public_accumulation_rule_matches_lightnings(accumulate, batches):
    probe = RecordAccumulation()
    t = trainer(max_epochs=2, accumulate_grad_batches=accumulate, limit_train_batches=batches, callbacks=[probe])
    t.fit(TinyNet(), tiny_loader())
    public, private = zip(*probe.pairs, strict=True)
    assert public == private and len(public) == 2 * batches


def test_optimizers_to_device_keeps_step_where_it_is():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(2)
    opt.step()
    internals.optimizers_to_device([opt], torch.device("cpu"))
    assert opt.state[p]["exp_avg"].device.type == "cpu" and opt.state[p]["step"].device.type == "cpu"
