"""Channels: :func:`prune_channels` removes a ticket's pruned channels (and every coupled one); plans of kind
``"channels"`` replay through :func:`~lightning_worm.core.surgery.apply_plan`.

Registered as the surgery of :class:`~lightning_worm.BatchNormSource` and its subclasses."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import torch
from torch import Tensor, nn

from lightning_worm._internals import torch_pruning as tpi
from lightning_worm.core import measure
from lightning_worm.core.inputs import ExampleInput, as_inputs, batch_size
from lightning_worm.core.sources import BatchNormSource, resolve_source
from lightning_worm.core.surgery import decision as decisions
from lightning_worm.core.surgery.equivalence import check_equivalence, run_pruned_forward
from lightning_worm.core.surgery.graph import build_graph, cut, output_shapes, plan_cuts, removed_out_channels
from lightning_worm.core.surgery.plan import KeptIndices, PruningPlan, PruningReport
from lightning_worm.core.surgery.progress import Progress
from lightning_worm.core.surgery.registry import Surgery, refuse_unprunable, register_surgery
from lightning_worm.core.surgery.transaction import PruningError, all_or_nothing
from lightning_worm.core.validation import check_choice, check_int

__all__ = ["DEFAULT_COUPLING", "prune_channels"]

Ticket = Mapping[str, Tensor]

#: The coupling rule :func:`prune_channels` uses unless told otherwise (see ``examples/benchmarks/coupling.py``).
DEFAULT_COUPLING: Final = "vote"

CHANNELS_HINT = (
    "A layer there mixes channels in a way the dependency graph does not see (a normalisation over channels, a "
    "convolution across the channel dimension, a standardised weight), so its channels cannot be removed one by "
    "one: this model cannot be pruned by its BatchNorm channels. Prune with `check=False` only if you accept a "
    "different function."
)


def prune_channels(
    model: nn.Module,
    ticket: Ticket,
    example_input: ExampleInput,
    *,
    source: Any = None,
    coupling: str = DEFAULT_COUPLING,
    round_to: int | None = None,
    measure_latency: bool = True,
    latency_repeats: int = 10,
    check: bool = True,
) -> PruningReport:
    r"""Physically remove the channels a ticket prunes, in place; all or nothing, checked.

    Each pruned channel of a scored module (a BatchNorm layer by default) goes together with the
    conv/linear output channel feeding it and the input channels of every consumer; the model keeps its
    inputs and output shapes. See ``lightning_worm.core.surgery.decision`` for which channels go
    when layers are coupled. Parameters are replaced by new ``nn.Parameter`` objects (rebuild
    optimizers; ``report.kept_indices`` maps their state). The modules' train/eval flags and
    ``requires_grad`` are restored; everything stays on the model's device.

    Args:
        model: the model; entry names in ``ticket`` are relative to it.
        ticket: ``{entry name: 1-D bool tensor of its channels}``, ``True`` = keep. Tracked entries it
            does not name keep all their channels.
        example_input: a tensor or a tuple of tensors, called as ``model(*inputs)``. One small batch.
        source: the score source of the ticket (a ``ScoreSource``, a name such as ``"batchnorm"``, or
            ``None`` for BatchNorm): it says which modules the ticket names and scores their channels.
            Its entries' handles must be modules whose output channels are the units.
        coupling: how channels coupled across layers (a residual sum, a depthwise pair) are chosen:
            ``"vote"`` (default) removes as many as the ticket prunes there on average, those the ticket
            prunes in most coupled layers first, then by mean score; where nothing is coupled it removes
            exactly the ticket. ``"mean_rank"`` removes as many, ranked by mean score only. ``"all"``
            removes a coupled channel only if the ticket prunes it in every coupled layer (on residual
            networks with independent scores that is rare: at a 50 % ticket it removed 0.6-28 % on the
            torchvision ResNet, RegNet, DenseNet and MobileNet families).
        round_to: keep a multiple of this many channels in every pruned group (``None``: the ticket as is).
        measure_latency: time the model before and after (``torch.utils.benchmark``, eval mode, no grad).
        latency_repeats: timed forward passes (median), after 3 warm-up passes.
        check: check the result (on by default; it costs two forwards of ``example_input``): the pruned model
            must compute what the dense model does with the removed channels zeroed (rows, columns and biases;
            see ``lightning_worm.core.surgery.equivalence``), else the prune is undone and refused.

    Returns:
        A :class:`PruningReport`; ``report.plan`` replays the surgery with :func:`apply_plan`. A FLOP count or a
        latency that cannot be measured is a warning and ``None`` in the report, never a failed prune.

    Raises:
        ValueError: on a bad ticket (empty, unknown modules, not 1-D bool, wrong length), source or options,
            or a source whose channels cannot be removed (``"layernorm"``: a refusal names why).
        RuntimeError: if the model's forward fails on ``example_input`` before pruning (chained).
        PruningError: if the surgery fails (torch-pruning's exception chained), the pruned model no longer runs
            or changed its output shapes, or it fails the check. The prune is all or nothing: the model (its
            parameters, the very same objects, sizes and hooks) is then exactly as before.

    Example::

        >>> import torch, torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> ticket = {n: torch.rand(m.num_features) > 0.5 for n, m in model.named_modules()
        ...           if isinstance(m, torch.nn.BatchNorm2d)}
        >>> report = prune_channels(model, ticket, torch.randn(1, 3, 64, 64), measure_latency=False)
        >>> report.params_after < report.params_before
        True
    """
    check_choice("coupling", coupling, decisions.COUPLINGS)
    check_int("round_to", round_to, minimum=1, allow_none=True)
    check_int("latency_repeats", latency_repeats, minimum=1)
    source = resolve_source(source)
    refuse_unprunable(source)
    modules = _scored_modules(model, source)
    masks = _validated_ticket(ticket, modules, source)
    inputs = as_inputs(example_input)
    names = {module: name for name, module in model.named_modules()}
    batch = batch_size(inputs)

    def latency() -> float | None:
        if not measure_latency:
            return None
        return measure.or_none("Timing the model", lambda: measure.latency_ms(model, inputs, repeats=latency_repeats))

    with _restored_modes(model):
        model.eval()
        flops_before, shapes_before = _counted_forward(model, inputs, when="before pruning")
        latency_before = latency()
        params_before = measure.count_params(model)
        units_before = {name: _count(source, m) for name, m in modules.items()}
        scores = {name: source.scores(m).detach().float().cpu().tolist() for name, m in modules.items()}

        with all_or_nothing(model, "Pruning the channels") as dense, Progress("prune_channels") as progress:
            progress.step("tracing the dependency graph")
            graph, output_nodes = build_graph(model, inputs)
            progress.step("grouping the coupled channels")
            decision = decisions.decide(graph, output_nodes, masks, modules, scores, coupling, round_to)
            progress.step("cutting the channels")
            cuts = plan_cuts(graph, decision.pruned_roots)
            with _recorded_parameter_slices(model) as kept_indices:
                cut(graph, cuts)
            progress.step("checking the pruned model")
            model.eval()
            units_after = {name: _count(source, m) for name, m in modules.items()}
            removed = {name: units_before[name] - units_after[name] for name in modules}
            if removed != decision.removed_by_entry:
                wrong = [f"{n} lost {removed[n]} of {units_before[n]} channels, not {decision.removed_by_entry[n]}"
                         for n in removed if removed[n] != decision.removed_by_entry[n]]
                raise PruningError(
                    f"The cut removed other channels than decided: {_few(wrong, 3)}. The dependency graph couples "
                    "these layers in a way the decision did not see (a channel slice or a concatenation it cannot "
                    "follow), so the pruned model would not be the ticket's. The model was left unchanged; this "
                    "model cannot be pruned by its BatchNorm channels."
                )
            flops_after, shapes_after = _counted_forward(model, inputs, when="after pruning")
            if shapes_after != shapes_before:
                raise PruningError(
                    f"Pruning changed the model's output shapes from {shapes_before} to {shapes_after}; the "
                    "dependency graph missed a constraint of this model. The model was left unchanged."
                )
            if check:
                check_equivalence(model, dense, kept_indices, inputs, what="channels", hint=CHANNELS_HINT)
        latency_after = latency()

    plan = PruningPlan.of(
        model, inputs,
        pruned_groups=[[names[root], idxs] for root, idxs in decision.pruned_roots],
        units_before=units_before,
        units_after=units_after,
        source=getattr(source, "key", "batchnorm"),
    )
    report = PruningReport(
        plan=plan,
        params_before=params_before,
        params_after=measure.count_params(model),
        flops_before=None if flops_before is None else round(flops_before / batch),
        flops_after=None if flops_after is None else round(flops_after / batch),
        flops_batch=batch,
        units_before=dict(plan.units_before),
        units_after=dict(plan.units_after),
        latency_before_ms=latency_before,
        latency_after_ms=latency_after,
        kept_indices=kept_indices,
        coupling=coupling,
        round_to=round_to,
        kept_by_entry=decision.kept_by_entry,
        **decision.counts,
    )
    if report.shortfall is not None:
        report.note = f"Removed less than asked: {report.shortfall}"
        warnings.warn(f"prune_channels: {report.shortfall}", UserWarning, stacklevel=2)
    return report


def _replay_channels(model: nn.Module, plan: PruningPlan, *, source: Any = None) -> KeptIndices:
    """Replay a channel plan (``apply_plan`` dispatches here, the plan's fields validated); checks it fully first."""
    _check_channel_groups(plan)
    if source is None:
        try:
            source = resolve_source(plan.source)
        except ValueError as error:
            raise ValueError(f"{error} The plan was made with the source {plan.source!r}: pass it as "
                             "`apply_plan(model, plan, source=...)`.") from error
    else:
        source = resolve_source(source)
    candidates = dict(source.candidates(model))
    _check_plan_fits(model, plan, candidates, source)
    inputs = plan.zero_inputs(model)
    modules = dict(model.named_modules())
    roots = [(modules[name], list(idxs)) for name, idxs in plan.pruned_groups]
    with _restored_modes(model):
        graph, _ = build_graph(model, inputs)
        _check_roots(graph, plan, roots)
        cuts = plan_cuts(graph, roots)
        predicted = {name: plan.units_before[name] - removed_out_channels(graph, cuts, candidates[name])
                     for name in plan.units_before}
        if predicted != plan.units_after:
            raise ValueError(
                f"The plan is inconsistent: its pruned_groups would leave {_differences(predicted, plan.units_after)}"
                " channels, not its units_after. The plan was edited or belongs to another model; re-create it "
                "with prune_channels."
            )
        with _recorded_parameter_slices(model) as kept_indices:
            cut(graph, cuts)
    reached = {name: _count(source, candidates[name]) for name in plan.units_after}
    if reached != plan.units_after:  # pragma: no cover - predicted above
        raise RuntimeError(
            f"Replaying the plan did not reproduce its channel counts ({_differences(reached, plan.units_after)})."
        )
    return kept_indices


# --------------------------------------------------------------------------------------------- inputs


def _count(source: Any, handle: Any) -> int:
    count = getattr(source, "count", None)
    return int(count(handle)) if count is not None else int(source.scores(handle).numel())


def _scored_modules(model: nn.Module, source: Any) -> dict[str, nn.Module]:
    """The source's tracked entries; their handles must be the model's own modules (channels on dim 0)."""
    tracked = source.tracked(model)
    own = {id(m) for m in model.modules()}
    for name, handle in tracked.items():
        if not isinstance(handle, nn.Module) or id(handle) not in own or source.scores(handle).dim() != 1:
            raise ValueError(
                f"prune_channels removes output channels of modules, but {type(source).__name__} tracks entry "
                f"{name!r} as a {type(handle).__name__} (scores must be 1-D, one per output channel of the "
                "entry's module). Prune with the source's own `prune`, or track channels (e.g. BatchNormSource)."
            )
    return tracked


def _few(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _validated_ticket(ticket: Ticket, modules: Mapping[str, nn.Module], source: Any) -> dict[str, Tensor]:
    """The ticket on the CPU, completed with all-True masks for the tracked modules it does not name."""
    if not isinstance(ticket, Mapping) or len(ticket) == 0:
        raise ValueError(
            "The ticket is empty: it must map tracked module names to 1-D bool masks (True = keep), "
            "e.g. the mask of `unit_mask(model, ...)`."
        )
    unknown = [name for name in ticket if name not in modules]
    if unknown:
        known = _few(list(map(repr, modules)), 3) or "none"
        raise ValueError(
            f"The ticket names {len(unknown)} module(s) that are not tracked {source.description} of this model: "
            f"{_few(list(map(repr, unknown)))}. Compute the ticket on this model with the same source (names "
            f"as `model.named_modules()` gives them; tracked here: {known})."
        )
    masks = {name: torch.ones(_count(source, m), dtype=torch.bool) for name, m in modules.items()}
    for name, mask in ticket.items():
        if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 1):
            got = type(mask).__name__
            if isinstance(mask, Tensor):
                got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            raise ValueError(
                f"Ticket entry {name!r} must be a 1-D torch.bool tensor (True = keep), got a {got}. "
                "Convert it with `mask.bool()`."
            )
        if mask.numel() != masks[name].numel():
            raise ValueError(
                f"Ticket entry {name!r} has {mask.numel()} channels but the layer has {masks[name].numel()}. "
                "The ticket comes from another model shape (or from before an earlier pruning); compute it on "
                "this model."
            )
        masks[name] = mask.detach().cpu()
    return masks


def _counted_forward(
    model: nn.Module, inputs: tuple[Tensor, ...], when: str
) -> tuple[int | None, list[tuple[int, ...]]]:
    """FLOPs of one forward of the batch (``None`` with a warning if counting fails) and the output shapes.

    A failing forward raises: before pruning a ``RuntimeError`` (the input does not fit), after it a
    :class:`PruningError` (the surgery broke the model); both chain the original.
    """
    try:
        flops, out = measure.count_flops(model, inputs)
    except Exception as count_error:  # noqa: BLE001 - the counter fails on some ops; the forward may not
        if when == "before pruning":
            try:
                with torch.no_grad():
                    out = model(*inputs)
            except Exception as error:
                raise RuntimeError(
                    f"The model's forward failed on example_input before pruning ({type(error).__name__}: "
                    f"{error}). Pass an input the model accepts as model(*example_input), on the model's device."
                ) from error
        else:
            out = run_pruned_forward(model, inputs, "The dependency graph missed a constraint of this model: "
                                     "its channels cannot be removed by this surgery.")
        measure.warn_unmeasured(f"Counting the FLOPs {when}", count_error)
        flops = None
    return flops, output_shapes(out)


# ------------------------------------------------------------------------------- checking a plan


def _check_channel_groups(plan: PruningPlan) -> None:
    """A channel plan's inputs and groups have the types and ranges its replay needs."""
    fix = "The plan was edited or corrupted; re-create it with prune_channels (or restore it from the checkpoint)."
    if not plan.input_specs:
        raise ValueError(f"Plan field input_specs must be a non-empty list of {{'shape', 'dtype'}} dicts. {fix}")
    seen: set[str] = set()
    for i, group in enumerate(plan.pruned_groups):
        if not (isinstance(group, (list, tuple)) and len(group) == 2 and isinstance(group[0], str)
                and isinstance(group[1], (list, tuple))):
            raise ValueError(f"Plan pruned_groups[{i}] must be [module name, list of channel indices], got "
                             f"{group!r}. {fix}")
        name, idxs = group
        if name in seen:
            raise ValueError(f"Plan pruned_groups[{i}] names {name!r} a second time; each group appears once. {fix}")
        seen.add(name)
        bad = [v for v in idxs if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"Plan pruned_groups[{i}] ({name!r}) holds {bad[0]!r}, not a channel index "
                             f"(an integer). {fix}")
        if any(v < 0 for v in idxs):
            raise ValueError(f"Plan pruned_groups[{i}] ({name!r}) holds the negative index {min(idxs)}. {fix}")
        if len(set(idxs)) != len(idxs):
            dup = next(v for v in idxs if idxs.count(v) > 1)
            raise ValueError(f"Plan pruned_groups[{i}] ({name!r}) lists channel {dup} twice. {fix}")


def _check_plan_fits(model: nn.Module, plan: PruningPlan, candidates: Mapping[str, Any], source: Any) -> None:
    """The model's structure must fit the plan; its class may differ (a subclass building the same layers)."""
    made_for = plan.made_for(model)
    modules = dict(model.named_modules())
    missing = [n for n in plan.units_before if n not in candidates]
    missing += [name for name, _ in plan.pruned_groups if name not in modules]
    if missing:
        raise ValueError(
            f"The plan names modules this model lacks: {_few(list(map(repr, missing)))}.{made_for} "
            "Build the model with the same arguments."
        )
    counts = {}
    for name in plan.units_before:
        try:
            counts[name] = _count(source, candidates[name])
        except Exception as error:  # noqa: BLE001 - e.g. a lazy or non-affine module
            reason = source.skip_reason(candidates[name]) or f"{type(error).__name__}: {error}"
            raise ValueError(
                f"Plan entry units_before[{name!r}]: the model's {type(candidates[name]).__name__} there has no "
                f"channels to count ({reason}).{made_for} Build the model as the pruned one was built."
            ) from error
    if counts != plan.units_before:
        hint = (
            "It looks already pruned; apply a plan to a freshly built model only."
            if counts == plan.units_after
            else "Build the model with the same arguments (width, num_classes) as the pruned one."
        )
        differences = _differences(counts, plan.units_before)
        raise ValueError(
            f"The model's channel counts differ from the plan's ({differences}).{made_for} {hint}"
        )


def _check_roots(graph: Any, plan: PruningPlan, roots: Sequence[tuple[nn.Module, list[int]]]) -> None:
    """Each pruned group's root is a prunable layer of the graph and its indices are in range."""
    fix = "The plan was edited or belongs to another model; re-create it with prune_channels."
    for i, ((name, _), (module, idxs)) in enumerate(zip(plan.pruned_groups, roots, strict=True)):
        pruner = graph.get_pruner_of_module(module) if module in graph.module2node else None
        channels = graph.get_out_channels(module) if pruner is not None else None
        if not isinstance(channels, int):
            raise ValueError(f"Plan pruned_groups[{i}] names {name!r}, a {type(module).__name__} whose output "
                             f"channels cannot be pruned (not a traced conv/linear layer). {fix}")
        out_of_range = [v for v in idxs if v >= channels]
        if out_of_range:
            raise ValueError(f"Plan pruned_groups[{i}] ({name!r}) holds channel {out_of_range[0]}, but the layer has "
                             f"{channels} output channels (0..{channels - 1}). {fix}")
        if len(idxs) >= channels:
            raise ValueError(f"Plan pruned_groups[{i}] ({name!r}) removes all {channels} output channels; a layer "
                             f"keeps at least one. {fix}")


def _differences(actual: Mapping[str, int], expected: Mapping[str, int]) -> str:
    return _few([f"{n}: {actual[n]} instead of {expected[n]}" for n in expected if actual[n] != expected[n]], 3)


# ---------------------------------------------------------------------------------- the model's state


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
    """Record which original indices each parameter of ``model`` keeps while Torch-Pruning slices it."""
    kept: KeptIndices = {}
    shapes = {name: p.shape for name, p in model.named_parameters()}
    live: dict[int, tuple[Tensor, str, list[Tensor | None]]] = {
        id(p): (p, name, [None] * p.dim()) for name, p in model.named_parameters()
    }

    def record(weight: Tensor, pruned: Tensor, keep_idxs: Any, pruning_dim: int) -> None:
        tracked = live.pop(id(weight), None)  # ``live`` holds the parameters, so their ids stay unique
        if tracked is not None:
            _, name, dims = tracked
            dim = pruning_dim % weight.dim()
            keep = torch.as_tensor(keep_idxs, dtype=torch.long).cpu()
            before = dims[dim]
            dims[dim] = keep if before is None else before[keep]
            live[id(pruned)] = (pruned, name, dims)

    with tpi.recorded_parameter_slices(record):
        yield kept
    for _, name, dims in live.values():
        dims = [None if d is None or len(d) == shapes[name][i] else d for i, d in enumerate(dims)]
        if any(d is not None for d in dims):
            kept[name] = dims


register_surgery(BatchNormSource, Surgery("channels", prune=prune_channels, replay=_replay_channels))
