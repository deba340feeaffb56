"""Figures of Early-Bird mask distances and of pruned channel counts.

matplotlib is an optional dependency (``pip install 'lightning-worm[plot]'``). Figures are drawn
on matplotlib's Agg canvas without pyplot: no window opens and no global state is touched.
"""

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_worm.core.masks import Mask, mask_distance

__all__ = ["mask_distance_matrix", "plot_channels", "plot_distance_matrix", "plot_mask_distances"]

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_PathLike = str | os.PathLike


def _new_figure(width: float, height: float) -> "Figure":
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Plotting needs matplotlib, which is not installed: pip install 'lightning-worm[plot]'"
        ) from err
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: "Figure", path: _PathLike | None) -> "Figure":
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=150)
    return figure


def mask_distance_matrix(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise normalised Hamming distance between channel masks.

    Entry ``(i, j)`` is :func:`lightning_worm.core.masks.mask_distance` of masks ``i`` and ``j``: the
    fraction of units on which they differ (each mask is packed once, and the pairs are compared on
    their bits).

    Args:
        masks: one 1-D boolean mask per epoch, all of the same length (the detector's ``history``).

    Returns:
        A symmetric ``(epochs, epochs)`` float64 tensor with zeros on the diagonal.

    Raises:
        ValueError:
            If ``masks`` is empty or the masks are not 1-D tensors of one length.

    Example::

        >>> masks = [torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 1, 0]).bool()]
        >>> mask_distance_matrix(masks)
        tensor([[0.0000, 0.5000],
                [0.5000, 0.0000]], dtype=torch.float64)

    """
    if len(masks) == 0:
        raise ValueError("`masks` is empty.")
    shapes = {tuple(mask.shape) for mask in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"All masks must be 1-D and of the same length, got shapes {sorted(shapes)}.")
    layout = [("mask", next(iter(shapes)))]
    packed = [Mask(mask.detach().cpu().to(torch.bool), layout) for mask in masks]
    for mask in packed:
        mask.packed()
    matrix = torch.zeros(len(packed), len(packed), dtype=torch.float64)
    for i, a in enumerate(packed):
        for j in range(i, len(packed)):
            matrix[i, j] = matrix[j, i] = mask_distance(a, packed[j])
    return matrix


def plot_mask_distances(
    distances: Sequence[float],
    mean_distances: Sequence[float],
    *,
    threshold: float,
    elbow: float | None = None,
    ticket_epoch: int | None = None,
    path: _PathLike | None = None,
) -> "Figure":
    """Plot the per-epoch maximum and mean mask distance of the Early-Bird window.

    Args:
        distances: the largest distance between the newest mask and the masks in the window, one
            value per epoch (index 0 = epoch 0), ``nan`` while the window is not yet full.
        mean_distances: the mean of those distances, same length and convention.
        threshold: the Early-Bird stopping threshold, drawn as a horizontal line.
        elbow: the WORM elbow distance, drawn as a second horizontal line when given.
        ticket_epoch: the epoch at which the ticket was drawn, marked by a vertical line.
        path: where to save the figure as PNG; nothing is saved when ``None``.

    Returns:
        The matplotlib :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError:
            If ``distances`` and ``mean_distances`` differ in length.
        ImportError:
            If matplotlib is not installed.

    Example::

        >>> nan = float("nan")
        >>> figure = plot_mask_distances([nan, 0.3, 0.1], [nan, 0.2, 0.05], threshold=0.1, ticket_epoch=2)

    """
    if len(distances) != len(mean_distances):
        raise ValueError(
            f"`distances` ({len(distances)}) and `mean_distances` ({len(mean_distances)}) differ in length."
        )
    figure = _new_figure(6.4, 4.0)
    ax = figure.add_subplot()
    epochs = range(len(distances))
    ax.plot(epochs, distances, marker="o", markersize=3, label="max distance in window")
    ax.plot(epochs, mean_distances, marker="o", markersize=3, label="mean distance in window")
    ax.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
    if elbow is not None:
        ax.axhline(elbow, color="tab:purple", linestyle=":", label=f"WORM elbow {elbow:.3g}")
    if ticket_epoch is not None:
        ax.axvline(ticket_epoch, color="tab:green", label=f"ticket at epoch {ticket_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("normalised Hamming distance")
    ax.set_title("Early-Bird mask distance")
    ax.set_xlim(-0.5, max(len(distances) - 1, ticket_epoch or 0) + 0.5)
    ax.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    locator = ax.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # a new axis's AutoLocator
        locator.set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(figure, path)


def plot_distance_matrix(
    masks: Sequence[torch.Tensor],
    *,
    epochs: Sequence[int] | None = None,
    path: _PathLike | None = None,
) -> "Figure":
    """Heatmap of the pairwise mask distances of all epochs, as in the Early-Bird paper.

    Args:
        masks: one 1-D boolean channel mask per epoch, all of the same length.
        epochs: the epoch of each mask, used as tick labels; ``0, 1, ...`` when ``None``.
        path: where to save the figure as PNG; nothing is saved when ``None``.

    Returns:
        The matplotlib :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError:
            If the masks are invalid (see :func:`mask_distance_matrix`) or ``epochs`` has a
            different length.
        ImportError:
            If matplotlib is not installed.

    Example::

        >>> masks = [torch.rand(64) > 0.5 for _ in range(10)]
        >>> figure = plot_distance_matrix(masks)

    """
    matrix = mask_distance_matrix(masks)
    labels = list(range(len(masks))) if epochs is None else list(epochs)
    if len(labels) != len(masks):
        raise ValueError(f"`epochs` has {len(labels)} entries for {len(masks)} masks.")
    figure = _new_figure(5.6, 4.8)
    ax = figure.add_subplot()
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, label="normalised Hamming distance")
    step = max(1, math.ceil(len(labels) / 15))
    positions = list(range(0, len(labels), step))
    ax.set_xticks(positions, [str(labels[i]) for i in positions])
    ax.set_yticks(positions, [str(labels[i]) for i in positions])
    ax.set_xlabel("epoch")
    ax.set_ylabel("epoch")
    ax.set_title("Pairwise mask distance")
    return _save(figure, path)


def plot_channels(
    before: Mapping[str, int],
    after: Mapping[str, int],
    *,
    sources: Mapping[str, Any] | None = None,
    path: _PathLike | None = None,
) -> "Figure":
    """Horizontal bar chart of the channels (units) of each layer before and after pruning.

    Args:
        before: layer name -> channels of the dense network, in network order.
        after: layer name -> channels after pruning, same keys in the same order.
        sources: with several sources in one prune, ``report.shares`` (or ``{source: {"entries": [...]}}``): one
            panel per source, each titled with its share kept (heads and neurons are not counted on one axis).
        path: where to save the figure as PNG; nothing is saved when ``None``.

    Returns:
        The matplotlib :class:`~matplotlib.figure.Figure`.

    Raises:
        ValueError:
            If the two mappings do not have the same keys in the same order.
        ImportError:
            If matplotlib is not installed.

    Example::

        >>> figure = plot_channels({"conv1": 64, "conv2": 128}, {"conv1": 40, "conv2": 50})

    """
    names = list(before)
    if names != list(after):
        raise ValueError("`before` and `after` must have the same layer names in the same order.")
    panels = {"Channels": names}
    if sources is not None:
        panels = {label: list(share["entries"] if isinstance(share, Mapping) else share)
                  for label, share in sources.items()}
        unknown = [n for entries in panels.values() for n in entries if n not in before]
        if unknown:
            raise ValueError(f"`sources` names entries that `before` lacks: {unknown[:5]}.")
    figure = _new_figure(7.0, max(2.5, 0.3 * len(names) + 1.2 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False,
                           height_ratios=[max(1, len(entries)) for entries in panels.values()])[:, 0]
    for ax, (label, entries) in zip(axes, panels.items(), strict=True):
        positions = range(len(entries))
        ax.barh(positions, [before[name] for name in entries], color="lightgray", label="before")
        ax.barh(positions, [after[name] for name in entries], height=0.5, color="tab:blue", label="after")
        ax.set_yticks(positions, entries)
        ax.invert_yaxis()
        ax.set_xlabel("channels" if sources is None else "units")
        total_before, total_after = sum(before[n] for n in entries), sum(after[n] for n in entries)
        share = total_after / total_before if total_before else float("nan")
        ax.set_title(f"{label} kept: {total_after} of {total_before} ({share:.0%})")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2)
    return _save(figure, path)
