"""TicketDetector: the window, the distances, the ticket, its state."""

import math

import pytest
import torch

from lightning_worm.core import (
    TicketDetector,
)


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
