"""Every private torch API that lightning-worm uses, pinned against the installed release.

A failure here names the internal that changed; see lightning_worm/_internals/torch.py.
"""

import torch
from torch import nn

from lightning_worm._internals import torch as internals


def test_foreach_kernels_do_what_the_truncation_and_the_sparsity_term_need():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    internals.foreach_mul_(grads, [torch.tensor([0.5, 2.0]), torch.tensor([[0.1]])])
    assert torch.equal(grads[0], torch.tensor([0.5, -4.0])) and torch.allclose(grads[1], torch.tensor([[0.3]])), (
        "torch._foreach_mul_ no longer multiplies tensor lists element-wise"
    )
    internals.foreach_add_sign_(grads, [torch.tensor([-3.0, 0.0]), torch.tensor([[2.0]])], alpha=0.5)
    assert torch.equal(grads[0], torch.tensor([0.0, -4.0])) and torch.allclose(grads[1], torch.tensor([[0.8]])), (
        "torch._foreach_add_ / torch._foreach_sign changed"
    )


def test_base_classes_cover_every_layer_they_stand_for():
    batchnorms = [nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm2d()]
    assert all(isinstance(m, internals.BatchNormBase) for m in batchnorms), "torch's _BatchNorm base class changed"
    assert not isinstance(nn.LayerNorm(2), internals.BatchNormBase) and not isinstance(nn.GroupNorm(1, 2),
                                                                                      internals.BatchNormBase)
    convs = [nn.Conv1d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1)]
    assert all(isinstance(m, internals.ConvNd) and hasattr(m, "groups") for m in convs), "torch's _ConvNd changed"


def test_multihead_attention_says_whether_it_packs_qkv():
    assert internals.mha_packs_qkv(nn.MultiheadAttention(8, 2)) is True
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)
    assert internals.mha_packs_qkv(separate) is False and separate.q_proj_weight is not None, (
        "nn.MultiheadAttention._qkv_same_embed_dim changed"
    )


def test_the_core_reaches_torch_internals_only_through_this_module():
    import pathlib
    import re

    core = pathlib.Path(internals.__file__).parents[1]
    private = re.compile(r"torch\._foreach|_ConvNd|_BatchNorm\b|_qkv_same_embed_dim")
    offenders = [f"{path.relative_to(core)}:{n}" for path in core.rglob("*.py") if "_internals" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not offenders, f"private torch API used outside lightning_worm/_internals/torch.py: {offenders}"
