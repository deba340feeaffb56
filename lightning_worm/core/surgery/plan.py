"""The plan that replays a surgery, the report of one, and the registry of replays by plan kind."""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Union

from torch import Tensor, nn

__all__ = ["KeptIndices", "PruningPlan", "PruningReport", "register_replay", "replay"]

#: Per changed parameter (named as before the surgery), the kept original indices along each dim.
KeptIndices = dict[str, list[Optional[Tensor]]]

PLAN_FORMAT_VERSION = 1


@dataclass
class PruningPlan:
    """What :func:`~lightning_worm.core.surgery.apply_plan` needs to repeat a surgery on a fresh model.

    JSON-serialisable via :meth:`to_dict`. Plans written before ``kind`` and ``source`` existed load with
    their defaults.

    Attributes:
        model_class: qualified class name of the pruned model.
        input_specs: shape and dtype of each example input (the graph is rebuilt from zeros of these;
            floating inputs are made in the fresh model's parameter dtype).
        pruned_groups: ``[root module name, output channel indices]`` per pruned group; the indices are
            those of the unpruned model, and all groups are removed in one step.
        channels_before: units of every scored module (entry) before the surgery.
        channels_after: units of every scored module after it.
        format_version: version of this layout.
        kind: what was removed (``"channels"``); :func:`~lightning_worm.core.surgery.apply_plan`
            replays a plan with the replay registered for its kind.
        source: the key of the score source whose modules were counted (``"batchnorm"``).
        options: kind-specific data (none for ``"channels"``).
    """

    model_class: str
    input_specs: list[dict[str, Any]]
    pruned_groups: list[list[Any]]
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    format_version: int = PLAN_FORMAT_VERSION
    kind: str = "channels"
    source: str = "batchnorm"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. after ``json.loads``).

        Raises:
            ValueError: if ``data`` is not a plan of a version this code reads (the message names the field).
        """
        if isinstance(data, PruningPlan):
            return copy.deepcopy(data)
        if not isinstance(data, Mapping):
            raise ValueError(
                f"A pruning plan must be a PruningPlan or the dict of its `to_dict()`, got {type(data).__name__}."
            )
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"Unsupported pruning plan format_version {version!r}; this lightning-worm reads version "
                f"{PLAN_FORMAT_VERSION}. Re-create the plan with this version of lightning-worm."
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED)
        if unknown or missing:
            problem = "; ".join(p for p in (unknown and f"unknown fields {unknown}", missing and f"missing fields "
                                            f"{missing}") if p)
            raise ValueError(f"Not a pruning plan: {problem}. Pass `report.plan` or `report.plan.to_dict()`.")
        return cls(**copy.deepcopy(dict(data)))


_REQUIRED = ("model_class", "input_specs", "pruned_groups", "channels_before", "channels_after")


@dataclass
class PruningReport:
    """The outcome of :func:`~lightning_worm.core.surgery.prune_channels`.

    Channel counts are the score source's units (BatchNorm channels by default). They add up:
    ``ticket_pruned == pruned_from_ticket + kept_for_coupling + kept_for_min_channels + kept_for_round_to
    + kept_unprunable`` and ``sum(channels_before) - sum(channels_after) == pruned_from_ticket +
    pruned_outside_ticket``.

    Attributes:
        plan: the replayable :class:`PruningPlan`.
        params_before: parameter count before.
        params_after: parameter count after.
        flops_before: FLOPs of one forward per example, before (``torch.utils.flop_counter``, a
            multiply-add counts 2, as in Lightning's model summary; the example input's FLOPs divided by
            its batch, ``flops_batch``).
        flops_after: the same, after.
        channels_before: units per scored module before.
        channels_after: units per scored module after.
        ticket_pruned: units the ticket asks to prune.
        pruned_from_ticket: of those, the units removed.
        pruned_outside_ticket: units removed although the ticket keeps them (``coupling="mean_rank"``).
        kept_for_coupling: ticket-pruned units kept because the coupling rule kept their channel.
        kept_for_min_channels: ticket-pruned units kept so that no layer loses all its channels.
        kept_for_round_to: ticket-pruned units kept to round channel counts to ``round_to``.
        kept_unprunable: ticket-pruned units that cannot be removed (no prunable producer, reaching the
            model output, partly unprunable chunk or group).
        latency_before_ms: median eval-mode latency on the example input before (``torch.utils.benchmark``),
            ``None`` if not measured.
        latency_after_ms: the same, after.
        kept_indices: for every parameter (named as before the surgery) whose shape changed, the kept
            original indices along each dim (``None``: dim untouched), on the CPU. Slice optimizer state
            with it: ``old[kept[0]][:, kept[1]]`` for a conv weight pruned on both dims.
        coupling: the coupling rule used.
        round_to: the rounding used.
        flops_batch: the batch size of the example input the FLOPs were counted on.
        prunable: units that can be removed at all (not ``kept_unprunable`` nor the unprunable
            units the ticket keeps).
        ticket_agreement: the fraction of the ticket's pruned units that were removed
            (``pruned_from_ticket / ticket_pruned``; 1.0 if the ticket prunes nothing).
        removed_fraction: the fraction of the prunable units removed; compare with the ticket's ratio.
        note: what the numbers do not say, for the reader (an element-wise ticket saves no time), or ``None``.
    """

    plan: PruningPlan
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    ticket_pruned: int
    pruned_from_ticket: int
    pruned_outside_ticket: int
    kept_for_coupling: int
    kept_for_min_channels: int
    kept_for_round_to: int
    kept_unprunable: int
    latency_before_ms: Optional[float]
    latency_after_ms: Optional[float]
    kept_indices: KeptIndices = field(repr=False)
    coupling: str = "all"
    round_to: Optional[int] = None
    flops_batch: int = 1
    prunable: int = 0
    note: Optional[str] = None

    @property
    def ticket_agreement(self) -> float:
        return self.pruned_from_ticket / self.ticket_pruned if self.ticket_pruned else 1.0

    @property
    def removed_fraction(self) -> float:
        return (self.pruned_from_ticket + self.pruned_outside_ticket) / self.prunable if self.prunable else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tensors become lists), with ``ticket_agreement`` and ``removed_fraction``.

        ``note`` is there only if the report has one.
        """
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if out["note"] is None:
            del out["note"]
        out["plan"] = self.plan.to_dict()
        out["kept_indices"] = {
            name: [None if idx is None else idx.tolist() for idx in dims] for name, dims in self.kept_indices.items()
        }
        out["ticket_agreement"] = self.ticket_agreement
        out["removed_fraction"] = self.removed_fraction
        return copy.deepcopy(out)


