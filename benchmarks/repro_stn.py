"""Reproduction on built-in data: Finnveden, Jansson & Lindeberg 2020, tables I-II (rotation).

Runs ``invariscope stn-benchmark`` (or resumes it, when ``--out`` already holds the same
run) on ``rotated-glyphs`` and prints its two tables as markdown, next to the paper's
MNIST numbers (which are quoted here for comparison only; nothing is fitted to them).

``--quick`` (800 Adam steps per run, 1000 test images; on rotated sets the rotation-only
head with a 10x faster localisation net) takes about 190 CPU-seconds per seed for the
five default architectures: about 10 minutes for 3 seeds on one free core. Any further
option is passed to ``stn-benchmark`` (e.g. ``--family affine``).

Usage::

    python benchmarks/repro_stn.py --out runs/repro-stn --quick --seeds 3
    python benchmarks/repro_stn.py --out /tmp/repro-stn --quick --seeds 1 --steps 50  # smoke
"""

from __future__ import annotations

import argparse
import math
import sys

#: Table II (error %, mean and SD over 10 seeds) and table I (pose SD, degrees) of the
#: paper, rotated MNIST.
PAPER = {
    "cnn": (1.71, 0.07, None),
    "C0": (1.08, 0.05, 23.2),
    "C1": (1.32, 0.04, 47.2),
    "DL1": (1.05, 0.02, 26.8),
    "SL1": (0.98, 0.06, 18.7),
}


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--data", default="rotated-glyphs")
    args, extra = parser.parse_known_args(argv)

    from invariscope.cli._app import run
    from invariscope.runs import RunStore

    command = [
        "stn-benchmark",
        "--model",
        "simple-cnn",
        "--data",
        args.data,
        "--archs",
        ",".join(PAPER),
        "--seeds",
        str(args.seeds),
        "--no-progress",
        "--out",
        args.out,
    ]
    if args.quick:
        command.append("--quick")
    if args.steps is not None:
        command += ["--train-steps", str(args.steps)]
    command += extra
    status = run(command)
    if status:
        return status
    store = RunStore.open(args.out)
    errors = store.read_aggregate("error_table").set_index("arch")
    pose = store.read_aggregate("pose_table").set_index("arch")
    print()
    print(
        "| architecture | error % measured | error % paper | pose SD measured (deg, circular) | "
        "pose SD measured (deg, paper's arctan) | pose SD paper (deg) | params |"
    )
    print("|---|---|---|---|---|---|---|")
    for arch, (err, sd, pose_paper) in PAPER.items():
        e = errors.loc[arch]
        circ, spread, folded = None, None, None
        if arch in pose.index:
            circ = float(pose.loc[arch, "angle_sd_deg"])
            spread = float(pose.loc[arch, "pose_sd_std"])
            folded = float(pose.loc[arch, "angle_sd_arctan_deg"])
        measured = "-" if circ is None else f"{_fmt(circ, 1)} ± {_fmt(spread, 1)}"
        print(
            f"| {e['label']} | {_fmt(e['error_mean_pct'])} ± {_fmt(e['error_std_pct'])} | "
            f"{err:.2f} ± {sd:.2f} | {measured} | {_fmt(folded, 1)} | {_fmt(pose_paper, 1)} | "
            f"{int(e['params']):,} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
