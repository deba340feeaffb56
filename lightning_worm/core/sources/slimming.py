"""The ``score=`` option of the head and neuron sources: weight magnitudes, or EarlyBERT's slimming coefficients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm.core.gates import attach_gate, gate_of, remove_gate
from lightning_worm.core.sharding import whole
from lightning_worm.core.sources.base import ScoreSource
from lightning_worm.core.validation import check_choice

__all__ = ["DEFAULT_SCORE", "SCORES", "SlimmingScores"]

#: What a head or neuron source scores its units by: ``"auto"`` (slimming gates where the model has them, i.e. in a
#: search, whose tracker gives them at setup; the weights' magnitude elsewhere), ``"slimming"`` (always gates),
#: ``"magnitude"`` (never).
SCORES = ("auto", "slimming", "magnitude")
DEFAULT_SCORE = "auto"


class SlimmingScores(ScoreSource):
    """A source whose units can be scored by learnable gates instead of weight magnitudes (``score="slimming"``).

    With ``"slimming"``, :meth:`prepare` gives every tracked entry one gate per unit (initialised to 1, a parameter
    of the entry's module, trained with the model); the units are scored by the gates' magnitude, the sparsity term
    regularises the gates, WORM truncates a pruned unit's gate with its weights, and :meth:`fold` multiplies the gates
    into the weights and removes them (the surgery calls it before the cut, so no trace of them is left).

    Subclasses implement :meth:`gate_owner` (the module that holds an entry's gate), :meth:`gate_site` (where the
    gate acts) and :meth:`fold_gate` (how it folds).
    """

    score: str = DEFAULT_SCORE

    def _set_score(self, score: str) -> None:
        self.score = check_choice("score", score, SCORES)

    @property
    def slimming(self) -> bool:
        """Whether :meth:`prepare` gives the model gates (``"auto"`` and ``"slimming"``)."""
        return self.score != "magnitude"

    def gated(self, handle: Any) -> bool:
        """Whether the entry is scored by its gates: always with ``"slimming"`` (where it can have some), when it has
        some with ``"auto"``."""
        owner = self.gate_owner(handle)
        if owner is None or self.score == "magnitude":
            return False
        return self.score == "slimming" or gate_of(owner) is not None

    def gate_owner(self, handle: Any) -> nn.Module | None:
        """The module that holds the entry's gate, or ``None`` if the entry takes no gate (its units are then scored
        by magnitude)."""
        raise NotImplementedError

    def gate_site(self, handle: Any) -> tuple[nn.Module, int, Tensor, str]:
        """``(target, units, features, where)`` of :func:`~lightning_worm.core.gates.attach_gate` for an entry that
        takes a gate."""
        raise NotImplementedError

    def fold_gate(self, handle: Any, gate: Tensor) -> None:
        """Multiply ``gate`` (one value per unit, already removed from the model) into the entry's weights, replacing
        the parameters it changes by new ones (an all-or-nothing surgery can then put the old ones back)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """With ``score="slimming"`` or ``"auto"``: give every tracked entry its gates (ones), before the optimizers are
        built."""
        if self.slimming:
            for handle in self.tracked(model).values():
                owner = self.gate_owner(handle)
                if owner is not None:
                    attach_gate(owner, *self.gate_site(handle))

    def fold(self, model: nn.Module) -> None:
        """Fold every tracked entry's gates into its weights and remove them (nothing without gates)."""
        for handle in self.tracked(model).values():
            owner = self.gate_owner(handle)
            gate = None if owner is None else remove_gate(owner)
            if gate is not None:
                self.fold_gate(handle, gate)

    def gate(self, handle: Any) -> nn.Parameter:
        """The entry's gate.

        Raises:
            ValueError: if the model has none yet (:meth:`prepare` was not called).
        """
        owner = self.gate_owner(handle)
        gate = None if owner is None else gate_of(owner)
        if gate is None:
            raise ValueError(f"{type(self).__name__}(score='slimming') scores gates this model does not have yet: call "
                             "`source.prepare(model)` before building the optimizer (EarlyBirdCallback does at setup).")
        return gate

    def gate_scores(self, handle: Any) -> Tensor:
        gate = self.gate(handle).detach()
        return whole(gate.abs().to(torch.promote_types(gate.dtype, torch.float32)))

    def gate_factor(self, handle: Any, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        """The gate's own truncation factor (chi on the pruned units) when the entry is gated; else nothing."""
        if not self.gated(handle):
            return []
        gate = self.gate(handle)
        return [(gate, torch.where(keep.reshape(-1).to(gate.device), 1.0, chi).to(gate.dtype))]


def scaled_parameter(param: Tensor, dim: int, index: Any, factor: Tensor) -> nn.Parameter:
    """A new parameter: ``param`` with its slices ``index`` along ``dim`` multiplied by ``factor`` (one per slice)."""
    data = param.detach().clone()
    view = [1] * data.dim()
    view[dim] = -1
    selector = [slice(None)] * data.dim()
    selector[dim] = index
    data[tuple(selector)] *= factor.to(data.dtype).view(view)
    return nn.Parameter(data, requires_grad=param.requires_grad)
