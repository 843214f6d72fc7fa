"""Linear centred kernel alignment (CKA) that streams over minibatches.

Kornblith et al. (2019) compare two representations ``X`` ``[n, d1]`` and ``Y``
``[n, d2]`` of the same ``n`` images by the normalised Hilbert-Schmidt independence
criterion of their linear kernels ``K = X X^T`` and ``L = Y Y^T``::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

It is invariant to orthogonal transformations and isotropic scaling of either
representation (not to arbitrary invertible linear maps), and the CKA of a
representation with itself is 1.

The full-batch estimate needs all ``n`` images at once. Minibatch CKA (Nguyen et al.
2021) sums, over minibatches of ``n >= 4`` images, the *unbiased* HSIC estimator of
Song et al. (2012), :func:`hsic_unbiased`, and divides at the end::

    CKA = sum_b HSIC1(K_b, L_b) / sqrt(sum_b HSIC1(K_b, K_b) * sum_b HSIC1(L_b, L_b))

(:func:`minibatch_cka`), so that the memory is one minibatch's Gram matrices and the
result does not drift with the batch size the way averaging biased estimates would.
With one batch it equals :func:`cka_direct` with ``unbiased=True``.

Constant representations: a layer whose output is the same for every image carries no
information about the images, so it shares none with any other layer: its
self-similarity is 0 and :func:`minibatch_cka` returns 0.0 for it (never NaN), and the
tables say which layers were constant. Constant *channels* in an otherwise varying layer
are fine: they simply do not contribute.

Example:
    >>> import torch
    >>> x = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    >>> round(cka_direct(x, 3 * x), 12)
    1.0
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from invariscope.errors import InvariscopeError, hint

__all__ = [
    "CONSTANT_TOL",
    "centred_gram",
    "cka_direct",
    "cka_table",
    "gram_linear",
    "hsic_biased",
    "hsic_table",
    "hsic_unbiased",
    "minibatch_cka",
]

#: Smallest number of images per minibatch: the unbiased estimator divides by n - 3.
MIN_IMAGES = 4

#: A self-similarity sum at or below this counts as "constant" (zero information).
CONSTANT_TOL = 0.0


def _flat(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 0:
        raise InvariscopeError("features must be [n, ...] with one row per image, got a scalar")
    t = t.detach().reshape(t.shape[0], -1)
    if t.device.type == "mps":  # no float64 there
        t = t.cpu()
    return t.to(dtype=torch.float64)


def gram_linear(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The linear kernel ``K = X X^T`` (float64 ``[n, n]``) of features ``x`` ``[n, ...]``,
    flattened per image to ``[n, d]``."""
    f = _flat(x)
    return f @ f.T


