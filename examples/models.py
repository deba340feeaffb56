"""CIFAR-style VGG-11 (BN) and ResNet-18, the model families of the Early-Bird paper, and a small 1-D CNN
for MNIST-1D (the offline benchmark task).

The CIFAR models take 32x32 inputs, start with a 3x3 stride-1 convolution and have no initial max-pool.
``width`` scales every hidden channel count, so that a narrow network (e.g. ``width=0.25``)
trains quickly on a CPU. Every model has an ``input_shape`` attribute: the shape of one example.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
"""VGG-11 as in the Early-Bird (network-slimming) code: torchvision's configuration ``"A"`` without
its fifth max-pool; the 2x2 map left at the top is average-pooled before the linear classifier."""


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _check_width(width: float) -> None:
    if width <= 0:
        raise ValueError(f"`width` must be positive, got {width}.")


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions and unit-scale BatchNorm, as torchvision does."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _conv_bn_stack(cfg: Sequence[int | str], in_channels: int, width: float,
                   dims: int) -> tuple[nn.Sequential, int]:
    """Conv (3x3, no bias) -> BN -> ReLU per number in ``cfg``, a 2x2 max-pool per ``"M"``, in 1-D or 2-D.

    Returns the stack and its number of output channels.
    """
    if dims == 1:
        conv, bn, pool = nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
    else:
        conv, bn, pool = nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d
    layers: list[nn.Module] = []
    for item in cfg:
        if item == "M":
            layers.append(pool(kernel_size=2, stride=2))
            continue
        out_channels = _scaled(int(item), width)
        layers += [conv(in_channels, out_channels, kernel_size=3, padding=1, bias=False), bn(out_channels),
                   nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers), in_channels


class CifarVGG(nn.Module):
    """VGG with BatchNorm for 32x32 inputs: ``features`` -> ``avgpool`` -> linear ``classifier``.

    Args:
        cfg: output channels of each 3x3 convolution (conv -> BN -> ReLU), ``"M"`` for a 2x2 max-pool.
        num_classes: number of output logits.
        width: multiplier applied to every channel count in ``cfg``.

    Raises:
        ValueError:
            If ``width`` is not positive.

    """

    input_shape = (3, 32, 32)

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        _check_width(width)
        self.features, in_channels = _conv_bn_stack(cfg, 3, width, dims=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        _init_weights(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage as torchvision's ``ResNet._make_layer`` builds it (1x1 conv + BN shortcut)."""
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))
    stage = [BasicBlock(in_planes, planes, stride, downsample)]
    stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*stage)


class CifarResNet(nn.Module):
    """ResNet of torchvision's :class:`~torchvision.models.resnet.BasicBlock` for 32x32 inputs.

    Same module names and forward pass as :class:`torchvision.models.ResNet` (``conv1``, ``bn1``,
    ``relu``, ``maxpool``, ``layer1`` ... ``layer4``, ``avgpool``, ``fc``), but the stem is a 3x3
    stride-1 convolution, ``maxpool`` is an :class:`~torch.nn.Identity`, and the stage widths
    64/128/256/512 are scaled by ``width`` (torchvision's ``ResNet`` has no width argument for
    ``BasicBlock``).

    Args:
        layers: number of blocks in each of the four stages.
        num_classes: number of output logits.
        width: multiplier applied to the stage widths.

    Raises:
        ValueError:
            If ``width`` is not positive.

    """

    input_shape = (3, 32, 32)

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        _check_width(width)
        widths = [_scaled(channels, width) for channels in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = _make_stage(widths[0], widths[0], layers[0], stride=1)
        self.layer2 = _make_stage(widths[0], widths[1], layers[1], stride=2)
        self.layer3 = _make_stage(widths[1], widths[2], layers[2], stride=2)
        self.layer4 = _make_stage(widths[2], widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


CNN1D_CFG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, 64)
"""The MNIST-1D network: three stages of two conv1d-BN-ReLU blocks (16, 32 and 64 channels)."""


class CNN1D(nn.Module):
    """A small 1-D CNN with BatchNorm for MNIST-1D: ``features`` -> global ``avgpool`` -> linear ``classifier``.

    Each integer of ``cfg`` is a kernel-3, padding-1 convolution without bias followed by
    :class:`~torch.nn.BatchNorm1d` and ReLU; ``"M"`` is a 2x max-pool. With the default ``cfg`` and
    ``width=1`` it has 224 BatchNorm channels and about 25k parameters: dense training on MNIST-1D
    needs tens of epochs (about 0.6 s each on one CPU thread) to converge (about 98 % test accuracy),
    so an early ticket can pay off. (At ``width=0.5``, a global prune at p = 0.5 left a layer with 1 of
    its 8 channels and the pruned network ended at 68-76 % test accuracy in our runs.)
    Every BatchNorm channel can be removed by :func:`~lightning_worm.prune_channels`.

    Args:
        cfg: output channels of each convolution, ``"M"`` for a max-pool.
        num_classes: number of output logits.
        width: multiplier applied to every channel count in ``cfg``.
        in_channels: channels of the input signal.
        length: length of the input signal (only recorded in ``input_shape``; any length works).

    Raises:
        ValueError:
            If ``width`` is not positive.

    Example::

        >>> model = CNN1D()
        >>> model(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])

    """

    def __init__(self, cfg: Sequence[int | str] = CNN1D_CFG, num_classes: int = 10, width: float = 1.0,
                 in_channels: int = 1, length: int = 40) -> None:
        super().__init__()
        _check_width(width)
        self.input_shape = (in_channels, length)
        self.features, channels = _conv_bn_stack(cfg, in_channels, width, dims=1)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def cnn1d(num_classes: int = 10, width: float = 1.0) -> CNN1D:
    """The MNIST-1D network (:data:`CNN1D_CFG`), inputs of shape ``(batch, 1, 40)``.

    Example::

        >>> cnn1d(width=0.5).classifier
        Linear(in_features=32, out_features=10, bias=True)

    """
    return CNN1D(CNN1D_CFG, num_classes=num_classes, width=width)


def vgg11_bn(num_classes: int = 10, width: float = 1.0) -> CifarVGG:
    """VGG-11 with BatchNorm in CIFAR form (8 conv layers, 512 channels at the top for ``width=1``).

    Example::

        >>> model = vgg11_bn(width=0.25)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    """
    return CifarVGG(VGG11_CFG, num_classes=num_classes, width=width)


def resnet18(num_classes: int = 10, width: float = 1.0) -> CifarResNet:
    """ResNet-18 in CIFAR form (3x3 stem, no max-pool).

    Example::

        >>> model = resnet18(width=0.25)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    """
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


MODELS: dict[str, Callable[..., nn.Module]] = {"cnn1d": cnn1d, "resnet18": resnet18, "vgg11_bn": vgg11_bn}


def build_model(arch: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """Build one of :data:`MODELS` by name.

    Raises:
        ValueError:
            If ``arch`` is not a key of :data:`MODELS`.

    Example::

        >>> build_model("vgg11_bn", num_classes=10, width=0.5).classifier
        Linear(in_features=256, out_features=10, bias=True)

    """
    if arch not in MODELS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of: {', '.join(sorted(MODELS))}.")
    return MODELS[arch](num_classes=num_classes, width=width)
