"""Spatial transformer networks at any depth (Finnveden, Jansson & Lindeberg 2020).

An STN is built around any classifier whose network is an ``nn.Sequential`` of named
stages (every built-in: ``simple-cnn``, ``small-vgg``, ``small-resnet``). Its stages are
grouped into *conv blocks*: a block starts at a stage that holds a convolution and runs
up to the next such stage, or up to the head (``Flatten``, ``Linear``, adaptive pooling).
For ``simple-cnn`` (``conv1, pool1, relu1, conv2, pool2, relu2, flatten, fc``) the blocks
are ``[conv1, pool1, relu1]`` and ``[conv2, pool2, relu2]``; ``X = 1`` splits after the
first, "after the first convolutional layer and max pooling" as the paper counts.

The variants (the paper's figure 3):

- ``C0``: the localisation net sees the input and the spatial transformer warps it;
- ``CX`` (``X >= 1``): the localisation net sees the feature map after block ``X`` and the
  transformer warps that feature map. The paper proves that this cannot support
  invariance (a purely spatial warp of feature maps cannot undo a rotation or a scaling);
- ``DLX``: the localisation net is FRESH copies (re-initialised) of the classifier's first
  ``X`` blocks plus a head; the input is warped;
- ``SLX``: the localisation net SHARES the classifier's first ``X`` blocks (applied to the
  untransformed input) plus a head; the input is warped and the whole classifier runs on
  the warped input.

Iterative STNs (``iterations = n``, input-warping variants only; IC-STN, Lin & Lucey
2017): the same localisation net runs ``n`` times; iteration ``i`` sees the ORIGINAL
input warped by the transforms composed so far, and its prediction is composed with
them; the composition is always applied to the original input. ``iterations`` may be
raised at test time (``forward(x, iterations=3)``).

Convention:
    - A localisation net predicts ``theta`` ``[B, 2, 3]``: the sampling map of
      :func:`torch.nn.functional.affine_grid` (OUTPUT -> INPUT, normalised coordinates in
      ``[-1, 1]``, ``align_corners=False``), as in Jaderberg et al. 2015. The identity is
      ``[[1, 0, 0], [0, 1, 0]]``. Composing iteration ``i``'s ``theta_i`` after the
      earlier ones gives ``theta_1 @ theta_2 @ ... @ theta_n`` (3x3 products): the output
      pixel ``p`` reads the input at ``theta_1 theta_2 ... theta_n p``.
    - Warps go through the warp core: ``warp_affine(x, theta_to_pixel(theta, H, W))``,
      bilinear, zeros outside (``[0, 1]`` pixels: black; post-ReLU maps: no response).
    - ``output_size`` (input-warping variants): the warped input is ``H x H`` and then
      average-pooled by the integer factor ``H / output_size`` (60 -> 30 for the translated
      set, as in the paper); the classifier takes ``output_size``.
    - The localisation head's last linear layer starts with zero weights and the bias of
      the identity transform, so at initialisation every STN equals its classifier on the
      unwarped (for ``output_size``: pooled) input, up to float rounding.
    - Transform families (what the head predicts): ``affine`` (6 numbers, theta itself),
      ``rotation`` (angle ``a`` in radians: ``[[cos a, -sin a, 0], [sin a, cos a, 0]]``),
      ``similarity`` (``a, b, tx, ty``: ``[[a, -b, tx], [b, a, ty]]``) and
      ``translation_scale`` (``s, tx, ty``: ``[[s, 0, tx], [0, s, ty]]``).
    - Localisation heads as in the paper: for inputs of at most 32 px a 3-layer fully
      connected net (``hidden`` units, ReLU); for larger inputs two 5x5 convolutions
      (``conv_channels``) each with 2x2 max pooling and ReLU, then one linear layer.
      The head acts on what the localisation net sees (the input, or the map after
      block ``X``).

>>> import torch
>>> from invariscope.models import create_model
>>> net = create_model("simple-cnn")
>>> stn = build_stn(net, "SL1")
>>> x = torch.rand(2, 1, 28, 28)
>>> bool(torch.allclose(stn(x), net(x), atol=1e-5))
True
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.transforms import theta_to_pixel, warp_affine

__all__ = [
    "FAMILIES",
    "VARIANTS",
    "ArchSpec",
    "LocalisationHead",
    "SpatialTransformerNetwork",
    "build_stn",
    "compose_theta",
    "conv_blocks",
    "params_to_theta",
    "parse_arch",
    "warp_theta",
]

FAMILIES = ("affine", "rotation", "similarity", "translation_scale")
VARIANTS = ("C", "DL", "SL")
#: Inputs up to this many pixels get the fully connected localisation head.
FC_HEAD_MAX_SIZE = 32

_HEAD_TYPES = (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_IDENTITY = {
    "affine": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "rotation": (0.0,),
    "similarity": (1.0, 0.0, 0.0, 0.0),
    "translation_scale": (1.0, 0.0, 0.0),
}


# ------------------------------------------------------------------ architecture names


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture name: ``cnn``, ``C0``, ``C1``, ``DL1``, ``SL2``, ``SL1x2``.

    ``variant`` is ``None`` for the plain classifier (``cnn``), else ``C``, ``DL`` or
    ``SL``; ``depth`` is ``X``; ``iterations`` the number of ST iterations (suffix
    ``x<n>``, default 1).
    """

    name: str
    variant: str | None
    depth: int = 0
    iterations: int = 1

    @property
    def label(self) -> str:
        """How the paper writes it: ``CNN``, ``STN-C1``, ``STN-SL1 (2 it.)``."""
        if self.variant is None:
            return "CNN"
        base = f"STN-{self.variant}{self.depth}"
        return base if self.iterations == 1 else f"{base} ({self.iterations} it.)"

    @property
    def warps_input(self) -> bool:
        return self.variant is not None and (self.variant != "C" or self.depth == 0)


