"""Self-attention sources: element-wise query/key weights (the WORM paper's) and whole heads.

Attention blocks are recognised by duck typing (the library never imports ``transformers``):

* separate projections, as child ``nn.Linear`` layers named ``query``/``key``/``value`` (Hugging Face
  BERT, RoBERTa, ViT), ``q_proj``/``k_proj``/``v_proj`` (Llama, Gemma, Mistral, OPT, BART, Swin),
  ``query_proj``/``key_proj``/``value_proj`` (DeBERTa-v2/v3), ``q_lin``/``k_lin``/``v_lin`` (DistilBERT) or
  ``q``/``k``/``v`` (T5);
* one packed projection named ``qkv`` (timm's ``Attention``), ``qkv_proj`` (Phi-3), ``c_attn`` (GPT-2,
  GPT-BigCode) or ``query_key_value`` (GPT-NeoX), laid out ``"qkv"``, ``[all queries | all keys | all
  values]`` (with fewer key/value rows under grouped-query attention), or ``"per_head"``, ``[q | k | v]`` of
  one key/value head after another (GPT-NeoX's ``query_key_value``; GPT-BigCode's ``c_attn`` without
  multi-query attention). A ``query_key_value`` projection, or a module whose ``multi_query`` is ``False``, is
  taken as ``"per_head"``, any other as ``"qkv"``; the source's ``layout=`` overrides it;
* ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when its key and
  value dimensions differ).

A projection is an ``nn.Linear`` (``weight`` is out x in) or a GPT-2 ``Conv1D``, recognised by its ``nf``
attribute (the output size) and a 2-D ``weight`` that is in x out: its output features are the weight's
columns.

A user can name the attention modules instead (``modules=[...]``), the projections
(``projections=("wq", "wk", "wv")``) and the packing (``layout="per_head"``). The head count is read from the
module (``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head``), else derived from a head size
attribute (``head_dim``, ``attention_head_size``, ``head_size``), else from its ``config``; grouped-query
attention (fewer key/value heads) is read the same way (``num_key_value_heads``, ``num_kv_heads``,
``kv_heads``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from lightning_worm._internals.torch import mha_packs_qkv
from lightning_worm.core.sharding import whole
from lightning_worm.core.sources.base import ScoreSource
from lightning_worm.core.sources.slimming import DEFAULT_SCORE, SlimmingScores, scaled_parameter
from lightning_worm.core.validation import check_int, check_names

__all__ = [
    "HEAD_COUNT_ATTRS",
    "HEAD_SIZE_ATTRS",
    "KV_HEAD_COUNT_ATTRS",
    "LAYOUTS",
    "OUTPUT_NAMES",
    "PACKED_NAMES",
    "PARTS",
    "PROJECTION_NAMES",
    "PRUNED_HEADS_ATTR",
    "AttentionBlock",
    "AttentionHeadSource",
    "AttentionQKSource",
    "QKEntry",
    "find_attention",
    "is_conv1d",
]

#: Child names of separate query/key/value projections, tried in this order.
PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("query_proj", "key_proj", "value_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
#: Child names of a packed query/key/value projection.
PACKED_NAMES: tuple[str, ...] = ("qkv", "qkv_proj", "c_attn", "query_key_value")
#: Packed child names laid out ``"per_head"`` unless told otherwise (GPT-NeoX, Bloom).
PER_HEAD_NAMES: tuple[str, ...] = ("query_key_value",)
#: How a packed projection orders its output features: ``"qkv"`` (``[all q | all k | all v]``) or ``"per_head"``
#: (``[q | k | v]`` of each key/value head in turn; with grouped queries, the group's queries first).
LAYOUTS: tuple[str, ...] = ("qkv", "per_head")
#: Child names of an attention module's own output projection (else the dependency graph finds it).
OUTPUT_NAMES: tuple[str, ...] = ("o_proj", "out_proj", "proj", "o", "out_lin", "dense", "c_proj")

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "d_head", "dim_head", "head_size")
PARTS = ("q", "k", "v")
#: Attribute that a head prune sets on the attention module: ``(num_heads, num_kv_heads)`` after the cut. It
#: outranks a source's ``num_heads=``, which counts the heads of the unpruned module.
PRUNED_HEADS_ATTR = "_lightning_worm_heads"


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is a GPT-2 style ``Conv1D``: an ``nf`` attribute (its output size) and a 2-D ``weight``
    that is in x out. Recognised by duck typing (``transformers`` is never imported)."""
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    return (isinstance(module, nn.Module) and not isinstance(module, nn.Linear) and isinstance(weight, Tensor)
            and weight.dim() == 2 and isinstance(nf, int) and weight.shape[1] == nf)


