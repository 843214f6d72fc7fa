"""Vision Transformer (Dosovitskiy et al. 2021) with torchvision's module tree: ``vit_b_16``.

``conv_proj`` (patch embedding: a conv with kernel = stride = patch) -> reshape to
``[B, D, h*w]`` and permute to ``[B, N, D]`` (torchvision's ``_process_input``) ->
prepend ``class_token`` -> ``encoder`` (adds ``pos_embedding``, ``dropout``, ``layers`` =
``Sequential`` of pre-norm :class:`EncoderBlock` s named ``encoder_layer_{i}``, then
``ln``) -> token 0 -> ``heads`` = ``Sequential(head=Linear)``. An :class:`EncoderBlock`
holds ``ln_1``, ``self_attention`` (``nn.MultiheadAttention``, ``batch_first=True``),
``dropout``, ``ln_2`` and ``mlp`` (:class:`MLPBlock`: children ``"0".."4"`` = Linear,
GELU, Dropout, Linear, Dropout).

Initialisation as torchvision, except the classification head: torchvision zeroes it
(every logit 0 at initialisation, every prediction a tie), here it is truncated normal
with std 0.02 so that a random ViT gives informative, input-dependent logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models.classifier import Classifier
from invariscope.models.registry import register_model
from invariscope.models.zoo.ops import IMAGE_SIZES, MLP, check_int, check_prob, wrap

__all__ = ["MLPBlock", "EncoderBlock", "Encoder", "VisionTransformer", "vit_b_16"]


class MLPBlock(MLP):
    """Transformer MLP: Linear(D, mlp_dim), GELU, Dropout, Linear(mlp_dim, D), Dropout."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(in_dim, [mlp_dim, in_dim], activation_layer=nn.GELU, dropout=dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x = x + drop(attn(ln_1 x)); x + mlp(ln_2 x)``.

    Shapes: ``[B, N, D]`` -> ``[B, N, D]``.
    """

    def __init__(
        self,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=attention_dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        y = self.dropout(y)
        x = y + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding, dropout, ``layers`` (``encoder_layer_{i}``), final ``ln``.

    Shapes: ``[B, seq_length, D]`` -> ``[B, seq_length, D]``.
    """

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(
                num_heads, hidden_dim, mlp_dim, dropout, attention_dropout
            )
        self.layers = nn.Sequential(layers)
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
        x = x + self.pos_embedding
        return self.ln(self.layers(self.dropout(x)))


class VisionTransformer(nn.Module):
    """``torchvision.models.VisionTransformer`` (no representation layer, conv patch stem).

    Args:
        image_size: side of the square input; a multiple of ``patch_size``.
        patch_size: side of the square patches.
        num_layers, num_heads, hidden_dim, mlp_dim: encoder size (B/16: 12, 12, 768, 3072).
        dropout, attention_dropout: dropout probabilities.
        num_classes: outputs.
        in_channels: input channels of ``conv_proj``.

    Shapes: ``[B, in_channels, image_size, image_size]`` -> ``[B, num_classes]``.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise InvariscopeError(
                f"vit: image_size {image_size} is not divisible by patch_size {patch_size}; "
                "choose a multiple of the patch size"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.num_classes = num_classes
        self.conv_proj = nn.Conv2d(
            in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size
        )
        seq_length = (image_size // patch_size) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length += 1
        self.encoder = Encoder(
            seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout
        )
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

        fan_in = in_channels * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        # torchvision zeroes the head; a random head keeps random-init logits informative
        nn.init.trunc_normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        # torch._assert (not `if`) keeps the forward traceable by torch.fx, as torchvision's
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size}")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size}")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x)  # [n, hidden_dim, n_h, n_w]
        x = x.reshape(n, self.hidden_dim, n_h * n_w)
        return x.permute(0, 2, 1)  # [n, n_h * n_w, hidden_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def vit_layer_names(net: VisionTransformer) -> list[str]:
    """Patch embedding, every encoder block, the final LayerNorm, the logits."""
    names = ["net.conv_proj"]
    names += [f"net.encoder.layers.{name}" for name, _ in net.encoder.layers.named_children()]
    return names + ["net.encoder.ln", "net.heads.head"]


@register_model("vit_b_16", image_sizes=IMAGE_SIZES)
def vit_b_16(
    in_channels: int = 3,
    image_size: int = 224,
    num_classes: int = 1000,
    patch_size: int = 16,
    num_layers: int = 12,
    num_heads: int = 12,
    hidden_dim: int = 768,
    mlp_dim: int = 3072,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> Classifier:
    """ViT-B/16 as torchvision's (patch 16, 12 layers, 12 heads, D 768, 86.6 M parameters)."""
    arch = "vit_b_16"
    in_channels = check_int(arch, "in_channels", in_channels, 1)
    num_classes = check_int(arch, "num_classes", num_classes, 1)
    patch_size = check_int(arch, "patch_size", patch_size, 1)
    image_size = check_int(arch, "image_size", image_size, patch_size)
    num_layers = check_int(arch, "num_layers", num_layers, 1)
    num_heads = check_int(arch, "num_heads", num_heads, 1)
    hidden_dim = check_int(arch, "hidden_dim", hidden_dim, 1)
    mlp_dim = check_int(arch, "mlp_dim", mlp_dim, 1)
    dropout = check_prob(arch, "dropout", dropout)
    attention_dropout = check_prob(arch, "attention_dropout", attention_dropout)
    if image_size % patch_size:
        lo = image_size // patch_size * patch_size
        raise InvariscopeError(
            f"{arch}: image_size {image_size} is not divisible by patch_size {patch_size}; "
            f"use a multiple of {patch_size} (e.g. {lo or patch_size} or {lo + patch_size})"
        )
    if hidden_dim % num_heads:
        raise InvariscopeError(
            f"{arch}: hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}; "
            "choose hidden_dim a multiple of num_heads"
        )
    net = VisionTransformer(
        image_size,
        patch_size,
        num_layers,
        num_heads,
        hidden_dim,
        mlp_dim,
        dropout,
        attention_dropout,
        num_classes,
        in_channels,
    )
    return wrap(
        net,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        layer_names=vit_layer_names(net),
    )
