"""Carrying the kept units' optimizer state across a prune."""

import torch

from lightning_worm.core.surgery import (
    carry_optimizer_state,
    prune_channels,
)
from tests.helpers import global_ticket, randomize_batchnorms
from tests.models import TinyNet


def test_carry_optimizer_state_slices_the_kept_units_and_keeps_the_rest():
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyNet().train())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    optimizer.step()
    optimizer.param_groups[0]["lr"] = 0.05  # a schedule moved it
    before = dict(model.named_parameters())
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in before.items()}
    ticket = global_ticket(model)
    report = prune_channels(model, ticket, torch.randn(2, 3, 8, 8), measure_latency=False)
    after = dict(model.named_parameters())
    new = torch.optim.Adam(model.parameters(), lr=0.1)
    carry_optimizer_state(optimizer, new, before, after, report.kept_indices)
    assert new.param_groups[0]["lr"] == 0.05
    conv = "features.3.weight"
    out, inp = report.kept_indices[conv][:2]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new.state[after[conv]][key], old_state[conv][key][out][:, inp])
        assert torch.equal(new.state[after["classifier.bias"]][key], old_state["classifier.bias"][key])
    assert torch.equal(new.state[after[conv]]["step"], old_state[conv]["step"])

    fresh = torch.optim.Adam(model.parameters(), lr=0.1)
    carry_optimizer_state(optimizer, fresh, before, after, report.kept_indices, hyperparameters=False, state=False)
    assert fresh.param_groups[0]["lr"] == 0.1 and not fresh.state
