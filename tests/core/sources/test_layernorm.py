"""LayerNorm and RMSNorm channels: scores (Gemma-style 1 + weight) and truncation."""

import pytest
import torch
from torch import nn

from lightning_worm import (
    GradientTruncation,
    LayerNormSource,
    unit_mask,
)
from tests.models import (
    Norms,
    vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layernorm_truncation_scales_exactly_the_masked_channels_weight_and_bias():
    model, source = vit(), LayerNormSource()
    keep = {name: torch.ones(32, dtype=torch.bool) for name in source.tracked(model)}
    keep["blocks.0.norm2"][[3, 17]] = False
    keep["norm"][0] = False
    truncation = GradientTruncation(model, source)
    truncation.set(keep, chi=0.25)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    truncation.apply()
    expected = {name: torch.ones_like(p) for name, p in model.named_parameters()}
    for norm, channels in (("blocks.0.norm2", [3, 17]), ("norm", [0])):
        for param in ("weight", "bias"):
            expected[f"{norm}.{param}"][channels] = 0.25
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    assert truncation.truncated_units == 3


def test_gemma_style_rmsnorm_is_scored_by_one_plus_its_weight():
    model, source = Norms(), LayerNormSource()
    assert list(source.tracked(model)) == ["gemma", "plain", "ln"]
    assert source.scores(model.gemma).tolist() == [0.0, 0.5, 1.0, 1.5]  # |1 + w|: w = -1 is the channel off
    assert source.scores(model.plain).tolist() == source.scores(model.ln).tolist() == [1.0, 0.5, 0.0, 0.5]
    assert source.sparsity_parameters(model.gemma) == []  # sign(w) would pull the scale to 1, not 0
    assert source.sparsity_parameters(model.ln) == [model.ln.weight]
    mask = unit_mask(nn.ModuleDict({"gemma": model.gemma}), 0.25, source=source)
    assert mask["gemma"].tolist() == [False, True, True, True]
    model.plain.worm_scale_offset = 1.0  # the attribute decides over the code
    assert source.scores(model.plain).tolist() == [0.0, 0.5, 1.0, 1.5]
    # Without readable code, a Gemma-named norm is left out with the fix until it says its convention; others
    # scale by weight.
    namespace = {}
    exec("def forward(self, x):\n    return x * (1.0 + self.weight)", {}, namespace)
    unread = type("UnreadGemmaRMSNorm", (nn.Module,), {"forward": namespace["forward"]})()
    plain = type("UnreadRMSNorm", (nn.Module,), {"forward": namespace["forward"]})()
    unread.weight, plain.weight = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.full((4,), 0.5))
    holder = nn.ModuleDict({"unread": unread, "plain": plain})
    assert "worm_scale_offset = 1.0" in source.skipped(holder)["unread"] and list(source.tracked(holder)) == ["plain"]
    assert source.scores(plain).tolist() == [0.5] * 4
    unread.worm_scale_offset = 1.0
    assert source.scores(source.tracked(holder)["unread"]).tolist() == [1.0] * 4


def test_transformers_gemma_rmsnorm_is_scored_by_one_plus_its_weight():
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    llama_norm = pytest.importorskip("transformers.models.llama.modeling_llama").LlamaRMSNorm(4)
    norm = gemma.GemmaRMSNorm(4)  # a module, no weights downloaded
    norm.weight.data = torch.tensor([-1.0, -0.5, 0.0, 0.5])
    llama_norm.weight.data = norm.weight.data.clone()
    assert LayerNormSource().scores(norm).tolist() == [0.0, 0.5, 1.0, 1.5]
    assert LayerNormSource().scores(llama_norm).tolist() == [1.0, 0.5, 0.0, 0.5]
