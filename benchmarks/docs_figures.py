"""Regenerate the demo figures of the documentation (``make docs-figures``).

Runs ``invariscope demo`` (every stage) into a run folder, then copies the PNGs the pages
embed to ``docs/figures/demo/<stage>_<figure>.png`` and the real-model stage's photo grid to
``docs/figures/real_photos_efficientnet_lite0.jpg``. It takes as long as the demo (minutes
on 2 CPU cores); CI does not run it.

``--repro`` also reruns the paper reproductions whose figures the pages show next to their
tables (``docs/figures/stn_*.png``, ``itn_*.png``, ``alignment_rotation_*.png``,
``equivariance_invariance_simple-cnn.png``) with the commands the pages give: about an hour
on 2 CPU cores.

    python benchmarks/docs_figures.py                    # the demo figures
    python benchmarks/docs_figures.py --stages sweep,lee # only these demo stages
    python benchmarks/docs_figures.py --repro            # and the reproductions' figures
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"

#: (stage folder, figure file in its run's figures/, name under docs/figures/demo/)
DEMO_FIGURES = [
    ("sweep/screening", "accuracy.png", "sweep_accuracy.png"),
    ("sweep/screening", "softmax_curves.png", "sweep_softmax_curves.png"),
    ("sweep/screening", "thresholds.png", "sweep_thresholds.png"),
    ("worst_case", "worst_case.png", "worst_case.png"),
    ("shift", "shift_pcorrect.png", "shift_pcorrect.png"),
    ("shift", "shift_stability.png", "shift_stability.png"),
    ("shift", "shift_nonshiftability.png", "shift_nonshiftability.png"),
    ("shift", "shift_layer_sums.png", "shift_layer_sums.png"),
    ("stitch", "stitch_cka.png", "stitch_cka.png"),
    ("lee", "lee.png", "lee.png"),
    ("lee", "lee_layers.png", "lee_layers.png"),
    ("lee", "lee_contrib.png", "lee_contrib.png"),
    ("stn", "stn_pose.png", "stn_pose.png"),
    ("alignment", "alignment_rotation.png", "alignment_rotation.png"),
    ("equivariance", "equivariance_invariance.png", "equivariance_invariance.png"),
    ("itn", "itn_accuracy.png", "itn_accuracy.png"),
]


def copy_figures(runs: Path, figures: Path = FIGURES) -> list[Path]:
    """Copy the demo figures found under ``runs`` to ``figures``; return what was written.

    A stage that did not run (``--stages``) leaves its figures as they were.
    """
    written = []
    (figures / "demo").mkdir(parents=True, exist_ok=True)
    for stage, name, target in DEMO_FIGURES:
        source = runs / stage / "figures" / name
        if source.is_file():
            shutil.copyfile(source, figures / "demo" / target)
            written.append(figures / "demo" / target)
    photos = runs / "real" / "photos.png"
    if photos.is_file():
        from PIL import Image

        target = figures / "real_photos_efficientnet_lite0.jpg"
        Image.open(photos).convert("RGB").save(target, quality=85)
        written.append(target)
    return written


def _cli(*args: str) -> None:
    """Run one ``invariscope`` command in this process; stop on failure."""
    from invariscope.cli._app import run

    code = run(list(args))
    if code:
        raise SystemExit(f"invariscope {' '.join(args)} failed with exit status {code}")


def _copy(source: Path, target: str, written: list[Path]) -> None:
    shutil.copyfile(source, FIGURES / target)
    written.append(FIGURES / target)


def repro_figures(runs: Path) -> list[Path]:
    """Rerun the reproductions that draw the pages' paper figures; copy their PNGs."""
    import subprocess
    import sys

    written: list[Path] = []
    bench = ROOT / "benchmarks"
    # STNs and pose (docs/stn.md): rotated glyphs, --quick, 3 seeds
    stn = runs / "repro-stn"
    subprocess.run(
        [sys.executable, str(bench / "repro_stn.py"), "--out", str(stn), "--quick", "--seeds", "3"],
        check=True,
    )
    for name in ("stn_pose", "stn_angles", "stn_examples"):
        _copy(stn / "figures" / f"{name}.png", f"{name}.png", written)
    # the Invariant Transformer Net (docs/itn.md): the c_theta = 0.001 run
    itn = runs / "repro-itn"
    subprocess.run([sys.executable, str(bench / "repro_itn.py"), "--out", str(itn)], check=True)
    for name in ("itn_training", "itn_k1_probabilities", "itn_examples", "itn_transforms"):
        _copy(itn / "itn-c0.001" / "figures" / f"{name}.png", f"{name}.png", written)
    # feature-map alignment (docs/alignment.md): simple-cnn and isotropic-cnn, 5 epochs
    for arch in ("simple-cnn", "isotropic-cnn"):
        ckpt = runs / f"{arch}.pt"
        _cli("train", "--model", arch, "--data", "digits", "--epochs", "5", "--seed", "0",
             "--threads", "1", "--out", str(ckpt))  # fmt: skip
        out = runs / f"align-{arch}"
        _cli("alignment", "--model", str(ckpt), "--data", "digits", "--images", "100",
             "--best-case", "--best-steps", "30", "--layers", "conv1,pool1,conv2,pool2",
             "--no-progress", "--out", str(out))  # fmt: skip
        _copy(out / "figures" / "alignment_rotation.png", f"alignment_rotation_{arch}.png", written)
    # invariance by layer (docs/equivariance.md): transformation layers with the task loss
    out = runs / "eq-fig10"
    _cli("equivariance", "--model", str(runs / "simple-cnn.pt"), "--data", "digits",
         "--transforms", "hflip,vflip,rot90,zoom=0.5,rotation=45", "--method", "none",
         "--transformation-layer", "task", "--train-steps", "150", "--train-batch", "32",
         "--lr", "0.003", "--no-progress", "--out", str(out))  # fmt: skip
    _copy(
        out / "figures" / "equivariance_invariance.png",
        "equivariance_invariance_simple-cnn.png",
        written,
    )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "build" / "docs-figures"))
    parser.add_argument("--stages", default=None, help="only these demo stages (a,b,...)")
    parser.add_argument("--repro", action="store_true", help="also the reproductions' figures")
    args = parser.parse_args()
    from invariscope.demo import run_demo

    stages = args.stages.split(",") if args.stages else None
    run_demo(args.runs, progress=False, stages=stages, full=True)  # stn_pose.png too
    written = copy_figures(Path(args.runs))
    if args.repro:
        written += repro_figures(Path(args.runs))
    for path in written:
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
