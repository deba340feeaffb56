"""Every use of Torch-Pruning internals, in one place.

The surgery uses Torch-Pruning's public API where it does the job: ``DependencyGraph.build_dependency``,
``get_all_groups``, ``get_pruning_group``, ``get_pruner_of_module``, ``get_in_channels`` /
``get_out_channels``, ``is_out_channel_pruning_fn``, ``Group.add_dep`` / ``Group.prune``, the graph's
``Node`` and ``Dependency`` objects as it hands them out, and the op pruners of ``torch_pruning.ops``.
What that API does not cover is listed in :data:`INTERNALS` and used only through the functions below.
:func:`check` probes each one against the installed release (``tests/test_torch_pruning_internals.py``
runs it), so that a release that changes one fails with the name of the internal that changed.

Autograd attributes that the graph extensions read (``_saved_*`` of ``grad_fn`` objects) are torch
internals, also read only here.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.pruner import function

__all__ = [
    "INTERNALS",
    "HookedDependencyGraph",
    "SplitGradFn",
    "check",
    "group_of",
    "hybrid_index",
    "input_shape",
    "is_split_op",
    "patch_active",
    "recorded_parameter_slices",
    "retype_node",
    "saved_sizes",
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
    "ops._SplitOp": "the graph's stand-in for split/chunk, and its split_sizes",
    "_helpers._HybridIndex": "the (index, root index) pairs an index mapping returns",
    "Group._DG": "one group made of several roots' groups, pruned in one step",
    "BasePruningFunc._prune_parameter_and_grad": "wrapped, only inside recorded_parameter_slices(), to record "
    "which original indices every parameter keeps",
    "autograd saved attributes": "ChannelShuffleBackward0._saved_groups, TransposeBackward0._saved_dim0/1, "
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


def split_sizes(module: nn.Module) -> list[int] | None:
    """The sizes of a split op's parts as traced (``None`` if unknown)."""
    return module.split_sizes


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
    """A split's ``grad_fn`` as Torch-Pruning 1.6 reads it.

    It looks for ``_saved_self_sizes``, which torch now calls ``_saved_self_sym_sizes``; without it, it
    guesses the split sizes from the consumers, wrongly when a chunk goes into a concatenation.
    """

    def __init__(self, grad_fn: Any) -> None:
        self.grad_fn = grad_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grad_fn, "_saved_self_sym_sizes" if name == "_saved_self_sizes" else name)


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


# ------------------------------------------------------------------------------------------- checks


