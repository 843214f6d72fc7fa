"""Reproduction on built-in data: max pooling vs its anti-aliased remedies, and why
augmentation is not enough (Azulay & Weiss 2019, section 4).

1. Train ``small-vgg`` (2x2 max pools) and the same network converted *before* training
   to BlurPool (Zhang 2019, filter 4), to 6x6 average pooling (Azulay & Weiss) and to
   adaptive polyphase sampling (Chaman & Dokmanic 2021), the same way (same seed, data,
   epochs, optimiser) on ``glyphs``; then measure each against the max-pool baseline
   with ``shift_stability``: 1-pixel vertical shifts of the image embedded at half size
   (inpainted canvas), 1-pixel crops, circular shifts; accuracy, jaggedness, P(top-1
   change), consistency and nonshiftability by layer.
2. Train the max-pool network with translation augmentation (+-3 px) and compare
   jaggedness on images like the training set (1-pixel shifts of the centred glyph within
   the augmented range, ``sequence:translate_y``) against images unlike it (the glyph at
   half size, embedded and shifted 1 pixel at a time).

Prints markdown tables (the README quotes them) and writes the run directories under
``--out`` (figures included). About 10 minutes on 2 CPU cores with the defaults.

Usage::

    python benchmarks/repro_shift.py --out repro-shift
    python benchmarks/repro_shift.py --quick --out /tmp/repro   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no extra dependency)."""

    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _train(name, model, train_set, test_set, epochs, augment=None):
    from invariscope.train import train

    t = time.perf_counter()
    result = train(
        model,
        train_set,
        test_set=test_set,
        epochs=epochs,
        seed=0,
        progress=False,
        augment=augment,
    )
    per_epoch = ", ".join(f"{a:.3f}" for a in result.history["test_accuracy"])
    print(
        f"  trained {name}: test accuracy by epoch {per_epoch} ({time.perf_counter() - t:.0f} s)",
        flush=True,
    )
    return model.eval(), result.test_accuracy


def main() -> None:
    from invariscope.data import create_dataset
    from invariscope.measure.shift import shift_stability
    from invariscope.models import antialias
    from invariscope.train import model_for_dataset

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("repro-shift"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    size = 1000 if args.quick else None
    epochs = 1 if args.quick else args.epochs
    images = 50 if args.quick else args.images
    train_set = create_dataset("glyphs", "train", size=size)
    test_set = create_dataset("glyphs", "test")

    print(f"# glyphs, small-vgg (width 32), {epochs} epochs, {images} test images", flush=True)
    models, accuracy = {}, {}
    for method in ("max-pool", "blurpool", "avgpool"):
        net = model_for_dataset("small-vgg", train_set, seed=0)
        if method != "max-pool":
            net = antialias(net, method)
        models[method], accuracy[method] = _train(method, net, train_set, test_set, epochs)

    rows, layer_rows = [], []
    for method in ("blurpool", "avgpool"):
        res = shift_stability(
            models[method],
            test_set,
            ["embed", "crop", "circular"],
            baseline=models["max-pool"],
            frames=12,
            images=images,
            labels={"model": method, "baseline": "max-pool"},
            out=args.out / f"shift-{method}",
            overwrite=True,
            figures=True,
            progress=False,
        )
        for r in res.summary.itertuples(index=False):
            name = method if r.model == "model" else "max-pool"
            if name == "max-pool" and method != "blurpool":
                continue  # the baseline's row once
            rows.append(
                {
                    "model": name,
                    "protocol": r.protocol,
                    "test acc": accuracy[name],
                    "acc on frames": r.accuracy,
                    "jagged": r.jagged,
                    "P(top-1 change)": r.p_top1_change,
                    "consistency": r.consistency,
                    "MAD": r.mad,
                }
            )
        ns = res.tables["nonshiftability_mean"]
        ns = ns[ns["protocol"] == "embed"]
        for r in ns.itertuples(index=False):
            name = method if r.model == "model" else "max-pool"
            if name == "max-pool" and method != "blurpool":
                continue
            layer_rows.append(
                {"model": name, "layer": r.layer, "order": r.layer_order, "mean": r.mean}
            )
    table = pd.DataFrame(rows).sort_values(["protocol", "model"])
    print("\n## Shift stability (95% intervals in the run directories)\n")
    print(_markdown(table))
    layers = pd.DataFrame(layer_rows)
    wide = layers.pivot_table(index=["order", "layer"], columns="model", values="mean")
    print("\n## Nonshiftability by layer (embed protocol, mean over images)\n")
    print(_markdown(wide.reset_index().drop(columns="order"), 2))

    # 2. augmentation is not enough
    shift = 3.0 / 28.0
    aug = {"translate_x": (-shift, shift), "translate_y": (-shift, shift)}
    augmented, aug_acc = _train(
        "max-pool + translation augmentation (+-3 px)",
        model_for_dataset("small-vgg", train_set, seed=0),
        train_set,
        test_set,
        epochs,
        aug,
    )
    rows = []
    for name, model in (("max-pool", models["max-pool"]), ("max-pool + augmentation", augmented)):
        for what, protocol, extra in (
            ("like training: centred glyph, 0-3 px", "sequence:translate_y", {"steps": 4}),
            ("unlike: half-size glyph on a canvas, 0-3 px", "embed", {"steps": 4, "fill": "black"}),
        ):
            res = shift_stability(
                model, test_set, protocol, images=images, layers=(), progress=False, **extra
            )
            r = res.summary.iloc[0]
            rows.append(
                {
                    "model": name,
                    "images": what,
                    "acc on frames": r.accuracy,
                    "jagged": r.jagged,
                    "P(top-1 change)": r.p_top1_change,
                }
            )
    print(f"\n## Augmentation is not enough (test accuracy with augmentation {aug_acc:.3f})\n")
    print(_markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
