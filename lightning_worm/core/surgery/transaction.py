"""All or nothing: a surgery completes, or it leaves the model exactly as it found it.

A surgery replaces parameters and buffers by new, sliced tensors and changes module attributes (sizes, head
counts); it never writes into the old tensors. So a :class:`ModelState` (every module's attributes, taken by
reference, and every parameter's ``requires_grad``) is enough to undo it: :meth:`ModelState.restore` puts the
very same parameter objects back, so that an optimizer, a DDP reducer or a checkpoint hook that holds them is
still right. :func:`all_or_nothing` restores it when its block raises, and turns a foreign exception (from
torch-pruning, or a forward) into a :class:`PruningError` that chains the original.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["ModelState", "PruningError", "all_or_nothing"]


class PruningError(RuntimeError):
    """A surgery failed, or its result failed the self-check. The model was left as it was before it."""


def _shallow(attributes: dict[str, Any]) -> dict[str, Any]:
    # Containers (parameters, buffers, children, hooks, lists of sizes) are copied, their items are not.
    return {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v for k, v in attributes.items()}


class ModelState:
    """Every module of ``model``: its class and attributes, by reference; and its parameters' ``requires_grad``.

    Example::

        state = ModelState(model)
        prune_channels(model, ticket, x, check=False)
        state.restore()  # the same parameter objects as before, the same sizes, the same hooks
    """

    def __init__(self, model: nn.Module) -> None:
        # The class too: a parametrisation (``torch.nn.utils.parametrize``) swaps it.
        self._modules = [(m, type(m), _shallow(vars(m))) for m in model.modules()]
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        """Put every module's attributes back as they were when this state was taken."""
        for module, cls, attributes in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            vars(module).clear()
            vars(module).update(_shallow(attributes))
        for parameter, requires_grad in self._requires_grad:
            parameter.requires_grad_(requires_grad)


@contextmanager
def all_or_nothing(model: nn.Module, what: str = "The surgery", hint: str = "") -> Iterator[ModelState]:
    """Undo every change to ``model`` if the block raises; yields the state taken on entry.

    A :class:`PruningError` or ``ValueError`` raised inside passes through unchanged (after the undo); any other
    exception becomes a :class:`PruningError` that names ``what`` failed, says the model is unchanged, adds
    ``hint`` (what the user can do), and chains the original. ``KeyboardInterrupt`` undoes too and passes through.

    Raises:
        PruningError: see above.
    """
    state = ModelState(model)
    try:
        yield state
    except (PruningError, ValueError, NotImplementedError):
        state.restore()
        raise
    except Exception as error:
        state.restore()
        raise PruningError(
            f"{what} failed ({type(error).__name__}: {error}); the model was left unchanged. "
            + (hint or "This model has a layer the surgery does not handle: track another source, or report it "
               "with the model's definition.")
        ) from error
    except BaseException:
        state.restore()
        raise
