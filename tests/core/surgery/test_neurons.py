"""Removing feed-forward neurons: equal to zeroing them, sizes fixed, plans replayed, state carried, refusals.

The Hugging Face families are random small configs (``build`` of the source's tests): each is tried by
``check_prunable`` (what ``PruneAndFinetune`` runs after the first batch), half the neurons of every block are
removed (checked by the library against the dense model with the removed neurons zeroed), and ``apply_plan`` on
a fresh instance plus ``load_state_dict`` reproduces the outputs bit for bit.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from examples.vit import VisionTransformer, ViTClassifier
from lightning_worm import (
    EarlyBirdCallback,
    FeedForwardSource,
    PruneAndFinetune,
    PruningError,
    WormCallback,
    check_prunable,
)
from lightning_worm.core.surgery import PruningPlan, apply_plan, carry_optimizer_state, prune_neurons
from tests.core.sources.test_feedforward import FAMILIES, build
from tests.helpers import assert_equal_up_to_rounding, tiny_loader, trainer
from tests.models import GatedMlp, GPT2Mlp, Mlp, PackedMlp, tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def half(blocks) -> dict[str, torch.Tensor]:
    """A ticket that keeps the even neurons of every block."""
    return {name: torch.arange(block.num_neurons) % 2 == 0 for name, block in blocks.items()}


def zero_neurons(model, ticket, source=None):
    """The dense twin of a neuron prune: the pruned neurons' input rows and biases and output columns set to 0."""
    model = copy.deepcopy(model)
    blocks = (source or FeedForwardSource()).tracked(model)
    with torch.no_grad():
        for name, keep in ticket.items():
            block = blocks[name]
            gone = torch.nonzero(~keep).flatten()
            for _, param, dim, is_input in block.parameters():
                param.index_fill_(dim, block.positions(gone) if is_input else gone, 0.0)
    return model


def assert_same_state(model, state):
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", FAMILIES)
def test_half_the_neurons_of_every_hugging_face_block_go(name):
    model, x = build(name)
    source = FeedForwardSource()
    state = copy.deepcopy(model.state_dict())
    assert check_prunable(model, source, x, ratio=0.5).kind == "neurons"
    assert_same_state(model, state)  # the trial is undone
    ticket = half(source.tracked(model))
    expected = zero_neurons(model, ticket)(x)
    report = prune_neurons(model, ticket, x, measure_latency=False)  # checked against zeroed neurons by the library
    assert report.units_after == {n: 32 for n in report.units_before} and report.params_after < report.params_before
    with torch.no_grad():
        out = model(x)
    assert_equal_up_to_rounding(out, expected)
    fresh, _ = build(name)
    apply_plan(fresh, json.loads(json.dumps(report.plan.to_dict())))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_the_sizes_are_fixed():
    model, x = build("llama")
    prune_neurons(model, half(FeedForwardSource().tracked(model)), x, measure_latency=False)
    mlp = model.model.layers[0].mlp
    assert mlp.intermediate_size == mlp.gate_proj.out_features == mlp.up_proj.out_features == 32
    assert mlp.down_proj.in_features == 32 and mlp.hidden_size == 32  # the residual width is no neuron count
    model, x = build("gpt2")
    report = prune_neurons(model, half(FeedForwardSource().tracked(model)), x, measure_latency=False)
    mlp = model.model.h[0].mlp
    assert (mlp.c_fc.nf, mlp.c_fc.nx, mlp.c_proj.nf, mlp.c_proj.nx) == (32, 32, 32, 32)
    assert tuple(mlp.c_fc.weight.shape) == (32, 32) and tuple(mlp.c_fc.bias.shape) == (32,)
    even = torch.arange(0, 64, 2)
    assert torch.equal(report.kept_indices["model.h.0.mlp.c_fc.weight"][1], even)
    assert report.kept_indices["model.h.0.mlp.c_fc.weight"][0] is None
    assert torch.equal(report.kept_indices["model.h.0.mlp.c_proj.weight"][0], even)
    assert "model.h.0.mlp.c_proj.bias" not in report.kept_indices
    model, x = build("phi3")
    report = prune_neurons(model, half(FeedForwardSource().tracked(model)), x, measure_latency=False)
    assert torch.equal(report.kept_indices["model.layers.0.mlp.gate_up_proj.weight"][0], torch.cat([even, even + 64]))
    assert model.model.layers[0].mlp.gate_up_proj.out_features == 64


