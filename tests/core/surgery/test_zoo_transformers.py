"""Survey: Hugging Face transformer families (random small configs), their heads pruned by ``AttentionHeadSource``.

Each family is pruned right or refused before any change:

* ``pruned``: the trial (``check_prunable``, what ``PruneAndFinetune`` runs after the first batch) passes, a
  ticket that drops half the heads of every block prunes (checked by the library against the dense model with
  the removed heads zeroed), and ``apply_plan`` on a fresh instance plus ``load_state_dict`` reproduces the
  outputs bit for bit;
* ``refused``: ``check_prunable`` raises a ``PruningError`` naming the module and the reason, and the model is
  exactly as before (a per-head relative-position bias, slice sizes from a config, GPT-NeoX's per-head packed
  layout, DeBERTa's disentangled attention).

Families whose blocks are not recognised automatically are named by hand, as a user would
(``AttentionHeadSource(modules=..., projections=...)``). The README's "Supported" section lists the outcomes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_worm import AttentionHeadSource, PruningError, check_prunable
from lightning_worm.core.surgery import apply_plan, prune_heads

transformers = pytest.importorskip("transformers")
slow = pytest.mark.slow

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
         "vocab_size": 64}


def _configs() -> dict:
    t = transformers
    return {
        "bert": lambda: t.BertModel(t.BertConfig(**SMALL)),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**SMALL, max_position_embeddings=32)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                   vocab_size=64)),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(**SMALL, embedding_size=32)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(**SMALL, embedding_size=16)),  # one block, shared
        "llama": lambda: t.LlamaModel(t.LlamaConfig(**SMALL, num_key_value_heads=2)),
        "mistral": lambda: t.MistralModel(t.MistralConfig(**SMALL, num_key_value_heads=2)),
        "qwen2": lambda: t.Qwen2Model(t.Qwen2Config(**SMALL, num_key_value_heads=2)),
        "opt": lambda: t.OPTModel(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              ffn_dim=64, vocab_size=64, word_embed_proj_dim=32)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**SMALL, image_size=16, patch_size=4)),
        "t5": lambda: t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                  vocab_size=64)),
        "swin": lambda: t.SwinModel(t.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1],
                                                 num_heads=[2, 4], window_size=4)),
        "gpt_neox": lambda: t.GPTNeoXModel(t.GPTNeoXConfig(**SMALL)),
        "phi3": lambda: t.Phi3Model(t.Phi3Config(**SMALL, num_key_value_heads=4, pad_token_id=0)),
        "deberta_v2": lambda: t.DebertaV2Model(t.DebertaV2Config(**SMALL, share_att_key=False, relative_attention=True,
                                                                 pos_att_type=["p2c", "c2p"],
                                                                 max_relative_positions=16)),
    }


#: Blocks named by hand: the projections a user would name (GPT-NeoX and Phi-3 pack them).
BY_HAND = {"gpt_neox": ("query_key_value",), "phi3": ("qkv_proj",), "deberta_v2": ("query_proj", "key_proj",
                                                                                  "value_proj")}

FAMILIES = [
    pytest.param("bert", "pruned", None, id="bert"),
    pytest.param("roberta", "pruned", None, id="roberta"),
    pytest.param("distilbert", "pruned", None, id="distilbert"),
    pytest.param("electra", "pruned", None, id="electra"),
    pytest.param("albert", "pruned", None, id="albert"),
    pytest.param("llama", "pruned", None, id="llama"),
    pytest.param("mistral", "pruned", None, id="mistral"),
    pytest.param("qwen2", "pruned", None, id="qwen2"),
    pytest.param("opt", "pruned", None, id="opt"),
    pytest.param("vit", "pruned", None, id="vit"),
    pytest.param("t5", "refused", r"forward failed after pruning in '.*SelfAttention' \(T5Attention\)", id="t5"),
    pytest.param("swin", "refused", r"forward failed after pruning in '.*attention' \(SwinAttention\)",
                 id="swin"),
    pytest.param("gpt_neox", "refused", r"removed heads zeroed give a relative difference.*first differ at "
                 r"'model.layers.0.attention.dense'", id="gpt_neox"),
    pytest.param("phi3", "refused", r"forward failed after pruning in '.*self_attn.o_proj' \(Linear\)", id="phi3"),
    pytest.param("deberta_v2", "refused", r"forward failed after pruning in '.*attention.self' "
                 r"\(DisentangledSelfAttention\)", id="deberta_v2"),
]


class Outputs(nn.Module):
    """The model's last hidden state (what a LightningModule would feed its head)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state


def build(name: str) -> tuple[nn.Module, AttentionHeadSource, torch.Tensor]:
    torch.manual_seed(0)
    model = Outputs(_configs()[name]()).eval()
    projections = BY_HAND.get(name)
    if projections is None:
        source = AttentionHeadSource()
    else:
        modules = [n for n, m in model.named_modules() if all(hasattr(m, p) for p in projections)]
        source = AttentionHeadSource(modules=modules, projections=projections)
    generator = torch.Generator().manual_seed(1)
    if name in ("vit", "swin"):
        x = torch.randn(2, 3, 16, 16, generator=generator)
    else:
        x = torch.randint(0, 64, (2, 8), generator=generator)
    return model, source, x


@pytest.mark.parametrize(("name", "outcome", "refusal"), FAMILIES)
def test_transformer_family(name, outcome, refusal):
    model, source, x = build(name)
    assert source.tracked(model)
    state = copy.deepcopy(model.state_dict())
    if outcome == "refused":
        with pytest.raises(PruningError, match=rf"cannot be pruned by AttentionHeadSource.*{refusal}"):
            check_prunable(model, source, x, ratio=0.5)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        return

    check_prunable(model, source, x, ratio=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the trial is undone
    blocks = source.tracked(model)
    ticket = {n: torch.arange(b.num_kv_heads) % 2 == 0 for n, b in blocks.items()}  # half of every block's heads
    report = prune_heads(model, ticket, x, source=source, measure_latency=False)  # checked against zeroed heads
    assert report.units_after == {n: (b + 1) // 2 for n, b in report.units_before.items()}
    assert report.params_after < report.params_before
    with torch.no_grad():
        out = model(x)
    fresh, _, _ = build(name)
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
