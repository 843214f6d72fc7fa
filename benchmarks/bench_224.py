"""Benchmark of ``sweep`` at the scale users work at: 224 px RGB JPEGs, a ResNet-18, 2 threads.

The setup a user would have: a folder of JPEGs (``<dir>/<class>/*.jpg``, written here
into a temporary directory: 10 classes of smooth random 256x256 images), loaded with
``create_dataset("folder:<dir>", image_size=224)``; a ResNet-18 (BasicBlock x [2, 2, 2, 2],
64-128-256-512, defined here in plain torch, random weights with a fixed seed: speed
does not depend on them) wrapped in :class:`invariscope.models.Classifier` with the
ImageNet mean / std; ``torch.set_num_threads(2)``; rotation (and brightness) swept over
a few magnitudes.

Prints, measured in one run:

(0) the bare forward pass ``model(x)`` per image at batch sizes 1 .. 64, contiguous and
    channels_last; the best of these is the floor: the model's own forward pass at its
    best batch size and memory format;
(a) ``sweep()`` time per transformed image / that floor (goal <= 1.10): the whole
    ``sweep(...)`` call with the defaults ``forward_batch="auto"``,
    ``memory_format="auto"`` (the forward batch and memory format are tuned on the real
    model; the choice, ``res.execution``, is printed), reading and decoding the JPEGs,
    the transformations, the Parquet run directory and the aggregates (no figures);
    creating the dataset object is included, building the model is not. For reference,
    also the same sweep with the tuned execution given explicitly (no tuning);
(b) the hand-written loop a user would write, per image / the sweep per image (goal
    >= 1.5x): a ``torch.utils.data.DataLoader`` (batch 32) over the same JPEGs read with
    PIL (the same resize and centre crop), ``kornia.geometry.transform.rotate`` (and
    ``(x + v).clamp(0, 1)`` for brightness) per magnitude, the forward pass in the
    default contiguous format, softmax / argmax, predictions collected in Python lists.

Both the sweep and the hand loop forward the same transformed images (checked: the
number of records equals the number of hand-loop predictions).

Usage::

    python benchmarks/bench_224.py            # a few minutes on 2 CPU cores
    python benchmarks/bench_224.py --quick    # 8 images, 2 magnitudes (smoke run)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GOAL_OVERHEAD = 1.10
GOAL_SPEEDUP = 1.5

# ---------------------------------------------------------------------------- the model


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (ResNet-18/34)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 as in He et al. 2016 (torchvision's layout), written in plain torch."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (c_in, c_out, stride) in enumerate(widths, start=1):
            setattr(
                self,
                f"layer{i}",
                nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)),
            )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(class_names: list[str], seed: int = 0):
    from invariscope.models import Classifier

    torch.manual_seed(seed)
    net = ResNet18(num_classes=len(class_names))
    return Classifier(
        net,
        input_size=(3, 224, 224),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        class_names=class_names,
    ).eval()


# ----------------------------------------------------------------------------- the data


def write_jpeg_folder(root: Path, classes: int, per_class: int, size: int = 256, seed: int = 0):
    """``root/class_<k>/<i>.jpg``: smooth random RGB images (upsampled noise + a disc)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            im = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
            draw = ImageDraw.Draw(im)
            cx, cy, r = rng.integers(size // 4, 3 * size // 4, size=2).tolist() + [
                int(rng.integers(size // 10, size // 4))
            ]
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
            im.save(folder / f"{i:04d}.jpg", quality=90)
    return root


class JpegFolder(torch.utils.data.Dataset):
    """What a user writes: PIL open, RGB, shorter side to 224, centre crop, to tensor."""

    def __init__(self, root: Path, image_size: int = 224) -> None:
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [
            (f, k) for k, c in enumerate(self.classes) for f in sorted((root / c).glob("*.jpg"))
        ]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        size = self.image_size
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            k = size / min(w, h)
            nw, nh = max(size, round(w * k)), max(size, round(h * k))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
        return x.permute(2, 0, 1).float().div_(255.0), label


# ------------------------------------------------------------------------- measurements


def bare_forward(model, sample: torch.Tensor, sizes, min_images: int):
    """``{(format, batch): seconds per image}``: one warm-up, then forwards of at least
    ``min_images`` images (and at least 2 passes) per batch size and memory format."""
    table = {}
    for fmt in ("contiguous", "channels_last"):
        cl = fmt == "channels_last"
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        for bs in sizes:
            x = sample.repeat(math.ceil(bs / len(sample)), 1, 1, 1)[:bs]
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            passes = max(2, math.ceil(min_images / bs))
            with torch.inference_mode():
                model(x)
                t = time.perf_counter()
                for _ in range(passes):
                    model(x)
                table[(fmt, bs)] = (time.perf_counter() - t) / (passes * bs)
    model.to(memory_format=torch.contiguous_format)
    return table


def run_sweep(model, root: Path, transforms, ranges, batch_size, out: Path, **kw):
    """Seconds of the whole sweep call (dataset object included) and its result."""
    from invariscope.data import create_dataset
    from invariscope.measure.sweep import sweep

    t = time.perf_counter()
    ds = create_dataset(f"folder:{root}", "test", image_size=224)
    res = sweep(model, ds, transforms, ranges, batch_size=batch_size, out=out, figures=False, **kw)
    return time.perf_counter() - t, res


def hand_loop(model, root: Path, mags: dict[str, np.ndarray], batch_size: int = 32):
    """The kornia + DataLoader loop at batch 32; returns (seconds, predictions, confidences)."""
    from kornia.geometry.transform import rotate

    t = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        JpegFolder(root), batch_size=batch_size, shuffle=False, num_workers=0
    )
    preds: list[int] = []
    confidence: list[float] = []
    labels: list[int] = []
    with torch.no_grad():
        for x, y in loader:
            for name, values in mags.items():
                for m in values:
                    if name == "rotation":
                        xt = rotate(x, torch.full((len(x),), float(m)))
                    else:  # brightness
                        xt = (x + float(m)).clamp(0.0, 1.0)
                    probs = torch.softmax(model(xt), dim=1)
                    conf, pred = probs.max(dim=1)
                    preds += pred.tolist()
                    confidence += conf.tolist()
                    labels += y.tolist()
    return time.perf_counter() - t, preds, confidence


def _table(rows) -> None:
    header = ("measure", "measured", "ratio", "goal")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 images, 2 magnitudes (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--classes", type=int, default=None, help="default 10 (quick: 2)")
    parser.add_argument("--per-class", type=int, default=None, help="default 20 (quick: 4)")
    parser.add_argument("--batch-size", type=int, default=32, help="sweep parts and hand loop")
    parser.add_argument(
        "--no-fixed", action="store_true", help="skip the reference sweep without tuning"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from invariscope.measure.sweep import resolve_magnitudes, sweep

    classes = args.classes or (2 if args.quick else 10)
    per_class = args.per_class or (4 if args.quick else 20)
    if args.quick:
        ranges = {"rotation": "0:10:10"}
        sizes = (1, 4, 8)
    else:
        ranges = {"rotation": "-20:20:10", "brightness": "-0.2:0.2:0.2"}
        sizes = (1, 4, 8, 16, 32, 64)
    transforms = list(ranges)
    mags = {n: resolve_magnitudes(n, r) for n, r in ranges.items()}
    n_images = classes * per_class
    n_forward = n_images * sum(len(m) for m in mags.values())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_jpeg_folder(tmp / "jpegs", classes, per_class)
        from invariscope.data import create_dataset

        ds = create_dataset(f"folder:{root}", "test", image_size=224)
        model = build_model(ds.classes)
        print(
            f"ResNet-18 (random weights) at 3x224x224, {n_images} JPEGs (256x256, {classes} "
            f"classes) in a folder; "
            + "; ".join(f"{n} {', '.join(f'{v:g}' for v in m)}" for n, m in mags.items())
            + "; "
            f"{n_forward} transformed images; batch {args.batch_size}; torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads"
        )
        # warm-up: imports and first-call costs, outside every timing
        sample = torch.stack([ds[i][0] for i in range(min(8, len(ds)))])
        sweep(model, ds, ["rotation"], {"rotation": [0.0, 5.0]}, images=2, figures=False)

        # (0) the floor
        t0 = time.perf_counter()
        bare = bare_forward(model, sample, sizes, min_images=32 if args.quick else 48)
        bare_s = time.perf_counter() - t0
        (best_fmt, best_bs), floor = min(bare.items(), key=lambda kv: kv[1])

        # (1) the sweep, defaults (auto), timed as a whole
        t_sweep, res = run_sweep(model, root, transforms, ranges, args.batch_size, tmp / "run-auto")
        n_records = len(res.table("records", columns=["index"]))
        ex = res.execution

        # reference: the same sweep with the tuned execution given explicitly
        t_fixed = None
        if not args.no_fixed:
            t_fixed, _ = run_sweep(
                model,
                root,
                transforms,
                ranges,
                args.batch_size,
                tmp / "run-fixed",
                forward_batch=ex.forward_batch,
                memory_format="channels_last" if ex.channels_last else "contiguous",
            )

        # (2) the hand loop
        t_hand, preds, _ = hand_loop(model, root, mags, batch_size=args.batch_size)

    if n_records != n_forward or len(preds) != n_forward:
        raise SystemExit(
            f"image counts differ: sweep {n_records} records, hand loop {len(preds)} "
            f"predictions, expected {n_forward}"
        )

    print(f"\n(0) bare forward, ms per image (best of formats x batch sizes; {bare_s:.0f} s)")
    print(f"    {'batch':>5}  {'contiguous':>10}  {'channels_last':>13}")
    for bs in sizes:
        c, cl = bare[("contiguous", bs)] * 1e3, bare[("channels_last", bs)] * 1e3
        print(f"    {bs:>5}  {c:>10.2f}  {cl:>13.2f}")
    print(f"    floor: {floor * 1e3:.2f} ms per image ({best_fmt} at batch {best_bs})")
    timings = ex.ms_per_image or {}
    print(
        f"\nsweep execution (res.execution): forward batch {ex.forward_batch}, "
        f"{'channels_last' if ex.channels_last else 'contiguous'}, tuned {ex.tuned}"
        + (
            "; tuning timings ms/image: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
            if timings
            else ""
        )
        + (f"; tuning took {ex.tuning_seconds:.2f} s" if ex.tuning_seconds else "")
    )
    per_sweep = t_sweep / n_forward
    per_hand = t_hand / n_forward
    rows = [
        (
            "(a) sweep per image / bare forward floor",
            f"{per_sweep * 1e3:.2f} ms / {floor * 1e3:.2f} ms ({t_sweep:.1f} s for {n_forward})",
            f"{per_sweep / floor:.3f}",
            f"<= {GOAL_OVERHEAD}",
        ),
    ]
    if t_fixed is not None:
        per_fixed = t_fixed / n_forward
        rows.append(
            (
                "    same sweep, execution given (no tuning)",
                f"{per_fixed * 1e3:.2f} ms / {floor * 1e3:.2f} ms ({t_fixed:.1f} s)",
                f"{per_fixed / floor:.3f}",
                "",
            )
        )
    rows.append(
        (
            "(b) hand loop per image / sweep per image",
            f"{per_hand * 1e3:.2f} ms / {per_sweep * 1e3:.2f} ms ({t_hand:.1f} s for {n_forward})",
            f"{per_hand / per_sweep:.2f}x",
            f">= {GOAL_SPEEDUP}x",
        )
    )
    print()
    _table(rows)
    a_ok = per_sweep / floor <= GOAL_OVERHEAD
    b_ok = per_hand / per_sweep >= GOAL_SPEEDUP
    print(
        f"(a) {'meets' if a_ok else 'does not meet'} the goal: sweep / floor "
        f"{per_sweep / floor:.3f} ({'<=' if a_ok else '>'} {GOAL_OVERHEAD})"
    )
    print(
        f"(b) {'meets' if b_ok else 'does not meet'} the goal: hand loop / sweep "
        f"{per_hand / per_sweep:.2f}x ({'>=' if b_ok else '<'} {GOAL_SPEEDUP}x)"
    )


if __name__ == "__main__":
    main()
