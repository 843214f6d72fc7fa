"""Training speed: wall time of the foundation's acceptance runs, measured in one run.

Prints, for simple-cnn trained 5 epochs (the README's figures come from here):
dataset generation time, training time, test accuracy, and the time as a fraction of
the 2-minute budget the foundation issue sets.

    python benchmarks/bench_train.py [--epochs 5] [--data digits,glyphs]
"""

from __future__ import annotations

import argparse
import time

import torch

from invariscope.data import create_dataset
from invariscope.train import model_for_dataset, train

BUDGET_S = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data", default="digits,glyphs")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(
        f"{'data':<8} {'train imgs':>10} {'gen s':>7} {'train s':>8} {'test acc':>9} {'of budget':>10}"
    )
    for name in args.data.split(","):
        t0 = time.perf_counter()
        train_set, test_set = create_dataset(name, "train"), create_dataset(name, "test")
        gen = time.perf_counter() - t0
        model = model_for_dataset("simple-cnn", train_set, seed=0)
        t1 = time.perf_counter()
        result = train(model, train_set, test_set=test_set, epochs=args.epochs, progress=False)
        secs = time.perf_counter() - t1
        print(
            f"{name:<8} {len(train_set):>10} {gen:>7.1f} {secs:>8.1f} "
            f"{result.test_accuracy:>9.4f} {(gen + secs) / BUDGET_S:>10.2f}"
        )


if __name__ == "__main__":
    main()
