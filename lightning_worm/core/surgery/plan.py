"""The plan that replays a surgery, and the report of one."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from lightning_worm._deprecation import RenamedAttribute
from lightning_worm.core import measure
from lightning_worm.core.inputs import batch_size

__all__ = ["KeptIndices", "PruningPlan", "PruningReport"]

#: Per changed parameter (named as before the surgery), the kept original indices along each dim.
KeptIndices = dict[str, list[Tensor | None]]

PLAN_FORMAT_VERSION = 2
# Version 1 (lightning-worm 0.1) named the unit counts `channels_before` / `channels_after`.
_V1_NAMES = {"channels_before": "units_before", "channels_after": "units_after"}


@dataclass
class PruningPlan:
    """What :func:`~lightning_worm.core.surgery.apply_plan` needs to repeat a surgery on a fresh model.

    JSON-serialisable via :meth:`to_dict`. Plans of format version 1 (lightning-worm 0.1, which named the
    unit counts ``channels_before`` and ``channels_after``) load too; plans written before ``kind`` and
    ``source`` existed load with their defaults.

    Attributes:
        model_class: qualified class name of the pruned model.
        input_specs: shape and dtype of each example input (the graph is rebuilt from zeros of these;
            floating inputs are made in the fresh model's parameter dtype).
        pruned_groups: ``[root module name, output channel indices]`` per pruned group; the indices are
            those of the unpruned model, and all groups are removed in one step.
        units_before: units of every scored module (entry) before the surgery.
        units_after: units of every scored module after it.
        format_version: version of this layout.
        kind: what was removed (``"channels"``); :func:`~lightning_worm.core.surgery.apply_plan`
            replays a plan with the replay registered for its kind.
        source: the key of the score source whose modules were counted (``"batchnorm"``).
        options: kind-specific data (none for ``"channels"``).
    """

    model_class: str
    input_specs: list[dict[str, Any]]
    pruned_groups: list[list[Any]]
    units_before: dict[str, int]
    units_after: dict[str, int]
    format_version: int = PLAN_FORMAT_VERSION
    kind: str = "channels"
    source: str = "batchnorm"
    options: dict[str, Any] = field(default_factory=dict)

    channels_before = RenamedAttribute("units_before")
    channels_after = RenamedAttribute("units_after")

    @classmethod
    def of(cls, model: nn.Module, inputs: Sequence[Tensor], **fields: Any) -> PruningPlan:
        """A plan for ``model`` traced on ``inputs``: its class name and the inputs' specs filled in."""
        specs = [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs]
        return cls(model_class=_class_name(model), input_specs=specs, **fields)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    def made_for(self, model: nn.Module) -> str:
        """``""`` if ``model`` is of the plan's class, else a sentence naming both classes (for messages)."""
        cls = _class_name(model)
        return "" if self.model_class == cls else f" The plan was made for a {self.model_class}, this is a {cls}."

    def zero_inputs(self, model: nn.Module) -> tuple[Tensor, ...]:
        """Zeros shaped like the plan's example inputs, on ``model``'s device.

        Floating inputs take the dtype of the model's (materialised) floating parameters, so that a plan
        recorded under bf16-true replays on a float32 module and back; integer inputs keep their recorded dtype.
        """
        params = [p for p in model.parameters() if not isinstance(p, UninitializedParameter)]
        device = params[0].device if params else torch.device("cpu")
        floating = next((p.dtype for p in params if p.is_floating_point()), None)
        inputs = []
        for spec in self.input_specs:
            dtype = getattr(torch, spec["dtype"])
            if dtype.is_floating_point and floating is not None:
                dtype = floating
            inputs.append(torch.zeros(spec["shape"], dtype=dtype, device=device))
        return tuple(inputs)

    def validate(self) -> None:
        """Check that every field has the type and range a replay needs (the kind's own ``pruned_groups`` aside).

        Raises:
            ValueError: naming the field at fault.
        """
        fix = "The plan was edited or corrupted; re-create it (or restore it from the checkpoint)."
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"Plan field kind must be a non-empty string, got {self.kind!r}. {fix}")
        if not isinstance(self.model_class, str):
            raise ValueError(f"Plan field model_class must be a string, got {type(self.model_class).__name__}. {fix}")
        if not isinstance(self.input_specs, list):
            raise ValueError(f"Plan field input_specs must be a list of {{'shape', 'dtype'}} dicts. {fix}")
        for i, spec in enumerate(self.input_specs):
            shape = spec.get("shape") if isinstance(spec, Mapping) else None
            dtype = spec.get("dtype") if isinstance(spec, Mapping) else None
            if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
                raise ValueError(f"Plan input_specs[{i}] needs a 'shape' list of non-negative integers, got {spec!r}. "
                                 f"{fix}")
            if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
                raise ValueError(f"Plan input_specs[{i}] has dtype {dtype!r}, not a torch dtype name such as "
                                 f"'float32'. {fix}")
        for key in ("units_before", "units_after"):
            counts = getattr(self, key)
            if not isinstance(counts, Mapping) or not all(isinstance(k, str) and _is_int(v) and v >= 0
                                                         for k, v in counts.items()):
                raise ValueError(f"Plan field {key} must map entry names to non-negative integers, got {counts!r}. "
                                 f"{fix}")
        if list(self.units_before) != list(self.units_after):
            raise ValueError(f"Plan fields units_before and units_after name different entries. {fix}")
        grown = [n for n in self.units_before if self.units_after[n] > self.units_before[n]]
        if grown:
            raise ValueError(f"Plan entry units_after[{grown[0]!r}] = {self.units_after[grown[0]]} exceeds "
                             f"units_before ({self.units_before[grown[0]]}): a surgery only removes. {fix}")
        if not isinstance(self.pruned_groups, list):
            raise ValueError(f"Plan field pruned_groups must be a list. {fix}")
        if not isinstance(self.options, Mapping):
            raise ValueError(f"Plan field options must be a dict, got {type(self.options).__name__}. {fix}")

    @classmethod
    def from_dict(cls, data: PruningPlan | Mapping[str, Any]) -> PruningPlan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. after ``json.loads``); a plan is returned as a copy.

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
        if version not in (1, PLAN_FORMAT_VERSION):
            raise ValueError(
                f"Unsupported pruning plan format_version {version!r}; this lightning-worm reads versions 1 to "
                f"{PLAN_FORMAT_VERSION}. Re-create the plan with this version of lightning-worm."
            )
        if version == 1:
            data = {_V1_NAMES.get(k, k): v for k, v in data.items()} | {"format_version": PLAN_FORMAT_VERSION}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED)
        if unknown or missing:
            problem = "; ".join(p for p in (unknown and f"unknown fields {unknown}", missing and f"missing fields "
                                            f"{missing}") if p)
            raise ValueError(f"Not a pruning plan: {problem}. Pass `report.plan` or `report.plan.to_dict()`.")
        return cls(**copy.deepcopy(dict(data)))


