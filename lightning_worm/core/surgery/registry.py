"""The registry of surgeries: per score source, the surgery that removes its units, its replay and its check.

A source only finds and scores units; what removes them is registered here, for the source's class and
its subclasses (the nearest registered class in the method resolution order wins). A plan names the kind
of surgery that wrote it, so :func:`apply_plan` finds the replay from the plan alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from lightning_worm.core.measure import eval_mode
from lightning_worm.core.sources import ScoreSource
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport

__all__ = ["Surgery", "apply_plan", "refuse_unprunable", "register_surgery", "surgery_for"]


@dataclass(frozen=True)
class Surgery:
    """How the units of one kind of source leave a model, and come back off a plan.

    Attributes:
        kind: the :attr:`PruningPlan.kind <lightning_worm.PruningPlan.kind>` its plans carry.
        prune: ``prune(model, ticket, example_input, *, source, **options) -> PruningReport``; removes the
            ticket's pruned units in place. Its keyword-only parameters other than ``source`` are the
            :attr:`options` it takes.
        replay: ``replay(model, plan, **options) -> KeptIndices``: repeats a plan of this kind on a freshly built
            model; it checks the whole plan against the model before it changes anything.
        check: ``check(model, source)``: refuses, before a search, a model this surgery could not prune (a
            ``ValueError`` naming the module and the reason), or ``None``: every model.
        accepts: ``accepts(source)``: the options that matter for this source, when they depend on it (a
            ``SourceList``'s are its members'), or ``None``: all of :attr:`options`.
    """

    kind: str
    prune: Callable[..., PruningReport]
    replay: Callable[..., KeptIndices]
    check: Callable[[nn.Module, ScoreSource], None] | None = None
    accepts: Callable[[ScoreSource], tuple[str, ...]] | None = None

    @property
    def options(self) -> tuple[str, ...]:
        """The options :attr:`prune` takes (its keyword-only parameters other than ``source``)."""
        return _keyword_only(self.prune, exclude="source")

    def options_for(self, source: ScoreSource) -> tuple[str, ...]:
        """The options that matter when this surgery prunes ``source``'s units."""
        return self.options if self.accepts is None else self.accepts(source)


_BY_SOURCE: dict[type, Surgery | str] = {}
_BY_KIND: dict[str, Surgery] = {}


def register_surgery(source_type: type[ScoreSource], surgery: Surgery | str) -> None:
    """Register the surgery of ``source_type`` and its subclasses, or, as a string, why their units cannot go.

    Raises:
        ValueError: if ``source_type`` is not a :class:`~lightning_worm.ScoreSource` class, or the kind is taken
            by another surgery.

    Example::

        register_surgery(GroupNormChannels, Surgery("groupnorm", prune=prune_groupnorm, replay=replay_groupnorm))
        register_surgery(MyScores, "MyScores rank single weights: there is nothing to remove physically.")
    """
    if not (isinstance(source_type, type) and issubclass(source_type, ScoreSource)):
        raise ValueError(f"`source_type` must be a ScoreSource subclass, got {source_type!r}.")
    if isinstance(surgery, Surgery):
        taken = _BY_KIND.get(surgery.kind)
        if taken is not None and taken != surgery:
            raise ValueError(f"The plan kind {surgery.kind!r} is registered by another surgery already: give yours "
                             "a kind of its own, so that a plan names the one replay that repeats it.")
        _BY_KIND[surgery.kind] = surgery
    elif not isinstance(surgery, str):
        raise ValueError(f"`surgery` must be a Surgery or a refusal (str), got {type(surgery).__name__}.")
    _BY_SOURCE[source_type] = surgery


def _registered(source: ScoreSource) -> Surgery | str | None:
    return next((_BY_SOURCE[cls] for cls in type(source).__mro__ if cls in _BY_SOURCE), None)


def refuse_unprunable(source: ScoreSource) -> None:
    """Raise the refusal registered for ``source``'s class, if it is one (a surgery called directly checks it).

    Raises:
        ValueError: the registered reason why the source's units cannot be removed.
    """
    found = _registered(source)
    if isinstance(found, str):
        raise ValueError(found)


def surgery_for(source: ScoreSource) -> Surgery:
    """The surgery registered for ``source``'s class (or its nearest registered base class).

    Raises:
        ValueError: if none is registered, or the registration is a refusal (its reason is the message).
    """
    found = _registered(source)
    if isinstance(found, Surgery):
        return found
    if isinstance(found, str):
        raise ValueError(found)
    raise ValueError(
        f"PruneAndFinetune cannot remove the units of {type(source).__name__}: it has no surgery. Track a source that "
        "can be pruned (e.g. 'batchnorm', 'attention_heads'), prune with your own surgery, or register one for it "
        "(lightning_worm.core.surgery.register_surgery)."
    )


def apply_plan(model: nn.Module, plan: PruningPlan | Mapping[str, Any], **options: Any) -> KeptIndices:
    r"""Repeat a surgery on a freshly built model of the same class, in place.

    Afterwards ``model.load_state_dict(pruned_model.state_dict())`` works and gives identical outputs.
    Call it before loading a pruned checkpoint into a dense model. Lazy layers not materialised yet are
    materialised first by one eval-mode forward on zeros shaped like the plan's inputs. The plan is replayed by
    the surgery registered for its ``kind`` (``"channels"``, ``"heads"``, ``"elementwise"``, or one of your own: see
    :func:`register_surgery`), which checks the whole plan against the model before changing anything.
    The model may be in another floating dtype than the pruned one (a bf16-true model's plan replays on a
    float32 module and back).

    Args:
        model: a model built like the pruned one (same layers; the class may be a subclass), not yet pruned.
        plan: ``report.plan`` or its ``to_dict()``.
        options: passed to the replay; ``"channels"`` and ``"heads"`` take ``source=`` (by default the plan's).

    Returns:
        The kept original indices per changed parameter, as ``report.kept_indices``.

    Raises:
        ValueError: if the plan is malformed, of an unknown kind, does not fit the model (the message names the
            entry and the fix; the model is then unchanged), or an option is not one the replay takes.

    Example::

        >>> fresh = torchvision.models.resnet18(num_classes=10)
        >>> _ = apply_plan(fresh, report.plan)  # e.g. json.loads(...) of report.plan.to_dict() works too
        >>> fresh.load_state_dict(model.state_dict())
        <All keys matched successfully>
    """
    plan = PruningPlan.from_dict(plan)
    plan.validate()
    surgery = _BY_KIND.get(plan.kind)
    if surgery is None:
        raise ValueError(
            f"The plan's kind {plan.kind!r} has no registered surgery (known: {sorted(_BY_KIND)}). Import the module "
            "that registers it (lightning_worm.core.surgery.register_surgery) before applying the plan."
        )
    taken = _keyword_only(surgery.replay)
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise ValueError(f"The {plan.kind!r} replay takes {list(taken) or 'no options'}, not {unknown}.")
    if any(isinstance(p, UninitializedParameter) for p in model.parameters()):
        with eval_mode(model), torch.no_grad():  # lazy layers take their sizes from one forward
            model(*plan.zero_inputs(model))
    return surgery.replay(model, plan, **options)


def _keyword_only(fn: Callable[..., Any], exclude: str = "") -> tuple[str, ...]:
    parameters = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != exclude)
