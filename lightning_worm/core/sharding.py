"""Parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``): whole values where the search ranks units, the
local shard where the per-step work runs.

Under FSDP2 each rank holds one shard of every parameter and of its gradient (a ``DTensor`` with the global
shape). The search needs every unit's score once per epoch: a score is a small reduction of its parameters
(a BatchNorm gamma, a head's norm), computed on the shards and gathered whole (:func:`whole`). The per-step
work (WORM's truncation, the sparsity term) is element-wise: it runs on each rank's local shard of the
gradient with the matching shard of its factor (:func:`local`, :func:`local_part`), with no communication.
On plain tensors every function here is the identity.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from torch import Tensor

try:  # torch.distributed is optional in torch builds (e.g. some mobile and Windows ones)
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover - every build this project tests has torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["is_sharded", "local", "local_part", "shard_groups", "shard_like", "whole"]


def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient under FSDP2 or tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def whole(tensor: Tensor) -> Tensor:
    """The whole value of ``tensor``: gathered from every rank if it is a ``DTensor`` (a collective: every rank of
    its mesh calls it together), else ``tensor`` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of ``tensor`` if it is a ``DTensor`` (the same storage: in-place work on it changes the
    ``DTensor``), else ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_part(value: Tensor, like: Tensor) -> Tensor:
    """The part of ``value`` (whole, broadcastable to ``like``'s global shape) that matches ``like``'s local shard.

    ``value`` is expanded to the global shape and split the way ``like`` is placed, without communication (a
    replicated tensor redistributed to shards keeps its own chunk). ``value`` itself when ``like`` is a plain
    tensor.

    Raises:
        ValueError: if the part does not have the shape of ``like``'s local shard.
    """
    if not is_sharded(like):
        return value
    mesh, placements = like.device_mesh, like.placements
    expanded = value.to(like.dtype).expand(like.shape).contiguous()
    replicated = DTensor.from_local(expanded, mesh, [Replicate()] * mesh.ndim, run_check=False)
    part = replicated.redistribute(mesh, placements).to_local()
    shard = like.to_local()
    if part.shape != shard.shape:
        raise ValueError(f"A factor split as {placements} has the shape {tuple(part.shape)} on this rank, its "
                         f"parameter's shard {tuple(shard.shape)}: the parameter is not sharded the way DTensor "
                         "splits (FSDP2's fully_shard is).")
    return part


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """``value`` (whole, of ``like``'s global shape) sharded the way ``like`` is, without communication; ``value``
    itself when ``like`` is a plain tensor or another shape (an optimizer's scalar ``step``)."""
    if not is_sharded(like) or value.shape != like.shape:
        return value
    return DTensor.from_local(local_part(value, like), like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride(), run_check=False)


def shard_groups(tensor: Tensor) -> list[Any]:
    """The process groups over which ``tensor`` is split (its mesh dimensions with a ``Shard`` placement): summing
    every rank's local result over them gives the whole result once, also when other dimensions replicate (HSDP).
    Empty for a plain tensor."""
    if not is_sharded(tensor):
        return []
    mesh = tensor.device_mesh
    return [mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if placement.is_shard()]