_ARCH = re.compile(r"^(C|DL|SL)(\d+)(?:X(\d+))?$")


def parse_arch(name: str, num_blocks: int | None = None) -> ArchSpec:
    """Parse ``cnn`` / ``C<X>`` / ``DL<X>`` / ``SL<X>`` with an optional ``x<n>`` iterations suffix.

    ``num_blocks`` (the classifier's number of conv blocks) bounds ``X``. Refuses
    unknown names, ``DL0``/``SL0`` (that is ``C0``), ``X`` beyond the blocks and
    iterations on a feature-map variant, with one line.
    """
    text = str(name).strip()
    if text.lower() == "cnn":
        return ArchSpec("cnn", None)
    m = _ARCH.match(text.upper())
    if not m:
        raise InvariscopeError(
            f"unknown architecture '{text}'; use cnn, C<X>, DL<X> or SL<X> (X = conv blocks "
            "before the transformer), optionally with x<n> iterations, e.g. C0,C1,DL1,SL1,SL1x2"
        )
    variant, depth = m.group(1), int(m.group(2))
    iterations = int(m.group(3)) if m.group(3) else 1
    if iterations < 1:
        raise InvariscopeError(f"architecture '{text}': iterations must be >= 1")
    if variant in ("DL", "SL") and depth == 0:
        raise InvariscopeError(
            f"architecture '{text}' has no layers to copy or share; that is C0, use C0"
        )
    if num_blocks is not None and depth > num_blocks:
        raise InvariscopeError(
            f"architecture '{text}': X={depth} is beyond the classifier's {num_blocks} conv "
            f"blocks; use X in 0..{num_blocks}"
        )
    if variant == "C" and depth > 0 and iterations > 1:
        raise InvariscopeError(
            f"architecture '{text}': iterations need a variant that warps the input "
            "(C0, DLX, SLX); CX warps a feature map"
        )
    canonical = f"{variant}{depth}" + (f"x{iterations}" if iterations > 1 else "")
    return ArchSpec(canonical, variant, depth, iterations)


# ----------------------------------------------------------------------- conv blocks


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def sequential_view(net: nn.Module, input_size: Sequence[int]) -> nn.Sequential | None:
    """``net`` as an ``nn.Sequential`` of its own modules, or None.

    A torchvision-style CNN whose forward runs its children in order (a ResNet's stem,
    ``layer1..4``, ``avgpool``, ``fc``; a ``features`` / ``avgpool`` / ``classifier``
    network: MobileNet, EfficientNet, VGG, ConvNeXt) is the chain of those children, the
    convolutional containers expanded into their stages and a ``Flatten`` (after a global
    average pool where the forward pools functionally) before the head. The chain shares the modules (no copy) and is
    accepted only when it gives the network's own logits on a random ``input_size``
    batch (eval mode), so an STN can be placed between its stages; networks whose forward
    does something else (a ViT's tokens) give None.
    """
    if isinstance(net, nn.Sequential):
        return net
    stages: list[nn.Module] = []
    for child in net.children():
        if isinstance(child, nn.Sequential) and _has_conv(child):
            stages.extend(child.children())
        else:
            stages.append(child)
    head = next(
        (
            i
            for i, m in enumerate(stages)
            if not _has_conv(m) and any(isinstance(k, nn.Linear) for k in m.modules())
        ),
        None,
    )
    candidates = [nn.Sequential(*stages)]
    if head is not None and not any(isinstance(m, nn.Flatten) for m in stages[:head]):
        body, top = stages[:head], stages[head:]
        candidates.insert(0, nn.Sequential(*body, nn.Flatten(1), *top))
        # a forward that pools functionally before its head (torchvision's MobileNetV2)
        candidates.append(nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *top))
    x = torch.rand(2, *input_size, generator=torch.Generator().manual_seed(0))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            try:
                reference = net(x)
            except Exception:
                return None
            for chain in candidates:
                try:
                    out = chain(x)
                except Exception:
                    continue
                if out.shape == reference.shape and torch.allclose(
                    out, reference, rtol=1e-5, atol=1e-6
                ):
                    return chain
    finally:
        net.train(was_training)
    return None


