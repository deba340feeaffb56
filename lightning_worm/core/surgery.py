"""Physical channel surgery: remove a ticket's pruned BatchNorm channels from a model.

Torch-Pruning's ``DependencyGraph`` is the engine. It follows the real data flow, so removing a BatchNorm
channel also removes the conv/linear output channel that feeds it and the matching input channels of
every consumer, through residual additions, concatenations, grouped and depthwise convolutions and a
flatten into a linear layer. Its extension points (a custom pruner, index mappings) teach it what it
gets wrong on its own in ShuffleNet-like models: a channel shuffle (``view -> transpose -> view`` or
``F.channel_shuffle``) becomes a node with its own index permutation, and ``chunk`` along the channels
reads its real sizes and order and keeps its chunks the same size.

The result is a :class:`PruningReport`, whose :class:`PruningPlan` is JSON-serialisable and replays the
very same surgery on a freshly built model with :func:`apply_plan`, so that a pruned ``state_dict`` loads.

What goes, channel by channel (documented once here, used everywhere below):

* A *unit* is a set of channels that can only go together: the channels of all layers joined by a
  residual sum, the same position in every group of a grouped convolution or GroupNorm, the same
  position in every chunk of ``chunk``, a column of a channel shuffle.
* ``coupling="all"``: a unit goes when the ticket prunes every one of its BatchNorm channels.
* ``coupling="mean_rank"``: within each pruning group (the layers Torch-Pruning prunes together; groups
  sharing a unit, as through a shuffle, rank together), units are ranked by the mean ``|gamma|`` of their
  BatchNorm channels and the lowest go, as many channels as the ticket prunes there on average:
  ``sum over units of size * (fraction of its BatchNorm channels the ticket prunes)``, rounded to the
  nearest prefix of the ranking. In a group of coupled layers each with one BatchNorm, that is the mean
  over those layers of the count the ticket prunes.
* Never pruned: groups with no BatchNorm layer, groups reaching the model's outputs (the classifier's
  outputs, a returned feature map), units whose chunk or group positions are not all prunable.
* No layer is ever emptied: the unit with the highest mean ``|gamma|`` is kept back.
* ``round_to=N`` keeps back the next-best units until every group keeps a multiple of ``N`` channels.

BatchNorm layers that the ticket does not name keep all their channels.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode
from torch_pruning import ops
from torch_pruning.dependency import Node
from torch_pruning.pruner import function

__all__ = ["PruningPlan", "PruningReport", "apply_plan", "prune_channels"]

Ticket = Mapping[str, Tensor]
ExampleInput = Union[Tensor, Sequence[Tensor]]
KeptIndices = dict[str, list[Optional[Tensor]]]

PLAN_FORMAT_VERSION = 1
_COUPLINGS = ("all", "mean_rank")
_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class PruningPlan:
    """What :func:`apply_plan` needs to repeat a surgery on a fresh model. JSON-serialisable via :meth:`to_dict`.

    Attributes:
        model_class: qualified class name of the pruned model.
        input_specs: shape and dtype of each example input (the graph is rebuilt from zeros of these).
        pruned_groups: ``[root module name, output channel indices]`` per pruned group; the indices are
            those of the unpruned model, and all groups are removed in one step.
        channels_before: ``num_features`` of every BatchNorm layer before the surgery.
        channels_after: ``num_features`` of every BatchNorm layer after it.
        format_version: version of this layout.
    """

    model_class: str
    input_specs: list[dict[str, Any]]
    pruned_groups: list[list[Any]]
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    format_version: int = PLAN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """Rebuild a plan from :meth:`to_dict` output (e.g. after ``json.loads``).

        Raises:
            ValueError: if the dict is not a plan of a version this code reads.
        """
        version = data.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"Unsupported pruning plan format_version {version!r}; this lightning-worm reads version "
                f"{PLAN_FORMAT_VERSION}. Re-create the plan with this version of lightning-worm."
            )
        try:
            return cls(**copy.deepcopy(dict(data)))
        except TypeError as error:
            raise ValueError(f"Not a pruning plan: {error}.") from error


@dataclass
class PruningReport:
    """The outcome of :func:`prune_channels`.

    Channel counts are BatchNorm channels. They add up:
    ``ticket_pruned == pruned_from_ticket + kept_for_coupling + kept_for_min_channels + kept_for_round_to
    + kept_unprunable`` and ``sum(channels_before) - sum(channels_after) == pruned_from_ticket +
    pruned_outside_ticket``.

    Attributes:
        plan: the replayable :class:`PruningPlan`.
        params_before: parameter count before.
        params_after: parameter count after.
        flops_before: FLOPs of one forward on the example input (``FlopCounterMode``), before.
        flops_after: the same, after.
        channels_before: ``num_features`` per BatchNorm layer before.
        channels_after: ``num_features`` per BatchNorm layer after.
        ticket_pruned: channels the ticket asks to prune.
        pruned_from_ticket: of those, the channels removed.
        pruned_outside_ticket: channels removed although the ticket keeps them (``coupling="mean_rank"``).
        kept_for_coupling: ticket-pruned channels kept because the coupling rule kept their unit.
        kept_for_min_channels: ticket-pruned channels kept so that no layer loses all its channels.
        kept_for_round_to: ticket-pruned channels kept to round channel counts to ``round_to``.
        kept_unprunable: ticket-pruned channels that cannot be removed (no prunable producer, reaching the
            model output, partly unprunable chunk or group).
        latency_before_ms: median eval-mode latency on the example input before, ``None`` if not measured.
        latency_after_ms: the same, after.
        kept_indices: for every parameter (named as before the surgery) whose shape changed, the kept
            original indices along each dim (``None``: dim untouched), on the CPU. Slice optimizer state
            with it: ``old[kept[0]][:, kept[1]]`` for a conv weight pruned on both dims.
        coupling: the coupling rule used.
        round_to: the rounding used.
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tensors become lists)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["plan"] = self.plan.to_dict()
        out["kept_indices"] = {
            name: [None if idx is None else idx.tolist() for idx in dims] for name, dims in self.kept_indices.items()
        }
        return copy.deepcopy(out)


