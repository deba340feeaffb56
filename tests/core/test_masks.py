"""The one mask type, the O(N) global ranking, packed detector storage, the two-stage schedule, sources."""

import math

import pytest
import torch
from torch import nn

from lightning_worm import BatchNormSource, ChiSchedule, Mask, ScoreSource, TicketDetector, mask_distance
from lightning_worm.core import (
    SOURCES,
    NonFiniteScoreError,
    mask_from_scores,
    resolve_source,
    unit_mask,
)
from lightning_worm.core.masks import score_checksum
from tests.models import two_layer


def sorted_reference(scores, ratio):
    """The definition: a stable ascending sort of all units, the first round(ratio * N) pruned."""
    flat = torch.cat([s.reshape(-1).double() for s in scores.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: round(ratio * flat.numel())]] = False
    return keep


class TestMask:
    def test_views_layout_and_dict_roundtrip(self):
        mask = Mask.from_dict({"a": torch.tensor([True, False, True]), "b": torch.tensor([[False, True]])})
        assert list(mask) == ["a", "b"] and len(mask) == 2
        assert mask.layout == (("a", (3,)), ("b", (1, 2)))
        assert torch.equal(mask["b"], torch.tensor([[False, True]]))
        assert mask.kept == 3 and mask.total == 5 and mask.sizes == {"a": 3, "b": 2}
        assert Mask.from_dict(mask) is mask
        again = Mask.from_dict(mask.to_dict())
        assert torch.equal(again.flat, mask.flat) and again.layout == mask.layout

    @pytest.mark.parametrize("total", [1, 7, 8, 9, 1000, 12345])
    def test_packed_is_one_bit_per_unit_and_roundtrips(self, total):
        flat = torch.rand(total, generator=torch.Generator().manual_seed(total)) > 0.5
        mask = Mask(flat, [("x", (total,))])
        packed = mask.packed()
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(total / 8)
        assert torch.equal(Mask.unpack(packed, mask.layout).flat, flat)

    @pytest.mark.parametrize("total", [1, 7, 8, 9, 1000, 12345])
    def test_packed_bits_keep_the_checkpoint_format(self, total):
        """Unit i is bit i % 8 of byte i // 8, the bits past the last unit zero (checkpoints hold these bytes)."""
        flat = torch.rand(total, generator=torch.Generator().manual_seed(total)) > 0.5
        padded = torch.cat([flat, flat.new_zeros((-total) % 8)]).view(-1, 8).to(torch.uint8)
        expected = (padded * torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)).sum(1, dtype=torch.uint8)
        assert torch.equal(Mask(flat, [("x", (total,))]).packed(), expected)

    @pytest.mark.parametrize("layout", [[("a", (1,))], [("a", (3, 5)), ("b", (7,))], [("a", (64,)), ("b", (2, 2, 2))],
                                        [("q", (33, 17)), ("k", (33, 17)), ("bn", (9,))]])
    def test_distance_on_packed_bits_equals_unit_by_unit(self, layout):
        total = sum(math.prod(shape) for _, shape in layout)
        g = torch.Generator().manual_seed(total)
        a, b = (Mask(torch.rand(total, generator=g) > 0.5, layout) for _ in range(2))
        expected = int((a.flat != b.flat).sum()) / total
        assert mask_distance(a, b) == expected  # unit by unit
        packed_a, packed_b = Mask.unpack(a.packed(), layout), Mask.unpack(b.packed(), layout)
        assert mask_distance(packed_a, packed_b) == expected and mask_distance(a, b) == expected  # on the bits
        assert mask_distance(packed_a, b.to_dict()) == expected and packed_a.kept == a.kept
        dirty = a.packed().clone()
        if total % 8:  # whatever the bits past the last unit hold, they are no units
            dirty[-1] |= 0xFF << (total % 8) & 0xFF
        assert mask_distance(Mask.unpack(dirty, layout), packed_b) == expected
        assert Mask.unpack(dirty, layout).kept == a.kept and torch.equal(Mask.unpack(dirty, layout).flat, a.flat)

    def test_unpack_refuses_bits_that_do_not_fit_the_layout(self):
        with pytest.raises(ValueError, match="2 bytes"):
            Mask.unpack(torch.zeros(3, dtype=torch.uint8), [("a", (9,))])
        with pytest.raises(ValueError, match="uint8"):
            Mask.unpack(torch.zeros(2, dtype=torch.int32), [("a", (9,))])

    @pytest.mark.parametrize("bad", [{}, {"a": torch.ones(3)}, {"a": [True]}, "not a mask"])
    def test_bad_masks_are_refused(self, bad):
        with pytest.raises(ValueError, match="mask"):
            Mask.from_dict(bad)

    def test_flat_must_fill_layout(self):
        with pytest.raises(ValueError, match="cannot fill"):
            Mask(torch.ones(3, dtype=torch.bool), [("a", (2,))])

    def test_distance_is_the_fraction_of_differing_units(self):
        a = {"w": torch.tensor([[True, True], [False, False]])}
        b = {"w": torch.tensor([[True, False], [False, True]])}
        assert mask_distance(a, b) == 0.5
        assert mask_distance(Mask.from_dict(a), b) == 0.5


