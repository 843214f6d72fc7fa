"""Defaults that work (issue 21, item 4): every registered analysis command, given only
its required options (and a small --images, --out), on every built-in dataset it
accepts and on 224 px photos, either runs or refuses with a reason about the data,
never about one of its own defaults.

What runs here is everything a command does before its first part is computed: the
options, the model and the data, the label and class checks, the analysis's ``check``
(layers, frames, map sizes), the pre-flight forward pass, the plan and the run
directory. A default that does not fit the data fails there; the parts themselves
(minutes of training for stn-benchmark, stitch, itn) are covered by each analysis's own
tests and the conformance test. The datasets are generated once for the module.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest

from invariscope.cli import run
from invariscope.data.registry import list_datasets
from invariscope.engine.registry import list_analyses

COMMANDS = [entry.command for entry in list_analyses()]
DATASETS = [info.name for info in list_datasets() if "<dir>" not in info.name]
PERTURBED = tuple(d for d in DATASETS if d.startswith(("rotated-", "translated-", "scaled-")))

#: Options a command cannot run without although click does not mark them required:
#: ``sweep`` sweeps what it is told to (--transforms, --pair or --worst-case), it has no
#: default transformation.
REQUIRED = {"sweep": ["--transforms", "rotation"]}

#: (command, dataset) pairs refused because of the data, with the words of the refusal.
DATA_REFUSALS = {
    ("stn-benchmark", d): "the STN benchmark needs a perturbed digit set"
    for d in DATASETS
    if d not in PERTURBED
}


class Planned(BaseException):
    """Raised where the runner would compute the first part: everything before it ran."""


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """Datasets generated once; the runner stops before computing; a model per dataset."""
    import invariscope.data
    import invariscope.data.registry
    import invariscope.engine.runner
    from invariscope.engine.execution import Execution
    from invariscope.models import save_checkpoint
    from invariscope.train import model_for_dataset

    root = tmp_path_factory.mktemp("defaults")
    create = invariscope.data.registry.create_dataset
    cached = functools.lru_cache(maxsize=None)(create)

    def create_once(name, split="train", **kwargs):
        key = tuple(
            sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in kwargs.items())
        )
        return cached(name, split, **dict(key))

    def stop(*args, **kwargs):
        raise Planned

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(invariscope.data, "create_dataset", create_once)
        patch.setattr(invariscope.data.registry, "create_dataset", create_once)
        patch.setattr(invariscope.engine.runner, "_compute_and_finish", stop)
        # no forward-batch tuning (it times forward passes of large batches; not a default
        # that depends on the data)
        patch.setattr(invariscope.engine.runner, "_choose_execution", lambda *args: Execution(256))
        models = {}
        for name in DATASETS:
            if name == "photos":
                models[name] = "resnet18"  # a zoo model at 224 px, 1000 ImageNet classes
            elif name == "shapes":
                models[name] = "small-vgg"  # RGB 32 px
            elif name.startswith(("translated-", "scaled-")):  # 60 and 112 px
                path = root / f"{name}.pt"
                save_checkpoint(model_for_dataset("simple-cnn", create_once(name, "test")), path)
                models[name] = str(path)
            else:  # 28 px grey digits
                models[name] = "simple-cnn"
        yield root, models


def _run(argv: list[str], capsys) -> tuple[str, str]:
    capsys.readouterr()
    try:
        code = run(argv)
    except Planned:
        return "planned", ""
    return str(code), capsys.readouterr().err.strip()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_analysis_runs_on_every_builtin_dataset_with_its_defaults(command, setting, capsys):
    root, models = setting
    failures = []
    for data in DATASETS:
        argv = [command, "--data", data, "--images", "8", "--out", str(root / command / data)]
        if command != "stn-benchmark":  # the papers' base classifier is its default
            argv[1:1] = ["--model", models[data]]
        argv += REQUIRED.get(command, [])
        outcome, err = _run(argv, capsys)
        refusal = DATA_REFUSALS.get((command, data))
        if refusal is None and outcome != "planned":
            failures.append(f"{data}: exit {outcome}: {err}")
        elif refusal is not None and (outcome != "2" or refusal not in err or "\n" in err):
            failures.append(f"{data}: expected a refusal about the data, got {outcome}: {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["shift", "--model", "simple-cnn", "--data", "digits", "--protocol", "embed"],
            "embed uses 15 frames (not 16), the most that fit a 28x28 image",
        ),
        (
            ["equivariance", "--model", "simple-cnn", "--data", "digits"]
            + ["--transforms", "hflip,vflip"],
            "net.conv1 (64x20x20): m = 1",
        ),
        (["stn-benchmark", "--data", "rotated-glyphs", "--quick"], "--quick on rotated-glyphs"),
    ],
    ids=["shift-embed", "equivariance-flips", "stn-benchmark-quick"],
)
def test_the_first_commands_of_issue_21_run_and_say_what_they_chose(
    argv, said, setting, capsys, caplog
):
    root, _ = setting
    out = root / "issue" / argv[0]
    with caplog.at_level(logging.WARNING):
        capsys.readouterr()
        with pytest.raises(Planned):
            run([*argv, "--images", "8", "--out", str(out)])
    assert said in caplog.text + capsys.readouterr().out
    assert Path(out, "config.json").is_file()