def _is_projection(module: object) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _out_dim(projection: nn.Module) -> int:
    """The weight dim of the output features: 0 for ``nn.Linear``, 1 for ``Conv1D``."""
    return 1 if is_conv1d(projection) else 0


def _out_features(projection: nn.Module) -> int:
    return int(cast(Tensor, projection.weight).shape[_out_dim(projection)])


def _index(out_dim: int, index: slice | Tensor) -> slice | Tensor | tuple[slice, slice | Tensor]:
    """Index of a weight's entries of the output features ``index``."""
    whole_weight = isinstance(index, slice) and index == slice(None)
    return index if out_dim == 0 or whole_weight else (slice(None), index)


@dataclass(eq=False)
class AttentionBlock:
    """One self-attention block found in a model (the handle of :class:`AttentionHeadSource`).

    Attributes:
        name: the attention module's name in ``model.named_modules()``.
        module: the attention module.
        layout: ``"separate"`` (three projections), ``"packed"`` (one ``qkv`` projection) or ``"mha"``
            (``nn.MultiheadAttention``).
        projections: child names of the query, key and value projections (``"separate"``), or of the
            packed one (``"packed"``, one name). A projection is an ``nn.Linear`` or a ``Conv1D``.
        num_heads: query heads, or ``None`` if unknown.
        num_kv_heads: key/value heads (fewer under grouped-query attention).
        head_dim: size of one head.
        problem: why the block cannot be tracked, or ``None``.
        packing: how a packed projection orders its output features, one of :data:`LAYOUTS` (``"qkv"`` for the
            other layouts).
    """

    name: str
    module: nn.Module
    layout: str
    projections: tuple[str, ...]
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    problem: str | None = None
    packing: str = "qkv"

    # ----------------------------------------------------------------- where each part's rows live

    def out_index(self, part: str) -> slice | Tensor:
        """The output features of ``"q"``, ``"k"`` or ``"v"`` in their projection (a slice, or indices in the
        order of the units for a ``"per_head"`` packing)."""
        i = PARTS.index(part)
        if self.layout == "separate":
            return slice(None)
        if self.layout == "packed":
            q_size, kv_size = self._packed_sizes()
            if self.packing == "per_head":
                _, num_kv_heads, head_dim = self._counts()
                group = q_size // num_kv_heads  # the queries of one key/value head
                start = (0, group, group + head_dim)[i]
                size = group if part == "q" else head_dim
                unit = torch.arange(num_kv_heads).unsqueeze(1) * (group + 2 * head_dim)
                return (unit + start + torch.arange(size)).reshape(-1)
            starts = (0, q_size, q_size + kv_size)
            return slice(starts[i], starts[i] + (q_size if part == "q" else kv_size))
        mha = cast(nn.MultiheadAttention, self.module)  # the "mha" layout is found by this type
        if mha_packs_qkv(mha):
            return slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
        return slice(None)

    def out_dim(self, part: str) -> int:
        """The weight dim of the part's output features: 0 (``nn.Linear``), 1 (``Conv1D``, weight in x out)."""
        return 0 if self.layout == "mha" else _out_dim(self.linear(part))

    def part(self, part: str) -> tuple[nn.Parameter, Any, nn.Parameter | None, Any, str]:
        """``(weight, weight index, bias, bias index, entry name)`` of ``"q"``, ``"k"`` or ``"v"``.

        ``weight[index]`` is the part's weight as the parameter stores it (out x in; in x out for a ``Conv1D``),
        ``bias[bias index]`` its bias.
        """
        i = PARTS.index(part)
        prefix = f"{self.name}." if self.name else ""
        out = self.out_index(part)
        if self.layout in ("separate", "packed"):
            projection = self.linear(part)
            entry = prefix + self.projections[i] if self.layout == "separate" else (
                f"{prefix}{self.projections[0]}:{part}")
            return (cast(nn.Parameter, projection.weight), _index(_out_dim(projection), out),
                    cast("nn.Parameter | None", getattr(projection, "bias", None)), out, entry)
        mha = cast(nn.MultiheadAttention, self.module)
        rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
        if mha_packs_qkv(mha):
            return mha.in_proj_weight, rows, mha.in_proj_bias, rows, f"{self.name}:{part}"
        return getattr(mha, f"{part}_proj_weight"), slice(None), mha.in_proj_bias, rows, f"{self.name}:{part}"

    def weight(self, part: str) -> Tensor:
        """The part's weight entries (``out x in``; ``in x out`` for a ``Conv1D``), detached."""
        weight, index, _, _, _ = self.part(part)
        return weight.detach()[index]

    def linear(self, part: str) -> nn.Module:
        """The projection (``nn.Linear`` or ``Conv1D``) holding the part (separate and packed layouts)."""
        index = PARTS.index(part) if self.layout == "separate" else 0
        return getattr(self.module, self.projections[index])

    def features(self, part: str) -> int:
        """The part's output features (rows of an ``nn.Linear``, columns of a ``Conv1D``)."""
        return int(self.weight(part).shape[self.out_dim(part)])

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        num_heads, num_kv_heads, _ = self._counts()
        return num_heads // num_kv_heads

    def _counts(self) -> tuple[int, int, int]:
        """``(num_heads, num_kv_heads, head_dim)``, known for every tracked block (``problem`` is ``None``)."""
        assert self.num_heads is not None and self.num_kv_heads is not None and self.head_dim is not None, (
            f"the heads of {self.name!r} are not known: {self.problem}"
        )
        return self.num_heads, self.num_kv_heads, self.head_dim

    def _packed_sizes(self) -> tuple[int, int]:
        """Output features of the queries and of the keys (as many as the values) of a packed projection; equal
        thirds while the heads are not known."""
        if self.num_heads is not None and self.num_kv_heads is not None and self.head_dim is not None:
            return self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        third = _out_features(self.linear("q")) // 3
        return third, third


