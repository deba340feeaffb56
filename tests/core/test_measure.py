"""Tests of ``lightning_worm.core.measure``: FLOPs per example (Lightning's convention), latency, export."""

import warnings

import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn

from lightning_worm.core import inputs, measure
from tests.helpers import randomize_batchnorms
from tests.models import Wrapped, convnet


def test_flops_per_example_match_lightnings_model_summary_of_one_example():
    net = convnet()
    summary = ModelSummary(Wrapped(net, torch.zeros(1, 3, 8, 8)), max_depth=-1)
    if not hasattr(summary, "total_flops"):
        pytest.skip("Lightning < 2.6 counts no FLOPs in its model summary")
    assert measure.forward_flops(net, torch.zeros(5, 3, 8, 8)) == summary.total_flops > 0
    assert measure.forward_flops(net, torch.zeros(5, 3, 8, 8), per_example=False) == 5 * summary.total_flops
    assert measure.forward_flops(nn.Linear(10, 5), torch.zeros(4, 10)) == 2 * 10 * 5


def test_flops_restore_the_modes_and_accept_several_inputs():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    model = Two().train()
    model.b.eval()
    assert measure.forward_flops(model, (torch.zeros(2, 3), torch.zeros(2, 4))) == 2 * (3 * 2 + 4 * 2)
    assert model.training and model.a.training and not model.b.training
    assert inputs.batch_size([torch.zeros(7, 3), torch.zeros(2)]) == 7 and inputs.batch_size(torch.tensor(1.0)) == 1


@pytest.mark.parametrize("bad", ["images", [], [torch.zeros(1), "x"], 3])
def test_bad_example_inputs_are_refused(bad):
    with pytest.raises(ValueError, match="example_input.*tensor"):
        measure.forward_flops(nn.Linear(1, 1), bad)


def test_count_params_counts_all_or_nonzero():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0] = 0
    assert measure.count_params(layer) == 15 and measure.count_params(layer, nonzero=True) == 11


def test_latency_uses_torch_benchmark_with_fixed_threads_and_restores_state():
    model = convnet().train()
    threads = torch.get_num_threads()
    result = measure.latency(model, torch.zeros(2, 3, 8, 8), repeats=4, warmup=1, num_threads=1, label="net")
    assert isinstance(result, torch.utils.benchmark.Measurement)
    assert len(result.times) == 4 and result.median > 0 and result.task_spec.num_threads == 1
    assert model.training and torch.get_num_threads() == threads and torch.is_grad_enabled()
    assert measure.latency_ms(model, torch.zeros(2, 3, 8, 8), repeats=2) > 0
    with pytest.raises(ValueError, match="repeats"):
        measure.latency(model, torch.zeros(2, 3, 8, 8), repeats=0)


def test_latency_over_a_minimum_run_time_times_blocks():
    model = convnet().train()
    result = measure.latency(model, torch.zeros(2, 3, 8, 8), warmup=1, num_threads=1, min_run_time=0.05)
    assert result.number_per_run >= 1 and sum(result.raw_times) >= 0.05  # each raw time is one block
    assert result.median > 0 and result.task_spec.num_threads == 1 and model.training
    assert measure.latency_ms(model, torch.zeros(2, 3, 8, 8), min_run_time=0.01) > 0
    with pytest.raises(ValueError, match="min_run_time"):
        measure.latency(model, torch.zeros(2, 3, 8, 8), min_run_time=0)


def test_export_for_inference_folds_batchnorm_and_goes_channels_last():
    torch.manual_seed(0)
    model = randomize_batchnorms(convnet()).train()
    x = torch.randn(4, 3, 8, 8)
    fast = measure.export_for_inference(model)
    assert model.training and all(p.requires_grad for p in model.parameters())  # the original is untouched
    assert not fast.training and not any(p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in fast.parameters() if p.dim() == 4)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), expected)
        torch.testing.assert_close(fast(x), expected)
    exported = torch.export.export(fast, (x,))
    torch.testing.assert_close(exported.module()(x), expected)


def test_export_for_inference_keeps_an_untraceable_model_unfused_with_a_warning():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = convnet()

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    model = Branchy()
    with pytest.warns(UserWarning, match="BatchNorm left unfused.*torch.fx.*fuse_batchnorm=False"):
        fast = measure.export_for_inference(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure.export_for_inference(model, fuse_batchnorm=False)


@pytest.mark.slow
def test_export_for_inference_compiles_on_request():
    torch.manual_seed(0)
    model = randomize_batchnorms(convnet())
    x = torch.randn(2, 3, 8, 8)
    fast = measure.export_for_inference(model, compile=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x), rtol=1e-4, atol=1e-4)
