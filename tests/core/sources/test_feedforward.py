"""Feed-forward neurons as units: blocks found by duck typing, scores, WORM factors, sparsity, options."""

import json

import pytest
import torch
from torch import nn

from examples.vit import VisionTransformer
from lightning_worm import FeedForwardSource
from lightning_worm.core.sources import SOURCES, resolve_source
from lightning_worm.core.sources.feedforward import FeedForwardBlock, find_feedforward
from tests.models import GatedMlp, GPT2Mlp, Mlp, PackedMlp

pytestmark = pytest.mark.usefixtures("one_thread")

#: As the transformer zoo survey's (``tests/core/surgery/test_zoo_transformers.py``), which skips without transformers.
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "vocab_size": 64}


class Outputs(nn.Module):
    """The model's last hidden state (what a LightningModule would feed its head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


def _families() -> dict:
    t = pytest.importorskip("transformers")
    return {
        "bert": lambda: t.BertModel(t.BertConfig(**SMALL)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**SMALL, max_position_embeddings=32)),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(**SMALL, embedding_size=32)),
        "deberta_v2": lambda: t.DebertaV2Model(t.DebertaV2Config(**SMALL)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**SMALL, image_size=16, patch_size=4)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                   vocab_size=64)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(**SMALL, embedding_size=16)),  # one layer, shared
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**SMALL, num_key_value_heads=2)),
        "mistral": lambda: t.MistralModel(t.MistralConfig(**SMALL, num_key_value_heads=2)),
        "qwen2": lambda: t.Qwen2Model(t.Qwen2Config(**SMALL, num_key_value_heads=2)),
        "gemma": lambda: t.GemmaModel(t.GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8)),
        "phi3": lambda: t.Phi3Model(t.Phi3Config(**SMALL, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                                                 eos_token_id=2)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=64,
                                                 n_positions=32, bos_token_id=1, eos_token_id=2)),
        "gpt_neox": lambda: t.GPTNeoXModel(t.GPTNeoXConfig(**SMALL)),
        "bart": lambda: t.BartModel(t.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                 encoder_attention_heads=4, decoder_attention_heads=4,
                                                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                                                 max_position_embeddings=32)),
        "opt": lambda: t.OPTModel(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              ffn_dim=64, vocab_size=64, word_embed_proj_dim=32)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             image_size=16, patch_size=4)),
        "t5": lambda: t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                  vocab_size=64)),
        "t5_gated": lambda: t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                        vocab_size=64, feed_forward_proj="gated-gelu")),
    }


FAMILIES = ["bert", "roberta", "electra", "deberta_v2", "vit", "distilbert", "albert", "llama", "mistral", "qwen2",
            "gemma", "phi3", "gpt2", "gpt_neox", "bart", "opt", "clip", "t5", "t5_gated"]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A Hugging Face model of the family (random, seeded) and one input batch."""
    torch.manual_seed(0)
    model = Outputs(_families()[name]()).eval()
    generator = torch.Generator().manual_seed(1)
    if name in ("vit", "clip"):
        return model, torch.randn(2, 3, 16, 16, generator=generator)
    return model, torch.randint(3, 64, (2, 8), generator=generator)


def only(model, source=None):
    blocks = (source or FeedForwardSource()).tracked(model)
    assert len(blocks) == 1, blocks
    return next(iter(blocks.items()))


# ---------------------------------------------------------------------------------------------- discovery


transformers_layouts = [
    # family, the first block's name, inputs, output, transposed, packed
    ("bert", "model.encoder.layer.0", ("intermediate.dense",), "output.dense", False, 1),
    ("roberta", "model.encoder.layer.0", ("intermediate.dense",), "output.dense", False, 1),
    ("electra", "model.encoder.layer.0", ("intermediate.dense",), "output.dense", False, 1),
    ("deberta_v2", "model.encoder.layer.0", ("intermediate.dense",), "output.dense", False, 1),
    ("vit", "model.layers.0.mlp", ("fc1",), "fc2", False, 1),  # transformers 5's ViTMLP (older: as BERT's)
    ("distilbert", "model.transformer.layer.0.ffn", ("lin1",), "lin2", False, 1),
    ("albert", "model.encoder.albert_layer_groups.0.albert_layers.0", ("ffn",), "ffn_output", False, 1),
    ("llama", "model.layers.0.mlp", ("gate_proj", "up_proj"), "down_proj", False, 1),
    ("mistral", "model.layers.0.mlp", ("gate_proj", "up_proj"), "down_proj", False, 1),
    ("qwen2", "model.layers.0.mlp", ("gate_proj", "up_proj"), "down_proj", False, 1),
    ("gemma", "model.layers.0.mlp", ("gate_proj", "up_proj"), "down_proj", False, 1),
    ("phi3", "model.layers.0.mlp", ("gate_up_proj",), "down_proj", False, 2),
    ("gpt2", "model.h.0.mlp", ("c_fc",), "c_proj", True, 1),
    ("gpt_neox", "model.layers.0.mlp", ("dense_h_to_4h",), "dense_4h_to_h", False, 1),
    ("bart", "model.encoder.layers.0", ("fc1",), "fc2", False, 1),
    ("opt", "model.decoder.layers.0", ("fc1",), "fc2", False, 1),
    ("clip", "model.encoder.layers.0.mlp", ("fc1",), "fc2", False, 1),
    ("t5", "model.encoder.block.0.layer.1.DenseReluDense", ("wi",), "wo", False, 1),
    ("t5_gated", "model.encoder.block.0.layer.1.DenseReluDense", ("wi_0", "wi_1"), "wo", False, 1),
]


