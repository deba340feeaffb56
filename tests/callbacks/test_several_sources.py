"""One tracker, several sources: the search, WORM on every source, one prune mid-fit, resume and reload."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_worm import (
    AttentionHeadSource,
    BatchNormSource,
    EarlyBirdCallback,
    PruneAndFinetune,
    WormCallback,
    load_pruned,
)
from tests.helpers import tiny_loader, trainer
from tests.models import HybridClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


def heads_and_channels():
    return [BatchNormSource(), AttentionHeadSource(prune_ratio=0.5, scope="layer")]


def fit(tmp_path, max_epochs=4, ckpt_path=None, checkpoint=None, threshold=1.0, prune=True):
    model = HybridClassifier()
    eb = EarlyBirdCallback(prune_ratio=0.25, window=2, threshold=threshold, source=heads_and_channels(),
                           verbose=False)
    worm = WormCallback(eb, schedule="fixed", chi=0.01)
    pruner = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket") if prune else None
    extra = [c for c in (pruner, checkpoint) if c is not None]
    t = trainer(tmp_path, callbacks=[eb, worm, *extra], max_epochs=max_epochs,
                enable_checkpointing=bool(checkpoint))
    t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
    return model, eb, worm, pruner, t


def test_worm_truncates_the_pruned_units_of_every_source(tmp_path):
    model, eb, worm, _, _ = fit(tmp_path, max_epochs=2, prune=False)
    assert worm.truncated_units == 2 + 4  # 2 channels, 2 heads in each of 2 blocks
    truncated = {id(p) for p in eb.truncation._params}
    assert id(model.net.stem[1].weight) in truncated and id(model.net.blocks[1].attn.v_proj.bias) in truncated


def test_one_search_over_channels_and_heads_truncates_both_and_prunes_both_at_once(tmp_path):
    model, eb, worm, prune, t = fit(tmp_path)
    ticket = eb.ticket
    assert list(ticket) == ["net.stem.1", "net.blocks.0.attn", "net.blocks.1.attn"]
    assert int((~ticket["net.stem.1"]).sum()) == 2  # the tracker's ratio, 25 % of 8
    assert [int(ticket[f"net.blocks.{i}.attn"].sum()) for i in range(2)] == [2, 2]  # the heads' own, per layer
    assert prune.pruned_epoch == 1 and t.current_epoch == 4
    assert model.net.stem[1].num_features == 6 and [b.attn.num_heads for b in model.net.blocks] == [2, 2]
    assert prune.report["source"] == "sources"
    assert prune.report["units_after"] == {"net.stem.1": 6, "net.blocks.0.attn": 2, "net.blocks.1.attn": 2}
    for p in model.parameters():
        assert t.optimizers[0].state[p]["exp_avg"].shape == p.shape
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    loaded = load_pruned(HybridClassifier, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_the_settings_of_every_source_name_the_search_state():
    a = EarlyBirdCallback(source=heads_and_channels())
    b = EarlyBirdCallback(source=[BatchNormSource(), AttentionHeadSource(prune_ratio=0.4, scope="layer")])
    assert a.state_key != b.state_key
    assert "AttentionHeadSource(prune_ratio=0.5, scope='layer')" in a.state_key
    assert EarlyBirdCallback().state_key == EarlyBirdCallback(source=BatchNormSource()).state_key  # as before


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fit saves nothing
def test_resume_mid_search_equals_the_uninterrupted_fit(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, eb_full, *_ = fit(tmp_path, max_epochs=5, checkpoint=saver, threshold=0.0, prune=False)
    for epoch in (0, 2):
        resumed, eb_resumed, *_ = fit(tmp_path, max_epochs=5, ckpt_path=tmp_path / "ckpt" / f"epoch={epoch}.ckpt",
                                      threshold=0.0, prune=False)
        assert torch.equal(eb_resumed.mask.flat, eb_full.mask.flat)
        assert eb_resumed.distances[epoch + 1:] == eb_full.distances[epoch + 1:]
        for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resume_after_the_prune_rebuilds_both_sources(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, *_ = fit(tmp_path, checkpoint=saver)
    resumed, _, _, prune, t = fit(tmp_path, ckpt_path=tmp_path / "ckpt" / "epoch=2.ckpt")
    assert resumed.net.stem[1].num_features == 6 and t.current_epoch == 4
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_heads_per_layer_and_neurons_globally_in_one_ticket_prune_at_once_and_reload(tmp_path):
    """EarlyBERT's ticket on the example ViT: half the heads of every block, 40 % of the MLP neurons overall."""
    from examples.vit import ViTClassifier
    from lightning_worm import FeedForwardSource
    from tests.models import tiny_vit

    model = tiny_vit()
    eb = EarlyBirdCallback(window=2, threshold=1.0, verbose=False,
                           source=[AttentionHeadSource(prune_ratio=0.5, scope="layer"),
                                   FeedForwardSource(prune_ratio=0.4)])
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed", chi=0.01), prune], max_epochs=3)
    t.fit(model, tiny_loader())
    assert list(eb.ticket) == ["model.blocks.0.attn", "model.blocks.1.attn", "model.blocks.0.mlp",
                               "model.blocks.1.mlp"]
    assert [b.attn.num_heads for b in model.model.blocks] == [2, 2]
    neurons = [b.mlp[0].out_features for b in model.model.blocks]
    assert sum(neurons) == 64 - round(0.4 * 64)  # 2 blocks of 32 neurons
    shares = {k: {n: v for n, v in share.items() if n != "entries"} for k, share in prune.report["shares"].items()}
    assert shares == {"AttentionHeadSource": {"before": 8, "after": 4},
                      "FeedForwardSource": {"before": 64, "after": sum(neurons)}}
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load_pruned(ViTClassifier, path)(x), model.eval()(x))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fits save nothing
def test_a_slimming_search_checkpoints_its_gates_resumes_and_leaves_no_trace_after_the_prune(tmp_path):
    """EarlyBERT's recipe: gates on heads and neurons train with the model; the prune folds them away."""
    from examples.vit import ViTClassifier
    from lightning_worm import FeedForwardSource
    from tests.models import tiny_vit

    def fit(max_epochs, ckpt_path=None, checkpoint=None):
        model = tiny_vit()
        eb = EarlyBirdCallback(window=2, threshold=1.0, verbose=False, sparsity=1e-3,
                               source=[AttentionHeadSource(prune_ratio=0.5, scope="layer", score="slimming"),
                                       FeedForwardSource(prune_ratio=0.4, score="slimming")])
        prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
        extra = [checkpoint] if checkpoint else []
        t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed", chi=0.01), prune, *extra],
                    max_epochs=max_epochs, enable_checkpointing=bool(checkpoint))
        t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, eb, prune, t

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    model, eb, prune, t = fit(3, checkpoint=saver)
    searching = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=False)["state_dict"]
    gates = {k: v for k, v in searching.items() if k.endswith("slimming_gate")}
    assert len(gates) == 4 and any(not torch.equal(v, torch.ones_like(v)) for v in gates.values())  # they trained
    assert prune.pruned_epoch == 1 and [b.attn.num_heads for b in model.model.blocks] == [2, 2]
    assert not any("slimming_gate" in k for k in model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    assert not any("slimming_gate" in k for k in torch.load(path, weights_only=False)["state_dict"])
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load_pruned(ViTClassifier, path)(x), model.eval()(x))
    for epoch in (0, 2):  # mid-search (gates in the checkpoint) and after the prune (none)
        resumed, *_ = fit(3, ckpt_path=tmp_path / "ckpt" / f"epoch={epoch}.ckpt")
        for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_slimming_gates_are_refused_under_fsdp2_and_auto_falls_back_to_magnitudes():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_worm import FeedForwardSource
    from tests.models import tiny_vit

    class Mesh(dict):
        def __init__(self):
            super().__init__(tensor_parallel=type("Dim", (), {"size": lambda self: 1})())

    def sharded(callback):
        t = trainer(callbacks=[callback], max_epochs=1)
        t.strategy.__class__ = ModelParallelStrategy  # only the type and the mesh are read
        t.strategy._device_mesh = Mesh()
        return t

    model = tiny_vit()
    explicit = EarlyBirdCallback(source=[AttentionHeadSource(score="slimming"), FeedForwardSource()])
    with pytest.raises(ValueError, match=r"slimming gates \(AttentionHeadSource\(score='slimming'\)\) are not "
                                         r"supported under sharded training \(FSDP2\)"):
        explicit.setup(sharded(explicit), model, "fit")
    auto = EarlyBirdCallback(source=[AttentionHeadSource(score="auto"), FeedForwardSource(score="auto")])
    auto.setup(sharded(auto), model, "fit")
    assert not any("slimming_gate" in n for n, _ in model.named_parameters())  # no gates: scored by magnitude
