"""Every Torch-Pruning internal lightning-worm uses still works as used (lightning_worm/_internals/torch_pruning.py).

Each internal listed in ``INTERNALS`` has a probe here that exercises it the way the library does. A failure
names the internal that changed in the installed release; the upper bound of ``torch-pruning`` in
``pyproject.toml`` moves once these pass on a new release.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning import ops
from torch_pruning.pruner import function

from lightning_worm._internals import torch_pruning as tpi


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


class _Probe(tpi.HookedDependencyGraph):
    def __init__(self) -> None:
        super().__init__()
        self.traced: dict | None = None
        self.built = False

    def after_trace(self, module2node: dict) -> None:
        self.traced = module2node
        for node in module2node.values():
            if node.type == ops.OPTYPE.SPLIT:
                tpi.set_node_grad_fn(node, tpi.SplitGradFn(node.grad_fn))

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
    with tpi.recorded_parameter_slices(lambda old, new, keep, dim: seen.append(dim)):
        function.ConvPruner().prune_out_channels(conv, [1])
    if sorted(seen) != [0, 0]:
        return "ConvPruner.prune_out_channels no longer slices weight and bias through it"
    return None


def _check_autograd() -> str | None:
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    y = x.view(1, 2, 2, 2, 2).transpose(1, 2)
    if y.grad_fn.name() != "TransposeBackward0" or tpi.transposed_dims(y.grad_fn) != (1, 2):
        return "TransposeBackward0 no longer saves _saved_dim0/_saved_dim1"
    if tpi.input_shape(y.grad_fn) != [1, 2, 2, 2, 2]:
        return "grad_fn._input_metadata[0].shape no longer gives the input shape"
    view = y.grad_fn.next_functions[0][0]
    if view.name() != "ViewBackward0" or tpi.saved_sizes(view) != [1, 4, 2, 2]:
        return "ViewBackward0 no longer saves _saved_self_sym_sizes"
    z = nn.functional.channel_shuffle(x, 2)
    if z.grad_fn.name() != "ChannelShuffleBackward0" or tpi.shuffle_groups(z.grad_fn) != 2:
        return "F.channel_shuffle's grad_fn is no longer a ChannelShuffleBackward0 saving _saved_groups"
    last = torch.cat([x, x], -1).grad_fn
    if tpi.saved_dim(last) != 3 or tpi.SplitGradFn(last)._saved_dim != 3:
        return "CatBackward0._saved_dim of dim=-1 no longer reads as 3 through saved_dim"
    if tpi.saved_dim(x[..., :1].grad_fn) != 3 or tpi.saved_dim(x.chunk(2, dim=-1)[0].grad_fn) != 3:
        return "Slice/SplitBackward0._saved_dim of dim=-1 no longer reads as 3 through saved_dim"
    return None


class _PartialResidual(nn.Module):
    """ReXNet's partial residual: ``cat([x[:, :c] + shortcut, x[:, c:]], 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.stem(x)
        x = self.conv(shortcut)
        return self.head(torch.cat([x[:, 0:4] + shortcut, x[:, 4:]], dim=1))


def _partial_residual_graph() -> tp.DependencyGraph:
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(_PartialResidual().eval(), torch.zeros(1, 3, 2, 2))


def _check_concat_sizes() -> str | None:
    graph = _partial_residual_graph()
    cats = [(m, n) for m, n in graph.module2node.items() if isinstance(m, ops._ConcatOp)]
    if len(cats) != 1 or not hasattr(cats[0][0], "concat_sizes"):
        return "a torch.cat is no longer traced as an ops._ConcatOp with concat_sizes"
    module, node = cats[0]
    sizes = tpi.concat_sizes(node.grad_fn)
    if sizes != [4, 2]:
        return f"the sizes of cat([4 channels, 2 channels]) read from autograd are {sizes!r}"
    tpi.set_concat_sizes(module, sizes)
    graph.get_pruning_group(graph.model.conv, function.prune_conv_out_channels, [5])  # updates the index mappings
    if getattr(module, "offsets", None) != [0, 4, 6]:
        offsets = getattr(module, "offsets", None)
        return f"Torch-Pruning no longer takes the concat_sizes it is given (offsets {offsets})"
    return None


def _check_slice_op() -> str | None:
    graph = _partial_residual_graph()
    slices = sorted((m.start, m.end, m.step) for m in graph.module2node if isinstance(m, ops._SliceOp))
    if slices != [(0, 4, 1), (4, 9223372036854775807, 1)]:
        return f"x[:, 0:4] and x[:, 4:] are no longer traced as ops._SliceOp with start/end/step ({slices})"
    partial = [tpi.is_partial_channel_slice(m, n.grad_fn) for m, n in graph.module2node.items()
               if isinstance(m, ops._SliceOp)]
    if partial != [True, True]:
        return "a partial channel slice is not recognised"
    return None


def _check_traceback_node() -> str | None:
    from torch_pruning.dependency import index_mapping

    if "node" not in index_mapping.update_index_mapping.__code__.co_varnames:
        return "update_index_mapping no longer holds the node it updates as `node`"
    node = tp.dependency.Node(nn.Identity(), None, "probe")
    try:
        (lambda node: 1 + None)(node)  # type: ignore[operator]
    except TypeError as error:
        if tpi.failing_node(error) is not node:
            return "a traceback frame's local `node` is no longer found"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {
    "DependencyGraph._trace": _check_trace,
    "DependencyGraph._build_dependency": _check_build_dependency,
    "DependencyGraph.REGISTERED_PRUNERS": _check_registered_pruners,
    "Node fields": _check_node_fields,
    "Dependency.index_mapping": _check_index_mapping,
    "ops._SliceOp": _check_slice_op,
    "ops._SplitOp": _check_split_op,
    "ops._ConcatOp.concat_sizes": _check_concat_sizes,
    "_helpers._HybridIndex": _check_hybrid_index,
    "Group._DG": _check_group_dg,
    "BasePruningFunc._prune_parameter_and_grad": _check_prune_parameter_and_grad,
    "traceback local node": _check_traceback_node,
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
        f"({tpi.INTERNALS[name]}): {problem}. Update lightning_worm/_internals/torch_pruning.py and the "
        "torch-pruning bound in pyproject.toml."
    )


def _installed_version() -> str:
    """The installed distribution's version (torch-pruning 1.6.1's ``__version__`` still says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return str(getattr(tp, "__version__", "unknown"))


@pytest.mark.parametrize("name", list(tpi.INTERNALS))
def test_internal_still_works_as_used(name):
    problem = check(name)
    assert problem is None, problem


def test_every_internal_has_a_check():
    assert set(tpi.INTERNALS) == set(_CHECKS)


def test_a_changed_internal_is_reported_by_name(monkeypatch):
    monkeypatch.delattr(tp._helpers, "_HybridIndex")
    problem = check("_helpers._HybridIndex")
    assert "changed the internal '_helpers._HybridIndex'" in problem and "_HybridIndex is gone" in problem
    assert "Torch-Pruning" in problem and "pyproject.toml" in problem


def test_a_probe_that_crashes_is_reported_too(monkeypatch):
    def broken(self, model, example_inputs, forward_fn, output_transform):
        raise KeyError("module2node")

    monkeypatch.setattr(tp.DependencyGraph, "_trace", broken)
    problem = check("DependencyGraph._trace")
    assert "changed the internal 'DependencyGraph._trace'" in problem and "KeyError" in problem
