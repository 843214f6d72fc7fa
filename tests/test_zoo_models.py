"""The model zoo: torchvision's module trees, parameter counts and forward semantics."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invariscope.errors import InvariscopeError
from invariscope.models import capture_activations, create_model, list_models, model_info
from invariscope.models.zoo import SMALL_CONFIGS
from invariscope.models.zoo.convnext import CNBlock
from invariscope.models.zoo.ops import IMAGE_SIZES, LayerNorm2d, make_divisible, stochastic_depth

ZOO = list(SMALL_CONFIGS)

# Parameter counts of torchvision's builders (weights=None), as documented by torchvision.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "vgg11_bn": 132_868_840,
    "vgg16_bn": 138_365_992,
    "convnext_tiny": 28_589_128,
    "vit_b_16": 86_567_656,
}

# Read off torchvision 0.29.1's builders (weights=None): number of state_dict entries and
# the first 16 hex digits of sha256 over "key:shape" lines, and of sha256 over
# "module path:class name" lines of named_modules(). Equal digests = identical trees.
TORCHVISION_STATE_DICT = {
    "resnet18": (122, "3e58b0798c806a0c"),
    "resnet34": (218, "97e365907d64da74"),
    "resnet50": (320, "781bb16f43b8f96f"),
    "mobilenet_v2": (314, "2a375ead3e9604e1"),
    "efficientnet_b0": (360, "e1f159b97ca4b202"),
    "vgg11_bn": (62, "96ee5d41fde5cc7f"),
    "vgg16_bn": (97, "a463166a74dc0850"),
    "convnext_tiny": (182, "5c1934c7e7f217f7"),
    "vit_b_16": (152, "c10467b1a130b99c"),
}
TORCHVISION_MODULES = {
    "resnet18": "42e1b4bff341ff69",
    "resnet34": "cc4701b6505723d0",
    "resnet50": "08cea42b7ac407f4",
    "mobilenet_v2": "93a2790104b3b1e0",
    "efficientnet_b0": "b7cd5608ce9eebe6",
    "vgg11_bn": "68eb4ce0fe5bb04b",
    "vgg16_bn": "3facfa58df6aebb4",
    "convnext_tiny": "5432733f9d749af7",
    "vit_b_16": "2ba70cc43b0c7350",
}

# Keys (with shapes) that torchvision's state_dicts have, and prefixes they lack.
EXPECTED_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "fc.weight": (1000, 512),
    },
    "resnet50": {
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
    },
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "efficientnet_b0": {
        "features.1.0.block.0.0.weight": (32, 1, 3, 3),
        "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
        "features.1.0.block.1.fc2.bias": (32,),
        "features.2.0.block.2.fc1.weight": (4, 96, 1, 1),
        "features.8.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "vgg16_bn": {
        "features.0.weight": (64, 3, 3, 3),
        "features.0.bias": (64,),
        "features.1.running_var": (64,),
        "features.40.weight": (512, 512, 3, 3),
        "classifier.0.weight": (4096, 25088),
        "classifier.6.weight": (1000, 4096),
    },
    "convnext_tiny": {
        "features.0.0.weight": (96, 3, 4, 4),
        "features.0.1.weight": (96,),
        "features.1.0.block.0.weight": (96, 1, 7, 7),
        "features.1.0.block.2.weight": (96,),
        "features.1.0.block.3.weight": (384, 96),
        "features.1.0.layer_scale": (96, 1, 1),
        "features.2.1.weight": (192, 96, 2, 2),
        "features.5.8.block.5.weight": (384, 1536),
        "classifier.2.weight": (1000, 768),
    },
    "vit_b_16": {
        "class_token": (1, 1, 768),
        "conv_proj.weight": (768, 3, 16, 16),
        "encoder.pos_embedding": (1, 197, 768),
        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight": (2304, 768),
        "encoder.layers.encoder_layer_0.self_attention.out_proj.weight": (768, 768),
        "encoder.layers.encoder_layer_11.mlp.3.weight": (768, 3072),
        "encoder.ln.weight": (768,),
        "heads.head.weight": (1000, 768),
    },
}
ABSENT_PREFIXES = {"resnet18": ("layer1.0.downsample", "layer1.1.downsample")}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _small(name: str, image_size: int = 32, num_classes: int = 5, **kwargs):
    kwargs = {**SMALL_CONFIGS[name], **kwargs}
    return create_model(name, image_size=image_size, num_classes=num_classes, **kwargs)


def test_zoo_is_registered_with_torchvision_defaults():
    assert set(ZOO) == set(TORCHVISION_PARAMS) and set(ZOO) <= set(list_models())
    for name in ZOO:
        info = model_info(name)
        assert info.defaults["image_size"] == 224 and info.defaults["num_classes"] == 1000
        assert info.defaults["in_channels"] == 3
        assert info.image_sizes == IMAGE_SIZES and 32 in IMAGE_SIZES


@pytest.mark.parametrize("name", ZOO)
def test_default_is_torchvision_architecture(name):
    model = create_model(name)
    net = model.net
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_PARAMS[name]
    sd = net.state_dict()
    assert (len(sd), _digest(f"{k}:{tuple(v.shape)}" for k, v in sd.items())) == (
        TORCHVISION_STATE_DICT[name]
    )
    modules = _digest(f"{k}:{type(m).__name__}" for k, m in net.named_modules())
    assert modules == TORCHVISION_MODULES[name]
    for key, shape in EXPECTED_KEYS.get(name, {}).items():
        assert tuple(sd[key].shape) == shape, key
    for prefix in ABSENT_PREFIXES.get(name, ()):
        assert not any(k.startswith(prefix) for k in sd), prefix
    assert model.input_size == (3, 224, 224) and model.num_classes == 1000
    assert model.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert model.std.tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_resnet18_forward_at_224():
    model = create_model("resnet18").eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 224, 224, generator=_gen()))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- ResNet
def _count_calls(modules):
    counts = {name: 0 for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_m, _i, _o, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    return counts, handles


@pytest.mark.parametrize(("name", "uses"), [("resnet18", 2), ("resnet50", 3)])
def test_resnet_block_reuses_one_relu(name, uses):
    model = _small(name).eval()
    net = model.net
    mods = {"block": net.layer1[0].relu, "stem": net.relu, "block2": net.layer2[0].relu}
    counts, handles = _count_calls(mods)
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32, generator=_gen()))
    for h in handles:
        h.remove()
    assert counts == {"block": uses, "stem": 1, "block2": uses}


def test_basic_block_computes_torchvision_formula():
    net = _small("resnet18").net.eval()
    block = net.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 8, 8, generator=_gen())
    with torch.no_grad():
        main = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        expected = F.relu(main + block.downsample(x))
        assert torch.equal(block(x), expected)
    assert net.layer1[0].downsample is None and block.stride == 2


# ----------------------------------------------------------------- every small config
@pytest.mark.parametrize("name", ZOO)
def test_small_config_runs_and_layers_fire_once(name):
    model = _small(name)
    assert model.input_size == (3, 32, 32) and model.num_classes == 5
    assert len(set(model.layer_names)) == len(model.layer_names) >= 4
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    modules = dict(model.named_modules())
    counts, handles = _count_calls({n: modules[n] for n in model.layer_names})
    try:
        for train in (True, False):
            model.train(train)
            logits = model(x)
            assert logits.shape == (2, 5) and torch.isfinite(logits).all(), train
    finally:
        for h in handles:
            h.remove()
    assert counts == {n: 2 for n in model.layer_names}  # once per forward, two forwards
    with torch.no_grad():
        logits, acts = capture_activations(model, x, model.layer_names)
        assert torch.equal(logits, model(x))
    assert list(acts) == model.layer_names
    assert all(torch.isfinite(a).all() for a in acts.values())
    # the last default layer is the logits layer
    assert torch.equal(acts[model.layer_names[-1]], logits)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn", "convnext_tiny"])
def test_small_config_takes_one_channel_and_64px(name):
    model = _small(name, image_size=64, num_classes=3, in_channels=1).eval()
    assert model.input_size == (1, 64, 64)
    assert model.mean.tolist() == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64, generator=_gen())).shape == (2, 3)


def test_default_layer_names_follow_the_architecture():
    r = _small("resnet34", layers=(1, 2, 1, 1))
    assert r.layer_names == [
        "net.maxpool",
        "net.layer1.0",
        "net.layer2.0",
        "net.layer2.1",
        "net.layer3.0",
        "net.layer4.0",
        "net.avgpool",
        "net.fc",
    ]
    v = _small("vit_b_16")
    assert v.layer_names == [
        "net.conv_proj",
        "net.encoder.layers.encoder_layer_0",
        "net.encoder.layers.encoder_layer_1",
        "net.encoder.ln",
        "net.heads.head",
    ]
    c = _small("convnext_tiny", layers=(1, 2, 1, 1))
    assert c.layer_names[:5] == [
        "net.features.0",
        "net.features.1.0",
        "net.features.2",
        "net.features.3.0",
        "net.features.3.1",
    ]
    vgg = create_model("vgg11_bn", image_size=32, width=0.125)
    relus = [n for n in vgg.layer_names if isinstance(vgg.layer(n), nn.ReLU)]
    pools = [n for n in vgg.layer_names if isinstance(vgg.layer(n), nn.MaxPool2d)]
    assert len(relus) == 8 + 2 and len(pools) == 5


@pytest.mark.parametrize("name", ZOO)
def test_small_config_traces_with_torch_fx(name):
    """As torchvision's: torch.fx traces every forward (no data-dependent Python control flow)."""
    net = _small(name).net.eval()
    graph = torch.fx.symbolic_trace(net)
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    with torch.no_grad():
        assert torch.equal(graph(x), net(x))