def _int_attr(objects: Sequence[Any], names: Sequence[str]) -> int | None:
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _read_heads(block: AttentionBlock, num_heads: int | None) -> AttentionBlock:
    """Fill head count, key/value head count and head size from the module (or its config)."""
    module = block.module
    if block.layout == "mha":
        mha = cast(nn.MultiheadAttention, module)
        block.num_heads = block.num_kv_heads = mha.num_heads
        block.head_dim = mha.head_dim
        return block
    config = getattr(module, "config", None)
    pruned = getattr(module, PRUNED_HEADS_ATTR, None)
    pruned_counts = pruned if isinstance(pruned, tuple) and len(pruned) == 2 else None
    if pruned_counts is not None:  # cut by a head prune: the counts it left
        num_heads = pruned_counts[0]
    # The module's own attributes first: a config is shared by every layer and says nothing of a pruned one.
    heads = num_heads or _int_attr([module], HEAD_COUNT_ATTRS)
    head_dim = _int_attr([module], HEAD_SIZE_ATTRS)
    if block.layout == "packed":
        kv_heads = pruned_counts[1] if pruned_counts is not None else _int_attr([module, config], KV_HEAD_COUNT_ATTRS)
        return _read_packed(block, heads, kv_heads, head_dim, config)
    q_rows, k_rows, v_rows = (block.features(p) for p in PARTS)
    if heads is None and head_dim is not None and q_rows % head_dim == 0:
        heads = q_rows // head_dim
    if heads is None:
        heads = _int_attr([config], HEAD_COUNT_ATTRS)
    if heads is None:
        block.problem = "head count not found: pass `num_heads=` to the source"
        return block
    if q_rows % heads:
        block.problem = f"{q_rows} query rows do not split into {heads} heads"
        return block
    head_dim = q_rows // heads
    kv_heads = _int_attr([module, config], KV_HEAD_COUNT_ATTRS)
    if kv_heads is None or kv_heads * head_dim != k_rows:
        kv_heads = k_rows // head_dim if k_rows % head_dim == 0 else None
    if kv_heads is None or heads % kv_heads or v_rows != k_rows:
        block.problem = f"key/value rows ({k_rows}, {v_rows}) do not fit {heads} heads of size {head_dim}"
        return block
    block.num_heads, block.num_kv_heads, block.head_dim = heads, kv_heads, head_dim
    return block


