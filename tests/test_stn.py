"""STNs at any depth and pose statistics (Finnveden, Jansson & Lindeberg 2020)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from invariscope.errors import InvariscopeError
from invariscope.measure.pose import (
    circular_sd_deg,
    forward_pose_matrix,
    perturbation_matrix,
    pose_components,
    pose_sd,
)
from invariscope.measure.stn import draw_perturbations, orthogonal_regression, render_perturbed
from invariscope.models import create_model
from invariscope.models.stn import (
    FAMILIES,
    SpatialTransformerNetwork,
    build_stn,
    compose_theta,
    conv_blocks,
    parse_arch,
    warp_theta,
)
from invariscope.transforms import affine_product, theta_to_pixel


def _classifier(size: int = 28, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("simple-cnn", image_size=size).eval()


def _randomise_head(stn: SpatialTransformerNetwork, scale: float = 0.05, seed: int = 1) -> None:
    """Give the (identity-initialised) last layer small random weights: a 'trained' head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = stn.head.out.weight
        w.copy_(scale * torch.randn(w.shape, generator=g) / math.sqrt(w.shape[1]))


# ------------------------------------------------------------------ architecture


def test_conv_blocks_and_names():
    net = _classifier().net
    assert conv_blocks(net) == [3, 6]  # [conv1 pool1 relu1] [conv2 pool2 relu2]
    assert parse_arch("sl1x2").name == "SL1x2" and parse_arch("SL1x2").iterations == 2
    assert parse_arch("cnn").variant is None and parse_arch("C1").warps_input is False
    assert parse_arch("C0").warps_input and parse_arch("DL2").warps_input
    for bad, words in (
        ("XL3", "unknown architecture"),
        ("DL0", "use C0"),
        ("C1x2", "iterations"),
    ):
        with pytest.raises(InvariscopeError, match=words):
            parse_arch(bad, 2)
    with pytest.raises(InvariscopeError, match="beyond the classifier's 2 conv blocks"):
        build_stn(_classifier(), "SL3")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("arch", ["C0", "C1", "C2", "DL1", "DL2", "SL1", "SL2", "C0x3", "SL1x2"])
def test_every_variant_starts_as_its_classifier(arch, family):
    net = _classifier()
    stn = build_stn(net, arch, family=family).eval()
    x = torch.rand(5, 1, 28, 28)
    theta = stn.transform(x)
    assert torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(5, 2, 3))
    assert torch.allclose(stn(x), net(x), atol=1e-5, rtol=0)
    # the STN's classifier IS the given one (shared, not a copy)
    assert stn.classifier is net


def test_smaller_output_starts_as_the_classifier_on_the_pooled_input():
    net30 = _classifier(30)
    x = torch.rand(3, 1, 60, 60)
    for arch in ("C0", "DL1", "SL1"):
        stn = build_stn(net30, arch, input_size=(1, 60, 60), output_size=30).eval()
        assert stn.head.kind == "conv"  # two conv + max-pool layers, then FC (60 px input)
        assert torch.allclose(stn(x), net30(F.avg_pool2d(x, 2)), atol=1e-5, rtol=0)
    net60 = _classifier(60)
    c1 = build_stn(net60, "C1", input_size=(1, 60, 60)).eval()
    assert torch.allclose(c1(x), net60(x), atol=1e-5, rtol=0)


def test_theta_composition_is_the_forward_pixel_composition():
    a, b = math.radians(25), math.radians(-40)
    t1 = torch.tensor([[[math.cos(a), -math.sin(a), 0.1], [math.sin(a), math.cos(a), -0.2]]])
    t2 = torch.tensor([[[0.8, 0.1, 0.05], [-0.1, 0.9, 0.0]]]) @ torch.tensor(
        [[math.cos(b), -math.sin(b), 0.0], [math.sin(b), math.cos(b), 0.0], [0.0, 0.0, 1.0]]
    )
    both = compose_theta(t1, t2)
    h3 = torch.cat([t1, torch.tensor([[[0.0, 0.0, 1.0]]])], 1) @ torch.cat(
        [t2, torch.tensor([[[0.0, 0.0, 1.0]]])], 1
    )
    assert torch.allclose(both, h3[:, :2], atol=1e-7)
    # sampling by t1 then by t2 = the forward pixel map of t2 after that of t1
    m1, m2 = theta_to_pixel(t1, 28, 28), theta_to_pixel(t2, 28, 28)
    assert torch.allclose(theta_to_pixel(both, 28, 28), affine_product(m2, m1), atol=1e-4)


