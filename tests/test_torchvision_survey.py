"""Survey: the surgery on torchvision classifiers, each pruned with a global 50 % |gamma| ticket.

For every model: the forward still works with the same output shape, parameters drop, the pruned model
computes exactly what the dense one computes with the removed channels silenced, and ``apply_plan`` on a
fresh instance followed by ``load_state_dict`` reproduces the outputs bit for bit.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_worm.core.surgery import apply_plan, prune_channels

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


def build(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


def batchnorms(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh models have every gamma at 1.0; give them distinct ones (and small betas)."""
    generator = torch.Generator().manual_seed(seed)
    for bn in batchnorms(model).values():
        bn.weight.data.uniform_(0.01, 1.0, generator=generator)
        bn.bias.data.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def global_ticket(model: nn.Module, ratio: float = 0.5) -> dict[str, torch.Tensor]:
    """Prune the ``ratio`` lowest |gamma| over all BatchNorm layers."""
    layers = batchnorms(model)
    gammas = torch.cat([bn.weight.detach().abs() for bn in layers.values()])
    threshold = gammas.kthvalue(int(ratio * gammas.numel())).values
    return {name: bn.weight.detach().abs() > threshold for name, bn in layers.items()}


def silence_removed_channels(dense: nn.Module, report) -> nn.Module:
    """Zero gamma and beta of the removed BatchNorm channels: they then output exactly 0."""
    for name, bn in batchnorms(dense).items():
        kept = report.kept_indices.get(f"{name}.weight")
        if kept is not None:
            removed = torch.ones(bn.num_features, dtype=torch.bool)
            removed[kept[0]] = False
            bn.weight.data[removed] = 0.0
            bn.bias.data[removed] = 0.0
    return dense


def check_surgery(name: str, kwargs: dict, **options) -> None:
    model = randomize_batchnorms(build(name, kwargs))
    dense = copy.deepcopy(model)
    x = torch.randn(1, 3, 64, 64)
    report = prune_channels(model, global_ticket(model), x, measure_latency=False, **options)

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
