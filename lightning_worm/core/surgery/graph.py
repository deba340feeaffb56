"""Torch-Pruning's dependency graph, extended for ShuffleNet-like models, and cutting channels out of it.

Torch-Pruning's ``DependencyGraph`` follows the real data flow, so removing a channel also removes the
matching input channels of every consumer, through residual additions, concatenations, grouped and
depthwise convolutions and a flatten into a linear layer. What it gets wrong on its own is taught here:
a channel shuffle (``view -> transpose -> view`` or ``F.channel_shuffle``) becomes a node with its own
index permutation, and ``chunk`` along the channels reads its real sizes and order and keeps its chunks
the same size. Every Torch-Pruning internal this needs is reached through
``lightning_worm._internals.torch_pruning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.dependency import Node

from lightning_worm._internals import torch_pruning as tpi
from lightning_worm.core.surgery.transaction import PruningError

__all__ = [
    "ChannelShuffleOp",
    "ChannelShufflePruner",
    "ChunkAwareSplitPruner",
    "ShuffleIndexMapping",
    "SurgeryGraph",
    "build_graph",
    "channel_shuffle",
    "cut",
    "output_shapes",
    "plan_cuts",
    "removed_out_channels",
]

Cuts = dict[tuple[Node, Any], tuple[Any, set[int]]]


class ChannelShuffleOp(nn.Module):
    """Graph-only stand-in for a channel shuffle. Its node's indices are the shuffle's input channels."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__()
        self.groups = groups
        self.channels = channels

    def __repr__(self) -> str:
        return f"ChannelShuffle(groups={self.groups}, channels={self.channels})"


class ChannelShufflePruner(ops.DummyPruner):
    """Keeps the shuffle's channel count; its channel groups make whole columns go together."""

    def prune_out_channels(self, layer: ChannelShuffleOp, idxs: Sequence[int]) -> ChannelShuffleOp:
        layer.channels -= len(idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelShuffleOp) -> int:
        return layer.channels

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: ChannelShuffleOp) -> int:
        return layer.groups

    get_in_channel_groups = get_out_channel_groups


class ChunkAwareSplitPruner(ops.SplitPruner):
    """A split into equal parts (``chunk``) recomputes its sizes at run time: prune the same positions in each."""

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        sizes = tpi.split_sizes(layer)
        return len(sizes) if sizes and len(set(sizes)) == 1 else 1

    get_in_channel_groups = get_out_channel_groups


