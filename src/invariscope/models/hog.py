"""HOG (histogram of oriented gradients) as a representation with its geometry.

Lenc & Vedaldi (2018, section 5.2) learn equivariance maps of HOG features. This wraps
:func:`skimage.feature.hog` with one cell per block (``cells_per_block=(1, 1)``), so
the representation is a feature field ``[orientations, cells_y, cells_x]`` (channels
first, like a CNN feature map) and every cell is normalised on its own (``L2-Hys`` by
default), which keeps a permutation of cells and bins a permutation of features.

Convention (scikit-image 0.26, ``skimage/feature/_hoghistogram.pyx``):

- images ``[B, C, H, W]`` in ``[0, 1]``; colour images are averaged over channels first
  (HOG of the grey image);
- gradients by central differences, ``g_row[r] = I[r + 1] - I[r - 1]`` (zero on the
  first and last row), ``g_col`` alike (zero on the first and last column);
- orientation ``theta = degrees(atan2(g_row, g_col)) mod 180`` in ``[0, 180)``,
  bin ``i`` holds ``theta`` in ``[180 i / O, 180 (i + 1) / O)``, each pixel votes its
  gradient magnitude (no interpolation between bins or cells);
- cell ``(v, u)`` (row, column) covers pixel rows ``[p v, p v + p)`` and columns
  ``[p u, p u + p)``; trailing pixels that do not fill a cell are ignored. Its centre,
  the receptive-field centre of the feature, is pixel ``(p u + (p - 1) / 2,
  p v + (p - 1) / 2)`` (x, y).

Under a left-right mirror ``x' = W - 1 - x``, ``g_col`` changes sign, so
``theta -> (180 - theta) mod 180`` and, when ``W`` is a multiple of ``p``, cell ``u``
goes to ``cells_x - 1 - u`` and bin ``i`` to ``O - 1 - i`` — exactly, except for
pixels with ``theta`` exactly 0 (``g_row = 0``, ``g_col != 0``), which stay in bin 0
(see :func:`hog_flip_permutation`).
"""

from __future__ import annotations

import numpy as np
import torch

from invariscope.errors import InvariscopeError

__all__ = ["HOG", "hog_flip_permutation"]

BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")


class HOG:
    """HOG features ``[B, orientations, H // cell, W // cell]`` (float32) of images.

    Args:
        orientations: number of orientation bins O (unsigned, over 180 degrees).
        cell: pixels per (square) cell p.
        block_norm: scikit-image's per-block (here per-cell) normalisation.
    """

    name = "hog"

    def __init__(self, orientations: int = 9, cell: int = 8, block_norm: str = "L2-Hys") -> None:
        for what, value, low in (("orientations", orientations, 2), ("cell", cell, 2)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise InvariscopeError(f"HOG {what} must be an integer >= {low}, got {value!r}")
        if block_norm not in BLOCK_NORMS:
            raise InvariscopeError(
                f"HOG block_norm '{block_norm}' is not one of {', '.join(BLOCK_NORMS)}"
            )
        self.orientations, self.cell, self.block_norm = int(orientations), int(cell), block_norm

    def config(self) -> dict:
        return {"orientations": self.orientations, "cell": self.cell, "block_norm": self.block_norm}

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """``(cells_y, cells_x)`` of an ``H x W`` image; refuses images smaller than a cell."""
        if H < self.cell or W < self.cell:
            raise InvariscopeError(
                f"HOG cells of {self.cell} pixels do not fit in {H}x{W} images; use a smaller "
                "cell (--hog-cell)"
            )
        return H // self.cell, W // self.cell

    def cell_centre(self) -> tuple[float, float]:
        """``(stride, offset)`` of the cell-to-pixel map ``x = stride u + offset`` (both axes)."""
        return float(self.cell), (self.cell - 1) / 2.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from skimage.feature import hog

        if images.ndim != 4:
            raise InvariscopeError(f"HOG takes images [B, C, H, W], got shape {list(images.shape)}")
        grey = images.detach().float().mean(dim=1).cpu().numpy().astype(np.float64)
        cy, cx = self.grid(grey.shape[1], grey.shape[2])
        out = np.empty((grey.shape[0], self.orientations, cy, cx), dtype=np.float32)
        for i, img in enumerate(grey):
            h = hog(
                img,
                orientations=self.orientations,
                pixels_per_cell=(self.cell, self.cell),
                cells_per_block=(1, 1),
                block_norm=self.block_norm,
                feature_vector=False,
            )  # [cy, cx, 1, 1, O]
            out[i] = np.moveaxis(h[:, :, 0, 0, :], -1, 0)
        return torch.from_numpy(out).to(images.device)


def hog_flip_permutation(
    orientations: int, cells_y: int, cells_x: int, axis: str = "x"
) -> np.ndarray:
    """The permutation of HOG features under a mirror, in the cells-major layout.

    Features are indexed ``((v * cells_x) + u) * O + t`` (cell row v, cell column u,
    bin t). Returns ``perm`` with ``phi(flip x)[k] = phi(x)[perm[k]]``: the mirrored
    cell (``u -> cells_x - 1 - u`` for ``axis="x"``, ``v -> cells_y - 1 - v`` for
    ``"y"``) and the reflected bin ``t -> O - 1 - t`` (``theta -> 180 - theta`` for
    both mirrors). Exact when the image size is a multiple of the cell and no pixel has
    a gradient with ``theta`` exactly 0 (module docstring).
    """
    if axis not in ("x", "y"):
        raise InvariscopeError(f"axis must be 'x' or 'y', got {axis!r}")
    v, u, t = np.meshgrid(
        np.arange(cells_y), np.arange(cells_x), np.arange(orientations), indexing="ij"
    )
    if axis == "x":
        u = cells_x - 1 - u
    else:
        v = cells_y - 1 - v
    t = orientations - 1 - t
    return ((v * cells_x + u) * orientations + t).ravel()
