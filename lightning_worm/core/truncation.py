"""WORM gradient truncation: the chi schedules and the per-unit gradient multiply."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm._deprecation import RenamedAttribute
from lightning_worm._internals.torch import foreach_mul_
from lightning_worm.core.masks import Mask, MaskLike
from lightning_worm.core.sharding import local, local_part
from lightning_worm.core.sources import ScoreSource, resolve_source
from lightning_worm.core.validation import check_choice, check_number

__all__ = ["SCHEDULES", "ChiSchedule", "GradientTruncation"]

SCHEDULES = ("elbow", "fixed", "greedy", "two_stage")


class ChiSchedule:
    """How the truncation multiplier chi follows the ticket search.

    - ``"elbow"`` (the WORM paper): chi = 1 until the mean mask distance falls below ``elbow``, then
      ``chi`` for good (it never switches back).
    - ``"fixed"``: ``chi`` from the first mask on.
    - ``"greedy"``: chi = the latest mean distance clipped to [0, 1]; 1 while the window is not full.
    - ``"two_stage"`` (the WORM code's transformer schedule): 1 while the window is not full, then the
      epoch's mean distance, and ``low`` whenever the mean distance is below ``low_below``; recomputed
      every epoch (not sticky).

    Args:
        schedule: one of ``"elbow"``, ``"fixed"``, ``"greedy"``, ``"two_stage"``.
        chi: the multiplier of masked-out units' gradients (``"elbow"``, ``"fixed"``), in [0, 1].
        elbow: mean-distance threshold of the ``"elbow"`` schedule, in [0, 1].
        low: the ``"two_stage"`` multiplier once the search has nearly settled, in [0, 1].
        low_below: the ``"two_stage"`` mean distance under which ``low`` is used, in [0, 1].

    Raises:
        ValueError: on an unknown schedule or a value outside [0, 1].
    """

    def __init__(
        self, schedule: str = "elbow", chi: float = 0.003, elbow: float = 0.15, low: float = 0.01,
        low_below: float = 0.015,
    ) -> None:
        self.schedule = check_choice("schedule", schedule, SCHEDULES)
        self.chi = check_number("chi", chi, low=0.0, high=1.0)
        self.elbow = check_number("elbow", elbow, low=0.0, high=1.0)
        self.low = check_number("low", low, low=0.0, high=1.0)
        self.low_below = check_number("low_below", low_below, low=0.0, high=1.0)
        self.value = 1.0
        self.switched = False

    def update(self, mean_distance: float) -> float:
        """Advance with the latest epoch's mean distance (NaN while the window fills); returns chi."""
        if self.schedule == "fixed":
            self.switched, self.value = True, self.chi
        elif self.schedule == "greedy":
            self.value = 1.0 if math.isnan(mean_distance) else min(max(mean_distance, 0.0), 1.0)
        elif self.schedule == "two_stage":
            if math.isnan(mean_distance):
                self.value = 1.0
            else:
                self.value = self.low if mean_distance < self.low_below else min(max(mean_distance, 0.0), 1.0)
        elif self.switched or mean_distance < self.elbow:  # NaN < elbow is False
            self.switched, self.value = True, self.chi
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "switched": self.switched}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.switched = float(state["value"]), bool(state["switched"])


class GradientTruncation:
    """Multiplies the gradients of masked-out units by chi; kept units are untouched.

    Call :meth:`set` whenever the mask or chi changes (once per epoch) and :meth:`apply` once per
    optimizer step on the final gradient (after the last backward of an accumulation, before clipping).
    Which parameters a masked-out unit truncates is the source's business
    (:meth:`~lightning_worm.ScoreSource.gradient_factors`). The per-step work is one fused
    ``_foreach_mul_`` over those parameters, with no host sync.

    Args:
        model: the model whose tracked units are truncated.
        source: what is scored; BatchNorm ``|gamma|`` by default (truncates BN weight and bias).

    Example::

        truncation = GradientTruncation(model)
        truncation.set(unit_mask(model, 0.5), chi=0.003)
        loss.backward()
        truncation.apply()
        optimizer.step()
    """

    def __init__(self, model: nn.Module, source: str | ScoreSource | None = None) -> None:
        self.model = model
        self.source = resolve_source(source)
        self.chi = 1.0
        self.truncated_units = 0
        self._params: list[Tensor] = []
        self._factors: list[Tensor] = []

    truncated_channels = RenamedAttribute("truncated_units")

    def set(self, mask: MaskLike | None, chi: float) -> None:
        """Use ``mask`` (``True`` = keep) and multiplier ``chi`` from now on; ``None`` or chi = 1 disables.

        Raises:
            ValueError: if the mask names an entry that is not tracked or has the wrong shape.
        """
        self.chi = check_number("chi", chi, low=0.0, high=1.0)
        self._params, self._factors = [], []
        self.truncated_units = 0
        if mask is None or self.chi == 1.0:
            return
        pairs = self.factors(mask, self.chi)
        self._params = [param for param, _ in pairs]
        self._factors = [local_part(factor, param) for param, factor in pairs]  # sharded: this rank's part

    def factors(self, mask: MaskLike, chi: float) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, factor)`` for every parameter a unit of ``mask`` owns: ``chi`` on the pruned units' entries,
        1 elsewhere (one factor per parameter). Sets :attr:`truncated_units`.

        Raises:
            ValueError: if the mask names an entry that is not tracked or has the wrong shape.
        """
        self.truncated_units = 0
        mask = Mask.from_dict(mask)
        handles = self.source.tracked(self.model)
        factors: dict[int, tuple[Tensor, Tensor]] = {}  # one factor per parameter (packed q/k share one)
        for name, keep in mask.items():
            if name not in handles:
                raise ValueError(f"The mask names {name!r}, which is not a tracked module or entry of the model "
                                 f"({self.source.key}).")
            if self.source.count(handles[name]) != keep.numel():
                raise ValueError(
                    f"The mask of {name!r} has {keep.numel()} channels (units), the model's entry "
                    f"{self.source.count(handles[name])}: the mask is of another model."
                )
            for param, factor in self.source.gradient_factors(handles[name], keep, chi):
                if id(param) in factors:
                    factor = factors[id(param)][1] * factor
                factors[id(param)] = (param, factor)
            self.truncated_units += int((~keep).sum())
        return list(factors.values())

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply the current gradients in place (parameters without a gradient are skipped; a sharded gradient on
        this rank's shard)."""
        pairs = [(local(p.grad), f) for p, f in zip(self._params, self._factors, strict=True) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs, strict=True)
            foreach_mul_(grads, factors)