# ---------------------------------------------------------------------------- ViT
def test_vit_refuses_image_size_not_divisible_by_patch():
    with pytest.raises(InvariscopeError) as err:
        create_model("vit_b_16", image_size=36, **SMALL_CONFIGS["vit_b_16"])
    msg = str(err.value)
    assert "\n" not in msg and "36" in msg and "patch_size 8" in msg
    with pytest.raises(InvariscopeError, match="num_heads"):
        create_model("vit_b_16", image_size=32, patch_size=8, hidden_dim=10, num_heads=3)


def test_vit_feeds_class_token_then_row_major_patches_plus_position():
    model = _small("vit_b_16").eval()
    net = model.net
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    seen = {}
    h = net.encoder.layers.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        logits, acts = capture_activations(model, x, ["net.conv_proj", "net.encoder.ln"])
    h.remove()
    patches = acts["net.conv_proj"]
    assert patches.shape == (2, 64, 4, 4)
    tokens = patches.flatten(2).transpose(1, 2)  # [B, 16, D], row-major patch order
    cls = net.class_token.expand(2, -1, -1)
    expected = torch.cat([cls, tokens], dim=1) + net.encoder.pos_embedding
    assert torch.equal(seen["x"], expected)
    with torch.no_grad():
        assert torch.equal(logits, net.heads(acts["net.encoder.ln"][:, 0]))
    # a random head (torchvision zeroes it): logits depend on the input
    assert logits.abs().max() > 0 and not torch.equal(logits[0], logits[1])


