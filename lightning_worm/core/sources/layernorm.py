"""LayerNorm (and RMSNorm) channels scored by ``|gamma|``: the transformer analogue of network slimming."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch import nn

from lightning_worm.core.sources.base import ScaleSource


REFUSAL = (
    "LayerNormSource cannot remove channels physically: a transformer's LayerNorm channels are its residual "
    "stream, shared by every block, so removing one couples the whole model. To make the model smaller, track "
    "`AttentionHeadSource()` (removes whole heads); to keep LayerNorm tracking, set `PruneAndFinetune` aside and "
    "use the ticket for analysis or WORM only."
)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    # Duck typing for the norms of other libraries (Hugging Face's LlamaRMSNorm, T5LayerNorm, ...).
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    return (name.endswith("LayerNorm") or name.endswith("RMSNorm")) and isinstance(weight, nn.Parameter)


class LayerNormSource(ScaleSource):
    r"""Channels are the features of LayerNorm / RMSNorm layers, scored by ``|gamma|``.

    Tracks every ``nn.LayerNorm`` and ``nn.RMSNorm`` (and, by class name, other libraries' ``*LayerNorm``
    / ``*RMSNorm`` modules with a ``weight``) that has a 1-D learnable scale whose weight requires grad.
    WORM truncates the gradients of its weight and bias; the sparsity term regularises its weight.

    Pruning LayerNorm channels physically is refused: in a transformer they are the residual stream,
    shared by every block, the embeddings and the classifier, so one channel can only go everywhere at
    once. Use :class:`~lightning_worm.AttentionHeadSource` to make a transformer smaller, or this source to
    watch (and truncate) the residual stream's scales.

    Example::

        early_bird = EarlyBirdCallback(prune_ratio=0.3, source=LayerNormSource())
    """

    key = "layernorm"
    description = "LayerNorm/RMSNorm channels (|gamma| of norms with a learnable 1-D scale)"

    def candidates(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, module in model.named_modules():
            if _is_norm(module):
                yield name, module

    def skip_reason(self, module: nn.Module) -> Optional[str]:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            return "no learnable scale (elementwise_affine=False)"
        if weight.dim() != 1:
            return f"scale of shape {tuple(weight.shape)}, not one per channel (normalized_shape must be 1-D)"
        if not weight.requires_grad:
            return "weight frozen (requires_grad=False)"
        return None

    def check_prunable(self, model: nn.Module) -> None:
        raise ValueError(REFUSAL)

    def prune(self, model: nn.Module, ticket: Any, example_input: Any = None, **options: Any) -> Any:
        raise NotImplementedError(REFUSAL)
