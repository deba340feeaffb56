import pickle
import socket

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from examples.data import CIFAR10DataModule, DigitsDataModule
from examples.models import MODELS, build_model, resnet18, vgg11_bn
from examples.module import ImageClassifier

TRAINER_KWARGS = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_widths(model: nn.Module) -> list[int]:
    return [module.num_features for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_models_map_their_inputs_to_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, width=0.25)
    assert model(torch.randn(2, *model.input_shape)).shape == (2, 10)


def test_model_structure_follows_the_paper():
    resnet = resnet18()
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962  # CIFAR ResNet-18
    vgg = vgg11_bn()
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.features) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.features) == 4
    assert vgg.classifier.in_features == 512


@pytest.mark.parametrize("factory", [resnet18, vgg11_bn])
def test_width_scales_every_channel(factory):
    full, quarter = _bn_widths(factory(width=1.0)), _bn_widths(factory(width=0.25))
    assert quarter == [channels // 4 for channels in full]
    n_params = [sum(p.numel() for p in factory(width=width).parameters()) for width in (0.25, 1.0)]
    assert n_params[0] < n_params[1] / 10


def test_kaiming_init_as_torchvision():
    torch.manual_seed(0)
    model = vgg11_bn()
    conv = model.features[4]  # 64 -> 128 channels
    expected_std = (2.0 / (conv.out_channels * 9)) ** 0.5  # fan-out
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown arch 'resnet50'; choose one of: cnn1d, resnet18, vgg11_bn"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="Unknown arch"):
        ImageClassifier(arch="alexnet")
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        ImageClassifier(schedule="linear")
    with pytest.raises(ValueError, match="`width` must be positive"):
        build_model("vgg11_bn", width=0.0)


def test_digits_datamodule_splits_deterministically(lightning_info):
    datamodule = DigitsDataModule(batch_size=16, seed=3)
    datamodule.setup("fit")
    assert "Using scikit-learn's bundled digits (offline, 1797 images) resized to 32x32" in lightning_info.text

    splits = [datamodule.train_dataset.indices, datamodule.val_dataset.indices, datamodule.test_dataset.indices]
    assert [len(split) for split in splits] == [1257, 270, 270]
    assert len(set().union(*map(set, splits))) == 1797
    again = DigitsDataModule(seed=3)
    again.setup("fit")
    assert again.val_dataset.indices == datamodule.val_dataset.indices
    other = DigitsDataModule(seed=4)
    other.setup("fit")
    assert other.val_dataset.indices != datamodule.val_dataset.indices

    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, *datamodule.input_shape) and labels.dtype == torch.long
    val_images = torch.cat([batch[0] for batch in datamodule.val_dataloader()])
    assert val_images.mean().abs() < 0.2 and 0.8 < val_images.std() < 1.2
    assert torch.equal(val_images[:, 0], val_images[:, 2])  # grey replicated to 3 channels
    assert datamodule.num_classes == 10


def test_image_classifier_fits_and_tests_on_digits():
    L.seed_everything(0)
    model = ImageClassifier(arch="resnet18", width=0.125)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=2, **TRAINER_KWARGS
    )
    datamodule = DigitsDataModule(batch_size=32)
    trainer.fit(model, datamodule=datamodule)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    (results,) = trainer.test(model, datamodule=datamodule, verbose=False)
    assert 0.0 <= results["test/acc"] <= 1.0
    assert model.hparams.arch == "resnet18" and model.hparams.width == 0.125


class _ShrinkAndRebuild(L.Callback):
    """At ``epochs``, swaps in a new classifier and rebuilds the optimizers as PruneAndFinetune does."""

    def __init__(self, epochs, carry_schedule):
        self.epochs = epochs
        self.carry_schedule = carry_schedule
        self.lrs = []

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch in self.epochs:
            old_optimizer, old_scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
            pl_module.model.classifier = nn.Linear(pl_module.model.classifier.in_features, 10)
            trainer.strategy.setup_optimizers(trainer)
            optimizer = trainer.optimizers[0]
            assert [id(p) for group in optimizer.param_groups for p in group["params"]] == [
                id(p) for p in pl_module.parameters()
            ]
            assert optimizer.param_groups[0]["lr"] == 0.1  # a fresh schedule
            if self.carry_schedule:
                trainer.lr_scheduler_configs[0].scheduler.load_state_dict(old_scheduler.state_dict())
                optimizer.param_groups[0]["lr"] = old_optimizer.param_groups[0]["lr"]
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("step", [0.1, 0.1, 0.01, 0.001]), ("cosine", [0.1, 0.08535534, 0.05, 0.01464466])],
)
@pytest.mark.parametrize("rebuild_at", [(), (2,), (1, 3)])
def test_configure_optimizers_can_be_called_again_mid_fit(schedule, expected, rebuild_at):
    L.seed_everything(0)
    model = ImageClassifier(arch="vgg11_bn", width=0.125, schedule=schedule)
    rebuild = _ShrinkAndRebuild(rebuild_at, carry_schedule=True)
    trainer = L.Trainer(
        max_epochs=4, limit_train_batches=1, limit_val_batches=0, callbacks=[rebuild], **TRAINER_KWARGS
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=8))
    assert rebuild.lrs == pytest.approx(expected)


