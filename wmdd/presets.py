"""The dataset presets: each dataset's classes (or how to read them), protocol resolution(s),
normalisation, teacher architecture and stem, and the defaults every stage takes when its flag is not
given (the settings that produced the paper's numbers, from the authors' released run logs;
docs/presets.md). `data.resolve` turns a preset into a `DatasetInfo` against the data on disk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wmdd.cli import fail

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SRE2L_TINY_MEAN = (0.4802, 0.4481, 0.3975)  # SRe2L's Tiny-ImageNet normalisation (its 64 px protocol)
SRE2L_TINY_STD = (0.2302, 0.2265, 0.2262)

# Defaults shared by the ImageNet-like presets; each preset overrides what differs (docs/presets.md).
_PAPER_STAGES = {
    # teacher: ResNet-18, 50 ep, SGD lr 0.025, bs 32, cosine, wd 1e-4
    "squeeze": dict(epochs=50, lr=0.025, batch_size=32, weight_decay=1e-4, warmup_epochs=0),
    # barycenter: k = IPC, uniform weights, exact EMD (the released ot.lp.free_support_barycenter)
    "barycenter": dict(solver="exact", weights="uniform"),
    # recover: 2000 it, bs 100, Adam(0.5, 0.9), cosine; lr and lambda per dataset below
    "recover": dict(iterations=2000, batch_size=100, lr=0.25, lambda_bn=10.0, r_ce=0.0),
    # relabel / evaluate: 300 ep, bs 100, T = 20, AdamW(1e-3, wd 0.01)
    "relabel": dict(epochs=300, batch_size=100),
    "evaluate": dict(epochs=300, batch_size=100, lr=1e-3, weight_decay=0.01, temperature=20.0),
}


def _stages(**overrides) -> dict:
    stages = {k: dict(v) for k, v in _PAPER_STAGES.items()}
    for stage, values in overrides.items():
        stages[stage].update(values)
    return stages


@dataclass(frozen=True)
class Preset:
    name: str
    resolutions: tuple            # allowed protocol resolutions; the first is the default
    mean: tuple
    std: tuple
    arch: str                     # teacher architecture
    stems: dict                   # resolution -> stem name (see wmdd.models)
    layout: str                   # human description of the expected on-disk layout
    stages: dict = field(default_factory=_stages)
    num_classes: int | None = None  # None: read from disk
    crop_scale: tuple = (0.08, 1.0)  # RandomResizedCrop scale used by every augmenting stage
    flip: bool = True                # horizontal flips are label-preserving (not for digits)
    teacher_pad: int = 0             # > 0: the teacher trains on RandomCrop(padding=teacher_pad), not crop_scale
    needs_data_dir: bool = True
    folder: str | None = None        # the release's folder name: the default --data-dir is $WMDD_DATA/<folder>
    system_dir: str | None = None    # where a system package installs it: the last default --data-dir
    # per resolution: (mean, std) and stage defaults that replace the preset's (tiny 64: SRe2L's Tiny recipe)
    norm_by_resolution: dict = field(default_factory=dict)
    stages_by_resolution: dict = field(default_factory=dict)


# recover's lambda_BN per (dataset, IPC): the value of the released run behind the paper's number, and where it
# is in the release (Liu-Hy/WMDD, its first commit 3ce9d3d: log/<id>.json, stdout/<id>.log, try.sh:<line>; the
# accuracy that run printed in brackets). It replaces the preset's lambda_bn at the release's resolution (the
# preset's first); an explicit --lambda-bn wins. docs/presets.md, "lambda_BN per IPC".
LAMBDA_BN = {
    ("imagenette", 1): (10.0, "log/304 (38.93; no released run reaches the paper's 40.2)"),
    ("imagenette", 10): (30.0, "log/888 (65.30, with KD batch 50)"),
    ("imagenette", 50): (3.0, "log/341 (83.41)"),
    ("imagenette", 100): (500.0, "stdout/491.log (86.70)"),
    ("tiny", 1): (30.0, "log/328 (7.35)"),
    ("tiny", 10): (300.0, "log/477 (41.98, try.sh:337 'Ours_v2'; the paper's text says 500)"),
    ("tiny", 50): (300.0, "try.sh:355 (run 489; its log prints no accuracy)"),
    ("tiny", 100): (300.0, "try.sh:434 (run 545; its log prints no accuracy)"),
    ("imagenet", 1): (500.0, "assumed: the IPC 10 value (Liu-Hy/WMDD try.sh:421); no released IPC 1 run prints "
                             "an accuracy"),
    ("imagenet", 10): (500.0, "try.sh:421 (run 529, 38.24)"),
    ("imagenet", 50): (500.0, "try.sh:450 (run 570)"),
    ("imagenet", 100): (500.0, "try.sh:451 (run 571; 60.74 at try.sh:471)"),
}
# Settings in neither the paper nor the released logs: this project's assumptions, printed as "assumed" wherever
# they appear (lab/paper.py's PAPER.md, docs/presets.md, recover's printed lambda_bn_source).
ASSUMED_TEACHER = {"imagenet": "the ImageNette teacher recipe (50 epochs, SGD lr 0.025, batch 32, cosine, wd 1e-4); "
                               "the release's ImageNet-1K teacher (pretrain/output/imagenet_resnet18/255/"
                               "checkpoint.pth, log/269) has no recipe in the paper or the logs"}
# SRe2L's released R_BN weights (--sre2l; recover.sh: ImageNet 0.01; recover_tiny.sh: Tiny-ImageNet 1).
SRE2L_LAMBDA = {"tiny": 1.0}
SRE2L_LAMBDA_DEFAULT = 0.01


def recover_lambda_bn(dataset: str, ipc: int, resolution: int | None = None, sre2l: bool = False,
                      given: float | None = None) -> tuple:
    """(lambda_BN, where it comes from) for recover: `given` (--lambda-bn) when set, else SRe2L's with --sre2l,
    else LAMBDA_BN at the release's resolution, else the preset's own value."""
    preset = get_preset(dataset)
    if given is not None:
        return given, "--lambda-bn"
    if sre2l:
        return SRE2L_LAMBDA.get(dataset, SRE2L_LAMBDA_DEFAULT), "SRe2L's released R_BN (--sre2l)"
    released = resolution in (None, preset.resolutions[0])
    if released and (dataset, ipc) in LAMBDA_BN:
        value, source = LAMBDA_BN[(dataset, ipc)]
        return value, source if source.startswith("assumed") else f"Liu-Hy/WMDD {source}"
    value = preset.stages["recover"]["lambda_bn"]
    if any(d == dataset for d, _ in LAMBDA_BN):
        why = f"no released run at IPC {ipc}" if released else f"no released run at {resolution} px"
    else:
        why = "not a dataset of the release"
    return value, f"the {dataset} preset's value ({why})"


FMNIST_EPOCHS = 3  # 89.16 % val top-1 with teacher_pad 2 (docs/presets.md): ~10 min per epoch on 2 CPU cores

_FOLDER_LAYOUT = "{root}/train/<class>/<image> and {root}/val/<class>/<image> (one folder per class)"

PRESETS = {
    "digits": Preset(
        "digits", (16, 32), (0.305, 0.305, 0.305), (0.376, 0.376, 0.376), "convnet",
        {16: "small", 32: "small"}, "built in (scikit-learn's load_digits): no --data-dir needed",
        # CPU-size recipe: a minute of teacher training reaches ~97%; short recover / evaluate.
        stages=_stages(squeeze=dict(epochs=15, lr=0.05, batch_size=64, weight_decay=5e-4),
                       recover=dict(iterations=200, lr=0.1, lambda_bn=10.0, batch_size=100),
                       relabel=dict(epochs=60, batch_size=100),
                       evaluate=dict(epochs=60, batch_size=100)),
        num_classes=10, crop_scale=(0.25, 1.0), flip=False, needs_data_dir=False),
    "tiny": Preset(
        "tiny", (224, 64), IMAGENET_MEAN, IMAGENET_STD, "resnet18", {224: "tiny224", 64: "small"},
        "{root}/wnids.txt, {root}/train/<wnid>/images/*.JPEG, {root}/val/images/*.JPEG and "
        "{root}/val/val_annotations.txt (the raw tiny-imagenet-200 release, unmodified)",
        stages=_stages(recover=dict(lr=0.1, lambda_bn=300.0)), num_classes=200, folder="tiny-imagenet-200",
        # --resolution 64 is SRe2L's Tiny-ImageNet protocol: its normalisation (recover_tiny.py utils.py), its
        # teacher (zeyuanyin/tiny-imagenet script/train_rn18.sh: SGD lr 0.2, batch 256, 50 epochs, wd 1e-4,
        # cosine, 5 linear warm-up epochs from 0.01 x lr) and its recover jitter (4 px)
        norm_by_resolution={64: (SRE2L_TINY_MEAN, SRE2L_TINY_STD)},
        stages_by_resolution={64: dict(squeeze=dict(lr=0.2, batch_size=256, warmup_epochs=5),
                                       recover=dict(jitter=4))}),
    "imagenette": Preset(
        "imagenette", (224,), IMAGENET_MEAN, IMAGENET_STD, "resnet18", {224: "imagenet"},
        _FOLDER_LAYOUT + " as in imagenette2 (wnid folder names)",
        stages=_stages(recover=dict(lr=0.25, lambda_bn=10.0)), num_classes=10, folder="imagenette2"),
    "imagenet": Preset(
        "imagenet", (224,), IMAGENET_MEAN, IMAGENET_STD, "resnet18", {224: "imagenet"},
        _FOLDER_LAYOUT + " as in ILSVRC-2012 (val/ sorted into wnid folders)",
        # teacher: assumed (ASSUMED_TEACHER); recover lambda_bn: LAMBDA_BN
        stages=_stages(recover=dict(lr=0.25, lambda_bn=500.0)), num_classes=1000, folder="imagenet"),
    # CIFAR is not in the WMDD paper: the recover values are the ImageNette ones, to be tuned.
    "cifar10": Preset(
        "cifar10", (32,), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), "resnet18", {32: "small"},
        "torchvision's CIFAR-10 files under {root} (cifar-10-batches-py/); pass --download to fetch",
        num_classes=10, folder="cifar"),
    "cifar100": Preset(
        "cifar100", (32,), (0.5071, 0.4865, 0.4409), (0.267, 0.256, 0.276), "resnet18", {32: "small"},
        "torchvision's CIFAR-100 files under {root} (cifar-100-python/); pass --download to fetch",
        num_classes=100, folder="cifar"),
    # Fashion-MNIST: native 28 px, ONE channel (images [N, 1, 28, 28] at every stage, no RGB, no upsampling);
    # the dataset's own normalisation (DC's code). Teacher: DC's ConvNet-3 (width 128, BatchNorm) with its
    # 1-channel stem, the first conv padded by 3 (28 -> 32: three 2x2 pools give 4x4; stem "gray"). Augment:
    # crops of 50-100% of the area (half a garment still shows what it is; the 8% crops of ImageNet show a
    # patch of fabric) and horizontal flips (clothing is left-right symmetric: label-preserving).
    # Teacher recipe measured (2 CPU cores): see docs/presets.md.
    "fashion_mnist": Preset(
        "fashion_mnist", (28,), (0.2861,), (0.3530,), "convnet", {28: "gray"},
        "the four original files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz (gzipped or not) in {root} itself, or in {root}/FashionMNIST/raw/ "
        "(torchvision's layout)",
        stages=_stages(squeeze=dict(epochs=FMNIST_EPOCHS, lr=0.05, batch_size=128, weight_decay=5e-4),
                       recover=dict(iterations=200, lr=0.1, lambda_bn=10.0, batch_size=100),
                       relabel=dict(epochs=60, batch_size=100),
                       evaluate=dict(epochs=60, batch_size=100)),
        num_classes=10, crop_scale=(0.5, 1.0), flip=True, teacher_pad=2, folder="fashion-mnist",
        system_dir="/usr/share/datasets/fashion-mnist"),
    "folder": Preset(
        "folder", (224, 64, 32), IMAGENET_MEAN, IMAGENET_STD, "resnet18",
        {224: "imagenet", 64: "small", 32: "small"}, _FOLDER_LAYOUT),
}


@dataclass(frozen=True)
class DatasetInfo:
    """A preset resolved against the data on disk: what every artifact's meta records."""
    name: str
    data_dir: str | None
    classes: tuple                # ordered class names; class index = position
    resolution: int               # protocol resolution (--resolution)
    image_size: int               # model input size in pixels
    mean: tuple
    std: tuple
    arch: str
    stem: str
    crop_scale: tuple
    flip: bool
    protocol: str = "wmdd"        # --protocol: the upstream choices this run expects (wmdd/protocol.py)
    teacher_pad: int = 0          # see Preset

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels: 3 (RGB; digits' gray pixels are repeated), 1 for a grayscale preset."""
        return len(self.mean)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the model's input space."""
        return (x01 - self._stat(self.mean, x01)) / self._stat(self.std, x01)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._stat(self.std, x) + self._stat(self.mean, x)

    @staticmethod
    def _stat(values, like):
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        fail(f"unknown --dataset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
