"""Which coupling rule removes what the ticket asks? One table over the torchvision BatchNorm families.

For every family (the list of ``tests/core/surgery/test_torchvision_survey.py``), BN gammas are drawn from U(0.05, 1)
(seed 0), the global 50 % |gamma| ticket is taken with ``unit_mask``, and ``prune_channels`` removes it
under each coupling rule. Columns:

* ``removed / prunable``: the fraction of the prunable channels removed (channels that can go at all:
  not in a group reaching the output, not in a group without BatchNorm); the goal is the ratio asked;
* ``removed / all``: the same over every BatchNorm channel;
* ``agreement``: the fraction of the ticket's pruned channels that were removed (``ticket_agreement``).

Run (about 2 minutes on 2 cores; ``--models resnet18 mobilenet_v2`` for a subset)::

    OMP_NUM_THREADS=2 python -m examples.benchmarks.coupling
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

from lightning_worm.core.masks import unit_mask
from lightning_worm.core.surgery import prune_channels
from lightning_worm.core.surgery.decision import COUPLINGS

FAMILIES: dict[str, dict] = {
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {}, "vgg11_bn": {}, "vgg16_bn": {},
    "mobilenet_v2": {}, "mobilenet_v3_small": {}, "efficientnet_b0": {}, "regnet_x_400mf": {}, "densenet121": {},
    "mnasnet0_5": {}, "shufflenet_v2_x0_5": {}, "googlenet": {"aux_logits": False, "init_weights": True},
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The torchvision model with 10 classes and BN gammas from U(0.05, 1)."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10, **FAMILIES[name])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.95 + 0.05)
    return model.eval()


def measure(name: str, coupling: str, ratio: float, size: int) -> dict[str, float]:
    model = build(name)
    total = sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    report = prune_channels(model, unit_mask(model, ratio), torch.zeros(1, 3, size, size), coupling=coupling,
                            measure_latency=False)
    removed = report.pruned_from_ticket + report.pruned_outside_ticket
    return dict(prunable=report.removed_fraction, all=removed / total, agreement=report.ticket_agreement,
                flops=report.flops_after / report.flops_before)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--couplings", nargs="+", default=list(COUPLINGS), choices=list(COUPLINGS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    head = " | ".join(f"{c}: removed/prunable, removed/all, agreement, FLOPs" for c in args.couplings)
    print(f"ratio {args.ratio}, random gammas (seed 0), input 1x3x{args.size}x{args.size}")
    print(f"| model | {head} |")
    worst = {c: 0.0 for c in args.couplings}
    for name in args.models:
        cells = []
        for coupling in args.couplings:
            r = measure(name, coupling, args.ratio, args.size)
            worst[coupling] = max(worst[coupling], abs(r["prunable"] - args.ratio))
            cells.append(f"{r['prunable']:.3f}, {r['all']:.3f}, {r['agreement']:.3f}, {r['flops']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("largest |removed/prunable - ratio|: " + ", ".join(f"{c} {w:.3f}" for c, w in worst.items()))
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
