"""Dataset registry: presets, on-disk layouts, transforms and the paper's per-stage defaults.

More: docs/core.md, "wmdd/data.py".
"""
from __future__ import annotations

import argparse
import os

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import Dataset

from wmdd import idx
from wmdd.cli import fail
from wmdd.presets import PRESETS, DatasetInfo, Preset, get_preset

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
DOWNLOADABLE = ("cifar10", "cifar100", "fashion_mnist")  # torchvision fetches them with --download


def preset_defaults(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """Fill every stage flag left at None with the preset's (paper) value."""
    preset = get_preset(args.dataset)
    values = dict(preset.stages.get(stage, {}))
    values.update(preset.stages_by_resolution.get(getattr(args, "resolution", None), {}).get(stage, {}))
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _layout_error(preset: Preset, root, problem: str):
    fail(f"{problem}. The {preset.name!r} dataset is expected as "
         f"{preset.layout.format(root=root or '<data-dir>')}. Point --data-dir at that root "
         "(or choose another --dataset).")


def _list_images(folder: str) -> list:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def _tiny_classes(root: str) -> tuple:
    wnids_file = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_file):
        _layout_error(PRESETS["tiny"], root, f"{wnids_file} does not exist")
    with open(wnids_file) as fh:
        wnids = sorted({line.strip() for line in fh if line.strip()})
    if not wnids:
        _layout_error(PRESETS["tiny"], root, f"{wnids_file} lists no class")
    return tuple(wnids)


def _folder_classes(preset: Preset, root: str) -> tuple:
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        _layout_error(preset, root, f"{train} is not a directory")
    classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    if not classes:
        _layout_error(preset, root, f"{train} holds no class folder")
    return tuple(classes)


def resolve(args: argparse.Namespace, on_disk: bool = True) -> DatasetInfo:
    """Check the dataset exists in the expected layout and resolve the preset against it.
    Fills args.resolution when it was None. on_disk=False (a --dry-run): nothing is looked for or read, and
    the classes are the preset's count, numbered."""
    preset = get_preset(args.dataset)
    root = args.data_dir
    if preset.needs_data_dir and on_disk:
        if not root:
            root = args.data_dir = default_data_dir(preset, getattr(args, "download", False))
        elif not os.path.isdir(root) and not (preset.name in DOWNLOADABLE and getattr(args, "download", False)):
            _layout_error(preset, root, f"the data directory {root} does not exist"
                          + (f". Get it: {idx.GET}" if preset.name == "fashion_mnist" else ""))
    if args.resolution is None:
        args.resolution = preset.resolutions[0]
    if args.resolution not in preset.resolutions:
        fail(f"--resolution {args.resolution} is not a protocol of --dataset {preset.name}; "
             f"choose one of {list(preset.resolutions)}.")

    classes = _read_classes(preset, root, args) if on_disk else tuple(str(c) for c in range(preset.num_classes or 0))
    image_size = args.resolution
    mean, std = preset.norm_by_resolution.get(args.resolution, (preset.mean, preset.std))
    return DatasetInfo(name=preset.name, data_dir=root, classes=classes, resolution=args.resolution,
                       image_size=image_size, mean=mean, std=std, arch=preset.arch,
                       stem=preset.stems[args.resolution], crop_scale=preset.crop_scale, flip=preset.flip,
                       protocol=getattr(args, "protocol", None) or "wmdd", teacher_pad=preset.teacher_pad)


def _read_classes(preset: Preset, root, args) -> tuple:
    if preset.name == "digits":
        return tuple(str(d) for d in range(10))
    if preset.name == "tiny":
        return _tiny_classes(root)
    if preset.name in ("cifar10", "cifar100"):
        return tuple(_cifar(preset.name, root, train=False, download=getattr(args, "download", False)).classes)
    if preset.name == "fashion_mnist":
        if getattr(args, "download", False) and not idx.present(root):
            idx.download(root)
        idx.locate(root)  # all four files there (read and checked when a stage loads a split)
        return tuple(idx.FASHION.classes)
    classes = _folder_classes(preset, root)
    if preset.num_classes is not None and preset.name in ("imagenette", "imagenet") \
            and len(classes) != preset.num_classes:
        print(f"note: {root}/train has {len(classes)} class folders; the {preset.name} preset expects "
              f"{preset.num_classes}. Continuing with the folders found.")
    return classes