#: How far (a fraction of the units) the removed fraction may fall below the ticket's before a report says so.
SHORTFALL = 0.05

_REASONS = {
    "unprunable": "being unprunable (no prunable producer, reaching the output, a partly prunable group)",
    "coupling": "coupling (shared with layers that keep them)",
    "min_units": "keeping every layer non-empty",
    "round_to": "round_to",
}

_REQUIRED = ("model_class", "input_specs", "pruned_groups", "units_before", "units_after")


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class PruningReport:
    """The outcome of :func:`~lightning_worm.core.surgery.prune_channels`.

    Channel counts are the score source's units (BatchNorm channels by default). They add up:
    ``ticket_pruned == pruned_from_ticket + kept_for_coupling + kept_for_min_units + kept_for_round_to
    + kept_unprunable`` and ``sum(units_before) - sum(units_after) == pruned_from_ticket +
    pruned_outside_ticket``.

    Attributes:
        plan: the replayable :class:`PruningPlan`.
        params_before: parameter count before.
        params_after: parameter count after.
        flops_before: FLOPs of one forward per example, before (``torch.utils.flop_counter``, a
            multiply-add counts 2, as in Lightning's model summary; the example input's FLOPs divided by
            its batch, ``flops_batch``).
        flops_after: the same, after. Both are ``None`` if the FLOP counter failed on this model (with a warning).
        units_before: units per scored module before.
        units_after: units per scored module after.
        ticket_pruned: units the ticket asks to prune.
        pruned_from_ticket: of those, the units removed.
        pruned_outside_ticket: units removed although the ticket keeps them (``coupling="mean_rank"``).
        kept_for_coupling: ticket-pruned units kept because the coupling rule kept their channel.
        kept_for_min_units: ticket-pruned units kept so that no layer loses all its channels.
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
        kept_by_entry: per entry that kept some of the ticket's pruned units, how many and why
            (``"unprunable"``, ``"coupling"``, ``"min_units"``, ``"round_to"``).
        note: what the numbers do not say, for the reader (an element-wise ticket saves no time, a surgery that
            removed far less than the ticket asks: :attr:`shortfall`), or ``None``.
        ticket_agreement: the fraction of the ticket's pruned units that were removed
            (``pruned_from_ticket / ticket_pruned``; 1.0 if the ticket prunes nothing).
        removed_fraction: the fraction of all the entries' units that the surgery removed
            (``1 - sum(units_after) / sum(units_before)``): what was actually removed.
        asked_fraction: the fraction of all the entries' units that the ticket prunes.
        shortfall: when ``removed_fraction`` is more than :data:`SHORTFALL` below ``asked_fraction``, a sentence
            naming the entries that kept the ticket's units and why; else ``None``.
    """

    plan: PruningPlan
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    units_before: dict[str, int]
    units_after: dict[str, int]
    ticket_pruned: int
    pruned_from_ticket: int
    pruned_outside_ticket: int
    kept_for_coupling: int
    kept_for_min_units: int
    kept_for_round_to: int
    kept_unprunable: int
    latency_before_ms: float | None
    latency_after_ms: float | None
    kept_indices: KeptIndices = field(repr=False)
    coupling: str = "all"
    round_to: int | None = None
    flops_batch: int = 1
    prunable: int = 0
    kept_by_entry: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str | None = None

    channels_before = RenamedAttribute("units_before")
    channels_after = RenamedAttribute("units_after")
    kept_for_min_channels = RenamedAttribute("kept_for_min_units")

    @property
    def ticket_agreement(self) -> float:
        return self.pruned_from_ticket / self.ticket_pruned if self.ticket_pruned else 1.0

    @property
    def removed_fraction(self) -> float:
        total = sum(self.units_before.values())
        return 1.0 - sum(self.units_after.values()) / total if total else 0.0

    @property
    def shares(self) -> dict[str, dict[str, Any]]:
        """Units before and after and the entries, per source: one (the plan's source key), or one per member of a
        ``SourceList`` (by class name), e.g. ``{"AttentionHeadSource": {"before": 144, "after": 96, "entries": [...]},
        ...}``."""
        recorded = self.plan.options.get("shares")
        if isinstance(recorded, Mapping):
            return copy.deepcopy(dict(recorded))
        return {self.plan.source: {"before": sum(self.units_before.values()), "after": sum(self.units_after.values()),
                                   "entries": list(self.units_before)}}

    @property
    def asked_fraction(self) -> float:
        total = sum(self.units_before.values())
        return self.ticket_pruned / total if total else 0.0

    @property
    def shortfall(self) -> str | None:
        asked, removed = self.asked_fraction, self.removed_fraction
        if asked - removed <= SHORTFALL:
            return None
        reasons: dict[str, int] = {}
        for counts in self.kept_by_entry.values():
            for reason, n in counts.items():
                reasons[reason] = reasons.get(reason, 0) + n
        worst = sorted(self.kept_by_entry.items(), key=lambda item: -sum(item[1].values()))[:5]
        entries = "; ".join(f"{name} ({', '.join(f'{n} {r}' for r, n in counts.items())})" for name, counts in worst)
        more = len(self.kept_by_entry) - len(worst)
        advice = ["the saving is that of the units removed"]
        if "coupling" in reasons and self.coupling != "mean_rank":
            advice.append("`coupling='mean_rank'` removes as many coupled units as the ticket asks")
        if "round_to" in reasons:
            advice.append("a smaller `round_to` keeps fewer back")
        if "unprunable" in reasons:
            advice.append("no option removes the unprunable ones")
        return (
            f"the surgery removed {100 * removed:.1f} % of the units, the ticket asks {100 * asked:.1f} %: it kept "
            f"{', '.join(f'{n} for {_REASONS[r]}' for r, n in reasons.items()) or 'the rest'}"
            + (f". Most were kept in {entries}{f' (and {more} more entries)' if more > 0 else ''}" if entries else "")
            + f". {'; '.join(advice).capitalize()}."
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tensors become lists), with ``ticket_agreement``, ``removed_fraction``,
        ``asked_fraction`` and ``shares``.

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
        out["asked_fraction"] = self.asked_fraction
        out["shares"] = self.shares
        return copy.deepcopy(out)


@contextmanager
def _measured(model: nn.Module, inputs: tuple[Tensor, ...], latency: bool, repeats: int) -> Iterator[dict[str, Any]]:
    """The report's numbers before and after the surgery inside the block: parameters always; FLOPs per example
    (0 without an input) and latency (``None`` without an input or unless asked) on ``inputs``."""
    def take(when: str) -> dict[str, Any]:
        flops: int | None = 0
        timed = None
        if inputs:
            flops = measure.or_none(f"Counting the FLOPs {when} pruning", lambda: measure.forward_flops(model, inputs))
            if latency:
                timed = measure.or_none(f"Timing the model {when} pruning",
                                        lambda: measure.latency_ms(model, inputs, repeats=repeats))
        return {f"params_{when}": measure.count_params(model), f"flops_{when}": flops, f"latency_{when}_ms": timed}

    numbers = take("before")
    yield numbers
    numbers.update(take("after"), flops_batch=batch_size(inputs) if inputs else 1)
