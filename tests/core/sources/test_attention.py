"""Attention sources: blocks recognised or named, masks named and shaped, truncation of exactly the masked units.

Tiny models only: the example ViT, an ``nn.TransformerEncoder``, a timm-style packed ``qkv`` block,
random-config Hugging Face BERT and Llama models (built from a config, never downloaded), and stand-ins of the
Hugging Face layouts (GPT-2's Conv1D, Phi-3's grouped packing, GPT-NeoX's per-head packing, Swin's bias table).
"""

import pytest
import torch

from lightning_worm import (
    AttentionHeadSource,
    AttentionQKSource,
    GradientTruncation,
    LayerNormSource,
    unit_mask,
)
from lightning_worm.core.sources.attention import find_attention
from tests.models import (
    AttentionNet,
    CustomNet,
    GPT2Attention,
    MHANet,
    NeoXAttention,
    PackedNet,
    Phi3Attention,
    SwinAttention,
    bert,
    encoder,
    llama,
    vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recognises_bert_llama_packed_mha_and_the_vit():
    b = find_attention(bert())
    assert list(b) == [f"model.bert.encoder.layer.{i}.attention.self" for i in range(2)]
    first = b["model.bert.encoder.layer.0.attention.self"]
    assert (first.num_heads, first.head_dim) == (4, 8)
    grouped = find_attention(llama(kv_heads=2))["layers.0.self_attn"]
    assert (grouped.layout, grouped.num_heads, grouped.num_kv_heads, grouped.group_size) == ("separate", 4, 2, 2)
    packed = find_attention(PackedNet())["attn"]
    assert (packed.layout, packed.num_heads, packed.head_dim) == ("packed", 4, 4)
    mha = find_attention(encoder())
    assert list(mha) == ["layers.0.self_attn", "layers.1.self_attn"] and mha["layers.0.self_attn"].layout == "mha"
    assert list(find_attention(vit())) == ["blocks.0.attn", "blocks.1.attn"]


def test_masks_are_named_and_shaped_as_the_issue_says():
    qk = unit_mask(bert(), 0.5, source=AttentionQKSource())
    assert list(qk) == [f"model.bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")]
    assert all(m.shape == (32, 32) for m in qk.values())
    assert list(unit_mask(PackedNet(), 0.5, source=AttentionQKSource())) == ["attn.qkv:q", "attn.qkv:k"]
    assert list(unit_mask(encoder(), 0.5, source=AttentionQKSource()))[:2] == ["layers.0.self_attn:q",
                                                                                   "layers.0.self_attn:k"]
    heads = unit_mask(vit(), 0.5, source=AttentionHeadSource())
    assert {k: tuple(v.shape) for k, v in heads.items()} == {"blocks.0.attn": (4,), "blocks.1.attn": (4,)}
    assert unit_mask(llama(), 0.5, source=AttentionHeadSource())["layers.0.self_attn"].shape == (2,)  # kv groups
    ln = unit_mask(vit(), 0.5, source=LayerNormSource())
    assert list(ln) == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm"]


def test_user_named_modules_and_projections():
    assert AttentionHeadSource().tracked(CustomNet()) == {}
    source = AttentionHeadSource(modules=["mix"], projections=("wq", "wk", "wv"))
    assert source.skipped(CustomNet()) == {"mix": "head count not found: pass `num_heads=` to the source"}
    source = AttentionHeadSource(modules=["mix"], projections=("wq", "wk", "wv"), num_heads=2)
    assert source.count(source.tracked(CustomNet())["mix"]) == 2
    with pytest.raises(ValueError, match="lacks"):
        AttentionQKSource(modules=["nope"]).tracked(CustomNet())
    with pytest.raises(ValueError, match="projections="):
        AttentionQKSource(modules=["mix"]).tracked(CustomNet())
    with pytest.raises(ValueError, match="3 names"):
        AttentionQKSource(projections=("a", "b"))


def test_setup_summary_says_what_is_tracked():
    model = vit()
    model.blocks[1].attn.k_proj.weight.requires_grad_(False)
    line = AttentionQKSource().summary(model)
    assert line.startswith("tracking 3072 units (element-wise |W| of every self-attention query and key")
    assert "blocks.1.attn.k_proj (weight frozen" in line


