"""The callbacks act in their own hooks from the tracker's state: no order, construction or listing matters."""

import itertools

import pytest
import torch

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from tests.helpers import tiny_loader, trainer
from tests.models import ManualTinyNet, TinyNet

BUILDERS = {
    "early_bird": lambda eb: eb,
    "worm": lambda eb: WormCallback(eb, schedule="fixed", chi=0.003),
    "prune": lambda eb: PruneAndFinetune(eb, measure_latency=False, wait_for="ticket"),
}
MODELS = {"automatic": TinyNet, "manual": ManualTinyNet}


def run(construction, reverse_list, discover=False, optimization="automatic"):
    torch.manual_seed(0)
    # WORM truncates from the first mask (epoch 0) and the sparsity term acts until the prune (epoch 1): both
    # per-step edits act together in epoch 1, where their order shows.
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, sparsity=0.05, verbose=False)
    built = {}
    for name in construction:  # the order the user builds them in
        built[name] = BUILDERS[name](None if discover and name != "early_bird" else eb)
    listed = [built["early_bird"], built["worm"], built["prune"]]
    if reverse_list:
        listed.reverse()
    model = MODELS[optimization]()
    t = trainer(callbacks=listed, max_epochs=4)
    t.fit(model, tiny_loader())
    worm, prune = built["worm"], built["prune"]
    return dict(chi=worm.chi, truncated=worm.truncated_units, ticket=eb.ticket_epoch, pruned=prune.pruned_epoch,
                distances=eb.distances, weights=[p.detach().clone() for p in model.parameters()],
                logged_chi=float(t.callback_metrics["worm/chi"]))


@pytest.mark.slow
@pytest.mark.parametrize("optimization", MODELS)
def test_every_construction_and_list_order_gives_the_same_fit(optimization):
    results = [run(order, reverse, optimization=optimization)
               for order in itertools.permutations(BUILDERS) for reverse in (False, True)]
    assert len(results) == 12
    first = results[0]
    assert first["chi"] == 0.003 and first["ticket"] == 1 and first["pruned"] == 1 and first["truncated"] == 0
    for other in results[1:]:
        assert {k: other[k] for k in ("chi", "truncated", "ticket", "pruned", "distances", "logged_chi")} == {
            k: first[k] for k in ("chi", "truncated", "ticket", "pruned", "distances", "logged_chi")}
        assert all(torch.equal(a, b) for a, b in zip(other["weights"], first["weights"], strict=True))


@pytest.mark.parametrize("optimization", MODELS)
@pytest.mark.parametrize("reverse_list", [False, True])
def test_the_sparsity_term_is_never_truncated(optimization, reverse_list):
    """chi = 0 removes the loss gradient of the masked-out channels: one SGD step then moves their gamma by
    exactly lr * s * sign(gamma) and leaves their beta as it was, whatever the mode and the list order."""
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, sparsity=0.05, first_mask="train_start", verbose=False)
    callbacks = [eb, WormCallback(schedule="fixed", chi=0.0)]
    model = MODELS[optimization](lr=0.2, momentum=0.0)
    bn = model.features[1]
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    trainer(callbacks=callbacks[::-1] if reverse_list else callbacks, max_epochs=1, limit_train_batches=1).fit(
        model, tiny_loader())
    pruned = ~eb.mask["features.1"]
    assert 0 < int(pruned.sum()) < bn.num_features
    # Two roundings of the same step (SGD's and this line's) may differ in the last bit; a truncated term moves 0.
    torch.testing.assert_close(bn.weight.detach()[pruned], gamma[pruned] - 0.2 * 0.05 * gamma[pruned].sign())
    assert torch.equal(bn.bias.detach()[pruned], beta[pruned])  # a zero gradient moves nothing, exactly
    assert not torch.equal(bn.bias.detach()[~pruned], beta[~pruned])  # the kept channels did learn


def test_followers_find_their_tracker_in_the_trainer():
    given, found = run(list(BUILDERS), False), run(list(BUILDERS), False, discover=True)
    assert given["chi"] == found["chi"] and given["pruned"] == found["pruned"]
    assert all(torch.equal(a, b) for a, b in zip(given["weights"], found["weights"], strict=True))


def test_a_worm_outside_the_trainer_does_nothing():
    torch.manual_seed(0)
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=0.0, verbose=False)
    stray = WormCallback(eb, schedule="fixed", chi=0.5)  # built, never added
    real = WormCallback(eb, schedule="fixed", chi=0.003)
    t = trainer(callbacks=[eb, real], max_epochs=3)
    t.fit(TinyNet(), tiny_loader())
    assert float(t.callback_metrics["worm/chi"]) == pytest.approx(0.003) and stray.truncated_units == 0


def test_two_worms_on_one_tracker_are_refused():
    eb = EarlyBirdCallback()
    t = trainer(callbacks=[eb, WormCallback(eb), WormCallback()], max_epochs=1)
    with pytest.raises(ValueError, match="Two WormCallbacks follow"):
        t.fit(TinyNet(), tiny_loader())


def test_several_trackers_are_told_apart_by_prune_ratio():
    torch.manual_seed(0)
    low, high = EarlyBirdCallback(prune_ratio=0.25, window=2), EarlyBirdCallback(prune_ratio=0.5, window=2)
    worm_low, worm_high = WormCallback(0.25, schedule="fixed"), WormCallback(0.5, schedule="fixed")
    t = trainer(callbacks=[worm_high, high, worm_low, low], max_epochs=2)
    t.fit(TinyNet(), tiny_loader())
    assert worm_low.early_bird is low and worm_high.early_bird is high
    assert worm_low.truncated_units == 6 and worm_high.truncated_units == 12
    assert "worm_0.25/chi" in t.callback_metrics and "earlybird_0.5/ticket_found" in t.callback_metrics


@pytest.mark.parametrize(("callbacks", "match"), [
    (lambda: [WormCallback()], "needs an EarlyBirdCallback in the same Trainer"),
    (lambda: [EarlyBirdCallback(0.3), EarlyBirdCallback(0.5), WormCallback()], "cannot tell which of 2"),
    (lambda: [EarlyBirdCallback(0.3), WormCallback(0.5)], "designates 0"),
    (lambda: [EarlyBirdCallback(0.5), PruneAndFinetune(EarlyBirdCallback(0.5))], "not in this Trainer"),
])
def test_tracker_not_found_is_named(callbacks, match):
    t = trainer(callbacks=callbacks(), max_epochs=1)
    with pytest.raises(ValueError, match=match):
        t.fit(TinyNet(), tiny_loader())


@pytest.mark.parametrize("bad", [True, 1.5, "0.5", 0.0, TinyNet])
def test_bad_tracker_spec_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match="`early_bird` must be"):
        WormCallback(bad)
    with pytest.raises(ValueError, match="`early_bird` must be"):
        PruneAndFinetune(bad, wait_for="ticket")