def as_chain(classifier: nn.Module) -> nn.Module:
    """``classifier`` with its ``net`` replaced by :func:`sequential_view` of it when the
    network is a verified chain of stages (in place; the modules are shared, so the
    weights are the same); unchanged otherwise. Its probe layers are renamed to the
    chain's (``net.4`` for a ResNet's ``layer1``)."""
    net = getattr(classifier, "net", None)
    if net is None or isinstance(net, nn.Sequential):
        return classifier
    view = sequential_view(net, classifier.input_size)
    if view is None:
        return classifier
    from invariscope.models.classifier import default_layer_names

    classifier.net = view
    classifier.layer_names = default_layer_names(view, "net.")
    return classifier


def conv_blocks(net: nn.Module) -> list[int]:
    """Child positions where the conv blocks of ``net`` END (exclusive), in order.

    ``net`` must be an ``nn.Sequential``. Block ``k`` (1-based) is ``net[start:end]``
    with ``end = conv_blocks(net)[k - 1]``; the stages before the first convolution
    belong to block 1. For ``simple-cnn``: ``[3, 6]``.
    """
    if not isinstance(net, nn.Sequential):
        raise InvariscopeError(
            f"an STN needs a network that runs a chain of stages (an nn.Sequential, or a "
            f"CNN whose forward runs its children in order), got {type(net).__name__}; "
            "C0 (a transformer on the input) works on any network"
        )
    children = list(net.children())
    ends: list[int] = []
    seen_conv = False
    for i, child in enumerate(children):
        if isinstance(child, _HEAD_TYPES):
            if seen_conv:
                ends.append(i)
            break
        if _has_conv(child):
            if seen_conv:
                ends.append(i)
            seen_conv = True
    return ends


# ------------------------------------------------------------------ transforms (theta)


def params_to_theta(params: torch.Tensor, family: str) -> torch.Tensor:
    """The head's numbers ``[B, k]`` -> ``theta`` ``[B, 2, 3]`` (see the module Convention)."""
    b = params.shape[0]
    if family == "affine":
        return params.view(b, 2, 3)
    zero = params.new_zeros(b)
    if family == "rotation":
        c, s = torch.cos(params[:, 0]), torch.sin(params[:, 0])
        rows = [c, -s, zero, s, c, zero]
    elif family == "similarity":
        a, s, tx, ty = params.unbind(1)
        rows = [a, -s, tx, s, a, ty]
    elif family == "translation_scale":
        s, tx, ty = params.unbind(1)
        rows = [s, zero, tx, zero, s, ty]
    else:
        raise InvariscopeError(f"unknown transform family '{family}'; use {', '.join(FAMILIES)}")
    return torch.stack(rows, dim=1).view(b, 2, 3)


