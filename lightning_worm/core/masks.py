"""Global masks over a model's scored units, and the distance between two of them.

A :class:`Mask` is the one mask type of the library: an immutable mapping of entry name (a tracked
module, or a part of one) to a boolean tensor shaped like that entry's scores (``True`` = keep), backed
by one flat tensor and its layout. It packs to one bit per unit for the detector's window, history and
checkpoints.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm._deprecation import warn_renamed
from lightning_worm.core.sharding import whole
from lightning_worm.core.sources import ScoreSource, SourceSpec, resolve_source
from lightning_worm.core.validation import check_int, check_number

__all__ = [
    "Mask",
    "MaskLike",
    "MaskResult",
    "NonFiniteScoreError",
    "channel_mask",
    "channel_scores",
    "mask_distance",
    "mask_from_scores",
    "rank_units",
    "score_checksum",
    "unit_mask",
    "unit_scores",
]

Layout = tuple[tuple[str, tuple[int, ...]], ...]
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


class Mask(Mapping[str, Tensor]):
    """Keep-masks of several entries, backed by one flat bool tensor and its layout.

    ``mask[name]`` is a read-only view shaped like that entry's scores; ``mask.flat`` is every unit in
    layout order. Build one with :meth:`from_dict`, or get one from :func:`unit_mask`. A mask is
    immutable: its packed bits (:meth:`packed`) are kept once computed, and a mask rebuilt from them
    (:meth:`unpack`) unpacks its units only when they are read, so that the distance of two packed masks
    (:func:`mask_distance`) is taken on their bits.

    Args:
        flat: 1-D bool tensor, every unit of every entry in layout order.
        layout: ``(name, shape)`` pairs in order (a mapping works too).

    Raises:
        ValueError: if ``flat`` does not fill the layout exactly.

    Example::

        mask = Mask.from_dict({"bn1": torch.tensor([True, False]), "bn2": torch.tensor([True])})
        mask["bn1"], mask.flat, mask.kept, mask.packed()
    """

    __slots__ = ("_flat", "_bits", "layout", "_offsets", "_total")

    def __init__(self, flat: Tensor, layout: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]]):
        self._set_layout(layout)
        flat = flat.reshape(-1)
        if flat.dtype != torch.bool:
            raise ValueError(f"A mask holds booleans, got {flat.dtype}.")
        if flat.numel() != self._total:
            raise ValueError(f"A flat mask of {flat.numel()} units cannot fill a layout of {self._total}.")
        self._flat: Tensor | None = flat
        self._bits: Tensor | None = None

    def _set_layout(self, layout: Mapping[str, Sequence[int]] | Sequence[tuple[str, Sequence[int]]]) -> None:
        items = layout.items() if isinstance(layout, Mapping) else layout
        self.layout: Layout = tuple((str(name), tuple(int(s) for s in shape)) for name, shape in items)
        if len({name for name, _ in self.layout}) != len(self.layout):
            raise ValueError("A mask layout names an entry twice.")
        offsets, start = {}, 0
        for name, shape in self.layout:
            size = math.prod(shape)
            offsets[name] = (start, size, shape)
            start += size
        self._offsets = offsets
        self._total = start

    @property
    def flat(self) -> Tensor:
        """Every unit in layout order, as one 1-D bool tensor (unpacked on first read)."""
        if self._flat is None:
            assert self._bits is not None, "a mask holds its units, its packed bits, or both"
            bits = (self._bits.reshape(-1, 1) & _BITS.to(self._bits.device)).ne(0).reshape(-1)
            self._flat = bits[:self._total]
        return self._flat

    @classmethod
    def from_dict(cls, masks: Mapping[str, Tensor]) -> Mask:
        """A :class:`Mask` from ``{name: bool tensor}`` (a :class:`Mask` is returned as it is).

        Raises:
            ValueError: if it is empty or an entry is not a boolean tensor.
        """
        if isinstance(masks, Mask):
            return masks
        if not isinstance(masks, Mapping) or not masks:
            raise ValueError(f"A mask is a non-empty mapping of name to bool tensor, got {type(masks).__name__}.")
        for name, m in masks.items():
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"The mask of {name!r} must be a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)}.")
        device = next(iter(masks.values())).device
        flat = torch.cat([m.reshape(-1).to(device) for m in masks.values()])
        return cls(flat, [(name, tuple(m.shape)) for name, m in masks.items()])

    def __getitem__(self, name: str) -> Tensor:
        start, size, shape = self._offsets[name]
        return self.flat[start:start + size].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"Mask({len(self)} entries, {self.kept}/{self.total} units kept)"

    @property
    def total(self) -> int:
        """Number of units."""
        return self._total

    @property
    def kept(self) -> int:
        """Number of units kept."""
        if self._flat is None:
            assert self._bits is not None, "a mask holds its units, its packed bits, or both"
            return _popcount(self._bits, self._total)
        return int(torch.count_nonzero(self._flat))

    @property
    def sizes(self) -> dict[str, int]:
        """Units per entry."""
        return {name: size for name, (_, size, _) in self._offsets.items()}

    def to_dict(self) -> dict[str, Tensor]:
        """``{name: bool tensor}``, copies."""
        return {name: self[name].clone() for name in self}

    def to(self, device: Any) -> Mask:
        return Mask(self.flat.to(device), self.layout)

    def packed(self) -> Tensor:
        """The units as bits: a 1-D uint8 CPU tensor of ``ceil(total / 8)`` bytes (:meth:`unpack` reverses).

        Unit ``i`` is bit ``i % 8`` of byte ``i // 8``; the bits past the last unit are zero. Computed once.
        """
        if self._bits is None:
            assert self._flat is not None, "a mask holds its units, its packed bits, or both"
            self._bits = _pack(self._flat.cpu())
        return self._bits

    @classmethod
    def unpack(cls, packed: Tensor, layout: Layout | Mapping[str, Sequence[int]]) -> Mask:
        """The :class:`Mask` that :meth:`packed` produced, given its layout (its units are unpacked when read).

        Raises:
            ValueError: if ``packed`` is not a 1-D uint8 tensor of ``ceil(total / 8)`` bytes for the layout.
        """
        mask = cls.__new__(cls)
        mask._set_layout(layout)
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(mask._total / 8):
            raise ValueError(f"Packed bits of a mask of {mask._total} units are a 1-D uint8 tensor of "
                             f"{math.ceil(mask._total / 8)} bytes, got {packed.dtype} of shape {tuple(packed.shape)}.")
        mask._flat, mask._bits = None, packed
        return mask


def _pack(flat: Tensor) -> Tensor:
    """``flat`` (1-D bool) as bits, eight units per byte, unit ``i`` at bit ``i % 8`` of byte ``i // 8``."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder != "little" or not flat.numel():
        return (flat.view(-1, 8).to(torch.uint8) * _BITS).sum(dim=1, dtype=torch.uint8)
    # Read each run of eight units (bytes 0 or 1) as one little-endian word: byte j holds unit j at bit 8j.
    # Three shift-or steps gather unit j at bit j of the low byte (no sign bit is ever set); keep that byte.
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    words = words | (words >> 7)
    words |= words >> 14
    words |= words >> 28
    return words.view(torch.uint8)[::8].contiguous()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _popcount(bits: Tensor, total: int) -> int:
    """The number of set bits among the first ``total`` bits of packed bits (a uint8 tensor)."""
    count = int(torch.index_select(_POPCOUNT.to(bits.device), 0, bits.int()).sum())
    tail = total % 8
    if tail and bits.numel():  # bits past the last unit do not count, whatever they hold
        count -= int(_POPCOUNT[int(bits[-1]) >> tail])
    return count


