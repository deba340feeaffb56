import lightning as L
import pytest
import torch

from examples.sequence import SequenceClassifier, SequenceTaskDataModule, TextTransformer, make_comparison
from lightning_worm import AttentionHeadSource

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINER_KWARGS = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def _splits(datamodule: SequenceTaskDataModule) -> list[torch.Tensor]:
    datamodule.setup("fit")
    return [t for ds in (datamodule.train_dataset, datamodule.val_dataset, datamodule.test_dataset) for t in ds.tensors]


def test_data_are_a_function_of_the_seed():
    sizes = dict(train_size=300, val_size=200, test_size=100)
    first, again = _splits(SequenceTaskDataModule(seed=3, **sizes)), _splits(SequenceTaskDataModule(seed=3, **sizes))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = _splits(SequenceTaskDataModule(seed=4, **sizes))
    assert not torch.equal(first[0], other[0])
    assert [len(t) for t in first[1::2]] == [300, 200, 100]


def test_labels_say_which_number_is_larger_and_are_balanced():
    num_digits, base = 6, 4
    tokens, labels = make_comparison(5000, num_digits, base, seed=0)
    assert tokens.shape == (5000, 2 * num_digits + 1) and tokens.dtype == labels.dtype == torch.long
    assert (tokens[:, num_digits] == base).all() and tokens.max() == base  # the separator, digits below it
    weights = base ** torch.arange(num_digits - 1, -1, -1)
    a, b = (tokens[:, :num_digits] * weights).sum(1), (tokens[:, num_digits + 1 :] * weights).sum(1)
    assert (a != b).all() and torch.equal(labels, (a > b).long())
    assert 0.47 < labels.float().mean() < 0.53
    # the common prefix is uniform over 0 .. num_digits-1: every place decides the label about equally often
    first = (tokens[:, :num_digits] != tokens[:, num_digits + 1 :]).long().argmax(1)
    assert torch.bincount(first, minlength=num_digits).min() > 5000 / num_digits * 0.85


def test_model_maps_tokens_to_logits_and_its_heads_are_found():
    datamodule = SequenceTaskDataModule()
    model = SequenceClassifier(datamodule.vocab_size, datamodule.length, datamodule.num_classes, depth=3)
    assert model(torch.zeros(2, datamodule.length, dtype=torch.long)).shape == (2, 2)
    tracked = AttentionHeadSource().tracked(model)
    assert list(tracked) == [f"model.blocks.{i}.attn" for i in range(3)]
    assert [handle.num_heads for handle in tracked.values()] == [4, 4, 4]
    assert isinstance(model.model, TextTransformer)


def test_tiny_fit_runs_and_logs_accuracy():
    L.seed_everything(0, verbose=False)
    datamodule = SequenceTaskDataModule(batch_size=32, train_size=128, val_size=64, test_size=64, num_digits=3)
    model = SequenceClassifier(datamodule.vocab_size, datamodule.length, datamodule.num_classes, dim=16, depth=1,
                               num_heads=2, mlp_ratio=2.0)
    trainer = L.Trainer(max_epochs=2, **TRAINER_KWARGS)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.current_epoch == 2
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    (result,) = trainer.test(model, datamodule=datamodule, verbose=False)
    assert set(result) == {"test/loss", "test/acc"}
