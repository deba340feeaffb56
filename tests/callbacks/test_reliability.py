"""Issue 8: no silent wrong result, no lost pruned model, a clear error for every bad input or fault."""

import json
import os
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, load_pruned
from lightning_worm.checkpoint import find_pruning_plan, newest_loadable_checkpoint
from tests.helpers import tiny_loader, trainer
from tests.models import LazyNet, LazyUnused, TinyNet


def fit(tmp_path, max_epochs=3, ckpt_path=None, extra=(), eb_kwargs=None, prune_kwargs=None, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or TinyNet()
    eb = EarlyBirdCallback(**{"prune_ratio": 0.5, "window": 2, "threshold": 1.0, "verbose": False, **(eb_kwargs or {})})
    prune = PruneAndFinetune(eb, measure_latency=False, **(prune_kwargs or {}), wait_for="ticket")
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed"), prune, *extra],
                max_epochs=max_epochs, **kwargs)
    t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return t, model, eb, prune


def checkpointing(tmp_path, **kwargs):
    return ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, **kwargs)


# ----------------------------------------------------------------------------- lost or unloadable models

@pytest.mark.parametrize("weights_only", [False, True], ids=["full", "weights-only"])
def test_pruned_checkpoints_describe_themselves(tmp_path, weights_only):
    _, model, *_ = fit(tmp_path, extra=[checkpointing(tmp_path, save_weights_only=weights_only)],
                       enable_checkpointing=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ("callbacks" in checkpoint) != weights_only and find_pruning_plan(checkpoint) is not None
    loaded = load_pruned(TinyNet, tmp_path / "last.ckpt")
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_weights_only_checkpoint_rebuilds_a_fresh_module_for_validation(tmp_path):
    _, model, *_ = fit(tmp_path, extra=[checkpointing(tmp_path, save_weights_only=True)], enable_checkpointing=True)
    eb = EarlyBirdCallback()
    fresh = TinyNet()
    v = trainer(tmp_path, callbacks=[eb, PruneAndFinetune(eb, wait_for="ticket")])
    v.validate(fresh, tiny_loader(), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert fresh.features[1].num_features == model.features[1].num_features


@pytest.mark.slow
def test_bf16_true_pruned_model_reloads_and_resumes(tmp_path):
    _, model, *_ = fit(tmp_path / "a", precision="bf16-true", extra=[checkpointing(tmp_path / "a")],
                       enable_checkpointing=True)
    loaded = load_pruned(TinyNet, tmp_path / "a" / "last.ckpt")
    assert loaded.features[1].num_features == model.features[1].num_features
    _, resumed, *_ = fit(tmp_path / "b", max_epochs=4, precision="bf16-true", ckpt_path=tmp_path / "a" / "last.ckpt")
    assert resumed.features[1].num_features == model.features[1].num_features


def test_report_write_failure_is_a_warning(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, *args, **kwargs):
        if str(path).endswith("pruning_report.json"):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.warns(UserWarning, match="No space left on device"):
        t, model, _, prune = fit(tmp_path, prune_kwargs={"report_dir": str(tmp_path)})
    assert prune.report["params_after"] < prune.report["params_before"] and t.current_epoch == 3


def test_without_logger_no_report_lands_in_the_working_directory(tmp_path):
    os.chdir(tmp_path)
    _, _, _, prune = fit(tmp_path / "root")
    assert prune.report is not None and prune.report_path is None
    assert not list(tmp_path.rglob("pruning_report.json"))


def test_report_is_strict_json(tmp_path):
    fit(tmp_path, prune_kwargs={"report_dir": str(tmp_path), "evaluate": lambda m: float("nan")})
    report = json.loads((tmp_path / "pruning_report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["evaluation"]["before"] is None and report["params_after"] < report["params_before"]


# ----------------------------------------------------------------------------- silent wrong results

@pytest.mark.parametrize(("factory", "name"), [
    (lambda: EarlyBirdCallback(sparsity=float("inf")), "sparsity"),
    (lambda: EarlyBirdCallback(sparsity=float("nan")), "sparsity"),
    (lambda: EarlyBirdCallback(prune_ratio=True), "prune_ratio"),
    (lambda: EarlyBirdCallback(prune_ratio=float("nan")), "prune_ratio"),
    (lambda: EarlyBirdCallback(window=True), "window"),
    (lambda: EarlyBirdCallback(window=3.0), "window"),
    (lambda: EarlyBirdCallback(threshold=float("inf")), "threshold"),
    (lambda: EarlyBirdCallback(min_units=False), "min_units"),
    (lambda: EarlyBirdCallback(every_n_epochs=0), "every_n_epochs"),
    (lambda: EarlyBirdCallback(stop_on_ticket=1), "stop_on_ticket"),
    (lambda: EarlyBirdCallback(first_mask="start"), "first_mask"),
    (lambda: EarlyBirdCallback(accept_first_window="no"), "accept_first_window"),
    (lambda: EarlyBirdCallback(source="batch_norm"), "source"),
    (lambda: EarlyBirdCallback(source=nn.BatchNorm2d(3)), "source"),
    (lambda: WormCallback(chi=float("nan")), "chi"),
    (lambda: WormCallback(chi=True), "chi"),
    (lambda: WormCallback(elbow=float("-inf")), "elbow"),
    (lambda: WormCallback(schedule="cosine"), "schedule"),
    (lambda: PruneAndFinetune(round_to=True), "round_to"),
    (lambda: PruneAndFinetune(finetune_epochs=1.5), "finetune_epochs"),
    (lambda: PruneAndFinetune(recalibrate_batches=-1), "recalibrate_batches"),
    (lambda: PruneAndFinetune(example_input="images"), "example_input"),
    (lambda: PruneAndFinetune(example_input=[1, 2]), "example_input"),
    (lambda: PruneAndFinetune(evaluate=3), "evaluate"),
    (lambda: PruneAndFinetune(ticket="lottery"), "ticket"),
    (lambda: PruneAndFinetune(seed=True), "seed"),
    (lambda: PruneAndFinetune(report_dir=3), "report_dir"),
    (lambda: PruneAndFinetune(report_dir=""), "report_dir"),
    (lambda: PruneAndFinetune(reinit="yes"), "reinit"),
])
def test_bad_arguments_are_named_at_construction(factory, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        factory()


def test_numpy_integers_are_integers():
    import numpy as np

    from lightning_worm.core.masks import Mask

    eb = EarlyBirdCallback(window=np.int64(3), min_units=np.int32(1))
    assert eb.detector.window == 3 and type(eb.detector.window) is int
    for _ in range(4):
        eb.detector.update(Mask.from_dict({"bn": torch.tensor([True, False, True])}))
    assert eb.detector.ticket is not None


@pytest.mark.parametrize(("changed", "named"), [
    ({"prune_ratio": 0.25}, "prune_ratio=0.5 in the checkpoint, prune_ratio=0.25 now"),
    ({"window": 3}, "window=2 in the checkpoint, window=3 now"),
    ({"threshold": 0.5}, "threshold=1.0 in the checkpoint, threshold=0.5 now"),
])
def test_resuming_with_other_settings_says_what_differs(tmp_path, changed, named):
    fit(tmp_path / "a", max_epochs=1, extra=[checkpointing(tmp_path / "a")], enable_checkpointing=True)
    with pytest.raises(ValueError, match=named):
        fit(tmp_path / "b", max_epochs=3, eb_kwargs=changed, ckpt_path=tmp_path / "a" / "last.ckpt")


def test_resuming_a_pruned_checkpoint_without_prune_and_finetune_is_explained(tmp_path):
    fit(tmp_path / "a", extra=[checkpointing(tmp_path / "a")], enable_checkpointing=True)
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0)
    t = trainer(tmp_path / "b", callbacks=[eb], max_epochs=4)
    with pytest.raises(ValueError, match="holds a pruned model.*no PruneAndFinetune"):
        t.fit(TinyNet(), tiny_loader(), ckpt_path=tmp_path / "a" / "last.ckpt")


def test_new_finetune_epochs_is_honoured_on_resume(tmp_path):
    fit(tmp_path / "a", max_epochs=50, extra=[checkpointing(tmp_path / "a")], enable_checkpointing=True,
        prune_kwargs={"finetune_epochs": 1})  # pruned at the end of epoch 1, ends after epoch 2
    t, *_ = fit(tmp_path / "b", max_epochs=50, prune_kwargs={"finetune_epochs": 3},
                ckpt_path=tmp_path / "a" / "last.ckpt")
    assert t.current_epoch == 1 + 1 + 3


def test_ticket_without_any_score_moving_warns(tmp_path):
    model = TinyNet(lr=0.0)  # nothing learns: every mask agrees because nothing moves
    with pytest.warns(UserWarning, match="no score moved"):
        fit(tmp_path, model=model, eb_kwargs={"threshold": 0.1})


def test_a_moving_search_does_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|val_dataloader).*")
        fit(tmp_path, eb_kwargs={"threshold": 1.0})


# ----------------------------------------------------------------------------- errors that help


def test_lazy_batchnorm_never_materialised_is_named(tmp_path):
    eb = EarlyBirdCallback(verbose=False)
    with pytest.raises(ValueError, match="lazy layers unused were never materialised"):
        trainer(tmp_path, callbacks=[eb], max_epochs=1).fit(LazyUnused(), tiny_loader())


def test_load_pruned_materialises_lazy_layers(tmp_path):
    t, model, *_ = fit(tmp_path, model=LazyNet())
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    loaded = load_pruned(LazyNet, tmp_path / "pruned.ckpt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None], ids=["empty", "garbage", "truncated"])
def test_load_pruned_names_an_unreadable_file(tmp_path, content):
    t, *_ = fit(tmp_path)
    good = tmp_path / "good.ckpt"
    t.save_checkpoint(good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2] if content is None else content)
    with pytest.raises(ValueError, match=r"Cannot read the checkpoint .*bad\.ckpt.*good\.ckpt"):
        load_pruned(TinyNet, bad)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_pruned(TinyNet, tmp_path / "missing.ckpt")


def test_resuming_from_a_corrupt_last_checkpoint_offers_the_fallback(tmp_path):
    fit(tmp_path / "a", max_epochs=2, extra=[ModelCheckpoint(dirpath=tmp_path / "a", save_last=True,
                                                             save_top_k=-1, every_n_epochs=1)],
        enable_checkpointing=True)
    last = tmp_path / "a" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    fallback = newest_loadable_checkpoint(tmp_path / "a", exclude=last)
    assert fallback is not None and fallback.name.startswith("epoch=1")
    with pytest.raises(ValueError, match=rf"Cannot resume from the checkpoint .*last\.ckpt.*{fallback.name}"):
        fit(tmp_path / "a", max_epochs=4, ckpt_path=str(last))


def test_resuming_with_last_names_the_corrupt_file_and_the_fallback(tmp_path):
    def checkpoints():
        return [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_epochs=1)]

    fit(tmp_path, max_epochs=2, extra=checkpoints(), enable_checkpointing=True)
    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    with pytest.raises(ValueError, match=r"Cannot resume from the checkpoint .*last\.ckpt.*newest loadable.*epoch=1"):
        fit(tmp_path, max_epochs=4, extra=checkpoints(), enable_checkpointing=True, ckpt_path="last")


def test_a_subclass_of_prune_and_finetune_is_found_by_load_pruned(tmp_path):
    class MyPrune(PruneAndFinetune):
        pass

    torch.manual_seed(0)
    model = TinyNet()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, verbose=False)
    t = trainer(tmp_path, callbacks=[eb, MyPrune(measure_latency=False, wait_for="ticket")], max_epochs=3)
    t.fit(model, tiny_loader())
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    checkpoint = torch.load(tmp_path / "pruned.ckpt", weights_only=False)
    del checkpoint["lightning_worm"]  # only the callback state: found by its owner mark, not its class name
    torch.save(checkpoint, tmp_path / "callback-state-only.ckpt")
    loaded = load_pruned(TinyNet, tmp_path / "callback-state-only.ckpt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_resuming_from_a_garbage_file_names_it(tmp_path):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"\x80\x02]")  # a three-byte pickle fragment: Lightning fails with a bare IndexError
    with pytest.raises(ValueError, match=r"Cannot resume from the checkpoint .*garbage\.ckpt"):
        fit(tmp_path, max_epochs=2, ckpt_path=str(bad))


# ----------------------------------------------------------------------------- modules that outlive a fit

def test_an_earlier_fits_callbacks_do_not_judge_a_resume_of_the_same_module(tmp_path):
    fit(tmp_path / "a", extra=[checkpointing(tmp_path / "a")], enable_checkpointing=True)  # a pruned checkpoint
    model = TinyNet()
    trainer(tmp_path / "b", callbacks=[EarlyBirdCallback(verbose=False)], max_epochs=1).fit(model, tiny_loader())
    # The same module object, now resumed from the pruned checkpoint with the right callbacks: the first fit's
    # tracker (no PruneAndFinetune in its Trainer) must not refuse it.
    _, resumed, _, prune = fit(tmp_path / "c", max_epochs=4, ckpt_path=tmp_path / "a" / "last.ckpt", model=model)
    assert prune.plan is not None and resumed.features[4].num_features < 16


def test_a_pruned_module_fitted_again_is_fine_tuned_as_it_is_and_its_checkpoints_describe_it(tmp_path):
    _, model, eb, _ = fit(tmp_path / "a")
    widths = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert eb.ticket_epoch is not None and widths != [8, 16]
    # A second fit with fresh callbacks and a weights-only checkpoint: no second search or prune, and the
    # checkpoint (written by a PruneAndFinetune that pruned nothing itself) still holds the module's plan.
    again_eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, verbose=False)
    again = PruneAndFinetune(again_eb, measure_latency=False, wait_for="ticket")
    t = trainer(tmp_path / "b", callbacks=[again_eb, again, checkpointing(tmp_path / "b", save_weights_only=True)],
                max_epochs=3, enable_checkpointing=True)
    t.fit(model, tiny_loader())
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == widths
    assert again_eb.ticket_epoch is None and not again_eb.searching and again.pruned_epoch is None
    loaded = load_pruned(TinyNet, tmp_path / "b" / "last.ckpt")
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_a_pruned_module_saved_by_a_trainer_without_the_library_still_describes_itself(tmp_path):
    _, model, *_ = fit(tmp_path / "a")
    t = trainer(tmp_path / "b", max_epochs=1)
    t.fit(model, tiny_loader())
    t.save_checkpoint(tmp_path / "plain.ckpt", weights_only=True)
    loaded = load_pruned(TinyNet, tmp_path / "plain.ckpt")
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
