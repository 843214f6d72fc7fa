"""``invariscope train``: train a model on built-in or file data and write a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from invariscope.cli._app import cli
from invariscope.cli._util import image_size_option
from invariscope.cli._vocab import deprecated, magnitude_entries


@cli.command("train")
@deprecated("train", "--size", "--train-images", "train_images", type=int)
@deprecated("train", "--batch-size", "--train-batch", "train_batch", type=click.IntRange(min=1))
@click.option(
    "--model",
    "model_name",
    default="simple-cnn",
    show_default=True,
    help="Registered architecture (see 'invariscope models').",
)
@click.option(
    "--data",
    "data_name",
    default="digits",
    show_default=True,
    help="Dataset name or path (see 'invariscope datasets').",
)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--train-batch",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training images per optimiser step.",
)
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seeds initial weights, shuffling and augmentation.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option(
    "--augment",
    multiple=True,
    metavar="NAME=LOW:HIGH",
    help="Train-time augmentation from the transform registry, uniform per image; "
    "repeatable or ';'-separated, e.g. --augment 'rotation=-30:30;zoom=0.8:1.2'.",
)
@click.option(
    "--train-images",
    default=None,
    type=int,
    help="Number of training images: generated datasets make this many, fixed ones take a "
    "seeded subset [default: the dataset's].",
)
@image_size_option("as stored, so they must share one size")
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint to write [default: MODEL_DATA.pt]; an existing file is replaced only "
    "if it is an invariscope checkpoint.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads for training [default: PyTorch's, from the CPUs available]; the "
    "weights are reproducible for a given seed, device and thread count.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_cmd(
    model_name,
    data_name,
    epochs,
    train_batch,
    lr,
    seed,
    device,
    augment,
    train_images,
    image_size,
    out,
    threads,
    no_progress,
) -> None:
    """Train a classifier and write an invariscope checkpoint.

    The checkpoint holds the architecture and its arguments, the weights, the
    preprocessing, the class names, this training configuration and a fingerprint of
    the data; it is written atomically (a killed run never leaves a partial file).
    The same command gives bit-identical weights for the same seed, device and number
    of CPU threads (--threads; the count used is stored in the checkpoint).

    \b
    Example:
      invariscope train --model simple-cnn --data digits --epochs 5 --out model.pt
      invariscope train --data glyphs --augment rotation=-30:30 --out glyphs-rot.pt
    """
    import torch

    from invariscope.data import create_dataset
    from invariscope.errors import InvariscopeError
    from invariscope.models import save_checkpoint
    from invariscope.models.checkpoint import is_checkpoint
    from invariscope.train import (
        check_classes,
        check_train_settings,
        checkpoint_name,
        model_for_dataset,
        parse_augment,
        resolve_device,
        train,
    )

    check_train_settings(epochs=epochs, batch_size=train_batch, lr=lr)
    aug = parse_augment(magnitude_entries(augment))
    dev = resolve_device(device)
    if out is None:
        out = Path(checkpoint_name(model_name, data_name))
    if out.exists() and not is_checkpoint(out):  # checked before, and not after, training
        raise InvariscopeError(
            f"--out {out} exists and is not an invariscope checkpoint; pass a new path or "
            "remove the file"
        )
    data_options = {} if image_size is None else {"image_size": image_size}
    train_set = create_dataset(data_name, "train", size=train_images, seed=seed, **data_options)
    check_classes(train_set)
    test_set = create_dataset(data_name, "test", seed=seed, **data_options)
    model = model_for_dataset(model_name, train_set, seed=seed)
    click.echo(
        f"training {model_name} on {data_name}: {len(train_set)} train / {len(test_set)} test "
        f"images, {epochs} epochs, device {dev}"
        + (f", {threads or torch.get_num_threads()} CPU threads" if dev.type == "cpu" else ""),
        err=True,
    )
    result = train(
        model,
        train_set,
        test_set=test_set,
        epochs=epochs,
        train_batch=train_batch,
        lr=lr,
        seed=seed,
        device=dev,
        augment=aug,
        progress=not no_progress,
        threads=threads,
    )
    config = dict(
        result.config, model=model_name, data=data_name, size=train_images, device=str(dev)
    )
    model.to("cpu")
    save_checkpoint(model, out, train_config=config, data_fingerprint=train_set.fingerprint)
    seconds = result.history["seconds"].sum()
    click.echo(
        f"test accuracy {result.test_accuracy:.4f} after {epochs} epochs "
        f"({seconds:.1f} s); checkpoint written to {out}"
    )
