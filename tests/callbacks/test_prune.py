"""PruneAndFinetune in real fits: prune at the ticket, keep training the small network, resume, reload."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, load_pruned
from tests.helpers import tiny_loader, trainer
from tests.models import ScheduledNet, TinyNet

TICKET_EPOCH = 1  # window=2, threshold=1.0: the ticket is the mask of the first full window


class Spy(Callback):
    """Records the lr at each epoch start, steps per epoch, and the optimizer state before the prune."""

    def __init__(self):
        self.lrs, self.steps, self.state_before = [], [], None

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)
        if trainer.current_epoch == TICKET_EPOCH:  # listed first: runs before the tracker prunes
            names = {id(p): n for n, p in pl_module.named_parameters()}
            self.state_before = {names[id(p)]: s["momentum_buffer"].clone()
                                 for p, s in trainer.optimizers[0].state.items()}


def callbacks(**prune_kwargs):
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
    return eb, WormCallback(eb, schedule="fixed", chi=0.003), PruneAndFinetune(eb, **prune_kwargs, wait_for="ticket")


def fit(model_cls=TinyNet, max_epochs=4, tmp_path=None, ckpt_path=None, extra=(), prune_kwargs=None, **kwargs):
    torch.manual_seed(0)
    model = model_cls()
    eb, worm, prune = callbacks(**(prune_kwargs or {}))
    spy = Spy()
    t = trainer(tmp_path, callbacks=[spy, eb, worm, prune, *extra], max_epochs=max_epochs, **kwargs)
    t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return t, model, eb, worm, prune, spy


def test_prunes_the_ticket_and_trains_on(tmp_path):
    t, model, eb, worm, prune, spy = fit(tmp_path=tmp_path, max_epochs=4, prune_kwargs={"report_dir": str(tmp_path)})
    kept = {name: int(m.sum()) for name, m in eb.ticket.items()}
    assert model.features[1].num_features == kept["features.1"] == model.features[0].out_channels
    assert model.features[4].num_features == kept["features.4"] == model.classifier.in_features
    assert sum(kept.values()) == 12  # no coupling in this net: exactly the ticket
    assert prune.pruned_epoch == TICKET_EPOCH and t.current_epoch == 4
    assert spy.steps[-1] - spy.steps[TICKET_EPOCH] == 2 * 8  # two more epochs of eight steps
    # the search is over: histories stop at the ticket, WORM truncates nothing
    assert len(eb.distances) == TICKET_EPOCH + 1 and not eb.searching
    assert worm.chi == 0.003 and worm.truncated_units == 0  # WORM did switch on; nothing is truncated now
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    r = prune.report
    assert r["params_after"] < r["params_before"] and r["flops_after"] < r["flops_before"]
    assert r["ticket_epoch"] == TICKET_EPOCH and r["units_after"] == kept
    assert r["latency_before_ms"] > 0 and r["latency_after_ms"] > 0
    assert json.loads(open(tmp_path / "pruning_report.json").read())["params_after"] == r["params_after"]
    assert t.callback_metrics["pruning/params_ratio"] == pytest.approx(r["params_after"] / r["params_before"])


@pytest.mark.parametrize("reset", [False, True], ids=["carried", "reset"])
def test_optimizer_state_sliced_to_kept_channels(reset):
    t, model, eb, _, prune, spy = fit(max_epochs=10, prune_kwargs={"finetune_epochs": 0,
                                                                   "reset_optimizer_state": reset})
    assert t.current_epoch == TICKET_EPOCH + 1  # finetune_epochs=0 ends the fit at the prune
    state = {n: t.optimizers[0].state[p] for n, p in model.named_parameters() if p in t.optimizers[0].state}
    if reset:
        assert state == {}
        return
    keep1 = torch.nonzero(eb.ticket["features.1"]).flatten()
    keep4 = torch.nonzero(eb.ticket["features.4"]).flatten()
    expected = {
        "features.0.weight": spy.state_before["features.0.weight"][keep1],
        "features.1.weight": spy.state_before["features.1.weight"][keep1],
        "features.3.weight": spy.state_before["features.3.weight"][keep4][:, keep1],
        "features.4.bias": spy.state_before["features.4.bias"][keep4],
        "classifier.weight": spy.state_before["classifier.weight"][:, keep4],
        "classifier.bias": spy.state_before["classifier.bias"],
    }
    for name, value in expected.items():
        assert torch.equal(state[name]["momentum_buffer"], value), name
    assert all(state[n]["momentum_buffer"].shape == p.shape for n, p in model.named_parameters())


@pytest.mark.parametrize("restart", [False, True], ids=["continued", "restarted"])
def test_lr_schedule_continues_or_restarts(restart):
    *_, spy = fit(ScheduledNet, max_epochs=5, prune_kwargs={"restart_schedule": restart})
    if restart:  # afresh after the prune at the end of epoch 1
        assert spy.lrs == pytest.approx([0.2, 0.1, 0.2, 0.1, 0.05])
    else:
        assert spy.lrs == pytest.approx([0.2, 0.1, 0.05, 0.025, 0.0125])


def test_finetune_epochs_ends_the_fit():
    t, *_ = fit(max_epochs=50, prune_kwargs={"finetune_epochs": 2})
    assert t.current_epoch == TICKET_EPOCH + 1 + 2


def test_reinit_gives_fresh_weights():
    _, model, eb, *_ = fit(max_epochs=10, prune_kwargs={"finetune_epochs": 0, "reinit": True})
    _, sliced, *_ = fit(max_epochs=10, prune_kwargs={"finetune_epochs": 0})
    assert model.features[0].weight.shape == sliced.features[0].weight.shape
    assert not torch.allclose(model.features[0].weight, sliced.features[0].weight)
    assert torch.equal(model.features[1].weight, torch.ones_like(model.features[1].weight))  # BN reset


def test_resume_after_prune_equals_uninterrupted(tmp_path):
    _, full, *_ = fit(max_epochs=5, tmp_path=tmp_path / "full")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "half", save_last=True, save_top_k=0)
    fit(max_epochs=3, tmp_path=tmp_path / "half", extra=[checkpoint], enable_checkpointing=True)
    _, resumed, eb, _, prune, _ = fit(max_epochs=5, tmp_path=tmp_path / "resumed",
                                      ckpt_path=tmp_path / "half" / "last.ckpt")
    assert prune.pruned_epoch == TICKET_EPOCH and not eb.searching
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_load_pruned_gives_identical_outputs(tmp_path):
    t, model, *_ = fit(max_epochs=3, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    loaded = load_pruned(TinyNet, tmp_path / "pruned.ckpt")
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded.hparams.lr == 0.2


def test_load_pruned_overrides_hyperparameters(tmp_path):
    t, *_ = fit(max_epochs=3, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    assert load_pruned(TinyNet, tmp_path / "pruned.ckpt", lr=0.01).hparams.lr == 0.01


def test_without_early_bird_in_trainer_raises():
    eb = EarlyBirdCallback()
    with pytest.raises(ValueError, match="follows an EarlyBirdCallback that is not in this Trainer"):
        trainer(callbacks=[PruneAndFinetune(eb, wait_for="ticket")], max_epochs=1).fit(TinyNet(), tiny_loader())


@pytest.mark.parametrize("kwargs,name", [({"coupling": "any"}, "coupling"), ({"round_to": 0}, "round_to"),
                                         ({"finetune_epochs": -1}, "finetune_epochs")])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        PruneAndFinetune(EarlyBirdCallback(), **kwargs)


def test_not_an_early_bird_raises():
    with pytest.raises(ValueError, match="must be an EarlyBirdCallback"):
        PruneAndFinetune("early bird")


def test_dict_batches_need_an_example_input():
    class DictNet(TinyNet):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    pairs = tiny_loader().dataset
    data = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in pairs], batch_size=8)
    eb, worm, prune = callbacks()
    with pytest.raises(ValueError, match="pass `example_input=`"):
        trainer(callbacks=[eb, worm, prune], max_epochs=3).fit(DictNet(), data)
    eb, worm, prune = callbacks(example_input=torch.randn(2, 3, 8, 8))
    t = trainer(callbacks=[eb, worm, prune], max_epochs=3)
    t.fit(DictNet(), data)
    assert prune.plan is not None


def test_syncbatchnorm_model_is_searched_and_pruned(tmp_path):
    """What `sync_batchnorm=True` gives a model. (DDP with SyncBatchNorm needs GPUs: torch refuses CPU modules.)"""
    torch.manual_seed(0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TinyNet())
    eb, worm, prune = callbacks()
    t = trainer(tmp_path, callbacks=[eb, worm, prune], max_epochs=3)
    t.fit(model, tiny_loader())
    assert isinstance(model.features[1], torch.nn.SyncBatchNorm)
    assert model.features[1].num_features + model.features[4].num_features == 12
    t.save_checkpoint(tmp_path / "sync.ckpt")

    class SyncNet(TinyNet):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(self)

    loaded = load_pruned(SyncNet, tmp_path / "sync.ckpt")
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_several_trackers_all_stop_at_the_prune(tmp_path):
    trackers = [EarlyBirdCallback(prune_ratio=p, window=2, threshold=1.0) for p in (0.3, 0.5)]
    prune = PruneAndFinetune(trackers[1], wait_for="ticket")
    t = trainer(tmp_path, callbacks=[*trackers, prune], max_epochs=4)
    t.fit(TinyNet(), tiny_loader())
    assert prune.pruned_epoch == TICKET_EPOCH and t.current_epoch == 4
    assert all(not eb.searching and len(eb.distances) == TICKET_EPOCH + 1 for eb in trackers)


def test_spawn_launchers_refused_with_the_fix():
    eb = EarlyBirdCallback()
    t = trainer(callbacks=[eb, PruneAndFinetune(eb)], accelerator="cpu", devices=2, strategy="ddp_spawn")
    with pytest.raises(ValueError, match="'spawn' launcher.*Use `strategy='ddp'`"):
        PruneAndFinetune.setup(t.callbacks[1], t, TinyNet(), "fit")


def test_two_prune_callbacks_refused():
    a, b = EarlyBirdCallback(prune_ratio=0.3), EarlyBirdCallback(prune_ratio=0.7)
    t = trainer(callbacks=[a, b, PruneAndFinetune(a), PruneAndFinetune(b)], max_epochs=1)
    with pytest.raises(ValueError, match="one PruneAndFinetune"):
        t.fit(TinyNet(), tiny_loader())


def test_non_batchnorm_source_refused_at_setup():
    from lightning_worm.core.scores import BatchNormSource

    class Custom(BatchNormSource.__mro__[1]):  # a ChannelSource that is not the BatchNorm one
        pass

    eb = EarlyBirdCallback(source=Custom())
    with pytest.raises(ValueError, match="cannot remove the units of Custom: it has no surgery"):
        PruneAndFinetune.setup(PruneAndFinetune(eb, wait_for="ticket"), trainer(callbacks=[eb]), TinyNet(), "fit")


def test_example_input_array_is_the_fallback(tmp_path):
    class DictNet(TinyNet):
        def __init__(self):
            super().__init__()
            self.example_input_array = torch.zeros(1, 3, 8, 8)

        def training_step(self, batch, batch_idx):
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    data = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in tiny_loader().dataset], batch_size=8)
    eb, worm, prune = callbacks()
    trainer(tmp_path, callbacks=[eb, worm, prune], max_epochs=3).fit(DictNet(), data)
    assert prune.plan is not None


def test_validate_a_fresh_module_from_a_pruned_checkpoint(tmp_path):
    t, model, *_ = fit(max_epochs=3, tmp_path=tmp_path)
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    eb, worm, prune = callbacks()
    fresh = TinyNet()
    v = trainer(tmp_path, callbacks=[eb, worm, prune])
    metrics = v.validate(fresh, tiny_loader(), ckpt_path=tmp_path / "pruned.ckpt", verbose=False)
    assert fresh.features[1].num_features == model.features[1].num_features
    pairs = zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert metrics[0]["val_loss"] > 0


def test_reshaping_hook_is_installed_once_per_module():
    eb = EarlyBirdCallback()
    prune, module = PruneAndFinetune(eb, wait_for="ticket"), TinyNet()
    calls = []
    module.on_load_checkpoint = lambda checkpoint: calls.append(checkpoint)  # the user's own hook
    for stage in ("validate", "test", "validate"):
        prune.setup(trainer(callbacks=[eb, prune]), module, stage)
    module.on_load_checkpoint({"state_dict": {}})
    assert len(calls) == 1  # the user's hook runs once, after the (single) reshaping hook


def test_recalibration_evaluation_and_the_report(tmp_path):
    seen = []

    def evaluate(module):
        assert not module.training and not torch.is_grad_enabled()
        seen.append(tuple(module.features[1].running_mean.shape))
        return float(len(seen))

    t, model, eb, *_ = fit(max_epochs=3, tmp_path=tmp_path,
                           prune_kwargs={"recalibrate_batches": 3, "evaluate": evaluate, "report_dir": str(tmp_path)})
    report = json.loads((tmp_path / "pruning_report.json").read_text())
    kept = int(eb.ticket["features.1"].sum())
    assert seen == [(8,), (kept,), (kept,)]  # before the prune, right after the surgery, after recalibration
    assert report["evaluation"] == {"before": 1.0, "after_surgery": 2.0, "after_recalibration": 3.0}
    assert report["recalibration_batches"] == 3 and report["ticket"] == "early_bird"


def test_recalibrated_statistics_are_those_of_the_training_batches():
    import copy

    class Probe(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == TICKET_EPOCH + 1:  # right after the prune, before any new step
                self.module = copy.deepcopy(pl_module)

    probe = Probe()
    fit(max_epochs=3, extra=[probe], prune_kwargs={"recalibrate_batches": 2})
    recalibrated = probe.module.features[1].running_mean.clone()
    pruned = probe.module.eval()  # eval: the hand computation leaves the statistics alone
    means = []
    handle = pruned.features[1].register_forward_hook(lambda m, i, o: means.append(i[0].mean(dim=(0, 2, 3))))
    with torch.no_grad():
        for i, (x, _) in enumerate(tiny_loader()):  # the first two training batches (no shuffling)
            if i == 2:
                break
            pruned.features[1](pruned.features[0](x))
    handle.remove()
    expected = torch.stack(means).mean(0)  # equal batch sizes: the cumulative average is the plain mean
    assert torch.allclose(recalibrated, expected, atol=1e-6)


def test_random_ticket_control_keeps_the_same_widths():
    _, model, eb, _, prune, _ = fit(max_epochs=3, prune_kwargs={"ticket": "random", "seed": 3})
    kept = {name: int(m.sum()) for name, m in eb.ticket.items()}
    assert model.features[1].num_features == kept["features.1"]
    assert model.features[4].num_features == kept["features.4"]
    assert prune.report["ticket"] == "random"
    _, again, *_ = fit(max_epochs=3, prune_kwargs={"ticket": "random", "seed": 3})
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


class SchedulerOnlyOnce(ScheduledNet):
    """Builds an LR scheduler the first time only: after the prune its optimizers differ from before."""

    def configure_optimizers(self):
        if getattr(self, "_built", False):
            return TinyNet.configure_optimizers(self)
        self._built = True
        return super().configure_optimizers()


def test_other_schedulers_after_the_prune_are_named():
    with pytest.raises(RuntimeError, match="returned 0 LR schedulers after pruning but 1 before"):
        fit(model_cls=SchedulerOnlyOnce)