def centred_gram(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """:func:`gram_linear` of the features centred over the images (float64).

    HSIC (biased and unbiased) is unchanged by adding a constant vector to every image's
    features, and centring first keeps the round-off small for large activations. An
    exactly constant representation gives an exactly zero matrix (so its HSIC is 0).
    """
    f = _flat(x)
    if f.shape[0] == 0 or bool((f == f[:1]).all()):
        return torch.zeros(f.shape[0], f.shape[0], dtype=torch.float64, device=f.device)
    f = f - f.mean(dim=0, keepdim=True)
    return f @ f.T


def _check_pair(kx: torch.Tensor, ky: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kx = torch.as_tensor(kx, dtype=torch.float64)
    ky = torch.as_tensor(ky, dtype=torch.float64)
    if kx.dim() != 2 or kx.shape[0] != kx.shape[1] or kx.shape != ky.shape:
        raise InvariscopeError(
            f"HSIC needs two square Gram matrices of one size, got {list(kx.shape)} and "
            f"{list(ky.shape)}"
        )
    return kx, ky


def hsic_unbiased(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """The unbiased HSIC estimator of Song et al. (2012) for ``n >= 4`` images.

    With ``K~``, ``L~`` the Gram matrices ``kx = K``, ``ky = L`` with their diagonals set
    to zero::

        HSIC1 = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                  - 2 / (n-2) 1^T K~ L~ 1 ] / (n (n-3))

    It can be slightly negative (it is unbiased, not non-negative).

    >>> kx = torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    >>> hsic_unbiased(kx, kx)   # zero off-diagonals: nothing in common beyond the diagonal
    0.0

    Raises:
        InvariscopeError: fewer than 4 images (the estimator divides by ``n - 3``).
    """
    kx, ky = _check_pair(kx, ky)
    n = kx.shape[0]
    if n < MIN_IMAGES:
        raise InvariscopeError(
            f"the unbiased HSIC (minibatch CKA) needs batches of >= {MIN_IMAGES} images, got "
            f"{n}; use a larger " + hint("batch_size", "--batch-size")
        )
    kx = kx.clone()
    ky = ky.clone()
    kx.fill_diagonal_(0.0)
    ky.fill_diagonal_(0.0)
    ones_k = kx.sum(dim=1)  # K~ 1
    ones_l = ky.sum(dim=1)
    trace = (kx * ky).sum()  # tr(K~ L~), both symmetric
    middle = ones_k.sum() * ones_l.sum() / ((n - 1) * (n - 2))
    last = 2.0 / (n - 2) * (ones_k @ ones_l)  # 1^T K~ L~ 1
    return float((trace + middle - last) / (n * (n - 3)))


def hsic_biased(kx: torch.Tensor, ky: torch.Tensor) -> float:
    """The biased (centred) HSIC ``tr(K H L H) / (n - 1)^2``, ``H = I - 11^T / n``: the
    estimator of the full-batch CKA of Kornblith et al."""
    kx, ky = _check_pair(kx, ky)
    n = kx.shape[0]
    if n < 2:
        raise InvariscopeError(f"HSIC needs at least 2 images, got {n}")
    h = torch.eye(n, dtype=torch.float64, device=kx.device) - 1.0 / n
    return float(((h @ kx @ h) * ky).sum() / (n - 1) ** 2)


def minibatch_cka(hsic_xy_sum: float, hsic_xx_sum: float, hsic_yy_sum: float) -> float:
    """``sum_xy / sqrt(sum_xx * sum_yy)`` from summed per-batch unbiased HSICs.

    Defined everywhere, never NaN: if either self-similarity sum is ``<= 0`` (a
    representation that is constant over the images) the result is 0.0, because a
    constant layer carries no information, so it shares none.

    >>> minibatch_cka(2.0, 4.0, 1.0)
    1.0
    >>> minibatch_cka(0.0, 0.0, 1.0)   # a constant layer
    0.0
    """
    xy, xx, yy = float(hsic_xy_sum), float(hsic_xx_sum), float(hsic_yy_sum)
    if not (xx > CONSTANT_TOL and yy > CONSTANT_TOL):
        return 0.0
    return xy / float(np.sqrt(xx * yy))


def cka_direct(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, unbiased: bool = False
) -> float:
    """Linear CKA of features ``x`` ``[n, ...]`` and ``y`` ``[n, ...]`` from one full batch.

    ``unbiased=False``: Kornblith et al.'s estimator (biased, centred HSIC);
    ``unbiased=True``: the unbiased HSIC of Song et al. (``n >= 4``), equal to
    :func:`minibatch_cka` over a single batch. A constant representation gives 0.0.
    """
    fx, fy = _flat(x), _flat(y)
    if fx.shape[0] != fy.shape[0]:
        raise InvariscopeError(
            f"x and y must hold the same images, got {fx.shape[0]} and {fy.shape[0]} rows"
        )
    kx, ky = centred_gram(fx), centred_gram(fy)
    hsic = hsic_unbiased if unbiased else hsic_biased
    return minibatch_cka(hsic(kx, ky), hsic(kx, kx), hsic(ky, ky))


# --------------------------------------------------------------------- streaming tables


def hsic_table(
    features_a: Mapping[str, torch.Tensor],
    features_b: Mapping[str, torch.Tensor],
) -> pd.DataFrame:
    """Per-batch unbiased HSICs of every layer pair and every self pair, as a tidy table.

    Args:
        features_a, features_b: ``{layer: features [n, ...]}`` of the same ``n >= 4``
            images in two models (or one model twice).

    Returns:
        Columns ``kind`` (``"ab"`` for a pair, ``"aa"`` / ``"bb"`` for a layer with
        itself), ``layer_a``, ``layer_b`` (``""`` where not applicable), ``value``
        (float64) and ``n`` (images). Rows of several batches sum to the streamed HSIC.
    """
    grams_a = {name: centred_gram(f) for name, f in features_a.items()}
    grams_b = {name: centred_gram(f) for name, f in features_b.items()}
    sizes = {g.shape[0] for g in (*grams_a.values(), *grams_b.values())}
    if len(sizes) > 1:
        raise InvariscopeError(f"the features hold different numbers of images: {sorted(sizes)}")
    n = sizes.pop() if sizes else 0
    rows: list[tuple[str, str, str, float]] = []
    for name, kx in grams_a.items():
        rows.append(("aa", name, "", hsic_unbiased(kx, kx)))
    for name, ky in grams_b.items():
        rows.append(("bb", "", name, hsic_unbiased(ky, ky)))
    for name_a, kx in grams_a.items():
        for name_b, ky in grams_b.items():
            rows.append(("ab", name_a, name_b, hsic_unbiased(kx, ky)))
    table = pd.DataFrame(rows, columns=["kind", "layer_a", "layer_b", "value"])
    table["value"] = table["value"].astype(np.float64)
    table["n"] = np.int64(n)
    return table


def cka_table(hsic: pd.DataFrame, layers_a: Sequence[str], layers_b: Sequence[str]) -> pd.DataFrame:
    """Minibatch CKA of every (layer_a, layer_b) pair from a streamed :func:`hsic_table`.

    Returns:
        One row per pair, in layer order: ``layer_a, layer_b, order_a, order_b, cka,
        constant_a, constant_b`` (the flags mark layers whose summed self-similarity is
        ``<= 0``: constant over the images; their CKA is 0.0).
    """
    cols = ["layer_a", "layer_b", "order_a", "order_b", "cka", "constant_a", "constant_b"]
    if hsic is None or not len(hsic):
        return pd.DataFrame({c: [] for c in cols})
    sums = hsic.groupby(["kind", "layer_a", "layer_b"], sort=False)["value"].sum()
    rows = []
    for i, a in enumerate(layers_a):
        xx = float(sums.get(("aa", a, ""), 0.0))
        for j, b in enumerate(layers_b):
            yy = float(sums.get(("bb", "", b), 0.0))
            xy = float(sums.get(("ab", a, b), 0.0))
            rows.append(
                (a, b, i, j, minibatch_cka(xy, xx, yy), xx <= CONSTANT_TOL, yy <= CONSTANT_TOL)
            )
    types = {"order_a": np.int64, "order_b": np.int64, "cka": np.float64}
    return pd.DataFrame(rows, columns=cols).astype(
        {**types, "constant_a": bool, "constant_b": bool}
    )
