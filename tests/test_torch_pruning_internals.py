"""Every Torch-Pruning internal lightning-worm uses still works as used (see lightning_worm/_internals/torch_pruning.py).

A failure names the internal that changed in the installed release; the upper bound of ``torch-pruning`` in
``pyproject.toml`` moves once these pass on a new release.
"""

import pytest

from lightning_worm._internals import torch_pruning as tpi


@pytest.mark.parametrize("name", list(tpi.INTERNALS))
def test_internal_still_works_as_used(name):
    problem = tpi.check(name)
    assert problem is None, problem


def test_every_internal_has_a_check():
    assert set(tpi.INTERNALS) == set(tpi._CHECKS)


def test_a_changed_internal_is_reported_by_name(monkeypatch):
    monkeypatch.delattr(tpi.tp._helpers, "_HybridIndex")
    problem = tpi.check("_helpers._HybridIndex")
    assert "changed the internal '_helpers._HybridIndex'" in problem and "_HybridIndex is gone" in problem
    assert "Torch-Pruning" in problem and "pyproject.toml" in problem


def test_a_probe_that_crashes_is_reported_too(monkeypatch):
    def broken(self, model, example_inputs, forward_fn, output_transform):
        raise KeyError("module2node")

    monkeypatch.setattr(tpi.tp.DependencyGraph, "_trace", broken)
    problem = tpi.check("DependencyGraph._trace")
    assert "changed the internal 'DependencyGraph._trace'" in problem and "KeyError" in problem