def prune_channels(
    model: nn.Module,
    ticket: Ticket,
    example_input: ExampleInput,
    *,
    coupling: str = "all",
    round_to: Optional[int] = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
) -> PruningReport:
    r"""Physically remove the channels a ticket prunes, in place.

    Each pruned BatchNorm channel goes together with the conv/linear output channel feeding it and the
    input channels of every consumer; the model keeps its inputs and output shapes. See the module
    docstring for which channels go when layers are coupled. Parameters are replaced by new
    ``nn.Parameter`` objects (rebuild optimizers; ``report.kept_indices`` maps their state). The
    modules' train/eval flags and ``requires_grad`` are restored; everything stays on the model's device.

    Args:
        model: the model; BatchNorm names in ``ticket`` are relative to it.
        ticket: ``{batchnorm name: 1-D bool tensor of num_features}``, ``True`` = keep. Unnamed BatchNorm
            layers keep all channels.
        example_input: a tensor or a tuple of tensors, called as ``model(*inputs)``. One small batch.
        coupling: ``"all"`` (a coupled channel goes only if the ticket prunes it in every coupled layer) or
            ``"mean_rank"`` (rank coupled channels by mean ``|gamma|``, prune as many as the ticket does
            on average).
        round_to: keep a multiple of this many channels in every pruned group (``None``: the ticket as is).
        measure_latency: time the model before and after (eval mode, no grad, median of ``latency_repeats``).
        latency_repeats: timed forward passes, after 3 warm-up passes.

    Returns:
        A :class:`PruningReport`; ``report.plan`` replays the surgery with :func:`apply_plan`.

    Raises:
        ValueError: on a bad ticket (empty, unknown modules, not 1-D bool, wrong length) or bad options.
        RuntimeError: if the model's forward fails on ``example_input`` (chained), or if the pruned model
            no longer runs or changed its output shapes (the model is then left modified).

    Example::

        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> ticket = {n: torch.rand(m.num_features) > 0.5 for n, m in model.named_modules()
        ...           if isinstance(m, torch.nn.BatchNorm2d)}
        >>> report = prune_channels(model, ticket, torch.randn(1, 3, 64, 64), measure_latency=False)
        >>> report.params_after < report.params_before
        True
    """
    if coupling not in _COUPLINGS:
        raise ValueError(f"`coupling` must be one of {_COUPLINGS}, got {coupling!r}.")
    if round_to is not None and not (isinstance(round_to, int) and round_to >= 1):
        raise ValueError(f"`round_to` must be None or an integer >= 1, got {round_to!r}.")
    batchnorms = _batchnorm_layers(model)
    masks = _validated_ticket(ticket, batchnorms)
    inputs = _as_input_tuple(example_input)
    names = {module: name for name, module in model.named_modules()}

    with _restored_modes(model):
        model.eval()
        flops_before, shapes_before = _count_flops(model, inputs, when="before pruning")
        latency_before = _median_latency_ms(model, inputs, latency_repeats) if measure_latency else None
        params_before = sum(p.numel() for p in model.parameters())
        channels_before = {name: bn.num_features for name, bn in batchnorms.items()}

        graph, output_nodes = _build_graph(model, inputs)
        decision = _decide(graph, output_nodes, masks, coupling, round_to)
        with _recorded_parameter_slices(model) as kept_indices:
            _remove(graph, decision.pruned_roots)

        model.eval()
        flops_after, shapes_after = _count_flops(model, inputs, when="after pruning")
        if shapes_after != shapes_before:
            raise RuntimeError(
                f"Pruning changed the model's output shapes from {shapes_before} to {shapes_after}; "
                "the dependency graph missed a constraint of this model. Please report it."
            )
        latency_after = _median_latency_ms(model, inputs, latency_repeats) if measure_latency else None

    plan = PruningPlan(
        model_class=_qualified_name(model),
        input_specs=[{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in inputs],
        pruned_groups=[[names[root], idxs] for root, idxs in decision.pruned_roots],
        channels_before=channels_before,
        channels_after={name: bn.num_features for name, bn in batchnorms.items()},
    )
    return PruningReport(
        plan=plan,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        flops_before=flops_before,
        flops_after=flops_after,
        channels_before=dict(plan.channels_before),
        channels_after=dict(plan.channels_after),
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
        kept_indices=kept_indices,
        coupling=coupling,
        round_to=round_to,
        **decision.counts,
    )


def apply_plan(model: nn.Module, plan: Union[PruningPlan, Mapping[str, Any]]) -> KeptIndices:
    r"""Repeat a surgery on a freshly built model of the same class, in place.

    Afterwards ``model.load_state_dict(pruned_model.state_dict())`` works and gives identical outputs.
    Call it before loading a pruned checkpoint into a dense model.

    Args:
        model: a model built like the one :func:`prune_channels` pruned (same layers; the class may be a
            subclass), not yet pruned.
        plan: ``report.plan`` or its ``to_dict()``.

    Returns:
        The kept original indices per changed parameter, as ``report.kept_indices``.

    Raises:
        ValueError: if the plan does not fit the model (its modules or BatchNorm channel counts differ).
        RuntimeError: if the replay does not reach the plan's channel counts.

    Example::

        >>> fresh = torchvision.models.resnet18(num_classes=10)
        >>> _ = apply_plan(fresh, report.plan)  # e.g. json.loads(...) of report.plan.to_dict() works too
        >>> fresh.load_state_dict(model.state_dict())
        <All keys matched successfully>
    """
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan.from_dict(plan)
    batchnorms = _batchnorm_layers(model)
    _check_plan_fits(model, plan, batchnorms)
    device = next(iter(model.parameters())).device
    inputs = tuple(
        torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device) for spec in plan.input_specs
    )
    with _restored_modes(model):
        graph, _ = _build_graph(model, inputs)
        modules = dict(model.named_modules())
        with _recorded_parameter_slices(model) as kept_indices:
            _remove(graph, [(modules[name], list(idxs)) for name, idxs in plan.pruned_groups])
    reached = {name: bn.num_features for name, bn in batchnorms.items()}
    if reached != plan.channels_after:
        raise RuntimeError(
            f"Replaying the plan did not reproduce its channel counts ({_differences(reached, plan.channels_after)})."
        )
    return kept_indices


