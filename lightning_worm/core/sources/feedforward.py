"""Feed-forward neurons: one unit per intermediate neuron of every transformer feed-forward (MLP) block.

A feed-forward block is an input projection (or two, gated: gate and up) from the residual width to ``n``
neurons, an element-wise function of them, and an output (down) projection back. A neuron owns its row of
every input projection (and bias) and its column of the output projection; nothing else sees it, so it can go
without touching the rest of the model. Blocks are recognised by duck typing (the library never imports
``transformers``), as child paths of one module, tried in this order:

* ``gate_proj`` + ``up_proj`` -> ``down_proj``: gated (Llama, Mistral, Qwen2, Gemma);
* ``gate_up_proj`` -> ``down_proj``: one packed ``[gate | up]`` input (Phi-3);
* ``intermediate.dense`` -> ``output.dense`` on a layer (Hugging Face BERT, RoBERTa, ELECTRA, DeBERTa, and ViT
  before transformers 5);
  the attention's own ``output.dense`` lives inside ``attention`` and is never taken for it;
* ``lin1`` -> ``lin2`` (DistilBERT's ``ffn``), ``ffn`` -> ``ffn_output`` (ALBERT's layer);
* ``c_fc`` -> ``c_proj`` (GPT-2's ``Conv1D``, whose weight is ``in x out``: recognised by its ``nf`` attribute);
* ``dense_h_to_4h`` -> ``dense_4h_to_h`` (GPT-NeoX), ``fc1`` -> ``fc2`` (BART, OPT, CLIP, transformers 5's ViT,
  timm's ``Mlp``);
* ``wi_0`` + ``wi_1`` -> ``wo`` (T5's gated ``DenseReluDense``) and ``wi`` -> ``wo`` (T5);
* an ``nn.Sequential`` of a Linear, parameter-free element-wise modules (activations, dropout, identity) and a
  Linear, named anything (``examples/vit.py``'s ``mlp``).

A single input projection with twice as many outputs as the output projection has inputs is packed in two
halves (``[gate | up]``, as Phi-3's and timm's ``GluMlp``): neuron ``i`` owns its rows ``i`` and ``n + i``.
A user can name the blocks (``modules=[...]``) and their projections (``inputs=("fc1",), output="fc2"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_worm.core.gates import GATE
from lightning_worm.core.sharding import whole
from lightning_worm.core.sources.slimming import DEFAULT_SCORE, SlimmingScores, scaled_parameter
from lightning_worm.core.validation import check_names

__all__ = [
    "ELEMENTWISE_MODULES",
    "FEEDFORWARD_NAMES",
    "NEURON_COUNT_ATTRS",
    "FeedForwardBlock",
    "FeedForwardSource",
    "find_feedforward",
]

#: ``(input projection child paths, output projection child path)`` of the known layouts, tried in this order.
FEEDFORWARD_NAMES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("gate_up_proj",), "down_proj"),
    (("intermediate.dense",), "output.dense"),
    (("lin1",), "lin2"),
    (("ffn",), "ffn_output"),
    (("c_fc",), "c_proj"),
    (("dense_h_to_4h",), "dense_4h_to_h"),
    (("fc1",), "fc2"),
    (("wi_0", "wi_1"), "wo"),
    (("wi",), "wo"),
)
#: Integer attributes of a block module that count its neurons; a neuron prune sets them to the new count.
NEURON_COUNT_ATTRS = ("intermediate_size", "ffn_dim", "d_ff", "intermediate_dim", "mlp_dim", "hidden_features")
#: Parameter-free torch modules that act element-wise, allowed between the two Linear layers of an ``nn.Sequential``
#: (and their subclasses). A Sequential with any other module there is no block: name such blocks by hand,
#: with their projections (``inputs=("0",), output="3"``).
ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid,
    nn.Hardshrink, nn.Softshrink, nn.RReLU,
)


def _is_conv1d(module: Any) -> bool:
    """A GPT-2 style ``Conv1D``: a 2-D ``weight`` of shape ``in x out`` and an ``nf`` (out) attribute."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (isinstance(module, nn.Module) and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and isinstance(nf, int) and not isinstance(nf, bool) and weight.shape[1] == nf)


