"""Every use of Torch-Pruning internals, in one place.

The surgery uses Torch-Pruning's public API where it does the job: ``DependencyGraph.build_dependency``,
``get_all_groups``, ``get_pruning_group``, ``get_pruner_of_module``, ``get_in_channels`` /
``get_out_channels``, ``is_out_channel_pruning_fn``, ``Group.add_dep`` / ``Group.prune``, the graph's
``Node`` and ``Dependency`` objects as it hands them out, and the op pruners of ``torch_pruning.ops``.
What that API does not cover is listed in :data:`INTERNALS` and used only through the functions below.
``tests/_internals/test_torch_pruning.py`` probes each one against the installed release, so that a release
that changes one fails with the name of the internal that changed.

Autograd attributes that the graph extensions read (``_saved_*`` of ``grad_fn`` objects) are torch
internals, also read only here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.pruner import function

__all__ = [
    "INTERNALS",
    "HookedDependencyGraph",
    "SplitGradFn",
    "concat_sizes",
    "failing_node",
    "group_of",
    "hybrid_index",
    "input_shape",
    "is_partial_channel_slice",
    "is_split_op",
    "patch_active",
    "recorded_parameter_slices",
    "retype_node",
    "saved_dim",
    "saved_sizes",
    "set_concat_sizes",
    "set_index_mapping",
    "set_node_grad_fn",
    "set_node_outputs",
    "set_node_type",
    "shuffle_groups",
    "split_sizes",
    "transposed_dims",
]

#: name -> what lightning-worm uses it for.
INTERNALS: dict[str, str] = {
    "DependencyGraph._trace": "post-processes the traced nodes (channel shuffles, the order of chunk consumers)",
    "DependencyGraph._build_dependency": "sets the index mappings across a channel shuffle",
    "DependencyGraph.REGISTERED_PRUNERS": "registers the chunk-aware pruner for split ops (with "
    "_in_channel_pruning_fn / _out_channel_pruning_fn; register_customized_layer takes module classes only "
    "and compares every module with == and in, which torchmetrics' Metric overloads)",
    "Node fields": "Node.type / .module / .module_class / .grad_fn / .outputs are rewritten in place for a "
    "channel shuffle and a chunk",
    "Dependency.index_mapping": "replaced by the shuffle's index permutation",
    "ops._SliceOp": "its start / end / step: a partial channel slice keeps its channels",
    "ops._SplitOp": "the graph's stand-in for split/chunk, and its split_sizes",
    "ops._ConcatOp.concat_sizes": "set from autograd: Torch-Pruning's own inference does not know slices",
    "_helpers._HybridIndex": "the (index, root index) pairs an index mapping returns",
    "Group._DG": "one group made of several roots' groups, pruned in one step",
    "BasePruningFunc._prune_parameter_and_grad": "wrapped, only inside recorded_parameter_slices(), to record "
    "which original indices every parameter keeps",
    "traceback local node": "the graph node whose index mapping failed, read from the local `node` of the "
    "index-mapping update that failed (update_index_mapping's loop over the nodes), to name it in the error",
    "autograd saved attributes": "ChannelShuffleBackward0._saved_groups, TransposeBackward0._saved_dim0/1, "
    "Split/Cat/SliceBackward0._saved_dim (negative dims read as 2**64 - n), "
    "ViewBackward0._saved_self_sym_sizes, grad_fn._input_metadata (torch internals the shuffle detection reads; "
    "Torch-Pruning 1.6 reads _saved_self_sizes, which torch renamed)",
}


# ------------------------------------------------------------------------------------------ the graph


class HookedDependencyGraph(tp.DependencyGraph):
    """``DependencyGraph`` with two hooks: :meth:`after_trace` and :meth:`after_build` (both get ``module2node``)."""

    def after_trace(self, module2node: dict) -> None:
        """Called with the traced nodes, before the dependencies are built."""

    def after_build(self, module2node: dict) -> None:
        """Called once the dependencies are built."""

    def register_op_pruner(self, optype: Any, pruner: Any) -> None:
        """Use ``pruner`` for every node of ``optype`` (an ``ops.OPTYPE``)."""
        self.REGISTERED_PRUNERS[optype] = pruner
        self.add_pruning_functions(pruner)

    def add_pruning_functions(self, pruner: Any) -> None:
        """Make the graph know ``pruner``'s functions as in/out channel pruning functions."""
        self._in_channel_pruning_fn.add(pruner.prune_in_channels)
        self._out_channel_pruning_fn.add(pruner.prune_out_channels)

    def _trace(self, *args: Any, **kwargs: Any) -> dict:
        module2node = super()._trace(*args, **kwargs)
        self.after_trace(module2node)
        return module2node

    def _build_dependency(self, module2node: dict) -> None:
        super()._build_dependency(module2node)
        self.after_build(module2node)


