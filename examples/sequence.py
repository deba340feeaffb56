"""An offline sequence task and a small text transformer for the transformer benchmarks.

**The task: which of two numbers is larger.** A sequence writes two ``num_digits``-digit numbers in base
``base``, most significant digit first, separated by a marker; the label is 1 if the first number is larger::

    2 0 3 1 1 0 | 2 0 3 0 3 3   ->  1   (equal down to the 4th digit, where 1 > 0)

The two numbers share a common prefix whose length is uniform in ``0 .. num_digits-1`` and then differ, so every
digit position decides the label equally often and the classes are balanced. Nothing about the answer is in the
token counts: the model has to align each digit of the first number with the digit at the same place of the
second (attention by position, ``num_digits + 1`` tokens apart), compare the two (a small lookup table: the MLPs)
and read the comparison at the first place where they differ (attention over positions). Generated procedurally
from a seed (no download). With the defaults (6 digits in base 4; 10 000 train / 5 000 val / 5 000 test) the
default :class:`SequenceClassifier` (2 blocks of width 64, 4 heads, MLP ratio 4; AdamW at 3e-3, cosine over 30
epochs, batch 128) sits at chance for 3-4 epochs, climbs unevenly through 80-95 % and ends at 99.6-99.8 %
validation accuracy (two seeds), about 2.5 s an epoch on one CPU thread.

**The model** (:class:`TextTransformer`): token embedding, a class token, learned positions, ``depth``
pre-norm blocks of :mod:`examples.vit` (``Block``/``Attention``: separate ``q_proj``/``k_proj``/``v_proj``,
an own ``out_proj`` and ``num_heads``, so :class:`~lightning_worm.AttentionHeadSource` finds every block's
heads by itself), a final LayerNorm and a linear head on the class token. :class:`SequenceClassifier` trains
it with AdamW and a cosine schedule, as :class:`~examples.vit.ViTClassifier` trains its ViT.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from examples.data import _SplitDataModule
from examples.module import ImageClassifier
from examples.vit import Block, ViTClassifier


def make_comparison(n: int, num_digits: int = 6, base: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` number-comparison sequences and their labels, a function of the arguments alone.

    Token ids: digits ``0 .. base-1`` and the separator ``base`` (vocabulary ``base + 1``). A sequence is
    ``a_1 .. a_D | b_1 .. b_D`` (length ``2 * num_digits + 1``, most significant digit first). The place ``k`` of
    the first difference is uniform in ``1 .. D``: ``b_i = a_i`` before it, ``b_k = (a_k + s) mod base`` with
    ``s`` uniform in ``1 .. base-1``, and the digits after it are independent. The label is ``a_k > b_k``
    (the first number is larger), 1 for exactly half of the pairs ``(a_k, s)``.

    Returns:
        ``(tokens, labels)``: int64 ``(n, 2 * num_digits + 1)`` and int64 ``(n,)`` in ``{0, 1}``.

    Raises:
        ValueError: if ``num_digits < 1`` or ``base < 2``.
    """
    if num_digits < 1 or base < 2:
        raise ValueError(f"Need `num_digits` >= 1 and `base` >= 2, got {num_digits} and {base}.")
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(base, (n, num_digits), generator=g)
    b = torch.randint(base, (n, num_digits), generator=g)
    first = torch.randint(num_digits, (n,), generator=g)  # the place of the first difference
    shift = torch.randint(1, base, (n,), generator=g)
    b = torch.where(torch.arange(num_digits) < first[:, None], a, b)
    rows = torch.arange(n)
    b[rows, first] = (a[rows, first] + shift) % base
    labels = (a[rows, first] > b[rows, first]).long()
    return torch.cat([a, torch.full((n, 1), base), b], dim=1), labels