def _shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a Linear or a ``Conv1D``, else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        weight = _weight(module)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _weight(module: nn.Module) -> Tensor:
    """The ``weight`` of a projection (a Linear's or a ``Conv1D``'s)."""
    return cast(Tensor, module.weight)


def _child(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


@dataclass(eq=False)
class FeedForwardBlock:
    """One feed-forward block found in a model (the handle of :class:`FeedForwardSource`).

    Attributes:
        name: the block module's name in ``model.named_modules()``.
        module: the block module (the one that owns both projections).
        inputs: child paths of the input projection(s): one, or two for a gated block (gate, up).
        output: child path of the output (down) projection.
        num_neurons: the intermediate neurons (the output projection's input width).
        transposed: the projections are GPT-2 ``Conv1D`` layers (weight ``in x out``), not Linear ones.
        packed: row blocks per neuron in a single input projection: 1, or 2 for a packed ``[gate | up]``.
        problem: why the block cannot be tracked, or ``None``.
    """

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    output: str
    num_neurons: int
    transposed: bool = False
    packed: int = 1
    problem: str | None = None

    def path(self, child: str) -> str:
        """The model-level name of a child path of the block."""
        return f"{self.name}.{child}" if self.name else child

    def projection(self, child: str) -> nn.Module:
        """The Linear (or ``Conv1D``) at a child path of the block."""
        return self.module.get_submodule(child)

    def input_dim(self) -> int:
        """The dimension of an input projection's weight that runs over its neurons (1 for ``Conv1D``)."""
        return 1 if self.transposed else 0

    def output_dim(self) -> int:
        """The dimension of the output projection's weight that runs over the neurons (0 for ``Conv1D``)."""
        return 0 if self.transposed else 1

    def positions(self, neurons: Tensor) -> Tensor:
        """The indices, along an input projection's neuron dimension, of the given neurons (both halves when packed)."""
        return torch.cat([neurons + part * self.num_neurons for part in range(self.packed)])

    def parameters(self) -> list[tuple[str, Tensor, int, bool]]:
        """``(child path.parameter name, parameter, neuron dim, is an input)`` of every parameter a neuron owns a
        slice of: the input projections' weights and biases, the output projection's weight (its bias is not a
        neuron's)."""
        out: list[tuple[str, Tensor, int, bool]] = []
        for child in self.inputs:
            projection = self.projection(child)
            out.append((f"{child}.weight", _weight(projection), self.input_dim(), True))
            bias = getattr(projection, "bias", None)
            if isinstance(bias, nn.Parameter):
                out.append((f"{child}.bias", bias, 0, True))
        out.append((f"{self.output}.weight", _weight(self.projection(self.output)), self.output_dim(), False))
        return out


def _block(name: str, module: nn.Module, inputs: Sequence[str], output: str) -> FeedForwardBlock | str:
    """The block ``module`` is with these projections, or why it is not one (a sentence)."""
    found = {path: _child(module, path) for path in (*inputs, output)}
    missing = [path for path, child in found.items() if child is None]
    if missing:
        return f"it has no child {missing[0]!r}"
    shapes: dict[str, tuple[int, int]] = {}
    for path, child in found.items():
        shape = _shape(cast(nn.Module, child))
        if shape is None:
            return f"its child {path!r} is a {type(child).__name__}, not an nn.Linear (or a GPT-2 Conv1D)"
        shapes[path] = shape
    conv1d = {path: _is_conv1d(child) for path, child in found.items()}
    if len(set(conv1d.values())) > 1:
        return "its projections mix nn.Linear and Conv1D layers"
    neurons = shapes[output][0]
    in_widths = {shapes[path][0] for path in inputs}
    out_widths = {shapes[path][1] for path in inputs}
    if len(in_widths) != 1 or len(out_widths) != 1:
        return f"its input projections {list(inputs)} differ in shape"
    rows = out_widths.pop()
    packed = rows // neurons if neurons and rows % neurons == 0 else 0
    if packed not in ((1,) if len(inputs) > 1 else (1, 2)):
        return (f"its input projection(s) {list(inputs)} have {rows} outputs, which do not fit the {neurons} inputs of "
                f"{output!r}")
    return FeedForwardBlock(name, module, tuple(inputs), output, neurons, transposed=conv1d[output], packed=packed)


def _sequential(name: str, module: nn.Module) -> FeedForwardBlock | None:
    """``Sequential(Linear, element-wise modules..., Linear)`` as a block, else ``None``."""
    if not isinstance(module, nn.Sequential) or len(module) < 2:
        return None
    children = list(module.named_children())
    (first, head), (last, tail) = children[0], children[-1]
    if not (isinstance(head, nn.Linear) and isinstance(tail, nn.Linear)):
        return None
    middle = [m for _, m in children[1:-1]]
    if not all(isinstance(m, ELEMENTWISE_MODULES) and next(m.parameters(), None) is None for m in middle):
        return None
    block = _block(name, module, (first,), last)
    return block if isinstance(block, FeedForwardBlock) and block.packed == 1 else None


def _neuron_parameters(block: FeedForwardBlock) -> str | None:
    """A parameter of the neurons' width outside the projections (a normalisation between them), as a problem."""
    owned = {id(p) for child in (*block.inputs, block.output) for p in block.projection(child).parameters()}
    width = _shape(block.projection(block.output))
    assert width is not None, "a block's output projection is a Linear or a Conv1D"
    if block.num_neurons == width[1]:  # as wide as the residual stream: such a parameter says nothing
        return None
    for pname, param in block.module.named_parameters():
        if pname.rpartition(".")[2] == GATE:  # a unit gate of slimming scores multiplies, it is not cut
            continue
        if id(param) not in owned and param.dim() == 1 and param.shape[0] in (block.num_neurons,
                                                                              block.num_neurons * block.packed):
            return (f"{pname!r} has the neurons' width ({param.shape[0]}) but is no projection's: a normalisation "
                    "between the projections (timm's `norm_layer`) would not be cut")
    return None


def _recognise(
    name: str, module: nn.Module, inputs: Sequence[str] | None, output: str | None
) -> FeedForwardBlock | None:
    """The block ``module`` is, or ``None`` if it is no feed-forward block this source knows."""
    layouts = [(tuple(inputs), output)] if inputs is not None and output is not None else list(FEEDFORWARD_NAMES)
    children = dict(module.named_children())
    for names, out in layouts:
        if names[0].split(".")[0] not in children:  # cheap first: most modules have none of these children
            continue
        block = _block(name, module, names, out)
        if isinstance(block, FeedForwardBlock):
            block.problem = _neuron_parameters(block)
            return block
    if inputs is None:
        return _sequential(name, module)
    return None


def find_feedforward(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    inputs: Sequence[str] | None = None,
    output: str | None = None,
) -> dict[str, FeedForwardBlock]:
    """The feed-forward blocks of ``model`` by module name, in ``named_modules()`` order.

    A Linear is part of one block at most: the first one (in model order) that claims it.

    Args:
        model: any model.
        modules: names of the block modules to use instead of finding them.
        inputs: child paths of the input projection(s) (one, or two: gate and up), for blocks this source does
            not recognise; with ``output``.
        output: child path of the output projection; with ``inputs``.

    Raises:
        ValueError: if a named module does not exist or is not recognised as a feed-forward block (the message
            says why), or only one of ``inputs`` and ``output`` is given.

    Example::

        blocks = find_feedforward(bert)  # {"bert.encoder.layer.0": FeedForwardBlock(...), ...}
    """
    if (inputs is None) != (output is None):
        raise ValueError("Name the input projection(s) and the output projection together: "
                         "`inputs=(\"fc1\",), output=\"fc2\"` (or neither).")
    if inputs is not None and len(inputs) not in (1, 2):
        raise ValueError(f"`inputs` names one input projection, or two (gate, up), got {list(inputs)!r}.")
    named = dict(model.named_modules())
    found: dict[str, FeedForwardBlock] = {}
    if modules is not None:
        missing = [n for n in modules if n not in named]
        if missing:
            raise ValueError(f"`modules` names modules the model lacks: {missing}. Use names as "
                             "`model.named_modules()` gives them.")
        for name in modules:
            module = named[name]
            if inputs is not None and output is not None:
                block: FeedForwardBlock | str | None = _block(name, module, inputs, output)
            else:
                block = _recognise(name, module, None, None)
            if not isinstance(block, FeedForwardBlock):
                why = f": {block}" if isinstance(block, str) else ""
                known = "; ".join(f"{'+'.join(i)} -> {o}" for i, o in FEEDFORWARD_NAMES)
                raise ValueError(
                    f"{name!r} ({type(module).__name__}) is not a feed-forward block this source knows{why}. Known "
                    f"child layouts: {known}, or Sequential(Linear, activation..., Linear). Pass "
                    "`inputs=(input projection path(s),), output=output projection path`."
                )
            if block.problem is None:
                block.problem = _neuron_parameters(block)
            found[name] = block
        return found
    claimed: set[int] = set()
    for name, module in named.items():
        block = _recognise(name, module, inputs, output)
        if block is None:
            continue
        own = {id(block.projection(child)) for child in (*block.inputs, block.output)}
        if own & claimed:
            continue
        claimed |= own
        found[name] = block
    return found


class FeedForwardSource(SlimmingScores):
    r"""Feed-forward neurons: one unit per intermediate neuron of every feed-forward (MLP) block.

    A neuron's score is the **mean absolute weight of its rows of the input projection(s) and its column of
    the output projection** (biases excluded): comparable across blocks of different widths. Under FSDP2 only
    one sum per row and per column is gathered, never a weight. The mask of a block is
    ``BoolTensor[num_neurons]``, named by the block module (``"bert.encoder.layer.0"``, ``"blocks.0.mlp"``).

    WORM multiplies the gradients of a masked-out neuron's rows of the input projection weights and biases, and
    of its column of the output projection weight, by chi (transposed for GPT-2's ``Conv1D``); the output
    projection's bias and everything else are untouched. The sparsity term regularises the input projections'
    weights (a packed ``[gate | up]`` weight too: all its rows belong to neurons, unlike a packed ``qkv``'s value
    rows), not the output projection.

    Its surgery (:func:`~lightning_worm.core.surgery.prune_neurons`) removes the pruned neurons physically (their
    input rows and biases and output columns), updates the neuron count attributes (``intermediate_size``,
    ``Conv1D.nf``, ...), and returns a report whose plan (``kind="neurons"``) replays on a fresh model. A block
    always keeps its best neuron.

    Args:
        modules: names of the block modules to track instead of finding them.
        inputs: child paths of the input projection(s) of the named blocks (one, or two: gate and up).
        output: child path of their output projection.
        prune_ratio: this source's own ratio when a tracker follows several sources (``None``: the tracker's).
        scope: ``"global"`` (one ranking over the neurons of every block: EarlyBERT's rule) or ``"layer"`` (every
            block loses the same fraction).
        score: ``"magnitude"`` (default): the mean ``|W|`` above; ``"slimming"``: EarlyBERT's slimming coefficients,
            one learnable gate per neuron (initialised to 1) on its input to the output projection, scored by its
            magnitude and regularised by the sparsity term, folded into the output projection's columns at the prune
            (:class:`~lightning_worm.core.sources.slimming.SlimmingScores`).

    Raises:
        ValueError: on malformed names, only one of ``inputs`` and ``output``, or a bad ratio or scope.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.4, window=3, threshold=0.1, source=FeedForwardSource())
        early_bird.mask  # {"blocks.0.mlp": tensor([True, False, ...]), ...}
        FeedForwardSource(modules=["encoder.0.ff"], inputs=("w1",), output="w2")  # a layout of your own
    """

    key = "ffn_neurons"
    description = "feed-forward neurons scored by the mean |W| of their input rows and output column"

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        inputs: Sequence[str] | None = None,
        output: str | None = None,
        *,
        prune_ratio: float | None = None,
        scope: Literal["global", "layer"] = "global",
        score: Literal["auto", "slimming", "magnitude"] = "auto",
    ) -> None:
        super().__init__(prune_ratio=prune_ratio, scope=scope)
        self._set_score(score)
        if self.score == "slimming":
            self.description = "feed-forward neurons scored by learnable slimming gates"
        elif self.score == "auto":
            self.description = ("feed-forward neurons scored by learnable slimming gates "
                                "(the mean |W| of their input rows and output column where the model has none)")
        self.modules = check_names("modules", modules)
        names = check_names("inputs", inputs, count=(1, 2))
        self.inputs = None if names is None else tuple(names)
        if output is not None and not isinstance(output, str):
            raise ValueError(f"`output` must be None or a child path (string), got {output!r}.")
        if (self.inputs is None) != (output is None):
            raise ValueError("Pass `inputs=` and `output=` together (the input and output projections' child paths), "
                             "or neither.")
        self.output = output

    def blocks(self, model: nn.Module) -> dict[str, FeedForwardBlock]:
        return find_feedforward(model, self.modules, self.inputs, self.output)

    def options(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable: ``type(source)(**source.options())`` is an equal source.

        A pruning plan records them, so that its replay (``load_pruned``, resuming) finds the same blocks.
        """
        return {"modules": self.modules, "inputs": None if self.inputs is None else list(self.inputs),
                "output": self.output, **self.ranking()}

    def ranking(self) -> dict[str, Any]:
        return {**super().ranking(), **({"score": self.score} if self.score != DEFAULT_SCORE else {})}

    def gate_owner(self, block: FeedForwardBlock) -> nn.Module:
        return block.module

    def gate_site(self, block: FeedForwardBlock) -> tuple[nn.Module, int, Tensor, str]:
        return block.projection(block.output), block.num_neurons, torch.arange(block.num_neurons), "input"

    def fold_gate(self, block: FeedForwardBlock, gate: Tensor) -> None:
        output = block.projection(block.output)
        output.weight = scaled_parameter(_weight(output), block.output_dim(), slice(None), gate)

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in (("modules", self.modules), ("inputs", self.inputs),
                                          ("output", self.output), *self.ranking().items()) if v is not None]
        return f"{type(self).__name__}({', '.join(args)})"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, FeedForwardBlock]]:
        yield from self.blocks(model).items()

    def skip_reason(self, block: FeedForwardBlock) -> str | None:
        if block.problem is not None:
            return block.problem
        for child in (*block.inputs, block.output):
            projection = block.projection(child)
            if torch.nn.utils.parametrize.is_parametrized(projection):
                return f"{child!r} is parametrised (e.g. pruned element-wise): its weight cannot be cut"
            if not _weight(projection).requires_grad:
                return "weight frozen (requires_grad=False)"
        return None

    def scores(self, block: FeedForwardBlock) -> Tensor:
        if self.gated(block):
            return self.gate_scores(block)
        total: Tensor | None = None
        size = 0
        for _, param, dim, is_input in block.parameters():
            if param.dim() != 2:  # a bias: not scored
                continue
            # Each row's (column's) sum first, over the whole parameter: sharded by rows (FSDP2), a row sum stays on
            # its shard and a column sum is reduced; either way one value per neuron row is gathered, not the weight.
            sums = whole(param.detach().abs().to(torch.promote_types(param.dtype, torch.float32)).sum(dim=1 - dim))
            per_neuron = sums.reshape(block.packed if is_input else 1, block.num_neurons).sum(dim=0)
            total = per_neuron if total is None else total + per_neuron
            size += (block.packed if is_input else 1) * param.shape[1 - dim]
        assert total is not None, "every block has an output projection weight"
        return total / size

    def count(self, block: FeedForwardBlock) -> int:
        return block.num_neurons

    def gradient_factors(self, block: FeedForwardBlock, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        if keep.numel() != block.num_neurons:
            raise ValueError(f"A mask of {keep.numel()} neurons does not fit {block.name!r} with "
                             f"{block.num_neurons}.")
        factors: dict[int, tuple[Tensor, Tensor]] = {}
        for _, param, dim, is_input in block.parameters():
            if not param.requires_grad:
                continue
            per_neuron = torch.where(keep.reshape(-1).to(param.device), 1.0, chi).to(param.dtype)
            factor = per_neuron.repeat(block.packed) if is_input else per_neuron
            shape = [1] * param.dim()
            shape[dim] = factor.numel()
            factor = factor.view(shape)
            if id(param) in factors:  # one parameter in two roles (shared by hand): both factors
                factor = factors[id(param)][1] * factor
            factors[id(param)] = (param, factor)
        return list(factors.values()) + self.gate_factor(block, keep, chi)

    def sparsity_parameters(self, block: FeedForwardBlock) -> list[Tensor]:
        if self.gated(block):
            return [self.gate(block)]
        weights = {id(p): p for _, p, _, is_input in block.parameters() if is_input and p.dim() == 2}
        return [p for p in weights.values() if p.requires_grad]