# ---------------------------------------------------------------------------------------------- plain torch


@pytest.mark.parametrize("case", ["vit", "timm", "gpt2", "packed", "gated"])
def test_removing_neurons_equals_zeroing_them(case):
    torch.manual_seed(0)
    if case == "vit":
        model, x = VisionTransformer(dim=16, depth=2, num_heads=2).eval(), torch.randn(2, 3, 32, 32)
    else:
        model = {"timm": lambda: nn.Sequential(Mlp()), "gpt2": GPT2Mlp, "packed": PackedMlp, "gated": GatedMlp}[case]()
        x = torch.randn(2, 5, 8)
    blocks = FeedForwardSource().tracked(model)
    generator = torch.Generator().manual_seed(2)
    ticket = {name: torch.rand(block.num_neurons, generator=generator) < 0.5 for name, block in blocks.items()}
    expected = zero_neurons(model, ticket)(x)
    before = {n: p for n, p in model.named_parameters()}
    report = prune_neurons(model, ticket, x, measure_latency=False)
    assert_equal_up_to_rounding(model(x), expected)
    assert report.units_after == {n: int(m.sum()) for n, m in ticket.items()}
    assert report.flops_after < report.flops_before
    assert report.plan.kind == "neurons" and report.plan.source == "ffn_neurons"
    assert [g[0] for g in report.plan.pruned_groups] == list(ticket)
    for name, keep in report.kept_indices.items():  # the surviving values are the kept ones, in order
        after = model.get_parameter(name)
        old = before[name].detach()
        for dim, index in enumerate(keep):
            if index is not None:
                old = old.index_select(dim, index)
        assert torch.equal(after.detach(), old), name


def test_a_block_keeps_its_best_neuron_and_round_to():
    model = nn.Sequential(Mlp())
    scores = FeedForwardSource().scores(FeedForwardSource().tracked(model)["0"])
    report = prune_neurons(model, {"0": torch.zeros(16, dtype=torch.bool)}, measure_latency=False)
    assert report.units_after == {"0": 1} and report.kept_for_min_units == 1
    assert report.kept_indices["0.fc1.weight"][0].tolist() == [int(scores.argmax())]
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:3] = True
    report = prune_neurons(nn.Sequential(Mlp()), {"0": keep}, round_to=4, measure_latency=False)
    assert report.units_after == {"0": 4} and report.kept_for_round_to == 1
    assert report.pruned_from_ticket == 12 and report.prunable == 15


def test_the_optimizer_state_is_sliced_with_the_neurons():
    torch.manual_seed(0)
    model, x = VisionTransformer(dim=16, depth=2, num_heads=2), torch.randn(4, 3, 32, 32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    before = dict(model.named_parameters())
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in before.items()}
    ticket = half(FeedForwardSource().tracked(model))
    report = prune_neurons(model, ticket, x, measure_latency=False)
    new = torch.optim.Adam(model.parameters(), lr=1e-3)
    carry_optimizer_state(optimizer, new, before, dict(model.named_parameters()), report.kept_indices)
    even = torch.arange(0, 32, 2)
    for name, param in model.named_parameters():
        state = new.state[param]
        assert state["exp_avg"].shape == param.shape, name
        old = old_state[name]["exp_avg"]
        if name.endswith("mlp.0.weight"):
            old = old[even]
        elif name.endswith("mlp.0.bias"):
            old = old[even]
        elif name.endswith("mlp.2.weight"):
            old = old[:, even]
        assert torch.equal(state["exp_avg"], old), name
    assert {n for n in report.kept_indices} == {f"blocks.{i}.mlp.{p}" for i in range(2)
                                                 for p in ("0.weight", "0.bias", "2.weight")}


# ---------------------------------------------------------------------------------------------- plans


