"""Anti-aliasing remedies for subsampling layers, applied to any network.

CNNs subsample without low-pass filtering, so a 1-pixel shift of the input can change
the output a lot (Azulay & Weiss 2019). :func:`antialias` converts a trained network,
replacing every subsampling layer it finds (strided ``Conv2d``, ``MaxPool2d``,
``AvgPool2d``, nested anywhere) by an anti-aliased one, and keeps the weights:

============  ==================================================================  ==========
method        every subsampling layer (stride ``s > 1``) becomes                  paper
============  ==================================================================  ==========
``blurpool``  the same layer at stride 1, then :class:`BlurPool2d` (a binomial   Zhang 2019
              low-pass filter, then subsampling by ``s``); ``MaxPool2d`` gives
              Zhang's MaxBlurPool
``avgpool``   ``MaxPool2d(k, s)`` -> ``AvgPool2d(pool_size, s)`` with the same    Azulay &
              output size (2x2 max -> 6x6 average); strided convs are left alone  Weiss 2019
``aps``       the same layer at stride 1 with circular padding, then              Chaman &
              :class:`PolyphaseDown` (adaptive polyphase sampling); every padded  Dokmanic
              ``Conv2d`` pads circularly                                          2021
============  ==================================================================  ==========

BatchNorm, activations, linear layers and adaptive pools are untouched.

Notes:
    * blurpool on strided convs: Zhang places the blur after the ReLU that follows a
      strided conv (conv, ReLU, blur, subsample). A generic module swap cannot reach
      inside a block's ``forward``, so here the blur follows the conv itself (conv at
      stride 1, blur, subsample, then whatever the block does). A convolution and the
      blur are both linear and shift-invariant, so they commute (up to the borders):
      this is the strided conv applied to a low-pass filtered input, i.e. blur before
      subsampling.
    * blurpool on a max pool with ``ceil_mode=True``: the converted layer has the
      floor-mode output size, which may be one pixel smaller.
    * aps is exact: with circular padding and an input size divisible by the total
      stride, a circular shift of the input gives exactly a circular shift of every
      feature map, so a network that ends in global average pooling is exactly
      invariant to circular shifts. Two conditions: convolutions must keep the size
      (odd kernel ``k`` and padding ``(k - 1) / 2``, as in VGGs and ResNets), and the
      parallel branches of a residual block must subsample alike. For the second, within
      one forward pass every :class:`PolyphaseDown` reuses the phase that the first of
      them chose for a feature map of the same size, stride and batch size (as Chaman &
      Dokmanic's ResNet passes the main branch's phase to the shortcut). This pairs the
      branches of ResNet, DenseNet and Inception-style blocks; a network that subsamples
      twice from maps of one size along different paths (down, up, down again) would
      need its own wiring.

>>> from invariscope.models import create_model
>>> m = antialias(create_model("small-vgg", width=4), "blurpool")
>>> m.antialias["converted"]["max_pool"], type(m.net.pool1[1]).__name__
(3, 'BlurPool2d')
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from invariscope.errors import InvariscopeError, unknown_name

__all__ = [
    "ANTIALIAS_METHODS",
    "PADDING_MODES",
    "BlurPool2d",
    "PolyphaseDown",
    "antialias",
    "antialias_summary",
    "binomial_filter",
]

#: The conversions :func:`antialias` knows.
ANTIALIAS_METHODS = ("blurpool", "avgpool", "aps")
#: Padding modes of :class:`BlurPool2d` (``"reflect"`` is Zhang's).
PADDING_MODES = ("reflect", "circular", "zeros", "replicate")
#: Largest binomial filter (Zhang's sizes 1..7).
MAX_FILTER_SIZE = 7

M = TypeVar("M", bound=nn.Module)


def _check_filter_size(filter_size: Any) -> int:
    ok = isinstance(filter_size, int) and not isinstance(filter_size, bool)
    if not ok or not 1 <= filter_size <= MAX_FILTER_SIZE:
        raise InvariscopeError(
            f"filter_size must be an integer from 1 to {MAX_FILTER_SIZE} (1 = plain "
            f"subsampling, 4 = Zhang's default), got {filter_size!r}"
        )
    return filter_size


def _check_stride(stride: Any, what: str) -> tuple[int, int]:
    pair = tuple(_pair(stride))
    if len(pair) != 2 or not all(isinstance(s, int) and s >= 1 for s in pair):
        raise InvariscopeError(f"{what}: stride must be a positive integer, got {stride!r}")
    return pair  # type: ignore[return-value]


def binomial_filter(filter_size: int) -> torch.Tensor:
    """The normalised 2-D binomial filter ``outer(b, b) / sum`` with ``b`` a row of
    Pascal's triangle of length ``filter_size`` (1..7); float32 ``[f, f]``, sums to 1.

    Every entry is an integer over a power of two, so the float32 values are exact.

    >>> (binomial_filter(3) * 16).tolist()
    [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """
    f = _check_filter_size(filter_size)
    row = torch.tensor([math.comb(f - 1, i) for i in range(f)], dtype=torch.float64)
    kernel = torch.outer(row, row)
    return (kernel / kernel.sum()).to(torch.float32)


def _dense(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` in dense memory, channels-last if ``like`` is: later layers then compute
    exactly as they do on the output of the original layer (a strided view makes some
    reductions, e.g. adaptive average pooling, sum in another order)."""
    channels_last = not like.is_contiguous() and like.is_contiguous(
        memory_format=torch.channels_last
    )
    return y.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


class BlurPool2d(nn.Module):
    """Blur with a binomial filter, then subsample (Zhang 2019's BlurPool).

    A depthwise convolution with :func:`binomial_filter` (the buffer ``filter``
    ``[f, f]``, sums to 1) at stride ``stride``, after padding each side by
    ``(f - 1) // 2`` (left, top) and ``ceil((f - 1) / 2)`` (right, bottom) with
    ``padding`` (``"reflect"``, ``"circular"``, ``"zeros"``, ``"replicate"``). The
    filter is expanded to the input's channel count and cast to its dtype and device
    at each call, so the layer needs no channel count. ``filter_size=1`` is plain
    subsampling ``x[..., ::s, ::s]``.

    Shapes:
        ``[B, C, H, W]`` -> ``[B, C, ceil(H / s), ceil(W / s)]``.

    Raises:
        InvariscopeError: a bad ``filter_size`` / ``stride`` / ``padding``; in
            ``forward``, reflect padding wider than the feature map.
    """

    filter: torch.Tensor

    def __init__(self, filter_size: int = 4, stride: int | tuple[int, int] = 2, padding="reflect"):
        super().__init__()
        self.filter_size = _check_filter_size(filter_size)
        self.stride = _check_stride(stride, "BlurPool2d")
        if padding not in PADDING_MODES:
            raise unknown_name("padding mode", str(padding), PADDING_MODES)
        self.padding = padding
        self.register_buffer("filter", binomial_filter(self.filter_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur ``x`` ``[B, C, H, W]`` and subsample it by ``stride``."""
        sh, sw = self.stride
        f = self.filter_size
        if f == 1:
            return _dense(x[..., ::sh, ::sw], x)
        lo, hi = (f - 1) // 2, f // 2
        if self.padding in ("reflect", "circular") and min(x.shape[-2:]) <= hi:
            raise InvariscopeError(
                f"BlurPool2d: {self.padding} padding of {hi} needs feature maps larger than "
                f"{hi} pixels, got {x.shape[-2]}x{x.shape[-1]}; use a larger input or "
                "padding='replicate'"
            )
        mode = "constant" if self.padding == "zeros" else self.padding
        x = F.pad(x, (lo, hi, lo, hi), mode=mode)
        c = x.shape[1]
        weight = self.filter.to(device=x.device, dtype=x.dtype).expand(c, 1, f, f).contiguous()
        return F.conv2d(x, weight, stride=self.stride, groups=c)

    def extra_repr(self) -> str:
        return f"filter_size={self.filter_size}, stride={self.stride}, padding={self.padding!r}"


class _PhaseSharing:
    """The phases chosen during one forward pass, shared by a model's PolyphaseDowns.

    :func:`antialias` hooks :meth:`enter` / :meth:`leave` on every module that holds a
    :class:`PolyphaseDown`: the outermost call opens a pass and its end closes it, so
    choices never outlive the forward pass that made them, whichever module is called.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.choices: dict[tuple, torch.Tensor] = {}

    def enter(self, module: nn.Module, args: Any) -> None:
        self.depth += 1
        if self.depth == 1:
            self.choices.clear()

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.choices.clear()


class PolyphaseDown(nn.Module):
    """Adaptive polyphase sampling (Chaman & Dokmanic 2021): subsample by ``stride`` at
    the phase with the largest l2 norm.

    The map is split into its ``sh * sw`` polyphase components ``x[..., i::sh, j::sw]``;
    each image keeps the component with the largest l2 norm over ``C, H, W`` (ties: the
    first in row-major ``(i, j)`` order). A circular shift of the input permutes the
    components and shifts them circularly, so the output is a circular shift of the
    unshifted output: subsampling becomes shift-equivariant. Gradients flow through the
    kept component. Inside a model converted by :func:`antialias`, layers that subsample
    maps of the same size in one forward pass share the first one's choice (see the
    module docstring).

    Args:
        stride: ``s`` or ``(sh, sw)``.
        name: the layer's name in its model, for error messages.

    Shapes:
        ``[B, C, H, W]`` -> ``[B, C, H / sh, W / sw]``; ``H`` and ``W`` must be divisible.

    Raises:
        InvariscopeError: in ``forward``, a map size not divisible by the stride.
    """

    def __init__(self, stride: int | tuple[int, int] = 2, *, name: str | None = None):
        super().__init__()
        self.stride = _check_stride(stride, "PolyphaseDown")
        self.name = name
        self._sharing: _PhaseSharing | None = None

    def _phase(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        sh, sw = self.stride
        with torch.no_grad():
            energy = x.detach().float().square().sum(1)  # [B, H, W]
            energy = energy.reshape(b, h // sh, sh, w // sw, sw).sum((1, 3))  # [B, sh, sw]
            return energy.reshape(b, sh * sw).argmax(1)  # first maximum on ties

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Keep each image's strongest polyphase component of ``x`` ``[B, C, H, W]``."""
        sh, sw = self.stride
        b, c, h, w = x.shape
        if h % sh or w % sw:
            where = f" {self.name}" if self.name else ""
            raise InvariscopeError(
                f"adaptive polyphase sampling{where}: a {h}x{w} feature map is not divisible "
                f"by the stride {sh}x{sw}; use an input size divisible by the network's "
                "total stride (e.g. 32 for three stride-2 layers)"
            )
        if sh == sw == 1:
            return x
        sharing = self._sharing
        active = sharing is not None and sharing.depth > 0
        key = (h, w, sh, sw, b, x.device)
        phase = sharing.choices.get(key) if active else None  # type: ignore[union-attr]
        if phase is None:
            phase = self._phase(x)
            if active:
                sharing.choices[key] = phase  # type: ignore[union-attr]
        grid = x.reshape(b, c, h // sh, sh, w // sw, sw)
        batch = torch.arange(b, device=x.device)
        # advanced indices on dims 0, 3, 5 (not adjacent): the result is [B, C, h, w]
        return _dense(grid[batch, :, :, phase // sw, :, phase % sw], x)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class _PaddedAvgPool2d(nn.Module):
    """Average pooling with explicit, possibly asymmetric, padding that is not counted.

    ``pads = (left, right, top, bottom)``; the mean is over the pixels inside the input
    only (as ``AvgPool2d(count_include_pad=False)``).
    """

    def __init__(self, kernel_size, stride, pads: tuple[int, int, int, int], ceil_mode=False):
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.pads = tuple(int(p) for p in pads)
        self.ceil_mode = bool(ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        pool = [self.kernel_size, self.stride, 0, self.ceil_mode]
        total = F.avg_pool2d(F.pad(x, self.pads), *pool)
        count = F.avg_pool2d(F.pad(ones, self.pads), *pool)
        return total / count

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, pads={self.pads}"


# ---------------------------------------------------------------------- conversion
def _subsamples(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        return max(_pair(m.stride)) > 1
    return False


def _extent(kernel, dilation=1) -> tuple[int, int]:
    """Receptive extent ``d (k - 1) + 1`` per axis."""
    k, d = _pair(kernel), _pair(dilation)
    return (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)


def _circular_pads(name: str, extent: tuple[int, int], padding) -> tuple[int, int, int, int]:
    """F.pad sizes ``(left, right, top, bottom)`` that keep the size at stride 1."""
    ph, pw = _pair(padding)
    lo_hi = []
    for p, e in ((pw, extent[1]), (ph, extent[0])):
        if p > e - 1:
            raise InvariscopeError(
                f"{name} pads {p} pixels, more than its kernel spans ({e}); adaptive "
                "polyphase sampling needs padding <= kernel - 1"
            )
        lo_hi += [p, e - 1 - p]
    return tuple(lo_hi)  # type: ignore[return-value]


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        e = _extent(conv.kernel_size, conv.dilation)  # "same" (stride 1 only)
        return ((e[0] - 1) // 2, (e[1] - 1) // 2)
    return _pair(conv.padding)  # type: ignore[return-value]


def _set_conv_padding(conv: nn.Conv2d, padding: tuple[int, int]) -> None:
    conv.padding = padding
    conv._reversed_padding_repeated_twice = (padding[1], padding[1], padding[0], padding[0])


def _blurpool(name, m, filter_size, padding, counts):
    stride = _pair(m.stride)
    blur = BlurPool2d(filter_size, stride, padding)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise InvariscopeError(
                f"{name} returns pooling indices (for an unpooling layer), which an "
                "anti-aliased pool cannot; convert the network without it"
            )
        counts["max_pool"] += 1
    elif isinstance(m, nn.AvgPool2d):
        counts["avg_pool"] += 1
    else:
        counts["strided_conv"] += 1
    m.stride = (1, 1) if isinstance(m, nn.Conv2d) else 1
    return nn.Sequential(m, blur)


def _avgpool(name, m, pool_size, counts):
    extent = _extent(m.kernel_size, m.dilation)
    if pool_size < max(extent):
        raise InvariscopeError(
            f"pool_size {pool_size} is smaller than the {extent[0]}x{extent[1]} kernel of "
            f"max pool {name}; use pool_size >= {max(extent)} (the paper uses 6 for 2x2)"
        )
    stride = _pair(m.stride)
    ph, pw = _pair(m.padding)
    pads = []
    for p, e in ((pw, extent[1]), (ph, extent[0])):
        extra = pool_size - e
        pads += [extra // 2 + p, extra - extra // 2 + p]
    if pads[0] == pads[1] and pads[2] == pads[3]:
        new: nn.Module = nn.AvgPool2d(
            pool_size,
            stride=stride,
            padding=(pads[2], pads[0]),
            ceil_mode=m.ceil_mode,
            count_include_pad=False,
        )
    else:
        new = _PaddedAvgPool2d(pool_size, stride, tuple(pads), m.ceil_mode)
    probe = torch.zeros(1, 1, 2 * pool_size + 1, 2 * pool_size + 2)
    want, got = m(probe).shape[-2:], new(probe).shape[-2:]
    if want != got:
        raise InvariscopeError(
            f"average pooling of size {pool_size} cannot match the output size of max pool "
            f"{name} ({list(want)} vs {list(got)} on a probe); try another pool_size"
        )
    counts["max_pool"] += 1
    return new


def _aps(name, m, counts):
    stride = _pair(m.stride)
    down = PolyphaseDown(stride, name=name)
    if isinstance(m, nn.Conv2d):
        counts["strided_conv"] += 1
        padding = _conv_padding(m)
        extent = _extent(m.kernel_size, m.dilation)
        pads = _circular_pads(name, extent, padding)
        m.stride = (1, 1)
        if pads[0] == pads[1] and pads[2] == pads[3]:  # "same" padding: pad circularly
            if any(pads):
                m.padding_mode = "circular"
                counts["circular_conv"] += 1
            return nn.Sequential(m, down)
        _set_conv_padding(m, (0, 0))
        m.padding_mode = "zeros"
        counts["circular_conv"] += 1
        return nn.Sequential(nn.CircularPad2d(pads), m, down)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise InvariscopeError(
                f"{name} returns pooling indices (for an unpooling layer), which an "
                "anti-aliased pool cannot; convert the network without it"
            )
        counts["max_pool"] += 1
        pads = _circular_pads(name, _extent(m.kernel_size, m.dilation), m.padding)
    else:
        counts["avg_pool"] += 1
        pads = _circular_pads(name, _extent(m.kernel_size), m.padding)
    m.stride, m.padding, m.ceil_mode = 1, 0, False
    layers = ([nn.CircularPad2d(pads)] if any(pads) else []) + [m, down]
    return nn.Sequential(*layers)


def _device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of ``module``'s first parameter or buffer, else ``default`` (or CPU)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")


def antialias(
    model: M,
    method: str = "blurpool",
    *,
    filter_size: int = 4,
    pool_size: int = 6,
    padding: str = "reflect",
) -> M:
    """An anti-aliased copy of ``model``; ``model`` itself is left untouched.

    Every subsampling module found by walking ``named_modules`` (strided ``Conv2d``,
    ``MaxPool2d`` and ``AvgPool2d`` with stride > 1, nested anywhere, shared ones
    everywhere they appear) is replaced as ``method`` says (see the module docstring);
    for ``aps`` every padded ``Conv2d`` also pads circularly. Weights and buffers are
    kept, the module paths of the replaced layers stay valid (they now name a small
    ``nn.Sequential``), and a :class:`~invariscope.models.Classifier` keeps its
    preprocessing, class names, ``arch`` and ``arch_kwargs``.

    The conversion is recorded on the returned model as ``model.antialias``:
    ``{"method", "filter_size", "pool_size", "padding", "converted": {"max_pool",
    "avg_pool", "strided_conv", "circular_conv"}, "layers": [names]}``; checkpoints
    store it and :func:`~invariscope.models.load_checkpoint` re-applies it. The first
    four also go into the ``state_dict``, as the JSON bytes of the uint8 buffer
    ``antialias_spec`` of the returned model, so that a fingerprint of the
    ``state_dict`` (a run's model identity) tells a converted model from its original
    even when no weight changed (aps; avgpool on a network without strided convs).

    Args:
        model: any ``nn.Module`` (a Classifier or a plain network).
        method: ``"blurpool"`` (Zhang 2019), ``"avgpool"`` (Azulay & Weiss 2019) or
            ``"aps"`` (Chaman & Dokmanic 2021).
        filter_size: blurpool's binomial filter size, 1..7 (1 = no blur).
        pool_size: avgpool's average-pool size, at least each max pool's kernel.
        padding: blurpool's padding mode: ``"reflect"`` (Zhang's), ``"circular"``,
            ``"zeros"`` or ``"replicate"``.

    Returns:
        The converted copy, of the same type, in the same training mode and on the
        same device.

    Raises:
        InvariscopeError: unknown method or padding, ``filter_size`` outside 1..7, a
            ``pool_size`` smaller than a max pool's kernel, a model already converted,
            a TorchScript model, or a model with no subsampling layer to convert.

    Shapes:
        As ``model``; for ``aps`` every subsampled feature map must have a size
        divisible by the stride (an input size divisible by the total stride).
    """
    if method not in ANTIALIAS_METHODS:
        raise unknown_name("anti-aliasing method", str(method), ANTIALIAS_METHODS)
    _check_filter_size(filter_size)
    if padding not in PADDING_MODES:
        raise unknown_name("padding mode", str(padding), PADDING_MODES)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
        raise InvariscopeError(f"pool_size must be a positive integer, got {pool_size!r}")
    if not isinstance(model, nn.Module):
        raise InvariscopeError(f"antialias needs a torch.nn.Module, got {type(model).__name__}")
    previous = getattr(model, "antialias", None)
    if isinstance(previous, Mapping):
        raise InvariscopeError(
            f"the model is already anti-aliased ({previous.get('method')}); convert the "
            "original model instead"
        )
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        raise InvariscopeError(
            "TorchScript models cannot be converted; load the architecture with its "
            "weights file instead (load_model(ARCH, weights=FILE))"
        )

    out = copy.deepcopy(model)
    parents = list(out.modules())  # before any replacement is built
    counts = {"max_pool": 0, "avg_pool": 0, "strided_conv": 0, "circular_conv": 0}
    replaced: dict[int, nn.Module] = {}
    names: list[str] = []
    for name, m in out.named_modules():
        label = name or type(m).__name__
        if method == "aps" and isinstance(m, nn.Conv2d) and not _subsamples(m):
            if any(_conv_padding(m)):
                m.padding_mode = "circular"
                counts["circular_conv"] += 1
            continue
        if not _subsamples(m):
            continue
        if method == "blurpool":
            new = _blurpool(label, m, filter_size, padding, counts)
        elif method == "avgpool":
            if not isinstance(m, nn.MaxPool2d):
                continue  # Azulay & Weiss's remedy replaces max pools only
            new = _avgpool(label, m, pool_size, counts)
        else:
            new = _aps(label, m, counts)
        device = _device(m, _device(model))
        for sub in new.modules():  # the new wrappers and filters: m's device and mode
            if sub is not m:
                sub.to(device)
                sub.training = m.training
        replaced[id(m)] = new
        names.append(name)
    if not replaced:
        what = type(model).__name__
        if method == "avgpool" and any(_subsamples(m) for m in model.modules()):
            raise InvariscopeError(
                f"{what} has no max-pool layer with stride > 1, and method 'avgpool' "
                "leaves strided convs alone; use method 'blurpool' or 'aps'"
            )
        raise InvariscopeError(
            f"{what} has no subsampling layer (strided conv or pool) to anti-alias; "
            "nothing to convert"
        )
    for parent in parents:
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in replaced:
                parent._modules[child_name] = replaced[id(child)]
    if id(out) in replaced:  # the model is itself one subsampling layer
        out = replaced[id(out)]  # type: ignore[assignment]
    if method == "aps":
        _share_phases(out)
    spec = {
        "method": method,
        "filter_size": int(filter_size),
        "pool_size": int(pool_size),
        "padding": padding,
    }
    # The conversion goes into the state_dict too, so fingerprints of the state_dict tell
    # a converted model from its original even where no weight changed (aps, avgpool).
    code = json.dumps(spec, sort_keys=True).encode()
    spec_buffer = torch.tensor(list(code), dtype=torch.uint8, device=_device(model))
    out.register_buffer("antialias_spec", spec_buffer)
    out.antialias = {**spec, "converted": counts, "layers": names}  # type: ignore[assignment]
    return out


def _share_phases(model: nn.Module) -> None:
    """Give every PolyphaseDown of ``model`` one :class:`_PhaseSharing`, opened and
    closed by hooks on every module that holds one."""
    sharing = _PhaseSharing()
    holders: dict[int, nn.Module] = {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if isinstance(m, PolyphaseDown):
            m._sharing = sharing
            parts = name.split(".") if name else []
            for i in range(len(parts)):
                holder = modules[".".join(parts[:i])]
                holders[id(holder)] = holder
    for holder in holders.values():
        holder.register_forward_pre_hook(sharing.enter)
        holder.register_forward_hook(sharing.leave, always_call=True)


def antialias_summary(info: Mapping[str, Any]) -> str:
    """One line saying what :func:`antialias` converted, from ``model.antialias``.

    >>> antialias_summary({"method": "blurpool", "filter_size": 4, "padding": "reflect",
    ...                    "converted": {"max_pool": 3, "avg_pool": 0, "strided_conv": 0}})
    '3 max-pool, 0 strided conv -> blurpool(4)'
    """
    method = info.get("method")
    n = dict(info.get("converted") or {})
    parts = [f"{n.get('max_pool', 0)} max-pool"]
    if n.get("avg_pool"):
        parts.append(f"{n['avg_pool']} avg-pool")
    if method == "avgpool":
        return f"{', '.join(parts)} -> avgpool({info.get('pool_size')})"
    parts.append(f"{n.get('strided_conv', 0)} strided conv")
    if method == "aps":
        parts.append(f"{n.get('circular_conv', 0)} circular-padded conv")
        return f"{', '.join(parts)} -> aps"
    pad = info.get("padding", "reflect")
    size = f"{info.get('filter_size')}" + ("" if pad == "reflect" else f", {pad}")
    return f"{', '.join(parts)} -> blurpool({size})"
