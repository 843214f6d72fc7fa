"""Deterministic, differentiable, batched image transformations and their registry.

Every transformation is a pure function ``f(images[B, C, H, W] in [0, 1], magnitude[B])``
with a thin ``nn.Module`` of the same defaults, registered as a :class:`TransformSpec`
(identity, domain, default sweep range, unit, sign, kind, and the 2x3 pixel matrix of
geometric ones). All warps go through the one core :func:`warp_affine`.

Convention:
    Pixel coordinates: origin at the centre of the top-left pixel, x right, y down.
    Geometric warps act about the image centre and fill with zeros by default
    (``padding_mode="border"`` / ``"reflection"``); photometric outputs are clamped to
    ``[0, 1]`` by default (``clamp=False``). Rotation positive = counter-clockwise as
    displayed; translations positive = right / down; scale factors magnify the content.

>>> import torch
>>> from invariscope.transforms import apply, list_transforms
>>> "rotation" in list_transforms()
True
>>> apply("zoom", torch.rand(2, 3, 8, 8), 1.5).shape
torch.Size([2, 3, 8, 8])
"""

from invariscope.transforms.compose import Compose, compose, compose_matrix
from invariscope.transforms.geometric import (
    Affine,
    HFlip,
    Rot90,
    Rotation,
    ScaleX,
    ScaleY,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    VFlip,
    Zoom,
    affine,
    hflip,
    hflip_matrix,
    rot90,
    rot90_matrix,
    rotation,
    rotation_matrix,
    scale_x,
    scale_x_matrix,
    scale_y,
    scale_y_matrix,
    shear_x,
    shear_x_matrix,
    shear_y,
    shear_y_matrix,
    translate_x,
    translate_x_matrix,
    translate_y,
    translate_y_matrix,
    vflip,
    vflip_matrix,
    zoom,
    zoom_matrix,
)
from invariscope.transforms.photometric import (
    Brightness,
    Contrast,
    GaussianBlur,
    GaussianNoise,
    Grayscale,
    brightness,
    contrast,
    gaussian_blur,
    gaussian_noise,
    grayscale,
    standard_normal,
)
from invariscope.transforms.registry import (
    Domain,
    TransformModule,
    TransformSpec,
    apply,
    get_transform,
    list_transforms,
    register,
)
from invariscope.transforms.sweep import grid, grid_steps, parse_range
from invariscope.transforms.warp import (
    affine_product,
    invert_affine,
    pixel_to_theta,
    theta_to_pixel,
    warp_affine,
)

__all__ = [
    # registry
    "Domain",
    "TransformSpec",
    "TransformModule",
    "register",
    "get_transform",
    "list_transforms",
    "apply",
    # warp core
    "warp_affine",
    "pixel_to_theta",
    "theta_to_pixel",
    "affine_product",
    "invert_affine",
    # geometric and discrete
    "rotation",
    "translate_x",
    "translate_y",
    "scale_x",
    "scale_y",
    "zoom",
    "shear_x",
    "shear_y",
    "affine",
    "hflip",
    "vflip",
    "rot90",
    "rotation_matrix",
    "translate_x_matrix",
    "translate_y_matrix",
    "scale_x_matrix",
    "scale_y_matrix",
    "zoom_matrix",
    "shear_x_matrix",
    "shear_y_matrix",
    "hflip_matrix",
    "vflip_matrix",
    "rot90_matrix",
    "Rotation",
    "TranslateX",
    "TranslateY",
    "ScaleX",
    "ScaleY",
    "Zoom",
    "ShearX",
    "ShearY",
    "Affine",
    "HFlip",
    "VFlip",
    "Rot90",
    # photometric
    "brightness",
    "contrast",
    "grayscale",
    "gaussian_blur",
    "gaussian_noise",
    "standard_normal",
    "Brightness",
    "Contrast",
    "Grayscale",
    "GaussianBlur",
    "GaussianNoise",
    # composition and sweeps
    "compose",
    "compose_matrix",
    "Compose",
    "grid",
    "grid_steps",
    "parse_range",
]
