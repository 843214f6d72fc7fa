"""Where every layer's feature positions sit on the image, for any network.

A convolutional feature map is a grid laid on the image: position ``j`` of a layer sits at
``o + s j`` (image pixel coordinates, origin at the centre of the top-left pixel), with
stride ``s`` and offset ``o`` (the centre of the receptive field of position 0). The
alignment check (Jansson et al.), the equivariance maps (Lenc & Vedaldi) and the
per-layer Lie derivative need that grid to act on feature maps with the transformation
that acts on the image.

:func:`trace_geometry` finds the grid of every layer of ANY PyTorch network by running one
forward pass under a :class:`torch.overrides.TorchFunctionMode` that follows the grid
through every torch operation, not through the module tree:

* ``conv2d`` and ``max_pool2d`` / ``avg_pool2d`` (and so ``nn.Conv2d``, ``nn.MaxPool2d``,
  BlurPool, depthwise and dilated convolutions) move the grid: kernel ``k``, stride ``t``,
  padding ``p``, dilation ``d`` give ``s' = s t``, ``o' = o + s (d (k - 1) / 2 - p)``;
* ``pad`` (static "same" padding, as in TF-ported EfficientNets) shifts the offset;
* an adaptive pool whose output size divides its input size is an average pool; to the
  same size it is the identity; any other (a global pool) ends the grid;
* ``permute``, ``transpose``, ``flatten``, ``reshape``/``view``, ``unflatten``, ``cat``
  and slicing follow where the two spatial axes are, including into a token sequence
  ``[B, N, D]`` (a ViT's patch tokens: ``flatten(2).transpose(1, 2)``, a class token
  concatenated in front, ``x[:, 1:]``);
* any other operation (activations, normalisations, linear layers on the channel axis,
  residual additions, squeeze-excitation products, attention with its residual add)
  keeps the grid of an input whose spatial extent the output keeps: element-wise,
  broadcast and channel-wise operations do not move positions.

Each module call's output is recorded, so ``layer1.0.relu:1`` (the second call of a
reused module) has a geometry of its own. On ``nn.Sequential`` networks this is exactly
the receptive-field walk of the sequential nets (tests check the hand-computed values).

Limits: attention mixes all positions, so a token's receptive field (``rf``) is the
patch's; ``interior`` (positions computed without any padding) is exact for padding by
convolutions, pools and ``pad``. Strided slicing of a map, ``roll``, ``flip`` inside the
network, and resampling to another size end the grid (the layer gets ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from invariscope.models.capture import resolve_layer
from invariscope.models.classifier import Classifier

__all__ = [
    "FeatureGrid",
    "GeometryTrace",
    "LayerGeometry",
    "Layout",
    "from_map",
    "to_map",
    "trace_geometry",
]


@dataclass(frozen=True)
class FeatureGrid:
    """Where a layer's feature positions sit on the (canvas) image, per axis ``(y, x)``.

    Attributes:
        stride: image pixels per feature pixel ``(s_y, s_x)``.
        offset: image coordinates ``(o_y, o_x)`` of feature position ``(0, 0)`` (pixel
            coordinates: origin at the centre of the top-left pixel); feature index ``j``
            sits at ``o + s j``, the centre of its receptive field.
        rf: receptive-field half-extent ``(r_y, r_x)`` in image pixels (taps reach
            ``o + s j +- r``).
        size: the map's ``(h, w)`` on an image of the size it was computed for.
        interior: ``((y_lo, y_hi), (x_lo, x_hi))``: the feature indices computed without
            any padding of the network (empty when ``lo > hi``).
    """

    stride: tuple[float, float]
    offset: tuple[float, float]
    rf: tuple[float, float]
    size: tuple[int, int]
    interior: tuple[tuple[int, int], tuple[int, int]]

    def matrix(self) -> torch.Tensor:
        """``G`` [3, 3] (float64): feature pixel coordinates ``(x, y, 1)`` -> image ones."""
        (sy, sx), (oy, ox) = self.stride, self.offset
        return torch.tensor([[sx, 0.0, ox], [0.0, sy, oy], [0.0, 0.0, 1.0]], dtype=torch.float64)

    @property
    def empty(self) -> bool:
        return any(lo > hi for lo, hi in self.interior)


@dataclass(frozen=True)
class Layout:
    """Where the grid's two axes are in a tensor.

    ``kind == "map"``: ``dims = (y_dim, x_dim)`` (``(2, 3)`` for ``[B, C, H, W]``,
    ``(1, 2)`` channels-last). ``kind == "tokens"``: ``dims = (t_dim,)``, the grid's
    ``h * w`` positions in row-major order from index ``start`` of that axis (a ViT's
    ``[B, 1 + h w, D]`` has ``t_dim = 1``, ``start = 1``).
    """

    kind: str
    dims: tuple[int, ...]
    start: int = 0

    @property
    def is_standard_map(self) -> bool:
        return self.kind == "map" and self.dims == (2, 3)


@dataclass(frozen=True)
class LayerGeometry:
    """A layer output's grid on the image and where it lies in the tensor."""

    grid: FeatureGrid
    layout: Layout