class TestGlobalRanking:
    @pytest.mark.parametrize("seed", range(5))
    @pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6])
    def test_equals_a_stable_sort_with_ties_and_any_shapes(self, seed, ratio):
        g = torch.Generator().manual_seed(seed)
        scores = {  # few distinct values: ties everywhere, across entries
            "conv": torch.randint(0, 4, (5, 3), generator=g).float(),
            "bn": torch.randint(0, 4, (7,), generator=g).float(),
            "heads": torch.randint(0, 4, (2, 2, 2), generator=g).double(),
        }
        result = mask_from_scores(scores, ratio)
        assert result.restored == {}  # no entry emptied: the ranking alone decides
        assert torch.equal(result.mask.flat, sorted_reference(scores, ratio))
        assert result.mask["conv"].shape == (5, 3) and result.mask["heads"].shape == (2, 2, 2)

    @pytest.mark.parametrize("distinct", [None, 50, 3])
    def test_large_inputs_narrowed_by_a_sample_equal_a_stable_sort(self, distinct):
        """Above 2**20 units the k-th value is found in a bracket of a sample (and ties are placed from the
        bracket's counts): the mask is still the stable sort's, with few or many ties."""
        g = torch.Generator().manual_seed(7)
        n = (1 << 20) + 12345
        values = (torch.rand(n, generator=g) if distinct is None
                  else torch.randint(0, distinct, (n,), generator=g).float())
        scores = {"a": values[:1000].reshape(10, 100), "b": values[1000:]}
        for ratio in (0.3, 0.5):
            assert torch.equal(mask_from_scores(scores, ratio).mask.flat, sorted_reference(scores, ratio))

    def test_checksum_is_exact_and_order_free(self):
        scores = {"a": torch.rand(1001, generator=torch.Generator().manual_seed(0)), "b": torch.rand(3)}
        result = mask_from_scores(scores, 0.5)
        assert result.checksum == score_checksum(torch.cat([scores["a"], scores["b"]]))
        assert result.checksum == mask_from_scores({k: v.clone() for k, v in scores.items()}, 0.5).checksum
        moved = {"a": scores["a"].clone(), "b": scores["b"].clone()}
        moved["b"][-1] = torch.nextafter(moved["b"][-1], torch.tensor(2.0))  # one value, one ulp (the odd tail)
        assert mask_from_scores(moved, 0.5).checksum != result.checksum
        moved = {"a": scores["a"].clone(), "b": scores["b"]}
        moved["a"][0] = torch.nextafter(moved["a"][0], torch.tensor(2.0))
        assert mask_from_scores(moved, 0.5).checksum != result.checksum
        assert 0 <= result.checksum < 2 ** 64 and score_checksum(torch.zeros(0)) == 0
        assert score_checksum(torch.ones(3, dtype=torch.float64)) == 3 * 0x3FF0000000000000

    def test_all_equal_scores_prune_by_order(self):
        result = mask_from_scores({"a": torch.ones(4), "b": torch.ones(4)}, 0.5)
        # "a" goes first (layer order); min_units=1 then keeps its first channel back
        assert result.mask["a"].tolist() == [True, False, False, False] and result.mask["b"].tolist() == [True] * 4
        assert result.restored == {"a": 1}

    def test_min_channels_on_a_multidimensional_entry(self):
        result = mask_from_scores({"a": torch.tensor([[0.1, 0.2], [0.3, 0.05]]), "b": torch.ones(4)}, 0.5,
                                  min_units=2)
        assert result.mask["a"].tolist() == [[False, True], [True, False]]
        assert result.restored == {"a": 2} and result.pruned == result.requested - 2

    @pytest.mark.parametrize("bad", [float("inf"), float("nan"), True, 0.0, 1.0, "0.5"])
    def test_ratio_must_be_a_finite_number_in_the_open_interval(self, bad):
        with pytest.raises(ValueError, match="prune_ratio"):
            mask_from_scores({"a": torch.ones(4)}, bad)