@pytest.mark.parametrize(("family", "first", "inputs", "output", "transposed", "packed"), transformers_layouts,
                         ids=[case[0] for case in transformers_layouts])
def test_hugging_face_feed_forward_layouts_are_found(family, first, inputs, output, transposed, packed):
    model, _ = build(family)
    blocks = FeedForwardSource().tracked(model)
    assert FeedForwardSource().skipped(model) == {}
    assert len(blocks) == (1 if family == "albert" else 2)  # ALBERT shares one layer; bart: encoder + decoder
    block = blocks[first]
    assert (block.inputs, block.output, block.transposed, block.packed) == (inputs, output, transposed, packed)
    assert block.num_neurons == 64
    # Never an attention module (whose own output.dense is a sibling of its self-attention).
    assert not any(".attention" in name or "attn" in name.rsplit(".", 1)[-1] for name in blocks)


def test_every_family_of_the_surgery_survey_is_a_layout_here():
    assert sorted(case[0] for case in transformers_layouts) == sorted(FAMILIES)


def test_plain_torch_blocks_are_found():
    name, block = only(nn.Sequential(Mlp()))
    assert (name, block.inputs, block.output, block.num_neurons) == ("0", ("fc1",), "fc2", 16)
    vit = VisionTransformer(dim=16, depth=3, num_heads=2)
    blocks = FeedForwardSource().tracked(vit)
    assert list(blocks) == [f"blocks.{i}.mlp" for i in range(3)]
    assert (blocks["blocks.0.mlp"].inputs, blocks["blocks.0.mlp"].output, blocks["blocks.0.mlp"].num_neurons) == (
        ("0",), "2", 32)
    assert only(GPT2Mlp())[1].transposed
    assert only(PackedMlp())[1].packed == 2
    assert only(GatedMlp())[1].inputs == ("gate_proj", "up_proj")


@pytest.mark.parametrize("middle", [[nn.Softmax(-1)], [nn.LayerNorm(16)], [nn.PReLU(16)],
                                    [nn.GELU(), nn.Linear(16, 16)]],
                         ids=["softmax", "layernorm", "prelu", "three-linears"])
def test_a_sequential_with_anything_but_elementwise_modules_between_its_linears_is_no_block(middle):
    model = nn.Sequential(nn.Linear(8, 16), *middle, nn.Linear(16, 8))
    assert find_feedforward(model) == {}


def test_a_normalisation_over_the_neurons_is_left_out_with_the_reason():
    model = nn.Sequential(Mlp(norm=True))
    assert FeedForwardSource().tracked(model) == {}
    assert "'norm.weight' has the neurons' width (16)" in FeedForwardSource().skipped(model)["0"]


def test_a_linear_is_part_of_one_block_at_most():
    class Twice(nn.Module):  # fc1/fc2 and a Sequential around the same Linear layers
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
            self.seq = nn.Sequential(self.fc1, nn.ReLU(), self.fc2)

    assert list(FeedForwardSource().tracked(Twice())) == [""]


