"""Several sources in one search: SourceList's entries, per-source ratios and scopes, one prune, its replay."""

import copy

import pytest
import torch

from lightning_worm import AttentionHeadSource, BatchNormSource, PruningError, apply_plan, unit_mask
from lightning_worm.core.masks import rank_units, unit_scores
from lightning_worm.core.readiness import score_share
from lightning_worm.core.sources import SourceList, resolve_source
from lightning_worm.core.surgery import check_prunable, prune_sources
from lightning_worm.core.surgery.combined import compose_kept
from tests.models import HybridNet


def hybrid():
    torch.manual_seed(0)
    model = HybridNet().eval()
    with torch.no_grad():
        model.stem[1].weight.copy_(torch.linspace(0.1, 0.8, 8))
    return model


def sources(**heads):
    return SourceList([BatchNormSource(), AttentionHeadSource(**heads)])


def test_a_list_becomes_a_source_list_of_its_members_in_order():
    source = resolve_source(["batchnorm", AttentionHeadSource(scope="layer", prune_ratio=0.25)])
    assert isinstance(source, SourceList)
    assert [type(s) for s in source.sources] == [BatchNormSource, AttentionHeadSource]
    assert source.label() == "[BatchNormSource, AttentionHeadSource(prune_ratio=0.25, scope='layer')]"
    tracked = source.tracked(hybrid())
    assert list(tracked) == ["stem.1", "blocks.0.attn", "blocks.1.attn"]
    assert [name for _, names in source.parts(hybrid()) for name in names] == list(tracked)


@pytest.mark.parametrize("bad", [[], "batchnorm", [1]])
def test_a_source_list_refuses_what_is_not_a_list_of_sources(bad):
    with pytest.raises(ValueError, match="SourceList|ScoreSource"):
        SourceList(bad)


def test_one_source_twice_and_overlapping_entries_are_refused():
    heads = AttentionHeadSource()
    with pytest.raises(ValueError, match="one source twice"):
        SourceList([heads, heads])
    with pytest.raises(ValueError, match="both track an entry named 'blocks.0.attn'"):
        SourceList([AttentionHeadSource(), AttentionHeadSource(scope="layer")]).tracked(hybrid())


@pytest.mark.parametrize("bad", [{"prune_ratio": 1.0}, {"prune_ratio": 0}, {"scope": "block"}])
def test_ranking_settings_are_validated(bad):
    with pytest.raises(ValueError, match="prune_ratio|scope"):
        AttentionHeadSource(**bad)


def test_each_source_ranks_its_units_with_its_own_ratio_and_scope():
    model = hybrid()
    with torch.no_grad():  # block 0's heads all outscore block 1's: a global ranking would empty block 1 first
        for i, block in enumerate(model.blocks):
            for proj in (block.attn.q_proj, block.attn.k_proj):
                proj.weight.mul_(10.0 if i == 0 else 0.1)
    source = sources(prune_ratio=0.5, scope="layer")
    mask = unit_mask(model, prune_ratio=0.25, source=source)
    assert int((~mask["stem.1"]).sum()) == 2  # the tracker's ratio: 25 % of 8 channels
    assert torch.equal(mask["stem.1"][:2], torch.tensor([False, False]))  # the smallest gammas
    assert [int(mask[f"blocks.{i}.attn"].sum()) for i in range(2)] == [2, 2]  # half of every block
    globally = unit_mask(model, prune_ratio=0.25, source=sources(prune_ratio=0.5))
    assert [int(globally[f"blocks.{i}.attn"].sum()) for i in range(2)] == [4, 0 + 1]  # global; min_units keeps one


def test_one_source_of_global_scope_ranks_as_before():
    model = hybrid()
    source = BatchNormSource()
    scores = unit_scores(model, source)
    assert torch.equal(rank_units(scores, source.parts(model), 0.5).mask.flat,
                       unit_mask(model, 0.5).flat)


def test_the_score_share_of_several_sources_is_the_mean_of_their_shares():
    scores = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([100.0, 300.0])}
    mask = {"a": torch.tensor([False, True]), "b": torch.tensor([True, True])}
    share = score_share(scores, mask, [["a"], ["b"]])
    assert share.pruned == pytest.approx((0.25 + 0.0) / 2) and share.random == pytest.approx(0.25)
    assert score_share(scores, mask).pruned == pytest.approx(1 / 404)  # one pool: "b"'s scale would swamp "a"


def test_prune_sources_removes_every_members_units_in_one_checked_prune_and_replays():
    model = hybrid()
    source = sources(prune_ratio=0.5, scope="layer")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    check_prunable(model, source, x, ratio=0.5)
    ticket = unit_mask(model, prune_ratio=0.5, source=source)
    report = prune_sources(model, ticket, x, source=source, measure_latency=False)
    assert report.units_after == {"stem.1": 4, "blocks.0.attn": 2, "blocks.1.attn": 2}
    assert model.stem[1].num_features == 4 and model.blocks[0].attn.num_heads == 2
    assert report.plan.kind == "sources"
    assert [p["kind"] for p in report.plan.options["plans"]] == ["channels", "heads"]
    assert report.shares == {"BatchNormSource": {"before": 8, "after": 4, "entries": ["stem.1"]},
                             "AttentionHeadSource": {"before": 8, "after": 4,
                                                     "entries": ["blocks.0.attn", "blocks.1.attn"]}}
    assert report.ticket_pruned == 8 and report.removed_fraction == pytest.approx(0.5)
    assert report.flops_after < report.flops_before
    assert report.kept_indices["stem.1.weight"][0].tolist() == [4, 5, 6, 7]
    with torch.no_grad():
        out = model(x)
    fresh = hybrid()
    apply_plan(fresh, report.plan.to_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_a_failing_member_leaves_the_model_as_it_was(monkeypatch):
    import lightning_worm.core.surgery.heads as heads

    model = hybrid()
    source = sources()
    state = copy.deepcopy(model.state_dict())
    ticket = unit_mask(model, prune_ratio=0.5, source=source)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(heads, "_cut_heads", broken)
    with pytest.raises(PruningError, match="boom"):
        prune_sources(model, ticket, torch.zeros(2, 3, 8, 8), source=source, measure_latency=False)
    assert model.stem[1].num_features == 8  # the channels, pruned first, are back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_ticket_entry_no_member_tracks_is_refused():
    model = hybrid()
    with pytest.raises(ValueError, match=r"names \['nope'\], which no source"):
        prune_sources(model, {"nope": torch.tensor([True])}, torch.zeros(1, 3, 8, 8), source=sources())


def test_a_replay_that_does_not_fit_leaves_the_model_as_it_was():
    model = hybrid()
    source = sources()
    report = prune_sources(model, unit_mask(model, 0.5, source=source), torch.zeros(2, 3, 8, 8), source=source,
                           measure_latency=False)
    plan = report.plan.to_dict()
    plan["options"]["plans"][1]["units_before"]["blocks.1.attn"] = 7  # the second member's plan does not fit
    fresh = hybrid()
    with pytest.raises(ValueError, match="head counts"):
        apply_plan(fresh, plan)
    assert fresh.stem[1].num_features == 8


def test_kept_indices_of_two_surgeries_in_a_row_compose():
    first = {"w": [torch.tensor([1, 3, 5, 7]), None]}
    then = {"w": [torch.tensor([0, 2]), torch.tensor([1])], "b": [torch.tensor([0])]}
    out = compose_kept(first, then)
    assert out["w"][0].tolist() == [1, 5] and out["w"][1].tolist() == [1] and out["b"][0].tolist() == [0]
