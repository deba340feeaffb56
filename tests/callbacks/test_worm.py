"""WormCallback in real Lightning fits on the CPU."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_worm import EarlyBirdCallback, WormCallback
from tests.helpers import fit_tiny


class TestWorm:
    def test_elbow_schedule_follows_mean_distance(self):
        eb = EarlyBirdCallback(window=2, threshold=0.0)
        worm = WormCallback(eb, schedule="elbow", chi=0.003, elbow=0.5)
        chis = []

        class Record(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                chis.append(worm.chi)

        fit_tiny([Record(), worm, eb], max_epochs=4)  # order in the list does not matter
        expected, switched = [1.0], False
        for mean in eb.mean_distances[:-1]:
            switched = switched or mean < 0.5
            expected.append(0.003 if switched else 1.0)
        assert chis == expected
        assert worm.truncated_units == (12 if worm.chi < 1 else 0)

    def test_fixed_truncates_from_first_mask_and_logs(self):
        eb = EarlyBirdCallback(window=3)
        worm = WormCallback(eb, schedule="fixed", chi=0.1)
        t, _ = fit_tiny([eb, worm], max_epochs=2)
        assert worm.chi == 0.1 and worm.truncated_units == 12
        assert t.callback_metrics["worm/chi"] == pytest.approx(0.1)
        assert t.callback_metrics["worm/truncated_units"] == 12

    def test_greedy_is_mean_distance(self):
        eb = EarlyBirdCallback(window=2)
        worm = WormCallback(eb, schedule="greedy")
        fit_tiny([eb, worm], max_epochs=3)
        assert worm.chi == pytest.approx(min(max(eb.mean_distances[-1], 0.0), 1.0))

    def test_without_early_bird_in_trainer_raises(self):
        worm = WormCallback(EarlyBirdCallback())
        with pytest.raises(ValueError, match="follows an EarlyBirdCallback that is not in this Trainer"):
            fit_tiny([worm], max_epochs=1)

    def test_not_an_early_bird_raises(self):
        with pytest.raises(ValueError, match="must be an EarlyBirdCallback"):
            WormCallback(object())

    @pytest.mark.parametrize("kwargs,name", [({"schedule": "linear"}, "schedule"), ({"chi": 1.5}, "chi"),
                                             ({"elbow": -0.1}, "elbow")])
    def test_bad_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=f"`{name}`"):
            WormCallback(EarlyBirdCallback(), **kwargs)

    def test_bf16_mixed_on_cpu(self):
        eb = EarlyBirdCallback(window=2, threshold=1.0, sparsity=1e-4)
        worm = WormCallback(eb, schedule="fixed", chi=0.003)
        t, model = fit_tiny([eb, worm], max_epochs=3, precision="bf16-mixed")
        assert eb.ticket_epoch == 1 and worm.chi == 0.003
        assert all(math.isfinite(d) for d in eb.distances[1:])

    def test_true_bf16_parameters(self):
        eb = EarlyBirdCallback(window=2, threshold=1.0)
        worm = WormCallback(eb, schedule="fixed", chi=0.5)
        t, model = fit_tiny([eb, worm], max_epochs=2, precision="bf16-true")
        assert model.features[1].weight.dtype == torch.bfloat16 and eb.ticket_epoch == 1
        assert all(f.dtype == torch.bfloat16 for f in worm._truncation._factors)