def compose_theta(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """``first @ then`` as 3x3 matrices: the sampling map of warping by ``first`` and then
    warping the result by ``then`` (both ``[B, 2, 3]`` in the ``affine_grid`` convention)."""
    a = first[..., :2]
    return torch.cat([a @ then[..., :2], a @ then[..., 2:] + first[..., 2:]], dim=-1)


def warp_theta(
    x: torch.Tensor, theta: torch.Tensor, output_size: int | None = None
) -> torch.Tensor:
    """Warp ``x`` ``[B, C, H, W]`` by sampling maps ``theta`` ``[B, 2, 3]`` through the warp core.

    Bilinear, zeros outside. ``output_size`` (a divisor of ``H`` and ``W``): average-pool
    the warped map down to ``output_size x output_size``.
    """
    H, W = x.shape[-2:]
    out = warp_affine(x, theta_to_pixel(theta, H, W))
    if output_size is not None and output_size != H:
        out = F.avg_pool2d(out, kernel_size=H // output_size)
    return out


# ------------------------------------------------------------------ localisation nets


class LocalisationHead(nn.Module):
    """What follows the localisation body: features ``[B, *in_shape]`` -> ``theta`` ``[B, 2, 3]``.

    ``kind="fc"``: flatten -> linear(hidden) -> ReLU -> linear(hidden) -> ReLU -> linear(k);
    ``kind="conv"``: conv5x5(c) -> maxpool2 -> ReLU -> conv5x5(c) -> maxpool2 -> ReLU ->
    flatten -> linear(k). The last linear layer starts at the identity transform (zero
    weights, identity bias). ``k`` is the family's number of parameters.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        family: str = "affine",
        kind: str = "fc",
        hidden: int = 32,
        conv_channels: int = 20,
    ) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise InvariscopeError(
                f"unknown transform family '{family}'; use {', '.join(FAMILIES)}"
            )
        self.family = family
        identity = _IDENTITY[family]
        c, h, w = (tuple(in_shape) + (1, 1))[:3] if len(in_shape) < 3 else tuple(in_shape)
        if kind == "fc":
            self.body = nn.Sequential(
                nn.Flatten(),
                nn.Linear(c * h * w, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
            )
            features = hidden
        elif kind == "conv":
            if min(h, w) < 16:
                raise InvariscopeError(
                    f"the convolutional localisation head needs maps of >= 16 px, got {h}x{w}"
                )
            self.body = nn.Sequential(
                nn.Conv2d(c, conv_channels, 5),
                nn.MaxPool2d(2),
                nn.ReLU(),
                nn.Conv2d(conv_channels, conv_channels, 5),
                nn.MaxPool2d(2),
                nn.ReLU(),
                nn.Flatten(),
            )
            side_h, side_w = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
            features = conv_channels * side_h * side_w
        else:
            raise InvariscopeError(f"unknown localisation head '{kind}'; use fc or conv")
        self.kind = kind
        self.out = nn.Linear(features, len(identity))
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor(identity))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return params_to_theta(self.out(self.body(features)), self.family)


class SpatialTransformerNetwork(nn.Module):
    """An STN around ``classifier`` (see the module docstring for the variants).

    Args:
        classifier: a :class:`~invariscope.models.Classifier` whose ``net`` is an
            ``nn.Sequential`` (takes ``[0, 1]`` images; normalises them itself). For
            input-warping variants it must take ``output_size`` images (default: the
            input size).
        variant: ``"C"``, ``"DL"`` or ``"SL"``; depth: ``X`` (conv blocks before the ST).
        iterations: ST iterations (input-warping variants); family: transform family.
        input_size: ``(C, H, W)`` of the images the STN takes (default: the
            classifier's).
        output_size: side of the warped input the classifier sees (input-warping
            variants; a divisor of ``H``); default ``H``.
        head: ``"fc"`` or ``"conv"`` (default: ``fc`` for inputs up to 32 px).

    Shapes: ``forward``: ``[B, C, H, W]`` in ``[0, 1]`` -> logits ``[B, K]``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        variant: str = "C",
        depth: int = 0,
        *,
        iterations: int = 1,
        family: str = "affine",
        input_size: Sequence[int] | None = None,
        output_size: int | None = None,
        head: str | None = None,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise InvariscopeError(f"unknown STN variant '{variant}'; use {', '.join(VARIANTS)}")
        net = getattr(classifier, "net", None)
        ends = conv_blocks(net) if int(depth) > 0 else []  # C0 works on any network
        spec = parse_arch(
            f"{variant}{depth}" + (f"x{iterations}" if iterations > 1 else ""),
            len(ends) if int(depth) > 0 else None,
        )
        self.classifier = classifier
        self.variant, self.depth, self.iterations = variant, int(depth), int(iterations)
        self.family = family
        self.spec = spec
        self.split = ends[depth - 1] if depth > 0 else 0
        c, h, w = tuple(input_size) if input_size is not None else tuple(classifier.input_size)
        self.input_size = (int(c), int(h), int(w))
        self.output_size = int(output_size) if output_size is not None else h
        if spec.warps_input:
            if h % self.output_size or w % self.output_size or h != w:
                raise InvariscopeError(
                    f"output_size {self.output_size} must divide the square input {h}x{w}"
                )
            if tuple(classifier.input_size[1:]) != (self.output_size, self.output_size):
                raise InvariscopeError(
                    f"the classifier takes {list(classifier.input_size[1:])} images but the "
                    f"transformer outputs {self.output_size}x{self.output_size}"
                )
        elif self.output_size != h:
            raise InvariscopeError("output_size applies to variants that warp the input only")
        # the localisation body
        if variant == "DL":
            body = copy.deepcopy(nn.Sequential(*list(net.children())[: self.split]))
            for m in body.modules():
                if m is not body and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            self.loc_body: nn.Module | None = body
        else:
            self.loc_body = None  # C0: the input; CX / SLX: the classifier's own blocks
        kind = head or ("fc" if max(h, w) <= FC_HEAD_MAX_SIZE else "conv")
        with torch.no_grad():
            probe = torch.zeros(1, c, h, w)
            seen = self._loc_features(probe) if self.depth else probe
        self.head = LocalisationHead(tuple(seen.shape[1:]), family, kind, hidden=hidden)

    # -- pieces
    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.classifier
        return (x - cls.mean.view(1, -1, 1, 1)) / cls.std.view(1, -1, 1, 1)

    def _stages(self, start: int, stop: int | None, z: torch.Tensor) -> torch.Tensor:
        for stage in list(self.classifier.net.children())[start:stop]:
            z = stage(z)
        return z

    def _blocks(self, z: torch.Tensor) -> torch.Tensor:
        return self._stages(0, self.split, z)

    def _loc_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the localisation head sees for ``[0, 1]`` images ``x``."""
        z = self._normalise(x)
        if self.depth == 0:
            return z
        if self.variant == "DL":
            return self.loc_body(z)
        return self._blocks(z)

    def loc_parameters(self) -> list[nn.Parameter]:
        """The localisation net's own parameters (head, and DLX's copied blocks)."""
        params = list(self.head.parameters())
        if self.loc_body is not None:
            params += list(self.loc_body.parameters())
        return params

    # -- the transform
    def transform(self, x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """The (composed) sampling map ``theta`` ``[B, 2, 3]`` the STN applies for ``x``.

        Input-warping variants: ``theta_1 @ ... @ theta_n`` over ``iterations`` (default:
        the trained number). ``CX``: the map it applies to the feature map after block X.
        """
        n = self._iterations(iterations)
        theta = self.head(self._loc_features(x))
        for _ in range(n - 1):
            current = warp_theta(x, theta)
            theta = compose_theta(theta, self.head(self._loc_features(current)))
        return theta

    def _iterations(self, iterations: int | None) -> int:
        n = self.iterations if iterations is None else int(iterations)
        if n < 1:
            raise InvariscopeError(f"iterations must be >= 1, got {iterations}")
        if n > 1 and not self.spec.warps_input:
            raise InvariscopeError("iterations apply to variants that warp the input only")
        return n

    def warped_input(self, x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        """The image the classifier sees (input-warping variants), ``[B, C, s, s]``."""
        if not self.spec.warps_input:
            raise InvariscopeError(
                f"STN-{self.spec.name} warps a feature map, not the input; use transform()"
            )
        return warp_theta(x, self.transform(x, iterations), self.output_size)

    def forward(self, x: torch.Tensor, iterations: int | None = None) -> torch.Tensor:
        if self.spec.warps_input:
            return self.classifier(self.warped_input(x, iterations))
        self._iterations(iterations)
        self.classifier.check_input(x)
        f = self._blocks(self._normalise(x))
        theta = self.head(f)
        return self._stages(self.split, None, warp_theta(f, theta))


def build_stn(
    classifier: nn.Module,
    arch: str | ArchSpec,
    *,
    family: str = "affine",
    input_size: Sequence[int] | None = None,
    output_size: int | None = None,
    head: str | None = None,
) -> nn.Module:
    """``cnn`` -> ``classifier`` itself; ``C0``, ``C1``, ``DL1``, ``SL1x2``... -> a
    :class:`SpatialTransformerNetwork` around it (see :func:`parse_arch`)."""
    net = getattr(classifier, "net", None)
    if isinstance(arch, ArchSpec):
        spec = arch
    else:
        spec = parse_arch(arch)
        if spec.depth > 0:  # a transformer after block X: X must be within the blocks
            spec = parse_arch(arch, len(conv_blocks(net)))
    if spec.variant is None:
        return classifier
    return SpatialTransformerNetwork(
        classifier,
        spec.variant,
        spec.depth,
        iterations=spec.iterations,
        family=family,
        input_size=input_size,
        output_size=output_size if spec.warps_input else None,
        head=head,
    )
