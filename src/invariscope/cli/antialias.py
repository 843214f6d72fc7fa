"""``invariscope antialias``: convert a model's subsampling layers, optionally fine-tune it,
and write the anti-aliased checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from invariscope.cli._app import cli
from invariscope.cli._engine import _data_options, _input_size
from invariscope.cli._util import image_size_option
from invariscope.cli._vocab import deprecated, magnitude_entries


@cli.command("antialias")
@deprecated("antialias", "--size", "--train-images", "train_images", type=int)
@deprecated("antialias", "--batch-size", "--train-batch", "train_batch", type=click.IntRange(min=1))
@click.option(
    "--model",
    "model_spec",
    required=True,
    help="Checkpoint path, registered name, package.module:factory, torchvision:NAME or timm:NAME.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Weights file for a registry name, module:factory, torchvision or timm model.",
)
@click.option(
    "--input-size",
    default=None,
    callback=_input_size,
    metavar="C,H,W",
    help="Input size of a module:factory, torchvision or timm model that cannot be told "
    "from its weights.",
)
@click.option(
    "--method",
    default="blurpool",
    show_default=True,
    type=click.Choice(["blurpool", "avgpool", "aps"]),
    help="blurpool: blur before every subsampling (Zhang 2019); avgpool: max pools become "
    "larger average pools (Azulay & Weiss 2019); aps: adaptive polyphase sampling with "
    "circular padding (Chaman & Dokmanic 2021).",
)
@click.option(
    "--filter-size",
    default=4,
    show_default=True,
    type=click.IntRange(1, 7),
    help="blurpool: size of the binomial filter (1 = no blur).",
)
@click.option(
    "--pool-size",
    default=6,
    show_default=True,
    type=click.IntRange(min=1),
    help="avgpool: size of the average pools that replace the max pools.",
)
@click.option(
    "--padding",
    default="reflect",
    show_default=True,
    type=click.Choice(["reflect", "circular", "zeros", "replicate"]),
    help="blurpool: how the blur pads feature maps.",
)
@click.option(
    "--finetune-epochs",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Fine-tune the converted model for N epochs on --data (0: convert only).",
)
@click.option(
    "--data",
    "data_name",
    default=None,
    help="Dataset name or path (see 'invariscope datasets'): fine-tuned on its train split; "
    "test accuracies are reported on its test split.",
)
@click.option(
    "--train-images",
    default=None,
    type=int,
    help="Number of fine-tuning images: generated datasets make this many, fixed ones take "
    "a seeded subset [default: the dataset's].",
)
@image_size_option("the model's square input size")
@click.option(
    "--train-batch",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Fine-tuning images per optimiser step.",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seeds shuffling and augmentation."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option(
    "--augment",
    multiple=True,
    metavar="NAME=LOW:HIGH",
    help="Fine-tuning augmentation from the transform registry, uniform per image; "
    "repeatable or ';'-separated, e.g. --augment 'rotation=-30:30;zoom=0.8:1.2'.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads for fine-tuning [default: PyTorch's].",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint to write; an existing file is replaced only if it is an invariscope "
    "checkpoint (and not the --model file).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def antialias_cmd(
    model_spec,
    weights,
    input_size,
    method,
    filter_size,
    pool_size,
    padding,
    finetune_epochs,
    data_name,
    train_images,
    image_size,
    train_batch,
    lr,
    seed,
    device,
    augment,
    threads,
    out,
    no_progress,
) -> None:
    """Anti-alias a classifier's subsampling layers and write a checkpoint.

    Every strided conv, max pool and average pool is converted (weights kept): blurpool
    low-pass filters before each subsampling, avgpool swaps each max pool for a larger
    average pool, aps subsamples at the strongest polyphase component with circular
    padding (exactly invariant to circular shifts when the input size is divisible by
    the total stride). With --finetune-epochs N the converted model is then trained for
    N epochs on --data; with --data the test accuracy of the original, converted and
    fine-tuned models is printed. The checkpoint records the conversion, so it loads
    anywhere a checkpoint does.

    \b
    Example:
      invariscope antialias --model model.pt --method blurpool --out model-blurpool.pt
      invariscope antialias --model vgg.pt --method aps --finetune-epochs 2 --data shapes --out vgg-aps.pt
    """
    from invariscope.data import create_dataset
    from invariscope.engine.selection import align_to_model, check_class_count, dataset_classes
    from invariscope.errors import InvariscopeError
    from invariscope.models import antialias, check_class_names, load_model, save_checkpoint
    from invariscope.models.antialias import antialias_summary
    from invariscope.models.checkpoint import is_checkpoint, read_checkpoint
    from invariscope.train import (
        check_classes,
        check_train_settings,
        evaluate,
        parse_augment,
        resolve_device,
        train,
    )

    if finetune_epochs:
        if data_name is None:
            raise InvariscopeError(
                "--finetune-epochs needs --data (the dataset to fine-tune on); pass --data NAME"
            )
        check_train_settings(epochs=finetune_epochs, batch_size=train_batch, lr=lr)
    elif augment:
        raise InvariscopeError("--augment applies to fine-tuning; pass --finetune-epochs N too")
    aug = parse_augment(magnitude_entries(augment))
    dev = resolve_device(device)
    source = Path(model_spec)
    from_file = source.is_file()
    if out.exists() and from_file and out.resolve() == source.resolve():
        raise InvariscopeError(
            f"--out {out} is the --model file; pass a new path to keep the original model"
        )
    if out.exists() and not is_checkpoint(out):  # checked before, and not after, the work
        raise InvariscopeError(
            f"--out {out} exists and is not an invariscope checkpoint; pass a new path or "
            "remove the file"
        )
    original = load_model(model_spec, weights, input_size=input_size)
    if not original.arch:
        raise InvariscopeError(
            f"{model_spec} has no architecture to rebuild it from (a TorchScript file?), so "
            "no checkpoint could be written; give the architecture and --weights instead"
        )
    if method == "avgpool":
        _check_pool_size(original, pool_size)
    data_options: dict = {}
    if image_size is not None:
        data_options["image_size"] = image_size
    elif data_name is not None:
        data_options = _data_options(data_name, {}, {"model": original})
    test_set = None
    if data_name is not None:  # the pairing is checked before any work, as every analysis does
        test_set, note = align_to_model(
            create_dataset(data_name, "test", seed=seed, **data_options), original
        )
        if note:
            click.echo(f"invariscope: warning: {note}", err=True)
        check_class_count(original, dataset_classes(test_set))
    model = antialias(
        original, method, filter_size=filter_size, pool_size=pool_size, padding=padding
    )

    source_meta = read_checkpoint(source) if from_file and is_checkpoint(source) else {}
    train_config = source_meta.get("train_config")
    data_fingerprint = source_meta.get("data_fingerprint")
    accuracy = ""
    if test_set is not None:
        warning = check_class_names(original, test_set)
        if warning:
            click.echo(f"invariscope: warning: {warning}", err=True)
        before = evaluate(original.to(dev), test_set, device=dev)
        original.to("cpu")
        converted = evaluate(model.to(dev), test_set, device=dev)
        accuracy = f"test accuracy {before:.4f} -> {converted:.4f} converted"
        if finetune_epochs:
            train_set = create_dataset(
                data_name, "train", size=train_images, seed=seed, **data_options
            )
            check_classes(train_set)
            click.echo(
                f"fine-tuning on {data_name}: {len(train_set)} train / {len(test_set)} test "
                f"images, {finetune_epochs} epochs, device {dev}",
                err=True,
            )
            result = train(
                model,
                train_set,
                test_set=test_set,
                epochs=finetune_epochs,
                train_batch=train_batch,
                lr=lr,
                seed=seed,
                device=dev,
                augment=aug,
                progress=not no_progress,
                threads=threads,
            )
            train_config = dict(
                result.config,
                model=model.arch,
                data=data_name,
                size=train_images,
                device=str(dev),
                finetune_of=str(source.resolve()) if from_file else model_spec,
            )
            data_fingerprint = train_set.fingerprint
            epochs = f"{finetune_epochs} fine-tuning epoch" + ("s" if finetune_epochs > 1 else "")
            accuracy += f" -> {result.test_accuracy:.4f} after {epochs}"
    model.to("cpu")
    save_checkpoint(
        model,
        out,
        train_config=train_config,
        data_fingerprint=data_fingerprint,
        extra={"antialias_of": str(source.resolve()) if from_file else model_spec},
    )
    summary = antialias_summary(model.antialias)
    click.echo(
        f"{summary}; " + (f"{accuracy}; " if accuracy else "") + f"checkpoint written to {out}"
    )


def _check_pool_size(model, pool_size: int) -> None:
    """Refuse an average pool larger than every feature map a max pool of ``model`` sees
    (it would average mostly padding, and its size-matching probe never ends)."""
    import torch
    from torch import nn

    from invariscope.errors import InvariscopeError

    size = getattr(model, "input_size", None)
    if not (isinstance(size, tuple | list) and len(size) == 3):
        return  # the map sizes are unknown without an input size
    sides: list[int] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args: sides.append(max(args[0].shape[-2:])))
        for m in model.modules()
        if isinstance(m, nn.MaxPool2d)
    ]
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *size))
    except Exception:  # noqa: BLE001 - the conversion reports a model that does not run
        return
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    if sides and pool_size > max(sides):
        raise InvariscopeError(
            f"--pool-size {pool_size} is larger than every feature map a max pool sees "
            f"(at most {max(sides)} pixels a side for {size[1]}x{size[2]} inputs); use "
            f"--pool-size <= {max(sides)} (the paper uses 6 for 2x2 max pools)"
        )
