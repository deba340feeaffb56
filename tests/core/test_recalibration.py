"""BatchNorm re-calibration and the random-ticket control (lightning_worm.core.recalibration)."""

import itertools

import pytest
import torch
from torch import nn

from lightning_worm.core.recalibration import random_ticket, recalibrate_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                        nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 6, 2))
    with torch.no_grad():  # stale statistics, as after a prune
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.fill_(5.0)
                m.running_var.fill_(7.0)
                m.num_batches_tracked.fill_(123)
    return net


def _batches(n=3, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 2, 8, generator=g) * 2 + 1, torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def test_running_statistics_are_the_average_over_the_batches():
    net = _net().eval()
    batches = _batches()
    assert recalibrate_batchnorm(net, batches) == 3
    # By hand: the first BN sees conv1's output; momentum=None gives the plain average of the batch means and
    # of the unbiased batch variances.
    conv = net[0]
    with torch.no_grad():
        outs = [conv(x) for x, _ in batches]
    means = torch.stack([o.mean(dim=(0, 2)) for o in outs]).mean(0)
    variances = torch.stack([o.var(dim=(0, 2), unbiased=True) for o in outs]).mean(0)
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert int(bn.num_batches_tracked) == 3


def test_modes_momentum_and_gradients_are_untouched():
    net = _net()
    net.train()
    net[3].eval()  # a mixed state must come back as it was
    modes = [m.training for m in net.modules()]
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    recalibrate_batchnorm(net, _batches())
    assert [m.training for m in net.modules()] == modes
    assert net[1].momentum == 0.3 and net[5].momentum == 0.1
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n])


def test_max_batches_islice_and_custom_forward():
    net = _net()
    batches = _batches(5)
    assert recalibrate_batchnorm(net, batches, max_batches=2) == 2
    assert int(net[1].num_batches_tracked) == 2
    assert recalibrate_batchnorm(net, itertools.islice(iter(batches), 4)) == 4
    seen = []
    used = recalibrate_batchnorm(net, [{"x": x} for x, _ in batches],
                                 forward=lambda model, batch: seen.append(1) or model(batch["x"]))
    assert used == len(seen) == 5


def test_bad_input_is_named_and_leaves_the_statistics_as_they_were():
    net = _net()
    with pytest.raises(ValueError, match="yielded no batch"):
        recalibrate_batchnorm(net, [])
    with pytest.raises(TypeError, match="forward="):
        recalibrate_batchnorm(net, [{"x": torch.randn(4, 2, 8)}])
    assert float(net[1].running_mean[0]) == 5.0 and int(net[1].num_batches_tracked) == 123
    assert net[1].momentum == 0.3
    with pytest.raises(ValueError, match="max_batches"):
        recalibrate_batchnorm(net, _batches(), max_batches=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recalibrate_batchnorm(nn.Linear(2, 2), _batches())


def test_recalibration_rescues_a_pruned_network():
    """After a real prune, recalibrated statistics match the pruned network's own activations."""
    from lightning_worm.core.surgery import prune_channels

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3))
    batches = [torch.randn(32, 1, 12) for _ in range(4)]
    recalibrate_batchnorm(net, batches)
    ticket = {"1": torch.arange(8) % 2 == 0, "4": torch.ones(8, dtype=torch.bool)}
    prune_channels(net, ticket, batches[0], measure_latency=False)
    assert net[4].running_mean.shape == (8,) and net[1].num_features == 4
    recalibrate_batchnorm(net, batches)
    net.train()  # each batch normalised by its own statistics, as during the re-calibration
    with torch.no_grad():
        means = torch.stack([net[:4](x).mean(dim=(0, 2)) for x in batches]).mean(0)
    torch.testing.assert_close(net[4].running_mean, means)


def test_random_ticket_keeps_the_counts_per_entry():
    g = torch.Generator().manual_seed(0)
    ticket = {"a": torch.rand(50, generator=g) > 0.3, "b": torch.rand(4, 6, generator=g) > 0.5,
              "c": torch.zeros(3, dtype=torch.bool)}
    drawn = random_ticket(ticket, 0)
    assert list(drawn) == list(ticket)
    for name in ticket:
        assert drawn[name].dtype == torch.bool and drawn[name].shape == ticket[name].shape
        assert int(drawn[name].sum()) == int(ticket[name].sum())
    assert not torch.equal(drawn["a"], ticket["a"])  # 50 channels: a random draw is not the ticket


def test_random_ticket_is_reproducible_and_varies_with_the_seed():
    ticket = {"a": torch.arange(40) < 17, "b": torch.arange(30) >= 5}
    first, again, other = random_ticket(ticket, 3), random_ticket(ticket, 3), random_ticket(ticket, 4)
    assert all(torch.equal(first[n], again[n]) for n in ticket)
    assert any(not torch.equal(first[n], other[n]) for n in ticket)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert all(torch.equal(x, y) for x, y in zip(random_ticket(ticket, g1).values(),
                                                 random_ticket(ticket, g2).values(), strict=True))
    # positions are uniform: over many draws every channel is kept about 17/40 of the time
    g = torch.Generator().manual_seed(0)
    freq = torch.stack([random_ticket(ticket, g)["a"].float() for _ in range(400)]).mean(0)
    assert float((freq - 17 / 40).abs().max()) < 0.12


def test_random_ticket_rejects_bad_input():
    with pytest.raises(ValueError, match="bool tensor"):
        random_ticket({"a": torch.ones(3)}, 0)
    with pytest.raises(TypeError, match="Generator or an integer"):
        random_ticket({"a": torch.ones(3, dtype=torch.bool)}, 0.5)