def test_a_plan_replays_bit_identically_and_keeps_the_sources_options():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in, self.w_out = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.w_out(torch.relu(self.w_in(x)))

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(Custom(), Custom()).eval()

    source = FeedForwardSource(modules=["1"], inputs=("w_in",), output="w_out")
    model, x = make(0), torch.randn(3, 8)
    report = prune_neurons(model, {"1": torch.arange(16) < 5}, x, source=source, measure_latency=False)
    assert report.plan.options == {"source_options": {"modules": ["1"], "inputs": ["w_in"], "output": "w_out"}}
    assert report.plan.pruned_groups == [["1", list(range(5, 16))]]
    fresh = make(1)
    kept = apply_plan(fresh, json.loads(json.dumps(report.plan.to_dict())))  # no source given: the plan's own
    assert kept.keys() == report.kept_indices.keys()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="already pruned"):
        apply_plan(fresh, report.plan)


def bad_plans():
    model = nn.Sequential(Mlp(), Mlp())
    report = prune_neurons(model, {"0": torch.arange(16) % 2 == 0}, measure_latency=False)
    plan = report.plan.to_dict()

    def edited(**fields):
        return {**copy.deepcopy(plan), **fields}

    return [
        ("malformed", edited(pruned_groups=[["0", [1, "x"]]]), r"pruned_groups\[0\] must be \[block name, neuron"),
        ("twice", edited(pruned_groups=[["0", [1]], ["0", [3]]]), "names the block '0' a second time"),
        ("uncounted", edited(pruned_groups=[["2", [1]]]), "'2', which units_before does not count"),
        ("out of range", edited(pruned_groups=[["0", [1, 16]]]), r"do not fit '0' with 16 neurons"),
        ("duplicates", edited(pruned_groups=[["0", [1, 1]]]), r"do not fit '0' with 16 neurons"),
        ("all", edited(pruned_groups=[["0", list(range(16))]], units_after={"0": 0, "1": 16}),
         "at least one neuron kept"),
        ("counts", edited(units_after={"0": 9, "1": 16}), "removes 8 neurons of '0' but says 9"),
        ("other model", edited(units_before={"0": 16, "1": 16, "2": 16}, units_after={"0": 8, "1": 16, "2": 16}),
         r"lacks or does not recognise: \['2'\]"),
        ("wider", edited(units_before={"0": 32, "1": 16}), r"neuron counts \{'0': 16, '1': 16\} differ"),
        ("options", edited(options={"source_options": {"projections": ["a"]}}), "does not take"),
    ]