# -------------------------------------------------------------------- shared blocks
def test_layer_norm_2d_normalises_channels():
    ln = LayerNorm2d(4, eps=1e-6)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ln.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    x = torch.randn(2, 4, 3, 5, generator=_gen(), dtype=torch.float64)
    ln = ln.double()
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * ln.weight.view(1, 4, 1, 1)
    expected = expected + ln.bias.view(1, 4, 1, 1)
    assert torch.allclose(ln(x), expected, atol=1e-12)


def test_stochastic_depth_drops_whole_rows_and_is_identity_at_eval():
    x = torch.ones(1000, 3, 2, 2)
    assert stochastic_depth(x, 0.5, "row", training=False) is x
    torch.manual_seed(0)
    y = stochastic_depth(x, 0.5, "row", training=True)
    per_row = y.flatten(1)
    assert set(per_row.unique().tolist()) <= {0.0, 2.0}
    assert (per_row == per_row[:, :1]).all()  # a row is dropped or kept as a whole
    assert 400 < int((per_row[:, 0] == 0).sum()) < 600
    # a block whose branch is always dropped is the identity, in training too
    block = CNBlock(8, layer_scale=1.0, stochastic_depth_prob=1.0).train()
    z = torch.randn(2, 8, 5, 5, generator=_gen())
    assert torch.equal(block(z), z)
    with pytest.raises(InvariscopeError):
        stochastic_depth(x, 1.5, "row")


def test_efficientnet_stochastic_depth_rises_linearly_to_0_2():
    net = create_model("efficientnet_b0").net
    probs = [b.stochastic_depth.p for stage in net.features[1:-1] for b in stage]
    assert len(probs) == 16
    assert probs == pytest.approx([0.2 * i / 16 for i in range(16)])
    convnext = _small("convnext_tiny", layers=(1, 1, 2, 1), stochastic_depth_prob=0.4)
    p = [b.stochastic_depth.p for i in (1, 3, 5, 7) for b in convnext.net.features[i]]
    assert p == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_make_divisible_matches_torchvision():
    assert [make_divisible(v) for v in (3.9, 8, 12, 16 * 0.25, 32 * 0.75, 96 * 0.35)] == [
        8,
        8,
        16,
        8,
        24,
        32,
    ]


# --------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    ("name", "kwargs", "fragment"),
    [
        ("resnet18", {"layers": (1, 1, 1)}, "layers"),
        ("resnet50", {"width": 0}, "width"),
        ("vgg16_bn", {"image_size": 16}, "image_size"),
        ("convnext_tiny", {"layers": (1, 0, 1, 1)}, "layers"),
        ("mobilenet_v2", {"dropout": 1.0}, "dropout"),
        ("efficientnet_b0", {"stochastic_depth_prob": -0.1}, "stochastic_depth_prob"),
        ("vit_b_16", {"image_size": 8}, "image_size"),
    ],
)
def test_bad_arguments_are_one_line_errors(name, kwargs, fragment):
    with pytest.raises(InvariscopeError) as err:
        create_model(name, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg and name in msg


def test_lists_work_like_tuples():
    a = create_model("resnet18", image_size=32, width=0.25, layers=[1, 1, 1, 1])
    assert len(a.net.layer1) == 1 and a.arch_kwargs["layers"] == [1, 1, 1, 1]


def test_module_doctests():
    import doctest

    from invariscope.models.zoo import ops

    result = doctest.testmod(ops)
    assert result.attempted >= 1 and result.failed == 0


def test_zoo_docstring_example():
    import doctest

    from invariscope.models import zoo

    result = doctest.testmod(zoo)
    assert result.attempted >= 1 and result.failed == 0
