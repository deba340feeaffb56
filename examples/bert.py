"""The WORM paper's transformer recipe on a BERT-style encoder: element-wise query/key tickets.

The encoder is Hugging Face's ``BertForSequenceClassification`` built from a small ``BertConfig`` with
random weights (nothing is downloaded); the data are synthetic token sequences whose label says whether
token 1 occurs more often than token 2 (attention has to compare positions). The search scores every
weight of every query and key projection (``AttentionQKSource``) with the paper's settings (ratio 0.5,
window 3, threshold 0.01, no ticket at the first full window) and WORM's two-stage schedule. At the
ticket the pruned weights become fixed zeros: **that saves no time** (dense kernels run as before);
use ``--heads`` to search and remove whole heads instead, which does, or ``--earlybert`` for EarlyBERT's
ticket (``source="earlybert"``: 1/3 of the heads of every layer and 40 % of the feed-forward neurons
overall, scored by slimming gates; both removed at the ticket, the gates folded into the weights)::

    python -m examples.bert                 # element-wise, the paper's recipe
    python -m examples.bert --heads         # attention heads, removed physically at the ticket
    python -m examples.bert --earlybert     # heads and feed-forward neurons, EarlyBERT's ticket

Needs ``transformers`` (an optional extra of lightning-worm).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_worm import (
    AttentionHeadSource,
    AttentionQKSource,
    EarlyBirdCallback,
    PruneAndFinetune,
    WormCallback,
)


class CountingDataModule(LightningDataModule):
    """Random token sequences; the label is 1 if token 1 occurs more often than token 2, else 0.

    Args:
        n: sequences in all (split 80/20 into train/val).
        length: tokens per sequence.
        vocab_size: tokens 0..vocab_size-1 (0 is never drawn: it is the padding token).
        batch_size: sequences per batch.
        seed: seed of the data.
    """

    def __init__(self, n: int = 2048, length: int = 16, vocab_size: int = 16, batch_size: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(1, vocab_size, (n, length), generator=g)
        labels = ((tokens == 1).sum(1) > (tokens == 2).sum(1)).long()
        split = int(0.8 * n)
        self.train_set = TensorDataset(tokens[:split], labels[:split])
        self.val_set = TensorDataset(tokens[split:], labels[split:])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class BertClassifier(LightningModule):
    """A random-weight ``BertForSequenceClassification`` from a small config; forward returns logits.

    Args:
        vocab_size: tokens.
        hidden_size: model width.
        num_layers: encoder layers.
        num_heads: attention heads per layer.
        max_length: longest sequence.
        num_labels: classes.
        lr: AdamW learning rate.
    """

    def __init__(self, vocab_size: int = 16, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 max_length: int = 16, num_labels: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import BertConfig, BertForSequenceClassification  # optional: only this example needs it

        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
                            max_position_embeddings=max_length, num_labels=num_labels, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = BertForSequenceClassification(config)
        self.example_input_array = torch.ones(2, max_length, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bert(tokens).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        tokens, labels = batch
        logits = self(tokens)
        self.log("val/loss", F.cross_entropy(logits, labels), on_step=False, on_epoch=True)
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def callbacks(
    heads: bool = False, earlybert: bool = False, threshold: float | None = None,
    wait_for: Literal["ready", "ticket"] = "ready",
) -> tuple[EarlyBirdCallback, WormCallback, PruneAndFinetune]:
    """The paper's element-wise recipe, the structured head variant (``heads=True``) or EarlyBERT's ticket
    (``earlybert=True``: heads and feed-forward neurons in one search); ``threshold`` replaces the mode's."""
    if heads and earlybert:
        raise ValueError("Choose one of `heads` and `earlybert`.")
    if earlybert:  # each source has its own ratio: the tracker's prune_ratio is not used
        early_bird = EarlyBirdCallback(window=3, threshold=0.1 if threshold is None else threshold,
                                       source="earlybert")
    elif heads:
        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.1 if threshold is None else threshold,
                                       source=AttentionHeadSource())
    else:
        early_bird = EarlyBirdCallback(prune_ratio=0.5, window=3, threshold=0.01 if threshold is None else threshold,
                                       source=AttentionQKSource(), accept_first_window=False)
    prune = PruneAndFinetune(early_bird, wait_for=wait_for)
    return early_bird, WormCallback(early_bird, schedule="two_stage"), prune


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Train, search, prune at the ticket, fine-tune; returns a short summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--heads", action="store_true", help="search and remove whole attention heads")
    mode.add_argument("--earlybert", action="store_true",
                      help="EarlyBERT's ticket: heads (1/3 per layer) and feed-forward neurons (40 %%), slimming gates")
    parser.add_argument("--threshold", type=float, default=None,
                        help="the ticket's mask distance threshold (default: 0.01 element-wise, else 0.1)")
    parser.add_argument("--wait_for", choices=("ready", "ticket"), default="ready",
                        help="prune once the ticket is ready (default) or as soon as it emerges")
    parser.add_argument("--max_epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--default_root_dir", default="runs/bert")
    ns = parser.parse_args(args)
    L.seed_everything(ns.seed)
    model, data = BertClassifier(), CountingDataModule(seed=ns.seed)
    early_bird, worm, prune = callbacks(ns.heads, ns.earlybert, ns.threshold, ns.wait_for)
    trainer = L.Trainer(max_epochs=ns.max_epochs, callbacks=[early_bird, worm, prune], accelerator="cpu",
                        default_root_dir=ns.default_root_dir, enable_checkpointing=False, log_every_n_steps=5)
    trainer.fit(model, datamodule=data)
    summary = {
        "source": early_bird.source.key,
        "ticket_epoch": early_bird.ticket_epoch,
        "mean_distances": early_bird.mean_distances,
        "chi": worm.chi,
        "pruned_epoch": prune.pruned_epoch,
        "params": None if prune.report is None else [prune.report["params_before"], prune.report["params_after"]],
        # units before and after, per source (one per member of a SourceList: heads, neurons)
        "shares": None if prune.report is None else {label: [share["before"], share["after"]]
                                                     for label, share in prune.report["shares"].items()},
        "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
    }
    print(summary)
    return summary


if __name__ == "__main__":
    main()
