"""The pure-PyTorch core on hand-computed cases."""

import math

import pytest
import torch
from torch import nn

from lightning_worm.core import (
    BatchNormSource,
    ChiSchedule,
    GradientTruncation,
    NonFiniteScoreError,
    TicketDetector,
    add_sparsity_gradient,
    mask_distance,
    mask_from_scores,
    unit_mask,
)
from tests.models import two_layer


def as_lists(mask):
    return {k: v.tolist() for k, v in mask.items()}


class TestChannelMask:
    def test_global_ranking_hand_computed(self):
        model = two_layer([0.5, 0.1, 0.1, 0.9], [0.2, 0.1, 0.3, 0.05, 0.7, 0.1])
        # sorted: 0.05 (3:3), then the four 0.1 in layer order: 1:1, 1:2, 3:1, 3:5 -> prune those 5
        assert as_lists(unit_mask(model, 0.5)) == {
            "1": [True, False, False, True], "3": [True, False, True, False, True, False]}

    def test_ties_pruned_in_layer_then_channel_order(self):
        model = two_layer([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])  # all equal, as at initialisation
        # a stable ascending sort: the first four channels in layer order go ... but min_units=1
        # keeps the first layer's lowest index, so one fewer is pruned (and reported)
        assert as_lists(unit_mask(model, 0.5)) == {"1": [True, False, False, False], "3": [True] * 4}
        result = mask_from_scores({"1": torch.ones(4), "3": torch.ones(4)}, 0.5)
        assert (result.requested, result.pruned) == (4, 3)
        model = two_layer([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
        assert as_lists(unit_mask(model, 0.25)) == {"1": [False, False, True, True], "3": [True] * 4}

    def test_magnitude_not_sign(self):
        model = two_layer([-0.9, 0.2], [0.3, -0.1])
        assert as_lists(unit_mask(model, 0.5)) == {"1": [True, False], "3": [True, False]}

    def test_round_half_to_even_count(self):
        model = two_layer([0.1, 0.2, 0.3], [0.4, 0.5])
        result = mask_from_scores({"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([0.4, 0.5])}, 0.5)
        assert result.requested == round(2.5) == 2 and result.pruned == 2
        assert sum((~m).sum().item() for m in unit_mask(model, 0.3).values()) == round(0.3 * 5)

    def test_min_channels_keeps_largest_and_reports(self):
        scores = {"a": torch.tensor([0.1, 0.3, 0.2, 0.3]), "b": torch.tensor([0.9, 0.8, 0.7, 0.6])}
        result = mask_from_scores(scores, 0.5, min_units=2)
        # the ratio prunes all of "a"; it keeps its two largest instead (0.3 and 0.3: ties keep lower index 1, 3)
        assert result.mask["a"].tolist() == [False, True, False, True]
        assert result.mask["b"].tolist() == [True, True, True, True]
        assert (result.requested, result.pruned, result.restored) == (4, 2, {"a": 2})

    def test_min_channels_tie_keeps_lower_index(self):
        result = mask_from_scores({"a": torch.tensor([0.2, 0.2, 0.2]), "b": torch.tensor([5.0, 5.0, 5.0])},
                                  0.5, min_units=1)
        assert result.mask["a"].tolist() == [True, False, False]
        assert result.restored == {"a": 1}

    def test_min_channels_larger_than_layer_keeps_whole_layer(self):
        result = mask_from_scores({"a": torch.tensor([0.1, 0.2]), "b": torch.arange(1.0, 9.0)}, 0.2, min_units=4)
        assert result.mask["a"].tolist() == [True, True]

    def test_bn_types_and_what_is_left_out(self):
        model = nn.Sequential(
            nn.Linear(4, 3), nn.BatchNorm1d(3),                      # 0, 1 tracked
            nn.BatchNorm2d(2),                                       # 2 tracked
            nn.BatchNorm3d(2),                                       # 3 tracked
            nn.SyncBatchNorm(2),                                     # 4 tracked
            nn.BatchNorm2d(2, affine=False),                         # 5 not affine
            nn.BatchNorm2d(2),                                       # 6 frozen
            nn.LazyBatchNorm2d(),                                    # 7 lazy, not materialised
        )
        model[6].weight.requires_grad_(False)
        source = BatchNormSource()
        assert list(source.tracked(model)) == ["1", "2", "3", "4"]
        assert source.skipped(model) == {"5": "not affine", "6": "weight frozen (requires_grad=False)",
                                         "7": "lazy, not materialised yet: run one forward pass before the fit"}
        model[7](torch.randn(2, 5, 3, 3))  # materialise
        assert list(source.tracked(model)) == ["1", "2", "3", "4", "7"]
        mask = unit_mask(model, 0.5)
        assert [m.numel() for m in mask.values()] == [3, 2, 2, 2, 5]

    def test_half_precision_scores_compared_in_float32(self):
        model = two_layer([1.0, 1.0039, 1.0078], [0.5, 2.0]).to(torch.bfloat16)
        scores = BatchNormSource().scores(model[1])
        assert scores.dtype == torch.float32
        assert unit_mask(model, 0.4)["3"].tolist() == [False, True]

    def test_mask_on_parameter_device_and_bool(self):
        mask = unit_mask(two_layer([0.1, 0.2], [0.3, 0.4]), 0.5)
        assert all(m.dtype == torch.bool and m.device == torch.device("cpu") for m in mask.values())

    def test_non_finite_names_layer(self):
        model = two_layer([0.1, float("nan")], [0.3, float("inf")])
        with pytest.raises(NonFiniteScoreError, match=r"2 layer\(s\): 1, 3") as err:
            unit_mask(model, 0.5)
        assert err.value.layers == ["1", "3"]

    @pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, "0.5"])
    def test_bad_ratio(self, ratio):
        with pytest.raises(ValueError, match="prune_ratio"):
            unit_mask(two_layer([0.1], [0.2]), ratio)

    def test_bad_min_channels(self):
        with pytest.raises(ValueError, match="min_units"):
            unit_mask(two_layer([0.1], [0.2]), 0.5, min_units=0)

    def test_no_channels(self):
        with pytest.raises(ValueError, match="no tracked channels"):
            unit_mask(nn.Linear(2, 2), 0.5)

    def test_100k_channels(self):
        model = nn.Sequential(*[nn.BatchNorm2d(1000) for _ in range(100)])
        for bn in model:
            bn.weight.data.uniform_()
        mask = unit_mask(model, 0.5)
        assert sum(int(m.sum()) for m in mask.values()) == 50_000


class TestMaskDistance:
    def test_hand_computed(self):
        a = {"x": torch.tensor([True, False, True]), "y": torch.tensor([True])}
        b = {"x": torch.tensor([True, True, False]), "y": torch.tensor([True])}
        assert mask_distance(a, b) == 0.5
        assert mask_distance(a, a) == 0.0

    def test_different_layouts_raise(self):
        with pytest.raises(ValueError, match="different layers"):
            mask_distance({"x": torch.ones(3, dtype=torch.bool)}, {"x": torch.ones(2, dtype=torch.bool)})


def masks_of(*rows):
    return [{"a": torch.tensor(r[:2]), "b": torch.tensor(r[2:])} for r in rows]


class TestDetector:
    def test_window_distances_and_ticket(self):
        det = TicketDetector(window=3, threshold=0.25)
        seq = masks_of([1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1])
        seq = [{k: v.bool() for k, v in m.items()} for m in seq]
        out = [det.update(m) for m in seq]
        assert all(math.isnan(d) for d, _ in out[:2])
        # epoch 2: newest [1,0,1,1] vs [1,1,0,0] -> 3/4, vs [1,0,1,0] -> 1/4
        assert out[2] == (0.75, 0.5)
        # epoch 3: vs [1,0,1,0] -> 1/4, vs [1,0,1,1] -> 0  => max 0.25 <= threshold: ticket
        assert out[3] == (0.25, 0.125)
        assert det.ticket_epoch == 3
        assert {k: v.tolist() for k, v in det.ticket.items()} == {"a": [True, False], "b": [True, True]}
        assert det.distances[4] == 0.0 and det.ticket_epoch == 3  # frozen at first detection
        assert len(det.history) == 5 and det.history_epochs == [0, 1, 2, 3, 4]

    def test_skip_records_nan_and_keeps_window(self):
        det = TicketDetector(window=2, threshold=0.0)
        m = {"a": torch.tensor([True, False])}
        det.update(m)
        det.skip()
        assert det.update(m) == (0.0, 0.0)
        assert det.ticket_epoch == 2 and math.isnan(det.distances[1])

    def test_state_dict_round_trip(self):
        det = TicketDetector(window=2, threshold=0.5)
        for r in ([True, False], [True, True], [True, True]):
            det.update({"a": torch.tensor(r)})
        clone = TicketDetector(window=2, threshold=0.5)
        clone.load_state_dict(det.state_dict())
        m = {"a": torch.tensor([False, True])}
        assert det.update(m) == clone.update(m)
        assert clone.distances == det.distances and clone.ticket_epoch == det.ticket_epoch == 1

    def test_state_from_other_window_raises(self):
        with pytest.raises(ValueError, match="window=2"):
            TicketDetector(window=3).load_state_dict(TicketDetector(window=2).state_dict())

    def test_layout_change_raises(self):
        det = TicketDetector()
        det.update({"a": torch.tensor([True])})
        with pytest.raises(ValueError, match="tracked channels changed"):
            det.update({"a": torch.tensor([True, False])})

    @pytest.mark.parametrize("kwargs,name", [({"window": 1}, "window"), ({"threshold": 1.5}, "threshold"),
                                             ({"threshold": -0.1}, "threshold")])
    def test_bad_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            TicketDetector(**kwargs)


class TestChiSchedule:
    def test_elbow_switches_once_and_stays(self):
        s = ChiSchedule("elbow", chi=0.003, elbow=0.15)
        assert [s.update(d) for d in (math.nan, 0.3, 0.15, 0.149, 0.5, math.nan)] == [1, 1, 1, 0.003, 0.003, 0.003]

    def test_fixed(self):
        assert ChiSchedule("fixed", chi=0.01).update(math.nan) == 0.01

    def test_greedy(self):
        s = ChiSchedule("greedy")
        assert [s.update(d) for d in (math.nan, 0.4, 0.05)] == [1.0, 0.4, 0.05]

    @pytest.mark.parametrize("kwargs,name", [({"schedule": "cosine"}, "schedule"), ({"chi": 1.1}, "chi"),
                                             ({"chi": -0.01}, "chi"), ({"elbow": 2}, "elbow")])
    def test_bad_arguments(self, kwargs, name):
        with pytest.raises(ValueError, match=name):
            ChiSchedule(**kwargs)


class TestGradientTruncation:
    def test_multiplies_only_masked_out_weight_and_bias(self):
        model = two_layer([0.1, 0.9], [0.8, 0.2, 0.7])
        model(torch.randn(2, 3, 4, 4)).pow(2).sum().backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        truncation = GradientTruncation(model)
        truncation.set(unit_mask(model, 0.4), chi=0.5)  # prunes 1:0 and 3:1
        truncation.apply()
        after = dict(model.named_parameters())
        for layer, gone in (("1", 0), ("3", 1)):
            for kind in ("weight", "bias"):
                expect = before[f"{layer}.{kind}"].clone()
                expect[gone] *= 0.5
                torch.testing.assert_close(after[f"{layer}.{kind}"].grad, expect, rtol=0, atol=0)
        for conv in ("0.weight", "0.bias", "2.weight", "2.bias"):
            assert torch.equal(after[conv].grad, before[conv])
        assert truncation.truncated_units == 2

    def test_chi_one_or_no_mask_is_a_no_op(self):
        model = two_layer([0.1, 0.9], [0.8, 0.2])
        truncation = GradientTruncation(model)
        truncation.set(unit_mask(model, 0.5), chi=1.0)
        assert truncation.truncated_units == 0 and not truncation._params

    def test_wrong_mask_raises(self):
        model = two_layer([0.1, 0.9], [0.8, 0.2])
        with pytest.raises(ValueError, match="not a tracked module"):
            GradientTruncation(model).set({"9": torch.ones(2, dtype=torch.bool)}, 0.1)
        with pytest.raises(ValueError, match="has 3 channels"):
            GradientTruncation(model).set({"1": torch.ones(3, dtype=torch.bool)}, 0.1)


def test_sparsity_gradient_adds_sign():
    model = two_layer([0.5, -0.2], [0.0, 1.0])
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    grads = [model[1].weight.grad.clone(), model[3].weight.grad.clone()]
    add_sparsity_gradient([model[1].weight, model[3].weight], 1e-2)
    torch.testing.assert_close(model[1].weight.grad, grads[0] + 1e-2 * torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(model[3].weight.grad, grads[1] + 1e-2 * torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="sparsity"):
        add_sparsity_gradient([], -1.0)


def test_plain_pytorch_loop_finds_ticket_with_worm():
    """The core serves a plain loop: train, mask per epoch, detect, truncate once per step."""
    from tests.helpers import tiny_loader
    from tests.models import TinyNet

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    detector, schedule = TicketDetector(window=3, threshold=0.2), ChiSchedule("elbow", chi=0.003, elbow=0.3)
    truncation = GradientTruncation(model)
    for epoch in range(12):
        for x, y in tiny_loader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            truncation.apply()
            optimizer.step()
        _, mean = detector.update(unit_mask(model, 0.5))
        truncation.set(detector.mask, schedule.update(mean))
        if detector.ticket is not None:
            break
    assert detector.ticket_epoch is not None and schedule.switched
    assert truncation.truncated_units == 12  # half of 8 + 16 channels
