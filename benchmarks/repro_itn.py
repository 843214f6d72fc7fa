"""Reproduction on built-in data: the Invariant Transformer Net (Bunne et al. 2018, strategy 2)
against the magnitude sweep's breaking thresholds (strategy 1) for the same classifier.

1. Train (or reuse the demo's cached) ``simple-cnn`` on ``digits`` (5 epochs).
2. Train an ITN in front of the frozen classifier for each ``c_theta`` (the weight of the
   colour term): 1 (neutral) and 1e-3 (colour damped); evaluate it on the test split.
3. Sweep rotation, scale_x, scale_y, brightness and contrast on the same test images and
   read the overall breaking thresholds (accuracy below half of the identity accuracy).
4. Print markdown tables: accuracy under the learned family, the learned transformations
   at k = 1 decomposed, and whether each lies inside the sweep's thresholds.

About 5 minutes on 2 CPU cores with the defaults.

Usage::

    python benchmarks/repro_itn.py --out repro-itn
    python benchmarks/repro_itn.py --quick --out /tmp/repro-itn   # smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _inside(value: float, low: float, high: float) -> str:
    lo = "-inf" if not np.isfinite(low) else f"{low:g}"
    hi = "+inf" if not np.isfinite(high) else f"{high:g}"
    ok = (not np.isfinite(low) or value > low) and (not np.isfinite(high) or value < high)
    return f"{'yes' if ok else 'NO'} ({lo}, {hi})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("repro-itn"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--c-theta", type=float, nargs="+", default=[1.0, 1e-3])
    parser.add_argument("--quick", action="store_true", help="a smoke run (few steps)")
    args = parser.parse_args()

    from invariscope.demo import train_or_load
    from invariscope.measure.itn import invariant_transformer
    from invariscope.measure.sweep import sweep

    steps = 20 if args.quick else args.steps
    t0 = time.perf_counter()
    model, train_set, test_set, test_acc, cached = train_or_load(
        "simple-cnn", "digits", epochs=5, progress=False
    )
    print(
        f"simple-cnn on digits: test accuracy {test_acc:.4f} ({'cached' if cached else 'trained'})"
    )
    images = 60 if args.quick else len(test_set)
    ranges = {
        "rotation": "-90:90:5",
        "scale_x": "0.5:2:0.05",
        "scale_y": "0.5:2:0.05",
        "brightness": "-1:1:0.05",
        "contrast": "0:3:0.1",
    }
    sw = sweep(
        model,
        test_set,
        list(ranges),
        ranges,
        images=images,
        out=args.out / "sweep",
        overwrite=True,
        figures=False,
        progress=False,
    )
    th = sw.thresholds
    th = th[th["label"] == -1].set_index("transform")

    rows_acc, rows_tf = [], []
    for c in args.c_theta:
        t = time.perf_counter()
        res = invariant_transformer(
            model,
            test_set,
            train_set,
            train_steps=steps,
            save_every=max(1, steps // 4),
            lr=args.lr,
            c_theta=c,
            images=images,
            out=args.out / f"itn-c{c:g}",
            overwrite=True,
            figures=True,
            progress=False,
        )
        seconds = time.perf_counter() - t
        s, acc = res.summary, res.tables["accuracy"]
        rows_acc.append(
            {
                "c_theta": f"{c:g}",
                "clean acc (train)": s["clean_accuracy_train"],
                "acc_orig": s["acc_orig"],
                "test acc F(0,0)": s["accuracy_k00"],
                "test acc F(1,1)": s["accuracy_k11"],
                "mean over grid": float(acc["accuracy"].mean()),
                "invariance steps": s["invariance_steps"],
                "seconds": seconds,
            }
        )
        lt = res.tables["learned_transforms"]
        sp = lt[(lt["transform"] == "spatial") & (lt["k"] == 1.0)].iloc[0]
        co = lt[(lt["transform"] == "colour") & (lt["k"] == 1.0)].iloc[0]
        for name, value, transform in (
            ("rotation (deg)", sp["rotation_deg"], "rotation"),
            ("scale_x", sp["scale_x"], "scale_x"),
            ("scale_y", sp["scale_y"], "scale_y"),
            ("contrast", co["contrast"], "contrast"),
            ("brightness", co["brightness"], "brightness"),
        ):
            row = th.loc[transform]
            rows_tf.append(
                {
                    "c_theta": f"{c:g}",
                    "learned at k=1": name,
                    "value": float(value),
                    "inside sweep threshold (low, high)": _inside(
                        float(value), row["threshold_low"], row["threshold_high"]
                    ),
                }
            )
        rows_tf.append(
            {
                "c_theta": f"{c:g}",
                "learned at k=1": "mean ||Ax-x|| spatial / colour",
                "value": float(sp["displacement"]),
                "inside sweep threshold (low, high)": f"colour {co['displacement']:.3f}",
            }
        )
    print(f"\nITN: {steps} steps, lr {args.lr:g}, tolerance 0.9, {images} test images\n")
    print(_markdown(pd.DataFrame(rows_acc)))
    print()
    print(_markdown(pd.DataFrame(rows_tf)))
    print(f"\nruns under {args.out}/ ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
