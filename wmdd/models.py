"""Architectures, stems, and the two views of a model every stage needs: its penultimate feature
(the avgpool output, what the barycenters live on) and its BatchNorm layers in order.

More: docs/core.md, "wmdd/models.py".
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from wmdd import artifacts
from wmdd.cli import fail

ARCHES = ("resnet18", "resnet50", "resnet101", "convnet", "vit_tiny")
STEMS = ("imagenet", "tiny224", "small", "gray")
# Input channels of a stem (3 otherwise). "gray": one channel (Fashion-MNIST, native 28 px); ConvNet pads its
# first conv by 3 as DC's ConvNet does for 1-channel input (28 -> 32, so three 2x2 pools give 4x4); every
# other family takes `small`'s stem with its first convolution reading one channel.
STEM_CHANNELS = {"gray": 1}


def stem_channels(stem: str) -> int:
    return STEM_CHANNELS.get(stem, 3)


def torchvision_students() -> list:
    """Names of torchvision's classification models (its registry), usable as evaluate students."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def student_names() -> list:
    """Every valid evaluate --student: the project's architectures, then torchvision's registry."""
    return list(ARCHES) + [n for n in torchvision_students() if n not in ARCHES]


class ConvNet(nn.Module):
    def __init__(self, num_classes: int, image_size: int, depth: int = 3, width: int = 128, channels: int = 3,
                 first_padding: int = 1):
        super().__init__()
        layers, c, size = [], channels, image_size + 2 * (first_padding - 1)
        for d in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=first_padding if d == 0 else 1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, size = width, size // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward_features(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.forward_features(x))


def model_spec(arch: str, num_classes: int, stem: str, image_size: int) -> dict:
    """The plain dict stored in teacher.pt that rebuilds the architecture (a vit_tiny's also says whose
    ViT it is, so it is rebuilt with that library)."""
    if arch not in ARCHES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHES}")
    spec = {"arch": arch, "num_classes": int(num_classes), "stem": stem, "image_size": int(image_size)}
    if arch == "vit_tiny":
        spec["vit_impl"] = default_vit_impl()
    return spec


def _timm():
    """timm (the optional extra `vit`: pip install -e ".[vit]"), or None when it is not installed."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def default_vit_impl() -> str:
    """Whose ViT-Tiny `vit_tiny` builds here: timm's (the released code's) when timm imports, else torchvision's."""
    return "timm" if _timm() is not None else "torchvision"


_NOTED = set()


def _vit_tiny(num_classes: int, image_size: int, impl: str | None) -> nn.Module:
    """ViT-Tiny (12 layers, 3 heads, width 192, MLP 768), patch 16 from 128 px, 8 from 64 px, else 4:
    timm's `vit_tiny_patch16_224` as the released code creates it (models/factory.py), given timm's own
    img_size / patch_size for smaller inputs; without timm, torchvision's VisionTransformer of that shape."""
    patch = 16 if image_size >= 128 else (8 if image_size >= 64 else 4)
    impl = impl or default_vit_impl()
    if impl == "timm":
        timm = _timm()
        if timm is None:
            fail("this vit_tiny was built with timm (its spec says vit_impl 'timm'), which is not installed "
                 "here: pip install timm (or pip install -e \".[vit]\" --no-build-isolation).")
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                                 img_size=image_size, patch_size=patch)
    if "vit" not in _NOTED and _timm() is None:
        _NOTED.add("vit")
        print("note: timm is not installed, so vit_tiny is torchvision's VisionTransformer of the same shape, not "
              "the released code's timm vit_tiny_patch16_224 (pip install -e \".[vit]\" --no-build-isolation)")
    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch, num_layers=12,
                                                num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=num_classes)


def _is_timm_vit(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "pos_embed")


def build_model(arch: str, num_classes: int, stem: str = "imagenet", image_size: int = 224,
                vit_impl: str | None = None) -> nn.Module:
    """`vit_impl` ("timm" / "torchvision"): whose vit_tiny to build; None: timm's when installed."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
    channels = stem_channels(stem)
    if arch == "convnet":
        return ConvNet(num_classes, image_size, channels=channels, first_padding=3 if stem == "gray" else 1)
    if channels != 3:
        return _in_channels(build_model(arch, num_classes, "small", image_size, vit_impl), channels)
    if arch == "vit_tiny":
        return _vit_tiny(num_classes, image_size, vit_impl)
    if arch not in ARCHES and arch not in torchvision_students():
        raise ValueError(f"unknown architecture {arch!r}; choose one of {student_names()}")
    if arch.startswith("vit_") and stem == "small":
        return _small_vit(arch, num_classes, image_size)
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    if isinstance(model, torchvision.models.ResNet) and stem in ("tiny224", "small"):
        stride, padding = (2, 3) if stem == "tiny224" else (1, 1)
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=stride, padding=padding, bias=False)
        model.maxpool = nn.Identity()
    elif stem == "small":
        _small_stem(model)
    return model


def _in_channels(model: nn.Module, channels: int) -> nn.Module:
    """The model with its first convolution (the stem's, first in module order in every family here)
    rebuilt to read `channels` input channels, its other settings kept."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Conv2d(
        channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode))
    return model