class TestDetectorStorage:
    def test_masks_are_stored_as_bits(self):
        detector = TicketDetector(window=3, threshold=0.0)
        n = 8000
        for epoch in range(5):
            detector.update({"w": torch.arange(n) % (epoch + 2) == 0})
        # window 3 + history 5 (ticket none yet): one bit per unit per stored mask
        assert detector.stored_bytes == (3 + 5) * n // 8
        state = detector.state_dict()
        assert all(t.dtype == torch.uint8 for t in state["masks"] + state["history"])
        assert torch.equal(detector.history[-1], torch.arange(n) % 6 == 0)

    def test_accept_first_window_false_refuses_the_first_full_check(self):
        same = {"w": torch.tensor([True, False, True, False])}
        eager, patient = TicketDetector(3, 0.1), TicketDetector(3, 0.1, accept_first_window=False)
        for _ in range(3):
            eager.update(same), patient.update(same)
        assert eager.ticket_epoch == 2 and patient.ticket_epoch is None
        patient.update(same)
        assert patient.ticket_epoch == 3

    def test_unpacked_state_of_version_0_1_loads(self):
        old = {"window": 2, "threshold": 0.5, "layout": [["bn", 4]],
               "masks": [torch.tensor([True, False, True, True])], "distances": [math.nan],
               "mean_distances": [math.nan], "history": [torch.tensor([True, False, True, True])],
               "history_epochs": [0], "ticket": None, "ticket_epoch": None}
        detector = TicketDetector(2, 0.5)
        detector.load_state_dict(old)
        assert detector.mask["bn"].tolist() == [True, False, True, True]
        detector.update({"bn": torch.tensor([True, False, True, False])})
        assert detector.distances[-1] == 0.25 and detector.ticket_epoch == 1

    @pytest.mark.parametrize("kwargs", [dict(window=True), dict(window=2.0), dict(threshold=float("nan")),
                                        dict(threshold=True), dict(accept_first_window="no")])
    def test_bad_arguments(self, kwargs):
        with pytest.raises(ValueError):
            TicketDetector(**kwargs)


def test_two_stage_schedule_on_a_hand_written_history():
    schedule = ChiSchedule("two_stage")
    history = [math.nan, math.nan, 0.3, 0.05, 0.012, 0.02, 0.0, 0.2]
    assert [schedule.update(d) for d in history] == [1.0, 1.0, 0.3, 0.05, 0.01, 0.02, 0.01, 0.2]


@pytest.mark.parametrize("kwargs", [dict(chi=float("inf")), dict(chi=True), dict(elbow=-0.1),
                                    dict(schedule="nope"), dict(low=2.0)])
def test_chi_schedule_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        ChiSchedule(**kwargs)


class TestSources:
    def test_registry_and_resolution(self):
        assert isinstance(resolve_source(None), BatchNormSource)
        assert isinstance(resolve_source("batchnorm"), BatchNormSource)
        assert SOURCES["batchnorm"] is BatchNormSource
        source = BatchNormSource()
        assert resolve_source(source) is source

    @pytest.mark.parametrize("bad", ["batch_norm", 3, nn.BatchNorm2d(2)])
    def test_bad_sources_are_named(self, bad):
        with pytest.raises(ValueError, match="source"):
            resolve_source(bad)

    def test_a_source_with_elementwise_units(self):
        class LinearWeights(ScoreSource):
            key = "linear_weights"

            def candidates(self, model):
                return ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear))

            def scores(self, module):
                return module.weight.detach().abs()

            def gradient_factors(self, module, keep, chi):
                return [(module.weight, torch.where(keep, 1.0, chi))]

        from lightning_worm import GradientTruncation, unit_mask

        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        mask = unit_mask(model, 0.5, source=LinearWeights())
        assert mask["0"].shape == (4, 3) and mask.total == 20 and mask.kept == 10
        truncation = GradientTruncation(model, LinearWeights())
        truncation.set(mask, chi=0.0)
        model(torch.randn(5, 3)).sum().backward()
        truncation.apply()
        assert torch.all(model[0].weight.grad[~mask["0"]] == 0) and model[0].bias.grad.abs().sum() > 0


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