class _ChunkShuffle(nn.Module):
    """conv-bn, chunk, a branch, concatenation, a view-transpose-view shuffle, F.channel_shuffle, pool, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.bn(self.conv(x)).chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = nn.functional.channel_shuffle(x, 2)
        return self.fc(x.mean((2, 3)))


class _Probe(HookedDependencyGraph):
    def __init__(self) -> None:
        super().__init__()
        self.traced: dict | None = None
        self.built = False

    def after_trace(self, module2node: dict) -> None:
        self.traced = module2node
        for node in module2node.values():
            if node.type == ops.OPTYPE.SPLIT:
                set_node_grad_fn(node, SplitGradFn(node.grad_fn))

    def after_build(self, module2node: dict) -> None:
        self.built = module2node is self.traced


def _probe_graph() -> _Probe:
    with torch.enable_grad():
        return _Probe().build_dependency(_ChunkShuffle().eval(), torch.zeros(1, 3, 4, 4), verbose=False)


def _check_trace() -> str | None:
    params = list(inspect.signature(tp.DependencyGraph._trace).parameters)
    if params[:2] != ["self", "model"]:
        return f"its signature is now {params}"
    graph = _probe_graph()
    if not isinstance(graph.traced, dict) or not all(isinstance(n, tp.dependency.Node) for n in graph.traced.values()):
        return "it no longer runs from build_dependency or no longer returns {module: Node}"
    return None


def _check_build_dependency() -> str | None:
    graph = _probe_graph()
    return None if graph.built else "it is no longer called with the traced module2node after _trace"


def _check_registered_pruners() -> str | None:
    graph = tp.DependencyGraph()
    missing = [a for a in ("REGISTERED_PRUNERS", "_in_channel_pruning_fn", "_out_channel_pruning_fn")
               if not hasattr(graph, a)]
    if missing:
        return f"DependencyGraph no longer has {missing}"
    if not isinstance(graph.REGISTERED_PRUNERS, dict) or ops.OPTYPE.SPLIT not in graph.REGISTERED_PRUNERS:
        return "REGISTERED_PRUNERS is no longer a dict keyed by ops.OPTYPE holding OPTYPE.SPLIT"
    if not isinstance(graph._in_channel_pruning_fn, set) or not isinstance(graph._out_channel_pruning_fn, set):
        return "_in_channel_pruning_fn / _out_channel_pruning_fn are no longer sets"
    return None


def _check_node_fields() -> str | None:
    graph = _probe_graph()
    node = graph.module2node[graph.model.bn]
    missing = [a for a in ("type", "module", "module_class", "grad_fn", "outputs", "inputs", "dependencies")
               if not hasattr(node, a)]
    if missing:
        return f"Node no longer has {missing}"
    if not isinstance(node.outputs, list) or not isinstance(node.dependencies, list):
        return "Node.outputs / Node.dependencies are no longer lists"
    return None


def _check_index_mapping() -> str | None:
    graph = _probe_graph()
    deps = [d for n in graph.module2node.values() for d in n.dependencies]
    if not deps or not all(isinstance(getattr(d, "index_mapping", None), list) and len(d.index_mapping) == 2
                           for d in deps):
        return "Dependency.index_mapping is no longer a list of two mappings"
    return None


def _check_split_op() -> str | None:
    if not hasattr(ops, "_SplitOp"):
        return "torch_pruning.ops._SplitOp is gone"
    graph = _probe_graph()
    splits = [m for m in graph.module2node if isinstance(m, ops._SplitOp)]
    if not splits:
        return "a chunk is no longer traced as an ops._SplitOp"
    if getattr(splits[0], "split_sizes", None) != [4, 4]:
        return (f"_SplitOp.split_sizes of a chunk of 8 into 2 is {getattr(splits[0], 'split_sizes', None)!r}, not "
                "[4, 4] (read from the grad_fn's _saved_self_sizes through SplitGradFn)")
    return None


def _check_hybrid_index() -> str | None:
    cls = getattr(getattr(tp, "_helpers", None), "_HybridIndex", None)
    if cls is None:
        return "torch_pruning._helpers._HybridIndex is gone"
    index = cls(3, 1)
    if (getattr(index, "idx", None), getattr(index, "root_idx", None)) != (3, 1):
        return "_HybridIndex(idx, root_idx) no longer has the fields idx and root_idx"
    return None


def _check_group_dg() -> str | None:
    group = tp.dependency.Group()
    if not hasattr(group, "_DG"):
        return "Group no longer has _DG"
    if "_DG" not in inspect.getsource(tp.dependency.Group.prune):
        return "Group.prune no longer reads _DG"
    return None


def _check_prune_parameter_and_grad() -> str | None:
    fn = getattr(function.BasePruningFunc, "_prune_parameter_and_grad", None)
    if fn is None:
        return "BasePruningFunc._prune_parameter_and_grad is gone"
    params = list(inspect.signature(fn).parameters)
    if params != ["self", "weight", "keep_idxs", "pruning_dim"]:
        return f"its signature is now {params}"
    seen: list[int] = []
    conv = nn.Conv2d(2, 4, 1)
    with recorded_parameter_slices(lambda old, new, keep, dim: seen.append(dim)):
        function.ConvPruner().prune_out_channels(conv, [1])
    if sorted(seen) != [0, 0]:
        return "ConvPruner.prune_out_channels no longer slices weight and bias through it"
    return None


def _check_autograd() -> str | None:
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    y = x.view(1, 2, 2, 2, 2).transpose(1, 2)
    if y.grad_fn.name() != "TransposeBackward0" or transposed_dims(y.grad_fn) != (1, 2):
        return "TransposeBackward0 no longer saves _saved_dim0/_saved_dim1"
    if input_shape(y.grad_fn) != [1, 2, 2, 2, 2]:
        return "grad_fn._input_metadata[0].shape no longer gives the input shape"
    view = y.grad_fn.next_functions[0][0]
    if view.name() != "ViewBackward0" or saved_sizes(view) != [1, 4, 2, 2]:
        return "ViewBackward0 no longer saves _saved_self_sym_sizes"
    z = nn.functional.channel_shuffle(x, 2)
    if z.grad_fn.name() != "ChannelShuffleBackward0" or shuffle_groups(z.grad_fn) != 2:
        return "F.channel_shuffle's grad_fn is no longer a ChannelShuffleBackward0 saving _saved_groups"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {
    "DependencyGraph._trace": _check_trace,
    "DependencyGraph._build_dependency": _check_build_dependency,
    "DependencyGraph.REGISTERED_PRUNERS": _check_registered_pruners,
    "Node fields": _check_node_fields,
    "Dependency.index_mapping": _check_index_mapping,
    "ops._SplitOp": _check_split_op,
    "_helpers._HybridIndex": _check_hybrid_index,
    "Group._DG": _check_group_dg,
    "BasePruningFunc._prune_parameter_and_grad": _check_prune_parameter_and_grad,
    "autograd saved attributes": _check_autograd,
}


def check(name: str) -> str | None:
    """``None`` if the internal ``name`` (a key of :data:`INTERNALS`) still works as used, else what changed."""
    try:
        problem = _CHECKS[name]()
    except Exception as error:  # a probe that crashes is a changed internal too
        problem = f"probing it raised {type(error).__name__}: {error}"
    if problem is None:
        return None
    return (
        f"Torch-Pruning {_installed_version()} / torch {torch.__version__} changed the internal {name!r} "
        f"({INTERNALS[name]}): {problem}. Update lightning_worm/_internals/torch_pruning.py and the "
        "torch-pruning bound in pyproject.toml."
    )


def _installed_version() -> str:
    """The installed distribution's version (torch-pruning 1.6.1's ``__version__`` still says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return str(getattr(tp, "__version__", "unknown"))