def failing_node(error: BaseException) -> Any:
    """The innermost graph ``Node`` held as ``node`` by a frame of ``error``'s traceback, or ``None``."""
    found = None
    tb = error.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, tp.dependency.Node):
            found = node
        tb = tb.tb_next
    return found


def retype_node(module2node: dict, node: Any, module: nn.Module, optype: Any) -> None:
    """Make ``node`` stand for ``module`` (of ``optype``) instead of the op it was traced as."""
    del module2node[node.module]
    node.module, node.module_class, node.type = module, type(module), optype
    module2node[module] = node


def set_node_type(node: Any, optype: Any) -> None:
    node.type = optype


def set_node_outputs(node: Any, outputs: list) -> None:
    node.outputs = outputs


def set_node_grad_fn(node: Any, grad_fn: Any) -> None:
    node.grad_fn = grad_fn


def set_index_mapping(dep: Any, mapping: Callable[[list], list]) -> None:
    """Replace the first index mapping of a dependency (Torch-Pruning applies ``[0]`` then ``[1]``)."""
    dep.index_mapping[0] = mapping


def hybrid_index(idx: int, root_idx: int | None) -> Any:
    return tp._helpers._HybridIndex(idx, root_idx)


def is_split_op(module: nn.Module) -> bool:
    return isinstance(module, ops._SplitOp)


def is_partial_channel_slice(module: nn.Module, grad_fn: Any) -> bool:
    """Whether a Torch-Pruning slice op takes part of the channels (``x[:, :c]``), whose bounds the model's code
    fixes: removing a channel before or inside them would shift what it takes (ReXNet's partial residuals)."""
    if not isinstance(module, ops._SliceOp):
        return False
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if not sizes:
        return True  # unknown: take it as a channel slice
    dim = saved_dim(grad_fn)
    if dim != (2 if len(sizes) == 3 else 1):
        return False
    return not (module.start == 0 and module.step == 1 and module.end >= sizes[dim])


def split_sizes(module: nn.Module) -> list[int] | None:
    """The sizes of a split op's parts as traced (``None`` if unknown)."""
    return cast("list[int] | None", module.split_sizes)  # a torch-pruning _SplitOp's attribute


def group_of(graph: tp.DependencyGraph, deps: list[tuple[Any, list[int]]]) -> tp.dependency.Group:
    """A group of the given ``(dependency, indices)`` pairs, pruned by ``group.prune(record_history=False)``."""
    group = tp.dependency.Group()
    group._DG = graph
    for dep, idxs in deps:
        group.add_dep(dep, idxs)
    return group


# ------------------------------------------------------------------------------------------- autograd


