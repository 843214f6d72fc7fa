"""A grid of photographs with what a model said about them (the demo's real-model stage)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_photo_grid"]


def plot_photo_grid(
    images: np.ndarray,
    titles: Sequence[str],
    path: str | Path,
    *,
    columns: int = 4,
    suptitle: str | None = None,
) -> Path:
    """Save ``images`` ``[N, H, W, 3]`` (floats in ``[0, 1]``) as a grid, one title each.

    Returns the path of the PNG written (its folder is created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    columns = max(1, min(columns, n))
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.0 * columns, 3.7 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles, strict=False):
        ax.imshow(np.clip(image, 0.0, 1.0))
        ax.set_title(title, fontsize=7.5, linespacing=1.3)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
