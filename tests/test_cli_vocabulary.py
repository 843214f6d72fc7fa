"""One command-line vocabulary (issue 20): one meaning per option name, deprecated
spellings that still work, one magnitude syntax, --image-size, and the Python API's
names and figure default."""

from __future__ import annotations

import inspect
import re
import warnings

import click
import numpy as np
import pytest
import torch
from conftest import one_line_error
from PIL import Image

from invariscope.cli import run
from invariscope.cli._app import _load_commands, cli
from invariscope.cli._vocab import (
    DEPRECATED,
    MEANINGS,
    magnitude_entries,
    magnitude_values,
    parse_magnitude,
    range_values,
    vocabulary_problems,
)
from invariscope.errors import InvariscopeError, command_line


@pytest.fixture(scope="module")
def commands() -> dict[str, click.Command]:
    _load_commands()
    return dict(cli.commands)


def _visible(command: click.Command) -> dict[str, click.Option]:
    return {
        name: p
        for p in command.params
        if isinstance(p, click.Option) and not p.hidden
        for name in p.opts
        if name.startswith("--")
    }


# ------------------------------------------------------------------ one name, one meaning


def test_every_option_name_has_one_meaning(commands):
    assert vocabulary_problems(commands) == []


def test_the_check_finds_a_name_with_two_meanings(commands, monkeypatch):
    """The check is not vacuous: an undeclared shared name, a declared name that takes
    values two ways, and two names for one meaning are all reported."""

    @click.command()
    @click.option("--steps", type=int, help="Frames per sequence.")
    @click.option("--size", type=int, help="Training images.")
    def a(steps, size):
        pass

    @click.command()
    @click.option("--steps", type=int, help="Adam steps.")
    @click.option("--train-images", type=int, help="Training images.")
    @click.option("--seed", is_flag=True, help="A flag this time.")
    def b(steps, train_images, seed):
        pass

    monkeypatch.setitem(MEANINGS, "--size", MEANINGS["--train-images"])
    problems = vocabulary_problems({"a": a, "b": b, "train": commands["train"]})
    text = "\n".join(problems)
    assert "--steps has 2 meanings: a (what 'a' says), b (what 'b' says)" in text
    assert "--seed takes values in 2 ways: b (flag), train (value)" in text
    assert "has several names: --size, --train-images" in text
    # and on the real commands, a name whose shared meaning is withdrawn is caught
    monkeypatch.delitem(MEANINGS, "--method")
    assert any(p.startswith("--method has 2 meanings") for p in vocabulary_problems(commands))


def test_the_agreed_names(commands):
    """The vocabulary the lead decided, command by command."""
    measured = {"--images", "--batch-size", "--image-size", "--out", "--data", "--model"}
    for name in ("sweep", "worst-case", "shift", "stitch", "lee", "stn-benchmark"):
        assert measured <= set(_visible(commands[name])), name
    for name in ("alignment", "equivariance", "itn"):
        assert measured <= set(_visible(commands[name])), name
    for name in ("train", "antialias"):
        opts = _visible(commands[name])
        assert {"--train-images", "--train-batch", "--image-size", "--augment"} <= set(opts)
        assert "--batch-size" not in opts and "--size" not in opts
    for name in ("stn-benchmark", "stitch", "itn", "equivariance"):
        opts = _visible(commands[name])
        assert "--train-steps" in opts and "--steps" not in opts and "--train-batch" in opts
    assert "--frames" in _visible(commands["shift"]) and "--steps" not in _visible(
        commands["shift"]
    )
    for name in ("alignment", "equivariance"):
        assert _visible(commands[name])["--magnitudes"].multiple
    assert _visible(commands["sweep"])["--range"].multiple
    # the batch of measured images means one thing: the help says so wherever it appears
    for name, command in commands.items():
        option = _visible(command).get("--batch-size")
        if option is not None:
            assert "Images per part" in option.help, name


