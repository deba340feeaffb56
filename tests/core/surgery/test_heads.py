"""Removing attention heads: equal to zeroing them, sizes fixed, plans replayed, refusals.

The Hugging Face layouts (GPT-2's Conv1D, Phi-3's grouped packing, GPT-NeoX's per-head packing, Swin's bias
table) are cut on the tiny stand-ins of ``tests/core/sources/test_attention.py``; the real families are in
``test_zoo_transformers.py``.
"""

import copy
import json
import warnings

import pytest
import torch

from lightning_worm import (
    AttentionHeadSource,
    AttentionQKSource,
    LayerNormSource,
    PruningError,
    unit_mask,
)
from lightning_worm.core.surgery import PruningPlan, apply_plan, check_prunable
from lightning_worm.core.surgery.elementwise import prune_elementwise
from lightning_worm.core.surgery.heads import MHA_REFUSAL, prune_heads
from tests.helpers import assert_equal_up_to_rounding
from tests.models import (
    AttentionNet,
    Config,
    GPT2Attention,
    InterleavedAttention,
    LastHidden,
    NeoXAttention,
    PackedNet,
    Phi3Attention,
    SizedMixNet,
    SwinAttention,
    bert,
    encoder,
    llama,
    vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_heads(model, ticket, source=None):
    """The dense twin of a head prune: the pruned heads' q/k/v rows and biases set to 0."""
    model = copy.deepcopy(model)
    source = source or AttentionHeadSource()
    blocks = source.tracked(model)
    for name, keep in ticket.items():
        block = blocks[name]
        for part in "qkv":
            weight, weight_rows, bias, bias_rows, _ = block.part(part)
            rows = ~source.row_keep(block, keep, part)
            weight.data[weight_rows][rows] = 0.0
            if bias is not None:
                bias.data[bias_rows][rows] = 0.0
    return model


def test_a_head_plan_keeps_the_sources_options_and_the_pruned_head_count():
    from lightning_worm import apply_plan

    source = AttentionHeadSource(modules=["mix"], projections=("wq", "wk", "wv"), num_heads=2)
    model, x = SizedMixNet().eval(), torch.randn(2, 3, 8)
    ticket = {"mix": torch.tensor([True, False])}
    expected = zero_heads(model, ticket, source)(x)
    with pytest.warns(UserWarning, match="no attribute the head prune can fix"):
        report = prune_heads(model, ticket, x, source=source, measure_latency=False)
    assert_equal_up_to_rounding(model(x), expected)  # other matrix shapes: equal up to rounding
    block = source.tracked(model)["mix"]
    assert (block.num_heads, block.head_dim) == (1, 4)  # the pruned module's count, not the source's num_heads=2
    assert report.plan.options["source_options"] == {"modules": ["mix"], "projections": ["wq", "wk", "wv"],
                                                     "num_heads": 2}
    fresh = SizedMixNet(seed=1)
    apply_plan(fresh, json.loads(json.dumps(report.plan.to_dict())))  # no source given: the plan's own
    assert fresh.mix.wq.out_features == fresh.mix.o.in_features == 4
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize("case", ["vit", "packed", "bert", "llama-gqa"])
def test_removing_heads_equals_zeroing_them(case):
    if case == "vit":
        model, x = vit(), torch.randn(2, 3, 32, 32)
        ticket = {"blocks.0.attn": torch.tensor([True, False, True, False]),
                  "blocks.1.attn": torch.tensor([False, True, True, True])}
    elif case == "packed":
        model, x = PackedNet().eval(), torch.randn(2, 5, 16)
        ticket = {"attn": torch.tensor([False, True, True, False])}
    elif case == "bert":
        model, x = bert(), torch.randint(0, 50, (2, 10))
        ticket = {"model.bert.encoder.layer.0.attention.self": torch.tensor([True, False, True, False]),
                  "model.bert.encoder.layer.1.attention.self": torch.tensor([False, False, False, True])}
    else:  # grouped-query attention with rotary embeddings: a unit is a key/value head and its 2 query heads
        model, x = LastHidden(llama(kv_heads=2)), torch.randint(0, 50, (2, 10))
        ticket = {"model.layers.0.self_attn": torch.tensor([False, True])}
    expected = zero_heads(model, ticket)(x)
    report = prune_heads(model, ticket, example_input=x, measure_latency=False)
    assert_equal_up_to_rounding(model(x), expected)  # fewer heads: other matrix shapes and kernels
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    kept = {n: int(m.sum()) for n, m in ticket.items()}
    assert report.units_after == kept
    for name, block in AttentionHeadSource().tracked(model).items():
        assert block.num_kv_heads == kept[name] and block.num_heads == kept[name] * block.group_size


def test_bert_head_prune_fixes_the_modules_sizes_and_finds_the_output_projection():
    model, ids = bert(), torch.randint(0, 50, (2, 10))
    name = "model.bert.encoder.layer.0.attention.self"
    report = prune_heads(model, {name: torch.tensor([True, False, False, True])}, example_input=ids,
                         measure_latency=False)
    attention = model.model.bert.encoder.layer[0].attention
    assert (attention.self.num_attention_heads, attention.self.all_head_size) == (2, 16)
    assert attention.self.query.out_features == attention.output.dense.in_features == 16
    assert report.plan.pruned_groups[0][2] == "model.bert.encoder.layer.0.attention.output.dense"
    assert report.kept_indices[f"{name}.query.weight"][0].tolist() == list(range(8)) + list(range(24, 32))


def test_a_block_keeps_its_best_head_and_round_to():
    model = vit()
    scores = AttentionHeadSource().scores(AttentionHeadSource().tracked(model)["blocks.0.attn"])
    report = prune_heads(model, {"blocks.0.attn": torch.zeros(4, dtype=torch.bool)}, measure_latency=False)
    assert report.units_after["blocks.0.attn"] == 1 and report.kept_for_min_units == 1
    assert report.kept_indices["blocks.0.attn.q_proj.weight"][0].tolist() == list(
        range(8 * int(scores.argmax()), 8 * int(scores.argmax()) + 8))
    report = prune_heads(vit(), {"blocks.0.attn": torch.tensor([True, False, False, False])}, round_to=2,
                         measure_latency=False)
    assert report.units_after["blocks.0.attn"] == 2 and report.kept_for_round_to == 1


def test_plan_replays_bit_identically_and_refuses_what_does_not_fit():
    model, x = vit(), torch.randn(2, 3, 32, 32)
    report = prune_heads(model, {"blocks.0.attn": torch.tensor([True, False, True, False])}, measure_latency=False)
    plan = PruningPlan.from_dict(report.plan.to_dict())
    fresh = vit(seed=1)
    kept = apply_plan(fresh, plan)
    assert kept.keys() == report.kept_indices.keys()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))
    with pytest.raises(ValueError, match="already pruned"):
        apply_plan(fresh, plan)
    with pytest.raises(ValueError, match="lacks or does not recognise"):
        apply_plan(vit(depth=1), plan)


