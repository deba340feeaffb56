"""Element-wise query/key tickets: fixed zeros that survive training and reload."""

import pytest
import torch

from lightning_worm import (
    AttentionQKSource,
    unit_mask,
)
from lightning_worm.core.surgery import PruningPlan, apply_plan
from lightning_worm.core.surgery.elementwise import ELEMENTWISE_NOTE, prune_elementwise
from lightning_worm.core.surgery.heads import prune_heads
from tests.models import (
    PackedNet,
    encoder,
    vit,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_final_prune_honours_the_ticket():
    """Reference bug 3: its final step was 50 % unstructured L1 on every Linear, ignoring the ticket."""
    model = vit()
    source = AttentionQKSource()
    ticket = unit_mask(model, 0.5, source=source)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="saves no time and no memory"):
        report = prune_elementwise(model, ticket, source=source, measure_latency=False)
    for name, entry in source.tracked(model).items():
        linear = entry.block.linear(entry.part)
        assert torch.equal(linear.weight == 0, ~ticket[name]), name
    untouched = [n for n in before if not n.endswith(("q_proj.weight", "k_proj.weight"))]
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], before[n]) for n in untouched)  # values, biases, MLPs, head: as they were
    assert report.ticket_pruned == report.pruned_from_ticket == ticket.total - ticket.kept
    assert report.params_after == report.params_before  # nothing removed: no time saved
    assert report.note == report.to_dict()["note"] == ELEMENTWISE_NOTE and "saves no time" in report.note

    heads = vit()
    head_ticket = {"blocks.0.attn": torch.tensor([True, False, True, False]),
                   "blocks.1.attn": torch.tensor([True, True, False, True])}
    report = prune_heads(heads, head_ticket, measure_latency=False)
    assert report.units_after == {"blocks.0.attn": 2, "blocks.1.attn": 3}
    assert report.note is None and "note" not in report.to_dict()
    assert report.plan.pruned_groups == [["blocks.0.attn", [1, 3], "blocks.0.attn.out_proj"],
                                         ["blocks.1.attn", [2], "blocks.1.attn.out_proj"]]


@pytest.mark.parametrize("model_fn", [vit, PackedNet, encoder], ids=["separate", "packed", "mha"])
def test_elementwise_ticket_survives_training_and_reloads_through_the_plan(model_fn):
    model = model_fn()
    x = torch.randn(2, 5, 16) if model_fn is not vit else torch.randn(2, 3, 32, 32)
    source = AttentionQKSource()
    ticket = unit_mask(model, 0.5, source=source)
    with pytest.warns(UserWarning, match="saves no time"):
        report = prune_elementwise(model, ticket, source=source, measure_latency=False)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    for name, entry in source.tracked(model).items():
        assert entry.block.weight(entry.part)[~ticket[name]].eq(0).all(), name  # still exact zeros
    fresh = model_fn()
    apply_plan(fresh, PruningPlan.from_dict(report.plan.to_dict()))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))
