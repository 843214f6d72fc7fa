"""Pose of an affine map and pose statistics (Finnveden, Jansson & Lindeberg 2020, table I).

The *final pose* of a perturbed digit is the affine map from the upright digit to what
the classifier (or, for STN-CX, the transformer of the feature map) finally sees: the
perturbation ``T`` followed by the transformer's forward map ``P``, ``P @ T``. Its
decomposition (paper, footnote 2):

- angle: ``atan2(a12 - a21, a11 + a22)`` in degrees on y-DOWN pixel matrices, i.e. the
  paper's ``arctan((a21 - a12) / (a11 + a22))`` read in y-up coordinates: positive =
  counter-clockwise as displayed, like the ``rotation`` transform. ``atan2`` extends the
  paper's ``arctan`` (equal for ``|angle| < 90``) to the full circle;
- translation: ``(a13, a23)`` in input pixels, in CENTRED coordinates (where the upright
  digit's centre lands, relative to the image centre);
- scale: ``log2(a11 a22 - a12 a21)``.

**Pose SD**: per class, the spread of the final angle, the sample standard deviation
(``ddof=1``) of ``log2 det``, and the *standard distance deviation* of the translation
(``sqrt(var(tx) + var(ty))``); then the mean over classes. The angle's spread is given
two ways:

- ``angle_sd_deg`` (the headline): the CIRCULAR standard deviation
  ``sqrt(-2 ln R)`` of the full-circle angle, ``R`` the mean resultant length
  (:func:`scipy.stats.circstd`). A transformer may canonicalise a class to ANY pose,
  upside down included: a class brought to 180 deg reads as a mixture of +179 and -179
  deg, whose linear SD is ~180 deg although the pose is one; the circular SD is ~0. For a
  concentrated class (the paper's regime) it equals the linear SD (ddof 0) to first
  order; for a uniform spread over +-90 deg it is 54.4 deg (linear: 52.0).
- ``angle_sd_arctan_deg``: the paper's literal recipe, the sample SD of
  ``arctan((a21 - a12) / (a11 + a22))``, an angle folded into (-90, 90] (it cannot tell
  a pose from its upside-down twin, and splits a class canonicalised near +-90).

Convention (matrices):
    ``[B, 2, 3]`` FORWARD maps in centred pixel coordinates of the STN's input: a point
    ``u`` (pixels from the centre, x right, y down) goes to ``A u + t``.
    :func:`forward_pose_matrix` converts an STN's ``theta`` (``affine_grid``'s OUTPUT ->
    INPUT map in normalised coordinates, ``align_corners=False``) to that form:
    normalised ``n = 2 u / W`` per axis, so the linear part of the inverse of ``theta``
    is kept and its translation multiplied by ``W / 2`` (x) and ``H / 2`` (y).

>>> import torch
>>> from invariscope.transforms import rotation_matrix
>>> pose_components(rotation_matrix(torch.tensor([30.0]), 28, 28))["angle_deg"].round().tolist()
[30.0]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import circstd

from invariscope.transforms import rotation_matrix
from invariscope.transforms.warp import to_homogeneous

__all__ = [
    "circular_sd_deg",
    "forward_pose_matrix",
    "perturbation_matrix",
    "pose_components",
    "pose_sd",
]


def forward_pose_matrix(theta: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """An STN's sampling map ``theta`` ``[B, 2, 3]`` -> its forward map in centred input pixels.

    The forward map takes a point of the STN's input (pixels from the centre) to where it
    lands in the output, expressed in input pixels (so an output smaller than the input,
    60 -> 30, does not count as a scaling).
    """
    inverse = torch.linalg.inv(to_homogeneous(theta.double()))[:, :2, :].clone()
    inverse[:, 0, 2] *= W / 2.0
    inverse[:, 1, 2] *= H / 2.0
    return inverse


def perturbation_matrix(
    angle_deg: torch.Tensor, tx_px: torch.Tensor, ty_px: torch.Tensor, log2_scale: torch.Tensor
) -> torch.Tensor:
    """The perturbation in centred pixels ``[B, 2, 3]``: magnify by ``2**log2_scale`` and
    rotate by ``angle_deg`` (counter-clockwise as displayed) about the digit's centre, then
    move the centre by ``(tx_px, ty_px)`` (x right, y down). All inputs ``[B]``."""
    angle = torch.as_tensor(angle_deg, dtype=torch.float64)
    linear = rotation_matrix(angle, 1, 1)[:, :, :2]  # a 1x1 image: centre at the origin
    scale = torch.exp2(torch.as_tensor(log2_scale, dtype=torch.float64))
    shift = torch.stack(
        [torch.as_tensor(tx_px, dtype=torch.float64), torch.as_tensor(ty_px, dtype=torch.float64)],
        dim=1,
    )
    return torch.cat([linear * scale[:, None, None], shift[:, :, None]], dim=2)


def pose_components(matrix: torch.Tensor) -> dict[str, np.ndarray]:
    """``{angle_deg, tx_px, ty_px, log2_det}`` (each ``[B]`` float64) of affine maps ``[B, 2, 3]``
    (see the module docstring). For an about-centre pixel matrix the translation is
    that of the pixel frame, not the centred one."""
    m = torch.as_tensor(matrix).double()
    a11, a12, a13 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    a21, a22, a23 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    angle = torch.rad2deg(torch.atan2(a12 - a21, a11 + a22))
    det = a11 * a22 - a12 * a21
    return {
        "angle_deg": angle.numpy(),
        "tx_px": a13.numpy(),
        "ty_px": a23.numpy(),
        "log2_det": torch.log2(det).numpy(),
    }


def circular_sd_deg(angles_deg) -> float:
    """Circular standard deviation ``sqrt(-2 ln R)`` of angles in degrees, in degrees
    (``R``: the length of the mean unit vector). 0 for identical angles, whatever they are;
    the same for ``{179, -179}`` as for ``{-1, 1}``."""
    return float(circstd(np.asarray(angles_deg, dtype=np.float64), high=180.0, low=-180.0))


def _fold(angles_deg: pd.Series) -> pd.Series:
    """The paper's ``arctan`` reading of a full-circle angle: folded into [-90, 90)."""
    return (angles_deg + 90.0) % 180.0 - 90.0


