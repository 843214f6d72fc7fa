"""Learned equivariance maps (Lenc & Vedaldi 2018): HOG flips, known linear maps,
structured vs dense fits, geometry, transformation layers, and the analysis on the engine."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.measure.equivariance import EquivarianceAnalysis, equivariance
from invariscope.measure.equivariance_fit import (
    FeatureGeometry,
    Statistics,
    TransformationLayer,
    accumulate,
    apply_map,
    back_projection,
    cells,
    fit_map,
    gather,
    hellinger_per_cell,
    layer_geometry,
    neighbourhoods,
    parse_transforms,
    resample_features,
    targets,
)
from invariscope.models import create_model
from invariscope.models.hog import HOG, hog_flip_permutation


def _noise_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images whose first and last rows are constant: HOG sets g_row = 0 there,
    so a non-zero g_col would give theta exactly 0, which a mirror keeps in bin 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, -1] = 0.0
    return x


def _hand_permutation(bins: int, cy: int, cx: int) -> np.ndarray:
    """phi(hflip x)[k] = phi(x)[perm[k]], derived by hand: cell (v, u) <- (v, cx-1-u),
    bin t <- bins-1-t (theta -> 180 - theta; bin t holds [20 t, 20 t + 20) degrees, so
    its mirror image (160 - 20 t, 180 - 20 t] is bin 8 - t but for the end points),
    in the layout ((v cx) + u) bins + t."""
    perm = np.empty(cy * cx * bins, dtype=np.int64)
    for v in range(cy):
        for u in range(cx):
            for t in range(bins):
                perm[(v * cx + u) * bins + t] = (v * cx + (cx - 1 - u)) * bins + (bins - 1 - t)
    return perm


def test_hog_hflip_is_the_permutation_and_the_learned_map_finds_it():
    hog = HOG(orientations=9, cell=8)  # 32 / 8: the cells tile the image exactly
    x = _noise_images(400)
    flip = parse_transforms("hflip")[0]
    phi_x, phi_z = hog(x), hog(flip.apply_inverse(x))  # [n, 9, 4, 4]
    assert phi_x.shape == (400, 9, 4, 4)
    perm = _hand_permutation(9, 4, 4)
    np.testing.assert_array_equal(perm, hog_flip_permutation(9, 4, 4))
    flat_x = cells(phi_x).reshape(400, -1)
    flat_z = cells(phi_z).reshape(400, -1)
    # the premise: HOG of the mirrored image is exactly the permuted HOG
    torch.testing.assert_close(flat_x, flat_z[:, perm], rtol=0, atol=1e-6)
    stats = accumulate(gather(cells(phi_z[:300]), None), targets(cells(phi_x[:300]), False))
    fitted = fit_map(stats, "lsq")
    P = np.zeros((144, 144))
    P[perm, np.arange(144)] = 1.0  # y = x P: output k reads input perm[k]
    np.testing.assert_allclose(fitted.dense(16, 9), P, atol=1e-4)
    np.testing.assert_allclose(fitted.b, 0.0, atol=1e-4)
    held_out = hellinger_per_cell(apply_map(fitted, phi_z[300:], (9, 4, 4)), phi_x[300:])
    assert float(held_out.mean()) < 1e-4
    # the identity map is far off (noise histograms are near-uniform, so "far" is ~0.24
    # per cell here, against < 1e-4 for the learned map)
    identity = float(hellinger_per_cell(phi_z[300:], phi_x[300:]).mean())
    assert identity > 1000 * float(held_out.mean()) and identity > 0.1
    # OMP with one coefficient per output selects exactly the permutation
    omp = fit_map(stats, "omp", k=1)
    np.testing.assert_array_equal(np.argmax(np.abs(omp.dense(16, 9)), axis=0), perm)


def _synthetic(n: int, P: int, C: int, seed: int):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(size=(n, P, C)))
    return x, rng


def test_regression_recovers_a_known_linear_map():
    x, rng = _synthetic(500, 4, 3, 0)  # 12 features
    A_true = rng.normal(size=(12, 12)) * (rng.random((12, 12)) < 0.25)
    b_true = rng.normal(size=12)
    y = x.reshape(500, -1) @ torch.as_tensor(A_true) + torch.as_tensor(b_true)
    stats = accumulate(gather(x, None), y.reshape(500, 1, -1))
    for method, kw in (("lsq", {}), ("ridge", {"ridge": 1e-9}), ("omp", {"k": 12})):
        fitted = fit_map(stats, method, **kw)
        np.testing.assert_allclose(fitted.A[0], A_true, atol=1e-4, err_msg=method)
        np.testing.assert_allclose(fitted.b[0], b_true, atol=1e-4, err_msg=method)
    # k-sparse: with k = the densest row's support, OMP is exact too
    k = int((A_true != 0).sum(0).max())
    np.testing.assert_allclose(fit_map(stats, "omp", k=k).A[0], A_true, atol=1e-4)
    # ridge shrinks: a strong penalty moves the answer away from A_true
    assert np.abs(fit_map(stats, "ridge", ridge=10.0).A[0] - A_true).max() > 0.05


@pytest.mark.parametrize(
    ("method", "kw"), [("lsq", {}), ("ridge", {"ridge": 0.1}), ("omp", {"k": 4})]
)
def test_structured_fit_equals_dense_fit_restricted_to_its_support(method, kw):
    geom = FeatureGeometry(3, 4, 5, (4.0, 4.0), (1.5, 1.5))  # 20 cells x 3 channels
    t = parse_transforms("rotation=30")[0]
    index = neighbourhoods(back_projection(geom, geom, t, 16, 20), geom, geom, 3)
    assert (index < 0).any()  # some neighbourhoods leave the grid
    x, rng = _synthetic(200, 20, 3, 1)
    y = torch.as_tensor(rng.normal(size=(200, 20, 3))) + 0.5 * x.flip(1)
    structured = fit_map(accumulate(gather(x, index), targets(y, True)), method, index=index, **kw)
    dense = accumulate(gather(x, None), targets(y, False))
    n = dense.n
    expected = np.zeros((60, 60))
    for p in range(20):
        cols = np.concatenate([np.arange(c * 3, c * 3 + 3) for c in index[p] if c >= 0])
        for t_ in range(3):
            out = p * 3 + t_
            sub = Statistics(
                n,
                dense.sx[:, cols],
                dense.sy[:, [out]],
                dense.xx[:, cols][:, :, cols],
                dense.xy[:, cols][:, :, [out]],
            )
            expected[cols, out] = fit_map(sub, method, **kw).A[0, :, 0]
    got = structured.dense(20, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.count_nonzero(got[np.abs(expected) == 0]) == 0


def test_neighbourhood_of_a_flip_is_the_mirrored_cell():
    geom = FeatureGeometry(2, 3, 5, (2.0, 2.0), (0.5, 0.5))  # 5 x 3 cells of 2 px: 10 x 6 image
    flip = parse_transforms("hflip")[0]
    back = back_projection(geom, geom, flip, 6, 10)
    index = neighbourhoods(back, geom, geom, 1)
    v, u = np.divmod(np.arange(15), 5)
    np.testing.assert_array_equal(index[:, 0], v * 5 + (4 - u))


def test_simple_cnn_receptive_field_centres_by_hand():
    model = create_model("simple-cnn")
    # conv1 9x9 valid: centre u + 4; pool 2: 2u + 0.5 -> 2u + 4.5; conv2 7x7: 2(u + 3) + 4.5;
    # pool 2: 4u + 2 + 10.5
    expected = {
        "conv1": (1, 4.0),
        "pool1": (2, 4.5),
        "relu1": (2, 4.5),
        "conv2": (2, 10.5),
        "pool2": (4, 11.5),
        "relu2": (4, 11.5),
    }
    sizes = {"conv1": 20, "pool1": 10, "relu1": 10, "conv2": 4, "pool2": 2, "relu2": 2}
    for layer, (stride, offset) in expected.items():
        g = layer_geometry(model, layer, (28, 28), (64, sizes[layer], sizes[layer]))
        assert g.stride == (stride, stride) and g.offset == (offset, offset), layer
        # a flip about the image centre is a flip of the feature grid
        flip = g.carry(parse_transforms("hflip")[0].matrix(28, 28))
        np.testing.assert_allclose(flip[0], [-1, 0, sizes[layer] - 1], atol=1e-12)


def test_permutation_undoes_a_flip_for_mirror_symmetric_filters_and_tl_starts_there():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 5)
    with torch.no_grad():  # make every filter left-right symmetric
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    geom = layer_geometry(nn.Sequential(conv), "0", (16, 16), (4, 12, 12))
    flip = parse_transforms("hflip")[0]
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        phi_x, phi_z = conv(x), conv(flip.apply_inverse(x))
        forward = np.linalg.inv(back_projection(geom, geom, flip, 16, 16))
        moved = resample_features(phi_z, forward)
        torch.testing.assert_close(moved, phi_x, atol=1e-5, rtol=0)
        assert float((phi_z - phi_x).abs().max()) > 0.1  # the identity map is not enough
        tl = TransformationLayer(4, forward, 3)
        torch.testing.assert_close(tl(phi_z), moved)


def test_transforms_parse_with_their_inverses():
    for t in parse_transforms("hflip,vflip,rot90,zoom=0.5,rotation=45"):
        np.testing.assert_allclose(
            t.matrix(28, 28, inverse=True) @ t.matrix(28, 28), np.eye(3), atol=1e-5
        )
        x = torch.zeros(1, 1, 28, 28)
        x[..., 10:18, 12:16] = 1
        if t.name in ("hflip", "vflip", "rot90"):
            torch.testing.assert_close(t.apply(t.apply_inverse(x)), x)
    assert parse_transforms("zoom=0.5")[0].inverse == 2.0
    assert parse_transforms("rotation=45")[0].inverse == -45.0
    for bad, words in (
        ("brightness", "photometric"),
        ("zoom=1", "identity"),
        ("", "no transformation"),
    ):
        with pytest.raises(InvariscopeError, match=words):
            parse_transforms(bad)


def test_analysis_tables_match_direct_computation():
    from invariscope.data import create_dataset
    from invariscope.measure.equivariance_fit import l2_per_cell
    from invariscope.models.capture import capture_activations

    torch.manual_seed(0)
    model = create_model("simple-cnn").eval()
    test, train = create_dataset("digits", "test"), create_dataset("digits", "train")
    r = equivariance(
        model,
        test,
        train,
        "vflip",
        layers=["relu1", "relu2"],
        structured=1,
        train_images=40,
        stats_batch=20,
        transformation_layer="task",
        train_steps=3,
        train_batch=8,
        images=list(range(12)),
        batch_size=6,
        progress=False,
    )
    x = test.images[:12]
    y = test.labels[:12]
    z = torch.flip(x, dims=(-2,))
    with torch.no_grad():
        logits_x, acts_x = capture_activations(model, x, ["relu2"])
        logits_z, acts_z = capture_activations(model, z, ["relu2"])
    t = r.tables
    assert t["models"]["error"].iloc[0] == pytest.approx(
        float((logits_x.argmax(1) != y).float().mean())
    )
    inv = t["invariance"].set_index(["layer", "map"])
    e_none = float((logits_z.argmax(1) != y).float().mean())
    assert inv.loc[("relu1", "none"), "error"] == pytest.approx(e_none)
    assert inv.loc[("relu2", "none"), "error"] == pytest.approx(e_none)
    rec = r.reconstruction.set_index(["layer", "map"])
    d = l2_per_cell(acts_z["relu2"], acts_x["relu2"])
    norm = l2_per_cell(torch.zeros_like(acts_x["relu2"]), acts_x["relu2"])
    assert rec.loc[("relu2", "none"), "error"] == pytest.approx(float(d.mean()), rel=1e-5)
    assert rec.loc[("relu2", "none"), "baseline"] == pytest.approx(float(norm.mean()), rel=1e-5)
    s = r.invariance_summary.set_index("layer")
    assert set(r.reconstruction["map"]) == {"none", "permutation", "regression", "tl"}
    assert (s["learned"] == "tl").all()
    lost = s["error_none"] - s["error_original"]
    expected = ((s["error_none"] - s["error_tl"]) / lost).where(lost > 0)
    np.testing.assert_allclose(s["recovered"], expected)
    assert (s["invariant"] == (s["error_permutation"] <= s["error_learned_high"])).all()


def test_bad_settings_are_refused():
    from invariscope.data import create_dataset

    train = create_dataset("digits", "train")
    for kw, words in (
        ({"method": "magic"}, "method"),
        ({"structured": 0}, "structured"),
        ({"method": "none"}, "nothing to learn"),
        ({"kernel_size": 2}, "odd"),
        ({"hog": HOG(), "transformation_layer": "task"}, "HOG"),
    ):
        with pytest.raises(InvariscopeError, match=words):
            EquivarianceAnalysis(train, "hflip", **kw)


def test_figures_are_drawn_from_tables_and_empty_tables_are_refused(tmp_path):
    from invariscope.plots.equivariance import render_equivariance_figures

    rows = []
    for li, layer in enumerate(["net.conv1", "net.relu2"]):
        for ti, t in enumerate(["hflip", "vflip"]):
            for kind, e in (("none", 0.6), ("permutation", 0.5), ("tl", 0.05)):
                rows.append((layer, li, t, ti, kind, e, e - 0.02, e + 0.02, 100))
    cols = ["layer", "order", "transform", "transform_order", "map"]
    inv = pd.DataFrame(rows, columns=[*cols, "error", "error_low", "error_high", "n"])
    rec = inv[cols].assign(relative=inv["error"] * 2)
    tables = {
        "invariance": inv,
        "reconstruction": rec,
        "models": pd.DataFrame({"error": [0.03]}),
        "invariance_summary": pd.DataFrame(
            {"layer": ["net.relu2"], "transform": ["hflip"], "invariant": [True]}
        ),
    }
    paths = render_equivariance_figures(tables, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"equivariance_{n}.{e}" for n in ("invariance", "reconstruction") for e in ("png", "svg")
    )
    with pytest.raises(InvariscopeError, match="equivariance run"):
        render_equivariance_figures({}, tmp_path)


def test_module_doctests():
    """The API example runs HOG maps through the engine (no model)."""
    import doctest

    import invariscope.measure.equivariance as eq

    result = doctest.testmod(eq)
    assert result.attempted >= 1 and result.failed == 0


@pytest.mark.parametrize("label", ["hflip", "vflip", "rot90"])
def test_resampling_undoes_exact_transforms_of_the_image_and_of_a_pooled_map(label):
    """P_g applied to phi(g^-1 x) gives phi(x) exactly when phi is the image itself
    (stride 1, offset 0) or its 2x2 average pooling (stride 2, offset 0.5): the direction
    of the back-projection (rot90 is not its own inverse) and the cell centres are right."""
    t = parse_transforms(label)[0]
    x = torch.rand(2, 1, 32, 32)
    z = t.apply_inverse(x)
    for geom, f in (
        (FeatureGeometry(1, 32, 32, (1.0, 1.0), (0.0, 0.0)), lambda a: a),
        (FeatureGeometry(1, 16, 16, (2.0, 2.0), (0.5, 0.5)), lambda a: F.avg_pool2d(a, 2)),
    ):
        forward = np.linalg.inv(back_projection(geom, geom, t, 32, 32))
        torch.testing.assert_close(resample_features(f(z), forward), f(x), atol=1e-6, rtol=0)
