"""The three callbacks on a transformer: attention-head search with WORM, the prune mid-fit, checkpoints."""

import math

import pytest
import torch

from examples.vit import ViTClassifier
from lightning_worm import AttentionHeadSource, AttentionQKSource, EarlyBirdCallback, PruneAndFinetune, WormCallback
from tests.helpers import ROOT, tiny_loader, trainer
from tests.models import EncoderClassifier, MixClassifier, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_search_with_two_stage_worm(tmp_path, lightning_info):
    model = tiny_vit()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=0.5, source="attention_heads",
                           accept_first_window=False)
    worm = WormCallback(eb, schedule="two_stage")
    t = trainer(tmp_path, callbacks=[eb, worm], max_epochs=4)
    t.fit(model, tiny_loader())
    assert "tracking 8 units (self-attention heads" in lightning_info.text
    assert {k: tuple(v.shape) for k, v in eb.mask.items()} == {"model.blocks.0.attn": (4,), "model.blocks.1.attn": (4,)}
    assert eb.mask.kept == 4
    assert math.isnan(eb.distances[0]) and not math.isnan(eb.distances[1])
    assert eb.ticket_epoch is None or eb.ticket_epoch >= 2  # never at the first full window
    mean = eb.mean_distances[-1]
    assert worm.chi == pytest.approx(0.01 if mean < 0.015 else min(mean, 1.0))
    assert worm.truncated_units == (4 if worm.chi < 1.0 else 0)


def test_elementwise_search_state_round_trips(tmp_path):
    model = tiny_vit()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01, source=AttentionQKSource(),
                           accept_first_window=False)
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="two_stage")], max_epochs=3)
    t.fit(model, tiny_loader())
    assert list(eb.mask) == [f"model.blocks.{i}.attn.{p}_proj" for i in range(2) for p in "qk"]
    assert eb.mask.total == 4 * 16 * 16
    again = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01, source=AttentionQKSource(),
                              accept_first_window=False)
    again.load_state_dict(eb.state_dict())
    assert torch.equal(again.mask.flat, eb.mask.flat) and again.distances[1:] == eb.distances[1:]


def spy_on_carry(monkeypatch, seen):
    """Fill ``seen`` at the prune: each optimizer state by parameter name, before (cloned) and after the carry."""
    import lightning_worm.callbacks.prune as prune_module

    carry = prune_module.carry_optimizer_state

    def spy(old, new, before, after, kept, **options):
        name_of = {id(p): n for n, p in before.items()}
        seen["old"] = {name_of[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in old.state.items()}
        carry(old, new, before, after, kept, **options)
        seen["new"] = {n: {k: v.clone() for k, v in new.state[p].items()} for n, p in after.items()
                       if p in new.state}

    monkeypatch.setattr(prune_module, "carry_optimizer_state", spy)


def prune_fit(tmp_path, max_epochs=4, seen=None, monkeypatch=None):
    model = tiny_vit()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=AttentionHeadSource())
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
    if seen is not None:
        spy_on_carry(monkeypatch, seen)
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed", chi=0.01), prune], max_epochs=max_epochs)
    t.fit(model, tiny_loader())
    return t, model, eb, prune


def test_prune_and_finetune_removes_heads_mid_fit_and_slices_adam_state(tmp_path, monkeypatch):
    seen = {}
    t, model, eb, prune = prune_fit(tmp_path, seen=seen, monkeypatch=monkeypatch)
    kept = {n: int(m.sum()) for n, m in eb.ticket.items()}
    for name, count in kept.items():
        attn = model.get_submodule(name)
        assert attn.num_heads == count and attn.q_proj.out_features == attn.out_proj.in_features == 4 * count
    assert prune.pruned_epoch == 1 and t.current_epoch == 4
    state = t.optimizers[0].state
    for name, p in model.named_parameters():
        assert state[p]["exp_avg"].shape == p.shape, name  # Adam moments sliced with the heads
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    # The values, head by head: new head j holds the moments of the kept old head h, rows (q/k/v) and columns (out).
    old, new = seen["old"], seen["new"]
    gates = {n for n in old if n.endswith("slimming_gate")}  # the search's gates, folded into the weights at the prune
    assert len(gates) == 2 and set(new) == set(old) - gates
    cut = set(gates)
    for name, keep in eb.ticket.items():
        heads = torch.nonzero(keep).flatten().tolist()
        assert len(heads) < 4
        for j, h in enumerate(heads):
            rows, old_rows = slice(4 * j, 4 * j + 4), slice(4 * h, 4 * h + 4)
            for param in [f"{name}.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")]:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(new[param][key][rows], old[param][key][old_rows]), (param, key, h)
                cut.add(param)
            out = f"{name}.out_proj.weight"
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(new[out][key][:, rows], old[out][key][:, old_rows]), (out, key, h)
            cut.add(out)
    for param in set(old) - cut:  # everything else carried as it was
        for key, value in old[param].items():
            assert torch.equal(new[param][key], value), (param, key)