def test_query_mask_is_the_querys_own_not_the_keys():
    """Reference bug 1: the query mask was overwritten by the key mask."""
    model = vit()
    with torch.no_grad():
        model.blocks[0].attn.k_proj.weight.copy_(-model.blocks[0].attn.q_proj.weight.flip(0))  # same values, elsewhere
    mask = unit_mask(model, 0.5, source=AttentionQKSource())
    scores = torch.cat([AttentionQKSource().scores(h).reshape(-1) for h in AttentionQKSource().tracked(model).values()])
    threshold = scores.kthvalue(scores.numel() // 2).values
    for name, entry in AttentionQKSource().tracked(model).items():
        own = entry.block.weight(entry.part).abs() > threshold
        assert torch.equal(mask[name], own), name
    q, k = mask["blocks.0.attn.q_proj"], mask["blocks.0.attn.k_proj"]
    assert not torch.equal(q, k) and torch.equal(q, k.flip(0))


@pytest.mark.parametrize("model_fn", [vit, PackedNet, encoder, bert], ids=["separate", "packed", "mha", "bert"])
def test_elementwise_truncation_touches_exactly_the_masked_qk_entries(model_fn):
    """Reference bug 2: its hooks scaled every parameter of the attention module by a wrong-shaped mask."""
    model = model_fn()
    source = AttentionQKSource()
    mask = unit_mask(model, 0.5, source=source)
    truncation = GradientTruncation(model, source)
    truncation.set(mask, chi=0.25)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    expected = {id(p): torch.ones_like(p) for p in model.parameters()}
    for name, entry in source.tracked(model).items():
        weight, rows, _, _, _ = entry.block.part(entry.part)
        expected[id(weight)][rows] = torch.where(mask[name], 1.0, 0.25)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[id(p)]), name
    assert truncation.truncated_units == mask.total - mask.kept