def test_deprecated_spellings_are_hidden_and_name_their_replacement(commands):
    assert DEPRECATED == {
        ("train", "--size"): "--train-images",
        ("train", "--batch-size"): "--train-batch",
        ("antialias", "--size"): "--train-images",
        ("antialias", "--batch-size"): "--train-batch",
        ("shift", "--steps"): "--frames",
        ("stitch", "--steps"): "--train-steps",
        ("stn-benchmark", "--steps"): "--train-steps",
        ("stn-benchmark", "--augment"): "--fresh-perturbations",
        ("equivariance", "--steps"): "--train-steps",
        ("itn", "--steps"): "--train-steps",
    }
    for (name, old), new in DEPRECATED.items():
        command = commands[name]
        hidden = [p for p in command.params if old in getattr(p, "opts", ())]
        assert len(hidden) == 1 and hidden[0].hidden, (name, old)
        assert new in _visible(command), (name, new)
        assert old not in command.get_help(click.Context(command)), (name, old)


# ------------------------------------------------------------------ the aliases still work


class _Stop(Exception):
    """Raised by a spy in place of the real work."""


def _spy_analysis(monkeypatch, module: str) -> list:
    seen: list = []

    def fake(analysis, common, **kwargs):
        seen.append(analysis)
        raise _Stop

    monkeypatch.setattr(f"invariscope.cli.{module}.run_analysis_command", fake)
    return seen


def _spy_train(monkeypatch) -> list:
    seen: list = []

    def fake(model, train_set, **kwargs):
        seen.append({"images": len(train_set), "batch": kwargs["train_batch"]})
        raise _Stop

    monkeypatch.setattr("invariscope.train.train", fake)
    return seen


COMMON = ["--images", "8", "--no-progress", "--no-figures"]
CNN = ["--model", "simple-cnn", "--data", "digits"]
# command, new spelling, old spelling, value, the other arguments, spy module, what it saw
ALIASES = [
    ("shift", "--frames", "--steps", "3", [*CNN, "--protocol", "crop", "--layers", "none"],
     "shift", lambda a: a.protocols[0].steps),
    ("stitch", "--train-steps", "--steps", "2", CNN, "stitch", lambda a: a.steps),
    ("itn", "--train-steps", "--steps", "2", CNN, "itn", lambda a: a.steps),
    ("equivariance", "--train-steps", "--steps", "2", [*CNN, "--method", "none", "--layers",
     "conv1", "--transformation-layer", "l2"], "equivariance", lambda a: a.steps),
    ("stn-benchmark", "--train-steps", "--steps", "2", ["--model", "simple-cnn", "--data",
     "rotated-digits"], "stn", lambda a: a.steps),
]  # fmt: skip