@pytest.mark.parametrize("arch", ["C0x3", "SL1x2", "DL1x2"])
def test_iterations_compose_and_warp_the_original_input_once(arch):
    torch.manual_seed(3)
    stn = build_stn(_classifier(), arch).eval()
    _randomise_head(stn)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        # by hand: each iteration sees the ORIGINAL input warped by the product so far
        theta = stn.head(stn._loc_features(x))
        for _ in range(stn.iterations - 1):
            step = stn.head(stn._loc_features(warp_theta(x, theta)))
            theta = compose_theta(theta, step)
        assert not torch.allclose(theta, stn.head(stn._loc_features(x)), atol=1e-3)
        assert torch.allclose(stn.transform(x), theta, atol=1e-6)
        # the classifier sees the original input warped ONCE by the product matrix
        once = warp_theta(x, theta)
        assert torch.allclose(stn.warped_input(x), once, atol=1e-6)
        assert torch.allclose(stn(x), stn.classifier(once), atol=1e-5)
        # an extra iteration at test time composes one more prediction
        more = compose_theta(theta, stn.head(stn._loc_features(once)))
        assert torch.allclose(stn.transform(x, iterations=stn.iterations + 1), more, atol=1e-6)


@pytest.mark.parametrize("arch", ["C0", "C1", "DL1", "SL1", "SL1x2"])
def test_localisation_net_learns_after_one_step(arch):
    torch.manual_seed(0)
    stn = build_stn(_classifier(), arch).train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(stn.parameters(), lr=1e-2)
    F.cross_entropy(stn(x), y).backward()
    assert stn.head.out.weight.grad.abs().sum() > 0  # the warp passes gradients to theta
    opt.step()
    opt.zero_grad()
    F.cross_entropy(stn(x), y).backward()
    for name, p in stn.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if stn.loc_body is not None:  # DLX: its own fresh copies of the blocks
        for name, p in stn.loc_body.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        own = dict(stn.loc_body.named_parameters())
        assert not torch.equal(own["0.weight"], stn.classifier.net.conv1.weight)


# ------------------------------------------------------------------------ pose


def test_pose_decomposition_recovers_known_matrices():
    t = perturbation_matrix(
        torch.tensor([30.0, -120.0, 0.0]),
        torch.tensor([3.0, -5.0, 0.0]),
        torch.tensor([2.0, 7.0, 0.0]),
        torch.tensor([1.0, -0.5, 0.0]),
    )
    p = pose_components(t)
    np.testing.assert_allclose(p["angle_deg"], [30.0, -120.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(p["tx_px"], [3.0, -5.0, 0.0])
    np.testing.assert_allclose(p["ty_px"], [2.0, 7.0, 0.0])
    np.testing.assert_allclose(p["log2_det"], [2.0, -1.0, 0.0], atol=1e-12)
    # rotation by 30 deg counter-clockwise as displayed (y down): [[c, s], [-s, c]]
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    np.testing.assert_allclose(t[0, :, :2].numpy(), 2 * np.array([[c, s], [-s, c]]), atol=1e-12)
    # an STN's theta: sampling 0.5 (normalised) to the right moves the content 7 px left
    shift = forward_pose_matrix(torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]), 28, 28)
    np.testing.assert_allclose(pose_components(shift)["tx_px"], [-7.0], atol=1e-12)
    zoom = forward_pose_matrix(torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]]), 28, 28)
    np.testing.assert_allclose(pose_components(zoom)["log2_det"], [2.0], atol=1e-12)
    a = math.radians(20)  # sampling rotated by +20 in y-down coordinates = content -20 there
    rot = forward_pose_matrix(
        torch.tensor([[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]]), 28, 28
    )
    np.testing.assert_allclose(pose_components(rot)["angle_deg"], [20.0], atol=1e-5)


def test_a_transformer_that_undoes_the_perturbation_leaves_the_identity_pose():
    from invariscope.transforms import invert_affine, pixel_to_theta, rotation_matrix

    angle, tx, ty = torch.tensor([37.0, -80.0]), torch.tensor([5.0, 0.0]), torch.tensor([-3.0, 2.0])
    t = perturbation_matrix(angle, tx, ty, torch.tensor([0.5, -1.0]))
    # the perturbation as a pixel matrix of a 60 px image (about the centre c = 29.5)
    c = torch.tensor([29.5, 29.5], dtype=torch.float64)
    pixel = torch.cat([t[:, :, :2], (c - t[:, :, :2] @ c + t[:, :, 2])[:, :, None]], 2)
    oracle = pixel_to_theta(invert_affine(pixel.float()), 60, 60)  # samples the upright digit
    p = forward_pose_matrix(oracle, 60, 60)
    final = torch.cat([p[:, :, :2] @ t[:, :, :2], p[:, :, :2] @ t[:, :, 2:] + p[:, :, 2:]], 2)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(final, identity.expand(2, 2, 3), atol=1e-4)
    # and the rotation part alone, from the registered transform's own matrix
    r = rotation_matrix(angle, 60, 60)
    p = forward_pose_matrix(pixel_to_theta(invert_affine(r), 60, 60), 60, 60)
    np.testing.assert_allclose(pose_components(p)["angle_deg"], [-37.0, 80.0], atol=1e-4)


