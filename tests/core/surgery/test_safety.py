"""Every prune is all or nothing and checks itself; measuring never blocks it; the report tells the truth.

Each test here failed before the change it pins (issue 16): a prune that computes something else than removing
the units (a normalisation over channels, GPT-NeoX's per-head packed layout), a forward broken by the cut, a
failure inside torch-pruning, a LayerNorm prune through ``prune_channels``, a FLOP counter that fails, a
``removed_fraction`` that counted only the prunable units.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_worm import AttentionHeadSource, PruningError, check_prunable
from lightning_worm.core import measure
from lightning_worm.core.surgery import (
    ModelState,
    all_or_nothing,
    channels,
    prune_channels,
    prune_heads,
    trial_prune,
)
from lightning_worm.core.surgery import decision as decisions
from tests.helpers import global_ticket, randomize_batchnorms
from tests.models import (
    ChannelCentred,
    CheckedNet,
    InterleavedNet,
    PackedNet,
    SmallResNet,
    SmallVGG,
    TinyNet,
    bert,
    vit,
)

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
X16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # SmallVGG's input


def snapshot(model: nn.Module) -> dict:
    """What must be exactly as before: parameter objects, every tensor's value, sizes, outputs."""
    with torch.no_grad():
        out = model.eval()(X16 if isinstance(model, SmallVGG) else X)
    return {
        "parameters": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "sizes": [(n, getattr(m, "out_channels", None), getattr(m, "num_features", None))
                  for n, m in model.named_modules()],
        "hooks": [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        "out": out,
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["parameters"] == before["parameters"]
    assert after["sizes"] == before["sizes"] and after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    if before["out"] is not None:
        assert torch.equal(after["out"], before["out"])


def model_of(cls, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(cls(**kwargs))


# ------------------------------------------------------------------------------------------ all or nothing


def test_model_state_restores_the_same_parameter_objects_sizes_and_hooks():
    model = model_of(SmallResNet, width=8)
    model.register_forward_hook(lambda *args: None)
    before = snapshot(model)
    state = ModelState(model)
    prune_channels(model, global_ticket(model), X, measure_latency=False)
    assert snapshot(model)["sizes"] != before["sizes"]
    state.restore()
    assert_unchanged(model, before)


def test_a_failure_inside_torch_pruning_is_wrapped_chained_and_undone(monkeypatch):
    model = model_of(SmallResNet, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    optimizer.step()
    before = snapshot(model)
    original = channels.cut

    def half_cut(graph, cuts):
        original(graph, dict(list(cuts.items())[: len(cuts) // 2]))  # the model is half cut when it fails
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(channels, "cut", half_cut)
    with pytest.raises(PruningError, match=r"Pruning the channels failed \(TypeError: unsupported.*left unchanged"
                       ) as caught:
        prune_channels(model, global_ticket(model), X, measure_latency=False)
    assert isinstance(caught.value.__cause__, TypeError)
    assert_unchanged(model, before)
    model.train()(X).sum().backward()
    optimizer.step()  # the optimizer still holds the model's parameters and their state


def test_the_decision_and_the_cut_must_agree(monkeypatch):
    """A cut that removes other channels than decided (GhostNet's slices did) is refused, not reported."""
    model = model_of(SmallVGG, width=8)
    before = snapshot(model)
    decide = decisions.decide

    def miscounted(*args, **kwargs):
        decision = decide(*args, **kwargs)
        decision.removed_by_entry["features.1"] += 1
        return decision

    monkeypatch.setattr(decisions, "decide", miscounted)
    with pytest.raises(PruningError, match=r"removed other channels than decided: features.1 lost \d+ of 8"):
        prune_channels(model, global_ticket(model), X16, measure_latency=False)
    assert_unchanged(model, before)


def test_all_or_nothing_passes_its_own_errors_through_and_undoes_an_interrupt():
    model = model_of(TinyNet)
    before = snapshot(model)
    for error in (ValueError("bad"), KeyboardInterrupt()):
        with pytest.raises(type(error)), all_or_nothing(model):
            model.features[0] = nn.Identity()
            raise error
        assert_unchanged(model, before)


# -------------------------------------------------------------------------------------------- self-check


def test_a_prune_that_changes_the_function_is_refused_naming_where_outputs_differ():
    model = model_of(ChannelCentred)
    before = snapshot(model)
    with pytest.raises(PruningError, match=r"pruned model and the dense model with the removed channels zeroed give "
                       r"a relative difference.*first differ at 'classifier'.*features.0.*left unchanged"):
        prune_channels(model, global_ticket(model), X, measure_latency=False)
    assert_unchanged(model, before)
    report = prune_channels(model, global_ticket(model), X, measure_latency=False, check=False)  # at one's own risk
    assert report.removed_fraction > 0.4


def test_a_forward_broken_by_the_cut_names_the_module_and_is_undone():
    model = model_of(CheckedNet)
    before = snapshot(model)
    with pytest.raises(PruningError, match=r"forward failed after pruning in 'features.3' \(Checked\) "
                       r"\(AssertionError: expected 8 channels, got \d\).*left unchanged") as caught:
        prune_channels(model, global_ticket(model), X, measure_latency=False)
    assert isinstance(caught.value.__cause__, AssertionError)
    assert_unchanged(model, before)


def test_the_check_passes_exact_prunes():
    for cls, x in ((SmallResNet, X), (SmallVGG, X16)):
        model = model_of(cls, width=8)
        prune_channels(model, global_ticket(model), x, measure_latency=False)  # checked by default: no error


def test_a_packed_projection_laid_out_per_head_is_refused():
    """GPT-NeoX packs [q_h | k_h | v_h] per head: cutting [q | k | v] rows takes rows of three heads."""
    keep = {"attn": torch.tensor([True, False, True, False])}
    x = torch.randn(2, 5, 16)
    source = AttentionHeadSource(modules=["attn"])
    model = InterleavedNet().eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PruningError, match=r"removed heads zeroed give a relative difference.*'attn.proj'.*"
                       r"attn.qkv.*\[q_h \| k_h \| v_h\]"):
        prune_heads(model, keep, x, source=source, measure_latency=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.attn.qkv.out_features == 48
    report = prune_heads(PackedNet().eval(), keep, x, source=source, measure_latency=False)  # [q | k | v]: right
    assert report.units_after == {"attn": 2}


def test_head_prunes_of_hugging_face_and_vit_blocks_pass_the_check():
    ids = torch.randint(0, 50, (2, 6))
    model = bert()
    keep = {name: torch.tensor([True, False, True, False]) for name in AttentionHeadSource().tracked(model)}
    prune_heads(model, keep, ids, measure_latency=False)
    model = vit()
    keep = {name: torch.tensor([False, True, True, False]) for name in AttentionHeadSource().tracked(model)}
    prune_heads(model, keep, torch.randn(2, 3, 32, 32), measure_latency=False)


# -------------------------------------------------------------------------------------- refused sources


def test_prune_channels_refuses_layernorm_channels():
    model = vit()
    state = copy.deepcopy(model.state_dict())
    ticket = {name: torch.rand(m.normalized_shape[0]) > 0.5 for name, m in model.named_modules()
              if isinstance(m, nn.LayerNorm)}
    with pytest.raises(ValueError, match="LayerNormSource cannot remove channels physically"):
        prune_channels(model, ticket, torch.randn(2, 3, 32, 32), source="layernorm", measure_latency=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# -------------------------------------------------------------------------------------------- measuring


def test_a_flop_counter_that_fails_is_a_warning_and_an_empty_field(monkeypatch):
    def broken(*args, **kwargs):
        raise AssertionError("a FlopCounterMode failure")

    monkeypatch.setattr(measure, "count_flops", broken)
    monkeypatch.setattr(measure, "forward_flops", broken)
    model = model_of(SmallVGG, width=8)
    with pytest.warns(UserWarning, match=r"Counting the FLOPs before pruning failed \(AssertionError.*left empty"):
        report = prune_channels(model, global_ticket(model), X16, measure_latency=False)
    assert report.flops_before is None and report.flops_after is None and report.params_after < report.params_before
    with pytest.warns(UserWarning, match="Counting the FLOPs before pruning failed"):
        report = prune_heads(vit(), {"blocks.0.attn": torch.tensor([True, False, True, True])},
                             torch.randn(2, 3, 32, 32), measure_latency=False)
    assert report.flops_before is None and report.units_after["blocks.0.attn"] == 3


def test_a_latency_that_fails_is_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no timer here")

    monkeypatch.setattr(measure, "latency_ms", broken)
    model = model_of(SmallVGG, width=8)
    with pytest.warns(UserWarning, match="Timing the model failed"):
        report = prune_channels(model, global_ticket(model), X16, latency_repeats=1)
    assert report.latency_before_ms is None and report.flops_after < report.flops_before


# ----------------------------------------------------------------------------------------- the report


def test_removed_fraction_is_what_was_removed_and_a_shortfall_is_named():
    model = model_of(SmallResNet, width=8)
    ticket = global_ticket(model)
    with pytest.warns(UserWarning, match=r"prune_channels: the surgery removed .* % of the units, the ticket asks "
                      r"50.0 %: it kept \d+ for coupling.*Most were kept in .*coupling='mean_rank'"):
        report = prune_channels(model, ticket, X, coupling="all", measure_latency=False)
    total = sum(report.units_before.values())
    assert report.removed_fraction == pytest.approx(1 - sum(report.units_after.values()) / total)
    assert report.asked_fraction == pytest.approx(0.5, abs=0.01)
    assert report.kept_by_entry and all(set(c) <= {"coupling", "unprunable", "min_units", "round_to"}
                                        for c in report.kept_by_entry.values())
    assert sum(n for c in report.kept_by_entry.values() for n in c.values()) == (
        report.kept_for_coupling + report.kept_unprunable + report.kept_for_min_units + report.kept_for_round_to)
    assert report.note.startswith("Removed less than asked: the surgery removed")
    assert report.to_dict()["asked_fraction"] == report.asked_fraction

    model = model_of(SmallVGG, width=8)  # nothing coupled: exactly the ticket, no note
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = prune_channels(model, global_ticket(model), X16, measure_latency=False)
    assert report.removed_fraction == 0.5 and report.shortfall is None and report.note is None


# ------------------------------------------------------------------------------------------ before the search


def test_trial_prune_reports_and_leaves_the_model_as_it_was():
    model = model_of(SmallResNet, width=8)
    before = snapshot(model)
    report = trial_prune(model, X, ratio=0.5, coupling="mean_rank")
    assert abs(report.removed_fraction - 0.5) <= 0.05 and report.params_after < report.params_before
    assert report.latency_before_ms is None
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"takes \['coupling', 'round_to'.*not \['couplings'\]"):
        trial_prune(model, X, couplings="all")


def test_check_prunable_refuses_before_any_change_naming_the_model_the_ratio_and_the_module():
    model = model_of(ChannelCentred)
    before = snapshot(model)
    with pytest.raises(PruningError, match=r"ChannelCentred cannot be pruned by BatchNormSource.*trial prune at ratio "
                       r"0.3.*first differ at 'classifier'"):
        check_prunable(model, "batchnorm", X, ratio=0.3)
    assert_unchanged(model, before)
    assert check_prunable(model, "batchnorm").kind == "channels"  # without an input: the registered check only
    with pytest.raises(PruningError, match=r"InterleavedNet cannot be pruned by AttentionHeadSource"):
        check_prunable(InterleavedNet().eval(), AttentionHeadSource(modules=["attn"]), torch.randn(2, 5, 16))


def test_a_long_step_says_which_step_it_is_in(caplog, monkeypatch):
    from lightning_worm.core.surgery import progress as progress_module

    slow_decide = decisions.decide

    def slow(*args, **kwargs):
        import time

        time.sleep(0.3)
        return slow_decide(*args, **kwargs)

    monkeypatch.setattr(decisions, "decide", slow)
    monkeypatch.setattr(progress_module.Progress.__init__, "__defaults__", (0.1,))
    model = model_of(SmallResNet, width=8)
    with caplog.at_level("WARNING", logger="lightning_worm.surgery"):
        prune_channels(model, global_ticket(model), X, measure_latency=False)
    assert any("prune_channels: still grouping the coupled channels" in r.message for r in caplog.records)
