"""Tests of the physical channel surgery (``lightning_worm.core.surgery``) on small models."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_worm.core.sources import BatchNormSource
from lightning_worm.core.surgery import PruningPlan, apply_plan, prune_channels
from tests.helpers import batchnorms, global_ticket, randomize_batchnorms, silence_removed_channels
from tests.models import GroupedNet, ShuffleNet, SmallResNet, SmallVGG

# ----------------------------------------------------------------------------------------- models


def mlp() -> nn.Sequential:
    return nn.Sequential(
        *(nn.Linear(20, 32), nn.BatchNorm1d(32), nn.ReLU()),
        *(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Linear(16, 5),
    )


# ---------------------------------------------------------------------------------------- helpers


def assert_surgery_is_exact(dense: nn.Module, pruned: nn.Module, report, x: torch.Tensor) -> None:
    """The pruned model computes what the dense one computes with the removed channels silenced."""
    with torch.no_grad():
        expected, actual = silence_removed_channels(copy.deepcopy(dense), report).eval()(x), pruned.eval()(x)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def assert_accounting_adds_up(report) -> None:
    assert report.ticket_pruned == (
        report.pruned_from_ticket
        + report.kept_for_coupling
        + report.kept_for_min_units
        + report.kept_for_round_to
        + report.kept_unprunable
    )
    removed = sum(report.units_before.values()) - sum(report.units_after.values())
    assert removed == report.pruned_from_ticket + report.pruned_outside_ticket


def pruned_copy(model: nn.Module, ticket, x, **kwargs):
    pruned = copy.deepcopy(model)
    report = prune_channels(pruned, ticket, x, measure_latency=False, **kwargs)
    assert_accounting_adds_up(report)
    return pruned, report


# ------------------------------------------------------------------------------------------ tests


def test_uncoupled_vgg_removes_exactly_the_ticket():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG())
    ticket = global_ticket(model)
    x = torch.randn(2, 3, 16, 16)
    pruned, report = pruned_copy(model, ticket, x)

    for name, bn in batchnorms(pruned).items():
        assert bn.num_features == int(ticket[name].sum())
        torch.testing.assert_close(bn.weight, batchnorms(model)[name].weight[ticket[name]], rtol=0, atol=0)
    assert report.units_after == {name: int(mask.sum()) for name, mask in ticket.items()}
    assert report.pruned_from_ticket == report.ticket_pruned == sum(int((~m).sum()) for m in ticket.values())
    assert report.kept_for_coupling == report.kept_for_round_to == report.kept_for_min_units == 0
    assert report.kept_unprunable == report.pruned_outside_ticket == 0
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert pruned(x).shape == model(x).shape == (2, 10)
    assert_surgery_is_exact(model, pruned, report, x)


def test_kept_indices_slice_the_original_parameters():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG())
    ticket = global_ticket(model)
    pruned, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16))

    kept_out, kept_in, kernel_h, kernel_w = report.kept_indices["features.3.weight"]  # pruned on both channel dims
    assert kernel_h is None and kernel_w is None
    assert torch.equal(kept_out, ticket["features.4"].nonzero().flatten())
    assert torch.equal(kept_in, ticket["features.1"].nonzero().flatten())
    assert torch.equal(model.features[3].weight[kept_out][:, kept_in], pruned.features[3].weight)
    # A parameter pruned along one dim only has None on the other; the classifier keeps its outputs.
    kept_fc = report.kept_indices["classifier.weight"]
    assert kept_fc[0] is None and torch.equal(model.classifier.weight[:, kept_fc[1]], pruned.classifier.weight)
    assert "classifier.bias" not in report.kept_indices
    # Every changed parameter is listed, and slicing reproduces it exactly (what an optimizer state needs).
    old = dict(model.named_parameters())
    for name, param in pruned.named_parameters():
        sliced = old[name]
        for dim, idx in enumerate(report.kept_indices.get(name, [])):
            if idx is not None:
                sliced = sliced.index_select(dim, idx)
        assert torch.equal(sliced, param), name


def test_kept_indices_carry_optimizer_state_over():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet()).train()
    x = torch.randn(4, 3, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    optimizer.step()
    old_state = {name: optimizer.state[p]["momentum_buffer"] for name, p in model.named_parameters()}
    report = prune_channels(model, global_ticket(model), x, coupling="mean_rank", measure_latency=False)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for name, param in model.named_parameters():
        buffer = old_state[name]
        for dim, idx in enumerate(report.kept_indices.get(name, [])):
            if idx is not None:
                buffer = buffer.index_select(dim, idx)
        optimizer.state[param]["momentum_buffer"] = buffer.clone()
    model(x).sum().backward()
    optimizer.step()
    assert model.training


def test_residual_coupling_prunes_only_channels_pruned_everywhere():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8))
    coupled = ["stem.1", "block1.bn2"]  # summed by block1's identity shortcut
    ticket = {name: torch.ones(8, dtype=torch.bool) for name in coupled}
    ticket["stem.1"][[0, 1, 2, 3]] = False
    ticket["block1.bn2"][[2, 3, 4]] = False
    ticket["block1.bn1"] = torch.tensor([0, 1] * 4, dtype=torch.bool)  # uncoupled: exact
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, ticket, x, coupling="all")

    assert report.units_after["stem.1"] == report.units_after["block1.bn2"] == 6  # channels 2 and 3 go
    assert torch.equal(report.kept_indices["stem.1.weight"][0], torch.tensor([0, 1, 4, 5, 6, 7]))
    assert report.units_after["block1.bn1"] == 4
    assert report.kept_for_coupling == 3  # channels 0, 1 of stem.1 and 4 of block1.bn2
    assert report.pruned_from_ticket == 2 * 2 + 4
    assert_surgery_is_exact(model, pruned, report, x)


def test_mean_rank_prunes_the_average_count_by_mean_gamma():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8))
    gammas = {name: batchnorms(model)[name].weight.detach() for name in ("stem.1", "block1.bn2")}
    ticket = {"stem.1": torch.ones(8, dtype=torch.bool), "block1.bn2": torch.ones(8, dtype=torch.bool)}
    ticket["stem.1"][[0]] = False
    ticket["block1.bn2"][[1, 2, 3, 4, 5]] = False  # 1 and 5 pruned: 3 on average
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, ticket, x, coupling="mean_rank")

    expected_removed = torch.sort(torch.argsort((gammas["stem.1"] + gammas["block1.bn2"]) / 2)[:3]).values
    kept = report.kept_indices["stem.1.weight"][0]
    removed = torch.tensor([c for c in range(8) if c not in kept.tolist()])
    assert torch.equal(removed, expected_removed)
    assert report.units_after["stem.1"] == report.units_after["block1.bn2"] == 5
    assert report.pruned_from_ticket + report.pruned_outside_ticket == 6
    assert_surgery_is_exact(model, pruned, report, x)


def test_round_to_keeps_the_next_best_channels():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=16))
    ticket = global_ticket(model, ratio=0.4)
    pruned, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16), round_to=8)

    extra = 0
    for name, bn in batchnorms(model).items():
        kept = report.kept_indices.get(f"{name}.weight", [torch.arange(bn.num_features)])[0]
        wanted = int(ticket[name].sum())
        assert len(kept) % 8 == 0 and len(kept) >= wanted
        extra += len(kept) - wanted
        # the ticket's channels plus the best of the rest
        gamma = bn.weight.detach()
        rest = (~ticket[name]).nonzero().flatten()
        best_rest = rest[torch.argsort(gamma[rest], descending=True)[: len(kept) - wanted]]
        assert set(kept.tolist()) == set(ticket[name].nonzero().flatten().tolist()) | set(best_rest.tolist())
    assert extra == report.kept_for_round_to > 0


def test_a_layer_is_never_emptied():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    ticket = {"features.4": torch.zeros(8, dtype=torch.bool)}
    pruned, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16))

    assert report.units_after["features.4"] == 1
    assert report.kept_for_min_units == 1 and report.pruned_from_ticket == 7
    best = int(batchnorms(model)["features.4"].weight.argmax())
    assert report.kept_indices["features.4.weight"][0].tolist() == [best]


def test_mlp_with_batchnorm1d_and_untouched_interface():
    torch.manual_seed(0)
    model = randomize_batchnorms(mlp())
    ticket = {"1": torch.arange(32) % 2 == 0, "4": torch.arange(16) % 4 == 0}
    x = torch.randn(4, 20)
    pruned, report = pruned_copy(model, ticket, x)

    assert (pruned[0].out_features, pruned[3].in_features) == (16, 16)
    assert (pruned[3].out_features, pruned[6].in_features) == (4, 4)
    assert pruned[6].out_features == 5  # the output layer keeps its outputs
    assert report.pruned_from_ticket == report.ticket_pruned == 16 + 12
    assert_surgery_is_exact(model, pruned, report, x)


def test_output_batchnorm_and_bn_free_groups_are_never_pruned():
    torch.manual_seed(0)
    model = randomize_batchnorms(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8)))
    ticket = {"3": torch.arange(8) < 4}
    pruned, report = pruned_copy(model, ticket, torch.randn(4, 6))

    assert pruned[0].out_features == 8 and pruned[3].num_features == 8  # no BN in group 0; group 2 is the output
    assert report.kept_unprunable == 4 and report.pruned_from_ticket == 0
    assert report.plan.pruned_groups == []


def test_a_torchmetrics_metric_in_the_model_changes_nothing():
    torchmetrics = pytest.importorskip("torchmetrics")

    class WithMetric(SmallVGG):  # like a LightningModule that owns a metric; Metric overloads ==
        def __init__(self) -> None:
            super().__init__(width=8)
            self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    torch.manual_seed(0)
    model = randomize_batchnorms(WithMetric())
    ticket = global_ticket(model)
    _, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16))
    assert report.pruned_from_ticket == report.ticket_pruned > 0


@pytest.mark.parametrize("native", [False, True], ids=["view_transpose_shuffle", "nn_ChannelShuffle"])
@pytest.mark.parametrize("coupling", ["all", "mean_rank"])
def test_chunk_and_channel_shuffle(native, coupling):
    torch.manual_seed(0)
    model = randomize_batchnorms(ShuffleNet(native))
    ticket = global_ticket(model)
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, ticket, x, coupling=coupling)

    assert report.params_after < report.params_before
    assert_surgery_is_exact(model, pruned, report, x)
    fresh = ShuffleNet(native)
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


def test_grouped_conv_prunes_the_same_positions_in_every_group():
    torch.manual_seed(0)
    model = randomize_batchnorms(GroupedNet())
    ticket = {"features.1": torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.bool)}  # groups of 2 input channels
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, ticket, x, coupling="all")

    # Position 1 is pruned in groups 0, 1, 2 but not 3: coupled, so it stays under "all".
    assert report.units_after["features.1"] == 8 and report.kept_for_coupling == 4
    pruned, report = pruned_copy(model, ticket, x, coupling="mean_rank")
    assert report.units_after["features.1"] == 4 and pruned.features[3].in_channels == 4
    assert_surgery_is_exact(model, pruned, report, x)


def test_plan_replays_on_a_fresh_model_through_json():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet())
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, global_ticket(model), x, coupling="mean_rank", round_to=2)

    plan = PruningPlan.from_dict(json.loads(json.dumps(report.plan.to_dict())))
    assert plan == report.plan
    fresh = SmallResNet()
    kept = apply_plan(fresh, plan)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))
    assert kept.keys() == report.kept_indices.keys()
    json.dumps(report.to_dict())


def test_apply_plan_rejects_a_model_that_does_not_fit():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet())
    pruned, report = pruned_copy(model, global_ticket(model), torch.randn(2, 3, 8, 8), coupling="mean_rank")

    with pytest.raises(ValueError, match="channel counts differ.*same arguments"):
        apply_plan(SmallResNet(width=16), report.plan)
    with pytest.raises(ValueError, match="already pruned"):
        apply_plan(pruned, report.plan)
    with pytest.raises(ValueError, match="lacks: 'stem.1'.*made for a .*SmallResNet, this is a .*SmallVGG"):
        apply_plan(SmallVGG(), report.plan)
    with pytest.raises(ValueError, match="format_version"):
        PruningPlan.from_dict({**report.plan.to_dict(), "format_version": 99})


def test_modes_requires_grad_and_device_are_restored():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet()).train()
    model.block1.eval()
    model.stem[0].weight.requires_grad_(False)
    prune_channels(model, global_ticket(model), torch.randn(2, 3, 8, 8), coupling="mean_rank", measure_latency=False)

    assert model.training and model.block2.training and not model.block1.training and not model.block1.bn1.training
    assert not model.stem[0].weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "stem.0.weight")
    assert torch.is_grad_enabled()  # the caller's grad mode is untouched
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_syncbatchnorm_is_pruned_like_batchnorm():
    torch.manual_seed(0)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_batchnorms(SmallResNet()))
    assert isinstance(model.stem[1], nn.SyncBatchNorm)
    x = torch.randn(2, 3, 8, 8)
    dense = copy.deepcopy(model)
    model.train()  # SyncBatchNorm cannot run in train mode without a process group: tracing uses eval
    report = prune_channels(model, global_ticket(model), x, coupling="mean_rank", measure_latency=False)

    assert model.training and isinstance(model.stem[1], nn.SyncBatchNorm)
    assert report.units_after["stem.1"] < report.units_before["stem.1"]
    assert_surgery_is_exact(dense, model, report, x)


def test_pruned_model_exports():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet())
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = pruned_copy(model, global_ticket(model), x, coupling="mean_rank")

    exported = torch.export.export(pruned.eval(), (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), pruned(x))


@pytest.mark.cuda
def test_model_stays_on_its_device():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet()).cuda()
    x = torch.randn(2, 3, 8, 8, device="cuda")
    pruned, report = pruned_copy(model, global_ticket(model), x, coupling="mean_rank")
    assert all(t.is_cuda for t in [*pruned.parameters(), *pruned.buffers()])
    assert all(idx is None or idx.device.type == "cpu" for dims in report.kept_indices.values() for idx in dims)
    fresh = SmallResNet().cuda()
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), pruned(x))


def test_latency_is_measured_on_request():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    report = prune_channels(model, global_ticket(model), torch.randn(1, 3, 16, 16), latency_repeats=3)
    assert report.latency_before_ms > 0 and report.latency_after_ms > 0
    assert report.to_dict()["latency_after_ms"] == report.latency_after_ms


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("ticket", "match"),
    [
        ({}, "ticket is empty"),
        ({"stem.9": torch.ones(8, dtype=torch.bool), "fc": torch.ones(1, dtype=torch.bool)}, "layers.*'stem.9', 'fc'"),
        ({"stem.0": torch.ones(8, dtype=torch.bool)}, "not tracked BatchNorm channels.*'stem.0'"),
        ({"stem.1": torch.ones(16, dtype=torch.bool)}, "16 channels but the layer has 8.*another model"),
        ({"stem.1": torch.ones(8)}, "1-D torch.bool tensor.*torch.float32.*mask.bool"),
        ({"stem.1": torch.ones(2, 4, dtype=torch.bool)}, "1-D torch.bool tensor"),
        ({"stem.1": [True] * 8}, "1-D torch.bool tensor.*list"),
    ],
    ids=["empty", "unknown", "not_batchnorm", "wrong_length", "not_bool", "not_1d", "not_tensor"],
)
def test_bad_tickets_are_rejected_clearly(ticket, match):
    model = SmallResNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        prune_channels(model, ticket, torch.randn(2, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_options_are_rejected():
    model, ticket = SmallResNet(), {"stem.1": torch.ones(8, dtype=torch.bool)}
    with pytest.raises(ValueError, match="coupling"):
        prune_channels(model, ticket, torch.randn(2, 3, 8, 8), coupling="any")
    with pytest.raises(ValueError, match="round_to"):
        prune_channels(model, ticket, torch.randn(2, 3, 8, 8), round_to=0)
    with pytest.raises(ValueError, match="example_input"):
        prune_channels(model, ticket, [])


def test_failing_forward_is_reported_with_its_cause():
    model = SmallResNet()
    ticket = {"stem.1": torch.ones(8, dtype=torch.bool)}
    with pytest.raises(RuntimeError, match="forward failed on example_input") as info:
        prune_channels(model, ticket, torch.randn(2, 5, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert model.training


# ------------------------------------------------------------------------------- coupling "vote"


def test_vote_removes_the_channels_pruned_in_most_coupled_layers_first():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8))
    ticket = {"stem.1": torch.ones(8, dtype=torch.bool), "block1.bn2": torch.ones(8, dtype=torch.bool)}
    ticket["stem.1"][[0, 1, 2, 3]] = False
    ticket["block1.bn2"][[2, 3, 4]] = False  # 3.5 on average, 3 go: 2 and 3 (pruned in both), then 0, 1 or 4
    x = torch.randn(2, 3, 8, 8)
    pruned, report = pruned_copy(model, ticket, x)  # the default coupling

    assert report.coupling == "vote"
    kept = report.kept_indices["stem.1.weight"][0].tolist()
    removed = sorted(set(range(8)) - set(kept))
    assert {2, 3} <= set(removed) and len(removed) == 3 and set(removed) <= {0, 1, 2, 3, 4}
    gammas = (batchnorms(model)["stem.1"].weight + batchnorms(model)["block1.bn2"].weight).detach() / 2
    others = [c for c in removed if c not in (2, 3)]
    assert others == [min([0, 1, 4], key=lambda c: float(gammas[c]))]  # ties by mean gamma
    assert report.ticket_agreement == report.pruned_from_ticket / report.ticket_pruned
    assert report.to_dict()["ticket_agreement"] == report.ticket_agreement
    assert_surgery_is_exact(model, pruned, report, x)


def test_vote_keeps_an_arbitrary_ticket_where_nothing_is_coupled():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    ticket = {name: torch.arange(bn.num_features) % 2 == 0 for name, bn in batchnorms(model).items()}
    _, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16))
    assert report.ticket_agreement == 1.0 and report.pruned_outside_ticket == 0
    assert report.removed_fraction == 0.5


# ------------------------------------------------------------------------------------ score source


class NegatedBatchNormSource(BatchNormSource):
    """Scores BatchNorm channels by -|gamma| and tracks only the stem: the surgery must follow both."""

    key = "negated_batchnorm_test"

    def candidates(self, model):
        yield from ((n, m) for n, m in super().candidates(model) if n.startswith("stem"))

    def scores(self, module):
        return -super().scores(module)


def test_the_score_source_names_the_modules_and_scores_the_channels():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8))
    gamma = batchnorms(model)["stem.1"].weight.detach().abs()
    ticket = {"stem.1": torch.arange(8) >= 4}  # 4 pruned, coupled with block1.bn2 (untracked here)
    with pytest.raises(ValueError, match="not tracked.*'block1.bn2'"):
        prune_channels(copy.deepcopy(model), {"block1.bn2": torch.ones(8, dtype=torch.bool)}, torch.randn(2, 3, 8, 8),
                       source=NegatedBatchNormSource())
    pruned, report = pruned_copy(model, ticket, torch.randn(2, 3, 8, 8), source=NegatedBatchNormSource(),
                                 coupling="mean_rank")
    assert list(report.units_before) == ["stem.1"]
    removed = sorted(set(range(8)) - set(report.kept_indices["stem.1.weight"][0].tolist()))
    assert removed == sorted(torch.argsort(gamma, descending=True)[:4].tolist())  # lowest -|gamma| first
    assert report.plan.source == "negated_batchnorm_test"
    fresh = SmallResNet(width=8)
    apply_plan(fresh, report.plan, source=NegatedBatchNormSource())
    fresh.load_state_dict(pruned.state_dict())
    with pytest.raises(ValueError, match="negated_batchnorm_test.*source="):
        apply_plan(SmallResNet(width=8), report.plan)


def test_a_source_whose_entries_are_not_modules_is_refused():
    class Parts(BatchNormSource):
        def candidates(self, model):
            yield from ((f"{n}:half", (m, "half")) for n, m in super().candidates(model))

        def skip_reason(self, handle):
            return None

    with pytest.raises(ValueError, match="removes output channels of modules.*'stem.1:half' as a tuple.*1-D"):
        prune_channels(SmallResNet(), {"stem.1:half": torch.ones(8, dtype=torch.bool)}, torch.randn(2, 3, 8, 8),
                       source=Parts())


# ------------------------------------------------------------------------------- measuring, report


def test_flops_are_per_example_whatever_the_batch():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    ticket = global_ticket(model)
    _, one = pruned_copy(model, ticket, torch.randn(1, 3, 16, 16))
    _, four = pruned_copy(model, ticket, torch.randn(4, 3, 16, 16))
    assert (one.flops_before, one.flops_after) == (four.flops_before, four.flops_after)
    assert (one.flops_batch, four.flops_batch) == (1, 4)
    # Lightning's convention: FlopCounterMode, a multiply-add counts 2; first conv: 2 * 3*3*3 * 8 * 16*16
    assert one.flops_before > 2 * 27 * 8 * 256


# ----------------------------------------------------------------------------------- plan replay


def test_plan_kind_dispatches_and_old_plans_load():
    from lightning_worm.core.surgery import Surgery, register_surgery

    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    pruned, report = pruned_copy(model, global_ticket(model), torch.randn(2, 3, 16, 16))
    old = report.plan.to_dict()  # as lightning-worm 0.1 wrote it: format 1, no kind, source or options
    for key in ("kind", "source", "options"):
        old.pop(key)
    old = {{"units_before": "channels_before", "units_after": "channels_after"}.get(k, k): v for k, v in old.items()}
    old["format_version"] = 1
    plan = PruningPlan.from_dict(old)
    assert plan.units_after == report.plan.units_after and plan.format_version == 2
    assert (plan.kind, plan.source) == ("channels", "batchnorm")
    fresh = SmallVGG(width=8)
    apply_plan(fresh, old)
    fresh.load_state_dict(pruned.state_dict())

    calls = []

    class CountedSource(BatchNormSource):
        pass

    def replay(model, plan, *, note=None):
        calls.append((model, plan.options, note))
        return {}

    register_surgery(CountedSource, Surgery("test_kind", prune=prune_channels, replay=replay))
    apply_plan(fresh, {**old, "kind": "test_kind", "options": {"heads": [1]}}, note="given")
    assert calls == [(fresh, {"heads": [1]}, "given")]
    with pytest.raises(ValueError, match=r"'test_kind' replay takes \['note'\], not \['coupling'\]"):
        apply_plan(fresh, {**old, "kind": "test_kind"}, coupling="all")
    with pytest.raises(ValueError, match="kind 'nope' has no registered surgery.*register_surgery"):
        apply_plan(SmallVGG(width=8), {**old, "kind": "nope"})


def _bad_plan(plan: dict, case: str) -> dict:
    plan = copy.deepcopy(plan)
    plan["pruned_groups"].sort(key=lambda group: group[0])  # features.0 first: the order does not matter
    name, idxs = plan["pruned_groups"][0]
    if case == "negative":
        plan["pruned_groups"][0][1] = [-1, *idxs[1:]]
    elif case == "out_of_range":
        plan["pruned_groups"][0][1] = [*idxs[:-1], 999]
    elif case == "duplicate_index":
        plan["pruned_groups"][0][1] = [idxs[0], idxs[0], *idxs[2:]]
    elif case == "float_index":
        plan["pruned_groups"][0][1] = [float(idxs[0]), *idxs[1:]]
    elif case == "bool_index":
        plan["pruned_groups"][0][1] = [True, *idxs[1:]]
    elif case == "unknown_module":
        plan["pruned_groups"][0][0] = "features.99"
    elif case == "not_a_layer":
        plan["pruned_groups"][0][0] = "features.2"  # a ReLU
    elif case == "duplicate_group":
        plan["pruned_groups"].append(list(plan["pruned_groups"][0]))
    elif case == "all_channels":
        plan["pruned_groups"][0][1] = list(range(8))
    elif case == "wrong_after":
        first = next(iter(plan["units_after"]))
        plan["units_after"][first] -= 1
    elif case == "after_exceeds_before":
        first = next(iter(plan["units_after"]))
        plan["units_after"][first] = plan["units_before"][first] + 1
    elif case == "count_type":
        first = next(iter(plan["units_after"]))
        plan["units_after"][first] = "4"
    elif case == "group_shape":
        plan["pruned_groups"][0] = name
    elif case == "bad_dtype":
        plan["input_specs"][0]["dtype"] = "float33"
    elif case == "bad_shape":
        plan["input_specs"][0]["shape"] = [2, -3, 16, 16]
    elif case == "unknown_field":
        plan["extra"] = 1
    elif case == "missing_field":
        del plan["pruned_groups"]
    elif case == "not_a_dict":
        plan = ["not", "a", "plan"]
    return plan


BAD_PLANS = [
    ("negative", r"pruned_groups\[0\] \('features.0'\) holds the negative index -1.*re-create"),
    ("out_of_range", r"pruned_groups\[0\] \('features.0'\) holds channel 999, but the layer has 8 output channels"),
    ("duplicate_index", r"pruned_groups\[0\] \('features.0'\) lists channel \d+ twice"),
    ("float_index", r"pruned_groups\[0\] \('features.0'\) holds \d+\.0, not a channel index"),
    ("bool_index", r"pruned_groups\[0\] \('features.0'\) holds True, not a channel index"),
    ("unknown_module", r"names modules this model lacks: 'features.99'.*same arguments"),
    ("not_a_layer", r"pruned_groups\[0\] names 'features.2', a ReLU whose output channels cannot be pruned"),
    ("duplicate_group", r"pruned_groups\[\d\] names 'features.0' a second time"),
    ("all_channels", r"pruned_groups\[0\] \('features.0'\) removes all 8 output channels"),
    ("wrong_after", r"inconsistent: its pruned_groups would leave features.1: \d+ instead of \d+"),
    ("after_exceeds_before", r"units_after\['features.1'\] = 9 exceeds units_before \(8\)"),
    ("count_type", r"units_after must map entry names to non-negative integers"),
    ("group_shape", r"pruned_groups\[0\] must be \[module name, list of channel indices\], got 'features.0'"),
    ("bad_dtype", r"input_specs\[0\] has dtype 'float33', not a torch dtype name"),
    ("bad_shape", r"input_specs\[0\] needs a 'shape' list of non-negative integers"),
    ("unknown_field", r"Not a pruning plan: unknown fields \['extra'\]"),
    ("missing_field", r"Not a pruning plan: missing fields \['pruned_groups'\]"),
    ("not_a_dict", r"must be a PruningPlan or the dict of its `to_dict\(\)`, got list"),
]


@pytest.mark.parametrize(("case", "match"), BAD_PLANS, ids=[case for case, _ in BAD_PLANS])
def test_a_bad_plan_is_refused_before_the_model_changes(case, match):
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    ticket = {"features.1": torch.arange(8) % 2 == 0, "features.4": torch.arange(8) < 6}
    _, report = pruned_copy(model, ticket, torch.randn(2, 3, 16, 16))
    assert sorted(name for name, _ in report.plan.pruned_groups) == ["features.0", "features.3"]
    fresh = SmallVGG(width=8)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        apply_plan(fresh, _bad_plan(report.plan.to_dict(), case))
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in fresh.parameters()) and fresh.training


def test_bf16_true_model_replays_on_float32_and_on_bf16_modules():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8)).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    pruned, report = pruned_copy(model, global_ticket(model), x)
    assert report.plan.input_specs[0]["dtype"] == "bfloat16"
    plan = json.loads(json.dumps(report.plan.to_dict()))

    fresh32 = SmallResNet(width=8)
    apply_plan(fresh32, plan)
    fresh32.load_state_dict(pruned.state_dict())  # loading casts bf16 weights into the float32 module
    fresh16 = SmallResNet(width=8).to(torch.bfloat16)
    apply_plan(fresh16, plan)
    fresh16.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh16.eval()(x), pruned.eval()(x))
        torch.testing.assert_close(fresh32.eval()(x.float()), pruned(x).float(), rtol=0.05, atol=0.05)


def test_integer_inputs_stay_integer_on_replay():
    class Embedded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, tokens):
            return self.body(self.embed(tokens).mean(1))

    torch.manual_seed(0)
    model = randomize_batchnorms(Embedded()).to(torch.bfloat16)
    tokens = torch.randint(0, 10, (4, 5))
    pruned, report = pruned_copy(model, {"body.1": torch.arange(8) < 4}, tokens)
    assert report.plan.input_specs[0]["dtype"] == "int64"
    fresh = Embedded()
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.body[0].out_features == 4


# ------------------------------------------------------------------------- the torch-pruning patch


def test_torch_pruning_is_patched_only_inside_the_library_calls():
    import threading

    import torch_pruning as tp

    from lightning_worm._internals import torch_pruning as tpi

    assert not tpi.patch_active()
    seen_inside, other_thread = [], []

    def prune_elsewhere():
        other_thread.append(tpi.patch_active())
        conv = nn.Conv2d(2, 4, 1)
        tp.pruner.function.ConvPruner().prune_out_channels(conv, [0])  # not recorded by the block below

    with tpi.recorded_parameter_slices(lambda old, new, keep, dim: seen_inside.append(tuple(new.shape))):
        assert tpi.patch_active()
        thread = threading.Thread(target=prune_elsewhere)
        thread.start()
        thread.join()
        tp.pruner.function.ConvPruner().prune_out_channels(nn.Conv2d(2, 6, 1), [0, 1])
    assert not tpi.patch_active()
    assert seen_inside == [(4, 2, 1, 1), (4,)]  # only this context's calls: weight and bias of the 6-channel conv
    assert other_thread == [True]  # installed process-wide while the block is open, but inert for others

    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    pruned_copy(model, global_ticket(model), torch.randn(2, 3, 16, 16))
    assert not tpi.patch_active()
    with pytest.raises(ValueError):
        prune_channels(model, {}, torch.randn(2, 3, 16, 16))
    assert not tpi.patch_active()


def test_a_plan_materialises_lazy_layers_and_says_why_a_non_affine_layer_does_not_fit():
    torch.manual_seed(0)
    model = randomize_batchnorms(SmallVGG(width=8))
    pruned, report = pruned_copy(model, global_ticket(model), torch.randn(2, 3, 16, 16))
    fresh = SmallVGG(width=8)
    fresh.features[1] = nn.LazyBatchNorm2d()
    apply_plan(fresh, report.plan)  # one forward on zeros materialises it first
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.features[1].num_features == report.units_after["features.1"]
    fresh.features[1] = nn.BatchNorm2d(8, affine=False)
    with pytest.raises(ValueError, match=r"units_before\['features.1'\].*not affine"):
        apply_plan(fresh, report.plan)


def test_a_mask_from_the_core_is_a_ticket():
    from lightning_worm.core.masks import Mask, unit_mask

    torch.manual_seed(0)
    model = randomize_batchnorms(SmallResNet(width=8))
    ticket = unit_mask(model, 0.5)
    assert isinstance(ticket, Mask)
    pruned, report = pruned_copy(model, ticket, torch.randn(2, 3, 8, 8))
    assert report.ticket_pruned == round(0.5 * sum(report.units_before.values()))
    assert abs(report.removed_fraction - 0.5) <= 0.05


class _PartialResidualNet(nn.Module):
    """ReXNet's blocks: ``cat([x[:, :c] + shortcut, x[:, c:]], 1)``, each block a few channels wider."""

    def __init__(self, widths: tuple[int, ...] = (8, 10, 12, 14, 16, 18)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, 2 * a, 1), nn.BatchNorm2d(2 * a), nn.ReLU(), nn.Conv2d(2 * a, b, 1),
                          nn.BatchNorm2d(b))
            for a, b in zip(widths, widths[1:], strict=False)
        )
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            c, shortcut = x.shape[1], x
            x = block(x)
            x = torch.cat([x[:, 0:c] + shortcut, x[:, c:]], dim=1)
        return self.head(x.mean((2, 3)))


class _HeadAttention(nn.Module):
    """EfficientViT's lite attention: heads by a reshape, ``chunk(3, dim=-1)``, matmuls, a reshape back, a residual."""

    def __init__(self, channels: int = 16, dim: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # no BatchNorm, as in EfficientViT: not pruned
        self.proj = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, _, h, w = x.shape
        qkv = self.qkv(x).reshape(b, -1, 3 * self.dim, h * w).transpose(-1, -2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = torch.relu(q) @ (torch.relu(k).transpose(-1, -2) @ v)
        out = self.proj(out.transpose(-1, -2).reshape(b, -1, h, w)) + x
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("make", [_PartialResidualNet, _HeadAttention], ids=["partial_residual", "head_attention"])
def test_slices_and_last_dim_chunks_group_quickly_and_prune_exactly(make):
    # Torch-Pruning 1.6 alone took the last-dim chunk and head reshapes for channel ops and ReXNet's concat
    # sizes wrong past a slice: its index lists then grew without end and the grouping never finished.
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    x = torch.randn(2, 3, 4, 4)
    pruned, report = pruned_copy(model, global_ticket(model), x)
    assert report.params_after < report.params_before
    assert_surgery_is_exact(model, pruned, report, x)
