"""Self-attention sources: element-wise query/key weights (the WORM paper's) and whole heads.

Attention blocks are recognised by duck typing (the library never imports ``transformers``):

* separate projections, as child ``nn.Linear`` layers named ``query``/``key``/``value`` (Hugging Face
  BERT, RoBERTa, ViT), ``q_proj``/``k_proj``/``v_proj`` (Llama, Gemma, Mistral, OPT, BART),
  ``q_lin``/``k_lin``/``v_lin`` (DistilBERT) or ``q``/``k``/``v`` (T5);
* a packed ``qkv`` ``nn.Linear`` whose rows are ``[query | key | value]`` (timm's ``Attention``);
* ``torch.nn.MultiheadAttention`` (packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when its key and
  value dimensions differ).

A user can name the attention modules instead (``modules=[...]``) and the projections
(``projections=("wq", "wk", "wv")``). The head count is read from the module (``num_heads``,
``num_attention_heads``, ``n_heads``, ``n_head``), else from its ``config``, else derived from a head
size attribute (``head_dim``, ``attention_head_size``); grouped-query attention (fewer key/value heads)
is read the same way (``num_key_value_heads``, ``num_kv_heads``).
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
from lightning_worm.core.validation import check_int, check_names

__all__ = [
    "HEAD_COUNT_ATTRS",
    "HEAD_SIZE_ATTRS",
    "KV_HEAD_COUNT_ATTRS",
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
]

#: Child names of separate query/key/value projections, tried in this order.
PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q_lin", "k_lin", "v_lin"),
    ("q", "k", "v"),
)
#: Child names of a packed ``[query | key | value]`` projection.
PACKED_NAMES: tuple[str, ...] = ("qkv",)
#: Child names of an attention module's own output projection (else the dependency graph finds it).
OUTPUT_NAMES: tuple[str, ...] = ("o_proj", "out_proj", "proj", "o", "out_lin", "dense")

HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_SIZE_ATTRS = ("head_dim", "attention_head_size", "d_head", "dim_head")
PARTS = ("q", "k", "v")
#: Attribute that a head prune sets on the attention module: ``(num_heads, num_kv_heads)`` after the cut. It
#: outranks a source's ``num_heads=``, which counts the heads of the unpruned module.
PRUNED_HEADS_ATTR = "_lightning_worm_heads"


@dataclass(eq=False)
class AttentionBlock:
    """One self-attention block found in a model (the handle of :class:`AttentionHeadSource`).

    Attributes:
        name: the attention module's name in ``model.named_modules()``.
        module: the attention module.
        layout: ``"separate"`` (three Linear layers), ``"packed"`` (one ``qkv`` Linear) or ``"mha"``
            (``nn.MultiheadAttention``).
        projections: child names of the query, key and value Linear layers (``"separate"``), or of the
            packed Linear (``"packed"``, one name).
        num_heads: query heads, or ``None`` if unknown.
        num_kv_heads: key/value heads (fewer under grouped-query attention).
        head_dim: size of one head.
        problem: why the block cannot be tracked, or ``None``.
    """

    name: str
    module: nn.Module
    layout: str
    projections: tuple[str, ...]
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    problem: str | None = None

    # ----------------------------------------------------------------- where each part's rows live

    def part(self, part: str) -> tuple[nn.Parameter, slice, nn.Parameter | None, slice, str]:
        """``(weight, weight rows, bias, bias rows, entry name)`` of ``"q"``, ``"k"`` or ``"v"``."""
        i = PARTS.index(part)
        prefix = f"{self.name}." if self.name else ""
        if self.layout == "separate":
            linear = getattr(self.module, self.projections[i])
            return linear.weight, slice(None), linear.bias, slice(None), prefix + self.projections[i]
        if self.layout == "packed":
            linear = getattr(self.module, self.projections[0])
            size = linear.weight.shape[0] // 3
            rows = slice(i * size, (i + 1) * size)
            return linear.weight, rows, linear.bias, rows, f"{prefix}{self.projections[0]}:{part}"
        mha = cast(nn.MultiheadAttention, self.module)  # the "mha" layout is found by this type
        rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
        if mha_packs_qkv(mha):
            return mha.in_proj_weight, rows, mha.in_proj_bias, rows, f"{self.name}:{part}"
        return getattr(mha, f"{part}_proj_weight"), slice(None), mha.in_proj_bias, rows, f"{self.name}:{part}"

    def weight(self, part: str) -> Tensor:
        """The part's weight rows (``out x in``), detached."""
        weight, rows, _, _, _ = self.part(part)
        return weight.detach()[rows]

    def linear(self, part: str) -> nn.Linear:
        """The Linear layer holding the part (separate and packed layouts)."""
        index = PARTS.index(part) if self.layout == "separate" else 0
        return getattr(self.module, self.projections[index])

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
    q_rows = block.weight("q").shape[0]
    k_rows = block.weight("k").shape[0]
    pruned = getattr(module, PRUNED_HEADS_ATTR, None)
    if isinstance(pruned, tuple) and len(pruned) == 2:  # cut by a head prune: the counts it left
        num_heads = pruned[0]
    # The module's own attributes first: a config is shared by every layer and says nothing of a pruned one.
    heads = num_heads or _int_attr([module], HEAD_COUNT_ATTRS)
    head_dim = _int_attr([module], HEAD_SIZE_ATTRS)
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
    v_rows = block.weight("v").shape[0]
    if kv_heads is None or heads % kv_heads or v_rows != k_rows:
        block.problem = f"key/value rows ({k_rows}, {v_rows}) do not fit {heads} heads of size {head_dim}"
        return block
    block.num_heads, block.num_kv_heads, block.head_dim = heads, kv_heads, head_dim
    return block


