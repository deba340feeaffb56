"""The core serves a plain PyTorch loop: no Lightning anywhere."""

import torch
from torch import nn

from lightning_worm.core import (
    ChiSchedule,
    GradientTruncation,
    TicketDetector,
    unit_mask,
)


def test_plain_pytorch_loop_finds_ticket_with_worm():
    """The core serves a plain loop: train, mask per epoch, detect, truncate once per step."""
    from tests.helpers import tiny_loader
    from tests.models import TinyNet

    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    detector, schedule = TicketDetector(window=3, threshold=0.2), ChiSchedule("elbow", chi=0.003, elbow=0.3)
    truncation = GradientTruncation(model)
    for _epoch in range(12):
        for x, y in tiny_loader():
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            truncation.apply()
            optimizer.step()
        _, mean = detector.update(unit_mask(model, 0.5))
        truncation.set(detector.mask, schedule.update(mean))
        if detector.ticket is not None:
            break
    assert detector.ticket_epoch is not None and schedule.switched
    assert truncation.truncated_units == 12  # half of 8 + 16 channels