# --------------------------------------------------------------------------------------------- inputs


def _batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm)}


def _few(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _validated_ticket(ticket: Ticket, batchnorms: Mapping[str, _BatchNorm]) -> dict[str, Tensor]:
    """The ticket on the CPU, completed with all-True masks for BatchNorm layers it does not name."""
    if not isinstance(ticket, Mapping) or len(ticket) == 0:
        raise ValueError(
            "The ticket is empty: it must map BatchNorm module names to 1-D bool masks (True = keep), "
            "e.g. the mask of `channel_mask(model, ...)`."
        )
    unknown = [name for name in ticket if name not in batchnorms]
    if unknown:
        known = _few(list(map(repr, batchnorms)), 3) or "none"
        raise ValueError(
            f"The ticket names {len(unknown)} module(s) that are not BatchNorm layers of this model: "
            f"{_few(list(map(repr, unknown)))}. Compute the ticket on this model (names as "
            f"`model.named_modules()` gives them; its BatchNorm layers: {known})."
        )
    masks = {name: torch.ones(bn.num_features, dtype=torch.bool) for name, bn in batchnorms.items()}
    for name, mask in ticket.items():
        if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 1):
            got = type(mask).__name__
            if isinstance(mask, Tensor):
                got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            raise ValueError(
                f"Ticket entry {name!r} must be a 1-D torch.bool tensor (True = keep), got a {got}. "
                "Convert it with `mask.bool()`."
            )
        if mask.numel() != batchnorms[name].num_features:
            raise ValueError(
                f"Ticket entry {name!r} has {mask.numel()} channels but the layer has "
                f"num_features={batchnorms[name].num_features}. The ticket comes from another model shape "
                "(or from before an earlier pruning); compute it on this model."
            )
        masks[name] = mask.detach().cpu()
    return masks