def test_pose_sd_is_the_mean_within_class_sd():
    frame = pd.DataFrame(
        {
            "label": [0, 0, 0, 1, 1, 2],
            "angle_deg": [10.0, 20.0, 30.0, -5.0, 5.0, 99.0],
            "tx_px": [0.0, 3.0, 0.0, 1.0, 1.0, 0.0],
            "ty_px": [0.0, 0.0, 4.0, 0.0, 2.0, 0.0],
            "log2_det": [0.0, 1.0, 2.0, 0.0, 0.0, 5.0],
        }
    )
    row = pose_sd(frame).iloc[0]
    # class 2 has one image: left out. Circular SD sqrt(-2 ln R), R the mean resultant
    # length: class 0 (10, 20, 30 deg) R = (1 + 2 cos 10deg) / 3; class 1 (+-5) R = cos 5deg
    assert row["classes"] == 2
    r0 = (1 + 2 * math.cos(math.radians(10))) / 3
    r1 = math.cos(math.radians(5))
    circ = [math.degrees(math.sqrt(-2 * math.log(r))) for r in (r0, r1)]
    assert row["angle_sd_deg"] == pytest.approx(sum(circ) / 2, rel=1e-9)
    # near 0 the circular SD is the linear one (ddof 0) to first order
    assert circ[0] == pytest.approx(np.std([10, 20, 30]), rel=0.01)
    # the paper's arctan reading: within (-90, 90) the plain sample SD (ddof 1)
    assert row["angle_sd_arctan_deg"] == pytest.approx((10.0 + math.sqrt(50.0)) / 2)
    d0 = math.sqrt(np.var([0, 3, 0], ddof=1) + np.var([0, 0, 4], ddof=1))
    d1 = math.sqrt(0.0 + 2.0)
    assert row["distance_sd_px"] == pytest.approx((d0 + d1) / 2)
    assert row["log2_det_sd"] == pytest.approx((1.0 + 0.0) / 2)


def test_pose_sd_of_an_upside_down_canonical_pose_is_small():
    # a class brought to 180 deg reads as +-179: one pose, not two 358 deg apart
    frame = pd.DataFrame(
        {
            "label": [0, 0, 1, 1],
            "angle_deg": [179.0, -179.0, -1.0, 1.0],
            "tx_px": 0.0,
            "ty_px": 0.0,
            "log2_det": 0.0,
        }
    )
    per = pose_sd(frame, ["label"]).set_index("label")
    assert per.loc[0, "angle_sd_deg"] == pytest.approx(per.loc[1, "angle_sd_deg"], rel=1e-9)
    assert per.loc[0, "angle_sd_deg"] == pytest.approx(1.0, rel=1e-3)
    # the arctan reading folds 179 -> -1 and -179 -> 1: also one pose
    assert per.loc[0, "angle_sd_arctan_deg"] == pytest.approx(math.sqrt(2.0))
    # but a class canonicalised at 90 deg is split by the fold, not by the circle
    at90 = frame.assign(angle_deg=[89.0, 91.0, -1.0, 1.0])
    per = pose_sd(at90, ["label"]).set_index("label")
    assert per.loc[0, "angle_sd_deg"] == pytest.approx(1.0, rel=1e-3)
    assert per.loc[0, "angle_sd_arctan_deg"] > 100.0


def test_circular_sd_of_a_uniform_spread_over_90_degrees():
    # R = sin(pi/2) / (pi/2) = 2 / pi for the uniform law on [-90, 90] deg
    angles = np.linspace(-90, 90, 200001)
    expected = math.degrees(math.sqrt(-2 * math.log(2 / math.pi)))
    assert circular_sd_deg(angles) == pytest.approx(expected, rel=1e-4)
    assert 54.0 < expected < 55.0


