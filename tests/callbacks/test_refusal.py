"""PruneAndFinetune refuses, before the search, a model its surgery cannot prune; a failing prune changes nothing.

Before issue 16 such a model was searched for the whole run and broke at the ticket (or was pruned wrong);
a fresh lazy model could not resume from a pruned checkpoint.
"""

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, PruningError, WormCallback
from tests.helpers import tiny_loader, trainer
from tests.models import ChannelCentred, CheckedNet, LazyNet, SmallResNet, TinyNet


class Epochs(Callback):
    def __init__(self):
        self.ended = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.ended += 1


def fit(tmp_path, model, max_epochs=3, ckpt_path=None, extra=(), **prune_kwargs):
    torch.manual_seed(0)
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, verbose=False)
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket", **prune_kwargs)
    epochs = Epochs()
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed"), prune, epochs, *extra],
                max_epochs=max_epochs)
    t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return t, eb, prune, epochs


def shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize(("cls", "match"), [
    (ChannelCentred, r"outputs first differ at 'classifier'"),
    (CheckedNet, r"forward failed after pruning in 'features.3' \(Checked\)"),
])
def test_a_model_the_surgery_cannot_prune_is_refused_after_the_first_batch(tmp_path, cls, match):
    torch.manual_seed(0)
    model = cls()
    before = shapes(model)
    epochs = Epochs()
    refusal = (r"PruneAndFinetune refuses to start the search: the model's units cannot be removed. "
               rf"{cls.__name__} cannot be pruned by BatchNormSource.*trial prune at ratio 0.5.*{match}")
    with pytest.raises(PruningError, match=refusal):
        fit(tmp_path, model, extra=[epochs])
    assert epochs.ended == 0 and model.trainer.global_step == 1  # one batch, no epoch of search
    assert shapes(model) == before


def test_without_the_trial_the_prune_at_the_ticket_fails_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    model = ChannelCentred()
    before = shapes(model)
    epochs = Epochs()
    with pytest.raises(PruningError, match=r"The channels surgery does not compute what removing the channels should"):
        fit(tmp_path, model, extra=[epochs], trial=False)
    assert epochs.ended == 1  # the ticket came at the end of epoch 1; it failed there
    assert shapes(model) == before
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))  # still the dense, working model


def test_the_trial_is_recorded_and_a_prunable_model_trains_on(tmp_path):
    t, eb, prune, epochs = fit(tmp_path, TinyNet(), max_epochs=3)
    trial = prune.trial_report
    assert trial["prune_ratio"] == 0.5 and trial["removed_fraction"] == 0.5 and trial["params_ratio"] < 1
    assert prune.report["trial"] == trial and prune.report["removed_fraction"] == 0.5
    assert prune.state_dict()["trial"] == trial and prune.pruned_epoch == 1


class ResidualNet(TinyNet):
    """TinyNet's training on SmallResNet: residual sums couple its BatchNorm layers."""

    def __init__(self):
        super().__init__()
        self.features, self.classifier = SmallResNet(width=8, num_classes=4), torch.nn.Identity()


def test_the_trial_warns_when_the_surgery_would_remove_far_less_than_the_ratio(tmp_path):
    torch.manual_seed(0)
    model = ResidualNet()
    with pytest.warns(UserWarning, match=r"PruneAndFinetune \(a trial prune at ratio 0.5, undone\): the surgery "
                      r"removed .* % of the units, the ticket asks 50.0 %: it kept \d+ for coupling"):
        fit(tmp_path, model, max_epochs=1, coupling="all")


def test_a_fresh_lazy_model_resumes_from_a_pruned_checkpoint(tmp_path):
    t, eb, prune, _ = fit(tmp_path, LazyNet(), max_epochs=2)
    assert prune.pruned_epoch == 1
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    torch.manual_seed(0)
    fresh = LazyNet()
    t2, _, prune2, _ = fit(tmp_path / "resumed", fresh, max_epochs=3, ckpt_path=str(path))
    assert prune2.plan is not None and t2.current_epoch == 3
    assert fresh.features[1].num_features == prune.report["units_after"]["features.1"]
