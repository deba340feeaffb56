"""Refused before the search: whether a model's tracked units can be removed, found out before any epoch is spent.

:func:`check_prunable` runs the registered check of the source's surgery (a source without surgery, LayerNorm
channels, heads of ``nn.MultiheadAttention``) and, given an example input, :func:`trial_prune`: the surgery
itself, on the model, with a seeded random ticket at the asked ratio, checked like every prune
(``lightning_worm.core.surgery.equivalence``) and always undone (``lightning_worm.core.surgery.transaction``).
A model the trial cannot prune is refused with the surgery's own message, which names the module and the reason.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from lightning_worm.core.inputs import ExampleInput
from lightning_worm.core.masks import mask_from_scores, unit_scores
from lightning_worm.core.sources import ScoreSource, resolve_source
from lightning_worm.core.surgery.plan import PruningReport
from lightning_worm.core.surgery.registry import Surgery, surgery_for
from lightning_worm.core.surgery.transaction import ModelState, PruningError
from lightning_worm.core.validation import check_int, check_number

__all__ = ["check_prunable", "trial_prune"]


def check_prunable(
    model: nn.Module,
    source: Any = None,
    example_input: ExampleInput | None = None,
    *,
    ratio: float = 0.5,
    seed: int = 0,
    min_units: int = 1,
    **options: Any,
) -> Surgery:
    """Refuse, before a search, a model whose tracked units ``source``'s surgery could not remove.

    ``PruneAndFinetune`` calls it when the fit starts (with the first training batch and the tracker's ratio),
    so that a refusal does not wait for the ticket.

    Args:
        model: the model.
        source: the score source (a ``ScoreSource`` or a name; ``None``: BatchNorm channels).
        example_input: one input batch. Given, the surgery is tried on it (:func:`trial_prune`); else only the
            surgery's registered check runs.
        ratio: the trial ticket's pruning ratio (the tracker's ``prune_ratio``).
        seed: the seed of the trial ticket's random scores.
        min_units: units every entry of the trial ticket keeps at least.
        options: passed to the surgery (``coupling``, ``round_to``).

    Returns:
        The source's :class:`Surgery`.

    Raises:
        ValueError: naming why the units cannot be removed and what to do instead (no surgery, a refused
            source, a model the registered check refuses, an option the surgery does not take).
        PruningError: if the trial prune fails (the message names the module and the reason); the model is
            unchanged.

    Example::

        check_prunable(model, "batchnorm", torch.randn(2, 3, 32, 32), ratio=0.5)  # raises, or the model is fine
    """
    source = resolve_source(source)
    surgery = surgery_for(source)
    if surgery.check is not None:
        surgery.check(model, source)
    if example_input is not None:
        trial_prune(model, example_input, source=source, ratio=ratio, seed=seed, min_units=min_units, **options)
    return surgery


def trial_prune(
    model: nn.Module,
    example_input: ExampleInput,
    *,
    source: Any = None,
    ratio: float = 0.5,
    seed: int = 0,
    min_units: int = 1,
    **options: Any,
) -> PruningReport:
    """Prune ``model`` with a random ticket at ``ratio``, check the result, undo it, and return the report.

    The ticket ranks the tracked units by seeded random scores (every entry loses about ``ratio`` of its
    units), so the trial cuts every kind of layer the real ticket may cut. The prune is the real surgery, with
    its self-check; whatever happens, the model ends exactly as it was (the same parameter objects). It needs
    up to about twice the model's parameter memory for a moment.

    Returns:
        The trial's :class:`PruningReport` (its ``removed_fraction`` tells how much of a ticket this model can
        lose; no latency is measured).

    Raises:
        ValueError: on a bad argument, a model with layers not materialised yet (run one forward first), or an
            option the surgery does not take.
        PruningError: if the surgery cannot prune the model; the message says the model is unchanged.
    """
    check_number("ratio", ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("seed", seed)
    source = resolve_source(source)
    surgery = surgery_for(source)
    unknown = sorted(set(options) - set(surgery.options))
    if unknown:
        raise ValueError(f"The {surgery.kind!r} surgery takes {list(surgery.options)}, not {unknown}.")
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        raise ValueError("The model has lazy layers that are not materialised yet: run one forward pass before "
                         "trying its prune.")
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(s.shape, generator=generator) for name, s in unit_scores(model, source).items()}
    if not scores:
        raise ValueError(f"{type(source).__name__} tracks nothing in this {type(model).__name__}: there is nothing "
                         "to prune.")
    ticket = mask_from_scores(scores, ratio, min_units).mask
    if "measure_latency" in surgery.options:
        options["measure_latency"] = False
    state = ModelState(model)
    try:
        with warnings.catch_warnings():  # a shortfall or an unmeasured number: the caller reads the report
            warnings.simplefilter("ignore")
            return surgery.prune(model, ticket, example_input, source=source, **options)
    except PruningError as error:
        raise PruningError(
            f"{type(model).__name__} cannot be pruned by {_described(source)}: a trial prune at ratio {ratio:g} "
            f"(a random ticket, on the example input) failed. {error}"
        ) from error
    finally:
        state.restore()


def _described(source: ScoreSource) -> str:
    return f"{type(source).__name__} ({source.description})" if getattr(source, "description", "") else \
        type(source).__name__