def test_blocks_named_by_hand_and_refusals():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in, self.w_out, self.w_odd = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(12, 8)

    model = nn.Sequential(Custom(), Custom())
    assert FeedForwardSource().tracked(model) == {}  # unknown names
    source = FeedForwardSource(modules=["1"], inputs=("w_in",), output="w_out")
    assert list(source.tracked(model)) == ["1"]
    assert list(FeedForwardSource(inputs=["w_in"], output="w_out").tracked(model)) == ["0", "1"]
    with pytest.raises(ValueError, match="lacks"):
        FeedForwardSource(modules=["2"]).tracked(model)
    with pytest.raises(ValueError, match=r"'0' \(Custom\) is not a feed-forward block.*inputs="):
        FeedForwardSource(modules=["0"]).tracked(model)
    with pytest.raises(ValueError, match="has no child 'w_mid'"):
        FeedForwardSource(modules=["0"], inputs=("w_mid",), output="w_out").tracked(model)
    with pytest.raises(ValueError, match="have 16 outputs, which do not fit the 12 inputs of 'w_odd'"):
        FeedForwardSource(modules=["0"], inputs=("w_in",), output="w_odd").tracked(model)
    with pytest.raises(ValueError, match="input projections \\['w_in', 'w_out'\\] differ in shape"):
        FeedForwardSource(modules=["0"], inputs=("w_in", "w_out"), output="w_out").tracked(model)
    with pytest.raises(ValueError, match="together"):
        FeedForwardSource(inputs=("w_in",))
    with pytest.raises(ValueError, match="`inputs` must hold 1 or 2 names"):
        FeedForwardSource(inputs=("a", "b", "c"), output="d")
    with pytest.raises(ValueError, match="`output` must be None or a child path"):
        FeedForwardSource(inputs=("a",), output=["d"])


def test_options_repr_and_registration():
    source = FeedForwardSource(modules=["0"], inputs=("w_in",), output="w_out")
    options = json.loads(json.dumps(source.options()))
    assert options == {"modules": ["0"], "inputs": ["w_in"], "output": "w_out"}
    assert FeedForwardSource(**options).options() == options
    assert repr(source) == "FeedForwardSource(modules=['0'], inputs=('w_in',), output='w_out')"
    assert repr(FeedForwardSource()) == "FeedForwardSource()"
    assert SOURCES["ffn_neurons"] is FeedForwardSource and isinstance(resolve_source("ffn_neurons"), FeedForwardSource)


# ---------------------------------------------------------------------------------------------- scores


def expected_scores(inputs, output):
    """Mean |W| per neuron over its rows of the ``out x in`` input weights and its column of the output weight."""
    sums = sum(w.abs().sum(dim=1) for w in inputs) + output.abs().sum(dim=0)
    return sums / (sum(w.shape[1] for w in inputs) + output.shape[0])


def test_scores_are_the_mean_absolute_weight_of_each_neuron():
    torch.manual_seed(0)
    mlp = Mlp()
    _, block = only(nn.Sequential(mlp))
    torch.testing.assert_close(FeedForwardSource().scores(block), expected_scores([mlp.fc1.weight], mlp.fc2.weight))
    gated = GatedMlp()
    torch.testing.assert_close(FeedForwardSource().scores(only(gated)[1]),
                               expected_scores([gated.gate_proj.weight, gated.up_proj.weight], gated.down_proj.weight))
    packed = PackedMlp()
    gate, up = packed.gate_up_proj.weight.chunk(2)
    torch.testing.assert_close(FeedForwardSource().scores(only(packed)[1]),
                               expected_scores([gate, up], packed.down_proj.weight))
    gpt2 = GPT2Mlp()
    torch.testing.assert_close(FeedForwardSource().scores(only(gpt2)[1]),
                               expected_scores([gpt2.c_fc.weight.T], gpt2.c_proj.weight.T))
    scores = FeedForwardSource().scores(only(Mlp().to(torch.bfloat16))[1])
    assert scores.dtype == torch.float32 and scores.shape == (16,)


def test_scores_gather_only_one_sum_per_row_or_column(monkeypatch):
    """Under FSDP2 ``whole`` gathers a DTensor: it must only ever see per-row (column) sums, never a weight."""
    import lightning_worm.core.sources.feedforward as feedforward

    seen = []

    def spy(tensor):
        seen.append(tuple(tensor.shape))
        return tensor

    monkeypatch.setattr(feedforward, "whole", spy)
    FeedForwardSource().scores(only(PackedMlp())[1])
    FeedForwardSource().scores(only(GPT2Mlp())[1])
    assert seen == [(32,), (16,), (16,), (16,)]


# ---------------------------------------------------------------------------------------------- WORM, sparsity


def truncated(model, keep, chi=0.25):
    """Every parameter's gradient of ones after the source's factors: what WORM leaves of it."""
    _, block = only(model)
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    by_id = {id(p): n for n, p in model.named_parameters()}
    pairs = FeedForwardSource().gradient_factors(block, keep, chi)
    assert len({id(p) for p, _ in pairs}) == len(pairs)  # one factor per parameter
    for param, factor in pairs:
        name = by_id[id(param)]
        grads[name] = grads[name] * factor
    return grads