def saved_sizes(grad_fn: Any) -> list[int] | None:
    """The input sizes a view/split saved (``_saved_self_sym_sizes``), ``None`` if none."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    return None if sizes is None else list(sizes)


def input_shape(grad_fn: Any) -> list[int]:
    """The shape of the first input of the op ``grad_fn`` differentiates."""
    return list(grad_fn._input_metadata[0].shape)


def shuffle_groups(grad_fn: Any) -> int:
    """``groups`` of a ``ChannelShuffleBackward0``."""
    return int(grad_fn._saved_groups)


def transposed_dims(grad_fn: Any) -> tuple[int, int]:
    """The two dims a ``TransposeBackward0`` swapped."""
    return grad_fn._saved_dim0, grad_fn._saved_dim1


class SplitGradFn:
    """A split's, concatenation's or slice's ``grad_fn`` as Torch-Pruning 1.6 reads it.

    It looks for ``_saved_self_sizes``, which torch now calls ``_saved_self_sym_sizes``; without it, it
    guesses the split sizes from the consumers, wrongly when a chunk goes into a concatenation.

    A negative ``dim`` is saved by torch as an unsigned 64-bit integer (``-1`` reads ``2**64 - 1``);
    Torch-Pruning only skips ops whose ``_saved_dim`` is a small number other than 1, so it took a split,
    concatenation or slice along the last dimension (attention heads) for one along the channels, mapped
    channel indices through it and grew index lists without bound. ``_saved_dim`` reads non-negative here.

    Compares and hashes as the wrapped ``grad_fn``, which the graph matches against the model's outputs.
    """

    def __init__(self, grad_fn: Any) -> None:
        self.grad_fn = grad_fn

    def __getattr__(self, name: str) -> Any:
        if name == "_saved_dim":
            return saved_dim(self.grad_fn)
        return getattr(self.grad_fn, "_saved_self_sym_sizes" if name == "_saved_self_sizes" else name)

    def __eq__(self, other: object) -> bool:
        return self.grad_fn == (other.grad_fn if isinstance(other, SplitGradFn) else other)

    def __hash__(self) -> int:
        return hash(self.grad_fn)


def saved_dim(grad_fn: Any) -> int:
    """The non-negative dimension a split/cat/slice ``grad_fn`` saved (torch saves ``-1`` as ``2**64 - 1``)."""
    dim = int(grad_fn._saved_dim)
    if dim >= 1 << 63:
        dim -= 1 << 64
    if dim < 0:
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        ndim = len(sizes) if sizes is not None else len(grad_fn._input_metadata[0].shape)
        dim += ndim
    return dim


def concat_sizes(grad_fn: Any) -> list[int] | None:
    """The sizes of a concatenation's inputs along its dimension, from autograd (``None`` if unknown).

    Torch-Pruning 1.6 infers them by walking the graph, which does not know slices: on ReXNet's
    ``torch.cat([x[:, :c] + shortcut, x[:, c:]], 1)`` it summed whole feature maps (``[627, 185]`` for
    ``[174, 11]``), so that its index mappings sent channels out of range and the grouping never ended.
    """
    sizes = []
    for fn, nr in grad_fn.next_functions:
        metadata = getattr(fn, "_input_metadata", None)
        if fn is None or metadata is None or nr >= len(metadata):
            return None
        shape = metadata[nr].shape
        dim = saved_dim(grad_fn)
        if dim >= len(shape):
            return None
        sizes.append(int(shape[dim]))
    return sizes


def set_concat_sizes(module: nn.Module, sizes: list[int]) -> None:
    """Give a Torch-Pruning ``_ConcatOp`` its input sizes (it then no longer infers them)."""
    setattr(module, "concat_sizes", sizes)  # noqa: B010 (a Torch-Pruning attribute nn.Module does not declare)


# ------------------------------------------------------------------------- the parameter-slice recorder

_recorder: ContextVar[Callable[[Tensor, Tensor, Any, int], None] | None] = ContextVar(
    "lightning_worm_parameter_recorder", default=None
)
_lock = threading.Lock()
_depth = 0
_original: Callable | None = None


def _recording(self: Any, weight: Tensor, keep_idxs: Any, pruning_dim: int) -> nn.Parameter:
    assert _original is not None
    pruned = _original(self, weight, keep_idxs, pruning_dim)
    record = _recorder.get()
    if record is not None:
        record(weight, pruned, keep_idxs, pruning_dim)
    return pruned


@contextmanager
def recorded_parameter_slices(record: Callable[[Tensor, Tensor, Any, int], None]) -> Iterator[None]:
    """Call ``record(old, new, kept_indices, dim)`` whenever a pruner slices a parameter, inside this block.

    Every pruner of Torch-Pruning replaces a parameter through
    ``BasePruningFunc._prune_parameter_and_grad``. It is wrapped only while at least one such block is
    open (in any thread), and only the calls made in this block's own context (thread, task) are
    recorded: pruning elsewhere at the same time is not seen.
    """
    global _depth, _original
    with _lock:
        if _depth == 0:
            _original = function.BasePruningFunc._prune_parameter_and_grad
            function.BasePruningFunc._prune_parameter_and_grad = _recording
        _depth += 1
    token = _recorder.set(record)
    try:
        yield
    finally:
        _recorder.reset(token)
        with _lock:
            _depth -= 1
            if _depth == 0:
                function.BasePruningFunc._prune_parameter_and_grad = _original
                _original = None


def patch_active() -> bool:
    """Whether Torch-Pruning's parameter slicing is wrapped right now (tests: never outside a block)."""
    return function.BasePruningFunc._prune_parameter_and_grad is _recording
