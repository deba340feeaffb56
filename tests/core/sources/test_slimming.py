"""Slimming coefficients (score="slimming"): one gate per head or neuron, scored, regularised, truncated, folded."""

import copy

import pytest
import torch

from lightning_worm import AttentionHeadSource, apply_plan, unit_mask
from lightning_worm.core.gates import GATE, gate_of
from lightning_worm.core.sources import FeedForwardSource, SourceList
from lightning_worm.core.surgery import prune_sources
from tests.models import vit

SLIM = {"score": "slimming"}


def gated(model, *sources, seed=0):
    """Give ``model`` the sources' gates, then random gate values (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    for source in sources:
        source.prepare(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(GATE):
                p.copy_(torch.rand(p.shape, generator=generator) + 0.25)
    return model


def gates(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(GATE)}


def test_gates_start_at_one_and_change_nothing_until_they_train():
    model, x = vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    heads, neurons = AttentionHeadSource(**SLIM), FeedForwardSource(**SLIM)
    heads.prepare(model), neurons.prepare(model)
    heads.prepare(model)  # twice: the same gates
    assert {n: tuple(p.shape) for n, p in gates(model).items()} == {
        "blocks.0.attn.slimming_gate": (4,), "blocks.0.mlp.slimming_gate": (64,),
        "blocks.1.attn.slimming_gate": (4,), "blocks.1.mlp.slimming_gate": (64,)}
    assert all(bool((p == 1).all()) for p in gates(model).values())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    block = heads.tracked(model)["blocks.0.attn"]
    assert torch.equal(heads.scores(block), torch.ones(4))
    assert heads.sparsity_parameters(block) == [gate_of(model.blocks[0].attn)]
    factors = dict((id(p), f) for p, f in heads.gradient_factors(block, torch.tensor([True, False, True, True]), 0.1))
    assert factors[id(gate_of(model.blocks[0].attn))].tolist() == pytest.approx([1, 0.1, 1, 1])
    assert id(model.blocks[0].attn.v_proj.weight) in factors  # the weights are truncated as with magnitudes


def test_gates_train_and_a_gate_at_zero_silences_its_unit():
    model, x = vit(), torch.randn(2, 3, 32, 32)
    heads = AttentionHeadSource(**SLIM)
    heads.prepare(model)
    model(x).sum().backward()
    assert gate_of(model.blocks[0].attn).grad is not None
    with torch.no_grad():
        gate_of(model.blocks[0].attn).copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        zeroed = copy.deepcopy(model)
        zeroed.blocks[0].attn.v_proj.weight[8:16] = 0  # head 1's value rows (head size 8)
        zeroed.blocks[0].attn.v_proj.bias[8:16] = 0
        assert torch.allclose(model(x), zeroed(x), atol=1e-6)


def test_a_scoring_source_without_its_gates_says_to_prepare():
    with pytest.raises(ValueError, match=r"call `source.prepare\(model\)`"):
        AttentionHeadSource(**SLIM).scores(AttentionHeadSource().tracked(vit())["blocks.0.attn"])
    with pytest.raises(ValueError, match="score"):
        FeedForwardSource(score="gates")


def test_the_prune_folds_the_gates_so_that_no_trace_is_left_and_the_plan_replays_without_them():
    source = SourceList([AttentionHeadSource(prune_ratio=0.5, scope="layer", **SLIM),
                         FeedForwardSource(prune_ratio=0.4, **SLIM)])
    model, x = gated(vit(), source), torch.randn(2, 3, 32, 32)
    ticket = unit_mask(model, 0.5, source=source)
    report = prune_sources(model, ticket, x, source=source, measure_latency=False)  # checked against the gated model
    assert not gates(model) and not any(GATE in k for k in model.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert report.plan.options["plans"][0]["options"]["source_options"]["score"] == "slimming"
    with torch.no_grad():
        out = model(x)
    fresh = vit()  # a model built from its class has no gates: the plan replays on it
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    prepared = AttentionHeadSource(**SLIM)  # one given gates (a resumed search) sheds them in the replay
    resumed = vit()
    prepared.prepare(resumed)
    apply_plan(resumed, report.plan)
    resumed.load_state_dict(model.state_dict())


def test_a_failed_prune_puts_the_gates_back(monkeypatch):
    import lightning_worm.core.surgery.neurons as neurons

    source = SourceList([AttentionHeadSource(**SLIM), FeedForwardSource(**SLIM)])
    model, x = gated(vit(), source), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    monkeypatch.setattr(neurons, "_cut_neurons", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(Exception, match="boom"):
        prune_sources(model, unit_mask(model, 0.5, source=source), x, source=source, measure_latency=False)
    assert len(gates(model)) == 4
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_gates_fold_exactly_on_hugging_face_layouts(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
             "vocab_size": 64}
    model = {
        "bert": lambda: transformers.BertModel(transformers.BertConfig(**small)),
        "llama": lambda: transformers.LlamaModel(transformers.LlamaConfig(**small, num_key_value_heads=2)),
        "gpt2": lambda: transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64,
                                                                       vocab_size=64)),
    }[family]().eval()
    source = SourceList([AttentionHeadSource(**SLIM), FeedForwardSource(**SLIM)])
    gated(model, source)
    assert len(gates(model)) == 4
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).last_hidden_state
        source.fold(model)
        after = model(x).last_hidden_state
    assert not gates(model)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, (model.__class__(model.config).eval())(x).last_hidden_state)


def test_a_deep_copy_gates_with_its_own_gates():
    source = SourceList([AttentionHeadSource(**SLIM), FeedForwardSource(**SLIM)])
    model, x = gated(vit(), source), torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in gates(twin).values():
            p.zero_()
        assert not torch.allclose(model(x), twin(x))  # the twin's zero gates act on the twin only
        source.fold(twin)
    assert len(gates(model)) == 4 and not gates(twin)


def test_auto_scores_by_gates_where_the_model_has_them_and_by_magnitude_elsewhere():
    model = vit()
    auto, magnitude = AttentionHeadSource(score="auto"), AttentionHeadSource(score="magnitude")
    block = auto.tracked(model)["blocks.0.attn"]
    assert torch.equal(auto.scores(block), magnitude.scores(block))  # no gates: a model scored as it is
    assert auto.sparsity_parameters(block) == magnitude.sparsity_parameters(block)
    auto.prepare(model)  # what the tracker does at setup
    block = auto.tracked(model)["blocks.0.attn"]
    assert torch.equal(auto.scores(block), torch.ones(4))
    assert auto.sparsity_parameters(block) == [gate_of(model.blocks[0].attn)]
    assert not AttentionHeadSource(score="magnitude").gated(block)
