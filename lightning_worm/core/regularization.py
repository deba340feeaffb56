"""Sparsity regularisation of unit scores: network slimming's L1 term (as the Early-Bird code uses it) and the
strength ``sparsity="auto"`` sets from the run."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_worm._internals.torch import foreach_add_masked_, foreach_add_sign_
from lightning_worm.core.masks import Mask, MaskLike
from lightning_worm.core.sharding import is_sharded, local, local_part, shard_groups
from lightning_worm.core.sources import ScoreSource, resolve_source
from lightning_worm.core.truncation import GradientTruncation
from lightning_worm.core.validation import check_number

__all__ = ["GrowingDecay", "MaskedDecay", "RelativeSparsity", "add_sparsity_gradient"]


@torch.no_grad()
def add_sparsity_gradient(params: Iterable[Tensor], sparsity: float) -> None:
    """Add the L1 subgradient ``sparsity * sign(p)`` to each parameter's gradient, in place.

    Call it once per optimizer step on the true (unscaled) gradient, after the backward passes and
    before ``optimizer.step()``. Parameters without a gradient are skipped.

    Raises:
        ValueError: if ``sparsity`` is negative.

    Example::

        loss.backward()
        add_sparsity_gradient([bn.weight for bn in batchnorms], 1e-4)
        optimizer.step()
    """
    check_number("sparsity", sparsity, low=0.0)
    pairs = [(local(p), local(p.grad)) for p in params if p.grad is not None]  # sharded: this rank's shard
    if sparsity == 0.0 or not pairs:
        return
    foreach_add_sign_([grad for _, grad in pairs], [p for p, _ in pairs], alpha=sparsity)


class RelativeSparsity:
    """A sparsity strength set from the run: measured from the loss gradients, then steered by how fast the scores
    polarise.

    Network slimming's L1 term ``s * sign(gamma)`` drives a scaling factor to zero when the loss defends it with a
    smaller gradient than ``s``, so a fixed number does not carry over from one run to another (the Early-Bird
    code's ``1e-4`` was set for CIFAR-10). The first epoch measures the mean ``|grad|`` of the regularised
    parameters at every optimizer step (on the true gradient, before the term is added; one device sync, at the
    epoch's end) and trains without the term; the strength then starts at ``ratio`` times that. At the end of
    every later epoch, :meth:`end_epoch` takes the newest mask's score-share ratio (1: its pruned units hold as
    much as a random mask's, 0: nothing): while it falls by less than ``rate / 2`` per epoch the strength is
    multiplied by ``step``; when it falls by more than ``2 * rate`` it is divided by ``step`` (a term that
    polarises too fast also takes away units the loss needs). Once the ratio is at most ``hold_below`` the
    scores are polarised: the strength holds while the masks settle, and is divided by ``step`` at every epoch
    whose masks still move (``settled=False``: with more units near zero than the mask prunes, which of them
    the mask prunes is noise). It stays within ``[min_ratio, max_ratio]`` times the measure (``ratio`` until
    the scores are polarised).

    Args:
        ratio: the starting strength as a multiple of the first epoch's mean loss-gradient magnitude, > 0.
        rate: the fall of the score-share ratio per epoch aimed at, in (0, 1].
        step: the factor of each change, > 1.
        max_ratio: the largest strength as a multiple of the measure, at least ``ratio``.
        hold_below: the scores count as polarised once the ratio is at most this.
        min_ratio: the smallest strength once polarised, as a multiple of the measure.

    Raises:
        ValueError: on a value out of range.

    Example::

        relative = RelativeSparsity()
        relative.observe(gammas)  # at every step, before adding the term
        add_sparsity_gradient(gammas, relative.strength)
        relative.end_epoch(share_ratio=0.8)  # at the end of an epoch
    """

    def __init__(self, ratio: float = 1.0, rate: float = 0.08, step: float = 1.3, max_ratio: float = 4.0,
                 hold_below: float = 0.1, min_ratio: float = 0.25) -> None:
        self.ratio = check_number("ratio", ratio, low=0.0, low_open=True)
        self.rate = check_number("rate", rate, low=0.0, high=1.0, low_open=True)
        self.step = check_number("step", step, low=1.0, low_open=True)
        self.max_ratio = check_number("max_ratio", max_ratio, low=self.ratio)
        self.hold_below = check_number("hold_below", hold_below, low=0.0, high=1.0)
        self.min_ratio = check_number("min_ratio", min_ratio, low=0.0, high=self.ratio, low_open=True)
        self.measure = 0.0  # the first epoch's mean |grad|
        self.strength = 0.0
        self.measured = False
        self._last: float | None = None
        self._sum: Tensor | None = None
        self._count = 0
        self._partial: list[Any] = []  # sharded gradients: ``_sum`` is this rank's share, summed over these groups

    @torch.no_grad()
    def observe(self, params: Iterable[Tensor]) -> None:
        """Add this step's mean ``|grad|`` over ``params`` (those with a gradient) to the measure, until measured."""
        if self.measured:
            return
        grads = [p.grad.detach() for p in params if p.grad is not None]
        if not grads:
            return
        sharded = [g for g in grads if is_sharded(g)]
        if sharded:  # each rank's share of the mean, summed over the shards at the epoch's end
            total = sum(g.numel() for g in grads)
            mean = torch.stack([local(g).abs().float().sum() for g in grads]).sum() / total
            self._partial = self._partial or shard_groups(sharded[0])
        else:
            mean = torch.cat([g.reshape(-1) for g in grads]).abs().float().mean()
        self._sum = mean if self._sum is None else self._sum + mean.to(self._sum.device)
        self._count += 1

    def end_epoch(self, share_ratio: float | None = None, settled: bool = True) -> None:
        """The first epoch with a measure sets the strength; later ones steer it by ``share_ratio``'s fall and,
        once polarised, by whether the masks have ``settled``."""
        if not self.measured:
            if self._sum is not None and self._count:
                for group in self._partial:
                    torch.distributed.all_reduce(self._sum, group=group)
                self.measure = float(self._sum) / self._count
                self.strength = self.ratio * self.measure
                self.measured = True
                self._last = share_ratio
            self._sum, self._count, self._partial = None, 0, []
            return
        if share_ratio is None or share_ratio != share_ratio:  # no mask this epoch (NaN: not measured)
            return
        last, self._last = self._last, share_ratio
        if share_ratio <= self.hold_below:  # polarised: weaker only while the masks still move
            if not settled:
                self.strength = max(self.strength / self.step, self.min_ratio * self.measure)
        elif last is not None:
            fall = last - share_ratio
            factor = self.step if fall < self.rate / 2 else 1 / self.step if fall > 2 * self.rate else 1.0
            self.strength = min(max(self.strength * factor, self.ratio * self.measure), self.max_ratio * self.measure)

    def state_dict(self) -> dict[str, Any]:
        return {"strength": self.strength, "measured": self.measured, "measure": self.measure, "last": self._last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strength, self.measured = float(state["strength"]), bool(state["measured"])
        self.measure, self._last = float(state.get("measure", 0.0)), state.get("last")


class GrowingDecay:
    """How hard a waiting ticket's pruned units are pulled to zero: a decay per epoch that grows until it is ready.

    The pull is an L2 penalty ``lam * p`` on the gradient of the pruned units' parameters (growing
    regularisation, Wang et al., "Neural Pruning via Growing Regularization", ICLR 2021), smooth where an L1
    ``sign(p)`` term makes momentum SGD oscillate around zero. Its strength is the fraction of a parameter's value
    it removes per epoch, ``decay``, so that one setting fits every run: :meth:`strength` turns it into ``lam``
    for the run's steps per epoch, learning rate and momentum (SGD: ``1 - decay = exp(-lr * lam * steps /
    (1 - momentum))``). It starts at ``start`` and is multiplied by ``growth`` at the end of every epoch at which
    the ticket is not ready yet, up to ``max_decay``.

    Args:
        start: the fraction removed per epoch at first, in (0, 1).
        growth: factor on the decay at the end of every epoch that is not ready, at least 1.
        max_decay: the largest decay per epoch, in [start, 1).

    Raises:
        ValueError: on a value out of range.

    Example::

        decay = GrowingDecay()
        pull.apply(decay.strength(steps_per_epoch=24, lr=0.1, momentum=0.9))  # at every step (a MaskedDecay)
        decay.end_epoch(ready=False)  # at the end of an epoch that is not ready: the decay grows
    """

    def __init__(self, start: float = 0.1, growth: float = 1.5, max_decay: float = 0.9) -> None:
        self.start = check_number("start", start, low=0.0, high=1.0, low_open=True, high_open=True)
        self.growth = check_number("growth", growth, low=1.0)
        self.max_decay = check_number("max_decay", max_decay, low=self.start, high=1.0, high_open=True)
        self.decay = self.start

    def strength(self, steps_per_epoch: float, lr: float, momentum: float = 0.0) -> float:
        """The per-step ``lam`` that removes ``decay`` of a parameter's value per epoch under SGD (0 at lr 0)."""
        if lr <= 0:
            return 0.0
        momentum = min(max(momentum, 0.0), 0.999)
        return -math.log1p(-self.decay) * (1.0 - momentum) / (lr * max(1.0, float(steps_per_epoch)))

    def end_epoch(self, ready: bool) -> None:
        """Grow the decay unless the ticket is ready."""
        if not ready:
            self.decay = min(self.decay * self.growth, self.max_decay)

    def state_dict(self) -> dict[str, float]:
        return {"decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])


class MaskedDecay:
    """The L2 pull ``lam * p`` on the gradient of a mask's pruned units' parameters only; kept units are untouched.

    Which parameters a unit owns is the source's business (the parameters WORM truncates,
    :meth:`~lightning_worm.ScoreSource.gradient_factors`: for BatchNorm channels the weight and the bias), so a
    pruned unit fades out as a whole and its removal changes less. Call :meth:`set` when the mask changes and
    :meth:`apply` once per optimizer step on the true gradient, like :func:`add_sparsity_gradient`.

    Args:
        model: the model whose tracked units are pulled.
        source: what is scored; BatchNorm ``|gamma|`` by default.

    Example::

        pull = MaskedDecay(model)
        pull.set(unit_mask(model, 0.5))
        loss.backward()
        pull.apply(1e-2)
        optimizer.step()
    """

    def __init__(self, model: nn.Module, source: str | ScoreSource | None = None) -> None:
        self.model = model
        self.source = resolve_source(source)
        self.pulled_units = 0
        self._params: list[Tensor] = []
        self._pruned: list[Tensor] = []

    def set(self, mask: MaskLike | None) -> None:
        """Pull the units ``mask`` prunes (``True`` = keep) from now on; ``None`` pulls nothing.

        Raises:
            ValueError: if the mask names an entry that is not tracked or does not fit it.
        """
        self._params, self._pruned, self.pulled_units = [], [], 0
        if mask is None:
            return
        factors = GradientTruncation(self.model, self.source)  # chi = 0: factor 0 exactly on the pruned units
        pairs = factors.factors(Mask.from_dict(mask), chi=0.0)
        self._params = [param for param, _ in pairs]
        self._pruned = [local_part(1.0 - factor, param) for param, factor in pairs]  # sharded: this rank's part
        self.pulled_units = factors.truncated_units

    @torch.no_grad()
    def apply(self, strength: float) -> None:
        """Add ``strength * p`` on the pruned units' entries of each parameter's gradient, in place."""
        check_number("strength", strength, low=0.0)
        triples = [(local(p.grad), local(p), m) for p, m in zip(self._params, self._pruned, strict=True)
                   if p.grad is not None]
        if strength == 0.0 or not triples:
            return
        grads, params, masks = zip(*triples, strict=True)
        foreach_add_masked_(grads, params, masks, strength)
