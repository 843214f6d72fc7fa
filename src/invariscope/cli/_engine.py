"""The options every analysis command shares, and how a command runs its analysis.

``@engine_options`` adds ``--model``, ``--weights``, ``--data``, ``--split``, ``--images``,
``--classes``, ``--batch-size``, ``--seed``, ``--device``, ``--workers``, ``--out``,
``--overwrite``, ``--timeout``, ``--no-figures``, ``--no-progress``, ``--forward-batch``,
``--memory-format``, ``--amp``, ``--max-work``, ``--input-size``, ``--resize``,
``--image-size`` and ``--labels`` to a command; :func:`run_analysis_command` loads the
model and data, joins the ``torchrun`` process group when there is one, and runs the
analysis on the engine.

Image folders (``--data folder:DIR`` or a directory) are read at ``--image-size N``
(shorter side resized to N, antialiased, then the centre N x N crop), by default at the
model's input size when the model takes square images, so that photographs of any size
form batches; with ``--labels model`` a folder may hold its
images directly, without class sub-folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from invariscope.cli._util import image_size_option
from invariscope.engine.runner import DEFAULT_MAX_WORK

COMMON = (
    "model_spec",
    "weights",
    "data_spec",
    "split",
    "images",
    "classes",
    "batch_size",
    "seed",
    "device",
    "workers",
    "out",
    "overwrite",
    "timeout",
    "no_figures",
    "no_progress",
    "forward_batch",
    "memory_format",
    "amp",
    "max_work",
    "input_size",
    "resize",
    "image_size",
    "labels",
)


def _forward_batch(ctx, param, value):
    if value is None or value == "auto":
        return "auto"
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not 'auto' or a whole number") from None
    if number < 1:
        raise click.BadParameter(f"must be 'auto' or at least 1, got {number}")
    return number


def _input_size(ctx, param, value):
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"'{value}' is not C,H,W with three positive integers")
    return tuple(int(p) for p in parts)


_OPTIONS = [
    click.option(
        "--model",
        "model_spec",
        required=True,
        help="Checkpoint path, registered name, package.module:factory, torchvision:NAME or "
        "timm:NAME.",
    ),
    click.option(
        "--weights",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Weights file for a registry name, module:factory, torchvision or timm model.",
    ),
    click.option(
        "--data",
        "data_spec",
        required=True,
        help="Dataset name or path (see 'invariscope datasets').",
    ),
    click.option(
        "--split", default="test", show_default=True, type=click.Choice(["train", "test"])
    ),
    click.option(
        "--images",
        default=None,
        type=click.IntRange(min=1),
        help="Measure a seeded random subset of N images (default: all).",
    ),
    click.option(
        "--classes",
        default=None,
        metavar="C1,C2,...",
        help="Only images of these classes (names or indices).",
    ),
    click.option(
        "--batch-size",
        default=128,
        show_default=True,
        type=click.IntRange(min=1),
        help="Images per part (the unit of resumption and of distribution).",
    ),
    click.option(
        "--seed",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="Seeds the image subset and every random draw of the analysis.",
    ),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps."),
    click.option(
        "--workers",
        default=0,
        show_default=True,
        type=click.IntRange(min=0),
        help="DataLoader worker processes for datasets read from files.",
    ),
    click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Run directory (resumed if it holds the same configuration).",
    ),
    click.option("--overwrite", is_flag=True, help="Discard the results already in --out."),
    click.option(
        "--timeout",
        default=1800.0,
        show_default=True,
        type=float,
        help="Distributed runs (torchrun): seconds a rank waits for the others.",
    ),
    click.option("--no-figures", is_flag=True, help="Write tables only."),
    click.option("--no-progress", is_flag=True, help="Hide the progress bar."),
    click.option(
        "--forward-batch",
        default="auto",
        show_default=True,
        callback=_forward_batch,
        metavar="auto|N",
        help="Most images per forward pass; auto times a few sizes on the real model and "
        "device and keeps the fastest per image.",
    ),
    click.option(
        "--memory-format",
        default="auto",
        show_default=True,
        type=click.Choice(["auto", "contiguous", "channels_last"]),
        help="auto keeps channels_last where the pre-flight finds it faster.",
    ),
    click.option(
        "--amp",
        is_flag=True,
        help="Autocast the forward passes (float16 on CUDA, bfloat16 on the CPU).",
    ),
    click.option(
        "--max-work",
        default=DEFAULT_MAX_WORK,
        show_default=True,
        type=click.IntRange(min=1),
        help="Refuse a run that would forward more transformed images than this.",
    ),
    click.option(
        "--input-size",
        default=None,
        callback=_input_size,
        metavar="C,H,W",
        help="Input size of a module:factory, torchvision or timm model that cannot be "
        "told from its weights.",
    ),
    click.option(
        "--resize",
        is_flag=True,
        help="Resize images to the model's input size inside the model wrapper.",
    ),
    image_size_option("the model's square input size"),
    click.option(
        "--labels",
        default="dataset",
        show_default=True,
        type=click.Choice(["dataset", "model"]),
        help="Reference label of each image: the dataset's (ImageNet-style folders named "
        "by wnid or class name map onto an ImageNet model's outputs), or the model's own "
        "top-1 class on the untransformed image (for unlabeled images).",
    ),
]


def engine_options(
    command=None, *, model_aliases: tuple[str, ...] = (), model_default: str | None = None
):
    """Add the common options of every analysis command (see the module docstring).

    ``@engine_options`` or ``@engine_options(model_aliases=("--model-a",))``: the
    aliases are further names of ``--model`` (a two-model command's first model).
    ``model_default``: a registered model name that ``--model`` defaults to (the option
    is then not required).
    """

    def decorate(cmd):
        for option in reversed(_OPTIONS):
            if model_default is not None and option is _OPTIONS[0]:
                option = click.option(
                    "--model",
                    "model_spec",
                    default=model_default,
                    show_default=True,
                    help="Checkpoint path, registered name, package.module:factory, "
                    "torchvision:NAME or timm:NAME.",
                )
            if model_aliases and option is _OPTIONS[0]:
                option = click.option(
                    *model_aliases,
                    "--model",
                    "model_spec",
                    required=True,
                    help="The (first) model: checkpoint path, registered name, "
                    "package.module:factory, torchvision:NAME or timm:NAME.",
                )
            cmd = option(cmd)
        return cmd

    return decorate if command is None else decorate(command)


def split_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def pop_common(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the common options from a command's ``kwargs`` and return them."""
    return {name: kwargs.pop(name) for name in COMMON}


def _data_options(data_spec: str, common: dict[str, Any], models: dict) -> dict[str, Any]:
    """Options for reading the data: ``--image-size`` when given; for an image folder
    otherwise the model's square input size, and ``unlabeled`` with ``--labels model``."""
    from invariscope.data.registry import is_folder_spec

    options: dict[str, Any] = {}
    if common.get("image_size") is not None:
        options["image_size"] = int(common["image_size"])
    if not is_folder_spec(data_spec):
        return options
    if common.get("labels") == "model":
        options["unlabeled"] = True
    size = getattr(models.get("model"), "input_size", None)
    if "image_size" not in options and isinstance(size, tuple) and len(size) == 3:
        if size[1] == size[2]:
            options["image_size"] = int(size[1])
    return options


def create_train_set(common: dict[str, Any]):
    """The train split of ``--data``, read like the measured split (``--image-size``; for
    an image folder without it, the square input size of ``--model``)."""
    from invariscope.data import create_dataset
    from invariscope.data.registry import is_folder_spec

    options: dict[str, Any] = {}
    if common.get("image_size") is not None:
        options["image_size"] = int(common["image_size"])
    elif is_folder_spec(common["data_spec"]) and common.get("model_spec") not in (None, "hog"):
        from invariscope.models import load_model

        model = load_model(
            common["model_spec"],
            common.get("weights"),
            input_size=common.get("input_size"),
            resize=True if common.get("resize") else None,
        )
        options = _data_options(common["data_spec"], {}, {"model": model})
    return create_dataset(common["data_spec"], split="train", **options)


def run_analysis_command(
    analysis,
    common: dict[str, Any],
    *,
    options: dict | None = None,
    extra_models: dict[str, str] | None = None,
):
    """Load the model and data named by ``common``, and run ``analysis`` on the engine.

    ``extra_models`` names further models by role (``{"baseline": "base.ckpt"}``),
    loaded like ``--model`` (same ``--input-size`` / ``--resize``).

    Under ``torchrun`` this process joins the process group first (``gloo`` on the CPU,
    ``nccl`` with ``--device cuda``, where process i uses ``cuda:LOCAL_RANK``) and
    leaves it at the end.
    """
    from invariscope.data import create_dataset
    from invariscope.engine import run
    from invariscope.engine.distributed import init_distributed, rank_device
    from invariscope.engine.execution import resolve_device
    from invariscope.errors import InvariscopeError
    from invariscope.models import load_model
    from invariscope.runs.store import rank_from_env

    if not common["timeout"] > 0:
        raise InvariscopeError(f"--timeout must be positive, got {common['timeout']:g}")
    rank, world_size = rank_from_env()
    dev = rank_device(resolve_device(common["device"]), rank, world_size)
    model_spec, weights = common["model_spec"], common["weights"]
    data_spec, split = common["data_spec"], common["split"]
    models = (
        {
            "model": load_model(
                model_spec,
                weights,
                input_size=common["input_size"],
                resize=True if common["resize"] else None,
            )
        }
        if analysis.models
        else {}
    )
    for role, spec in (extra_models or {}).items():
        models[role] = load_model(
            spec, None, input_size=common["input_size"], resize=True if common["resize"] else None
        )
    datasets = (
        {"data": create_dataset(data_spec, split=split, **_data_options(data_spec, common, models))}
        if analysis.datasets
        else {}
    )
    started = init_distributed(dev, timeout=common["timeout"])
    try:
        result = run(
            analysis,
            models,
            datasets,
            images=common["images"],
            classes=split_list(common["classes"]) if common["classes"] else None,
            batch_size=common["batch_size"],
            seed=common["seed"],
            device=dev,
            forward_batch=common["forward_batch"],
            memory_format=common["memory_format"],
            amp=common["amp"],
            max_work=common["max_work"],
            out=common["out"],
            overwrite=common["overwrite"],
            figures=not common["no_figures"],
            progress=not common["no_progress"],
            num_workers=common["workers"],
            rank=rank,
            world_size=world_size,
            timeout=common["timeout"],
            meta={
                "model_spec": model_spec
                if weights is None
                else f"{model_spec} (weights {weights})",
                "data_spec": f"{data_spec}:{split}" if split != "test" else data_spec,
                **(options or {}),
            },
            options=options,
            labels=common.get("labels", "dataset"),
        )
        if started:  # leave together: no rank tears the group down while rank 0 still works
            import torch.distributed as dist

            dist.barrier()
        return result
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