def test_apply_plan_dispatches_head_and_elementwise_plans():
    from lightning_worm import apply_plan

    model, x = vit(), torch.randn(2, 3, 32, 32)
    report = prune_heads(model, {"blocks.1.attn": torch.tensor([False, True, True, True])}, measure_latency=False)
    assert report.plan.kind == "heads"
    fresh = vit(seed=3)
    apply_plan(fresh, report.plan.to_dict())
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))
    dense = vit()
    with pytest.warns(UserWarning, match="saves no time"):
        report = prune_elementwise(dense, unit_mask(dense, 0.5, source=AttentionQKSource()), measure_latency=False)
    assert report.plan.kind == "elementwise"
    fresh = vit(seed=3)
    apply_plan(fresh, report.plan.to_dict())
    fresh.load_state_dict(dense.state_dict())
    assert torch.equal(fresh.eval()(x), dense(x))


def test_multihead_attention_heads_cannot_be_removed():
    model = encoder()
    with pytest.raises(NotImplementedError, match="AttentionQKSource") as error:
        prune_heads(model, {"layers.0.self_attn": torch.tensor([True, False, True, True])})
    assert str(error.value) == MHA_REFUSAL
    with pytest.raises(ValueError, match="'layers.0.self_attn', 'layers.1.self_attn'.*cannot lose heads"):
        check_prunable(model, AttentionHeadSource())
    assert check_prunable(vit(), AttentionHeadSource()).kind == "heads"  # separate projections: heads can go
    with pytest.raises(ValueError, match="LayerNormSource cannot remove channels"):
        check_prunable(vit(), LayerNormSource())


