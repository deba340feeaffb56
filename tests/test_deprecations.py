"""Names renamed in 0.2 keep working for one minor release, with a DeprecationWarning naming the new one."""

import pytest
import torch

from lightning_worm import EarlyBirdCallback, GradientTruncation, WormCallback, channel_mask, unit_mask
from lightning_worm.core import channel_scores, unit_scores
from lightning_worm.core.surgery import PruningPlan, prune_channels
from tests.helpers import global_ticket, randomize_batchnorms
from tests.models import TinyNet


def test_channel_mask_and_channel_scores_are_unit_mask_and_unit_scores():
    model = randomize_batchnorms(TinyNet())
    with pytest.deprecated_call(match="`channel_mask` is deprecated.*use `unit_mask`"):
        old = channel_mask(model, 0.5, min_channels=2)
    assert torch.equal(old.flat, unit_mask(model, 0.5, min_units=2).flat)
    with pytest.deprecated_call(match="use `unit_scores`"):
        scores = channel_scores(model)
    assert all(torch.equal(scores[n], s) for n, s in unit_scores(model).items())


def test_min_channels_is_min_units_and_the_state_key_keeps_its_name():
    with pytest.deprecated_call(match=r"EarlyBirdCallback\(min_channels=...\)"):
        tracker = EarlyBirdCallback(min_channels=2)
    assert tracker.min_units == 2
    with pytest.deprecated_call(match="EarlyBirdCallback.min_units"):
        assert tracker.min_channels == 2
    assert "'min_channels': 2" in tracker.state_key  # checkpoints written before the rename still resume


def test_truncated_channels_is_truncated_units():
    model = randomize_batchnorms(TinyNet())
    truncation = GradientTruncation(model)
    truncation.set(unit_mask(model, 0.5), chi=0.5)
    with pytest.deprecated_call(match="GradientTruncation.truncated_units"):
        assert truncation.truncated_channels == truncation.truncated_units == 12
    with pytest.deprecated_call(match="WormCallback.truncated_units"):
        assert WormCallback().truncated_channels == 0


def test_the_report_and_the_plan_answer_to_their_old_names():
    model = randomize_batchnorms(TinyNet())
    report = prune_channels(model, global_ticket(model), torch.randn(2, 3, 8, 8), measure_latency=False)
    with pytest.deprecated_call(match="PruningReport.units_after"):
        assert report.channels_after == report.units_after
    with pytest.deprecated_call(match="PruningReport.kept_for_min_units"):
        assert report.kept_for_min_channels == report.kept_for_min_units
    with pytest.deprecated_call(match="PruningPlan.units_before"):
        assert report.plan.channels_before == report.plan.units_before
    assert "units_after" in report.to_dict() and "channels_after" not in report.to_dict()
    assert PruningPlan.from_dict(report.plan.to_dict()) == report.plan


def test_pruning_plan_is_find_pruning_plan():
    from lightning_worm.checkpoint import find_pruning_plan, pruning_plan

    with pytest.deprecated_call(match="use `find_pruning_plan`"):
        assert pruning_plan({}) is find_pruning_plan({}) is None
