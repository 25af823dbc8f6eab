"""Shared test fixtures: small datasets in the real on-disk layouts, and a trained digits teacher.

- `make_tiny_tree(root, ...)`: a raw Tiny-ImageNet-200 tree (shuffled wnids.txt, words.txt,
  train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt), as released.
- `make_folder_tree(root, ...)`: an ImageFolder root with train/<class>/ and val/<class>/ (imagenette2 style).
- `digits_run` (session fixture): a run directory with teacher.pt and bn_stats.pt from a short digits
  squeeze. Tests must not write into it: copy it (`copy_run`) first.
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars are for people; keep failure logs readable

from PIL import Image

import squeeze


def _class_image(rng: np.random.Generator, class_index: int, size: int) -> Image.Image:
    """A class-dependent colour and stripe pattern plus noise: learnable, and distinct per class."""
    hue = np.array([(class_index * 67) % 256, (class_index * 131 + 40) % 256, (class_index * 29 + 90) % 256])
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy * (class_index % 3)) // max(2, size // (4 + class_index % 5))) % 2
    img = hue[None, None, :] * (0.5 + 0.5 * stripes[..., None]) + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_tiny_tree(root, num_classes: int = 4, train_per_class: int = 6, val_per_class: int = 3,
                   size: int = 64, seed: int = 0) -> dict:
    """Write a raw Tiny-ImageNet layout; returns {"root", "wnids" (sorted), "val_labels" {file: wnid}}."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1000000 + 7919 * (i + 1):08d}" for i in range(num_classes)]
    shuffled = list(wnids)
    random.Random(seed).shuffle(shuffled)
    if shuffled == sorted(shuffled) and num_classes > 1:
        shuffled.reverse()  # the file itself must not be sorted
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "wnids.txt"), "w") as fh:
        fh.write("\n".join(shuffled) + "\n")
    with open(os.path.join(root, "words.txt"), "w") as fh:
        fh.writelines(f"{w}\tthing {i}\n" for i, w in enumerate(wnids))
    class_of = {w: sorted(wnids).index(w) for w in wnids}
    for w in wnids:
        folder = os.path.join(root, "train", w, "images")
        os.makedirs(folder, exist_ok=True)
        boxes = []
        for i in range(train_per_class):
            name = f"{w}_{i}.JPEG"
            _class_image(rng, class_of[w], size).save(os.path.join(folder, name), quality=95)
            boxes.append(f"{name}\t0\t0\t{size - 1}\t{size - 1}\n")
        with open(os.path.join(root, "train", w, f"{w}_boxes.txt"), "w") as fh:
            fh.writelines(boxes)
    os.makedirs(os.path.join(root, "val", "images"), exist_ok=True)
    val = [(w, j) for w in wnids for j in range(val_per_class)]
    random.Random(seed + 1).shuffle(val)  # annotations interleave classes, as released
    val_labels = {}
    with open(os.path.join(root, "val", "val_annotations.txt"), "w") as fh:
        for n, (w, _) in enumerate(val):
            name = f"val_{n}.JPEG"
            _class_image(rng, class_of[w], size).save(os.path.join(root, "val", "images", name), quality=95)
            fh.write(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
            val_labels[name] = w
    return {"root": str(root), "wnids": sorted(wnids), "val_labels": val_labels}


def make_folder_tree(root, num_classes: int = 3, train_per_class: int = 5, val_per_class: int = 2,
                     size: int = 48, seed: int = 0) -> dict:
    """Write train/<class>/*.JPEG and val/<class>/*.JPEG; returns {"root", "classes"}."""
    rng = np.random.default_rng(seed)
    classes = [f"n{2000000 + 31 * i:08d}" for i in range(num_classes)]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                _class_image(rng, c, size).save(os.path.join(folder, f"{name}_{i}.JPEG"), quality=95)
    return {"root": str(root), "classes": classes}


def run_stage(module, argv: list):
    """Run a stage script's main() in-process, as its command line would."""
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def copy_run(src, dst) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return str(dst)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> str:
    """teacher.pt + bn_stats.pt from a 3-epoch digits squeeze (shared; copy before writing)."""
    out = tmp_path_factory.mktemp("digits_run")
    run_stage(squeeze, ["--dataset", "digits", "--epochs", "3", "--out", out, "--seed", "0"])
    return str(out)


@pytest.fixture
def tiny_tree(tmp_path) -> dict:
    return make_tiny_tree(tmp_path / "tiny-imagenet-200")


@pytest.fixture
def folder_tree(tmp_path) -> dict:
    return make_folder_tree(tmp_path / "imagenette2")