def test_orthogonal_regression_recovers_a_line():
    x = np.linspace(-90, 90, 50)
    slope, intercept = orthogonal_regression(x, -0.5 * x + 3.0)
    assert slope == pytest.approx(-0.5) and intercept == pytest.approx(3.0)
    # symmetric in the axes, unlike least squares: swapping x and y inverts the slope
    rng = np.random.default_rng(0)
    y = 2.0 * x + rng.normal(0, 20, len(x))
    s_xy, _ = orthogonal_regression(x, y)
    s_yx, _ = orthogonal_regression(y, x)
    assert s_xy * s_yx == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["rotated-digits", "translated-digits"])
def test_rendering_with_the_stored_perturbation_reproduces_the_data(name):
    from invariscope.data import create_dataset

    data = create_dataset(name, split="test")
    idx = np.arange(12)
    params = {c: data.params[c].to_numpy()[idx] for c in data.params.columns}
    assert torch.allclose(render_perturbed(data, idx, params), data.images[idx], atol=1e-6)
    u = np.random.default_rng(0).random((1000, 2))
    t = draw_perturbations(data.kind, u)
    if data.kind == "rotated":
        assert -90 <= t["angle_deg"].min() and t["angle_deg"].max() < 90
    else:
        assert set(np.unique(t["tx_px"])) == set(range(-16, 17))


def test_benchmark_tables_in_memory(tmp_path):
    from invariscope.data import create_dataset
    from invariscope.measure.stn import stn_benchmark
    from invariscope.plots.stn import render_stn_run

    test, train = (
        create_dataset("rotated-digits", "test"),
        create_dataset("rotated-digits", "train"),
    )
    r = stn_benchmark(
        create_model("simple-cnn"),
        test,
        train,
        archs=["cnn", "C0", "SL1"],
        seeds=2,
        train_steps=2,
        train_batch=8,
        train_images=32,
        images=12,
        batch_size=6,
        examples=3,
        out=tmp_path / "run",
        progress=False,
    )
    e = r.error_table
    assert list(e["arch"]) == ["cnn", "C0", "SL1"] and set(e["seeds"]) == {2}
    assert list(e["label"]) == ["CNN", "STN-C0", "STN-SL1"]
    # SL1 shares the classifier's blocks: only the head is added to the CNN
    params = dict(zip(e["arch"], e["params"], strict=True))
    head = r.tables["errors"].set_index(["arch", "seed"])["loc_params"]
    assert params["SL1"] == params["cnn"] + head[("SL1", 0)]
    assert params["C0"] == params["cnn"] + head[("C0", 0)]
    assert list(r.pose_table["arch"]) == ["C0", "SL1"]
    assert set(r.pose_table["measure"]) == {"angle_sd_deg"}
    from invariscope.runs import RunStore

    rows = RunStore.open(r.run_dir).read_table("pose")
    assert len(rows) == 2 * 2 * 12
    # the same fresh perturbation per image for every architecture and seed
    applied = rows.pivot_table(index="index", columns=["arch", "seed"], values="applied_angle_deg")
    assert np.allclose(applied.to_numpy(), applied.to_numpy()[:, :1])
    # the no-alignment reference: the circular SD of the applied angles, by hand
    one = rows[(rows["arch"] == "C0") & (rows["seed"] == 0)]
    by_class = [
        circular_sd_deg(g["applied_angle_deg"]) for _, g in one.groupby("label") if len(g) >= 2
    ]
    assert np.allclose(r.pose_table["unaligned_pose_sd"], np.mean(by_class))
    assert len(r.tables["angle_fit"]) == 2 * 2
    assert set(r.tables["example_images"]["image"]) == {"input", "warped"}
    names = {p.name for p in render_stn_run(r.run_dir)}
    assert {"stn_errors.png", "stn_pose.png", "stn_angles.png", "stn_examples.png"} <= names


@pytest.mark.parametrize("arch", ["C0", "DL1", "SL1"])
def test_localisation_learning_rate_scale_splits_the_parameters(arch):
    from invariscope.data import create_dataset
    from invariscope.measure.stn import STNBenchmarkAnalysis

    analysis = STNBenchmarkAnalysis(
        create_dataset("rotated-digits", split="train"), [arch], lr=2e-3, loc_lr_scale=10
    )
    stn = build_stn(create_model("simple-cnn"), arch)
    groups = analysis._param_groups(stn)
    rest, loc = groups
    assert rest["lr"] == pytest.approx(2e-3) and loc["lr"] == pytest.approx(2e-2)
    loc_ids, rest_ids = {id(p) for p in loc["params"]}, {id(p) for p in rest["params"]}
    assert not loc_ids & rest_ids  # no parameter in both groups
    assert loc_ids | rest_ids == {id(p) for p in stn.parameters()}
    assert loc_ids == {id(p) for p in stn.loc_parameters()}
    # SL1's shared first block learns with the classifier, not the localisation net
    shared = {id(p) for p in stn.classifier.net.conv1.parameters()}
    assert shared <= rest_ids
    torch.optim.Adam(groups)  # Adam accepts the groups
    with pytest.raises(InvariscopeError, match="loc-lr-scale|loc_lr_scale"):
        STNBenchmarkAnalysis(
            create_dataset("rotated-digits", split="train"), [arch], loc_lr_scale=0
        )


