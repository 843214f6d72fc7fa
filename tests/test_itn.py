"""The Invariant Transformer Net (Bunne et al. 2018, strategy 2): loss, identity start,
frozen classifier, switch rule, learned family on a trained digits classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import one_line_error

import invariscope.cli.itn  # noqa: F401 - registers the command
from invariscope.cli import run as cli
from invariscope.errors import InvariscopeError
from invariscope.measure.itn import ITNAnalysis, invariant_transformer, parse_controls
from invariscope.models.itn import (
    InvariantTransformerNet,
    colour_transform,
    control_loss,
    decompose_colour,
    decompose_spatial,
    invariance_loss,
    rms_displacement,
    select_loss,
    theta_to_pixel_matrix,
)
from invariscope.transforms import rotation_matrix, shear_x_matrix, warp_affine, zoom_matrix

# ------------------------------------------------------------------ the loss


def test_invariance_loss_matches_hand_computed_values():
    # A_theta = scale x by 2 and shift y by 0.5 (normalised): A_hat - I = [[1,0,0],[0,0,.5],[0,0,0]]
    a = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.5]]])
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    # (A_hat - I) s: (1, 0, 0) -> |.|^2 = 1; (0, .4, 0) -> 0.16; (0, .5, 0) -> 0.25
    expected = -(1.0 + 0.16 + 0.25) / 3
    assert invariance_loss(a, s).item() == pytest.approx(expected, abs=1e-7)
    # a colour matrix [C, C + 1] (C = 1): I' = 3 I - 1 -> A_hat - I = [[2, -1], [0, 0]]
    phi = torch.tensor([[[3.0, -1.0]]])
    s2 = torch.tensor([[0.6, 0.8]])
    assert invariance_loss(phi, s2).item() == pytest.approx(-((1.2 - 0.8) ** 2), abs=1e-7)
    # L_k = mean_j k_j L(A_j); the identity costs nothing
    both = torch.cat([a, torch.eye(2, 3)[None]])
    k = torch.tensor([0.5, 1.0])
    assert control_loss(both, k, s).item() == pytest.approx(0.5 * expected / 2, abs=1e-7)
    # over an orthonormal basis -L is exactly ||A_hat - I||_F^2 / d = rms_displacement^2
    basis = torch.eye(3)
    assert (-invariance_loss(a, basis)).item() == pytest.approx(
        rms_displacement(a).item() ** 2, abs=1e-7
    )
    assert rms_displacement(a).item() == pytest.approx(math.sqrt((1 + 0.25) / 3), abs=1e-7)


def test_select_loss_switch_rule():
    assert select_loss(0.80, 0.85) == "classifier"
    assert select_loss(0.85, 0.85) == "invariance"
    assert select_loss(0.95, 0.85) == "invariance"


# ------------------------------------------------------------------ conventions


def test_theta_convention_and_decomposition_against_registered_matrices():
    H = W = 28
    # a shift by half the half-width (0.5 normalised) is 7 px on a 28-px image
    shift = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, -0.25]]])
    assert torch.allclose(
        theta_to_pixel_matrix(shift, H, W), torch.tensor([[[1.0, 0.0, 7.0], [0.0, 1.0, -3.5]]])
    )
    # a linear normalised map fixes the centre: equals the registered rotation about it
    deg = torch.tensor([20.0])
    rad = math.radians(20.0)
    theta = torch.tensor(
        [[[math.cos(rad), math.sin(rad), 0.0], [-math.sin(rad), math.cos(rad), 0.0]]]
    )
    assert torch.allclose(theta_to_pixel_matrix(theta, H, W), rotation_matrix(deg, H, W), atol=1e-5)
    # decomposition of rotation o zoom o shear (applied right to left), translated
    k, z = torch.tensor([0.3]), torch.tensor([1.25])
    m = rotation_matrix(deg, H, W)[:, :, :2] @ zoom_matrix(z, H, W)[:, :, :2]
    m = m @ shear_x_matrix(k, H, W)[:, :, :2]
    c = torch.tensor([(W - 1) / 2, (H - 1) / 2])
    t = c - m[0] @ c + torch.tensor([2.0, -3.0])
    full = torch.cat([m, t[None, :, None]], dim=-1)
    d = decompose_spatial(full, H, W)
    assert d["rotation_deg"].item() == pytest.approx(20.0, abs=1e-4)
    assert d["scale_x"].item() == pytest.approx(1.25, abs=1e-5)
    assert d["scale_y"].item() == pytest.approx(1.25, abs=1e-5)
    assert d["shear"].item() == pytest.approx(0.3, abs=1e-5)
    assert (d["tx_px"].item(), d["ty_px"].item()) == pytest.approx((2.0, -3.0), abs=1e-4)
    col = decompose_colour(torch.tensor([[[0.5, 0.2]]]))
    assert (col["contrast"].item(), col["brightness"].item(), col["mixing"].item()) == (
        pytest.approx(0.5),
        pytest.approx(0.2),
        0.0,
    )
    # colour then warp: an RGB mixing matrix acts per pixel, the bias shifts every pixel
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    phi = torch.cat([torch.eye(3)[[1, 2, 0]], torch.full((3, 1), 0.1)], dim=1)[None].expand(2, 3, 4)
    assert torch.allclose(colour_transform(x, phi), x[:, [1, 2, 0]] + 0.1)


def test_identity_at_initialisation(trained_digits):
    model, _, test_set, _ = trained_digits
    x, y = test_set.images[:64], test_set.labels[:64]
    itn = InvariantTransformerNet(channels=1)
    k = torch.rand(64, 2, generator=torch.Generator().manual_seed(3))
    out = itn(x, k[:, 0], k[:, 1])
    assert torch.allclose(out, x, atol=1e-6)
    theta, phi = itn.matrices(k[:, 0], k[:, 1])
    assert torch.equal(theta, torch.eye(2, 3).expand(64, 2, 3))
    assert torch.equal(phi, torch.eye(1, 2).expand(64, 1, 2))
    with torch.no_grad():
        clean, moved = model(x).argmax(1), model(out).argmax(1)
    assert torch.equal(clean, moved)
    assert (moved == y).float().mean() == (clean == y).float().mean()
    # the warp core's identity is what the ITN uses: same pixels as warping by I directly
    assert torch.allclose(out, warp_affine(x, torch.eye(2, 3)), atol=1e-6)


# ------------------------------------------------------------------ training on the engine


def test_training_freezes_the_classifier_and_follows_the_switch_rule(trained_digits):
    model, train_set, test_set, _ = trained_digits
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None  # (left over from training the fixture)
    flags = [p.requires_grad for p in model.parameters()]
    res = invariant_transformer(
        model,
        test_set,
        train_set,
        train_steps=24,
        save_every=8,
        train_batch=16,
        lr=1e-2,
        tolerance=1.0,  # acc_orig = clean accuracy: both branches of the rule occur
        c_theta=2.5,
        images=24,
        batch_size=12,
        grid=2,
        sweep_points=3,
        examples=2,
        progress=False,
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise: never updated
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    clean = res.tables["clean"].iloc[0]
    acc_orig = float(clean["acc_orig"])
    assert clean["n"] == len(train_set) and acc_orig == pytest.approx(clean["clean_accuracy"])
    tr = res.tables["training"]
    assert list(tr["step"]) == list(range(24)) and list(tr["chunk"]) == [s // 8 for s in range(24)]
    later = tr[tr["step"] > 0]
    expected = [select_loss(a, acc_orig) for a in later["batch_accuracy"]]
    assert list(later["loss_used"]) == expected
    assert {"classifier", "invariance"} <= set(expected)
    cls = tr[tr["loss_used"] == "classifier"]
    inv = tr[tr["loss_used"] == "invariance"]
    assert np.array_equal(cls["loss"], cls["classifier_loss"])
    # default controls: k1 spatial, k2 colour; c_theta weighs the colour term
    np.testing.assert_allclose(inv["loss"], inv["l_k1"] + 2.5 * inv["l_k2"], rtol=1e-5)
    assert tr["loss_used"].iloc[0] == "classifier"  # the kick-off step
    # the returned ITN is the trained one: it has left the identity
    theta, _ = res.itn.matrices(torch.ones(1), torch.ones(1))
    assert not torch.equal(theta, torch.eye(2, 3)[None])
    acc = res.tables["accuracy"]
    assert sorted(zip(acc["k1"], acc["k2"], strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert set(res.tables["examples"]["example"]) == {0, 1}


def test_bad_settings_are_refused(capsys, tmp_path):
    with pytest.raises(InvariscopeError, match="controls"):
        parse_controls("spatial,shape")
    assert parse_controls("color, spatial") == ("colour", "spatial")
    for kw, words in (
        ({"steps": 0}, "steps"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"c_theta": -1.0}, "c_theta"),
        ({"grid": 1}, "grid"),
        ({"lr": float("nan")}, "lr"),
    ):
        with pytest.raises(InvariscopeError, match=words):
            ITNAnalysis([0], **kw)
    out = tmp_path / "run"
    code = cli(
        ["itn", "--model", "simple-cnn", "--data", "digits", "--tolerance", "2", "--out", str(out)]
    )
    assert code == 2 and "tolerance" in one_line_error(capsys) and not out.exists()


# ------------------------------------------------------------------ the learned family


@pytest.fixture(scope="module")
def learned(trained_digits, tmp_path_factory):
    """An ITN trained on the session's digits classifier, and the sweep's rotation thresholds."""
    from invariscope.measure.sweep import sweep

    model, train_set, test_set, _ = trained_digits
    res = invariant_transformer(
        model,
        test_set,
        train_set,
        train_steps=150,
        save_every=75,
        lr=1e-2,
        c_theta=1e-3,  # on digits the colour term otherwise outgrows the spatial one
        images=120,
        batch_size=60,
        grid=3,
        sweep_points=5,
        examples=4,
        out=tmp_path_factory.mktemp("itn") / "run",
        figures=True,
        progress=False,
    )
    sw = sweep(model, test_set, ["rotation"], {"rotation": "-60:60:5"}, images=120, progress=False)
    return res, sw


def test_learned_family_moves_keeps_accuracy_and_agrees_with_the_sweep(learned):
    res, sw = learned
    lt = res.tables["learned_transforms"].set_index(["transform", "k"])
    clean = res.tables["clean"].iloc[0]
    tol, acc_orig = float(clean["tolerance"]), float(clean["acc_orig"])
    # the corner transformations move points: mean ||A x - x|| over unit x well above 0
    # (normalised units: 0.05 is 0.7 px on these 28-px images; colour: 2% of the range)
    assert lt.loc[("spatial", 1.0), "displacement"] > 0.05
    assert lt.loc[("colour", 1.0), "displacement"] > 0.02
    # accuracy on test images under the learned family stays within the tolerance band
    # below acc_orig (the ITN keeps the batch accuracy at about acc_orig)
    acc = res.tables["accuracy"]
    band = float(clean["clean_accuracy"]) * (1.0 - tol)
    assert acc["accuracy"].mean() >= acc_orig - band
    # in kind like the sweep: the rotation the ITN learned at k1 = 1 lies inside the
    # rotation range where the sweep keeps accuracy above half of its identity accuracy
    th = sw.thresholds
    overall = th[(th["transform"] == "rotation") & (th["label"] == -1)].iloc[0]
    rot = float(lt.loc[("spatial", 1.0), "rotation_deg"])
    low = overall["threshold_low"] if np.isfinite(overall["threshold_low"]) else -60.0
    high = overall["threshold_high"] if np.isfinite(overall["threshold_high"]) else 60.0
    assert low < rot < high


def test_figures_are_drawn(learned):
    res, _ = learned
    names = {p.name for p in res.figures}
    for stem in (
        "itn_training",
        "itn_k1_probabilities",
        "itn_examples",
        "itn_transforms",
        "itn_accuracy",
    ):
        assert f"{stem}.png" in names and f"{stem}.svg" in names


def test_module_doctests():
    import doctest

    import invariscope.models.itn as module

    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
