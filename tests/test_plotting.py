import importlib
import math
import sys

import pytest
import torch

pytest.importorskip("matplotlib")

import lightning_worm
from lightning_worm import mask_distance
from lightning_worm.plotting import mask_distance_matrix, plot_channels, plot_distance_matrix, plot_mask_distances

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

MASKS = [
    torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool),
    torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool),
    torch.tensor([0, 0, 1, 1, 0, 1], dtype=torch.bool),
]
# Differing positions: masks 0/1 at 2 of 6, 0/2 at all 6, 1/2 at 4 of 6.
EXPECTED_DISTANCES = torch.tensor([[0, 1 / 3, 1], [1 / 3, 0, 2 / 3], [1, 2 / 3, 0]], dtype=torch.float64)


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)


def test_mask_distance_matrix_hand_computed():
    torch.testing.assert_close(mask_distance_matrix(MASKS), EXPECTED_DISTANCES)


@pytest.mark.parametrize("units", [1, 7, 8, 9, 100, 1003])
def test_mask_distance_matrix_is_mask_distance_of_every_pair(units):
    """One distance in the library: the matrix is `mask_distance` of each pair, for masks of any length."""
    g = torch.Generator().manual_seed(units)
    masks = [torch.rand(units, generator=g) > p for p in (0.1, 0.5, 0.5, 0.9)]
    matrix = mask_distance_matrix(masks)
    for i, a in enumerate(masks):
        for j, b in enumerate(masks):
            assert matrix[i, j] == mask_distance({"mask": a}, {"mask": b}) == int((a != b).sum()) / units


def test_mask_distance_matrix_rejects_bad_masks():
    with pytest.raises(ValueError, match="empty"):
        mask_distance_matrix([])
    with pytest.raises(ValueError, match="same length"):
        mask_distance_matrix([torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    with pytest.raises(ValueError, match="1-D"):
        mask_distance_matrix([torch.ones(2, 3, dtype=torch.bool)])


def test_plot_mask_distances(tmp_path):
    path = tmp_path / "figures" / "distances.png"
    distances = [NAN, NAN, 0.4, 0.2, 0.08, 0.05]
    means = [NAN, NAN, 0.3, 0.1, 0.05, 0.03]
    figure = plot_mask_distances(distances, means, threshold=0.1, elbow=0.15, ticket_epoch=4, path=path)
    _assert_png(path)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == [
        "max distance in window",
        "mean distance in window",
        "threshold 0.1",
        "WORM elbow 0.15",
        "ticket at epoch 4",
    ]
    max_line = figure.axes[0].get_lines()[0]
    assert list(max_line.get_xdata()) == list(range(6))
    assert math.isnan(max_line.get_ydata()[0])


def test_plot_mask_distances_without_path_or_extras_saves_nothing(tmp_path):
    figure = plot_mask_distances([NAN, 0.2], [NAN, 0.1], threshold=0.1)
    assert len(figure.axes[0].get_lines()) == 3
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="differ in length"):
        plot_mask_distances([0.1, 0.2], [0.1], threshold=0.1)


def test_plot_distance_matrix(tmp_path):
    path = tmp_path / "matrix.png"
    figure = plot_distance_matrix(MASKS, epochs=[5, 6, 7], path=path)
    _assert_png(path)
    ax = figure.axes[0]
    torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array().data), EXPECTED_DISTANCES)
    assert [label.get_text() for label in ax.get_xticklabels()] == ["5", "6", "7"]
    assert len(figure.axes) == 2  # heatmap and colorbar
    with pytest.raises(ValueError, match="`epochs` has 2 entries for 3 masks"):
        plot_distance_matrix(MASKS, epochs=[0, 1])


def test_plot_channels(tmp_path):
    path = tmp_path / "channels.png"
    before = {"model.features.1": 64, "model.features.5": 128, "model.features.9": 256}
    after = {"model.features.1": 40, "model.features.5": 60, "model.features.9": 100}
    figure = plot_channels(before, after, path=path)
    _assert_png(path)
    ax = figure.axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == list(before)
    assert [bar.get_width() for bar in ax.patches] == [64, 128, 256, 40, 60, 100]
    assert ax.get_title() == "Channels kept: 200 of 448 (45%)"
    with pytest.raises(ValueError, match="same layer names in the same order"):
        plot_channels(before, dict(reversed(after.items())))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    monkeypatch.delitem(sys.modules, "lightning_worm.plotting")
    monkeypatch.delattr(lightning_worm, "plotting")
    reloaded = importlib.import_module("lightning_worm.plotting")  # importing needs no matplotlib
    torch.testing.assert_close(reloaded.mask_distance_matrix(MASKS), EXPECTED_DISTANCES)
    for draw in (
        lambda: reloaded.plot_mask_distances([0.1], [0.1], threshold=0.1),
        lambda: reloaded.plot_distance_matrix(MASKS),
        lambda: reloaded.plot_channels({"a": 2}, {"a": 1}),
    ):
        with pytest.raises(ImportError, match=r"pip install 'lightning-worm\[plot\]'"):
            draw()


def test_plot_channels_draws_one_panel_per_source_with_its_share():
    pytest.importorskip("matplotlib")
    from lightning_worm.plotting import plot_channels

    before = {"attn.0": 4, "attn.1": 4, "mlp.0": 64, "mlp.1": 64}
    after = {"attn.0": 2, "attn.1": 2, "mlp.0": 40, "mlp.1": 36}
    shares = {"AttentionHeadSource": {"before": 8, "after": 4, "entries": ["attn.0", "attn.1"]},
              "FeedForwardSource": {"before": 128, "after": 76, "entries": ["mlp.0", "mlp.1"]}}
    figure = plot_channels(before, after, sources=shares)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["AttentionHeadSource kept: 4 of 8 (50%)", "FeedForwardSource kept: 76 of 128 (59%)"]
    with pytest.raises(ValueError, match="lacks"):
        plot_channels(before, after, sources={"X": {"entries": ["nope"]}})