def to_map(x: torch.Tensor, layout: Layout, size: tuple[int, int]) -> torch.Tensor:
    """The layer output ``x`` as a ``[B, C, h, w]`` map (a view where possible).

    Maps are permuted so the grid axes come last (all other axes but the batch are
    flattened into channels); tokens are cut to the ``h * w`` grid tokens and folded.
    """
    h, w = int(size[0]), int(size[1])
    if layout.kind == "map":
        y, x_dim = layout.dims
        rest = [d for d in range(1, x.dim()) if d not in (y, x_dim)]
        out = x.permute(0, *rest, y, x_dim)
        return out.reshape(x.shape[0], -1, h, w)
    (t,) = layout.dims
    tokens = x.narrow(t, layout.start, h * w)
    rest = [d for d in range(1, x.dim()) if d != t]
    out = tokens.permute(0, *rest, t)
    return out.reshape(x.shape[0], -1, h, w)


def from_map(fmap: torch.Tensor, layout: Layout, like: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_map`: ``fmap`` ``[B, C, h, w]`` put back into the layout of
    ``like`` (the layer's own output); tokens outside the grid (a class token) are taken
    from ``like``. Differentiable in ``fmap``."""
    h, w = int(fmap.shape[-2]), int(fmap.shape[-1])
    B = int(like.shape[0])
    if layout.kind == "map":
        y, x_dim = layout.dims
        rest = [d for d in range(1, like.dim()) if d not in (y, x_dim)]
        order = [0, *rest, y, x_dim]
        shaped = fmap.reshape(B, *[like.shape[d] for d in rest], h, w)
        return shaped.permute(*[order.index(d) for d in range(like.dim())])
    (t,) = layout.dims
    rest = [d for d in range(1, like.dim()) if d != t]
    order = [0, *rest, t]
    tokens = fmap.reshape(B, *[like.shape[d] for d in rest], h * w)
    tokens = tokens.permute(*[order.index(d) for d in range(like.dim())]).to(like.dtype)
    n = int(like.shape[t])
    pieces = [like.narrow(t, 0, layout.start), tokens]
    end = layout.start + h * w
    if end < n:
        pieces.append(like.narrow(t, end, n - end))
    return torch.cat(pieces, dim=t)


# --------------------------------------------------------------------------- the rules


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _window_grid(
    g: FeatureGrid,
    k: tuple[int, int],
    t: tuple[int, int],
    p: tuple[int, int],
    d: tuple[int, int],
    ceil_mode: bool,
    out_size: tuple[int, int],
) -> FeatureGrid:
    stride, offset, rf, interior = [], [], [], []
    for a in range(2):
        span = d[a] * (k[a] - 1)
        stride.append(g.stride[a] * t[a])
        offset.append(g.offset[a] + g.stride[a] * (span / 2.0 - p[a]))
        rf.append(g.rf[a] + g.stride[a] * span / 2.0)
        lo_in, hi_in = g.interior[a]
        lo = max(0, -(-(lo_in + p[a]) // t[a]))
        hi = min(int(out_size[a]) - 1, (hi_in + p[a] - span) // t[a])
        interior.append((int(lo), int(hi)))
    return FeatureGrid(
        tuple(stride), tuple(offset), tuple(rf), tuple(int(s) for s in out_size), tuple(interior)
    )


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _norm(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _spatial_sizes(x: torch.Tensor, lay: Layout) -> tuple[int, ...]:
    return tuple(int(x.shape[d]) for d in lay.dims)


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.geo: dict[int, LayerGeometry] = {}
        self._alive: list[torch.Tensor] = []

    # bookkeeping ---------------------------------------------------------------
    def get(self, x: Any) -> LayerGeometry | None:
        if isinstance(x, torch.Tensor):
            return self.geo.get(id(x))
        return None

    def set(self, x: Any, geo: LayerGeometry | None) -> None:
        if isinstance(x, torch.Tensor):
            if geo is None:
                self.geo.pop(id(x), None)
            else:
                self.geo[id(x)] = geo
                self._alive.append(x)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._propagate(func, args, kwargs, out)
        except Exception:  # a rule that does not understand its arguments: no grid
            for o in out if isinstance(out, (tuple, list)) else (out,):
                self.set(o, None)
        return out

    # rules ---------------------------------------------------------------------
    def _propagate(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor):
            if name in ("__set__", "__get__"):
                return
            self.set(out, self._rule(name, args, kwargs, out))
        elif (
            isinstance(out, (tuple, list))
            and out
            and all(isinstance(o, torch.Tensor) or o is None for o in out)
        ):
            if name in ("chunk", "split", "unbind", "split_with_sizes", "tensor_split"):
                for o in out:
                    self.set(o, None if o is None else self._default(args, kwargs, o))
            elif isinstance(out[0], torch.Tensor):  # attention: (output, weights)
                self.set(out[0], self._default(args, kwargs, out[0]))

    def _rule(self, name: str, args, kwargs, out: torch.Tensor) -> LayerGeometry | None:
        x = args[0] if args else None
        gx = self.get(x)
        if name in ("conv2d", "_conv_forward"):
            return self._conv(args, kwargs, gx, out)
        if name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices", "avg_pool2d"):
            return self._pool(name, args, kwargs, gx, out)
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d"):
            return self._adaptive(gx, x, out)
        if name in ("pad", "_pad", "constant_pad_nd"):
            return self._pad(args, kwargs, gx, x, out)
        if name in ("interpolate", "upsample", "grid_sample", "roll", "flip", "fliplr", "flipud"):
            return None
        if name in ("permute",):
            return self._permute(args, gx, x, out)
        if name in ("transpose", "swapaxes", "swapdims"):
            return self._transpose(args, gx, x, out)
        if name in ("movedim", "moveaxis"):
            return self._movedim(args, gx, x, out)
        if name == "flatten":
            return self._flatten(args, kwargs, gx, x, out)
        if name in ("reshape", "view", "unflatten"):
            return self._reshape(gx, x, out)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(args, kwargs, out)
        if name == "__getitem__":
            return self._getitem(args, gx, x, out)
        if name in ("unsqueeze", "squeeze"):
            return self._reshape(gx, x, out)
        return self._default(args, kwargs, out)

    def _default(self, args, kwargs, out: torch.Tensor) -> LayerGeometry | None:
        """Keep the grid of a tensor input whose spatial axes the output keeps."""
        found: LayerGeometry | None = None
        for a in _tensors(args, kwargs):
            g = self.get(a)
            if g is None or a.dim() != out.dim():
                continue
            if any(d >= out.dim() for d in g.layout.dims):
                continue
            if _spatial_sizes(a, g.layout) != _spatial_sizes(out, g.layout):
                continue
            if (
                g.layout.kind == "tokens"
                and a.shape[g.layout.dims[0]] != out.shape[g.layout.dims[0]]
            ):
                continue
            if found is None:
                found = g
            elif found.grid.stride == g.grid.stride and found.grid.offset == g.grid.offset:
                found = _intersect(found, g)
        return found

    def _conv(self, args, kwargs, gx, out) -> LayerGeometry | None:
        if gx is None or not gx.layout.is_standard_map or out.dim() != 4:
            return None
        weight = _arg(args, kwargs, 1, "weight", None)
        k = (int(weight.shape[-2]), int(weight.shape[-1]))
        t = _pair(_arg(args, kwargs, 3, "stride", 1))
        d = _pair(_arg(args, kwargs, 5, "dilation", 1))
        pad = _arg(args, kwargs, 4, "padding", 0)
        if pad == "valid":
            p = (0, 0)
        elif pad == "same":
            p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        else:
            p = _pair(pad)
        grid = _window_grid(gx.grid, k, t, p, d, False, (out.shape[2], out.shape[3]))
        return LayerGeometry(grid, gx.layout)

    def _pool(self, name, args, kwargs, gx, out) -> LayerGeometry | None:
        if gx is None or not gx.layout.is_standard_map or out.dim() != 4:
            return None
        k = _pair(_arg(args, kwargs, 1, "kernel_size", None))
        stride = _arg(args, kwargs, 2, "stride", None)
        t = k if stride in (None, (), []) else _pair(stride)
        p = _pair(_arg(args, kwargs, 3, "padding", 0))
        if name == "avg_pool2d":
            d = (1, 1)
            ceil = bool(_arg(args, kwargs, 4, "ceil_mode", False))
        else:
            d = _pair(_arg(args, kwargs, 4, "dilation", 1))
            ceil = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        grid = _window_grid(gx.grid, k, t, p, d, ceil, (out.shape[2], out.shape[3]))
        return LayerGeometry(grid, gx.layout)

    def _adaptive(self, gx, x, out) -> LayerGeometry | None:
        if gx is None or not gx.layout.is_standard_map or out.dim() != 4:
            return None
        (h, w), (oh, ow) = tuple(x.shape[2:]), tuple(out.shape[2:])
        if (h, w) == (oh, ow):
            return gx
        if oh <= 1 and ow <= 1:
            return None  # a global pool: no grid left
        if h % oh or w % ow:
            return None
        k = (h // oh, w // ow)
        return LayerGeometry(
            _window_grid(gx.grid, k, k, (0, 0), (1, 1), False, (oh, ow)), gx.layout
        )

    def _pad(self, args, kwargs, gx, x, out) -> LayerGeometry | None:
        if gx is None or not gx.layout.is_standard_map or out.dim() != 4:
            return None
        pad = [int(v) for v in _arg(args, kwargs, 1, "pad", ())]
        pad = pad + [0] * (4 - len(pad))
        left, right, top, bottom = pad[:4]
        if len(pad) > 4 and any(pad[4:]):
            return None
        g = gx.grid
        lo_pad = (top, left)
        offset = tuple(g.offset[a] - g.stride[a] * lo_pad[a] for a in range(2))
        size = (int(out.shape[2]), int(out.shape[3]))
        interior = tuple(
            (max(0, g.interior[a][0] + lo_pad[a]), min(size[a] - 1, g.interior[a][1] + lo_pad[a]))
            for a in range(2)
        )
        return LayerGeometry(replace(g, offset=offset, size=size, interior=interior), gx.layout)

    def _permute(self, args, gx, x, out) -> LayerGeometry | None:
        if gx is None:
            return None
        dims = args[1:]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
            dims = tuple(dims[0])
        dims = [_norm(int(d), x.dim()) for d in dims]
        new = tuple(dims.index(d) for d in gx.layout.dims)
        return LayerGeometry(gx.grid, replace(gx.layout, dims=new))

    def _transpose(self, args, gx, x, out) -> LayerGeometry | None:
        if gx is None:
            return None
        a, b = _norm(int(args[1]), x.dim()), _norm(int(args[2]), x.dim())
        swap = {a: b, b: a}
        new = tuple(swap.get(d, d) for d in gx.layout.dims)
        return LayerGeometry(gx.grid, replace(gx.layout, dims=new))

    def _movedim(self, args, gx, x, out) -> LayerGeometry | None:
        if gx is None:
            return None
        src, dst = args[1], args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [None] * x.dim()
        src = [_norm(s, x.dim()) for s in src]
        dst = [_norm(d, x.dim()) for d in dst]
        for s, d in zip(src, dst, strict=True):
            order[d] = s
        rest = iter(i for i in range(x.dim()) if i not in src)
        order = [o if o is not None else next(rest) for o in order]
        new = tuple(order.index(d) for d in gx.layout.dims)
        return LayerGeometry(gx.grid, replace(gx.layout, dims=new))

    def _flatten(self, args, kwargs, gx, x, out) -> LayerGeometry | None:
        if gx is None or gx.layout.kind != "map":
            return self._reshape(gx, x, out)
        start = _norm(int(_arg(args, kwargs, 1, "start_dim", 0)), x.dim())
        end = _norm(int(_arg(args, kwargs, 2, "end_dim", -1)), x.dim())
        y, xd = gx.layout.dims
        if (start, end) == (y, xd) and xd == y + 1:
            return LayerGeometry(gx.grid, Layout("tokens", (y,), 0))
        if end < min(y, xd):  # flattening axes before the grid: shift its axes
            shift = end - start
            return LayerGeometry(gx.grid, replace(gx.layout, dims=(y - shift, xd - shift)))
        if start > max(y, xd):
            return gx
        return None

    def _reshape(self, gx, x, out) -> LayerGeometry | None:
        if gx is None:
            return None
        xs, os_ = list(x.shape), list(out.shape)
        if xs == os_:
            return gx
        h, w = gx.grid.size
        lay = gx.layout
        if lay.kind == "map":
            y, xd = lay.dims
            if xd == y + 1:
                # [..., h, w, ...] -> [..., h*w, ...]: a token axis
                if os_ == xs[:y] + [h * w] + xs[xd + 1 :]:
                    return LayerGeometry(gx.grid, Layout("tokens", (y,), 0))
            # squeeze / unsqueeze of other axes: find h, w at consecutive positions
            return _find_map(gx, xs, os_)
        (t,) = lay.dims
        n = xs[t]
        if lay.start == 0 and n == h * w and os_ == xs[:t] + [h, w] + xs[t + 1 :]:
            return LayerGeometry(gx.grid, Layout("map", (t, t + 1)))
        # unsqueeze/squeeze of other axes keeping the token axis
        others_in = [s for i, s in enumerate(xs) if i != t and s != 1]
        if os_.count(n) == 1 and [s for s in os_ if s != 1 and s != n] == others_in:
            return LayerGeometry(gx.grid, replace(lay, dims=(os_.index(n),)))
        return None

    def _cat(self, args, kwargs, out) -> LayerGeometry | None:
        tensors = list(_arg(args, kwargs, 0, "tensors", ()))
        dim = _norm(int(_arg(args, kwargs, 1, "dim", 0)), out.dim())
        found: LayerGeometry | None = None
        before = 0
        for a in tensors:
            g = self.get(a)
            if g is not None:
                if dim in g.layout.dims:
                    if g.layout.kind != "tokens" or found is not None:
                        return None
                    found = LayerGeometry(g.grid, replace(g.layout, start=g.layout.start + before))
                elif found is None:
                    found = g
                elif found.grid.stride == g.grid.stride and found.grid.offset == g.grid.offset:
                    found = _intersect(found, g)
            before += int(a.shape[dim]) if a.dim() > dim else 1
        return found

    def _getitem(self, args, gx, x, out) -> LayerGeometry | None:
        if gx is None:
            return None
        idx = args[1]
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(i is Ellipsis or i is None for i in idx):
            return self._default((x,), {}, out) if out.shape == x.shape else None
        removed = 0
        mapping: dict[int, int] = {}
        start = gx.layout.start
        for d in range(x.dim()):
            i = idx[d] if d < len(idx) else slice(None)
            if isinstance(i, int):
                if d in gx.layout.dims:
                    return None
                removed += 1
                continue
            if not isinstance(i, slice):
                return None
            full = i == slice(None) or (
                i.step in (None, 1)
                and (i.start in (None, 0))
                and (i.stop is None or i.stop >= x.shape[d])
            )
            if d in gx.layout.dims and not full:
                if gx.layout.kind != "tokens" or i.step not in (None, 1):
                    return None
                lo = 0 if i.start is None else _norm(int(i.start), x.shape[d])
                start = start - lo
                if start < 0:
                    return None
                if start + gx.grid.size[0] * gx.grid.size[1] > out.shape[d - removed]:
                    return None
            mapping[d] = d - removed
        dims = tuple(mapping[d] for d in gx.layout.dims)
        return LayerGeometry(gx.grid, replace(gx.layout, dims=dims, start=start))


def _find_map(gx: LayerGeometry, xs: list[int], os_: list[int]) -> LayerGeometry | None:
    """A reshape that only adds or drops singleton axes around a map's two axes."""
    y, xd = gx.layout.dims
    if xd != y + 1:
        return None
    keep_in = [(i, s) for i, s in enumerate(xs) if s != 1 or i in (y, xd)]
    rank = [i for i, _ in keep_in].index(y)  # the map's y axis among the kept axes
    keep_out = [(j, s) for j, s in enumerate(os_) if s != 1]
    if [s for _, s in keep_in if s != 1] != [s for _, s in keep_out]:
        return None
    h, w = xs[y], xs[xd]
    if h == 1 or w == 1:
        return None
    before = len([s for i, s in keep_in[:rank] if s != 1])
    j = keep_out[before][0]
    if j + 1 < len(os_) and os_[j] == h and os_[j + 1] == w:
        return LayerGeometry(gx.grid, replace(gx.layout, dims=(j, j + 1)))
    return None


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (tuple, list)):
            yield from (b for b in a if isinstance(b, torch.Tensor))


def _intersect(a: LayerGeometry, b: LayerGeometry) -> LayerGeometry:
    ia, ib = a.grid.interior, b.grid.interior
    interior = tuple((max(ia[k][0], ib[k][0]), min(ia[k][1], ib[k][1])) for k in range(2))
    rf = tuple(max(a.grid.rf[k], b.grid.rf[k]) for k in range(2))
    return LayerGeometry(replace(a.grid, interior=interior, rf=rf), a.layout)


# --------------------------------------------------------------------------- the trace


@dataclass(frozen=True)
class GeometryTrace:
    """The result of :func:`trace_geometry`.

    Attributes:
        layers: ``{ref: LayerGeometry or None}`` for every module call of the network:
            ``ref`` is the module path relative to the model passed in (``net.layer1.0``
            for a Classifier), with ``:k`` appended for every call of a module that ran
            ``n > 1`` times (``net.layer1.0.relu:0``, ``net.layer1.0.relu:1``).
        calls: ``{module path: number of calls}`` in the traced forward pass.
        image_size: the ``(H, W)`` traced.
        error: None, or the error that stopped the forward pass (a head that takes one
            input size only, say): the layers that ran before it are placed all the same.
    """

    layers: dict[str, LayerGeometry | None]
    calls: dict[str, int]
    image_size: tuple[int, int]
    error: str | None = None

    def get(self, model: nn.Module, ref: str) -> LayerGeometry | None:
        """The geometry of layer ``ref`` (any spelling :func:`resolve_layer` accepts)."""
        from invariscope.models.capture import parse_layer

        name, call = parse_layer(ref)
        module = resolve_layer(model, name)
        path = _paths(model).get(id(module))
        if path is None:
            return None
        n = self.calls.get(path, 0)
        if n == 0:
            return None
        if call is None:
            return self.layers.get(path) if n == 1 else None
        return (
            self.layers.get(f"{path}:{call}")
            if n > 1
            else (self.layers.get(path) if call == 0 else None)
        )


def _paths(model: nn.Module) -> dict[int, str]:
    out: dict[int, str] = {}
    for name, module in model.named_modules():
        out.setdefault(id(module), name)
    return out


def trace_geometry(
    model: nn.Module,
    image_size: tuple[int, int],
    *,
    channels: int | None = None,
) -> GeometryTrace:
    """The feature grid of every module call of ``model`` on ``image_size`` images.

    One forward pass of one zero image (eval mode, no gradient, the model's mode
    restored) under a torch-function mode that follows the grid through each operation
    (see the module docs). For a :class:`Classifier` the network ``net`` is traced on its
    normalised input (so a resize in the preprocessing cannot blur the grid; the grid is
    in the pixels the network sees).

    Args:
        model: a Classifier or any ``nn.Module`` taking ``[B, C, H, W]``.
        image_size: ``(H, W)``.
        channels: input channels (default: the Classifier's, else inferred from the
            first convolution).

    Returns:
        :class:`GeometryTrace`.
    """
    H, W = int(image_size[0]), int(image_size[1])
    net = model.net if isinstance(model, Classifier) else model
    prefix = "net." if isinstance(model, Classifier) else ""
    if channels is None:
        if isinstance(model, Classifier):
            channels = model.input_size[0]
        else:
            conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
            channels = conv.in_channels if conv is not None else 3
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, int(channels), H, W, device=device, dtype=dtype)
    names = {id(m): n for n, m in reversed(list(net.named_modules()))}
    calls: dict[str, int] = {}
    outputs: list[tuple[str, int, Any]] = []
    tracer = _Tracer()
    start = FeatureGrid((1.0, 1.0), (0.0, 0.0), (0.0, 0.0), (H, W), ((0, H - 1), (0, W - 1)))
    tracer.set(x, LayerGeometry(start, Layout("map", (2, 3))))

    def record(module, inputs, output) -> None:
        path = names.get(id(module))
        if path is None:
            return
        k = calls.get(path, 0)
        calls[path] = k + 1
        first = output
        if isinstance(output, (tuple, list)) and output:
            first = output[0]
        outputs.append((path, k, tracer.get(first) if isinstance(first, torch.Tensor) else None))

    handle = nn.modules.module.register_module_forward_hook(record)
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad(), tracer:
            net(x)
    except Exception as err:  # e.g. a classifier head that needs the training size:
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    else:
        error = None
    finally:
        handle.remove()
        net.train(was_training)
    layers: dict[str, LayerGeometry | None] = {}
    for path, k, geo in outputs:
        full = prefix + path if path else prefix.rstrip(".")
        ref = full if calls[path] == 1 else f"{full}:{k}"
        layers[ref] = geo
    return GeometryTrace(
        layers=layers,
        calls={(prefix + p if p else prefix.rstrip(".")): n for p, n in calls.items()},
        image_size=(H, W),
        error=error,
    )
