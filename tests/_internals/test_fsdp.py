"""Every private FSDP2 API that lightning-worm uses, pinned against the installed torch (one process, a mesh of
one rank on the CPU). A failure names the internal that changed; see lightning_worm/_internals/fsdp.py."""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lightning_worm._internals.fsdp import fsdp_modules, record_sharding, remove_fsdp


@pytest.fixture(scope="module")
def mesh(one_rank_mesh):
    return one_rank_mesh


def sharded_net(mesh) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 5, 5))
    fully_shard(net[0], mesh=mesh, reshard_after_forward=False)
    fully_shard(net[4], mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32),
                shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    fully_shard(net, mesh=mesh)
    return net


def test_the_recipe_reads_how_each_module_was_sharded(mesh):
    net = sharded_net(mesh)
    assert [name for name, _ in fsdp_modules(net)] == ["", "0", "4"], "FSDP2 no longer marks modules as FSDPModule"
    recipe = record_sharding(net)
    groups = {g.modules: g for g in recipe.groups}
    assert [g.modules for g in recipe.groups][-1] == ("",), "the root is sharded last (bottom-up)"
    assert groups[("0",)].options["reshard_after_forward"] is False, "FSDPParamGroup.post_forward_mesh_info changed"
    assert groups[("",)].options["reshard_after_forward"] is None, "FSDPState._auto_reshard_after_forward changed"
    assert groups[("4",)].options["mp_policy"].param_dtype == torch.float32, "FSDPParamGroup.mp_policy changed"
    assert groups[("4",)].placements == {"4.weight": Shard(1)}, "FSDPParam.fsdp_placement changed"
    assert all(g.options["mesh"] is mesh for g in recipe.groups), "FSDPParamGroup.mesh_info.mesh changed"


def test_fsdp2_comes_off_whole_and_goes_back_exactly(mesh):
    net = sharded_net(mesh)
    x = torch.randn(2, 3, 5, 5)
    expected = net(x).detach()
    for _, module in fsdp_modules(net):
        module.reshard()  # net[0] keeps its gathered parameters after the forward (reshard_after_forward=False)
    sharded = list(net.parameters())
    undo = remove_fsdp(net)
    assert not any(isinstance(m, FSDPModule) for m in net.modules()), "the FSDP<Class> wrapper class changed"
    assert not any(isinstance(p, DTensor) for p in net.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules()), "FSDP2's hooks changed"
    torch.testing.assert_close(net(x), expected)
    fully_shard(net[0], mesh=mesh)  # FSDP2 accepts the module again: its state and registry entries are gone
    undo()
    assert [id(p) for p in net.parameters()] == [id(p) for p in sharded] and isinstance(net, FSDPModule)
    torch.testing.assert_close(net(x), expected)


def test_the_recipe_shards_a_plain_module_again(mesh):
    net = sharded_net(mesh)
    x = torch.randn(2, 3, 5, 5)
    expected = net(x).detach()
    recipe = record_sharding(net)
    remove_fsdp(net)
    recipe.apply(net)
    assert [name for name, _ in fsdp_modules(net)] == ["", "0", "4"]
    assert all(isinstance(p, DTensor) for p in net.parameters())
    assert net[4].weight.placements == (Shard(1),)
    torch.testing.assert_close(net(x), expected)
