"""The registry-wide zoo test: every registered analysis on every zoo family.

timm's one-test-over-the-registry, with our engine's conformance test as the model: each
analysis of the registry runs its command, end to end, on a small random-init network of
each architecture family of the zoo (torchvision's module trees: residual blocks with a
shared ReLU, Bottlenecks, inverted residuals with depthwise convolutions and
squeeze-excitation, VGG with BatchNorm, ConvNeXt's channels-last LayerNorm, a ViT's patch
tokens) on 32 px RGB images (a small image folder the test writes: 3 classes of smooth
random textures), and must give finite tables and its figures, or refuse with ONE line
(exit 2) that is listed below with the reason it does not apply.

A new analysis is covered by registering an entry in ``ZOO_ARGS``: the test fails for a
registered analysis without one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from invariscope.cli import run
from invariscope.engine.registry import list_analyses
from invariscope.models import create_model, save_checkpoint
from invariscope.models.geometry import trace_geometry
from invariscope.runs.store import RunStore

SIZE = 32
CLASSES = 3
#: families whose runs also draw their figures (drawing is the same code for every
#: family but for layer names, and costs more than the small runs themselves)
FIGURES = ("resnet-basic", "vit")

#: family -> (architecture, small keyword arguments): every family of the zoo.
FAMILIES: dict[str, tuple[str, dict]] = {
    "resnet-basic": ("resnet18", {"width": 0.125, "layers": (1, 1, 1, 1)}),
    "resnet-bottleneck": ("resnet50", {"width": 0.0625, "layers": (1, 1, 1, 1)}),
    "mobilenet_v2": ("mobilenet_v2", {"width": 0.25, "depth": 0.34}),
    "efficientnet": ("efficientnet_b0", {"width": 0.25, "depth": 0.25}),
    "vgg-bn": ("vgg11_bn", {"width": 0.125}),
    "convnext": ("convnext_tiny", {"width": 0.125, "layers": (1, 1, 1, 1)}),
    "vit": (
        "vit_b_16",
        {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64},
    ),
}

#: analysis -> its small arguments on the zoo ({layer} is the family's probe layer).
ZOO_ARGS: dict[str, list[str]] = {
    "sweep": ["--data", "{data}", "--transforms", "rotation,brightness", "--range",
              "rotation=-90:90:90", "--range", "brightness=-0.2:0.2:0.2"],
    "worst_case": ["--data", "{data}", "--wc-grid", "2x2", "--wc-k", "2"],
    "shift": ["--data", "{data}", "--protocol", "crop,circular", "--frames", "3",
              "--consistency-pairs", "2"],
    "stitch": ["--data", "{data}", "--layers-a", "{layer}", "--layers-b", "{layer}",
               "--train-steps", "2", "--train-batch", "8"],
    "lee": ["--data", "{data}", "--transforms", "translate_x,rotation,brightness"],
    "stn_benchmark": ["--data", "scaled-digits", "--archs", "{archs}", "--seeds", "1",
                      "--quick", "--train-images", "16", "--train-steps", "2", "--train-batch", "4"],
    "alignment": ["--data", "{data}", "--transforms", "translate_x,rotation", "--layers",
                  "{early}", "--margin", "{margin}"],
    "equivariance": ["--data", "{data}", "--transforms", "hflip", "--layers", "{layer}",
                     "--structured", "1", "--train-images", "8", "--stats-batch", "8"],
    "itn": ["--data", "{data}", "--train-steps", "2", "--save-every", "2", "--train-batch", "8",
            "--grid", "2", "--sweep-points", "3", "--examples", "2"],
}  # fmt: skip

#: (analysis, family) -> a phrase of the one-line refusal: where a method does not apply.
REFUSALS: dict[tuple[str, str], str] = {}

#: STN architectures per family: C1 (a transformer after the first conv block) needs a
#: network whose forward is a chain of stages; a ViT takes C0 (its refusal of C1 is
#: tested below).
ARCHS = {family: "cnn,C0,C1" for family in FAMILIES} | {"vit": "cnn,C0"}

ENTRIES = {e.name: e for e in list_analyses()}


def _write_folder(root: Path) -> Path:
    """3 classes x 4 images of smooth random RGB texture, 32 px, as PNG files."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for k in range(CLASSES):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(4):
            coarse = torch.rand(3, 4, 4, generator=g)
            image = torch.nn.functional.interpolate(
                coarse[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False
            )[0].clamp(0, 1)
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(root / f"class{k}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, str]]:
    """family -> the placeholders of its command (checkpoint, probe layer, margin...)."""
    root = tmp_path_factory.mktemp("zoo")
    data = "folder:" + str(_write_folder(root / "data"))
    out = {}
    for family, (arch, kwargs) in FAMILIES.items():
        torch.manual_seed(0)
        model = create_model(arch, image_size=SIZE, num_classes=CLASSES, **kwargs)
        path = root / f"{family}.pt"
        save_checkpoint(model, path)
        trace = trace_geometry(model, (SIZE, SIZE))
        placed = [n for n in model.layer_names if trace.get(model, n) is not None]
        # a middle layer with a small map: cheap to stitch and to regress
        small = [n for n in placed if max(trace.get(model, n).grid.size) <= 4] or placed
        out[family] = {
            "checkpoint": str(path),
            "layer": small[0],
            "early": placed[0],  # the alignment check needs positions clear of padding
            "margin": "0" if family == "vit" else "8",  # a ViT takes its own size only
            "data": data,
            "archs": ARCHS[family],
        }
    return out


def test_every_registered_analysis_has_zoo_arguments():
    assert sorted(ZOO_ARGS) == sorted(ENTRIES)


def _finite(store: RunStore) -> None:
    for name in store.aggregates():
        table = store.read_aggregate(name)
        numeric = table.select_dtypes(include=[np.number])
        values = numeric.to_numpy(dtype=np.float64)
        assert not np.isinf(values).any(), name
        if len(values) and values.size:
            # NaN marks an undefined cell (an empty valid region, a class absent); a table
            # of NaN only would mean nothing was measured
            assert not np.isnan(values).all(), name


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("analysis", list(ZOO_ARGS))
def test_analysis_runs_on_zoo_family(analysis, family, zoo, tmp_path, capsys):
    fill = zoo[family]
    entry = ENTRIES[analysis]
    args = [a.format(**fill) for a in ZOO_ARGS[analysis]]
    out = tmp_path / "run"
    argv = [entry.command, "--model", fill["checkpoint"], *args, "--images", "6",
            "--batch-size", "6", "--forward-batch", "6", "--no-progress",
            "--out", str(out)]  # fmt: skip
    if family not in FIGURES:
        argv.append("--no-figures")
    code = run(argv)
    err = capsys.readouterr().err.strip()
    refusal = REFUSALS.get((analysis, family))
    if refusal is not None:
        assert code == 2 and len(err.splitlines()) == 1 and refusal in err, err
        return
    assert code == 0, err
    store = RunStore.open(out)
    assert store.is_complete
    _finite(store)
    if family in FIGURES:
        figures = list((out / "figures").glob("*.png"))
        assert figures, "no figure drawn"
        assert all(f.stat().st_size > 0 for f in figures)


def test_stn_after_a_block_is_refused_on_a_vit_in_one_line(zoo, tmp_path, capsys):
    fill = zoo["vit"]
    args = [a.format(**fill | {"archs": "cnn,C1"}) for a in ZOO_ARGS["stn_benchmark"]]
    code = run(["stn-benchmark", "--model", fill["checkpoint"], *args, "--no-progress",
                "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "chain of stages" in err[0] and "C0" in err[0]