class SequenceTaskDataModule(_SplitDataModule):
    """Number comparison (see :func:`make_comparison`), generated offline from ``seed``: train/val/test splits.

    The three splits are drawn independently from the same generator stream (no sequence is shared on purpose;
    with the defaults a collision is vanishingly rare). The data depend on ``seed`` only; shuffling follows the
    global seed (:func:`~lightning.pytorch.seed_everything`).

    Args:
        batch_size: sequences per batch.
        num_workers: dataloader worker processes.
        seed: seed of the data.
        train_size: training sequences.
        val_size: validation sequences.
        test_size: test sequences.
        num_digits: digits per number (sequences of ``2 * num_digits + 1`` tokens).
        base: digits ``0 .. base-1``.

    Attributes:
        vocab_size: token ids (``base + 1``), the model's ``vocab_size``.
        length: tokens per sequence, the model's ``max_length``.
        num_classes: 2.

    Example::

        >>> datamodule = SequenceTaskDataModule(train_size=64, val_size=32, test_size=32)
        >>> datamodule.setup("fit")
        >>> tokens, label = datamodule.train_dataset[0]
        >>> tokens.shape, datamodule.vocab_size, datamodule.num_classes
        (torch.Size([13]), 5, 2)
    """

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        train_size: int = 10000,
        val_size: int = 5000,
        test_size: int = 5000,
        num_digits: int = 6,
        base: int = 4,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.sizes = (train_size, val_size, test_size)
        self.num_digits = num_digits
        self.base = base
        self.num_classes = 2
        self.vocab_size = base + 1
        self.length = 2 * num_digits + 1
        self.input_shape = (self.length,)  # one example: its tokens

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        tokens, labels = make_comparison(sum(self.sizes), self.num_digits, self.base, self.seed)
        n_train, n_val, _ = self.sizes
        bounds = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, len(labels))]
        self.train_dataset, self.val_dataset, self.test_dataset = (
            TensorDataset(tokens[a:b], labels[a:b]) for a, b in bounds
        )
        rank_zero_info(
            f"Number comparison generated offline (seed {self.seed}, {self.num_digits} digits in base {self.base},"
            f" length {self.length}): {n_train} train / {n_val} val / {bounds[2][1] - bounds[2][0]} test sequences."
        )


class TextTransformer(nn.Module):
    """Token embedding, a class token, learned positions, ``depth`` pre-norm blocks, a linear head.

    The blocks are :class:`examples.vit.Block` (their attention has ``q_proj``/``k_proj``/``v_proj``/
    ``out_proj`` and ``num_heads``, as :class:`~lightning_worm.AttentionHeadSource` expects).

    Args:
        vocab_size: token ids ``0 .. vocab_size-1``.
        max_length: longest input sequence (the class token comes on top).
        num_classes: output logits.
        dim: token width.
        depth: number of blocks.
        num_heads: heads per block.
        mlp_ratio: hidden width of the MLP relative to ``dim``.

    Example::

        >>> model = TextTransformer(vocab_size=5, max_length=13, num_classes=2)
        >>> model(torch.zeros(2, 13, dtype=torch.long)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self, vocab_size: int, max_length: int, num_classes: int, dim: int = 64, depth: int = 2,
        num_heads: int = 4, mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + max_length, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class SequenceClassifier(ImageClassifier):
    """A :class:`TextTransformer` trained with AdamW, cross-entropy and a cosine schedule over ``trainer.max_epochs``.

    It shares :class:`~examples.module.ImageClassifier`'s steps and logged keys (``train/loss``, ``train/acc``,
    ``val/loss``, ``val/acc`` on the progress bar, ``test/loss``, ``test/acc``, once per epoch) and
    :class:`~examples.vit.ViTClassifier`'s optimizer and schedule, which are built afresh from ``self.parameters()``
    each call, so a pruning callback can rebuild them mid-fit.

    Args:
        vocab_size: token ids (the data module's ``vocab_size``).
        max_length: longest sequence (the data module's ``length``).
        num_classes: classes (the data module's ``num_classes``).
        dim: token width.
        depth: number of blocks.
        num_heads: heads per block.
        mlp_ratio: MLP width relative to ``dim``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> Trainer(max_epochs=30).fit(SequenceClassifier(), datamodule=SequenceTaskDataModule())  # doctest: +SKIP
    """

    def __init__(
        self, vocab_size: int = 5, max_length: int = 13, num_classes: int = 2, dim: int = 64, depth: int = 2,
        num_heads: int = 4, mlp_ratio: float = 4.0, lr: float = 3e-3, weight_decay: float = 0.05,
    ) -> None:
        hparams = {k: v for k, v in locals().items() if k != "self"}
        LightningModule.__init__(self)  # not ImageClassifier's: that one builds a CNN
        self.save_hyperparameters(hparams)
        self.model = TextTransformer(vocab_size, max_length, num_classes, dim, depth, num_heads, mlp_ratio)
        self.example_input_array = torch.zeros(1, max_length, dtype=torch.long)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    configure_optimizers = ViTClassifier.configure_optimizers  # AdamW, cosine over max_epochs