def _recognise(name: str, module: nn.Module, projections: Sequence[str] | None = None) -> AttentionBlock | None:
    """The block ``module`` is, or ``None`` if it is no self-attention module this source knows."""
    if isinstance(module, nn.MultiheadAttention):
        return AttentionBlock(name, module, "mha", ())
    children = dict(module.named_children())
    candidates = [tuple(projections)] if projections else list(PROJECTION_NAMES)
    for names in candidates:
        if len(names) == 3 and all(isinstance(children.get(n), nn.Linear) for n in names):
            return AttentionBlock(name, module, "separate", tuple(names))
        if len(names) == 1 and isinstance(children.get(names[0]), nn.Linear):
            return AttentionBlock(name, module, "packed", tuple(names))
    if projections is None:
        for packed in PACKED_NAMES:
            linear = children.get(packed)
            if isinstance(linear, nn.Linear) and linear.out_features % 3 == 0:
                return AttentionBlock(name, module, "packed", (packed,))
    return None


def find_attention(
    model: nn.Module,
    modules: Sequence[str] | None = None,
    projections: Sequence[str] | None = None,
    num_heads: int | None = None,
) -> dict[str, AttentionBlock]:
    """The self-attention blocks of ``model`` by module name, in ``named_modules()`` order.

    Args:
        model: any model.
        modules: names of the attention modules to use instead of finding them.
        projections: child names of the query, key and value Linear layers (three names), or of one
            packed ``[q | k | v]`` Linear (one name), for modules this source does not recognise.
        num_heads: the head count, for modules that do not say it.

    Raises:
        ValueError: if a named module does not exist or is not recognised as self-attention.

    Example::

        blocks = find_attention(bert)  # {"bert.encoder.layer.0.attention.self": AttentionBlock(...), ...}
    """
    if projections is not None and len(projections) not in (1, 3):
        raise ValueError(f"`projections` names the query, key and value Linear layers (3 names) or one packed "
                         f"qkv Linear (1 name), got {list(projections)!r}.")
    named = dict(model.named_modules())
    if modules is not None:
        missing = [n for n in modules if n not in named]
        if missing:
            raise ValueError(f"`modules` names modules the model lacks: {missing}. Use names as "
                             "`model.named_modules()` gives them.")
        found = {}
        for name in modules:
            block = _recognise(name, named[name], projections)
            if block is None:
                raise ValueError(
                    f"{name!r} ({type(named[name]).__name__}) has no query/key/value Linear children this source "
                    f"knows ({', '.join('/'.join(p) for p in PROJECTION_NAMES)}, or a packed 'qkv'): pass "
                    "`projections=(query, key, value child names)`."
                )
            found[name] = block
    else:
        found = {}
        for name, module in named.items():
            block = _recognise(name, module, projections)
            if block is not None:
                found[name] = block
    return {name: _read_heads(block, num_heads) for name, block in found.items()}


