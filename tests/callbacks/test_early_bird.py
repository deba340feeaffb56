"""EarlyBirdCallback in real Lightning fits on the CPU."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_worm import EarlyBirdCallback, mask_distance, unit_mask
from tests.helpers import fit_tiny, trainer
from tests.models import TinyNet


class TestEarlyBird:
    def test_distances_window_and_ticket(self):
        eb = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=1.0)
        t, model = fit_tiny([eb], max_epochs=4)
        assert len(eb.distances) == len(eb.mean_distances) == 4
        assert all(math.isnan(d) for d in eb.distances[:2]) and not math.isnan(eb.distances[2])
        assert eb.ticket_epoch == 2  # threshold 1.0: the first full window
        # the histories agree with masks recomputed from the stored per-epoch masks
        masks = [{"m": h} for h in eb.detector.history]
        for epoch in (2, 3):
            each = [mask_distance(masks[epoch], masks[j]) for j in range(epoch - 2, epoch)]
            assert eb.distances[epoch] == pytest.approx(max(each))
            assert eb.mean_distances[epoch] == pytest.approx(sum(each) / 2)
        # the latest mask is the model's mask at the end of the fit
        assert {k: v.tolist() for k, v in eb.mask.items()} == \
            {k: v.tolist() for k, v in unit_mask(model, 0.5).items()}
        assert list(eb.mask) == ["features.1", "features.4"]
        assert t.callback_metrics["earlybird/ticket_found"] == 1.0
        assert t.callback_metrics["earlybird/mask_distance"] == pytest.approx(eb.distances[-1])

    def test_ticket_frozen_and_message(self, lightning_info):
        eb = EarlyBirdCallback(window=2, threshold=1.0)
        fit_tiny([eb], max_epochs=4)
        caplog = lightning_info
        assert eb.ticket_epoch == 1
        assert {k: v.tolist() for k, v in eb.ticket.items()} == \
            {k: v.tolist() for k, v in zip(["features.1", "features.4"],
                                           eb.detector.history[1].split([8, 16]), strict=True)}
        assert "Early-Bird ticket emerged at epoch 1" in caplog.text
        kept = int(eb.ticket["features.1"].sum())
        assert f"features.1: {kept}/8" in caplog.text and caplog.text.count("ticket emerged") == 1

    def test_stop_on_ticket(self):
        eb = EarlyBirdCallback(window=2, threshold=1.0, stop_on_ticket=True)
        t, _ = fit_tiny([eb], max_epochs=10)
        assert eb.ticket_epoch == 1 and t.current_epoch == 2 and len(eb.distances) == 2

    def test_no_ticket_with_threshold_zero_keeps_searching(self):
        eb = EarlyBirdCallback(window=2, threshold=0.0, prune_ratio=0.5)
        fit_tiny([eb], max_epochs=3, model=TinyNet(lr=2.0))
        assert eb.ticket is None or eb.distances[eb.ticket_epoch] == 0.0

    def test_every_n_epochs(self):
        eb = EarlyBirdCallback(window=2, threshold=1.0, every_n_epochs=2)
        fit_tiny([eb], max_epochs=5)
        assert len(eb.distances) == 5
        assert [math.isnan(d) for d in eb.distances] == [True, True, True, False, True]
        assert eb.detector.history_epochs == [1, 3] and eb.ticket_epoch == 3

    def test_sparsity_adds_l1_once_per_step(self):
        """With lr=0 nothing moves, so one step's gamma change is exactly lr * (grad + s*sign)."""

        class Capture(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.grad = pl_module.features[1].weight.grad.clone()
                self.sign = pl_module.features[1].weight.detach().sign()

        runs = {}
        for s in (0.0, 0.5):
            cap = Capture()
            fit_tiny([EarlyBirdCallback(sparsity=s), cap], max_steps=1, accumulate_grad_batches=3)
            runs[s] = cap
        # EarlyBirdCallback is listed first, so Capture sees the gradient after the term was added
        torch.testing.assert_close(runs[0.5].grad, runs[0.0].grad + 0.5 * runs[0.0].sign)

    def test_non_finite_gamma_skips_epoch_with_warning(self):
        class Poison(Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 1:
                    self.saved = pl_module.features[4].weight.data[3].item()
                    pl_module.features[4].weight.data[3] = float("nan")

        class Heal(Callback):
            def __init__(self, poison):
                self.poison = poison

            def on_train_epoch_end(self, trainer, pl_module):
                if trainer.current_epoch == 1:
                    pl_module.features[4].weight.data[3] = self.poison.saved

        poison = Poison()
        eb = EarlyBirdCallback(window=2, threshold=1.0)
        with pytest.warns(UserWarning, match=r"epoch 1 skipped.*features\.4"):
            fit_tiny([poison, eb, Heal(poison)], max_epochs=3)
        assert math.isnan(eb.distances[1]) and eb.detector.history_epochs == [0, 2]
        assert eb.ticket_epoch == 2

    def test_several_ratios_keep_distinct_state_and_logs(self, tmp_path):
        trackers = [EarlyBirdCallback(prune_ratio=p, window=2, threshold=1.0) for p in (0.3, 0.5, 0.7)]
        t, _ = fit_tiny(trackers, max_epochs=3)
        assert len({eb.state_key for eb in trackers}) == 3
        for eb in trackers:
            assert f"earlybird_{eb.prune_ratio:g}/mask_distance" in t.callback_metrics
            kept = sum(int(m.sum()) for m in eb.mask.values())
            assert kept == 24 - round(eb.prune_ratio * 24)
        path = tmp_path / "three.ckpt"
        t.save_checkpoint(path)
        states = torch.load(path, weights_only=False)["callbacks"]
        assert {k for k in states if k.startswith("EarlyBirdCallback")} == {eb.state_key for eb in trackers}

    def test_same_settings_twice_refused_by_lightning(self):
        with pytest.raises(RuntimeError, match="state_key` must be unique"):
            fit_tiny([EarlyBirdCallback(), EarlyBirdCallback()], max_epochs=1)

    def test_model_without_bn_raises_at_setup(self):
        class NoBN(TinyNet):
            def __init__(self):
                super().__init__()
                self.features[1] = nn.Identity()
                self.features[4] = nn.BatchNorm2d(16, affine=False)

        match = r"found no channel \(or unit\) to track in NoBN.*features\.4 \(not affine\)"
        with pytest.raises(ValueError, match=match):
            fit_tiny([EarlyBirdCallback()], model=NoBN(), max_epochs=1)

    def test_frozen_bn_left_out_and_said_once(self, lightning_info):
        model = TinyNet()
        model.features[1].weight.requires_grad_(False)
        eb = EarlyBirdCallback(window=2, threshold=1.0)
        fit_tiny([eb], model=model, max_epochs=2)
        caplog = lightning_info
        assert list(eb.mask) == ["features.4"]
        assert caplog.text.count("left out: features.1 (weight frozen") == 1

    @pytest.mark.parametrize("kwargs,name", [
        ({"prune_ratio": 0.0}, "prune_ratio"), ({"prune_ratio": 1.0}, "prune_ratio"), ({"window": 1}, "window"),
        ({"threshold": 1.1}, "threshold"), ({"sparsity": -1e-4}, "sparsity"), ({"min_units": 0}, "min_units"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
    ])
    def test_bad_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            EarlyBirdCallback(**kwargs)

    def test_sharded_strategy_refused(self):
        from lightning.pytorch.strategies import FSDPStrategy

        t = trainer(callbacks=[EarlyBirdCallback()], max_epochs=1)
        t.strategy.__class__ = type("FakeFSDP", (FSDPStrategy,), {})  # only the type is checked
        from lightning_worm.callbacks._strategy import check_strategy

        with pytest.raises(ValueError, match="does not support the FakeFSDP.*use FSDP2.*ModelParallelStrategy"):
            check_strategy(t, "EarlyBirdCallback")

    def test_tensor_parallelism_refused_fsdp2_accepted(self):
        from lightning.pytorch.strategies import ModelParallelStrategy

        from lightning_worm.callbacks._strategy import check_strategy

        class Mesh(dict):
            def __init__(self, tp):
                super().__init__(tensor_parallel=type("Dim", (), {"size": lambda self: tp})())

        t = trainer(callbacks=[EarlyBirdCallback()], max_epochs=1)
        t.strategy.__class__ = ModelParallelStrategy  # only the type and the mesh are read
        t.strategy._device_mesh = Mesh(2)
        with pytest.raises(ValueError, match="tensor_parallel_size=2.*tensor_parallel_size=1"):
            check_strategy(t, "EarlyBirdCallback")
        t.strategy._device_mesh = Mesh(1)
        check_strategy(t, "EarlyBirdCallback")  # FSDP2
