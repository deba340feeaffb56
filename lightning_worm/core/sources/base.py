"""The score-source protocol: the seam between a model and the ticket search.

A :class:`ScoreSource` says what the search tracks in a model: which *entries* exist (a BatchNorm
layer's channels, an attention block's heads, a projection's weights), the importance score of each
unit of an entry (any shape: one per channel, one per head, one per weight), how a keep-mask of those
units turns into gradient factors (what WORM multiplies), which parameters the sparsity term
regularises. Detection, distances, truncation, checkpoints and logging only ever see a source's output;
they know nothing of module types. A source only finds and scores units: what removes them is the
surgery registered for it (:func:`lightning_worm.core.surgery.register_surgery`).

An entry's *handle* (what :meth:`ScoreSource.tracked` returns per entry name) is opaque to the core:
usually the module itself, or a small object naming a part of a module (a packed projection's query
rows). Every other method takes that handle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_worm.core.validation import check_choice, check_number

__all__ = ["SCOPES", "ChannelSource", "ScaleSource", "ScoreSource"]

#: How a source's units are ranked: ``"global"`` (one ranking over all its entries) or ``"layer"`` (each entry on
#: its own, so that every entry loses the same fraction).
SCOPES = ("global", "layer")


class ScoreSource:
    """Base class of score sources.

    Subclasses implement ``candidates`` and ``scores``, and usually ``skip_reason``,
    ``gradient_factors`` and ``sparsity_parameters``. Units are removed by the surgery registered for the
    source's class (:func:`lightning_worm.core.surgery.register_surgery`).

    Every source takes two ranking settings, which matter when a tracker follows several sources at once
    (``EarlyBirdCallback(source=[AttentionHeadSource(scope="layer"), FeedForwardSource(prune_ratio=0.4)])``):

    Args:
        prune_ratio: the fraction of this source's units a mask prunes, in (0, 1); ``None`` (default): the
            tracker's ``prune_ratio``.
        scope: ``"global"`` (default): one ranking over all the source's entries; ``"layer"``: each entry (a
            BatchNorm layer, an attention block, a feed-forward block) ranked on its own, so that every entry loses
            the same fraction (EarlyBERT's rule for heads).

    Raises:
        ValueError: on a ratio out of (0, 1) or an unknown scope.
    """

    #: The short name of the source (``EarlyBirdCallback(source=key)``, state keys, YAML).
    key: str = "custom"
    #: A short human description of what is tracked, for messages.
    description: str = "units"
    prune_ratio: float | None = None
    scope: str = "global"

    def __init__(self, *, prune_ratio: float | None = None, scope: Literal["global", "layer"] = "global") -> None:
        self.prune_ratio = None if prune_ratio is None else check_number(
            "prune_ratio", prune_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
        self.scope = check_choice("scope", scope, SCOPES)

    def ranking(self) -> dict[str, Any]:
        """The ranking settings that differ from the defaults (``prune_ratio``, ``scope``), for reprs and state keys."""
        out: dict[str, Any] = {}
        if self.prune_ratio is not None:
            out["prune_ratio"] = self.prune_ratio
        if self.scope != "global":
            out["scope"] = self.scope
        return out

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` ready to be scored, before its optimizers are built (the tracker calls it at setup). Nothing
        by default."""

    def fold(self, model: nn.Module) -> None:
        """Fold what :meth:`prepare` added into the weights and remove it (a surgery calls it before its cut). Nothing
        by default."""

    def parts(self, model: nn.Module) -> list[tuple[ScoreSource, list[str]]]:
        """The sources whose rankings make up a mask of ``model``, each with the entries it ranks (this source and
        all its tracked entries; a :class:`~lightning_worm.core.sources.SourceList` has one part per member)."""
        return [(self, list(self.tracked(model)))]

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, Any]]:
        """Yield ``(entry name, handle)`` for every entry of the kind this source scores, tracked or not."""
        raise NotImplementedError

    def skip_reason(self, handle: Any) -> str | None:
        """Why a candidate is not tracked (``None`` if it is)."""
        return None

    def scores(self, handle: Any) -> Tensor:
        """The importance score of each unit of the entry (any shape), in float32 or wider."""
        raise NotImplementedError

    def count(self, handle: Any) -> int:
        """The number of units of the entry."""
        return self.scores(handle).numel()

    def gradient_factors(self, handle: Any, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, factor)`` pairs: WORM multiplies ``parameter.grad`` by ``factor`` (broadcastable).

        ``keep`` is the entry's boolean mask, shaped like its scores (``True`` = keep). Parameters not
        returned are never touched. The default truncates nothing.
        """
        return []

    def sparsity_parameters(self, handle: Any) -> list[Tensor]:
        """Parameters that the sparsity term ``s * sign(p)`` regularises (none by default)."""
        return []

    def tracked(self, model: nn.Module) -> dict[str, Any]:
        """The tracked entries of ``model`` (entry name -> handle), in model order."""
        return {name: h for name, h in self.candidates(model) if self.skip_reason(h) is None}

    def skipped(self, model: nn.Module) -> dict[str, str]:
        """The candidates left out, by entry name, with the reason."""
        out = {}
        for name, handle in self.candidates(model):
            reason = self.skip_reason(handle)
            if reason is not None:
                out[name] = reason
        return out

    def summary(self, model: nn.Module) -> str:
        """One line saying what is tracked in ``model`` and what is left out (printed once at setup)."""
        tracked = self.tracked(model)
        units = sum(self.count(h) for h in tracked.values())
        line = f"tracking {units} units ({self.description}) in {len(tracked)} entries"
        skipped = self.skipped(model)
        if skipped:
            line += "; left out: " + ", ".join(f"{n} ({why})" for n, why in skipped.items())
        return line

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.ranking().items())})"

    def label(self) -> str:
        """The source as a state key names it: its class, with the ranking settings that differ from the defaults."""
        ranking = self.ranking()
        return type(self).__name__ + (f"({', '.join(f'{k}={v!r}' for k, v in ranking.items())})" if ranking else "")


class ChannelSource(ScoreSource):
    """A source whose units are the channels of a module: dim 0 of its per-channel parameters.

    Subclasses implement ``candidates``, ``scores`` (1-D, one score per channel),
    ``channel_parameters`` (truncated by WORM along dim 0) and ``sparsity_parameters``.
    """

    description = "channels"

    def channel_parameters(self, handle: Any) -> list[Tensor]:
        """Parameters with one entry per channel along dim 0 (truncated by WORM)."""
        raise NotImplementedError

    def gradient_factors(self, handle: Any, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        out = []
        for param in self.channel_parameters(handle):
            if param.shape[0] != keep.numel():
                raise ValueError(f"A mask of {keep.numel()} channels does not fit a parameter of {param.shape[0]}.")
            factor = torch.where(keep.to(param.device), 1.0, chi).to(param.dtype)
            out.append((param, factor.view(-1, *([1] * (param.dim() - 1)))))
        return out


class ScaleSource(ChannelSource):
    """A :class:`ChannelSource` whose channels are scored by the magnitude of a per-channel scale ``weight``.

    The normalisation layers' sources (BatchNorm, LayerNorm): ``|weight|`` scores each channel, WORM
    truncates the weight and the bias, the sparsity term regularises the weight. Subclasses say which
    modules are candidates (``candidates``, ``skip_reason``).
    """

    @staticmethod
    def _weight(module: nn.Module) -> Tensor:
        """The module's scale: a ``Parameter`` on every tracked module (``skip_reason`` checks it)."""
        return cast(Tensor, module.weight)

    def scores(self, module: nn.Module) -> Tensor:
        weight = self._weight(module).detach()
        return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))

    def count(self, module: nn.Module) -> int:
        return self._weight(module).numel()

    def channel_parameters(self, module: nn.Module) -> list[Tensor]:
        bias = getattr(module, "bias", None)
        return [p for p in (module.weight, bias) if isinstance(p, nn.Parameter) and p.requires_grad]

    def sparsity_parameters(self, module: nn.Module) -> list[Tensor]:
        return [self._weight(module)]