def _unstride(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def _small_stem(model: nn.Module) -> None:
    """The small-input stem of a torchvision family other than ResNet (see the module docstring)."""
    tv = torchvision.models
    if isinstance(model, (tv.MobileNetV2, tv.MobileNetV3, tv.EfficientNet)):
        _unstride(model.features[0][0])
    elif isinstance(model, tv.MNASNet):
        _unstride(model.layers[0])
    elif isinstance(model, tv.RegNet):
        _unstride(model.stem[0])
    elif isinstance(model, tv.ShuffleNetV2):
        _unstride(model.conv1[0])
        model.maxpool = nn.Identity()
    elif isinstance(model, tv.DenseNet):
        conv0 = model.features.conv0
        model.features.conv0 = nn.Conv2d(3, conv0.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.features.pool0 = nn.Identity()
    elif isinstance(model, tv.SqueezeNet):
        _unstride(model.features[0])
    elif isinstance(model, tv.GoogLeNet):
        _unstride(model.conv1.conv)
        model.maxpool1 = nn.Identity()


def _small_vit(arch: str, num_classes: int, image_size: int) -> nn.Module:
    """A torchvision ViT's depth and width for small inputs: patch 4 (< 64 px) or 8, as vit_tiny."""
    layers, heads, hidden, mlp = _VIT_SIZES[arch.split("_")[1]]
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=8 if image_size >= 64 else 4, num_layers=layers, num_heads=heads,
        hidden_dim=hidden, mlp_dim=mlp, num_classes=num_classes)


# torchvision's ViT builders: (layers, heads, hidden, MLP) of vit_b_*, vit_l_*, vit_h_*
_VIT_SIZES = {"b": (12, 12, 768, 3072), "l": (24, 16, 1024, 4096), "h": (32, 16, 1280, 5120)}


def build_from_spec(spec: dict) -> nn.Module:
    """The model a spec describes; a vit_tiny spec written before timm was used is torchvision's."""
    impl = spec.get("vit_impl", "torchvision") if spec["arch"] == "vit_tiny" else None
    return build_model(spec["arch"], spec["num_classes"], spec["stem"], spec["image_size"], impl)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The feature the classifier reads: ResNet avgpool output, ConvNet flattened map, ViT class token."""
    model = getattr(model, "module", model)  # DDP
    if isinstance(model, torchvision.models.ResNet):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
        return torch.flatten(model.avgpool(x), 1)
    if isinstance(model, ConvNet):
        return model.forward_features(x)
    if _is_timm_vit(model):  # the class token after the final norm, what the head reads
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if isinstance(model, torchvision.models.VisionTransformer):
        x = model._process_input(x)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return model.encoder(x)[:, 0]
    raise TypeError(f"no penultimate-feature view for {type(model).__name__}")


def classifier(model: nn.Module) -> nn.Module:
    """The head mapping penultimate features to logits."""
    model = getattr(model, "module", model)
    if isinstance(model, torchvision.models.ResNet):
        return model.fc
    if isinstance(model, ConvNet):
        return model.classifier
    if _is_timm_vit(model):
        return model.head
    if isinstance(model, torchvision.models.VisionTransformer):
        return model.heads
    raise TypeError(f"no classifier view for {type(model).__name__}")


def bn_layers(model: nn.Module) -> list:
    """(name, module) of every BatchNorm layer in forward order (downsample BNs included)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """A DDP/compiled checkpoint's keys without their wrapper prefix."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_teacher(path, info, device="cpu", arch: str | None = None):
    """(model in eval mode, artifact dict) from a teacher.pt written by squeeze, checked against `info`.

    A plain torchvision-format state_dict (no `meta`) is accepted too: the architecture is then `arch`
    (or the preset's) with the preset's stem, and the returned artifact has `meta` None."""

    artifact = artifacts.load(path, allow_plain=True)
    if "meta" in artifact and "model" in artifact:
        artifacts.check_compatible(artifact["meta"], info, path)
        spec = artifact["model_args"]
        state = artifact["model"]
    else:
        spec = model_spec(arch or info.arch, info.num_classes, info.stem, info.image_size)
        state = strip_prefix(artifact.get("state_dict", artifact))
        if spec["arch"] == "vit_tiny":  # timm's keys (pos_embed) or torchvision's (encoder.pos_embedding)
            spec["vit_impl"] = "timm" if "pos_embed" in state else "torchvision"
        artifact = {"model": state, "model_args": spec, "meta": None}
    model = build_from_spec(spec)
    try:
        model.load_state_dict(strip_prefix(state))
    except RuntimeError as e:
        fail(f"the teacher weights in {path} do not fit a {spec['arch']} with stem {spec['stem']} and "
             f"{spec['num_classes']} classes ({str(e).splitlines()[0]}). Pass the matching --arch / "
             "--dataset / --resolution, or retrain with squeeze.py.")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, artifact


def training_layout(model: nn.Module, device) -> bool:
    """channels_last weights for training on the CPU, where oneDNN's convolution, BatchNorm and pooling
    run in that layout without reorders (ConvNet-128 steps 1.3x faster at 32 px, 1.6x at 16 px;
    bench/bench_layout.py). Returns whether it applied: the caller then passes inputs through
    `as_layout`. The numbers are the same up to float summation order; state_dicts load either way."""
    if torch.device(device).type != "cpu":
        return False
    model.to(memory_format=torch.channels_last)
    return True


def as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """An image batch in the layout `training_layout` chose (a no-op for NCHW or non-image inputs)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
