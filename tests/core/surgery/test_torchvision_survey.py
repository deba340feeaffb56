"""Survey: the surgery on torchvision classifiers, each pruned with a global 50 % |gamma| ticket.

For every model: the forward still works with the same output shape, parameters drop, the pruned model
computes exactly what the dense one computes with the removed channels silenced, and ``apply_plan`` on a
fresh instance followed by ``load_state_dict`` reproduces the outputs bit for bit. With the default
coupling, the fraction of the prunable channels removed is within 5 % of the ticket's ratio on every family
(``examples/benchmarks/coupling.py`` prints the table for every rule), and the fraction of all channels removed
is within 5 points of the ticket's, except on ShuffleNet, whose report says why.
"""

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from lightning_worm.core.surgery import DEFAULT_COUPLING, apply_plan, prune_channels
from tests.helpers import global_ticket, randomize_batchnorms, silence_removed_channels

slow = pytest.mark.slow

MODELS = [
    pytest.param("resnet18", {}, id="resnet18"),
    pytest.param("resnet50", {}, marks=slow, id="resnet50"),
    pytest.param("resnext50_32x4d", {}, marks=slow, id="resnext50_32x4d"),
    pytest.param("wide_resnet50_2", {}, marks=slow, id="wide_resnet50_2"),
    pytest.param("vgg11_bn", {}, marks=slow, id="vgg11_bn"),
    pytest.param("vgg16_bn", {}, marks=slow, id="vgg16_bn"),
    pytest.param("mobilenet_v2", {}, id="mobilenet_v2"),
    pytest.param("mobilenet_v3_small", {}, id="mobilenet_v3_small"),
    pytest.param("efficientnet_b0", {}, marks=slow, id="efficientnet_b0"),
    pytest.param("regnet_x_400mf", {}, id="regnet_x_400mf"),
    pytest.param("densenet121", {}, marks=slow, id="densenet121"),
    pytest.param("mnasnet0_5", {}, id="mnasnet0_5"),
    pytest.param("shufflenet_v2_x0_5", {}, id="shufflenet_v2_x0_5"),
    pytest.param("googlenet", {"aux_logits": False, "init_weights": True}, marks=slow, id="googlenet"),
]


SHORT = {"shufflenet_v2_x0_5"}


def build(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)




def check_surgery(name: str, kwargs: dict, **options) -> None:
    model = randomize_batchnorms(build(name, kwargs))
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    ticket = global_ticket(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if name in SHORT else "error")
        report = prune_channels(model, ticket, x, measure_latency=False, **options)
    if not options:  # the default coupling removes what the ticket asks, within 5 % of the ratio
        requested = sum(int((~mask).sum()) for mask in ticket.values()) / sum(mask.numel() for mask in ticket.values())
        assert report.coupling == DEFAULT_COUPLING
        of_prunable = (report.pruned_from_ticket + report.pruned_outside_ticket) / report.prunable
        assert abs(of_prunable - requested) <= 0.05 * requested, (of_prunable, requested)
        assert report.ticket_agreement > 0.5
        assert report.asked_fraction == pytest.approx(requested)
        if name in SHORT:  # a whole stage's pass-through channels are one unit: unprunable
            assert requested - report.removed_fraction > 0.05
            assert report.shortfall is not None and "unprunable" in report.note
        else:
            assert abs(report.removed_fraction - requested) <= 0.05 and report.shortfall is None

    with torch.no_grad():
        out = model.eval()(x)
        assert out.shape == (1, 10)
        torch.testing.assert_close(out, silence_removed_channels(dense, report)(x), rtol=1e-4, atol=1e-5)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert report.pruned_from_ticket > 0

    fresh = build(name, kwargs)
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)


@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_torchvision_model(name, kwargs):
    check_surgery(name, kwargs)


@pytest.mark.parametrize(
    "name",
    ["resnet18", "shufflenet_v2_x0_5", "regnet_x_400mf", pytest.param("resnext50_32x4d", marks=slow)],
)
def test_torchvision_model_mean_rank_round_to(name):
    check_surgery(name, {}, coupling="mean_rank", round_to=8)
