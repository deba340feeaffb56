"""LightningDataModules for the examples: offline handwritten digits, MNIST-1D (generated offline) and CIFAR-10."""

import functools
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

# Normalisation constants of the Early-Bird / network-slimming CIFAR code.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class _TransformedSubset(Dataset):
    """``dataset[indices[i]]`` with ``transform`` applied to the image."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self.dataset[self.indices[index]]
        return self.transform(image), target


class _SplitDataModule(LightningDataModule):
    """Shared loaders of the two data modules; subclasses fill ``train/val/test_dataset`` in ``setup``."""

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)


class DigitsDataModule(_SplitDataModule):
    """scikit-learn's bundled handwritten digits (1797 8x8 images, no download) as 3x32x32 images.

    The images are resized to 32x32 (bilinear), replicated to 3 channels, normalised with the
    training split's mean and standard deviation, and split into stratified train/val/test sets
    (70/15/15 by default) that depend only on ``seed``.

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: seed of the train/val/test split. Shuffling and augmentation follow the global seed
            (:func:`~lightning.pytorch.seed_everything`).
        val_fraction: fraction of all images in the validation split.
        test_fraction: fraction of all images in the test split.
        augment: random translation of the training images by up to ``4`` pixels (one pixel of
            the original 8x8 image). Digits are never flipped.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> datamodule = DigitsDataModule(batch_size=64)
        >>> trainer = Trainer(max_epochs=20)
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP

    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.augment = augment

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
        labels = torch.as_tensor(digits.target, dtype=torch.long)

        indices = list(range(len(labels)))
        held_out = self.val_fraction + self.test_fraction
        train_idx, rest_idx = train_test_split(
            indices, test_size=held_out, stratify=digits.target, random_state=self.seed
        )
        val_idx, test_idx = train_test_split(
            rest_idx,
            test_size=self.test_fraction / held_out,
            stratify=digits.target[rest_idx],
            random_state=self.seed,
        )
        train_images = images[train_idx, 0]
        normalize = v2.Normalize([train_images.mean().item()] * 3, [train_images.std().item()] * 3)
        eval_transform = normalize
        train_transform = v2.Compose([v2.RandomCrop(32, padding=4), normalize]) if self.augment else normalize

        dataset = TensorDataset(images, labels)
        self.train_dataset = _TransformedSubset(dataset, train_idx, train_transform)
        self.val_dataset = _TransformedSubset(dataset, val_idx, eval_transform)
        self.test_dataset = _TransformedSubset(dataset, test_idx, eval_transform)
        rank_zero_info(
            f"Using scikit-learn's bundled digits (offline, {len(labels)} images) resized to 32x32:"
            f" {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test (split seed {self.seed})."
        )