@pytest.mark.parametrize(
    ("data", "extra", "family", "scale"),
    [
        ("rotated-digits", [], "rotation", 3.0),
        ("rotated-digits", ["--family", "affine"], "affine", 1.0),
        ("rotated-digits", ["--loc-lr-scale", "3"], "affine", 3.0),
        ("scaled-digits", [], "affine", 1.0),
    ],
)
def test_quick_preset_on_rotated_sets_and_explicit_options_win(
    tmp_path, data, extra, family, scale
):
    import json

    import invariscope.cli.stn  # noqa: F401 - registers the command
    from invariscope.cli import run as cli

    out = tmp_path / "run"
    argv = ["stn-benchmark", "--model", "simple-cnn", "--data", data, "--archs", "C0"]
    argv += ["--seeds", "1", "--train-steps", "1", "--train-batch", "4", "--train-images", "8"]
    argv += ["--images", "4", "--quick", "--no-progress", "--out", str(out), *extra]
    assert cli(argv) == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["family"], config["loc_lr_scale"]) == (family, scale)
    assert config["steps"] == 1  # an explicit option wins over --quick


def test_a_wide_localisation_output_layer_learns_at_a_fan_in_scaled_rate():
    from invariscope.data import create_dataset
    from invariscope.measure.stn import OUT_FAN_IN, STNBenchmarkAnalysis

    analysis = STNBenchmarkAnalysis(
        create_dataset("translated-digits", split="train"), ["C0"], lr=1e-3, loc_lr_scale=2
    )
    # the convolutional head of a 60 px input: fan-in 20 x 12 x 12 into the output layer
    stn = build_stn(
        create_model("simple-cnn", image_size=30), "C0", input_size=(1, 60, 60), output_size=30
    )
    assert stn.head.kind == "conv" and stn.head.out.in_features == 2880
    rest, body, out = analysis._param_groups(stn)
    assert rest["lr"] == pytest.approx(1e-3) and body["lr"] == pytest.approx(2e-3)
    assert out["lr"] == pytest.approx(2e-3 * OUT_FAN_IN / 2880)
    assert {id(p) for p in out["params"]} == {id(p) for p in stn.head.out.parameters()}
    every = [id(p) for g in (rest, body, out) for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in stn.parameters())  # each exactly once
    # one Adam step moves theta by about lr * fan_in * feature size: the scaled rate
    # keeps it within the image where the unscaled one throws it off
    x = torch.rand(8, 1, 60, 60)
    y = torch.randint(0, 10, (8,))
    moves = {}
    for name in ("scaled", "unscaled"):
        net = build_stn(
            create_model("simple-cnn", image_size=30), "C0", input_size=(1, 60, 60), output_size=30
        )
        net.load_state_dict(stn.state_dict())
        g = analysis._param_groups(net)
        if name == "unscaled":
            g = [g[0], {"params": g[1]["params"] + g[2]["params"], "lr": g[1]["lr"]}]
        opt = torch.optim.Adam(g)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        with torch.no_grad():
            moves[name] = float((net.transform(x) - stn.transform(x)).abs().max())
    assert moves["scaled"] < 0.2 < moves["unscaled"]


def test_a_non_finite_loss_stops_training_before_any_update():
    from invariscope.engine.execution import optimiser_step

    layer = torch.nn.Linear(2, 1)
    before = layer.weight.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    loss = layer(torch.tensor([[float("inf"), 1.0]])).sum()
    with pytest.raises(
        InvariscopeError, match=r"^training the probe diverged \(loss -?inf\); lower (--)?lr$"
    ):
        optimiser_step(opt, loss, "the probe")
    assert torch.equal(layer.weight, before)
    value = optimiser_step(opt, (layer(torch.ones(1, 2)) ** 2).sum(), "the probe")
    assert value > 0 and not torch.equal(layer.weight, before)
