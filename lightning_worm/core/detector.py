"""Early-Bird ticket detection: a window of recent masks and the distances between them."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Mapping

import torch
from torch import Tensor

from lightning_worm.core.masks import Mask, flatten_mask, unflatten_mask


class TicketDetector:
    """Tracks masks over epochs and says when the Early-Bird ticket has emerged.

    Each :meth:`update` pushes a mask into a FIFO window of the ``window`` most recent masks. Once the
    window is full, the epoch's distance is the largest mask distance between the newest mask and each
    older mask in the window, and the mean distance is their mean. The ticket is the mask of the first
    epoch whose distance is at most ``threshold``. Epochs without a mask (:meth:`skip`) record NaN.

    Attributes:
        distances: per recorded epoch, the largest distance of the newest mask to the window (NaN before).
        mean_distances: per recorded epoch, the mean of those distances (NaN before).
        history: every mask taken, flattened to one 1-D bool tensor on the CPU (if ``keep_history``).
        history_epochs: the epoch of each mask in ``history``.
        ticket_epoch: the epoch at which the ticket emerged, or ``None``.

    Args:
        window: number of recent masks compared, at least 2.
        threshold: the ticket emerges once the distance is at most this, in [0, 1].
        keep_history: keep every epoch's mask on the CPU (for the pairwise distance plot).

    Raises:
        ValueError: if ``window`` < 2 or ``threshold`` is outside [0, 1].

    Example::

        detector = TicketDetector(window=5, threshold=0.1)
        for epoch in range(epochs):
            train_one_epoch()
            detector.update(channel_mask(model, 0.5))
            if detector.ticket is not None:
                break
    """

    def __init__(self, window: int = 5, threshold: float = 0.1, keep_history: bool = True) -> None:
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"`window` must be an integer >= 2, got {window!r}.")
        validate_unit_interval("threshold", threshold)
        self.window = window
        self.threshold = float(threshold)
        self.keep_history = keep_history
        self.layout: dict[str, int] | None = None
        self._masks: deque[Tensor] = deque(maxlen=window)
        self.distances: list[float] = []
        self.mean_distances: list[float] = []
        self.history: list[Tensor] = []
        self.history_epochs: list[int] = []
        self._ticket: Tensor | None = None
        self.ticket_epoch: int | None = None

    @property
    def epoch(self) -> int:
        """Number of epochs recorded so far (updates and skips)."""
        return len(self.distances)

    @property
    def mask(self) -> Mask | None:
        """The latest mask, or ``None`` before the first."""
        return unflatten_mask(self._masks[-1], self.layout) if self._masks else None

    @property
    def ticket(self) -> Mask | None:
        """The ticket (frozen at detection), or ``None`` before."""
        return None if self._ticket is None else unflatten_mask(self._ticket, self.layout)

    @property
    def window_full(self) -> bool:
        """Whether ``window`` masks are held, so that distances are defined."""
        return len(self._masks) == self.window

    def update(self, mask: Mapping[str, Tensor]) -> tuple[float, float]:
        """Record this epoch's mask; returns the epoch's (max, mean) distance, NaN while the window fills.

        Raises:
            ValueError: if the mask covers other layers or channel counts than the earlier ones.
        """
        layout = {name: m.numel() for name, m in mask.items()}
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(
                "The mask covers other layers or channel counts than the earlier ones: the model's tracked "
                "channels changed during the search. Start a new detector for the new model."
            )
        flat = flatten_mask(mask).to(torch.bool)
        self._masks = deque((m.to(flat.device) for m in self._masks), maxlen=self.window)
        self._masks.append(flat)
        if self.keep_history:
            self.history.append(flat.cpu())
            self.history_epochs.append(self.epoch)
        distance = mean = math.nan
        if self.window_full:
            older = torch.stack(list(self._masks)[:-1])
            each = ((older != flat).sum(dim=1).double() / flat.numel()).tolist()
            distance, mean = max(each), sum(each) / len(each)
            if self._ticket is None and distance <= self.threshold:
                self._ticket = flat.clone()
                self.ticket_epoch = self.epoch
        self.distances.append(distance)
        self.mean_distances.append(mean)
        return distance, mean

    def skip(self) -> None:
        """Record an epoch without a mask (not evaluated, or its scores were not finite)."""
        self.distances.append(math.nan)
        self.mean_distances.append(math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "threshold": self.threshold,
            "layout": None if self.layout is None else list(self.layout.items()),
            "masks": [m.cpu() for m in self._masks],
            "distances": list(self.distances),
            "mean_distances": list(self.mean_distances),
            "history": list(self.history),
            "history_epochs": list(self.history_epochs),
            "ticket": None if self._ticket is None else self._ticket.cpu(),
            "ticket_epoch": self.ticket_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: if the state was written with another window size.
        """
        if state["window"] != self.window:
            raise ValueError(
                f"The checkpoint's detector used window={state['window']}, this one window={self.window}: "
                "resume with the same `window`."
            )
        self.layout = None if state["layout"] is None else dict(state["layout"])
        self._masks = deque(state["masks"], maxlen=self.window)
        self.distances = list(state["distances"])
        self.mean_distances = list(state["mean_distances"])
        self.history = list(state["history"])
        self.history_epochs = list(state["history_epochs"])
        self._ticket = state["ticket"]
        self.ticket_epoch = state["ticket_epoch"]


def validate_unit_interval(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
