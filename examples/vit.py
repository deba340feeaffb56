"""A small vision transformer in plain PyTorch, with separate query/key/value projections.

Its attention blocks are what :class:`~lightning_worm.AttentionHeadSource` recognises by itself
(``q_proj``/``k_proj``/``v_proj`` Linear layers, a ``num_heads`` attribute, an own ``out_proj``), so
whole heads can be searched, truncated by WORM and removed::

    python -m examples.main --config examples/configs/vit_digits.yaml

On the offline digits (3x32x32, upsampled from 8x8), ``patch_size=8`` cuts each image into 16 patches,
each covering 2x2 pixels of the original digit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics.classification import MulticlassAccuracy

from examples.module import ImageClassifier


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections; its forward reads ``num_heads``.

    Args:
        dim: token width.
        num_heads: heads; ``dim`` must divide by it.

    Raises:
        ValueError: if ``dim`` is not a multiple of ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be a multiple of `num_heads` ({num_heads}).")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding, a class token, learned positions, ``depth`` blocks, a linear head.

    Args:
        image_size: side of the square input images.
        patch_size: side of the square patches (``image_size`` must divide by it).
        in_channels: input channels.
        num_classes: output logits.
        dim: token width.
        depth: number of blocks.
        num_heads: heads per block.
        mlp_ratio: hidden width of the MLP relative to ``dim``.

    Raises:
        ValueError: if ``image_size`` is not a multiple of ``patch_size`` (or ``dim`` of ``num_heads``).

    Example::

        >>> model = VisionTransformer(num_heads=4)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, image_size: int = 32, patch_size: int = 8, in_channels: int = 3, num_classes: int = 10,
        dim: int = 64, depth: int = 4, num_heads: int = 8, mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"`image_size` ({image_size}) must be a multiple of `patch_size` ({patch_size}).")
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch_size) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class ViTClassifier(ImageClassifier):
    """A :class:`VisionTransformer` trained with AdamW and a cosine schedule over ``trainer.max_epochs``.

    It shares :class:`~examples.module.ImageClassifier`'s steps and logged keys (``train/loss``,
    ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` per epoch), and is a subclass of
    it so that the example CLI selects it with ``model.class_path``. :meth:`configure_optimizers` builds a
    fresh optimizer from ``self.parameters()`` each call, so a pruning callback can rebuild it mid-fit.

    Args:
        num_classes: number of classes.
        image_size: side of the input images.
        patch_size: side of the patches.
        dim: token width.
        depth: number of blocks.
        num_heads: heads per block.
        mlp_ratio: MLP width relative to ``dim``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from examples.data import DigitsDataModule
        >>> Trainer(max_epochs=20).fit(ViTClassifier(), datamodule=DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self, num_classes: int = 10, image_size: int = 32, patch_size: int = 8, dim: int = 64, depth: int = 4,
        num_heads: int = 8, mlp_ratio: float = 2.0, lr: float = 3e-3, weight_decay: float = 0.05,
    ) -> None:
        hparams = {k: v for k, v in locals().items() if k != "self"}
        LightningModule.__init__(self)  # not ImageClassifier's: that one builds a CNN
        self.save_hyperparameters(hparams)
        self.model = VisionTransformer(image_size, patch_size, 3, num_classes, dim, depth, num_heads, mlp_ratio)
        self.example_input_array = torch.zeros(1, 3, image_size, image_size)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"{type(self).__name__}'s cosine schedule needs a finite `Trainer(max_epochs=...)`.")
        scheduler = CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