Replay = Callable[..., KeptIndices]
_REPLAYS: dict[str, Replay] = {}
# The library's own replays that live outside the surgery package, imported on first use (importing them
# here would be circular): a plan written in another process replays after a plain `import lightning_worm`.
_REPLAY_MODULES = {"heads": "lightning_worm.core.sources.attention_surgery",
                   "elementwise": "lightning_worm.core.sources.attention_surgery"}


def register_replay(kind: str) -> Callable[[Replay], Replay]:
    """Register ``replay(model, plan, **options) -> kept_indices`` for plans of ``kind`` (a decorator).

    A replay validates the whole plan against the model before it changes anything, raising a
    ``ValueError`` that names the entry at fault and the fix.

    Example::

        @register_replay("heads")
        def replay_heads(model, plan):
            ...
    """

    def register(fn: Replay) -> Replay:
        _REPLAYS[kind] = fn
        return fn

    return register


def replay(model: nn.Module, plan: Union[PruningPlan, Mapping[str, Any]], **options: Any) -> KeptIndices:
    """Dispatch ``plan`` to the replay registered for its kind."""
    plan = PruningPlan.from_dict(plan)
    fn = _REPLAYS.get(plan.kind) if isinstance(plan.kind, str) else None
    if fn is None and isinstance(plan.kind, str) and plan.kind in _REPLAY_MODULES:
        importlib.import_module(_REPLAY_MODULES[plan.kind])
        fn = _REPLAYS.get(plan.kind)
    if fn is None:
        raise ValueError(
            f"The plan's kind {plan.kind!r} has no registered replay (known: {sorted(_REPLAYS)}). Import the module "
            "that registers it (lightning_worm.core.surgery.register_replay) before applying the plan."
        )
    return fn(model, plan, **options)