MaskLike = Mask | Mapping[str, Tensor]


class NonFiniteScoreError(ValueError):
    """Raised when scores hold NaN or infinity; ``layers`` names the offending entries."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers
        super().__init__(
            f"Non-finite scores (NaN or inf) in {len(layers)} layer(s): {', '.join(layers[:5])}"
            + (" ..." if len(layers) > 5 else "")
            + ". The training has diverged there; lower the learning rate or enable gradient clipping."
        )

    def __reduce__(self) -> tuple:  # picklable for the DDP broadcast
        return (type(self), (self.layers,))


@dataclass
class MaskResult:
    """A mask with the numbers behind it.

    Attributes:
        mask: the mask, ``True`` = keep.
        requested: ``round(prune_ratio * N)``, the units the global ranking prunes.
        pruned: the units actually pruned (below ``requested`` when ``min_units`` kept some back).
        restored: per entry, how many units ``min_units`` kept back.
        checksum: :func:`score_checksum` of the scores ranked (equal scores give equal checksums), so that a
            caller can tell whether any score moved between two masks without another pass over them.
    """

    mask: Mask
    requested: int
    pruned: int
    restored: dict[str, int] = field(default_factory=dict)
    checksum: int = 0


def mask_from_scores(scores: Mapping[str, Tensor], prune_ratio: float, min_units: int = 1) -> MaskResult:
    """Global mask from per-entry scores (any shapes).

    The ``round(prune_ratio * N)`` units with the smallest score over all ``N`` units are pruned; ties go
    by entry order, then flat index (as a stable ascending sort would, in O(N) through ``kthvalue``). An
    entry left with fewer than ``min_units`` units keeps its ``min_units`` best ones instead (ties:
    lower index kept).

    Args:
        scores: score tensor per entry, in order. Compared in float32 or wider.
        prune_ratio: fraction of units to prune, in (0, 1).
        min_units: units every entry keeps at least (all of them if it has fewer).

    Raises:
        ValueError: on a bad ratio, ``min_units``, or no unit at all.
        NonFiniteScoreError: if a score is NaN or infinite.
    """
    check_number("prune_ratio", prune_ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("min_units", min_units, minimum=1)
    names = list(scores)
    if not names or all(scores[n].numel() == 0 for n in names):
        raise ValueError("No unit to mask: `scores` is empty.")
    device = scores[names[0]].device
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names), torch.float32)
    flat = torch.cat([scores[n].detach().reshape(-1).to(device, dtype) for n in names])
    if not bool(torch.isfinite(flat.sum())):  # one reduction; the per-entry check only when it fails
        bad = [n for n in names if not bool(torch.isfinite(scores[n]).all())]
        if bad:
            raise NonFiniteScoreError(bad)

    requested = round(prune_ratio * flat.numel())
    if requested == 0:
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
    else:
        threshold, below, ties = _kth_smallest_counted(flat, requested)
        keep = flat > threshold
        need = requested - below  # the ties that go: the first `need` by position
        if ties.numel() > need:  # else every tie goes
            keep[ties[need:]] = True

    mask = Mask(keep, [(n, tuple(scores[n].shape)) for n in names])
    restored = {}
    sizes = mask.sizes
    # An entry can fall below its minimum only if the ranking can take more than size - minimum from it.
    if any(requested > size - min(size, min_units) for size in sizes.values()):
        for name, size in sizes.items():
            minimum = min(size, min_units)
            entry = mask[name].reshape(-1)
            kept = int(torch.count_nonzero(entry))
            if kept < minimum:
                best = torch.sort(scores[name].reshape(-1).to(device, dtype), descending=True, stable=True).indices
                entry.zero_().index_fill_(0, best[:minimum], True)
                restored[name] = minimum - kept
    return MaskResult(mask=mask, requested=requested, pruned=requested - sum(restored.values()), restored=restored,
                      checksum=score_checksum(flat))


Parts = Sequence[tuple[ScoreSource, Sequence[str]]]


def rank_units(scores: Mapping[str, Tensor], parts: Parts, prune_ratio: float, min_units: int = 1) -> MaskResult:
    """The mask of several sources' scores: each source ranks its own entries with its ``prune_ratio`` (else
    ``prune_ratio``) and its ``scope`` (one ranking over all its entries, or one per entry).

    With one source of global scope and no ratio of its own this is :func:`mask_from_scores`.

    Args:
        scores: score tensor per entry, in order (as :func:`unit_scores` gives them).
        parts: ``(source, entry names)`` per source, as :meth:`ScoreSource.parts` gives them; together they name
            every entry of ``scores``.
        prune_ratio: the ratio of a source without one of its own, in (0, 1).
        min_units: units every entry keeps at least.

    Raises:
        ValueError: on a bad ratio, or parts that do not cover the scores' entries exactly.
        NonFiniteScoreError: if a score is NaN or infinite.
    """
    groups: list[tuple[float, list[str]]] = []
    for source, names in parts:
        ratio = source.prune_ratio if source.prune_ratio is not None else prune_ratio
        groups += [(ratio, [n]) for n in names] if source.scope == "layer" else [(ratio, list(names))]
    groups = [(ratio, names) for ratio, names in groups if names]
    covered = [n for _, names in groups for n in names]
    if sorted(covered) != sorted(scores):
        raise ValueError(f"The sources' parts name the entries {covered[:5]}..., the scores {list(scores)[:5]}...: "
                         "take both from the same model.")
    if len(groups) == 1:
        return mask_from_scores(scores, groups[0][0], min_units)
    results = [mask_from_scores({n: scores[n] for n in names}, ratio, min_units) for ratio, names in groups]
    keep = {name: result.mask[name] for result in results for name in result.mask}
    return MaskResult(mask=Mask.from_dict({name: keep[name] for name in scores}),
                      requested=sum(r.requested for r in results), pruned=sum(r.pruned for r in results),
                      restored={n: k for r in results for n, k in r.restored.items()},
                      checksum=sum(r.checksum for r in results) % (1 << 64))


def score_checksum(scores: Tensor) -> int:
    """An exact checksum of a tensor's bits: the sum of its 64-bit words, modulo ``2**64``, in one pass.

    Equal tensors (bit for bit) give equal checksums; a change of any one value changes it (two changes can
    cancel, as they can in any checksum). Integer sums do not depend on the order of the additions, so the
    checksum is the same for every thread count and device.
    """
    raw = scores.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    # int64 additions wrap around (two's complement) on every device torch runs on.
    total = int(raw[:whole].view(torch.int64).sum()) if whole else 0
    for shift, byte in enumerate(raw[whole:].tolist()):
        total += byte << (8 * shift)
    return total % (1 << 64)


def _kth_smallest_counted(values: Tensor, k: int) -> tuple[Tensor, int, Tensor]:
    """The ``k``-th smallest of a 1-D tensor (1-based), exactly, how many values are below it, and the positions of
    those equal to it (ascending), in a few passes over it.

    Large inputs are narrowed first: a fixed-seed sample brackets the quantile, the values below the
    bracket are counted, and ``kthvalue`` runs on the bracket alone; when the sample misses (it cannot be
    wrong, only unlucky) the full ``kthvalue`` runs instead.

    The count and the positions come from the bracket where the input was narrowed (the values equal to the
    k-th all lie in it), so that the caller needs no further pass over the input to place the ties.
    """
    n = values.numel()
    if n >= _NARROW_FROM:
        generator = torch.Generator(device=values.device).manual_seed(0)
        sample = values[torch.randint(0, n, (_SAMPLE,), generator=generator, device=values.device)]
        position = k / n * _SAMPLE
        low = sample.kthvalue(max(1, int(position - _MARGIN))).values
        high = sample.kthvalue(min(_SAMPLE, int(position + _MARGIN) + 1)).values
        below = values < low
        below_low = int(torch.count_nonzero(below))
        where = torch.le(values, high).logical_and_(below.logical_not_()).nonzero().flatten()  # ascending
        bracket = values[where]
        rank = k - below_low
        if 1 <= rank <= bracket.numel():
            kth = bracket.kthvalue(rank).values
            return kth, below_low + int(torch.count_nonzero(bracket < kth)), where[bracket == kth]
    kth = values.kthvalue(k).values
    return kth, int(torch.count_nonzero(values < kth)), (values == kth).nonzero().flatten()


_NARROW_FROM, _SAMPLE, _MARGIN = 1 << 20, 1 << 16, 1 << 11  # margin: 8 standard deviations of the sample rank


def unit_scores(model: nn.Module, source: SourceSpec = None) -> dict[str, Tensor]:
    """The scores of every tracked entry of ``model`` (by default BatchNorm ``|gamma|``).

    Under FSDP2 the scores are computed on the shards and gathered whole (a collective: every rank calls it).
    """
    source = resolve_source(source)
    return {name: whole(source.scores(h)) for name, h in source.tracked(model).items()}


def unit_mask(
    model: nn.Module, prune_ratio: float, min_units: int = 1, source: SourceSpec = None
) -> Mask:
    """Global mask of ``model`` at ``prune_ratio``.

    Args:
        model: any ``nn.Module``; its tracked units are scored by ``source``.
        prune_ratio: fraction of units to prune, in (0, 1) (a source with a ratio of its own uses that).
        min_units: units every entry keeps at least.
        source: what is scored; :class:`~lightning_worm.BatchNormSource` by default; a list of sources ranks each
            one's units with its own ratio and scope (:func:`rank_units`).

    Returns:
        A :class:`Mask`: per tracked entry name a bool tensor shaped like its scores, ``True`` = keep.

    Raises:
        ValueError: on bad arguments or if the model has no tracked unit.
        NonFiniteScoreError: if a score is NaN or infinite.

    Example::

        mask = unit_mask(model, prune_ratio=0.5)
        print({name: int(m.sum()) for name, m in mask.items()})  # channels kept per layer
    """
    source = resolve_source(source)
    scores = unit_scores(model, source)
    if not scores:
        raise ValueError(f"The model has no tracked channels or units ({source.description}).")
    return rank_units(scores, source.parts(model), prune_ratio, min_units).mask


def channel_mask(
    model: nn.Module, prune_ratio: float, min_channels: int = 1, source: str | ScoreSource | None = None
) -> Mask:
    """Deprecated name of :func:`unit_mask` (``min_channels`` is ``min_units``); removed in 0.3."""
    warn_renamed("channel_mask", "unit_mask")
    return unit_mask(model, prune_ratio, min_channels, source)


def channel_scores(model: nn.Module, source: str | ScoreSource | None = None) -> dict[str, Tensor]:
    """Deprecated name of :func:`unit_scores`; removed in 0.3."""
    warn_renamed("channel_scores", "unit_scores")
    return unit_scores(model, source)


def mask_distance(a: MaskLike, b: MaskLike) -> float:
    """Normalised Hamming distance: the fraction of units on which two masks differ.

    The one distance of the library (the detector's window, the plots). Two masks that both hold their
    packed bits (:meth:`Mask.packed` was called, or they came from :meth:`Mask.unpack`) are compared bit
    by bit on the packed bytes, eight units per byte; others unit by unit.

    Raises:
        ValueError: if the masks do not cover the same entries with the same shapes.
    """
    a, b = Mask.from_dict(a), Mask.from_dict(b)
    if a.layout != b.layout:
        raise ValueError("The two masks cover different layers or channel counts (entries or shapes); compare masks of "
                         "one model.")
    if not a.total:
        return math.nan
    if a._bits is not None and b._bits is not None:
        return _popcount(torch.bitwise_xor(a._bits, b._bits.to(a._bits.device)), a.total) / a.total
    return int(torch.count_nonzero(a.flat != b.flat.to(a.flat.device))) / a.total
