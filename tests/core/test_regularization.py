"""The sparsity term: s * sign(p) added to the gradient."""

import pytest
import torch

from lightning_worm.core import (
    add_sparsity_gradient,
)
from tests.models import two_layer


def test_sparsity_gradient_adds_sign():
    model = two_layer([0.5, -0.2], [0.0, 1.0])
    model(torch.randn(2, 3, 4, 4)).sum().backward()
    grads = [model[1].weight.grad.clone(), model[3].weight.grad.clone()]
    add_sparsity_gradient([model[1].weight, model[3].weight], 1e-2)
    torch.testing.assert_close(model[1].weight.grad, grads[0] + 1e-2 * torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(model[3].weight.grad, grads[1] + 1e-2 * torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="sparsity"):
        add_sparsity_gradient([], -1.0)
