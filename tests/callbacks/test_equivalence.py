"""Exactness: a Lightning fit equals a hand loop that truncates once per optimizer step; resume equals no stop."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_worm import EarlyBirdCallback, WormCallback
from lightning_worm.core import ChiSchedule, GradientTruncation, TicketDetector, add_sparsity_gradient, unit_mask
from tests.helpers import tiny_loader, trainer
from tests.models import TinyNet

EPOCHS, WINDOW, CHI = 3, 2, 0.5  # chi = 0.5 so that truncating per micro-batch (chi^k) would show


def lightning_fit(accumulate=1, clip=None, sparsity=0.0, scaler=False):
    torch.manual_seed(0)
    model = TinyNet()
    eb = EarlyBirdCallback(window=WINDOW, threshold=0.0, sparsity=sparsity)
    worm = WormCallback(eb, schedule="fixed", chi=CHI)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))] \
        if scaler else None
    t = trainer(callbacks=[eb, worm], max_epochs=EPOCHS, accumulate_grad_batches=accumulate,
                gradient_clip_val=clip, plugins=plugins)
    t.fit(model, tiny_loader())
    return model, eb


def hand_loop(accumulate=1, clip=None, sparsity=0.0, scaler=False, per_micro_batch=False):
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gammas = [model.features[1].weight, model.features[4].weight]
    detector, schedule, truncation = TicketDetector(WINDOW, 0.0), ChiSchedule("fixed", CHI), GradientTruncation(model)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    batches = list(tiny_loader())
    for _ in range(EPOCHS):
        for i, (x, y) in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.float16, enabled=scaler):
                loss = nn.functional.cross_entropy(model(x), y) / accumulate
            (grad_scaler.scale(loss) if scaler else loss).backward()
            if per_micro_batch:
                truncation.apply()
            if (i + 1) % accumulate == 0 or i == len(batches) - 1:
                if not per_micro_batch:
                    truncation.apply()
                if scaler:
                    grad_scaler.unscale_(optimizer)
                add_sparsity_gradient(gammas, sparsity)
                if clip:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                if scaler:
                    grad_scaler.step(optimizer)
                    grad_scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        _, mean = detector.update(unit_mask(model, 0.5))
        truncation.set(detector.mask, schedule.update(mean))
    return model, detector


def assert_same_weights(a, b):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs", [
    {"accumulate": 4},
    {"accumulate": 3},  # 8 batches: the last step of each epoch holds 2 micro-batches
    {"clip": 0.05},
    {"accumulate": 2, "clip": 0.05, "sparsity": 1e-3},
], ids=["accumulate4", "accumulate3-ragged", "clip", "accumulate-clip-sparsity"])
def test_fit_equals_hand_loop(kwargs):
    model, eb = lightning_fit(**kwargs)
    reference, detector = hand_loop(**kwargs)
    assert_same_weights(model, reference)
    assert eb.distances[1:] == pytest.approx(detector.distances[1:])


def test_truncating_every_micro_batch_would_differ():
    """The control: the test above can tell chi*(g1+..+g4) from chi^4*g1 + .. + chi*g4."""
    model, _ = lightning_fit(accumulate=4)
    wrong, _ = hand_loop(accumulate=4, per_micro_batch=True)
    bn = "features.1.weight"
    assert not torch.allclose(model.state_dict()[bn], wrong.state_dict()[bn], atol=1e-6)


def test_loss_scaling_truncation_and_unscaled_sparsity():
    """A real GradScaler (scale 1024): truncation is scale-free; sparsity lands on the unscaled gradient."""
    model, _ = lightning_fit(accumulate=2, sparsity=1e-2, scaler=True)
    reference, _ = hand_loop(accumulate=2, sparsity=1e-2, scaler=True)
    assert_same_weights(model, reference)
    unscaled_wrong, _ = hand_loop(accumulate=2, sparsity=1e-2 * 2.0**10, scaler=True)
    assert not torch.allclose(model.features[1].weight, unscaled_wrong.features[1].weight, atol=1e-4)


def resumable_fit(tmp_path, max_epochs, ckpt_path=None, validate=True):
    torch.manual_seed(0)
    model = TinyNet()
    eb = EarlyBirdCallback(window=3, threshold=0.0, sparsity=1e-4)
    worm = WormCallback(eb, schedule="elbow", elbow=0.2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    t = trainer(tmp_path, callbacks=[eb, worm, checkpoint], max_epochs=max_epochs, enable_checkpointing=True)
    t.fit(model, tiny_loader(), tiny_loader(n=16, seed=1) if validate else None, ckpt_path=ckpt_path)
    return model, eb, worm, t


@pytest.mark.parametrize("validate", [True, False], ids=["checkpoint-at-validation-end", "at-train-epoch-end"])
def test_resume_continues_the_same_histories(tmp_path, validate):
    k = 3
    full, eb_full, worm_full, _ = resumable_fit(tmp_path / "full", 2 * k, validate=validate)
    resumable_fit(tmp_path / "half", k, validate=validate)
    resumed, eb_res, worm_res, _ = resumable_fit(tmp_path / "resumed", 2 * k, ckpt_path=tmp_path / "half" / "last.ckpt",
                                                 validate=validate)
    assert len(eb_res.distances) == 2 * k
    assert [d if not math.isnan(d) else None for d in eb_res.distances] == \
        [d if not math.isnan(d) else None for d in eb_full.distances]
    assert eb_res.mean_distances[k - 1:] == pytest.approx(eb_full.mean_distances[k - 1:])
    assert eb_res.ticket_epoch == eb_full.ticket_epoch
    assert worm_res.chi == worm_full.chi and worm_res.schedule.switched == worm_full.schedule.switched
    assert_same_weights(resumed, full)


def test_save_checkpoint_after_fit_and_resume(tmp_path):
    """The histories, window, ticket and chi survive `trainer.save_checkpoint` exactly."""
    _, eb, worm, t = resumable_fit(tmp_path, 4, validate=False)
    t.save_checkpoint(tmp_path / "end.ckpt")
    state = torch.load(tmp_path / "end.ckpt", weights_only=False)["callbacks"]
    fresh_eb = EarlyBirdCallback(window=3, threshold=0.0, sparsity=1e-4)
    fresh_worm = WormCallback(fresh_eb, schedule="elbow", elbow=0.2)
    fresh_eb.load_state_dict(state[fresh_eb.state_key])
    fresh_worm.load_state_dict(state[fresh_worm.state_key])
    assert fresh_eb.distances[3:] == eb.distances[3:] and fresh_eb.ticket_epoch == eb.ticket_epoch
    assert [m.tolist() for m in fresh_eb.detector._masks] == [m.tolist() for m in eb.detector._masks]
    assert fresh_worm.schedule.value == worm.schedule.value
