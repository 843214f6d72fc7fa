"""Benchmark of learned HOG equivariance maps (Lenc & Vedaldi 2018, section 5.2.2, table 2).

The paper's setting: a 15 x 15 array of HOG cells, a 45 degree rotation, maps learned
from 1000 images and evaluated (average per-cell Hellinger distance) on 1000 others.
Here the images are smooth random 120 x 120 images (sums of random Gaussian blobs,
seeded; 8-pixel cells, 9 orientations), so the run needs no data set.

Prints, measured in one run (2 threads):

(a) HOG extraction of 2000 images (scikit-image);
(b) the statistics of the structured problem (m = 3) over the 1000 training images;
(c) the structured fits (m = 3) by least squares, ridge and OMP (k = 5): seconds each
    (goal: seconds, not minutes), held-out Hellinger error against the identity map;
(d) the dense ridge fit of the same problem (2025 x 2025 matrix) for comparison: time
    ratio dense / structured and its held-out error.

Usage::

    python benchmarks/bench_equivariance.py            # about a minute on 2 CPU cores
    python benchmarks/bench_equivariance.py --quick    # 200 images (smoke run)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from invariscope.measure.equivariance_fit import (
    FeatureGeometry,
    accumulate,
    apply_map,
    back_projection,
    cells,
    fit_map,
    gather,
    hellinger_per_cell,
    neighbourhoods,
    parse_transforms,
    resample_features,
    targets,
)
from invariscope.models.hog import HOG


def blobs(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` smooth random images ``[n, 1, size, size]`` in ``[0, 1]``: 12 Gaussian blobs each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    centres = torch.rand(n, 12, 2, generator=g) * size
    widths = 3 + 12 * torch.rand(n, 12, 1, 1, generator=g)
    weights = torch.rand(n, 12, 1, 1, generator=g) * 2 - 1
    d2 = (xx - centres[..., 0, None, None]) ** 2 + (yy - centres[..., 1, None, None]) ** 2
    img = (weights * torch.exp(-d2 / (2 * widths**2))).sum(1, keepdim=True)
    img = img - img.amin(dim=(2, 3), keepdim=True)
    return img / img.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_train = 200 if args.quick else 1000
    n_test = 200 if args.quick else 1000
    hog = HOG(orientations=9, cell=8)
    t = parse_transforms("rotation=45")[0]
    x = blobs(n_train + n_test, 120, 0)

    start = time.perf_counter()
    phi_x = hog(x)
    phi_z = hog(t.apply_inverse(x))
    t_hog = time.perf_counter() - start
    print(f"(a) HOG of {2 * len(x)} images {tuple(phi_x.shape[1:])}: {t_hog:.2f} s")

    geom = FeatureGeometry(9, 15, 15, (8.0, 8.0), (3.5, 3.5))
    back = back_projection(geom, geom, t, 120, 120)
    index = neighbourhoods(back, geom, geom, 3)
    start = time.perf_counter()
    stats = accumulate(gather(cells(phi_z[:n_train]), index), targets(cells(phi_x[:n_train]), True))
    t_stats = time.perf_counter() - start
    print(
        f"(b) structured statistics (m = 3, 225 groups of 81 inputs), {n_train} images: {t_stats:.2f} s"
    )

    test_x, test_z = phi_x[n_train:], phi_z[n_train:]
    identity = float(hellinger_per_cell(test_z, test_x).mean())
    moved = resample_features(test_z, np.linalg.inv(back))
    perm = float(hellinger_per_cell(moved, test_x).mean())
    print(f"    held-out Hellinger per cell: identity {identity:.4f}, resampling P_g {perm:.4f}")
    times = {}
    for method, kw in (("lsq", {}), ("ridge", {"ridge": 1e-3}), ("omp", {"k": 5})):
        start = time.perf_counter()
        fitted = fit_map(stats, method, index=index, **kw)
        times[method] = time.perf_counter() - start
        err = float(hellinger_per_cell(apply_map(fitted, test_z, (9, 15, 15)), test_x).mean())
        print(
            f"(c) structured {method:<5} fit: {times[method]:6.2f} s, held-out Hellinger {err:.4f}"
            f" ({fitted.nonzeros():,} non-zero coefficients)"
        )

    start = time.perf_counter()
    dense_stats = accumulate(
        gather(cells(phi_z[:n_train]), None), targets(cells(phi_x[:n_train]), False)
    )
    t_dstats = time.perf_counter() - start
    start = time.perf_counter()
    dense = fit_map(dense_stats, "ridge", ridge=1e-3)
    t_dense = time.perf_counter() - start
    err = float(hellinger_per_cell(apply_map(dense, test_z, (9, 15, 15)), test_x).mean())
    print(
        f"(d) dense ridge (2025 x 2025): statistics {t_dstats:.2f} s, fit {t_dense:.2f} s, "
        f"held-out Hellinger {err:.4f}; dense / structured ridge time "
        f"{(t_dstats + t_dense) / (t_stats + times['ridge']):.1f}x"
    )


if __name__ == "__main__":
    main()
