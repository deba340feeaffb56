"""The core under FSDP2, in one process (a mesh of one rank): scores gathered whole, WORM's truncation and the
sparsity terms on the local shard, a prune between ``unsharded`` that shards the model again and carries the
optimizer state. The 2-process runs (tests/callbacks/test_sharded.py) check the same against DDP."""

import copy

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lightning_worm import prune_channels
from lightning_worm.core.masks import unit_mask, unit_scores
from lightning_worm.core.regularization import MaskedDecay, RelativeSparsity, add_sparsity_gradient
from lightning_worm.core.sharding import is_sharded, local, local_part, whole
from lightning_worm.core.surgery import carry_optimizer_state
from lightning_worm.core.surgery.sharded import unsharded
from lightning_worm.core.truncation import GradientTruncation


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.1, 1.0)
    return model


def shard(model: nn.Sequential, mesh) -> nn.Sequential:
    for layer in (model[0], model[1], model[3], model[4], model[8]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).square().mean().backward()


def test_plain_tensors_pass_through():
    t = torch.randn(3)
    assert not is_sharded(t) and whole(t) is t and local(t) is t and local_part(t, t) is t


def test_the_search_and_the_per_step_terms_match_the_unsharded_model(one_rank_mesh):
    x = torch.randn(4, 3, 6, 6)
    plain, sharded = net(), shard(net(), one_rank_mesh)
    assert is_sharded(sharded[1].weight)
    scores = unit_scores(sharded)
    assert not any(is_sharded(s) for s in scores.values())
    assert all(torch.equal(scores[k], v) for k, v in unit_scores(plain).items())
    mask = unit_mask(plain, 0.5)
    assert unit_mask(sharded, 0.5).to_dict().keys() == mask.to_dict().keys()
    outcomes = []
    for model in (plain, sharded):
        step(model, x)
        truncation = GradientTruncation(model)
        truncation.set(mask, chi=0.01)
        truncation.apply()
        add_sparsity_gradient([model[1].weight, model[4].weight], 1e-3)
        pull = MaskedDecay(model)
        pull.set(mask)
        pull.apply(0.1)
        relative = RelativeSparsity()
        relative.observe([model[1].weight, model[4].weight])
        relative.end_epoch()
        outcomes.append(([whole(p.grad) for p in model.parameters()], relative.measure))
    for a, b in zip(outcomes[0][0], outcomes[1][0], strict=True):
        torch.testing.assert_close(b, a)
    assert abs(outcomes[1][1] - outcomes[0][1]) <= 1e-6 * outcomes[0][1]


def test_a_prune_between_unsharded_shards_again_and_carries_the_optimizer_state(one_rank_mesh):
    x = torch.randn(4, 3, 6, 6)
    plain = net()
    sharded = shard(copy.deepcopy(plain), one_rank_mesh)
    results = []
    for model in (plain, sharded):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step(model, x)
        optimizer.step()
        mask = unit_mask(model, 0.5)
        before = dict(model.named_parameters())
        with unsharded(model):
            report = prune_channels(model, mask, x)
        new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        carry_optimizer_state(optimizer, new, before, dict(model.named_parameters()), report.kept_indices)
        step(model, x)
        new.step()
        results.append((model, new))
    (plain, plain_opt), (sharded, sharded_opt) = results
    assert isinstance(sharded, FSDPModule) and all(isinstance(p, DTensor) for p in sharded.parameters())
    assert [tuple(p.shape) for p in sharded.parameters()] == [tuple(p.shape) for p in plain.parameters()]
    for p, q in zip(plain.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(whole(q), p)
        momentum = sharded_opt.state[q]["momentum_buffer"]
        torch.testing.assert_close(whole(momentum), plain_opt.state[p]["momentum_buffer"])
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), plain(x))


def test_a_failed_block_puts_fsdp2_back_as_it_was(one_rank_mesh):
    model = shard(net(), one_rank_mesh)
    params = [id(p) for p in model.parameters()]
    try:
        with unsharded(model):
            assert not any(is_sharded(p) for p in model.parameters())
            raise RuntimeError("a surgery failed")
    except RuntimeError:
        pass
    assert [id(p) for p in model.parameters()] == params and isinstance(model, FSDPModule)
