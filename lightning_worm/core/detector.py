"""Early-Bird ticket detection: a window of recent masks and the distances between them."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_worm.core.masks import Layout, Mask, MaskLike, mask_distance
from lightning_worm.core.validation import check_bool, check_int, check_number

__all__ = ["TicketDetector"]


class TicketDetector:
    """Tracks masks over epochs and says when the Early-Bird ticket has emerged.

    Each :meth:`update` pushes a mask into a FIFO window of the ``window`` most recent masks. Once the
    window is full, the epoch's distance is the largest mask distance between the newest mask and each
    older mask in the window, and the mean distance is their mean. The ticket is the mask of the first
    epoch whose distance is at most ``threshold`` (with ``accept_first_window=False``, not at the first
    epoch the window is full, as the WORM code does). Epochs without a mask (:meth:`skip`) record NaN.
    Masks are stored packed, one bit per unit (window, history, ticket and checkpoints alike).

    Attributes:
        distances: per recorded epoch, the largest distance of the newest mask to the window (NaN before).
        mean_distances: per recorded epoch, the mean of those distances (NaN before).
        history_epochs: the epoch of each mask in :attr:`history`.
        mask_epochs: the epochs that recorded a mask (not skipped), in order.
        ticket_epoch: the epoch at which the ticket emerged, or ``None``.

    Args:
        window: number of recent masks compared, at least 2.
        threshold: the ticket emerges once the distance is at most this, in [0, 1].
        keep_history: keep every epoch's mask (packed, on the CPU) for the pairwise distance plot.
        accept_first_window: accept a ticket at the first epoch the window is full.

    Raises:
        ValueError: if ``window`` < 2 or ``threshold`` is outside [0, 1].

    Example::

        detector = TicketDetector(window=5, threshold=0.1)
        for epoch in range(epochs):
            train_one_epoch()
            detector.update(unit_mask(model, 0.5))
            if detector.ticket is not None:
                break
    """

    def __init__(
        self, window: int = 5, threshold: float = 0.1, keep_history: bool = True, accept_first_window: bool = True
    ) -> None:
        self.window = check_int("window", window, minimum=2)
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0)
        self.keep_history = check_bool("keep_history", keep_history)
        self.accept_first_window = check_bool("accept_first_window", accept_first_window)
        self.layout: Layout | None = None
        self._masks: deque[Tensor] = deque(maxlen=self.window)
        self._full_checks = 0
        self.distances: list[float] = []
        self.mean_distances: list[float] = []
        self._history: list[Tensor] = []
        self.history_epochs: list[int] = []
        self.mask_epochs: list[int] = []
        self._ticket: Tensor | None = None
        self.ticket_epoch: int | None = None

    @property
    def epoch(self) -> int:
        """Number of epochs recorded so far (updates and skips)."""
        return len(self.distances)

    def _known_layout(self) -> Layout:
        assert self.layout is not None, "masks are stored only once the first one has set the layout"
        return self.layout

    def _unpack(self, packed: Tensor) -> Mask:
        return Mask.unpack(packed, self._known_layout())

    @property
    def mask(self) -> Mask | None:
        """The latest mask, or ``None`` before the first."""
        return self._unpack(self._masks[-1]) if self._masks else None

    @property
    def ticket(self) -> Mask | None:
        """The ticket (frozen at detection), or ``None`` before."""
        return None if self._ticket is None else self._unpack(self._ticket)

    @property
    def history(self) -> list[Tensor]:
        """Every mask taken (if ``keep_history``), each as one flat 1-D bool tensor on the CPU."""
        return [self._unpack(p).flat for p in self._history]

    @property
    def window_full(self) -> bool:
        """Whether ``window`` masks are held, so that distances are defined."""
        return len(self._masks) == self.window

    @property
    def stored_bytes(self) -> int:
        """Bytes held by the stored masks (window, history, ticket): one bit per unit per mask."""
        held = list(self._masks) + self._history + ([self._ticket] if self._ticket is not None else [])
        return sum(t.numel() for t in held)

    def update(self, mask: MaskLike) -> tuple[float, float]:
        """Record this epoch's mask; returns the epoch's (max, mean) distance, NaN while the window fills.

        Raises:
            ValueError: if the mask covers other entries or shapes than the earlier ones.
        """
        mask = Mask.from_dict(mask)
        if self.layout is None:
            self.layout = mask.layout
        elif mask.layout != self.layout:
            raise ValueError(
                "The mask covers other layers or channel counts than the earlier ones: the model's tracked channels "
                "changed during the search. Start a new detector for the new model."
            )
        packed = mask.packed()
        distance = mean = math.nan
        if len(self._masks) >= self.window - 1:  # full once this mask is in
            each = [mask_distance(mask, self._unpack(older)) for older in list(self._masks)[1 - self.window:]]
            distance, mean = max(each), sum(each) / len(each)
            self._full_checks += 1
            accept = self.accept_first_window or self._full_checks > 1
            if self._ticket is None and accept and distance <= self.threshold:
                self._ticket = packed
                self.ticket_epoch = self.epoch
        self._masks.append(packed)
        self.mask_epochs.append(self.epoch)
        if self.keep_history:
            self._history.append(packed)
            self.history_epochs.append(self.epoch)
        self.distances.append(distance)
        self.mean_distances.append(mean)
        return distance, mean

    def skip(self) -> None:
        """Record an epoch without a mask (not evaluated, or its scores were not finite)."""
        self.distances.append(math.nan)
        self.mean_distances.append(math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "packed",
            "window": self.window,
            "threshold": self.threshold,
            "accept_first_window": self.accept_first_window,
            "layout": None if self.layout is None else [[n, list(s)] for n, s in self.layout],
            "masks": list(self._masks),
            "full_checks": self._full_checks,
            "distances": list(self.distances),
            "mean_distances": list(self.mean_distances),
            "history": list(self._history),
            "history_epochs": list(self.history_epochs),
            "mask_epochs": list(self.mask_epochs),
            "ticket": self._ticket,
            "ticket_epoch": self.ticket_epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also the unpacked one of lightning-worm 0.1).

        Raises:
            ValueError: if the state was written with another window or threshold (named in the message).
        """
        differ = [f"{key}={state[key]!r} in the checkpoint, {key}={getattr(self, key)!r} now"
                  for key in ("window", "threshold") if state.get(key, getattr(self, key)) != getattr(self, key)]
        if differ:
            raise ValueError(
                "The checkpoint's ticket search ran with other settings (" + "; ".join(differ) + "). Resume with "
                "the checkpoint's settings, or start a new run (no `ckpt_path`) to search with the new ones."
            )
        if state.get("format") == "packed":
            self.layout = None if state["layout"] is None else tuple((n, tuple(s)) for n, s in state["layout"])
            masks, history, ticket = state["masks"], state["history"], state["ticket"]
        else:  # 0.1: flat bool tensors and a layout of (name, count)
            self.layout = None if state["layout"] is None else tuple((n, (int(c),)) for n, c in state["layout"])
            pack = lambda flat: Mask(flat.cpu().to(torch.bool), self._known_layout()).packed()  # noqa: E731
            masks = [pack(m) for m in state["masks"]]
            history = [pack(m) for m in state["history"]]
            ticket = None if state["ticket"] is None else pack(state["ticket"])
        self._masks = deque(masks, maxlen=self.window)
        self._full_checks = int(state.get("full_checks", sum(not math.isnan(d) for d in state["distances"])))
        self.distances = list(state["distances"])
        self.mean_distances = list(state["mean_distances"])
        self._history = list(history)
        self.history_epochs = list(state["history_epochs"])
        default = [e for e, d in enumerate(state["distances"]) if not math.isnan(d)]  # 0.1 did not record them
        self.mask_epochs = list(state.get("mask_epochs", self.history_epochs or default))
        self._ticket = ticket
        self.ticket_epoch = state["ticket_epoch"]