def test_bad_head_tickets_are_refused():
    with pytest.raises(ValueError, match="empty"):
        prune_heads(vit(), {})
    with pytest.raises(ValueError, match="not tracked attention blocks"):
        prune_heads(vit(), {"blocks.0": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has 3 heads"):
        prune_heads(vit(), {"blocks.0.attn": torch.ones(3, dtype=torch.bool)})


def zero_units(model, ticket, source):
    """The dense twin of a head prune, for any layout: the pruned units' q/k/v output features zeroed (rows of a
    Linear, columns of a Conv1D; wherever a packing puts them)."""
    model = copy.deepcopy(model)
    blocks = source.tracked(model)
    with torch.no_grad():
        for name, keep in ticket.items():
            block = blocks[name]
            for part in "qkv":
                weight, _, bias, bias_index, _ = block.part(part)
                features = torch.arange(weight.shape[block.out_dim(part)])[block.out_index(part)]
                gone = features[~source.row_keep(block, keep, part)]
                weight.index_fill_(block.out_dim(part), gone, 0.0)
                if bias is not None:
                    bias.index_fill_(0, gone, 0.0)
    return model


@pytest.mark.parametrize(("attention", "layout", "keep"), [
    (GPT2Attention, None, [True, False, True, False]),
    (Phi3Attention, None, [False, True]),
    (NeoXAttention, None, [False, True, True, False]),
    (InterleavedAttention, "per_head", [True, False, False, True]),
    (SwinAttention, None, [False, True, True, True]),
], ids=["gpt2-conv1d", "phi3-grouped-packed", "neox-per-head", "named-per-head", "swin-bias-table"])
def test_hugging_face_layouts_lose_heads_exactly_and_replay(attention, layout, keep):
    model, x = AttentionNet(attention).eval(), torch.randn(2, 5, 16)
    source, ticket = AttentionHeadSource(layout=layout), {"attn": torch.tensor(keep)}
    expected = zero_units(model, ticket, source)(x)
    with warnings.catch_warnings():
        # Every layout says its heads through an attribute the prune fixes. (The stand-in's bias table, a module
        # without tensor inputs whose output requires grad, fails torch's FLOP counter: a warning and None.)
        warnings.filterwarnings("error", message=".*no attribute the head prune can fix")
        report = prune_heads(model, ticket, x, source=source, measure_latency=False)
    with torch.no_grad():
        assert_equal_up_to_rounding(model(x), expected)
    assert report.units_after == {"attn": sum(keep)}
    block = source.tracked(model)["attn"]
    assert block.num_kv_heads == sum(keep) and block.packing == (layout or block.packing)
    if block.layout == "packed":
        assert report.plan.options["layouts"] == {"attn": block.packing}
    fresh = AttentionNet(attention)
    apply_plan(fresh, json.loads(json.dumps(report.plan.to_dict())))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_the_cut_fixes_conv1d_sizes_grouped_slices_and_bias_tables():
    model, x = AttentionNet(GPT2Attention).eval(), torch.randn(2, 5, 16)
    report = prune_heads(model, {"attn": torch.tensor([True, False, True, False])}, x, measure_latency=False)
    attn = model.attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (2, 8, 24, 8)
    assert attn.c_attn.weight.shape == (16, 24) and attn.c_proj.weight.shape == (8, 16)
    assert report.kept_indices["attn.c_attn.weight"][0] is None  # the columns (Conv1D: in x out)
    assert report.kept_indices["attn.c_proj.weight"][0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]

    shared = Config()
    model = AttentionNet(lambda: Phi3Attention(config=shared)).eval()
    prune_heads(model, {"attn": torch.tensor([False, True])}, x, measure_latency=False)
    attn = model.attn
    assert (attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.num_key_value_heads) == (2, 1, 1)
    assert (shared.num_attention_heads, shared.num_key_value_heads) == (4, 2)  # the other layers' config untouched
    assert attn.qkv_proj.out_features == 16 and attn.o_proj.in_features == 8

    model = AttentionNet(SwinAttention).eval()
    table = model.attn.relative_position_bias.relative_position_bias_table.detach().clone()
    report = prune_heads(model, {"attn": torch.tensor([False, True, False, True])}, x, measure_latency=False)
    assert torch.equal(model.attn.relative_position_bias.relative_position_bias_table, table[:, [1, 3]])
    assert report.kept_indices["attn.relative_position_bias.relative_position_bias_table"][1].tolist() == [1, 3]


def test_a_per_head_packing_taken_for_qkv_is_refused_and_the_layout_option_fixes_it():
    model, x = AttentionNet(InterleavedAttention).eval(), torch.randn(2, 5, 16)
    ticket = {"attn": torch.tensor([True, False, True, True])}
    with pytest.raises(PruningError, match=r"layout=\"per_head\""):
        prune_heads(model, ticket, x, measure_latency=False)  # "qkv" is recognised from the name: refused
    assert model.attn.qkv.out_features == 48  # left as it was
    prune_heads(model, ticket, x, source=AttentionHeadSource(layout="per_head"), measure_latency=False)
    assert model.attn.qkv.out_features == 36
