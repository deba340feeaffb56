"""Survey: Hugging Face transformer families (random small configs), their heads pruned by ``AttentionHeadSource``.

Each family is pruned right or refused before any change:

* ``pruned``: the trial (``check_prunable``, what ``PruneAndFinetune`` runs after the first batch) passes, a
  ticket that drops half the heads of every block prunes (checked by the library against the dense model with
  the removed heads zeroed), and ``apply_plan`` on a fresh instance plus ``load_state_dict`` reproduces the
  outputs bit for bit;
* ``refused``: ``check_prunable`` raises a ``PruningError`` naming the module and the reason, and the model is
  exactly as before (no family here is refused today).

Every family is found by ``AttentionHeadSource()`` alone: GPT-2's ``Conv1D`` projections, Phi-3's packed
grouped-query projection (sliced by its config's counts), GPT-NeoX's and GPT-BigCode's per-head packing, Swin's
per-head bias table, T5's bias shared by the layers of a stack (the ticket keeps other heads in consecutive
blocks, so each layer must select its own from it) and DeBERTa's disentangled attention (whose FLOPs torch's
counter cannot count: ``None`` with a warning). Families whose blocks would not be recognised are named by hand
in ``BY_HAND``, as a user would (``AttentionHeadSource(modules=..., projections=...)``). The README's
"Supported" section lists the outcomes.
"""

from __future__ import annotations

import copy
import warnings

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
        "phi3": lambda: t.Phi3Model(t.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0)),
        "deberta_v2": lambda: t.DebertaV2Model(t.DebertaV2Config(**SMALL, share_att_key=False, relative_attention=True,
                                                                 pos_att_type=["p2c", "c2p"],
                                                                 max_relative_positions=16)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=64)),
        "gpt_bigcode": lambda: t.GPTBigCodeModel(t.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                                    vocab_size=64, multi_query=False)),
    }


#: Blocks named by hand: the projections a user would name (none: every family here is recognised).
BY_HAND: dict[str, tuple[str, ...]] = {}

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
    pytest.param("t5", "pruned", None, id="t5"),
    pytest.param("swin", "pruned", None, id="swin"),
    pytest.param("gpt_neox", "pruned", None, id="gpt_neox"),
    pytest.param("phi3", "pruned", None, id="phi3"),
    pytest.param("deberta_v2", "pruned", None, id="deberta_v2"),
    pytest.param("gpt2", "pruned", None, id="gpt2"),
    pytest.param("gpt_bigcode", "pruned", None, id="gpt_bigcode"),
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
    # Half of every block's heads, other heads in consecutive blocks (T5's layers share one bias of all heads).
    ticket = {n: (torch.arange(b.num_kv_heads) + i) % 2 == 0 for i, (n, b) in enumerate(blocks.items())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune_heads(model, ticket, x, source=source, measure_latency=False)  # checked against zeroed heads
    if name == "deberta_v2":  # torch's FLOP counter fails on its disentangled attention: None and a warning
        assert report.flops_before is None and report.flops_after is None
        assert any("Counting the FLOPs" in str(w.message) for w in caught)
    else:
        assert report.flops_after < report.flops_before
    assert report.units_after == {n: int(keep.sum()) for n, keep in ticket.items()}
    assert report.params_after < report.params_before
    with torch.no_grad():
        out = model(x)
    fresh, _, _ = build(name)
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
