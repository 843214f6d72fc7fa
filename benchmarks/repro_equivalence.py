"""Reproduction on built-in data: stitching, CKA and the Lie derivative (Lenc & Vedaldi
2018, section on equivalence; Kornblith et al. 2019; Gruver et al. 2023).

Trains three networks on ``digits`` (seeded, 5 epochs): ``simple-cnn`` from seeds 0 and 1,
and ``small-vgg`` (1 channel, 28 px, width 16) from seed 0; then

1. stitches every 4-D layer of simple-cnn (seed 0) into every 4-D layer of simple-cnn
   (seed 1), and into small-vgg's ReLU and pool layers (1x1 stitching layers, 300 Adam
   steps each), with linear CKA between the same layers, on the 360 test images;
2. measures the Lie derivative (translation, rotation, zoom, brightness) of each model,
   end to end and per layer.

Prints markdown tables (the README quotes them). About 10 minutes on 2 CPU cores.

Usage::

    python benchmarks/repro_equivalence.py --out repro-equivalence
    python benchmarks/repro_equivalence.py --quick --out /tmp/repro-eq   # smoke run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _matrix(table: pd.DataFrame, value: str) -> pd.DataFrame:
    wide = table.pivot_table(
        index=["order_a", "layer_a"], columns=["order_b", "layer_b"], values=value
    )
    wide.columns = [c[1].removeprefix("net.") for c in wide.columns]
    wide = wide.reset_index().drop(columns="order_a")
    wide["layer_a"] = wide["layer_a"].str.removeprefix("net.")
    return wide.rename(columns={"layer_a": "A \\ B"})


def main() -> None:
    from invariscope.data import create_dataset
    from invariscope.measure.lee import lie_derivative
    from invariscope.measure.stitch import stitch
    from invariscope.train import model_for_dataset, train

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("repro-equivalence"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train_set = create_dataset("digits", "train")
    test_set = create_dataset("digits", "test")
    epochs, steps = (1, 30) if args.quick else (5, 300)
    images = 64 if args.quick else None

    def trained(name, seed, **kw):
        model = model_for_dataset(name, train_set, seed=seed, **kw)
        result = train(
            model, train_set, test_set=test_set, epochs=epochs, seed=seed, progress=False
        )
        print(f"  {name} seed {seed}: test accuracy {result.test_accuracy:.4f}", flush=True)
        return model.eval()

    print(f"# digits, {epochs} epochs, stitching {steps} steps per pair", flush=True)
    cnn0, cnn1 = trained("simple-cnn", 0), trained("simple-cnn", 1)
    vgg = trained("small-vgg", 0, width=16)
    cnn_layers = ["net.conv1", "net.pool1", "net.relu1", "net.conv2", "net.pool2", "net.relu2"]
    vgg_layers = [
        "net.relu1_2",
        "net.pool1",
        "net.relu2_2",
        "net.pool2",
        "net.relu3_2",
        "net.pool3",
    ]

    for name, other, layers_b, label in (
        ("seeds", cnn1, cnn_layers, "simple-cnn seed 1"),
        ("architectures", vgg, vgg_layers, "small-vgg"),
    ):
        res = stitch(
            cnn0,
            other,
            test_set,
            train_set,
            layers_a=cnn_layers,
            layers_b=layers_b,
            train_steps=steps,
            images=images,
            labels={"model": "simple-cnn seed 0", "model_b": label},
            out=args.out / f"stitch-{name}",
            overwrite=True,
            figures=True,
            progress=False,
        )
        models = res.tables["models"].set_index("model")["error"]
        print(
            f"\n## simple-cnn seed 0 -> {label}: stitched top-1 error "
            f"(own errors: A {models['model']:.3f}, B {models['model_b']:.3f})\n"
        )
        print(_markdown(_matrix(res.stitch_error, "error")))
        print(f"\n## linear CKA, simple-cnn seed 0 vs {label}\n")
        print(_markdown(_matrix(res.cka, "cka"), 2))

    rows = []
    for label, model in (
        ("simple-cnn seed 0", cnn0),
        ("simple-cnn seed 1", cnn1),
        ("small-vgg", vgg),
    ):
        res = lie_derivative(
            model,
            test_set,
            ["translate_x", "rotation", "zoom", "brightness"],
            images=images,
            out=args.out / f"lee-{label.replace(' ', '-')}",
            overwrite=True,
            figures=True,
            progress=False,
        )
        for r in res.summary.itertuples(index=False):
            rows.append(
                {
                    "model": label,
                    "transform": f"{r.transform} (per {r.unit})",
                    "LEE": r.lee,
                    "95% low": r.lee_low,
                    "95% high": r.lee_high,
                    "LEE (abs)": r.lee_abs,
                }
            )
        layers = res.layers[res.layers["transform"] == "translate_x"].sort_values("order")
        print(f"\n## {label}: per-layer relative translation equivariance error\n")
        print(
            _markdown(
                layers[["layer", "rel_mean", "mean"]].rename(
                    columns={"rel_mean": "relative", "mean": "mean squared"}
                ),
                4,
            )
        )
    print("\n## Lie derivative of the output (LEE = E|d logits/dt|^2)\n")
    print(_markdown(pd.DataFrame(rows), 4))


if __name__ == "__main__":
    main()