def _as_input_tuple(example_input: ExampleInput) -> tuple[Tensor, ...]:
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("`example_input` must be a tensor or a non-empty sequence of tensors (run as model(*inputs)).")
    return inputs


def _qualified_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _check_plan_fits(model: nn.Module, plan: PruningPlan, batchnorms: Mapping[str, _BatchNorm]) -> None:
    """The model's structure must fit the plan; its class may differ (a subclass building the same layers)."""
    cls = _qualified_name(model)
    made_for = "" if plan.model_class == cls else f" The plan was made for a {plan.model_class}, this is a {cls}."
    modules = dict(model.named_modules())
    missing = [n for n in plan.channels_before if n not in batchnorms]
    missing += [name for name, _ in plan.pruned_groups if name not in modules]
    if missing:
        raise ValueError(
            f"The plan names modules this model lacks: {_few(list(map(repr, missing)))}.{made_for} "
            "Build the model with the same arguments."
        )
    counts = {name: batchnorms[name].num_features for name in plan.channels_before}
    if counts != plan.channels_before:
        hint = (
            "It looks already pruned; apply a plan to a freshly built model only."
            if counts == plan.channels_after
            else "Build the model with the same arguments (width, num_classes) as the pruned one."
        )
        differences = _differences(counts, plan.channels_before)
        raise ValueError(
            f"The model's BatchNorm channel counts differ from the plan's ({differences}).{made_for} {hint}"
        )


def _differences(actual: Mapping[str, int], expected: Mapping[str, int]) -> str:
    return _few([f"{n}: {actual[n]} instead of {expected[n]}" for n in expected if actual[n] != expected[n]], 3)


# ---------------------------------------------------------------------------------- measuring


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor)]


def _count_flops(model: nn.Module, inputs: tuple[Tensor, ...], when: str) -> tuple[int, list[tuple[int, ...]]]:
    """FLOPs of one eval forward and the output shapes; a failing forward becomes a chained RuntimeError."""
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            out = model(*inputs)
    except Exception as error:
        hint = (
            "Pass an input the model accepts as model(*example_input), on the model's device."
            if when == "before pruning"
            else "The dependency graph missed a constraint of this model; please report it."
        )
        raise RuntimeError(
            f"The model's forward failed on example_input {when} ({type(error).__name__}: {error}). {hint}"
        ) from error
    return counter.get_total_flops(), _output_shapes(out)


def _median_latency_ms(model: nn.Module, inputs: tuple[Tensor, ...], repeats: int, warmup: int = 3) -> float:
    synchronize = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for step in range(warmup + repeats):
            synchronize()
            start = time.perf_counter()
            model(*inputs)
            synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextmanager
def _restored_modes(model: nn.Module) -> Iterator[None]:
    """Restore each module's train/eval flag and each parameter's ``requires_grad`` (by name) on exit.

    Inside, all parameters require grad: the graph is traced through autograd.
    """
    training = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point() or p.is_complex())
    try:
        yield
    finally:
        for name, m in model.named_modules():
            m.training = training.get(name, m.training)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))


@contextmanager
def _recorded_parameter_slices(model: nn.Module) -> Iterator[KeptIndices]:
    """Record which original indices each parameter keeps while Torch-Pruning slices it.

    Every pruner of Torch-Pruning replaces a parameter through ``BasePruningFunc._prune_parameter_and_grad``
    (weight, kept indices, dim); wrapping it composes the kept indices per dim. Not thread-safe.
    """
    kept: KeptIndices = {}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    live = {id(p): (p, name, [None] * p.dim()) for name, p in model.named_parameters()}
    original = function.BasePruningFunc._prune_parameter_and_grad

    def recording(self: Any, weight: Tensor, keep_idxs: Any, pruning_dim: int) -> nn.Parameter:
        pruned = original(self, weight, keep_idxs, pruning_dim)
        tracked = live.pop(id(weight), None)  # ``live`` holds the parameters, so their ids stay unique
        if tracked is not None:
            _, name, dims = tracked
            dim = pruning_dim % weight.dim()
            keep = torch.as_tensor(keep_idxs, dtype=torch.long).cpu()
            dims[dim] = keep if dims[dim] is None else dims[dim][keep]
            live[id(pruned)] = (pruned, name, dims)
        return pruned

    function.BasePruningFunc._prune_parameter_and_grad = recording
    try:
        yield kept
    finally:
        function.BasePruningFunc._prune_parameter_and_grad = original
        for _, name, dims in live.values():
            dims = [None if d is None or len(d) == shapes[name][i] else d for i, d in enumerate(dims)]
            if any(d is not None for d in dims):
                kept[name] = dims


