"""The defaults: ``sparsity="auto"`` (a strength set from the run), the prune's wait for a ready ticket and its
cap, and what the report says the ticket was worth."""

import json
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback
from lightning_worm.core.readiness import ScoreShare
from tests.helpers import fit_tiny, tiny_loader, trainer
from tests.models import TinyNet

STEPS = 8  # tiny_loader: 64 examples in batches of 8


class GradientSpy(Callback):
    """Listed before the tracker: the mean |grad| of the gammas at each optimizer step, before the term is added,
    and the tracker's strength at that step."""

    def __init__(self):
        self.tracker, self.means, self.strengths = None, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        gammas = [pl_module.features[1].weight, pl_module.features[4].weight]
        self.means.append(float(torch.cat([g.grad.reshape(-1) for g in gammas]).abs().mean()))
        self.strengths.append(self.tracker.strength)


@pytest.mark.parametrize("kwargs", [{}, {"accumulate_grad_batches": 3}, {"precision": "bf16-mixed"}, "scaler"],
                         ids=["plain", "accumulate3-ragged", "bf16-mixed", "16-mixed-scaled"])
def test_auto_sparsity_is_measured_from_the_first_epochs_true_gradients(kwargs):
    if kwargs == "scaler":  # a real GradScaler (scale 1024): the measure is of the unscaled gradient
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    spy = GradientSpy()
    eb = EarlyBirdCallback(window=2, threshold=0.0, verbose=False)  # threshold 0: no ticket, the term runs on
    spy.tracker = eb
    fit_tiny([spy, eb], max_epochs=3, **kwargs)
    steps = -(-STEPS // kwargs.get("accumulate_grad_batches", 1))
    assert eb.sparsity == "auto" and len(spy.means) == 3 * steps
    measure = eb.relative.measure
    assert measure == pytest.approx(sum(spy.means[:steps]) / steps, rel=1e-5)  # the unscaled, accumulated gradient
    assert spy.strengths[:steps] == [0.0] * steps  # the first epoch only measures
    assert spy.strengths[steps:2 * steps] == pytest.approx([measure] * steps)  # then 1x the measure
    third = spy.strengths[2 * steps:]  # steered once per epoch, within [min_ratio, max_ratio] x the measure
    assert len(set(third)) == 1 and 0.25 * measure - 1e-12 <= third[0] <= 4 * measure + 1e-12
    assert 1e-5 < measure < 1.0


def test_a_ticket_that_waits_has_its_pruned_units_pulled_to_zero():
    """While the ticket is not ready, the gradient of its pruned units' gamma and beta gets ``lam * p`` on top of
    the L1 term; the kept units get the L1 term only."""

    class Before(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            bn = pl_module.features[1]
            self.grads = (bn.weight.grad.clone(), bn.bias.grad.clone())

    class After(Callback):
        def __init__(self):
            self.checked = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if eb.ticket is None or eb.ready:
                return
            bn, keep = pl_module.features[1], eb.ticket["features.1"]
            lam, s = eb.pull_strength(optimizer), eb.strength
            weight, bias = bn.weight.detach(), bn.bias.detach()
            expected_w = before.grads[0] + s * weight.sign() + torch.where(keep, 0.0, lam * weight)
            expected_b = before.grads[1] + torch.where(keep, 0.0, lam * bias)
            torch.testing.assert_close(bn.weight.grad, expected_w)
            torch.testing.assert_close(bn.bias.grad, expected_b)
            self.checked += 1

    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, ready_ratio=0.0, verbose=False)
    before, after = Before(), After()
    fit_tiny([before, eb, after], max_epochs=4)  # never ready: the pull grows every epoch after the ticket
    assert eb.ticket_epoch == 1 and not eb.ready and eb.decay.decay == pytest.approx(eb.decay.start * 1.5**2)
    assert after.checked == 2 * STEPS and eb.pull_strength() > 0.0


def test_an_explicit_sparsity_keeps_its_meaning_and_a_word_is_refused():
    eb = EarlyBirdCallback(sparsity=1e-4)
    assert eb.relative is None and eb.decay is None and eb.strength == 1e-4 and eb.pull_strength() == 0.0
    with pytest.raises(ValueError, match="`sparsity` must be a number >= 0 or 'auto'"):
        EarlyBirdCallback(sparsity="strong")
    with pytest.raises(ValueError, match="ready_ratio"):
        EarlyBirdCallback(ready_ratio=1.5)
    with pytest.raises(ValueError, match="wait_for"):
        PruneAndFinetune(wait_for="never")
    with pytest.raises(ValueError, match="max_wait"):
        PruneAndFinetune(max_wait=-1)


def fit_prune(tmp_path=None, ready_ratio=0.25, max_epochs=6, eb_kwargs=None, **prune_kwargs):
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, ready_ratio=ready_ratio, verbose=False,
                           **(eb_kwargs or {}))  # threshold 1: the ticket emerges at epoch 1
    prune = PruneAndFinetune(eb, measure_latency=False, **prune_kwargs)
    t, model = fit_tiny([eb, prune], tmp_path, max_epochs=max_epochs)
    return t, model, eb, prune


def test_a_ticket_that_is_ready_is_pruned_at_once():
    _, _, eb, prune = fit_prune(ready_ratio=1.0)
    assert eb.ticket_epoch == 1 and prune.pruned_epoch == 1
    r = prune.report
    assert r["ready"] is True and r["forced"] is False and r["waited_epochs"] == 0 and r["wait_for"] == "ready"


def test_the_wait_is_capped_with_a_warning_that_says_what_to_change():
    with pytest.warns(UserWarning, match=r"not ready.*sparsity='auto'.*max_wait.*wait_for='ticket'"):
        _, _, eb, prune = fit_prune(ready_ratio=0.0, max_wait=2)
    assert eb.ticket_epoch == 1 and prune.pruned_epoch == 3 and not eb.ready
    r = prune.report
    assert r["forced"] is True and r["ready"] is False and r["waited_epochs"] == 2


