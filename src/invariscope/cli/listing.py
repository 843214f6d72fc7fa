"""``invariscope transforms``, ``models`` and ``datasets``: list what exists."""

from __future__ import annotations

from invariscope.cli._app import cli
from invariscope.cli._util import fmt_number, print_table


@cli.command("transforms")
def transforms_cmd() -> None:
    """List the registered transformations with their conventions.

    \b
    Example:
      invariscope transforms
    """
    from invariscope.transforms import get_transform, list_transforms

    rows = []
    for name in list_transforms():
        spec = get_transform(name)
        sweep = "-"
        if spec.default_range is not None:
            sweep = ":".join(fmt_number(v) for v in spec.default_range)
        identity = spec.identity
        rows.append(
            {
                "name": name,
                "kind": spec.kind,
                "identity": fmt_number(identity) if isinstance(identity, float | int) else "I",
                "domain": spec.valid_range,
                "sweep": sweep,
                "unit": spec.unit,
                "sign": spec.sign,
            }
        )
    print_table(rows, ["name", "kind", "identity", "domain", "sweep", "unit", "sign"])


@cli.command("models")
def models_cmd() -> None:
    """List the built-in model architectures and their arguments.

    Models you bring are loaded with --model package.module:factory (plus --weights
    FILE), torchvision:NAME or timm:NAME (random weights unless --weights FILE is given;
    nothing is downloaded).

    \b
    Example:
      invariscope models
    """
    from invariscope.models import list_models, model_info

    rows = []
    for name in list_models():
        info = model_info(name)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in info.defaults.items())
        rows.append({"name": name, "arguments": kwargs, "description": info.description})
    print_table(rows, ["name", "arguments", "description"])


@cli.command("datasets")
def datasets_cmd() -> None:
    """List the built-in datasets and the file formats that can be read.

    \b
    Example:
      invariscope datasets
    """
    from invariscope.data import list_datasets

    rows = [
        {
            "name": d.name,
            "channels": d.channels,
            "size": d.image_size,
            "classes": d.num_classes,
            "description": d.description,
        }
        for d in list_datasets()
    ]
    print_table(rows, ["name", "channels", "size", "classes", "description"])
