"""Matplotlib helpers of the analysis figures (Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["annotated_heatmap", "draw_image", "overlay_patches", "pyplot", "save_figure"]


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 100) -> str:
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def draw_image(ax, image: np.ndarray, dim: float = 1.0) -> None:
    """``image`` [H, W, C] in [0, 1], C = 1 (grey) or 3; ``dim`` < 1 draws it as darkened grey (under a heatmap)."""
    if dim != 1.0:
        image = image.mean(-1, keepdims=True) * dim
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_patches(ax, values: np.ndarray, image_hw: Tuple[int, int], *, cmap: str = "magma",
                    alpha: float = 0.6, vmin: float = 0.0, vmax: float = 1.0):
    """Draw per-patch ``values`` [h, w] stretched over an image of ``image_hw`` pixels (nearest, no blur)."""
    H, W = image_hw
    return ax.imshow(values, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest",
                     extent=(-0.5, W - 0.5, H - 0.5, -0.5))


def annotated_heatmap(ax, grid: np.ndarray, row_labels: Sequence, col_labels: Sequence, *, fmt: str = "{:.1f}",
                      cmap: str = "viridis", mark: Sequence[Tuple[int, int]] = (), mark_label: Optional[str] = None,
                      origin: str = "lower"):
    """``grid`` [rows, cols] (NaN = missing) with its values written in the cells and the ``mark`` cells boxed."""
    from matplotlib.patches import Rectangle

    image = ax.imshow(grid, cmap=cmap, origin=origin, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, fmt.format(grid[i, j]), ha="center", va="center", fontsize=8,
                        color="black" if grid[i, j] > middle else "white")
    for n, (i, j) in enumerate(mark):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5,
                               label=mark_label if n == 0 else None))
    if mark and mark_label:
        ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize=8, frameon=False)
    return image