def test_the_papers_rule_is_one_argument_away():
    _, _, eb, prune = fit_prune(ready_ratio=0.0, wait_for="ticket")
    assert prune.pruned_epoch == eb.ticket_epoch == 1 and prune.report["forced"] is False


def test_a_fit_that_ends_while_the_ticket_waits_says_so():
    with pytest.warns(UserWarning, match="waiting to be ready: nothing was pruned"):
        _, model, eb, prune = fit_prune(ready_ratio=0.0, max_wait=10, max_epochs=4)
    assert prune.plan is None and eb.searching and model.features[1].num_features == 8


def test_readiness_is_logged_every_epoch_beside_the_mask_distance():
    seen = []

    class Logged(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(set(trainer.callback_metrics))

    eb = EarlyBirdCallback(window=2, threshold=0.0, verbose=False)
    fit_tiny([eb, Logged()], max_epochs=3)
    assert {"earlybird/share_ratio", "earlybird/sparsity"} <= seen[0]
    assert "earlybird/mask_distance" in seen[1] and eb.share is not None and 0.0 <= eb.share.ratio
    eb = EarlyBirdCallback(window=2, threshold=1.0, verbose=False)
    seen.clear()
    fit_tiny([eb, Logged()], max_epochs=2)
    assert "earlybird/ready" in seen[1] and eb.ticket_share is not None


def test_the_report_says_what_the_ticket_was_worth(tmp_path):
    def accuracy(module):
        x, y = next(iter(tiny_loader()))
        return float((module(x).argmax(1) == y).float().mean())

    t, model, eb, prune = fit_prune(tmp_path, ready_ratio=1.0, max_epochs=5, evaluate=accuracy,
                                    report_dir=str(tmp_path))
    r = prune.report
    share = ScoreShare(r["score_share"]["pruned"], r["score_share"]["random"])
    assert 0.0 <= share.pruned <= 1.0 and 0.0 < share.random < 1.0 and r["score_share"]["ratio"] == share.ratio
    assert ("noise" in (r.get("note") or "")) == share.looks_like_noise
    assert set(r["evaluation"]) == {"before", "after_surgery", "after_recalibration"}
    savings = r["savings"]  # brought up to date at every epoch end: 2 dense epochs, then 3 pruned ones
    assert savings["epochs"] == 5 and savings["dense_train_flops"] == 3 * 5 * 64 * r["flops_before"]
    expected = 3 * 64 * (2 * r["flops_before"] + 3 * r["flops_after"]) + 10 // 10 * 64 * r["flops_after"]
    assert savings["train_flops"] == pytest.approx(expected, rel=0.2)  # + the re-calibration's forwards
    assert savings["flops_ratio"] < 1.0 and savings["wall_s"] > 0 and savings["time_ratio"] > 0
    on_disk = json.loads((tmp_path / "pruning_report.json").read_text())
    assert on_disk["savings"]["epochs"] == 5  # written again when the fit ended
    assert t.callback_metrics["pruning/train_flops_ratio"] == pytest.approx(savings["flops_ratio"], rel=0.2)


def test_resume_at_the_defaults_continues_the_same_fit(tmp_path):
    """Sparsity "auto", the wait for readiness and the prune: resuming mid-search ends where one fit ends."""

    def build():
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, verbose=False)
        return eb, WormCallback(eb), PruneAndFinetune(eb, measure_latency=False, max_wait=2)

    eb, worm, prune = build()
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, save_last=False)
    _, whole = fit_tiny([eb, worm, prune, checkpoint], tmp_path, max_epochs=6, enable_checkpointing=True)
    first = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))[0]  # after the ticket, while it waits
    eb2, worm2, prune2 = build()
    torch.manual_seed(0)
    resumed = TinyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, callbacks=[eb2, worm2, prune2], max_epochs=6).fit(resumed, tiny_loader(), ckpt_path=first)
    assert (eb2.ticket_epoch, prune2.pruned_epoch) == (eb.ticket_epoch, prune.pruned_epoch)
    assert prune2.report["score_share"] == prune.report["score_share"]
    assert (eb2.relative.strength, eb2.decay.decay) == (eb.relative.strength, eb.decay.decay)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:The attention modules")  # SizedMix has no head count: it splits by size
@pytest.mark.parametrize("case", ["layernorm", "heads", "packed_heads"])
def test_auto_sparsity_and_readiness_work_for_the_transformer_sources(case):
    """LayerNorm scales and the query/key weights of separate projections get the term; a packed ``in_proj``
    (``nn.MultiheadAttention``) gets none, and its readiness is still measured."""
    from lightning_worm import AttentionHeadSource
    from tests.models import EncoderClassifier, MixClassifier, tiny_vit

    torch.manual_seed(0)
    module, source = {
        "layernorm": lambda: (tiny_vit(), "layernorm"),
        "heads": lambda: (MixClassifier(), AttentionHeadSource(modules=["mix"], projections=("wq", "wk", "wv"),
                                                               num_heads=2)),
        "packed_heads": lambda: (EncoderClassifier(), "attention_heads"),
    }[case]()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=source, verbose=False)
    trainer(callbacks=[eb], max_epochs=3).fit(module, tiny_loader())
    params = [p for h in eb.source.tracked(module).values() for p in eb.source.sparsity_parameters(h)]
    assert bool(params) == eb.relative.measured == (case != "packed_heads")
    assert (eb.strength > 0) == (case != "packed_heads")
    assert eb.ticket is not None and eb.ticket_share is not None and 0.0 <= eb.ticket_share.ratio