def test_elementwise_prune_carries_the_optimizer_state_of_the_renamed_weights(tmp_path, monkeypatch):
    """torch's pruning renames `q_proj.weight` to `q_proj.weight_orig`; its Adam moments go on, value for value."""
    model = tiny_vit()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source="attention_qk", verbose=False)
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
    seen = {}
    spy_on_carry(monkeypatch, seen)
    t = trainer(tmp_path, callbacks=[eb, prune], max_epochs=3)
    with pytest.warns(UserWarning, match="saves no time"):
        t.fit(model, tiny_loader())
    assert prune.pruned_epoch == 1
    old, new = seen["old"], seen["new"]
    renamed = {n.replace(".weight_orig", ".weight"): n for n in new}
    assert set(renamed) == set(old) and len(old) == len(list(model.parameters()))
    assert sum(n.endswith(("q_proj.weight_orig", "k_proj.weight_orig")) for n in new) == 4
    for name, state in old.items():
        assert state.keys() == new[renamed[name]].keys(), name
        for key, value in state.items():
            assert torch.equal(new[renamed[name]][key], value), (name, key)
    query = model.model.blocks[0].attn.q_proj.weight_orig
    assert int(t.optimizers[0].state[query]["step"]) == 3 * 8  # the moments kept counting across the prune


def test_the_elementwise_report_and_summary_say_that_no_time_is_saved(tmp_path, lightning_info):
    import json

    from lightning_worm.core.surgery.elementwise import ELEMENTWISE_NOTE

    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source="attention_qk", verbose=False)
    prune = PruneAndFinetune(eb, measure_latency=False, report_dir=str(tmp_path / "report"), wait_for="ticket")
    with pytest.warns(UserWarning, match="saves no time"):
        trainer(tmp_path, callbacks=[eb, prune], max_epochs=2).fit(tiny_vit(), tiny_loader())
    assert prune.report["note"] == ELEMENTWISE_NOTE
    assert json.loads((tmp_path / "report" / "pruning_report.json").read_text())["note"] == ELEMENTWISE_NOTE
    summary = next(m for m in (r.getMessage() for r in lightning_info.records)
                   if m.startswith("PruneAndFinetune: pruned"))
    assert ELEMENTWISE_NOTE in summary