class CIFAR10DataModule(_SplitDataModule):
    """torchvision's CIFAR-10 with the Early-Bird augmentation and a seeded 45k/5k train/val split.

    Training images get a random 32x32 crop of the 4-pixel padded image and a horizontal flip; all
    images are normalised with the CIFAR-10 channel statistics. The test set is the official one.

    Args:
        data_dir: directory that holds (or will hold) ``cifar-10-batches-py``.
        download: download the data in :meth:`prepare_data` if it is missing (needs internet).
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: seed of the train/val split. Shuffling and augmentation follow the global seed.
        val_size: images of the official training set held out for validation.

    Raises:
        RuntimeError:
            In :meth:`prepare_data` if the download fails, and in :meth:`setup` if the data is
            not in ``data_dir``. The data module never falls back to other data.

    Example::

        >>> datamodule = CIFAR10DataModule(data_dir="data", download=True)
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP

    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        seed: int = 0,
        val_size: int = 5000,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.data_dir = os.fspath(data_dir)
        self.download = download
        self.val_size = val_size

    def _place_it_yourself(self) -> str:
        return f"place the extracted 'cifar-10-batches-py' folder in {self.data_dir!r}"

    def _load(self, train: bool) -> Dataset:
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(self.data_dir, train=train, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
            raise RuntimeError(
                f"CIFAR-10 is not at {self.data_dir!r} (or is incomplete). Get it with `--data.download true`"
                f" (`download=True` in Python; needs internet), or {self._place_it_yourself()}."
            ) from err

    def prepare_data(self) -> None:
        if not self.download:
            return
        from torchvision.datasets import CIFAR10

        try:
            for train in (True, False):
                CIFAR10(self.data_dir, train=train, download=True)
        except (OSError, RuntimeError) as err:  # URLError and socket timeouts are OSErrors
            raise RuntimeError(
                f"Downloading CIFAR-10 to {self.data_dir!r} failed ({err}). Without internet,"
                f" {self._place_it_yourself()}."
            ) from err

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        train_transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *to_tensor])
        eval_transform = v2.Compose(to_tensor)

        train_set, test_set = self._load(train=True), self._load(train=False)
        permutation = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(self.seed)).tolist()
        train_idx, val_idx = permutation[self.val_size :], permutation[: self.val_size]
        self.train_dataset = _TransformedSubset(train_set, train_idx, train_transform)
        self.val_dataset = _TransformedSubset(train_set, val_idx, eval_transform)
        self.test_dataset = _TransformedSubset(test_set, range(len(test_set)), eval_transform)
        rank_zero_info(
            f"Using CIFAR-10 from {self.data_dir!r}: {len(train_idx)} train / {len(val_idx)} val"
            f" (split seed {self.seed}) / {len(test_set)} test."
        )


MNIST1D_LENGTH = 40


#: The generator's arguments of each MNIST-1D variant, over the package's defaults (those of the MNIST-1D paper).
#: ``"large"``: 4x the signals, more correlated and independent noise and more shear, so that a small CNN keeps
#: learning until its learning rate drops (see ``docs/benchmarks.md``).
MNIST1D_VARIANTS: dict[str, dict[str, float]] = {
    "paper": {"num_samples": 5000},
    "large": {"num_samples": 20000, "iid_noise_scale": 0.05, "corr_noise_scale": 0.4, "shear_scale": 1.0},
}
#: SHA-256 of each variant's data (generator seed 42), as :func:`mnist1d_checksum` takes it.
MNIST1D_CHECKSUMS = {
    "paper": "b75c8ac167f76c79754a29c827a06f434c966fc8970b8cf505964340d067c77a",
    "large": "7a129100d6e2396e35873a7d9b462b97dbde28db5aa569f88f00576a60563942",
}


def mnist1d_checksum(data: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a generated MNIST-1D: the signals rounded to 1e-4 (so that a CPU's last-bit rounding of the
    generator's arithmetic cannot change it) and the labels, train then test."""
    digest = hashlib.sha256()
    for key in ("x", "y", "x_test", "y_test"):
        value = data[key]
        if value.is_floating_point():
            value = torch.round(value * 1e4).to(torch.int64)
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def make_mnist1d(num_samples: int | None = None, seed: int = 42, variant: str = "paper") -> dict[str, torch.Tensor]:
    """Generate MNIST-1D with the ``mnist1d`` package's procedural generator (offline, nothing written to disk).

    Calls ``mnist1d.data.make_dataset`` with the package's default arguments (those of the MNIST-1D paper:
    signals of length 40, 80 % train / 20 % test) changed by :data:`MNIST1D_VARIANTS` ``[variant]``, and
    ``num_samples`` (``None``: the variant's) and ``seed``. A variant with a pinned checksum
    (:data:`MNIST1D_CHECKSUMS`) is checked against it when generated with its own size and seed 42. Never the package's
    ``get_dataset``, which downloads by default and writes a pickle into the working directory. The global
    ``random`` and ``numpy`` states, which the generator reseeds, are restored afterwards. The result is
    kept in memory per ``(num_samples, seed)`` for the life of the process.

    Returns:
        ``{"x": float32 (n_train, 1, 40), "y": int64 (n_train,), "x_test": ..., "y_test": ...}``.

    Raises:
        ImportError: if ``mnist1d`` is not installed (``pip install mnist1d``).
        ValueError: on an unknown variant, or if a pinned variant's data differ from its checksum (another
            ``mnist1d`` release generates other data).
    """
    if variant not in MNIST1D_VARIANTS:
        raise ValueError(f"Unknown MNIST-1D variant {variant!r}; choose one of {list(MNIST1D_VARIANTS)}.")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError("MNIST-1D needs the `mnist1d` package: `pip install mnist1d`.") from err
    import numpy as np

    args = get_dataset_args()
    settings = dict(MNIST1D_VARIANTS[variant])
    num_samples = int(settings.pop("num_samples") if num_samples is None else num_samples)
    for key, value in settings.items():
        setattr(args, key, value)
    args.num_samples, args.seed = num_samples, int(seed)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    x = torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    x_test = torch.as_tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    out = {"x": x, "y": torch.as_tensor(data["y"], dtype=torch.long),
           "x_test": x_test, "y_test": torch.as_tensor(data["y_test"], dtype=torch.long)}
    published = int(seed) == 42 and num_samples == MNIST1D_VARIANTS[variant]["num_samples"]
    pinned = MNIST1D_CHECKSUMS.get(variant) if published else None
    if pinned is not None and mnist1d_checksum(out) != pinned:
        from importlib.metadata import version

        raise ValueError(
            f"The MNIST-1D {variant!r} data generated here (mnist1d {version('mnist1d')}) differ from the pinned "
            f"ones (checksum {pinned[:12]}...): the benchmark's numbers are not comparable. Install the mnist1d "
            "release named in pyproject.toml's `mnist1d` extra."
        )
    return out