def default_data_dir(preset: Preset, download: bool = False) -> str:
    """--data-dir when not given: $WMDD_DATA/<the release's folder name>, then ./data/<folder name>, then
    the system package's folder (Fashion-MNIST); the first that exists (with --download: the first place,
    created by torchvision)."""
    if preset.folder is None:
        _layout_error(preset, None, f"--dataset {preset.name} needs --data-dir (it has no default folder name)")
    places = []
    if os.environ.get("WMDD_DATA"):
        places.append(os.path.join(os.environ["WMDD_DATA"], preset.folder))
    places.append(os.path.join("data", preset.folder))
    places += [preset.system_dir] if preset.system_dir else []
    for place in places:
        if os.path.isdir(place):
            return place
    if download and preset.name in DOWNLOADABLE:
        return places[0]
    fail(f"--dataset {preset.name}: no --data-dir was given, and no dataset folder was found at "
         f"{' or '.join(places)} "
         f"({'WMDD_DATA=' + os.environ['WMDD_DATA'] if os.environ.get('WMDD_DATA') else 'WMDD_DATA is unset'}). "
         f"Put the dataset there as {preset.layout.format(root='<that folder>')}, set WMDD_DATA to the folder "
         f"holding {preset.folder}/, or pass --data-dir."
         + (f" Get the files: {idx.GET}." if preset.name == "fashion_mnist" else ""))


# ---------------------------------------------------------------------------------------------
# transforms


def source_size(info: DatasetInfo) -> int | None:
    """Native image size of the stored files when known (tiny: 64, digits: 8 -> upsampled, cifar: 32)."""
    return {"tiny": 64, "cifar10": 32, "cifar100": 32, "fashion_mnist": 28}.get(info.name)


def train_transform(info: DatasetInfo) -> T.Compose:
    """Teacher training: RandomResizedCrop + flip at the model input size (tiny 224: upsampled 64 px);
    a preset with `teacher_pad` (Fashion-MNIST): a RandomCrop of the zero-padded image + flip instead."""
    crop = T.RandomCrop(info.image_size, padding=info.teacher_pad) if info.teacher_pad else \
        T.RandomResizedCrop(info.image_size, scale=info.crop_scale, antialias=True)
    steps = [T.ToImage(), T.ToDtype(torch.float32, scale=True), crop]
    if info.flip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.Normalize(info.mean, info.std))
    return T.Compose(steps)


def eval_transform(info: DatasetInfo) -> T.Compose:
    """Validation / statistics / features. At 224 px, for every dataset (Tiny-ImageNet included:
    64 -> 256 -> centre 224), the released `prepare_data`: Resize(256) -> CenterCrop(224) on the PIL image,
    then to float and normalise. Smaller protocols: a resize to the model input (64 and 32 px images
    pass unchanged)."""
    S = info.image_size
    if S == 224:
        resize = [T.Resize(256, antialias=True), T.CenterCrop(224)]
    else:
        resize = [T.Resize((S, S), antialias=True)]
    return T.Compose(resize + [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(info.mean, info.std)])


def eval_transform_id(info: DatasetInfo, legacy: bool = False, mean=None, std=None) -> str:
    """What `eval_transform` does, recorded in every artifact's meta (features, BN statistics and
    accuracies depend on it). legacy=True: what the code before this record did (float resize; Tiny at
    224 a plain resize), with the normalisation an old artifact recorded."""
    S = info.image_size
    if legacy:
        if info.name in ("imagenette", "imagenet") or (info.name == "folder" and S >= 128):
            ops = "float-resize256-centercrop224"
        else:
            ops = f"float-resize{S}x{S}"
    else:
        ops = "resize256-centercrop224" if S == 224 else f"resize{S}x{S}"
    if source_size(info) == S or info.name == "digits":
        ops = "identity" if source_size(info) == S else ops.replace("float-", "")  # the same values either way
    norm = [[round(float(v), 6) for v in mean or info.mean], [round(float(v), 6) for v in std or info.std]]
    return f"{ops}|mean={norm[0]}|std={norm[1]}"


# ---------------------------------------------------------------------------------------------
# datasets


class ImageList(Dataset):
    """(path, label) pairs read with PIL as RGB; `targets` lists the labels."""

    def __init__(self, samples: list, classes: tuple, transform=None):
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.classes = classes
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with Image.open(path) as im:
            image = im.convert("RGB")
        return (self.transform(image) if self.transform else image), label


class TensorImages(Dataset):
    """Images already in memory as float [N, C, H, W] in [0, 1] or uint8; the transform sees the tensor."""

    def __init__(self, images: torch.Tensor, targets: list, classes: tuple, transform=None):
        self.images = images
        self.targets = list(targets)
        self.classes = classes
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.targets[i]