def _read_packed(
    block: AttentionBlock, heads: int | None, kv_heads: int | None, head_dim: int | None, config: Any
) -> AttentionBlock:
    """The counts of a packed projection of ``(heads + 2 kv_heads) * head_dim`` output features."""
    total = _out_features(block.linear("q"))
    if heads is None and head_dim is not None and total % head_dim == 0:
        per_head = total // head_dim  # heads + 2 * kv_heads
        if kv_heads is not None and per_head > 2 * kv_heads:
            heads = per_head - 2 * kv_heads
        elif per_head % 3 == 0:
            heads = per_head // 3
    if heads is None:
        heads = _int_attr([config], HEAD_COUNT_ATTRS)
    if heads is None:
        block.problem = "head count not found: pass `num_heads=` to the source"
        return block
    if kv_heads is None or heads % kv_heads or total % (heads + 2 * kv_heads):
        kv_heads = heads  # no grouping said (or a stale config's): as many keys as queries
    if total % (heads + 2 * kv_heads):
        block.problem = f"{total} packed rows do not split into {heads} query heads and {kv_heads} key/value heads"
        return block
    size = total // (heads + 2 * kv_heads)
    if head_dim is not None and head_dim != size:
        block.problem = (f"{total} packed rows do not split into {heads} query and {kv_heads} key/value heads of "
                         f"size {head_dim}")
        return block
    block.num_heads, block.num_kv_heads, block.head_dim = heads, kv_heads, size
    return block


def _packing(module: nn.Module, packed: str, layout: str | None) -> str:
    """The packing of ``module``'s packed projection ``packed``: ``layout`` if given, else recognised."""
    if layout is not None:
        return layout
    multi_query = getattr(module, "multi_query", None)
    if isinstance(multi_query, bool):  # GPT-BigCode: [q | k | v] with one key/value head, else per head
        return "qkv" if multi_query else "per_head"
    return "per_head" if packed in PER_HEAD_NAMES else "qkv"


def _recognise(
    name: str, module: nn.Module, projections: Sequence[str] | None = None, layout: str | None = None
) -> AttentionBlock | None:
    """The block ``module`` is, or ``None`` if it is no self-attention module this source knows."""
    if isinstance(module, nn.MultiheadAttention):
        return AttentionBlock(name, module, "mha", ())
    children = dict(module.named_children())
    candidates = [tuple(projections)] if projections else list(PROJECTION_NAMES)
    for names in candidates:
        if len(names) == 3 and all(_is_projection(children.get(n)) for n in names):
            return AttentionBlock(name, module, "separate", tuple(names))
        if len(names) == 1 and _is_projection(children.get(names[0])):
            return AttentionBlock(name, module, "packed", tuple(names), packing=_packing(module, names[0], layout))
    if projections is None and getattr(module, "is_cross_attention", None) is not True:  # GPT-2's packs [k | v]
        for packed in PACKED_NAMES:
            if _is_projection(children.get(packed)):
                return AttentionBlock(name, module, "packed", (packed,), packing=_packing(module, packed, layout))
    return None


