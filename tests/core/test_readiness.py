"""The score share of a mask's pruned units, the growing push and the push on pruned units (pure PyTorch)."""

import pytest
import torch
from torch import nn

from lightning_worm.core import unit_mask, unit_scores
from lightning_worm.core.readiness import NOISE_RATIO, ScoreShare, score_share
from lightning_worm.core.regularization import GrowingDecay, MaskedDecay, RelativeSparsity


def test_score_share_counts_the_pruned_mass_and_a_random_mask_of_the_same_widths():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([2.0, 2.0, 0.0, 2.0])}
    mask = {"a": torch.tensor([False, True]), "b": torch.tensor([True, True, False, False])}
    share = score_share(scores, mask)
    # pruned: 1 (a) + 0 + 2 (b) of 10; a random mask prunes 1/2 of a's 4 and 2/4 of b's 6
    assert share.pruned == pytest.approx(0.3) and share.random == pytest.approx(0.5)
    assert share.ratio == pytest.approx(0.6) and not share.looks_like_noise
    assert share.to_dict() == {"pruned": share.pruned, "random": share.random, "ratio": share.ratio}


def test_a_mask_of_the_largest_scores_looks_like_noise_and_nothing_pruned_is_ratio_zero():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    worst = score_share(scores, {"a": torch.tensor([True, True, False, False])})
    assert worst.ratio > NOISE_RATIO and worst.looks_like_noise
    assert score_share(scores, {"a": torch.ones(4, dtype=torch.bool)}) == ScoreShare(0.0, 0.0)
    assert score_share({"a": torch.zeros(3)}, {"a": torch.tensor([True, False, True])}).ratio == 0.0


@pytest.mark.parametrize(("scores", "mask", "match"), [
    ({"a": torch.tensor([1.0, -1.0])}, {"a": torch.tensor([True, False])}, "non-negative"),
    ({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.tensor([True, False])}, "finite"),
    ({"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([True, False, True])}, "shape"),
])
def test_score_share_refuses_what_it_cannot_share_out(scores, mask, match):
    with pytest.raises(ValueError, match=match):
        score_share(scores, mask)


def test_relative_sparsity_is_measured_from_the_first_epochs_gradients_then_steered():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    relative = RelativeSparsity(ratio=2.0, rate=0.1, step=2.0, max_ratio=8.0, hold_below=0.1, min_ratio=0.5)
    for grads in ([1.0, -1.0], [2.0, 0.0, -4.0]), ([3.0, 3.0], [0.0, 0.0, 0.0]):
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        relative.observe(params)
    assert relative.strength == 0.0 and not relative.measured  # the first epoch only measures
    relative.end_epoch(share_ratio=0.95)
    # step means: (1+1+2+0+4)/5 = 1.6 and (3+3)/5 = 1.2: the measure is 1.4, the strength 2x it
    assert relative.measure == pytest.approx(1.4) and relative.strength == pytest.approx(2.8)
    params[0].grad = torch.tensor([100.0, 100.0])
    relative.observe(params)  # measured once: later gradients do not feed back
    relative.end_epoch(share_ratio=0.93)  # fell by 0.02 < rate / 2: stronger
    assert relative.measure == pytest.approx(1.4) and relative.strength == pytest.approx(5.6)
    relative.end_epoch(share_ratio=0.5)  # fell by 0.43 > 2 * rate: weaker
    assert relative.strength == pytest.approx(2.8)
    relative.end_epoch(share_ratio=0.35)  # fell by 0.15: held
    assert relative.strength == pytest.approx(2.8)
    for ratio in (0.3, 0.28, 0.27, 0.26):
        relative.end_epoch(share_ratio=ratio)
    assert relative.strength == pytest.approx(8 * 1.4)  # at most max_ratio x the measure
    relative.end_epoch(share_ratio=0.05, settled=True)  # polarised, masks settled: held
    assert relative.strength == pytest.approx(8 * 1.4)
    for _ in range(6):
        relative.end_epoch(share_ratio=0.05, settled=False)  # polarised but the masks still move: weaker
    assert relative.strength == pytest.approx(0.5 * 1.4)  # at least min_ratio x the measure
    again = RelativeSparsity()
    again.load_state_dict(relative.state_dict())
    assert (again.strength, again.measure, again.measured) == (relative.strength, relative.measure, True)
    with pytest.raises(ValueError, match="ratio"):
        RelativeSparsity(ratio=0.0)


def test_growing_decay_grows_until_ready_and_gives_the_sgd_strength_of_a_decay_per_epoch():
    g = GrowingDecay(start=0.1, growth=2.0, max_decay=0.5)
    lam = g.strength(steps_per_epoch=10, lr=0.1, momentum=0.9)
    p = torch.tensor([1.0], requires_grad=True)
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    for _ in range(400):  # steady state: the value shrinks by `decay` per 10 steps
        optimizer.zero_grad()
        p.grad = lam * p.detach().clone()
        optimizer.step()
    before = float(p)
    for _ in range(10):
        optimizer.zero_grad()
        p.grad = lam * p.detach().clone()
        optimizer.step()
    assert float(p) / before == pytest.approx(0.9, abs=0.02)  # exp(-lr lam steps / (1 - momentum)), to first order
    g.end_epoch(ready=False)
    assert g.decay == pytest.approx(0.2)
    g.end_epoch(ready=True)
    assert g.decay == pytest.approx(0.2)
    g.end_epoch(ready=False)
    g.end_epoch(ready=False)
    assert g.decay == 0.5 and g.strength(10, lr=0.0) == 0.0
    again = GrowingDecay()
    again.load_state_dict(g.state_dict())
    assert again.decay == 0.5


@pytest.mark.parametrize(("kwargs", "match"), [({"start": 0.0}, "start"), ({"growth": 0.5}, "growth"),
                                               ({"max_decay": 1.0}, "max_decay")])
def test_growing_decay_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GrowingDecay(**kwargs)


def test_masked_decay_pulls_only_the_pruned_units_weight_and_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    bn = model[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -0.2, 0.9, 0.1]))
        bn.bias.copy_(torch.tensor([0.3, -0.4, 0.0, 0.2]))
    mask = unit_mask(model, 0.5)  # prunes |gamma| 0.2 and 0.1: channels 1 and 3
    assert mask["1"].tolist() == [True, False, True, False]
    pull = MaskedDecay(model)
    pull.set(mask)
    assert pull.pulled_units == 2
    for p in bn.parameters():
        p.grad = torch.zeros_like(p)
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    pull.apply(0.5)
    torch.testing.assert_close(bn.weight.grad, torch.tensor([0.0, -0.1, 0.0, 0.05]))
    torch.testing.assert_close(bn.bias.grad, torch.tensor([0.0, -0.2, 0.0, 0.1]))
    assert not model[0].weight.grad.any()  # the convolution is not the source's parameter
    pull.set(None)
    pull.apply(0.5)
    torch.testing.assert_close(bn.weight.grad, torch.tensor([0.0, -0.1, 0.0, 0.05]))
    with pytest.raises(ValueError, match="strength"):
        pull.apply(-1.0)
    assert set(unit_scores(model)) == {"1"}