def pose_sd(frame: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Within-class spread of the final pose, averaged over classes (see the module docstring).

    ``frame`` has columns ``label, angle_deg, tx_px, ty_px, log2_det`` (final poses,
    one row per image) and the grouping columns ``by``. Returns one row per group with
    ``angle_sd_deg`` (circular SD), ``angle_sd_arctan_deg`` (the paper's folded angle,
    ddof 1), ``distance_sd_px`` (standard distance deviation), ``log2_det_sd`` and
    ``classes`` (classes with >= 2 images, the ones averaged).
    """
    by = list(by or [])

    def one(group: pd.DataFrame) -> pd.Series:
        kept = group.groupby("label").filter(lambda g: len(g) >= 2)
        per = kept.groupby("label")
        angle = per["angle_deg"].agg(circular_sd_deg)
        folded = _fold(kept["angle_deg"]).groupby(kept["label"]).std(ddof=1)
        dist = np.sqrt(per["tx_px"].var(ddof=1) + per["ty_px"].var(ddof=1))
        scale = per["log2_det"].std(ddof=1)
        return pd.Series(
            {
                "angle_sd_deg": float(angle.mean()) if len(angle) else float("nan"),
                "angle_sd_arctan_deg": float(folded.mean()) if len(folded) else float("nan"),
                "distance_sd_px": float(dist.mean()) if len(dist) else float("nan"),
                "log2_det_sd": float(scale.mean()) if len(scale) else float("nan"),
                "classes": int(len(angle)),
            }
        )

    if not by:
        return one(frame).to_frame().T.astype({"classes": np.int64})
    rows = []
    for key, group in frame.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), **one(group).to_dict()})
    out = pd.DataFrame(rows)
    return out.astype({"classes": np.int64}) if len(out) else out