def _tiny_samples(info: DatasetInfo, split: str) -> list:
    root, index = info.data_dir, {c: i for i, c in enumerate(info.classes)}
    preset = PRESETS["tiny"]
    samples = []
    if split == "train":
        for wnid in info.classes:
            folder = os.path.join(root, "train", wnid, "images")
            if not os.path.isdir(folder):
                _layout_error(preset, root, f"class {wnid} (in wnids.txt) has no folder {folder}")
            samples += [(p, index[wnid]) for p in _list_images(folder)]
    else:
        annotations = os.path.join(root, "val", "val_annotations.txt")
        if not os.path.isfile(annotations):
            _layout_error(preset, root, f"{annotations} does not exist")
        with open(annotations) as fh:
            for line_no, line in enumerate(fh, 1):
                parts = line.split("\t")
                if len(parts) < 2:
                    continue
                file, wnid = parts[0].strip(), parts[1].strip()
                if wnid not in index:
                    _layout_error(preset, root, f"{annotations} line {line_no} names {wnid}, "
                                                "which is not in wnids.txt")
                samples.append((os.path.join(root, "val", "images", file), index[wnid]))
        missing = [p for p, _ in samples if not os.path.isfile(p)]
        if missing:
            _layout_error(preset, root, f"{len(missing)} validation images listed in {annotations} "
                                        f"are missing, e.g. {missing[0]}")
    return samples


def _folder_samples(info: DatasetInfo, split: str) -> list:
    preset = PRESETS[info.name]
    base = os.path.join(info.data_dir, split)
    if not os.path.isdir(base):
        _layout_error(preset, info.data_dir, f"{base} is not a directory")
    samples = []
    for i, c in enumerate(info.classes):
        folder = os.path.join(base, c)
        if not os.path.isdir(folder):
            _layout_error(preset, info.data_dir, f"class {c} (a folder of train/) has no folder {folder}")
        samples += [(p, i) for p in _list_images(folder)]
    return samples


def _cifar(name: str, root, train: bool, download: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        return cls(root, train=train, download=download)
    except RuntimeError as e:
        _layout_error(PRESETS[name], root, f"{name} was not found under {root} ({e})")


def _digits(info: DatasetInfo, split: str) -> TensorImages:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # [N, 1, 8, 8]
    targets = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(torch.arange(len(targets)).numpy(), test_size=0.2,
                                          stratify=targets.numpy(), random_state=0)
    idx = torch.as_tensor(train_idx if split == "train" else val_idx)
    x = torch.nn.functional.interpolate(images[idx], size=info.resolution, mode="bilinear",
                                        align_corners=False).clamp_(0, 1).repeat(1, 3, 1, 1)
    return TensorImages(x, targets[idx].tolist(), info.classes)


def build_dataset(info: DatasetInfo, args: argparse.Namespace, split: str = "train", augment: bool = False):
    """The real `split` ('train' or 'val') with the training (augment=True) or eval transform.
    Items are (normalised float tensor [C, S, S], int label); `.targets` lists the labels."""
    transform = train_transform(info) if augment else eval_transform(info)
    if info.name == "digits":
        ds = _digits(info, split)
        ds.transform = transform
    elif info.name == "tiny":
        ds = ImageList(_tiny_samples(info, split), info.classes, transform)
    elif info.name == "fashion_mnist":  # uint8 [N, 1, 28, 28]: one channel, native size
        images, labels = idx.load(info.data_dir, split)
        ds = TensorImages(images, labels.tolist(), info.classes, transform)
    elif info.name in ("cifar10", "cifar100"):
        raw = _cifar(info.name, info.data_dir, train=split == "train", download=getattr(args, "download", False))
        ds = CifarImages(raw, info.classes, transform)
    else:
        ds = ImageList(_folder_samples(info, split), info.classes, transform)
    empty = [info.classes[c] for c in range(info.num_classes) if c not in set(ds.targets)]
    if empty:
        _layout_error(PRESETS[info.name], info.data_dir,
                      f"the {split} split has no image for class(es) {', '.join(empty[:5])}"
                      + (" ..." if len(empty) > 5 else ""))
    return ds


class CifarImages(Dataset):
    """A torchvision CIFAR dataset with our transform and `targets`."""

    def __init__(self, raw, classes: tuple, transform=None):
        self.raw, self.classes, self.transform = raw, classes, transform
        self.targets = list(raw.targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image, label = self.raw[i]
        return (self.transform(image) if self.transform else image), label


def class_indices(targets, num_classes: int) -> list:
    """For each class, the dataset indices of its images (in dataset order)."""
    per_class = [[] for _ in range(num_classes)]
    for i, t in enumerate(targets):
        per_class[int(t)].append(i)
    return per_class
