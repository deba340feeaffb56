"""WORM: the chi schedules and the per-unit gradient multiply."""

import math

import pytest
import torch

from lightning_worm.core import (
    ChiSchedule,
    GradientTruncation,
    unit_mask,
)
from tests.models import two_layer


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