class MNIST1DDataModule(_SplitDataModule):
    """MNIST-1D (Greydanus, 2020): ten 1-D digit templates padded, scaled, translated, sheared and noised
    into signals of length 40, generated offline by the ``mnist1d`` package.

    Harder than the digits for its size: a small 1-D CNN with BatchNorm needs tens of epochs to converge,
    so an Early-Bird ticket found early can pay off. The generator's own train/test split is kept
    (80/20); ``val_size`` signals of its training part, chosen by ``seed``, are held out for validation.
    With the defaults: 3000 train / 1000 val / 1000 test signals of shape ``(1, 40)``, generated in about
    a second. Nothing is downloaded or cached on disk (see :func:`make_mnist1d`).

    ``variant="large"`` is the benchmark's second task: 20 000 signals (15 000 train / 1 000 val / 4 000 test),
    noisier and more sheared, pinned by a checksum. On it a small CNN keeps learning until its learning rate
    drops, as on CIFAR in the papers' setting, so a ticket found early can pay off in time to accuracy.

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes.
        seed: seed of the train/val split. Shuffling follows the global seed
            (:func:`~lightning.pytorch.seed_everything`).
        num_samples: signals generated in all (train + val + test); ``None``: the variant's (5000 for
            ``"paper"``).
        val_size: signals of the generator's training part held out for validation.
        data_seed: seed of the generator (42, the package's default, is the published data set).
        variant: ``"paper"`` (the published data set) or ``"large"`` (see above); see
            :data:`MNIST1D_VARIANTS`.

    Raises:
        ValueError:
            If ``val_size`` leaves no training signal.
        ImportError:
            In :meth:`setup`, if ``mnist1d`` is not installed.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from examples.module import ImageClassifier
        >>> datamodule = MNIST1DDataModule(batch_size=128)
        >>> model = ImageClassifier(arch="cnn1d")
        >>> Trainer(max_epochs=40).fit(model, datamodule=datamodule)  # doctest: +SKIP

    """

    input_shape = (1, MNIST1D_LENGTH)

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        num_samples: int | None = None,
        val_size: int = 1000,
        data_seed: int = 42,
        variant: str = "paper",
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if variant not in MNIST1D_VARIANTS:
            raise ValueError(f"Unknown MNIST-1D variant {variant!r}; choose one of {list(MNIST1D_VARIANTS)}.")
        if num_samples is None:
            num_samples = int(MNIST1D_VARIANTS[variant]["num_samples"])
        n_train = int(num_samples * 0.8)
        if not 0 <= val_size < n_train:
            raise ValueError(
                f"`val_size` must be in [0, {n_train}) for `num_samples={num_samples}` (80 % of the signals are the "
                f"generator's training part), got {val_size}. Lower `val_size` or raise `num_samples`."
            )
        self.save_hyperparameters()
        self.num_samples = num_samples
        self.val_size = val_size
        self.data_seed = data_seed
        self.variant = variant

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        data = make_mnist1d(self.num_samples, self.data_seed, self.variant)
        x, y = data["x"], data["y"]
        permutation = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = permutation[: self.val_size], permutation[self.val_size :]
        self.train_dataset = TensorDataset(x[train_idx], y[train_idx])
        self.val_dataset = TensorDataset(x[val_idx], y[val_idx])
        self.test_dataset = TensorDataset(data["x_test"], data["y_test"])
        rank_zero_info(
            f"Using MNIST-1D ({self.variant}) generated offline (mnist1d, seed {self.data_seed}): "
            f"{len(train_idx)} train /"
            f" {len(val_idx)} val (split seed {self.seed}) / {len(data['y_test'])} test signals of length"
            f" {x.shape[-1]}."
        )
