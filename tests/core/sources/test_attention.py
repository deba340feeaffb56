"""Attention sources: blocks recognised or named, masks named and shaped, truncation of exactly the masked units.

Tiny models only: the example ViT, an ``nn.TransformerEncoder``, a timm-style packed ``qkv`` block, and
random-config Hugging Face BERT and Llama models (built from a config, never downloaded).
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
    CustomNet,
    MHANet,
    PackedNet,
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