def test_rebuilt_schedule_restarts_unless_carried():
    model = ImageClassifier(arch="vgg11_bn", width=0.125, schedule="step")
    rebuild = _ShrinkAndRebuild((3,), carry_schedule=False)
    trainer = L.Trainer(
        max_epochs=4, limit_train_batches=1, limit_val_batches=0, callbacks=[rebuild], **TRAINER_KWARGS
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=8))
    assert rebuild.lrs == pytest.approx([0.1, 0.1, 0.01, 0.1])


def test_step_schedule_needs_finite_epochs():
    model = ImageClassifier(arch="vgg11_bn", width=0.125)
    model.trainer = L.Trainer(max_epochs=-1, max_steps=10, **TRAINER_KWARGS)
    with pytest.raises(ValueError, match="finite `Trainer\\(max_epochs=...\\)`"):
        model.configure_optimizers()


def _no_network(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")


@pytest.mark.timeout(60)
def test_cifar10_missing_data_never_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)  # offline, whatever the machine has

    datamodule = CIFAR10DataModule(data_dir=tmp_path, download=False)
    datamodule.prepare_data()
    missing = "CIFAR-10 is not at .*Get it with `--data.download true`.*cifar-10-batches-py"
    with pytest.raises(RuntimeError, match=missing):
        datamodule.setup("fit")

    downloading = CIFAR10DataModule(data_dir=tmp_path, download=True)
    with pytest.raises(RuntimeError, match="Downloading CIFAR-10 .* failed .*Name or service not known") as error:
        downloading.prepare_data()
    assert "cifar-10-batches-py" in str(error.value)


def _write_fake_cifar10(root, images_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (images_per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, images_per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def test_cifar10_datamodule_on_local_files(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    _write_fake_cifar10(tmp_path)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args: True)  # the fake files have other md5s
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)

    datamodule = CIFAR10DataModule(data_dir=tmp_path, download=True, batch_size=4, num_workers=0, val_size=5)
    datamodule.prepare_data()  # data present: no download attempted
    datamodule.setup("fit")
    assert (len(datamodule.train_dataset), len(datamodule.val_dataset), len(datamodule.test_dataset)) == (15, 5, 4)
    assert not set(datamodule.train_dataset.indices) & set(datamodule.val_dataset.indices)
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_models_can_be_physically_pruned(arch):
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = build_model(arch, width=0.25)
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        nn.init.uniform_(bn.weight)  # break the ties of the unit init
    head = model.fc if arch == "resnet18" else model.classifier
    before = sum(_bn_widths(model))
    pruner = tp.pruner.MetaPruner(
        model,
        torch.zeros(1, *model.input_shape),
        importance=tp.importance.BNScaleImportance(),
        pruning_ratio=0.5,
        ignored_layers=[head],
    )
    pruner.step()
    assert sum(_bn_widths(model)) == pytest.approx(before / 2, rel=0.05)
    assert model(torch.randn(2, *model.input_shape)).shape == (2, 10)


def test_image_classifier_can_be_pruned_by_the_surgery():
    """A module holding torchmetrics Metrics (whose `==` is overloaded) is pruned like any other."""
    from lightning_worm import prune_channels

    model = ImageClassifier(arch="vgg11_bn", width=0.25)
    ticket = {
        name: torch.rand(bn.num_features) > 0.5 for name, bn in model.named_modules() if isinstance(bn, nn.BatchNorm2d)
    }
    report = prune_channels(model, ticket, model.example_input_array, measure_latency=False)
    assert report.params_after < report.params_before