def test_pruned_checkpoint_reloads_bit_identically(tmp_path):
    from lightning_worm import load_pruned

    t, model, eb, prune = prune_fit(tmp_path, max_epochs=3)
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    loaded = load_pruned(ViTClassifier, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fit saves nothing
def test_resume_mid_search_equals_the_uninterrupted_fit(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, ckpt_path=None, checkpoint=None):
        model = tiny_vit()
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=0.0, source="attention_qk",
                               accept_first_window=False)
        worm = WormCallback(eb, schedule="two_stage")
        extra = [checkpoint] if checkpoint else []
        t = trainer(tmp_path, callbacks=[eb, worm, *extra], max_epochs=max_epochs,
                    enable_checkpointing=bool(checkpoint))
        t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, eb, worm

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, eb_full, worm_full = fit(4, checkpoint=saver)
    resumed, eb_resumed, worm_resumed = fit(4, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert torch.equal(eb_resumed.mask.flat, eb_full.mask.flat)
    assert eb_resumed.distances[2:] == eb_full.distances[2:] and worm_resumed.chi == worm_full.chi < 1.0
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fit saves nothing
def test_resume_after_a_head_prune_equals_the_uninterrupted_fit(tmp_path):
    """4 epochs in one go vs 2 epochs (the prune at the end of the second) and a resume: the same weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, ckpt_path=None, checkpoint=None):
        model = tiny_vit()
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source="attention_heads", verbose=False)
        prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
        extra = [checkpoint] if checkpoint else []
        t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed", chi=0.01), prune, *extra],
                    max_epochs=max_epochs, enable_checkpointing=bool(checkpoint))
        t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, eb, prune, t

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, eb_full, prune_full, _ = fit(4, checkpoint=saver)
    resumed, eb_resumed, prune_resumed, t = fit(4, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    assert prune_full.pruned_epoch == prune_resumed.pruned_epoch == 1 and t.current_epoch == 4
    assert [b.attn.num_heads for b in resumed.model.blocks] == [b.attn.num_heads for b in full.model.blocks] == [
        int(m.sum()) for m in eb_full.ticket.values()]
    assert torch.equal(eb_resumed.ticket.flat, eb_full.ticket.flat) and not eb_resumed.searching
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_head_pruned_checkpoint_reloads_in_a_fresh_process(tmp_path):
    """The head replay is found after a plain `import lightning_worm`, not only where the prune ran."""
    import subprocess
    import sys

    t, model, eb, prune = prune_fit(tmp_path, max_epochs=3)
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    x = torch.randn(2, 3, 8, 8)
    torch.save({"x": x, "y": model.eval()(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        "from lightning_worm import load_pruned\n"
        "from examples.vit import ViTClassifier\n"
        "io = torch.load(sys.argv[2])\n"
        "model = load_pruned(ViTClassifier, sys.argv[1])\n"
        "assert torch.equal(model(io['x']), io['y'])\n"
    )
    root = ROOT
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pruned.ckpt"), str(tmp_path / "io.pt")],
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def mix_source():
    return AttentionHeadSource(modules=["mix"], projections=("wq", "wk", "wv"), num_heads=2)


@pytest.mark.filterwarnings("ignore:The attention modules")  # SizedMix has no head count: it splits by size
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # the resumed fit saves nothing
def test_a_named_head_source_resumes_and_reloads_after_the_prune(tmp_path):
    """The plan records the source's options: resuming and load_pruned find the named block again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_worm import load_pruned

    def fit(max_epochs, ckpt_path=None, saver=None):
        torch.manual_seed(0)
        model = MixClassifier()
        eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=mix_source(), verbose=False)
        prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
        t = trainer(tmp_path, callbacks=[eb, prune, *([saver] if saver else [])], max_epochs=max_epochs,
                    enable_checkpointing=bool(saver))
        t.fit(model, tiny_loader(), ckpt_path=ckpt_path)
        return model, prune

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full, prune = fit(3, saver=saver)
    assert prune.pruned_epoch == 1 and full.mix.wq.out_features == full.mix.o.in_features == 4
    resumed, _ = fit(3, ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded = load_pruned(MixClassifier, tmp_path / "ckpt" / "epoch=2.ckpt")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), full.eval()(x))


@pytest.mark.parametrize("case", ["layernorm", "mha_heads"])
def test_a_source_that_cannot_prune_this_model_is_refused_when_the_fit_starts(tmp_path, case):
    """Not at the ticket after a whole search: before the first training step."""
    if case == "layernorm":
        model, source, match = tiny_vit(), "layernorm", "LayerNormSource cannot remove channels physically"
    else:
        torch.manual_seed(0)
        model, source, match = EncoderClassifier(), "attention_heads", "nn.MultiheadAttention cannot lose heads"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=source, verbose=False)
    t = trainer(tmp_path, callbacks=[eb, PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")], max_epochs=3)
    with pytest.raises(ValueError, match=match) as error:
        t.fit(model, tiny_loader())
    assert t.global_step == 0 and t.current_epoch == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # not one step taken
    if case == "mha_heads":
        assert "'mix.layers.0.self_attn'" in str(error.value) and "AttentionQKSource" in str(error.value)