# ------------------------------------------------------------------------- the dependency graph


class _ChannelShuffleOp(nn.Module):
    """Graph-only stand-in for a channel shuffle. Its node's indices are the shuffle's input channels."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__()
        self.groups = groups
        self.channels = channels

    def __repr__(self) -> str:
        return f"ChannelShuffle(groups={self.groups}, channels={self.channels})"


class _ChannelShufflePruner(ops.DummyPruner):
    """Keeps the shuffle's channel count; its channel groups make whole columns go together."""

    def prune_out_channels(self, layer: _ChannelShuffleOp, idxs: Sequence[int]) -> _ChannelShuffleOp:
        layer.channels -= len(idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: _ChannelShuffleOp) -> int:
        return layer.channels

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: _ChannelShuffleOp) -> int:
        return layer.groups

    get_in_channel_groups = get_out_channel_groups


class _ChunkAwareSplitPruner(ops.SplitPruner):
    """A split into equal parts (``chunk``) recomputes its sizes at run time: prune the same positions in each."""

    def get_out_channel_groups(self, layer: ops._SplitOp) -> int:
        sizes = layer.split_sizes
        return len(sizes) if sizes and len(set(sizes)) == 1 else 1

    get_in_channel_groups = get_out_channel_groups


class _ShuffleIndexMapping:
    """Maps shuffle input channels to output channels (or back), for the shuffle's current size."""

    def __init__(self, op: _ChannelShuffleOp, inverse: bool) -> None:
        self.op = op
        self.inverse = inverse

    def __call__(self, idxs: list) -> list:
        groups, per_group = self.op.groups, self.op.channels // self.op.groups
        if self.inverse:  # output b * groups + a  ->  input a * per_group + b
            mapped = [((i.idx % groups) * per_group + i.idx // groups, i.root_idx) for i in idxs]
        else:
            mapped = [((i.idx % per_group) * groups + i.idx // per_group, i.root_idx) for i in idxs]
        # Sorted, as Torch-Pruning's own mappings keep them: it only skips revisits with equal index lists.
        return [tp._helpers._HybridIndex(idx, root) for idx, root in sorted(mapped)]


def _channel_shuffle(grad_fn: Any) -> Optional[tuple[_ChannelShuffleOp, Optional[list[int]]]]:
    """A channel shuffle op if ``grad_fn`` is one, with the shape the view back to channels starts from.

    Recognised: ``F.channel_shuffle`` (``nn.ChannelShuffle``), and the transpose of
    ``x.view(n, g, c // g, *spatial).transpose(1, 2).contiguous().view(n, c, *spatial)`` (torchvision's).
    """
    name = grad_fn.name()
    if name == "ChannelShuffleBackward0":
        return _ChannelShuffleOp(grad_fn._saved_groups, grad_fn._input_metadata[0].shape[1]), None
    if name != "TransposeBackward0":
        return None
    shape = list(grad_fn._input_metadata[0].shape)  # transposed: (n, c // g, g, *spatial)
    source = grad_fn.next_functions[0][0]
    if len(shape) < 4 or {grad_fn._saved_dim0 % len(shape), grad_fn._saved_dim1 % len(shape)} != {1, 2}:
        return None
    if source is None or source.name() != "ViewBackward0":
        return None
    before = list(source._saved_self_sym_sizes)  # (n, c, *spatial)
    if before != [shape[0], shape[1] * shape[2], *shape[3:]]:
        return None
    return _ChannelShuffleOp(groups=shape[2], channels=before[1]), shape


def _shuffle_views(node: Node, shape: list[int]) -> Iterator[Node]:
    """The views around a shuffle node: its input, and the first view after it (through ``contiguous``)."""
    yield from (n for n in node.inputs if n.type == ops.OPTYPE.RESHAPE)
    frontier = list(node.outputs)
    while frontier:
        n = frontier.pop()
        if n.type == ops.OPTYPE.ELEMENTWISE and n.grad_fn.name() == "CloneBackward0":
            frontier.extend(n.outputs)
        elif n.type == ops.OPTYPE.RESHAPE and list(getattr(n.grad_fn, "_saved_self_sym_sizes", [])) == shape:
            yield n


class _SplitGradFn:
    """A split's ``grad_fn`` as Torch-Pruning 1.6 reads it.

    It looks for ``_saved_self_sizes``, which torch now calls ``_saved_self_sym_sizes``; without it, it
    guesses the split sizes from the consumers, wrongly when a chunk goes into a concatenation.
    """

    def __init__(self, grad_fn: Any) -> None:
        self.grad_fn = grad_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grad_fn, "_saved_self_sym_sizes" if name == "_saved_self_sizes" else name)


def _consumed_output(consumer: Node, producer_fn: Any) -> Optional[int]:
    """Which output of ``producer_fn`` (e.g. which chunk) ``consumer`` reads, if its grad_fn says so."""
    return min((nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is producer_fn), default=None)


class _SurgeryGraph(tp.DependencyGraph):
    """Torch-Pruning's ``DependencyGraph`` plus channel shuffles, equal-size chunks and chunk order."""

    def __init__(self) -> None:
        super().__init__()
        self.REGISTERED_PRUNERS[ops.OPTYPE.SPLIT] = split = _ChunkAwareSplitPruner()
        self.shuffle_pruner = _ChannelShufflePruner()
        for pruner in (split, self.shuffle_pruner):
            self._in_channel_pruning_fn.add(pruner.prune_in_channels)
            self._out_channel_pruning_fn.add(pruner.prune_out_channels)

    def get_pruner_of_module(self, module: nn.Module) -> Any:
        # Not `register_customized_layer`: with any customized pruner, Torch-Pruning tests every module
        # with `==` and `in`, which torchmetrics' Metric overloads (truthy), so every layer became ignored.
        if isinstance(module, _ChannelShuffleOp):
            return self.shuffle_pruner
        return super().get_pruner_of_module(module)

    def _trace(self, *args: Any, **kwargs: Any) -> dict:
        module2node = super()._trace(*args, **kwargs)
        for node in list(module2node.values()):
            found = _channel_shuffle(node.grad_fn) if node.type == ops.OPTYPE.ELEMENTWISE else None
            if found is not None:
                shuffle, shape = found
                del module2node[node.module]
                node.module, node.module_class, node.type = shuffle, _ChannelShuffleOp, ops.OPTYPE.CUSTOMIZED
                module2node[shuffle] = node
                for view in _shuffle_views(node, shape) if shape else ():
                    view.type = ops.OPTYPE.ELEMENTWISE  # keeps channel indices: no flatten mapping from Torch-Pruning
            if node.type == ops.OPTYPE.SPLIT:
                # Torch-Pruning maps the i-th consumer to the i-th chunk; consumers come in tracing order.
                chunks = [_consumed_output(out, node.grad_fn) for out in node.outputs]
                if None not in chunks:
                    node.outputs = [out for _, out in sorted(zip(chunks, node.outputs), key=lambda pair: pair[0])]
                node.grad_fn = _SplitGradFn(node.grad_fn)
        return module2node

    def _build_dependency(self, module2node: dict) -> None:
        super()._build_dependency(module2node)
        for node in module2node.values():
            if isinstance(node.module, _ChannelShuffleOp):
                for dep in node.dependencies:
                    if dep.target in node.outputs:
                        dep.index_mapping[0] = _ShuffleIndexMapping(node.module, inverse=False)
                for out_node in node.outputs:
                    for dep in out_node.dependencies:
                        if dep.target is node:
                            dep.index_mapping[0] = _ShuffleIndexMapping(node.module, inverse=True)


def _build_graph(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[_SurgeryGraph, set[Node]]:
    """The dependency graph (traced in eval mode) and the nodes producing the model's outputs."""
    outputs = []

    def forward(module: nn.Module, example: tuple[Tensor, ...]) -> Any:
        outputs.append(module(*example))
        return outputs[-1]

    model.eval()
    with torch.enable_grad():
        graph = _SurgeryGraph().build_dependency(model, inputs, forward_fn=forward, verbose=False)
    output_fns = {t.grad_fn for t in tp.utils.flatten_as_list(outputs[-1]) if isinstance(t, Tensor)}
    return graph, {node for node in graph.module2node.values() if node.grad_fn in output_fns}


@torch.no_grad()
def _remove(graph: _SurgeryGraph, pruned_roots: Sequence[tuple[nn.Module, list[int]]]) -> None:
    """Remove the given output channels of each root with everything coupled to them, in one step.

    The groups are all read on the unpruned graph and every layer is cut once, with its original indices:
    a unit can span several groups (through a channel shuffle, say), so pruning group after group would
    leave the graph inconsistent in between.
    """
    cuts: dict[tuple[Node, Any], tuple[Any, set[int]]] = {}
    for root, idxs in pruned_roots:
        pruner = graph.get_pruner_of_module(root)
        for item in graph.get_pruning_group(root, pruner.prune_out_channels, idxs):
            cuts.setdefault((item.dep.target, item.dep.handler), (item.dep, set()))[1].update(item.idxs)
    merged = tp.dependency.Group()
    merged._DG = graph
    for dep, idxs in cuts.values():
        merged.add_dep(dep, sorted(idxs))
    merged.prune(record_history=False)


# ------------------------------------------------------------------------------- the decision


class _UnionFind:
    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(eq=False)
class _Unit:
    """Channels that go together: root channels ``(group, index)`` and the BatchNorm channels they reach."""

    roots: list[tuple[int, int]] = field(default_factory=list)
    batchnorm_channels: list[tuple[str, int]] = field(default_factory=list)
    frozen: bool = False
    score: float = 0.0  # mean |gamma| of the BatchNorm channels
    ticket_pruned: int = 0  # BatchNorm channels the ticket prunes


@dataclass
class _Decision:
    pruned_roots: list[tuple[nn.Module, list[int]]]
    counts: dict[str, int]


_ChannelUnits = dict[tuple[Node, bool], dict[int, _Unit]]


def _channel_groups(graph: _SurgeryGraph, node: Node, is_out: bool) -> tuple[int, Optional[int]]:
    """(channel groups, channels) of a node on one side; depthwise convolutions count as one group."""
    module = node.module
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
        return 1, None
    pruner = graph.get_pruner_of_module(module)
    groups = pruner.get_out_channel_groups(module) if is_out else pruner.get_in_channel_groups(module)
    if isinstance(module, ops._SplitOp):
        return groups, sum(module.split_sizes or [0])
    return groups, graph.get_out_channels(node) if is_out else graph.get_in_channels(node)


def _coupled_units(graph: _SurgeryGraph, output_nodes: set[Node]) -> tuple[list, list[_Unit], _ChannelUnits]:
    """Torch-Pruning's groups (full indices), the units, and the unit of every channel ``(node, out side?, index)``."""
    groups = list(graph.get_all_groups(root_module_types=_ROOT_TYPES))
    offsets = list(itertools.accumulate((len(group[0].idxs) for group in groups), initial=0))
    union = _UnionFind(offsets[-1])  # element offsets[g] + r is root channel r of group g
    frozen: set[int] = set()

    # Roots reaching the same channel go together (and never groups without BatchNorm or reaching an output).
    owner: dict[tuple[Node, bool], dict[int, int]] = defaultdict(dict)
    for g, group in enumerate(groups):
        has_batchnorm = reaches_output = False
        for item in group:
            node, is_out = item.dep.target, graph.is_out_channel_pruning_fn(item.dep.handler)
            has_batchnorm |= isinstance(node.module, _BatchNorm)
            reaches_output |= is_out and node in output_nodes
            channels = owner[(node, is_out)]
            for idx, root in zip(item.idxs, item.root_idxs):
                if root is None:
                    continue
                if idx in channels:
                    union.union(channels[idx], offsets[g] + root)
                else:
                    channels[idx] = offsets[g] + root
        if not has_batchnorm or reaches_output:
            frozen.update(range(offsets[g], offsets[g + 1]))

    # Grouped convs, GroupNorm, chunks, shuffles: the same position in every channel group goes together.
    for (node, is_out), channels in owner.items():
        n_groups, n_channels = _channel_groups(graph, node, is_out)
        if n_groups <= 1:
            continue
        if not n_channels or n_channels % n_groups:
            frozen.update(channels.values())
            continue
        columns: dict[int, list[int]] = defaultdict(list)
        for idx, element in channels.items():
            columns[idx % (n_channels // n_groups)].append(element)
        for column in columns.values():
            for element in column[1:]:
                union.union(column[0], element)
            if len(column) < n_groups:  # part of the column lies outside every prunable group
                frozen.add(column[0])

    units: dict[int, _Unit] = defaultdict(_Unit)
    for g in range(len(groups)):
        for root, element in enumerate(range(offsets[g], offsets[g + 1])):
            unit = units[union.find(element)]
            unit.roots.append((g, root))
            unit.frozen |= element in frozen
    channel_units = {key: {idx: units[union.find(e)] for idx, e in chs.items()} for key, chs in owner.items()}
    return groups, list(units.values()), channel_units


def _score_units(graph: _SurgeryGraph, channel_units: _ChannelUnits, masks: Mapping[str, Tensor]) -> int:
    """Attach BatchNorm channels, scores and ticket counts to the units; return the ticket-pruned
    channels that belong to no unit."""
    unowned = 0
    for name, mask in masks.items():
        bn = graph.model.get_submodule(name)
        gammas = bn.weight.detach().abs().float().tolist() if bn.affine else [1.0] * bn.num_features
        channels = channel_units.get((graph.module2node.get(bn), True), {})
        for idx, (keep, gamma) in enumerate(zip(mask.tolist(), gammas)):
            unit = channels.get(idx)
            if unit is None:
                unowned += not keep
                continue
            unit.batchnorm_channels.append((name, idx))
            unit.score += gamma
            unit.ticket_pruned += not keep
    for unit in {id(u): u for chs in channel_units.values() for u in chs.values()}.values():
        unit.score /= max(len(unit.batchnorm_channels), 1)
    return unowned


def _by_mean_rank(candidates: Sequence[_Unit]) -> list[_Unit]:
    """Per scope (groups joined by units), the lowest-scored units, as many root channels as the ticket
    prunes on average there: the prefix of the ranking closest to ``sum(len(roots) * pruned fraction)``."""
    scopes = _UnionFind(1 + max((g for unit in candidates for g, _ in unit.roots), default=0))
    for unit in candidates:
        for g, _ in unit.roots[1:]:
            scopes.union(unit.roots[0][0], g)
    by_scope: dict[int, list[_Unit]] = defaultdict(list)
    for unit in candidates:
        by_scope[scopes.find(unit.roots[0][0])].append(unit)
    chosen = []
    for units in by_scope.values():
        target = sum(len(u.roots) * u.ticket_pruned / len(u.batchnorm_channels) for u in units)
        ranked = sorted(units, key=lambda u: (u.score, u.roots[0]))
        sizes = list(itertools.accumulate((len(u.roots) for u in ranked), initial=0))
        chosen.extend(ranked[: min(range(len(sizes)), key=lambda k: abs(sizes[k] - target))])
    return chosen


def _best(units: Any) -> _Unit:
    return max(units, key=lambda u: (u.score, [-g for g in u.roots[0]]))


def _keep_layers_nonempty(graph: _SurgeryGraph, channel_units: _ChannelUnits, pruned: dict[int, _Unit]) -> list[_Unit]:
    """Keep back the best unit of every layer that would lose all its channels."""
    kept = []
    for (node, is_out), channels in channel_units.items():
        count = graph.get_out_channels(node) if is_out else graph.get_in_channels(node)
        layer_units = {id(u): u for u in channels.values()}
        if count is not None and len(channels) >= count and layer_units.keys() <= pruned.keys():
            kept.append(pruned.pop(id(_best(layer_units.values()))))
    return kept


def _keep_rounded(group_sizes: Sequence[int], pruned: dict[int, _Unit], round_to: int) -> list[_Unit]:
    """Keep back the best units until every group keeps a multiple of ``round_to`` channels (or all)."""
    kept = []
    while True:
        removed = [0] * len(group_sizes)
        for unit in pruned.values():
            for g, _ in unit.roots:
                removed[g] += 1
        g = next((g for g, n in enumerate(removed) if n and (group_sizes[g] - n) % round_to), None)
        if g is None:
            return kept
        kept.append(pruned.pop(id(_best(u for u in pruned.values() if any(h == g for h, _ in u.roots)))))


def _decide(
    graph: _SurgeryGraph,
    output_nodes: set[Node],
    masks: Mapping[str, Tensor],
    coupling: str,
    round_to: Optional[int],
) -> _Decision:
    """Which root channels of which groups go, and the channel accounting of the report."""
    groups, units, channel_units = _coupled_units(graph, output_nodes)
    unowned = _score_units(graph, channel_units, masks)
    candidates = [u for u in units if u.batchnorm_channels and not u.frozen]
    if coupling == "all":
        chosen = [u for u in candidates if u.ticket_pruned == len(u.batchnorm_channels)]
    else:
        chosen = _by_mean_rank(candidates)
    pruned = {id(u): u for u in chosen}
    kept_for_min = _keep_layers_nonempty(graph, channel_units, pruned)
    kept_for_round = _keep_rounded([len(group[0].idxs) for group in groups], pruned, round_to) if round_to else []

    roots: dict[int, list[int]] = defaultdict(list)
    for unit in pruned.values():
        for g, root in unit.roots:
            roots[g].append(root)
    counts = dict(
        ticket_pruned=sum(int((~mask).sum()) for mask in masks.values()),
        pruned_from_ticket=sum(u.ticket_pruned for u in pruned.values()),
        pruned_outside_ticket=sum(len(u.batchnorm_channels) - u.ticket_pruned for u in pruned.values()),
        kept_for_coupling=sum(u.ticket_pruned for u in candidates) - sum(u.ticket_pruned for u in chosen),
        kept_for_min_channels=sum(u.ticket_pruned for u in kept_for_min),
        kept_for_round_to=sum(u.ticket_pruned for u in kept_for_round),
        kept_unprunable=unowned + sum(u.ticket_pruned for u in units if u.frozen),
    )
    return _Decision([(groups[g][0].dep.target.module, sorted(idxs)) for g, idxs in sorted(roots.items())], counts)