class _AttentionSource(ScoreSource):
    """Shared discovery of the attention sources."""

    def __init__(
        self,
        modules: Sequence[str] | None = None,
        projections: Sequence[str] | None = None,
        num_heads: int | None = None,
        *,
        prune_ratio: float | None = None,
        scope: Literal["global", "layer"] = "global",
    ) -> None:
        super().__init__(prune_ratio=prune_ratio, scope=scope)
        self.modules = check_names("modules", modules)
        projections = check_names("projections", projections, count=(1, 3))
        self.projections = None if projections is None else tuple(projections)
        self.num_heads = check_int("num_heads", num_heads, minimum=1, allow_none=True)

    def blocks(self, model: nn.Module) -> dict[str, AttentionBlock]:
        return find_attention(model, self.modules, self.projections, self.num_heads)

    def options(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable: ``type(source)(**source.options())`` is an equal source.

        A pruning plan records them, so that its replay (``load_pruned``, resuming) finds the same blocks.
        """
        return {"modules": self.modules, "projections": None if self.projections is None else list(self.projections),
                "num_heads": self.num_heads, **self.ranking()}

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in (("modules", self.modules), ("projections", self.projections),
                                          ("num_heads", self.num_heads), *self.ranking().items()) if v is not None]
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
    shaped like its weight.

    WORM multiplies the gradients of exactly the masked-out weights of ``W_q`` and ``W_k`` by chi; value
    projections, biases and every other parameter are never touched.

    There is nothing to remove physically: its surgery (:func:`~lightning_worm.core.surgery.prune_elementwise`)
    applies the ticket as fixed zeros (a ``torch.nn.utils.prune`` parametrisation that survives checkpoints
    and reloads through the plan, ``kind="elementwise"``). **This saves no time and no memory**: the dense
    matrix multiplies run as before. Use :class:`AttentionHeadSource` for a model that is really smaller.

    Args:
        modules: names of the attention modules to track instead of finding them.
        projections: child names of the query/key/value Linear layers (or one packed ``qkv``), for
            modules this source does not recognise.
        num_heads: the head count, for modules that do not say it (not needed element-wise).
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
        if _frozen(entry.block.part(entry.part)[0]):
            return "weight frozen (requires_grad=False)"
        return None

    def scores(self, entry: QKEntry) -> Tensor:
        weight = entry.block.weight(entry.part)
        return weight.abs().to(torch.promote_types(weight.dtype, torch.float32))

    def count(self, entry: QKEntry) -> int:
        return entry.block.weight(entry.part).numel()

    def gradient_factors(self, entry: QKEntry, keep: Tensor, chi: float) -> list[tuple[Tensor, Tensor]]:
        weight, rows, _, _, _ = entry.block.part(entry.part)
        part_shape = entry.block.weight(entry.part).shape
        if tuple(keep.shape) != tuple(part_shape):
            raise ValueError(f"A mask of shape {tuple(keep.shape)} does not fit {entry.name!r} of shape "
                             f"{tuple(part_shape)}.")
        factor = torch.where(keep.to(weight.device), 1.0, chi).to(weight.dtype)
        if factor.shape != weight.shape:  # a part of a packed weight: ones outside its rows
            full = torch.ones_like(weight, memory_format=torch.contiguous_format).detach()
            full[rows] = factor
            factor = full
        return [(weight, factor)]

    def sparsity_parameters(self, entry: QKEntry) -> list[Tensor]:
        return []  # a packed weight would regularise its values too; the paper uses no sparsity term here


class AttentionHeadSource(_AttentionSource):
    r"""Whole attention heads: one unit per head of every self-attention block.

    A head's score is the **mean absolute weight of its query and key rows** (``mean |W_q[h]| ∪ |W_k[h]|``,
    biases excluded): the element-wise source's scores averaged over the head, comparable across blocks
    of different widths. Under grouped-query attention (fewer key/value heads than query heads) a unit is
    a key/value head with the query heads that share it, since neither can go alone. The mask of a block
    is ``BoolTensor[num_kv_heads]`` (``num_heads`` without grouping), named by the attention module.

    WORM multiplies the gradients of a masked-out head's rows of the query, key and value weights (and
    of their biases) by chi; the output projection and everything else are untouched. The sparsity term
    regularises the query and key weights where they are parameters of their own (separate projections); a
    packed ``qkv`` weight is left alone (its value rows would be regularised too).

    Its surgery (:func:`~lightning_worm.core.surgery.prune_heads`) removes the pruned heads physically
    (their query/key/value rows and the output projection's matching columns, found by torch-pruning's
    dependency graph where the block does not own its output projection), fixes the module's head count
    attributes (``num_heads``, ``num_attention_heads``, ``all_head_size``, ...), and returns a report whose
    plan (``kind="heads"``) replays on a fresh model. A block always keeps its best head.
    ``nn.MultiheadAttention`` cannot lose heads (its head size is ``embed_dim / num_heads``): its prune
    is refused.

    Args:
        modules: names of the attention modules to track instead of finding them.
        projections: child names of the query/key/value Linear layers (or one packed ``qkv``).
        num_heads: the head count, for modules that do not say it.
        prune_ratio: this source's own ratio when a tracker follows several sources (``None``: the tracker's).
        scope: ``"global"`` (one ranking over the heads of every block) or ``"layer"`` (every block loses the same
            fraction of its heads: EarlyBERT's rule, 1/3 per layer).

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.1, source=AttentionHeadSource())
        early_bird.mask  # {"blocks.0.attn": tensor([True, False, True, True]), ...}
    """

    key = "attention_heads"
    description = "self-attention heads scored by the mean |W| of their query and key rows"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, AttentionBlock]]:
        yield from self.blocks(model).items()

    def skip_reason(self, block: AttentionBlock) -> str | None:
        if block.problem is not None:
            return block.problem
        if any(_frozen(block.part(p)[0]) for p in PARTS):
            return "weight frozen (requires_grad=False)"
        return None

    def sparsity_parameters(self, block: AttentionBlock) -> list[Tensor]:
        parts = [block.part(p) for p in ("q", "k")]
        return [weight for weight, rows, *_ in parts if rows == slice(None) and weight.requires_grad]

    def scores(self, block: AttentionBlock) -> Tensor:
        _, num_kv_heads, _ = block._counts()
        sums, sizes = [], 0
        for part in ("q", "k"):
            weight, rows, _, _, _ = block.part(part)
            # Each row's sum first, over the whole parameter: sharded by rows (FSDP2), it stays on the shards and
            # only one value per row is gathered, never the weight itself.
            row_sums = whole(weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32)).sum(dim=1))
            part_sums = row_sums[rows].reshape(num_kv_heads, -1)
            sums.append(part_sums.sum(dim=1))
            sizes += part_sums.shape[1] * weight.shape[1]
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
            weight, weight_rows, bias, bias_rows, _ = block.part(part)
            row_factor = torch.where(self.row_keep(block, keep, part).to(weight.device), 1.0, chi)
            for param, rows in ((weight, weight_rows), (bias, bias_rows)):
                if param is None or not param.requires_grad:
                    continue
                if id(param) not in factors:
                    factors[id(param)] = [param, torch.ones(param.shape[0], dtype=param.dtype, device=param.device)]
                factors[id(param)][1][rows] = row_factor.to(param.dtype)
        return [(p, f.view(-1, *([1] * (p.dim() - 1)))) for p, f in factors.values()]