@pytest.mark.parametrize("case", ALIASES, ids=[f"{c[0]} {c[2]}" for c in ALIASES])
def test_old_spelling_works_and_warns(case, monkeypatch, capsys, tmp_path):
    name, new, old, value, extra, module, read = case
    seen = _spy_analysis(monkeypatch, module)
    args = [name, *extra, *COMMON, "--out", str(tmp_path / "r")]
    for spelling in (new, old):
        capsys.readouterr()
        with pytest.raises(_Stop):
            run([*args, spelling, value])
        err = capsys.readouterr().err
        if spelling == old:
            assert err == f"invariscope: warning: {old} is deprecated; use {new}\n"
        else:
            assert "warning" not in err
    assert [read(a) for a in seen] == [int(value), int(value)]
    # both spellings at once: one clear error
    assert run([*args, new, value, old, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("invariscope: error: ")
    assert f"{old} is the old name of {new}; give {new} only" in err[-1]


def test_stn_augment_flag_is_now_fresh_perturbations(monkeypatch, capsys, tmp_path):
    seen = _spy_analysis(monkeypatch, "stn")
    args = ["stn-benchmark", "--model", "simple-cnn", "--data", "rotated-digits", *COMMON]
    args += ["--out", str(tmp_path / "r")]
    for flags in ([], ["--fresh-perturbations"], ["--augment"]):
        with pytest.raises(_Stop):
            run([*args, *flags])
    err = capsys.readouterr().err
    assert err == "invariscope: warning: --augment is deprecated; use --fresh-perturbations\n"
    assert [a.augment for a in seen] == [False, True, True]


@pytest.mark.parametrize("command", ["train", "antialias"])
def test_train_and_antialias_old_spellings(command, monkeypatch, capsys, tmp_path):
    seen = _spy_train(monkeypatch)
    args = [command, "--data", "digits", "--no-progress", "--out", str(tmp_path / "m.pt")]
    if command == "antialias":
        args += ["--model", "simple-cnn", "--finetune-epochs", "1"]
    for sizes in (["--train-images", "64", "--train-batch", "16"], ["--size", "64"]):
        capsys.readouterr()
        with pytest.raises(_Stop):
            run([*args, *sizes, *(["--batch-size", "16"] if "--size" in sizes else [])])
        err = capsys.readouterr().err
        warnings_ = [line for line in err.splitlines() if "warning" in line]
        if "--size" in sizes:
            assert warnings_ == [
                "invariscope: warning: --size is deprecated; use --train-images",
                "invariscope: warning: --batch-size is deprecated; use --train-batch",
            ]
        else:
            assert warnings_ == []
    assert seen == [{"images": 64, "batch": 16}] * 2


# ------------------------------------------------------------------ one magnitude syntax


def test_magnitude_syntax():
    assert magnitude_entries(["rotation=0:90:45;zoom=0.5,2", " ; shear_x=0.1"]) == [
        "rotation=0:90:45",
        "zoom=0.5,2",
        "shear_x=0.1",
    ]
    assert parse_magnitude("--range", "rotation=-30:30") == ("rotation", (-30.0, 30.0))
    assert parse_magnitude("--range", "zoom=0.5") == ("zoom", [0.5])
    assert range_values("--m", "x", 0.8, 1.2, 0.2) == [0.8, 1.0, 1.2]  # stop included
    assert range_values("--m", "x", 0, 1, 0.3) == [0.0, 0.3, 0.6, 0.9]  # 1.2 > stop
    assert magnitude_values("--magnitudes", ("rotation=10:30:10", "zoom=0.5,2")) == {
        "rotation": [10.0, 20.0, 30.0],
        "zoom": [0.5, 2.0],
    }
    for text, words in [
        ("rotation", "NAME=START:STOP:STEP (a range) or NAME=V[,V...]"),
        ("rotation=1:2:3:4", "NAME=START:STOP:STEP"),
        ("rotation=1,2:3", "NAME=START:STOP:STEP"),
        ("rotation=ten", "the values must be numbers, got 'ten'"),
        ("rotation=1:nan:1", "finite"),
        ("rotation=30:10:5", "START 30 exceeds STOP 10"),
        ("rotation=0:10:0", "the step must be positive"),
        ("rotation=0:10", "give the step too"),
        ("rotation=1;rotation=2", "given twice for rotation"),
    ]:
        with pytest.raises(InvariscopeError, match=re.escape(words)):
            magnitude_values("--magnitudes", text)


def test_sweep_range_takes_values_and_semicolons(monkeypatch, tmp_path):
    seen = _spy_analysis(monkeypatch, "sweep")
    args = ["sweep", "--model", "simple-cnn", "--data", "digits", *COMMON]
    args += ["--transforms", "rotation,zoom", "--out", str(tmp_path / "r")]
    with pytest.raises(_Stop):
        run([*args, "--range", "rotation=-10,5,10;zoom=1:2:0.5"])
    spec = seen[0].spec.transforms
    assert list(spec["rotation"]) == [-10.0, 0.0, 5.0, 10.0]  # with the identity
    assert list(spec["zoom"]) == [1.0, 1.5, 2.0]


def test_alignment_and_equivariance_magnitudes(monkeypatch, tmp_path):
    seen = _spy_analysis(monkeypatch, "alignment")
    args = ["--model", "simple-cnn", "--data", "digits", *COMMON, "--out", str(tmp_path / "r")]
    with pytest.raises(_Stop):
        run(["alignment", *args, "--transforms", "rotation,zoom"]
            + ["--magnitudes", "rotation=10:30:10;zoom=1.25"])  # fmt: skip
    assert seen[0].magnitudes == {"rotation": [10.0, 20.0, 30.0], "zoom": [1.25]}
    seen = _spy_analysis(monkeypatch, "equivariance")
    for extra in (
        ["--transforms", "hflip,rotation", "--magnitudes", "rotation=15,45"],
        [],  # the command's defaults
    ):
        with pytest.raises(_Stop):
            run(["equivariance", *args, "--layers", "conv1", "--structured", "1", *extra])
    assert [t.label for t in seen[0].transforms] == ["hflip", "rotation=15", "rotation=45"]
    assert [t.label for t in seen[1].transforms] == [
        "hflip",
        "vflip",
        "rot90",
        "zoom=0.5",
        "rotation=45",
    ]


def test_equivariance_api_takes_magnitudes():
    from invariscope.measure.equivariance import with_magnitudes

    assert with_magnitudes("hflip, rotation", {"rotation": [15, 45.5]}) == [
        "hflip",
        "rotation=15",
        "rotation=45.5",
    ]
    assert with_magnitudes(["zoom", "vflip"], {"zoom": 0.5}) == ["zoom=0.5", "vflip"]
    with pytest.raises(InvariscopeError, match="magnitudes for zoom, which is not among"):
        with_magnitudes("hflip", {"zoom": 2})
    with pytest.raises(InvariscopeError, match="'zoom=0.5': give its magnitude once"):
        with_magnitudes("zoom=0.5", {"zoom": 2})


def test_equivariance_magnitudes_refusals(capsys, tmp_path):
    args = ["equivariance", "--model", "hog", "--data", "digits", "--out", str(tmp_path / "r")]
    assert run([*args, "--transforms", "hflip", "--magnitudes", "zoom=0.5"]) == 2
    assert "--magnitudes names zoom, which is not among --transforms" in one_line_error(capsys)
    assert run([*args, "--transforms", "zoom=0.5", "--magnitudes", "zoom=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "invariscope: warning: --transforms NAME=V is deprecated; use --transforms NAME "
        "--magnitudes NAME=V",
        "invariscope: error: 'zoom=0.5': give the magnitude once, with --magnitudes",
    ]


# ------------------------------------------------------------------ --image-size


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Grey images of four different sizes in train/test class folders."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(30, 40), (50, 34), (36, 36), (64, 48)]
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                w, h = sizes[i % 4]
                pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def test_image_size_reads_a_folder_of_mixed_sizes(mixed_folder, tmp_path, capsys):
    model = tmp_path / "m.pt"
    train = ["train", "--data", str(mixed_folder), "--epochs", "1", "--no-progress"]
    assert run([*train, "--out", str(model)]) == 2  # without it: the sizes differ
    assert "pass --image-size N (shorter side resized to N, centre crop)" in one_line_error(capsys)
    assert run([*train, "--image-size", "32", "--out", str(model)]) == 0
    from invariscope.models.checkpoint import load_checkpoint

    net, _ = load_checkpoint(model)
    assert net.input_size == (1, 32, 32)
    capsys.readouterr()
    out = tmp_path / "run"
    argv = ["sweep", "--model", str(model), "--data", str(mixed_folder), "--image-size", "32"]
    argv += ["--transforms", "rotation", "--range", "rotation=-10,10", "--no-figures"]
    assert run([*argv, "--no-progress", "--out", str(out)]) == 0
    assert "12 images" in capsys.readouterr().out


def test_image_size_error_names_the_option_of_the_interface():
    from invariscope.data.batches import _load_error

    err = RuntimeError("stack expects each tensor to be equal size, but got [1, 3, 4] ...")
    assert "load the folder with image_size=N" in str(_load_error(err))
    with command_line():
        assert "pass --image-size N" in str(_load_error(err))


def test_image_size_on_a_dataset_of_one_size_is_refused(capsys, tmp_path):
    argv = ["train", "--data", "digits", "--image-size", "32", "--out", str(tmp_path / "m.pt")]
    assert run(argv) == 2
    err = one_line_error(capsys)
    assert "dataset 'digits' has one image size; leave out --image-size" in err
    assert not (tmp_path / "m.pt").exists()


def test_image_size_default_and_option(mixed_folder):
    from invariscope.cli._engine import _data_options
    from invariscope.models import create_model

    model = create_model("simple-cnn")  # 1 x 28 x 28
    common = {"image_size": None, "labels": "dataset"}
    assert _data_options(str(mixed_folder), common, {"model": model}) == {"image_size": 28}
    common["image_size"] = 40
    assert _data_options(str(mixed_folder), common, {"model": model}) == {"image_size": 40}
    assert _data_options("shapes", common, {"model": model}) == {"image_size": 40}
    common["image_size"] = None
    assert _data_options("digits", common, {"model": model}) == {}


# ------------------------------------------------------------------ the Python API


def _api_functions():
    from invariscope.measure.alignment import alignment
    from invariscope.measure.equivariance import equivariance
    from invariscope.measure.itn import invariant_transformer
    from invariscope.measure.lee import lie_derivative
    from invariscope.measure.shift import shift_stability
    from invariscope.measure.stitch import stitch
    from invariscope.measure.stn import stn_benchmark
    from invariscope.measure.sweep import sweep
    from invariscope.measure.worst_case import worst_case_spatial

    return {
        "sweep": sweep,
        "worst_case_spatial": worst_case_spatial,
        "shift_stability": shift_stability,
        "alignment": alignment,
        "lie_derivative": lie_derivative,
        "stitch": stitch,
        "equivariance": equivariance,
        "invariant_transformer": invariant_transformer,
        "stn_benchmark": stn_benchmark,
    }


def test_api_names_follow_the_vocabulary():
    renamed = {
        "shift_stability": {"steps": "frames"},
        "stitch": {"steps": "train_steps"},
        "equivariance": {"steps": "train_steps"},
        "invariant_transformer": {"steps": "train_steps"},
        "stn_benchmark": {"steps": "train_steps", "augment": "fresh_perturbations"},
    }
    for name, fn in _api_functions().items():
        params = inspect.signature(fn).parameters
        assert {"images", "batch_size", "out", "figures"} <= set(params), name
        assert params["figures"].default is None, name
        assert "unless\n    ``figures=False``" in fn.__doc__, name
        assert getattr(fn, "__renamed_arguments__", {}) == renamed.get(name, {}), name
        for old, new in renamed.get(name, {}).items():
            assert new in params and old not in params, name
    for name in ("stitch", "equivariance", "invariant_transformer", "stn_benchmark"):
        params = inspect.signature(_api_functions()[name]).parameters
        assert "train_batch" in params, name
    from invariscope.train import train

    assert train.__renamed_arguments__ == {"batch_size": "train_batch"}
    assert "train_batch" in inspect.signature(train).parameters


def test_api_old_keyword_warns_and_still_works(digits_data):
    from invariscope.measure.shift import shift_stability
    from invariscope.models import create_model

    torch.manual_seed(0)
    model = create_model("simple-cnn")
    _, test_set = digits_data
    kw = dict(images=4, batch_size=4, layers=(), consistency_pairs=0, progress=False)
    with pytest.warns(DeprecationWarning, match=r"shift_stability\(steps=...\) is deprecated"):
        old = shift_stability(model, test_set, "crop", steps=3, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = shift_stability(model, test_set, "crop", frames=3, **kw)
    frames = new.tables["frames"] if "frames" in new.tables else None
    assert old.summary.equals(new.summary)
    if frames is not None:
        assert sorted(set(frames["frame"])) == [0, 1, 2]
    with pytest.raises(InvariscopeError, match="steps= is the old name of frames="):
        shift_stability(model, test_set, "crop", steps=3, frames=3, **kw)


def test_every_analysis_function_draws_figures_when_given_out(digits_data, tmp_path, monkeypatch):
    """One default everywhere: figures whenever ``out`` is given, none with figures=False
    (the renderers are replaced by a recorder: what is tested is whether they are asked)."""
    from invariscope.data import create_dataset
    from invariscope.engine.registry import AnalysisEntry
    from invariscope.measure.worst_case import SpatialBudget
    from invariscope.models import create_model

    asked: list[tuple[str, str]] = []

    def recorder(entry):
        def render(run_dir, folder):
            asked.append((entry.name, run_dir.name))
            return []

        return render

    monkeypatch.setattr(AnalysisEntry, "render", recorder)

    torch.manual_seed(0)
    model = create_model("simple-cnn")
    train_set, test_set = digits_data
    api = _api_functions()
    small = dict(images=8, batch_size=8, progress=False)
    calls = {
        "sweep": lambda **o: api["sweep"](
            model, test_set, ["rotation"], {"rotation": [-10, 10]}, **small, **o
        ),
        "worst_case_spatial": lambda **o: api["worst_case_spatial"](
            model, test_set, SpatialBudget(10, 1, angles=3, shifts=3, k=2), **small, **o
        ),
        "shift_stability": lambda **o: api["shift_stability"](
            model, test_set, "crop", frames=3, layers=(), consistency_pairs=0, **small, **o
        ),
        "alignment": lambda **o: api["alignment"](
            model, test_set, "translate_x", magnitudes={"translate_x": [4]}, layers=["conv1"],
            **small, **o,
        ),
        "lie_derivative": lambda **o: api["lie_derivative"](
            model, test_set, "rotation", layers=(), **small, **o
        ),
        "stitch": lambda **o: api["stitch"](
            model, model, test_set, train_set, layers_a=["relu2"], layers_b=["relu2"],
            train_steps=1, train_batch=8, **small, **o,
        ),
        "equivariance": lambda **o: api["equivariance"](
            "hog", test_set, train_set, "hflip", train_images=16, stats_batch=16, **small, **o
        ),
        "invariant_transformer": lambda **o: api["invariant_transformer"](
            model, test_set, train_set, train_steps=2, save_every=1, train_batch=8, grid=2,
            sweep_points=3, examples=2, **small, **o,
        ),
        "stn_benchmark": lambda **o: api["stn_benchmark"](
            create_model("simple-cnn"), create_dataset("rotated-digits", "test"),
            create_dataset("rotated-digits", "train"), archs=["cnn", "C0"], seeds=1,
            train_steps=2, train_batch=8, train_images=16, examples=2, **small, **o,
        ),
    }  # fmt: skip
    assert sorted(calls) == sorted(api)
    for name, call in calls.items():
        call(out=tmp_path / name)
        assert asked[-1][1] == name, f"{name} drew no figure although out was given"
    assert len(asked) == len(calls) and len({a for a, _ in asked}) == len(calls)
    calls["lie_derivative"](out=tmp_path / "no-figures", figures=False)
    calls["lie_derivative"]()  # no out: nowhere to draw
    assert len(asked) == len(calls)


def test_module_doctests():
    import doctest

    from invariscope import _deprecation
    from invariscope.cli import _vocab

    for module in (_vocab, _deprecation):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
