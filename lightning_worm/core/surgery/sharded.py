"""Surgery on a model sharded with FSDP2 (``fully_shard``): gathered whole, changed, sharded again the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_worm._internals.fsdp import ShardingRecipe, record_sharding, remove_fsdp

__all__ = ["unsharded"]


@contextmanager
def unsharded(model: nn.Module, *, undo: bool = False) -> Iterator[ShardingRecipe | None]:
    """Run the block on ``model`` gathered whole, without FSDP2; then shard it again as it was sharded.

    Every rank gathers the whole parameters (a collective: all ranks enter together) and runs the block on the
    same plain module, so a deterministic surgery makes the same cut everywhere. On exit ``fully_shard`` is
    applied again to the same modules with the same mesh and options (reshard after forward, mixed precision,
    offload, shard placements): the parameters are new ``DTensor`` objects, so the caller rebuilds its
    optimizers (:func:`~lightning_worm.core.surgery.carry_optimizer_state` carries sharded state). With
    ``undo=True``, or when the block raises, FSDP2 is put back exactly as it was (the same parameter objects):
    for a change the block undoes itself (a trial prune, a failed surgery). A model without FSDP2 passes
    through unchanged (yields ``None``).

    Example::

        with unsharded(model):
            report = prune_channels(model, ticket, example_input)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    """
    recipe = record_sharding(model)
    if recipe is None:
        yield None
        return
    restore = remove_fsdp(model, recipe)
    try:
        yield recipe
    except BaseException:
        restore()
        raise
    if undo:
        restore()
    else:
        recipe.apply(model)
