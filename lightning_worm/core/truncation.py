"""WORM gradient truncation: the chi schedules and the per-channel gradient multiply."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from lightning_worm.core.detector import validate_unit_interval
from lightning_worm.core.scores import BatchNormSource, ChannelSource

SCHEDULES = ("elbow", "fixed", "greedy")


class ChiSchedule:
    """How the truncation multiplier chi follows the ticket search.

    - ``"elbow"`` (the WORM paper): chi = 1 until the mean mask distance falls below ``elbow``, then
      ``chi`` for good (it never switches back).
    - ``"fixed"``: ``chi`` from the first mask on.
    - ``"greedy"``: chi = the latest mean distance clipped to [0, 1]; 1 while the window is not full.

    Args:
        schedule: one of ``"elbow"``, ``"fixed"``, ``"greedy"``.
        chi: the multiplier of masked-out channels' gradients, in [0, 1].
        elbow: mean-distance threshold of the ``"elbow"`` schedule, in [0, 1].

    Raises:
        ValueError: on an unknown schedule or a value outside [0, 1].
    """

    def __init__(self, schedule: str = "elbow", chi: float = 0.003, elbow: float = 0.15) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        validate_unit_interval("chi", chi)
        validate_unit_interval("elbow", elbow)
        self.schedule, self.chi, self.elbow = schedule, float(chi), float(elbow)
        self.value = 1.0
        self.switched = False

    def update(self, mean_distance: float) -> float:
        """Advance with the latest epoch's mean distance (NaN while the window fills); returns chi."""
        if self.schedule == "fixed":
            self.switched, self.value = True, self.chi
        elif self.schedule == "greedy":
            self.value = 1.0 if math.isnan(mean_distance) else min(max(mean_distance, 0.0), 1.0)
        elif self.switched or mean_distance < self.elbow:  # NaN < elbow is False
            self.switched, self.value = True, self.chi
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "switched": self.switched}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.value, self.switched = float(state["value"]), bool(state["switched"])


class GradientTruncation:
    """Multiplies the gradients of masked-out channels by chi; kept channels are untouched.

    Call :meth:`set` whenever the mask or chi changes (once per epoch) and :meth:`apply` once per
    optimizer step on the final gradient (after the last backward of an accumulation, before clipping).
    The per-step work is one fused ``_foreach_mul_`` over the tracked parameters, with no host sync.

    Args:
        model: the model whose tracked channels are truncated.
        source: what is scored; BatchNorm ``|gamma|`` by default (truncates BN weight and bias).

    Example::

        truncation = GradientTruncation(model)
        truncation.set(channel_mask(model, 0.5), chi=0.003)
        loss.backward()
        truncation.apply()
        optimizer.step()
    """

    def __init__(self, model: nn.Module, source: ChannelSource | None = None) -> None:
        self.model = model
        self.source = source or BatchNormSource()
        self.chi = 1.0
        self.truncated_channels = 0
        self._params: list[Tensor] = []
        self._factors: list[Tensor] = []

    def set(self, mask: Mapping[str, Tensor] | None, chi: float) -> None:
        """Use ``mask`` (``True`` = keep) and multiplier ``chi`` from now on; ``None`` or chi = 1 disables.

        Raises:
            ValueError: if the mask names a module that is not tracked or has the wrong channel count.
        """
        validate_unit_interval("chi", chi)
        self.chi = float(chi)
        self._params, self._factors = [], []
        self.truncated_channels = 0
        if mask is None or self.chi == 1.0:
            return
        modules = self.source.tracked(self.model)
        for name, keep in mask.items():
            if name not in modules:
                raise ValueError(f"The mask names {name!r}, which is not a tracked module of the model.")
            for param in self.source.channel_parameters(modules[name]):
                if param.shape[0] != keep.numel():
                    raise ValueError(
                        f"The mask of {name!r} has {keep.numel()} channels, the parameter {param.shape[0]}."
                    )
                factor = torch.where(keep.to(param.device), 1.0, self.chi).to(param.dtype)
                self._params.append(param)
                self._factors.append(factor.view(-1, *([1] * (param.dim() - 1))))
            self.truncated_channels += int((~keep).sum())

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply the current gradients in place (parameters without a gradient are skipped)."""
        pairs = [(p.grad, f) for p, f in zip(self._params, self._factors) if p.grad is not None]
        if pairs:
            grads, factors = zip(*pairs)
            torch._foreach_mul_(list(grads), list(factors))