def find_attention(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    projections: Sequence[str] | None = None,
    num_heads: int | None = None,
    layout: str | None = None,
) -> dict[str, AttentionBlock]:
    """The self-attention blocks of ``model`` by module name, in ``named_modules()`` order.

    Args:
        model: any model.
        modules: names of the attention modules to use instead of finding them.
        projections: child names of the query, key and value projections (three names), or of one packed
            projection (one name), for modules this source does not recognise.
        num_heads: the head count, for modules that do not say it.
        layout: the packing of packed projections (``"qkv"`` or ``"per_head"``), instead of recognising it.

    Raises:
        ValueError: if a named module does not exist or is not recognised as self-attention.

    Example::

        blocks = find_attention(bert)  # {"bert.encoder.layer.0.attention.self": AttentionBlock(...), ...}
    """
    if projections is not None and len(projections) not in (1, 3):
        raise ValueError(f"`projections` names the query, key and value Linear layers (3 names) or one packed "
                         f"qkv Linear (1 name), got {list(projections)!r}.")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS} (or None to recognise it), got {layout!r}.")
    named = dict(model.named_modules())
    if modules is not None:
        missing = [n for n in modules if n not in named]
        if missing:
            raise ValueError(f"`modules` names modules the model lacks: {missing}. Use names as "
                             "`model.named_modules()` gives them.")
        found = {}
        for name in modules:
            block = _recognise(name, named[name], projections, layout)
            if block is None:
                raise ValueError(_unrecognised(name, named[name], projections))
            found[name] = block
    else:
        found = {}
        for name, module in named.items():
            block = _recognise(name, module, projections, layout)
            if block is not None:
                found[name] = block
    return {name: _read_heads(block, num_heads) for name, block in found.items()}


def _unrecognised(name: str, module: nn.Module, projections: Sequence[str] | None) -> str:
    """Why the named module ``name`` is no attention block, and what to pass."""
    what = f"{name!r} ({type(module).__name__})"
    children = dict(module.named_children())
    if projections:
        wrong = {p: type(children[p]).__name__ if p in children else "missing" for p in projections
                 if not _is_projection(children.get(p))}
        return (f"{what}: the projections {list(projections)!r} must be children that are nn.Linear layers or "
                f"Conv1D (an `nf` attribute and a 2-D in x out weight); these are not: {wrong}. Its children are "
                f"{list(children)!r}.")
    return (f"{what} has no query/key/value projection children this source knows "
            f"({', '.join('/'.join(p) for p in PROJECTION_NAMES)}, or a packed {'/'.join(PACKED_NAMES)}): pass "
            "`projections=(query, key, value child names)` or `projections=(packed child name,)`.")