@pytest.mark.parametrize(("case", "plan", "match"), bad_plans(), ids=[c[0] for c in bad_plans()])
def test_a_plan_that_does_not_fit_is_refused_before_any_change(case, plan, match):
    model = nn.Sequential(Mlp(), Mlp())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan)
    assert_same_state(model, state)
    assert model[0].fc1.out_features == 16


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_tickets_are_refused_and_the_model_is_unchanged():
    model = nn.Sequential(Mlp())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="empty"):
        prune_neurons(model, {})
    with pytest.raises(ValueError, match="not tracked feed-forward blocks"):
        prune_neurons(model, {"0.fc1": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="has 8 neurons but the block has 16"):
        prune_neurons(model, {"0": torch.ones(8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="1-D torch.bool"):
        prune_neurons(model, {"0": torch.ones(16)})
    with pytest.raises(ValueError, match="`round_to` must be None or an integer >= 1"):
        prune_neurons(model, {"0": torch.ones(16, dtype=torch.bool)}, round_to=0)
    assert_same_state(model, state)


def test_a_block_that_mixes_its_neurons_fails_the_check_and_is_left_unchanged():
    class Mixing(nn.Module):  # looks like fc1/fc2, but a softmax runs across the neurons
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(self.fc1(x).softmax(-1))

    torch.manual_seed(0)
    model, x = Mixing(), torch.randn(2, 8)
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"neurons surgery does not compute.*first differ at 'fc2' \(Linear\).*"
                                           r"left unchanged.*only through element-wise functions"):
        prune_neurons(model, {"": torch.arange(16) < 8}, x, measure_latency=False)
    assert_same_state(model, state)
    assert list(model.parameters()) == params and model.fc1.out_features == 16  # the very same parameters
    with pytest.raises(PruningError, match="cannot be pruned by FeedForwardSource"):
        check_prunable(model, FeedForwardSource(), x)
    assert_same_state(model, state)


def test_tied_projections_are_refused():
    first, second = Mlp(), Mlp()
    second.fc1.weight = first.fc1.weight  # tied
    model = nn.Sequential(first, second)
    with pytest.raises(ValueError, match=r"cannot lose neurons \('0': its 'fc1.weight' is shared with '1.fc1.weight'"):
        check_prunable(model, FeedForwardSource())
    with pytest.raises(ValueError, match="cannot be removed: its 'fc1.weight' is shared"):
        prune_neurons(model, {"0": torch.arange(16) < 8})
    assert model[0].fc1.out_features == 16
    assert check_prunable(nn.Sequential(Mlp()), FeedForwardSource()).kind == "neurons"


# ---------------------------------------------------------------------------------------------- Lightning


def test_prune_and_finetune_removes_neurons_mid_fit_and_load_pruned_reloads(tmp_path):
    from lightning_worm import load_pruned

    model = tiny_vit()
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, source=FeedForwardSource())
    prune = PruneAndFinetune(eb, measure_latency=False, wait_for="ticket")
    t = trainer(tmp_path, callbacks=[eb, WormCallback(eb, schedule="fixed", chi=0.01), prune], max_epochs=3)
    t.fit(model, tiny_loader())
    assert prune.pruned_epoch == 1 and t.current_epoch == 3
    assert list(eb.ticket) == ["model.blocks.0.mlp", "model.blocks.1.mlp"]
    for name, keep in eb.ticket.items():
        mlp = model.get_submodule(name)
        assert mlp[0].out_features == mlp[2].in_features == max(int(keep.sum()), 1) < 32
    assert prune.plan.kind == "neurons"
    state = t.optimizers[0].state
    for name, p in model.named_parameters():
        assert state[p]["exp_avg"].shape == p.shape, name  # Adam moments sliced with the neurons
    path = tmp_path / "pruned.ckpt"
    t.save_checkpoint(path)
    loaded = load_pruned(ViTClassifier, path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_the_plan_is_a_neurons_plan():
    plan = PruningPlan.from_dict(prune_neurons(nn.Sequential(Mlp()), {"0": torch.arange(16) < 4},
                                               measure_latency=False).plan.to_dict())
    plan.validate()
    assert (plan.kind, plan.source, plan.units_before, plan.units_after) == ("neurons", "ffn_neurons", {"0": 16},
                                                                             {"0": 4})


def test_a_prune_of_an_fsdp2_model_between_unsharded_equals_the_plain_prune(one_rank_mesh):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from lightning_worm.core.sharding import whole
    from lightning_worm.core.surgery.sharded import unsharded

    def make():
        torch.manual_seed(0)
        return nn.Sequential(Mlp(), GPT2Mlp(), PackedMlp())

    x = torch.randn(2, 5, 8)
    results = []
    for model in (make(), fully_shard(make(), mesh=one_rank_mesh)):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(x).square().mean().backward()
        optimizer.step()
        ticket = half(FeedForwardSource().tracked(model))
        before = dict(model.named_parameters())
        with unsharded(model):
            report = prune_neurons(model, ticket, x, measure_latency=False)
        new = torch.optim.Adam(model.parameters(), lr=1e-3)
        carry_optimizer_state(optimizer, new, before, dict(model.named_parameters()), report.kept_indices)
        results.append((model, new))
    (plain, plain_opt), (sharded, sharded_opt) = results
    assert isinstance(sharded, FSDPModule)
    for p, q in zip(plain.parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(whole(q), p)
        torch.testing.assert_close(whole(sharded_opt.state[q]["exp_avg"]), plain_opt.state[p]["exp_avg"])
    with torch.no_grad():
        torch.testing.assert_close(sharded(x), plain(x))