class ShuffleIndexMapping:
    """Maps shuffle input channels to output channels (or back), for the shuffle's current size."""

    def __init__(self, op: ChannelShuffleOp, inverse: bool) -> None:
        self.op = op
        self.inverse = inverse

    def __call__(self, idxs: list) -> list:
        groups, per_group = self.op.groups, self.op.channels // self.op.groups
        if self.inverse:  # output b * groups + a  ->  input a * per_group + b
            mapped = [((i.idx % groups) * per_group + i.idx // groups, i.root_idx) for i in idxs]
        else:
            mapped = [((i.idx % per_group) * groups + i.idx // per_group, i.root_idx) for i in idxs]
        # Sorted, as Torch-Pruning's own mappings keep them: it only skips revisits with equal index lists.
        return [tpi.hybrid_index(idx, root) for idx, root in sorted(mapped)]


def channel_shuffle(grad_fn: Any) -> tuple[ChannelShuffleOp, list[int] | None] | None:
    """A channel shuffle op if ``grad_fn`` is one, with the shape the view back to channels starts from.

    Recognised: ``F.channel_shuffle`` (``nn.ChannelShuffle``), and the transpose of
    ``x.view(n, g, c // g, *spatial).transpose(1, 2).contiguous().view(n, c, *spatial)`` (torchvision's).
    """
    name = grad_fn.name()
    if name == "ChannelShuffleBackward0":
        return ChannelShuffleOp(tpi.shuffle_groups(grad_fn), tpi.input_shape(grad_fn)[1]), None
    if name != "TransposeBackward0":
        return None
    shape = tpi.input_shape(grad_fn)  # transposed: (n, c // g, g, *spatial)
    source = grad_fn.next_functions[0][0]
    if len(shape) < 4 or {d % len(shape) for d in tpi.transposed_dims(grad_fn)} != {1, 2}:
        return None
    if source is None or source.name() != "ViewBackward0":
        return None
    before = tpi.saved_sizes(source)  # (n, c, *spatial)
    if before != [shape[0], shape[1] * shape[2], *shape[3:]]:
        return None
    return ChannelShuffleOp(groups=shape[2], channels=before[1]), shape


def _shuffle_views(node: Node, shape: list[int]) -> Iterator[Node]:
    """The views around a shuffle node: its input, and the first view after it (through ``contiguous``)."""
    yield from (n for n in node.inputs if n.type == ops.OPTYPE.RESHAPE)
    frontier = list(node.outputs)
    while frontier:
        n = frontier.pop()
        if n.type == ops.OPTYPE.ELEMENTWISE and n.grad_fn.name() == "CloneBackward0":
            frontier.extend(n.outputs)
        elif n.type == ops.OPTYPE.RESHAPE and tpi.saved_sizes(n.grad_fn) == shape:
            yield n


def _consumed_output(consumer: Node, producer_fn: Any) -> int | None:
    """Which output of ``producer_fn`` (e.g. which chunk) ``consumer`` reads, if its grad_fn says so."""
    return min((nr for fn, nr in getattr(consumer.grad_fn, "next_functions", ()) if fn is producer_fn), default=None)


class SurgeryGraph(tpi.HookedDependencyGraph):
    """Torch-Pruning's ``DependencyGraph`` plus channel shuffles, equal-size chunks and chunk order."""

    def __init__(self) -> None:
        super().__init__()
        self.register_op_pruner(ops.OPTYPE.SPLIT, ChunkAwareSplitPruner())
        self.shuffle_pruner = ChannelShufflePruner()
        self.add_pruning_functions(self.shuffle_pruner)

    # Torch-Pruning infers channel counts again whenever it updates the index mappings (building the graph,
    # every group asked for), warning "Maximum recursive depth reached!" where its walk gives up: thousands of
    # times on DPN. The counts that matter are read from autograd in `after_trace`.
    def build_dependency(self, *args: Any, **kwargs: Any) -> Any:
        with _quiet_inference():
            return super().build_dependency(*args, **kwargs)

    def get_pruning_group(self, *args: Any, **kwargs: Any) -> Any:
        with _quiet_inference():
            return super().get_pruning_group(*args, **kwargs)

    def get_pruner_of_module(self, module: nn.Module) -> Any:
        # Not `register_customized_layer`: with any customized pruner, Torch-Pruning tests every module
        # with `==` and `in`, which torchmetrics' Metric overloads (truthy), so every layer became ignored.
        if isinstance(module, ChannelShuffleOp):
            return self.shuffle_pruner
        return super().get_pruner_of_module(module)

    def after_trace(self, module2node: dict) -> None:
        for node in list(module2node.values()):
            found = channel_shuffle(node.grad_fn) if node.type == ops.OPTYPE.ELEMENTWISE else None
            if found is not None:
                shuffle, shape = found
                tpi.retype_node(module2node, node, shuffle, ops.OPTYPE.CUSTOMIZED)
                for view in _shuffle_views(node, shape) if shape else ():
                    # Keeps channel indices: no flatten mapping from Torch-Pruning.
                    tpi.set_node_type(view, ops.OPTYPE.ELEMENTWISE)
            if node.type == ops.OPTYPE.SPLIT:
                # Torch-Pruning maps the i-th consumer to the i-th chunk; consumers come in tracing order.
                chunks = [_consumed_output(out, node.grad_fn) for out in node.outputs]
                read = [chunk for chunk in chunks if chunk is not None]
                if len(read) == len(chunks):
                    pairs = sorted(zip(read, node.outputs, strict=True), key=lambda pair: pair[0])
                    tpi.set_node_outputs(node, [out for _, out in pairs])
                tpi.set_node_grad_fn(node, tpi.SplitGradFn(node.grad_fn))
            elif node.type == ops.OPTYPE.CONCAT:
                # Torch-Pruning's own sizes are wrong past a slice (ReXNet): its grouping then never ended.
                sizes = tpi.concat_sizes(node.grad_fn)
                if sizes is not None and len(sizes) == len(node.inputs):
                    tpi.set_concat_sizes(node.module, sizes)
                tpi.set_node_grad_fn(node, tpi.SplitGradFn(node.grad_fn))
            elif node.type in (ops.OPTYPE.SLICE, ops.OPTYPE.RESHAPE):
                # With the sizes it looks for, Torch-Pruning maps a reshape's channels only for a flatten of
                # (n, c, h, w); without them it mapped the head reshapes of attention (EfficientViT) too.
                tpi.set_node_grad_fn(node, tpi.SplitGradFn(node.grad_fn))

    def after_build(self, module2node: dict) -> None:
        for node in module2node.values():
            if isinstance(node.module, ChannelShuffleOp):
                for dep in node.dependencies:
                    if dep.target in node.outputs:
                        tpi.set_index_mapping(dep, ShuffleIndexMapping(node.module, inverse=False))
                for out_node in node.outputs:
                    for dep in out_node.dependencies:
                        if dep.target is node:
                            tpi.set_index_mapping(dep, ShuffleIndexMapping(node.module, inverse=True))


def build_graph(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[SurgeryGraph, set[Node]]:
    """The dependency graph (traced in eval mode) and the nodes producing the model's outputs."""
    outputs = []

    def forward(module: nn.Module, example: tuple[Tensor, ...]) -> Any:
        outputs.append(module(*example))
        return outputs[-1]

    model.eval()
    try:
        with torch.enable_grad():
            graph = SurgeryGraph().build_dependency(model, inputs, forward_fn=forward, verbose=False)
    except (TypeError, ValueError, AttributeError, AssertionError, IndexError, KeyError, ZeroDivisionError) as error:
        node = tpi.failing_node(error)
        if node is None:
            raise
        near = _named_ancestors(model, node) or [str(node.name)]
        raise PruningError(
            f"torch-pruning cannot trace the channels through the {node.type.name.lower()} fed by "
            f"{', '.join(map(repr, near))} ({type(error).__name__}: {error}): it cannot tell how many channels "
            "one of its inputs has. The model was left unchanged; its channels cannot be removed by this surgery."
        ) from error
    output_fns = {t.grad_fn for t in tp.utils.flatten_as_list(outputs[-1]) if isinstance(t, Tensor)}
    return graph, {node for node in graph.module2node.values() if node.grad_fn in output_fns}


@contextmanager
def _quiet_inference() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached!")
        yield


def _named_ancestors(model: nn.Module, node: Node, limit: int = 4) -> list[str]:
    """The model's modules nearest upstream of ``node`` (breadth first), at most ``limit``."""
    names = {m: n for n, m in model.named_modules()}
    found: list[str] = []
    seen, frontier = {node}, list(node.inputs)
    while frontier and len(found) < limit:
        following = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.module in names:
                found.append(names[n.module])
            else:
                following.extend(n.inputs)
        frontier = following
    return found[:limit]


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor)]


def plan_cuts(graph: SurgeryGraph, pruned_roots: Sequence[tuple[nn.Module, list[int]]]) -> Cuts:
    """Every layer's cut, ``(node, handler) -> (dependency, original indices)``, read on the unpruned graph.

    Nothing is changed yet: :func:`removed_out_channels` reads what would go, :func:`cut` does it.
    """
    cuts: Cuts = {}
    for root, idxs in pruned_roots:
        pruner = graph.get_pruner_of_module(root)
        for item in graph.get_pruning_group(root, pruner.prune_out_channels, idxs):
            cuts.setdefault((item.dep.target, item.dep.handler), (item.dep, set()))[1].update(item.idxs)
    return cuts


def removed_out_channels(graph: SurgeryGraph, cuts: Cuts, module: nn.Module) -> int:
    """How many output channels of ``module`` the cuts remove."""
    node = graph.module2node.get(module)
    return sum(len(idxs) for (target, handler), (_, idxs) in cuts.items()
               if target is node and graph.is_out_channel_pruning_fn(handler))


@torch.no_grad()
def cut(graph: SurgeryGraph, cuts: Cuts) -> None:
    """Cut every layer once, with its original indices, in one step.

    A unit can span several groups (through a channel shuffle, say), so pruning group after group would
    leave the graph inconsistent in between.
    """
    tpi.group_of(graph, [(dep, sorted(idxs)) for dep, idxs in cuts.values()]).prune(record_history=False)