def test_worm_factors_hit_exactly_the_pruned_neurons_rows_and_columns():
    keep = torch.ones(16, dtype=torch.bool)
    keep[[1, 5, 6]] = False
    chi = torch.tensor(0.25)
    rows = torch.where(keep, 1.0, chi)

    grads = truncated(nn.Sequential(Mlp()), keep)
    assert torch.equal(grads["0.fc1.weight"], rows[:, None].expand(16, 8))
    assert torch.equal(grads["0.fc1.bias"], rows)
    assert torch.equal(grads["0.fc2.weight"], rows[None, :].expand(8, 16))
    assert torch.equal(grads["0.fc2.bias"], torch.ones(8))  # the output bias is no neuron's

    grads = truncated(GPT2Mlp(), keep)  # Conv1D: weights are in x out
    assert torch.equal(grads["c_fc.weight"], rows[None, :].expand(8, 16))
    assert torch.equal(grads["c_fc.bias"], rows)
    assert torch.equal(grads["c_proj.weight"], rows[:, None].expand(16, 8))
    assert torch.equal(grads["c_proj.bias"], torch.ones(8))

    grads = truncated(PackedMlp(), keep)  # both halves of [gate | up]
    assert torch.equal(grads["gate_up_proj.weight"], torch.cat([rows, rows])[:, None].expand(32, 8))
    assert torch.equal(grads["down_proj.weight"], rows[None, :].expand(8, 16))

    grads = truncated(GatedMlp(), keep)
    for name in ("gate_proj.weight", "up_proj.weight"):
        assert torch.equal(grads[name], rows[:, None].expand(16, 8))

    with pytest.raises(ValueError, match="A mask of 3 neurons does not fit"):
        FeedForwardSource().gradient_factors(only(GatedMlp())[1], torch.ones(3, dtype=torch.bool), 0.1)


def test_frozen_projections_are_left_out_and_not_truncated():
    mlp = Mlp()
    mlp.fc1.bias.requires_grad_(False)
    block = only(nn.Sequential(mlp))[1]
    factors = FeedForwardSource().gradient_factors(block, torch.ones(16, dtype=torch.bool), 0.1)
    assert [p is mlp.fc1.bias for p, _ in factors] == [False] * 2
    mlp.fc2.weight.requires_grad_(False)
    assert FeedForwardSource().skipped(nn.Sequential(mlp)) == {"0": "weight frozen (requires_grad=False)"}


def test_sparsity_regularises_the_input_projection_weights():
    mlp = Mlp()
    assert FeedForwardSource().sparsity_parameters(only(nn.Sequential(mlp))[1]) == [mlp.fc1.weight]
    gated = GatedMlp()
    assert FeedForwardSource().sparsity_parameters(only(gated)[1]) == [gated.gate_proj.weight, gated.up_proj.weight]
    packed = PackedMlp()  # all the rows of [gate | up] are neurons': regularised as a whole
    assert FeedForwardSource().sparsity_parameters(only(packed)[1]) == [packed.gate_up_proj.weight]


def test_the_handle_names_every_parameter_a_neuron_owns():
    block = only(GPT2Mlp())[1]
    assert isinstance(block, FeedForwardBlock)
    assert [(path, dim, is_input) for path, _, dim, is_input in block.parameters()] == [
        ("c_fc.weight", 1, True), ("c_fc.bias", 0, True), ("c_proj.weight", 0, False)]
    assert block.positions(torch.tensor([0, 3])).tolist() == [0, 3]
    assert only(PackedMlp())[1].positions(torch.tensor([0, 3])).tolist() == [0, 3, 16, 19]


def test_under_fsdp2_the_scores_and_the_worm_factors_match_the_unsharded_model(one_rank_mesh):
    """A one-rank FSDP2 mesh: every weight a DTensor; the scores gathered whole, the factors split like the shards."""
    from torch.distributed.fsdp import fully_shard

    from lightning_worm.core.masks import unit_mask, unit_scores
    from lightning_worm.core.sharding import is_sharded, whole
    from lightning_worm.core.truncation import GradientTruncation

    def make():
        torch.manual_seed(0)
        return nn.Sequential(Mlp(), GPT2Mlp(), PackedMlp())

    plain, sharded = make(), fully_shard(make(), mesh=one_rank_mesh)
    assert is_sharded(sharded[1].c_fc.weight)
    source = FeedForwardSource()
    scores = unit_scores(sharded, source)
    assert not any(is_sharded(s) for s in scores.values())
    for name, value in unit_scores(plain, source).items():
        torch.testing.assert_close(scores[name], value)
    mask = unit_mask(plain, 0.5, source=source)
    x = torch.randn(2, 5, 8)
    grads = []
    for model in (plain, sharded):
        model.zero_grad()
        model(x).square().mean().backward()
        truncation = GradientTruncation(model, source)
        truncation.set(mask, chi=0.01)
        truncation.apply()
        grads.append([whole(p.grad) for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a)