class _AttentionSource(ScoreSource):
    """Shared discovery of the attention sources."""

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        projections: Sequence[str] | None = None,
        num_heads: int | None = None,
        layout: str | None = None,
        *,
        prune_ratio: float | None = None,
        scope: Literal["global", "layer"] = "global",
    ) -> None:
        super().__init__(prune_ratio=prune_ratio, scope=scope)
        self.modules = check_names("modules", modules)
        projections = check_names("projections", projections, count=(1, 3))
        self.projections = None if projections is None else tuple(projections)
        self.num_heads = check_int("num_heads", num_heads, minimum=1, allow_none=True)
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"`layout` must be one of {LAYOUTS} (or None to recognise it), got {layout!r}.")
        self.layout = layout

    def blocks(self, model: nn.Module) -> dict[str, AttentionBlock]:
        return find_attention(model, self.modules, self.projections, self.num_heads, self.layout)

    def options(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable: ``type(source)(**source.options())`` is an equal source.

        A pruning plan records them, so that its replay (``load_pruned``, resuming) finds the same blocks.
        """
        options: dict[str, Any] = {"modules": self.modules,
                                   "projections": None if self.projections is None else list(self.projections),
                                   "num_heads": self.num_heads}
        if self.layout is not None:  # absent by default: plans written before the option replay as they were
            options["layout"] = self.layout
        return {**options, **self.ranking()}

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in (("modules", self.modules), ("projections", self.projections),
                                          ("num_heads", self.num_heads), ("layout", self.layout),
                                          *self.ranking().items()) if v is not None]
        return f"{type(self).__name__}({', '.join(args)})"


def _frozen(weight: Tensor) -> bool:
    return not weight.requires_grad


@dataclass(eq=False)
class QKEntry:
    """The handle of one :class:`AttentionQKSource` entry: the query or key rows of one block."""

    block: AttentionBlock
    part: str

    @property
    def name(self) -> str:
        return self.block.part(self.part)[4]


class AttentionQKSource(_AttentionSource):
    r"""Element-wise ``|W|`` of every query and key projection: the WORM paper's transformer source.

    Every weight of every query and key projection of every self-attention block is a unit, scored by
    its absolute value (biases are not scored). Entries are named by the Linear module
    (``"bert.encoder.layer.0.attention.self.query"``); a packed projection's entries name its part
    (``"blocks.0.attn.qkv:q"``, ``"layers.0.self_attn:k"`` for ``nn.MultiheadAttention``). Each mask is
    shaped like its weight as stored (a ``Conv1D``'s in x out; a ``"per_head"`` packing's part gathers its rows
    head by head).

    WORM multiplies the gradients of exactly the masked-out weights of ``W_q`` and ``W_k`` by chi; value
    projections, biases and every other parameter are never touched.

    There is nothing to remove physically: its surgery (:func:`~lightning_worm.core.surgery.prune_elementwise`)
    applies the ticket as fixed zeros (a ``torch.nn.utils.prune`` parametrisation that survives checkpoints
    and reloads through the plan, ``kind="elementwise"``). **This saves no time and no memory**: the dense
    matrix multiplies run as before. Use :class:`AttentionHeadSource` for a model that is really smaller.

    Args:
        modules: names of the attention modules to track instead of finding them.
        projections: child names of the query/key/value projections (or one packed projection), for
            modules this source does not recognise.
        num_heads: the head count, for modules that do not say it (not needed element-wise).
        layout: how packed projections order their output features (``"qkv"`` or ``"per_head"``); by
            default recognised per module.
        prune_ratio: this source's own ratio when a tracker follows several sources (``None``: the tracker's).
        scope: ``"global"`` (one ranking over every weight) or ``"layer"`` (each projection ranked on its own).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01, source=AttentionQKSource(),
                                       accept_first_window=False)
        worm = WormCallback(early_bird, schedule="two_stage")
    """

    key = "attention_qk"
    description = "element-wise |W| of every self-attention query and key projection"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, QKEntry]]:
        for block in self.blocks(model).values():
            for part in ("q", "k"):
                entry = QKEntry(block, part)
                yield entry.name, entry

    def skip_reason(self, entry: QKEntry) -> str | None:
        block = entry.block
        if block.layout == "packed" and block.problem is not None and (
                block.packing == "per_head" or _out_features(block.linear("q")) % 3):
            return block.problem  # where the queries and keys lie is not known
        if _frozen(entry.block.part(entry.part)[0]):
            return "weight frozen (requires_grad=False)"
        return None

    def scores(self, entry: QKEntry) -> Tensor:
        weight = entry.block.weight(entry.part)
        return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))

    def count(self, entry: QKEntry) -> int:
        return entry.block.weight(entry.part).numel()

    def gradient_factors(self, entry: QKEntry, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        weight, index, _, _, _ = entry.block.part(entry.part)
        part_shape = entry.block.weight(entry.part).shape
        if tuple(keep.shape) != tuple(part_shape):
            raise ValueError(f"A mask of shape {tuple(keep.shape)} does not fit {entry.name!r} of shape "
                             f"{tuple(part_shape)}.")
        factor = torch.where(keep.to(weight.device), 1.0, chi).to(weight.dtype)
        if factor.shape != weight.shape:  # a part of a packed weight: ones outside its rows (or columns)
            full = torch.ones_like(weight, memory_format=torch.contiguous_format).detach()
            full[index] = factor
            factor = full
        return [(weight, factor)]

    def sparsity_parameters(self, entry: QKEntry) -> list[Tensor]:
        return []  # a packed weight would regularise its values too; the paper uses no sparsity term here


class AttentionHeadSource(SlimmingScores, _AttentionSource):
    r"""Whole attention heads: one unit per head of every self-attention block.

    A head's score is the **mean absolute weight of its query and key rows** (``mean |W_q[h]| ∪ |W_k[h]|``,
    biases excluded): the element-wise source's scores averaged over the head, comparable across blocks
    of different widths. Under grouped-query attention (fewer key/value heads than query heads) a unit is
    a key/value head with the query heads that share it, since neither can go alone. The mask of a block
    is ``BoolTensor[num_kv_heads]`` (``num_heads`` without grouping), named by the attention module.

    WORM multiplies the gradients of a masked-out head's rows of the query, key and value weights (and
    of their biases) by chi; the output projection and everything else are untouched. The sparsity term
    regularises the query and key weights where they are parameters of their own (separate projections); a
    packed ``qkv`` weight is left alone (its value rows would be regularised too). A ``Conv1D`` projection
    (GPT-2) is handled by its columns: its scores, factors and cut are those of its output features.

    Its surgery (:func:`~lightning_worm.core.surgery.prune_heads`) removes the pruned heads physically
    (their query/key/value rows and the output projection's matching columns, found by torch-pruning's
    dependency graph where the block does not own its output projection), with the block's other per-head
    state (DeBERTa's relative-position projections, Swin's bias table columns, a view of T5's shared
    relative bias), fixes the module's head count attributes (``num_heads``, ``num_attention_heads``,
    ``all_head_size``, ...), and returns a report whose plan (``kind="heads"``) replays on a fresh model. A
    block always keeps its best head.
    ``nn.MultiheadAttention`` cannot lose heads (its head size is ``embed_dim / num_heads``): its prune
    is refused.

    Args:
        modules: names of the attention modules to track instead of finding them.
        projections: child names of the query/key/value projections (or one packed projection).
        num_heads: the head count, for modules that do not say it.
        layout: how packed projections order their output features, ``"qkv"`` (``[all q | all k | all v]``)
            or ``"per_head"`` (``[q | k | v]`` per key/value head, as GPT-NeoX's ``query_key_value``); by default
            recognised per module (see the module's documentation). A head plan records it.
        prune_ratio: this source's own ratio when a tracker follows several sources (``None``: the tracker's).
        scope: ``"global"`` (one ranking over the heads of every block) or ``"layer"`` (every block loses the same
            fraction of its heads: EarlyBERT's rule, 1/3 per layer).
        score: ``"magnitude"`` (default): the mean ``|W|`` above; ``"slimming"``: EarlyBERT's slimming coefficients,
            one learnable gate per unit (initialised to 1) on the unit's value features, scored by its magnitude and
            regularised by the sparsity term, folded into the value rows at the prune
            (:class:`~lightning_worm.core.sources.slimming.SlimmingScores`).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.1, source=AttentionHeadSource())
        early_bird.mask  # {"blocks.0.attn": tensor([True, False, True, True]), ...}
    """

    key = "attention_heads"
    description = "self-attention heads scored by the mean |W| of their query and key rows"

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        projections: Sequence[str] | None = None,
        num_heads: int | None = None,
        layout: str | None = None,
        *,
        prune_ratio: float | None = None,
        scope: Literal["global", "layer"] = "global",
        score: Literal["auto", "slimming", "magnitude"] = "auto",
    ) -> None:
        super().__init__(modules, projections, num_heads, layout, prune_ratio=prune_ratio, scope=scope)
        self._set_score(score)
        if self.score == "slimming":
            self.description = "self-attention heads scored by learnable slimming gates"
        elif self.score == "auto":
            self.description = ("self-attention heads scored by learnable slimming gates "
                                "(the mean |W| of their query and key rows where the model has none)")

    def options(self) -> dict[str, Any]:
        return {**super().options(), **({"score": self.score} if self.score != DEFAULT_SCORE else {})}

    def ranking(self) -> dict[str, Any]:
        return {**super().ranking(), **({"score": self.score} if self.score != DEFAULT_SCORE else {})}

    def gate_owner(self, block: AttentionBlock) -> nn.Module | None:
        return None if block.layout == "mha" or block.problem is not None else block.module  # mha cannot lose heads

    def gate_site(self, block: AttentionBlock) -> tuple[nn.Module, int, Tensor, str]:
        # The value features of each unit: scaling a head's values scales its output exactly (its attention weights
        # sum to one), whatever the block does after, so no output projection needs to be found.
        _, num_kv_heads, head_dim = block._counts()
        projection = block.linear("v")
        features = torch.full((cast(Tensor, projection.weight).shape[block.out_dim("v")],), -1)
        features[block.out_index("v")] = torch.arange(num_kv_heads).repeat_interleave(head_dim)
        return projection, num_kv_heads, features, "output"

    def fold_gate(self, block: AttentionBlock, gate: Tensor) -> None:
        projection = block.linear("v")
        weight, _, bias, bias_index, _ = block.part("v")
        per_feature = gate.repeat_interleave(block._counts()[2])
        projection.weight = scaled_parameter(weight, block.out_dim("v"), block.out_index("v"), per_feature)
        if bias is not None:
            projection.bias = scaled_parameter(bias, 0, bias_index, per_feature)

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, AttentionBlock]]:
        yield from self.blocks(model).items()

    def skip_reason(self, block: AttentionBlock) -> str | None:
        if block.problem is not None:
            return block.problem
        if any(_frozen(block.part(p)[0]) for p in PARTS):
            return "weight frozen (requires_grad=False)"
        return None

    def sparsity_parameters(self, block: AttentionBlock) -> list[Tensor]:
        if self.gated(block):
            return [self.gate(block)]
        parts = [block.part(p) for p in ("q", "k")]  # a packed weight (its index not all of it) holds the values too
        return [w for w, index, *_ in parts if isinstance(index, slice) and index == slice(None) and w.requires_grad]

    def scores(self, block: AttentionBlock) -> Tensor:
        if self.gated(block):
            return self.gate_scores(block)
        _, num_kv_heads, _ = block._counts()
        sums, sizes = [], 0
        for part in ("q", "k"):
            weight = block.part(part)[0]
            out_dim = block.out_dim(part)
            # Each output feature's sum first (a row's; a Conv1D's column's), over the whole parameter: sharded by
            # rows (FSDP2), a Linear's stays on the shards and only one value per row is gathered, never the weight.
            magnitudes = weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))
            feature_sums = whole(magnitudes.sum(dim=1 - out_dim))
            part_sums = feature_sums[block.out_index(part)].reshape(num_kv_heads, -1)
            sums.append(part_sums.sum(dim=1))
            sizes += part_sums.shape[1] * weight.shape[1 - out_dim]
        return (sums[0] + sums[1]) / sizes

    def count(self, block: AttentionBlock) -> int:
        return block._counts()[1]

    def row_keep(self, block: AttentionBlock, keep: Tensor, part: str) -> Tensor:
        """Per row of the part's weight, whether its unit is kept."""
        per_unit = block._counts()[2] * (block.group_size if part == "q" else 1)
        return keep.reshape(-1).repeat_interleave(per_unit)

    def gradient_factors(self, block: AttentionBlock, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        if keep.numel() != block.num_kv_heads:
            raise ValueError(f"A mask of {keep.numel()} heads does not fit {block.name!r} with "
                             f"{block.num_kv_heads}.")
        factors: dict[int, list] = {}
        for part in PARTS:
            weight, _, bias, bias_index, _ = block.part(part)
            out_dim = block.out_dim(part)
            feature_factor = torch.where(self.row_keep(block, keep, part).to(weight.device), 1.0, chi)
            for param, dim, index in ((weight, out_dim, block.out_index(part)), (bias, 0, bias_index)):
                if param is None or not param.requires_grad:
                    continue
                if id(param) not in factors:  # one factor per output feature, broadcast along the input dim
                    ones = torch.ones(param.shape[dim], dtype=param.dtype, device=param.device)
                    factors[id(param)] = [param, ones, dim]
                factors[id(param)][1][index] = feature_factor.to(param.dtype)
        return [(p, f.view(*[-1 if d == dim else 1 for d in range(p.dim())])) for p, f, dim in factors.values()] + \
            self.gate_factor(block, keep, chi)