def test_head_truncation_scales_the_heads_qkv_rows_and_nothing_else():
    model = vit()
    source = AttentionHeadSource()
    keep = {"blocks.0.attn": torch.tensor([True, False, True, True]), "blocks.1.attn": torch.ones(4, dtype=torch.bool)}
    truncation = GradientTruncation(model, source)
    truncation.set(keep, chi=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    attn = model.blocks[0].attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert torch.equal(proj.weight.grad[8:16], torch.full((8, 32), 0.5))
        assert torch.equal(proj.bias.grad[8:16], torch.full((8,), 0.5))
        assert proj.weight.grad.sum() == 32 * 32 - 8 * 32 * 0.5
    touched = {id(p) for proj in (attn.q_proj, attn.k_proj, attn.v_proj) for p in proj.parameters()}
    for name, p in model.named_parameters():
        if id(p) not in touched:
            assert torch.equal(p.grad, torch.ones_like(p)), name


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 8, "vdim": 8}], ids=["packed in_proj", "separate q/k/v weights"])
def test_head_truncation_on_multihead_attention_scales_exactly_the_heads_rows(kwargs):
    """Head 1 of 4 (size 4): rows 4..7 of each of q, k, v, in ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
    ``in_proj_bias``; the output projection and the other heads untouched."""
    model, source = MHANet(**kwargs), AttentionHeadSource()
    truncation = GradientTruncation(model, source)
    truncation.set({"att": torch.tensor([True, False, True, True])}, chi=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    expected = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    for i, part in enumerate("qkv"):
        if kwargs:
            expected[f"att.{part}_proj_weight"][4:8] = 0.5
        else:
            expected["att.in_proj_weight"][16 * i + 4:16 * i + 8] = 0.5
        expected["att.in_proj_bias"][16 * i + 4:16 * i + 8] = 0.5
    assert {n for n, e in expected.items() if not e.eq(1).all()} == (
        {"att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight", "att.in_proj_bias"} if kwargs
        else {"att.in_proj_weight", "att.in_proj_bias"})
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    assert truncation.truncated_units == 1


def test_grouped_query_head_truncation_scales_whole_groups():
    model = llama(kv_heads=2)
    source = AttentionHeadSource()
    truncation = GradientTruncation(model, source)
    truncation.set({"layers.0.self_attn": torch.tensor([False, True])}, chi=0.0)
    attn = model.layers[0].self_attn
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    assert attn.q_proj.weight.grad[:16].eq(0).all() and attn.q_proj.weight.grad[16:].eq(1).all()  # 2 query heads
    for proj in (attn.k_proj, attn.v_proj):
        assert proj.weight.grad[:8].eq(0).all() and proj.weight.grad[8:].eq(1).all()
    assert attn.o_proj.weight.grad.eq(1).all()


# ----------------------------------------------------------------- Hugging Face layouts, as tiny stand-ins


def test_hugging_face_layouts_are_recognised_by_duck_typing():
    gpt2 = find_attention(AttentionNet(GPT2Attention))["attn"]
    assert (gpt2.layout, gpt2.packing, gpt2.projections, gpt2.num_heads, gpt2.head_dim) == (
        "packed", "qkv", ("c_attn",), 4, 4)
    assert gpt2.out_dim("q") == 1 and gpt2.weight("k").shape == (16, 16)  # Conv1D: the columns 16..31
    assert torch.equal(gpt2.weight("k"), gpt2.module.c_attn.weight.detach()[:, 16:32])
    phi3 = find_attention(AttentionNet(Phi3Attention))["attn"]
    assert (phi3.packing, phi3.num_heads, phi3.num_kv_heads, phi3.head_dim) == ("qkv", 4, 2, 4)
    assert [phi3.out_index(p) for p in "qkv"] == [slice(0, 16), slice(16, 24), slice(24, 32)]
    neox = find_attention(AttentionNet(NeoXAttention))["attn"]
    assert (neox.packing, neox.num_heads, neox.head_dim) == ("per_head", 4, 4)
    assert neox.out_index("k").tolist() == [r for h in range(4) for r in range(12 * h + 4, 12 * h + 8)]
    assert find_attention(AttentionNet(NeoXAttention), layout="qkv")["attn"].packing == "qkv"  # told otherwise
    swin = find_attention(AttentionNet(SwinAttention))["attn"]
    assert (swin.layout, swin.num_heads) == ("separate", 4)


def test_named_projections_that_do_not_fit_say_which():
    with pytest.raises(ValueError, match=r"projections \['qkv'\] must be children that are nn.Linear layers or "
                                         r"Conv1D.*\{'qkv': 'missing'\}.*\['c_attn', 'c_proj'\]"):
        AttentionHeadSource(modules=["attn"], projections=("qkv",)).tracked(AttentionNet(GPT2Attention))
    with pytest.raises(ValueError, match="`layout` must be one of"):
        AttentionHeadSource(layout="interleaved")
    assert AttentionHeadSource(layout="per_head").options()["layout"] == "per_head"
    assert "layout" not in AttentionHeadSource().options()  # plans written before the option read the same


def test_conv1d_heads_are_scored_by_columns_and_truncated_by_columns():
    model, source = AttentionNet(GPT2Attention), AttentionHeadSource()
    block = source.tracked(model)["attn"]
    w = model.attn.c_attn.weight.detach().abs()
    expected = (w[:, :16].reshape(16, 4, 4).sum((0, 2)) + w[:, 16:32].reshape(16, 4, 4).sum((0, 2))) / (2 * 4 * 16)
    torch.testing.assert_close(source.scores(block), expected)
    assert source.sparsity_parameters(block) == []  # the packed weight holds the values too
    truncation = GradientTruncation(model, source)
    truncation.set({"attn": torch.tensor([True, False, True, True])}, chi=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    columns = torch.ones(48)
    columns[[4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]] = 0.5  # head 1's columns of q, k and v
    assert torch.equal(model.attn.c_attn.weight.grad, columns.expand(16, 48))
    assert torch.equal(model.attn.c_attn.bias.grad, columns)
    assert all(p.grad.eq(1).all() for n, p in model.named_parameters() if not n.startswith("attn.c_attn"))


def test_elementwise_masks_of_a_conv1d_are_shaped_as_it_stores_them():
    model, source = AttentionNet(GPT2Attention), AttentionQKSource()
    mask = unit_mask(model, 0.5, source=source)
    assert {k: tuple(v.shape) for k, v in mask.items()} == {"attn.c_attn:q": (16, 16), "attn.c_attn:k": (16, 16)}
    truncation = GradientTruncation(model, source)
    truncation.set(mask, chi=0.0)
    model.attn.c_attn.weight.grad = torch.ones(16, 48)
    truncation.apply()
    grad = model.attn.c_attn.weight.grad
    assert torch.equal(grad[:, :16], mask["attn.c_attn:q"].float()) and grad[:, 32:].eq(1).all()


def test_grouped_packed_and_per_head_truncation_scale_exactly_the_units_rows():
    model, source = AttentionNet(Phi3Attention), AttentionHeadSource()
    truncation = GradientTruncation(model, source)
    truncation.set({"attn": torch.tensor([False, True])}, chi=0.0)  # key/value head 0 and its 2 query heads
    model.attn.qkv_proj.weight.grad = torch.ones(32, 16)
    truncation.apply()
    rows = model.attn.qkv_proj.weight.grad[:, 0]
    assert rows.eq(0).nonzero().flatten().tolist() == list(range(8)) + list(range(16, 20)) + list(range(24, 28))
    model = AttentionNet(NeoXAttention)
    truncation = GradientTruncation(model, source)
    truncation.set({"attn": torch.tensor([True, True, False, True])}, chi=0.0)  # head 2: rows 24..35
    model.attn.query_key_value.weight.grad = torch.ones(48, 16)
    truncation.apply()
    assert model.attn.query_key_value.weight.grad[:, 0].eq(0).nonzero().flatten().tolist() == list(range(24, 36))
