"""Fashion-MNIST's files: the four IDX files (gzipped as released, or un-gzipped as torchvision's download
leaves them), found in a folder or in torchvision's `<root>/FashionMNIST/raw/`, checked and read.

More: docs/core.md, "wmdd/idx.py".
"""
from __future__ import annotations

import gzip
import math
import os
import zlib

import torch
import torchvision

from wmdd.cli import fail

FASHION = torchvision.datasets.FashionMNIST  # its file names, class names, raw layout and download
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}  # the 10,000 test images validate
MAGIC = {3: 0x00000803, 1: 0x00000801}  # uint8 (0x08) with 3 (images) or 1 (labels) dimensions
GET = ("apt-get install dataset-fashion-mnist (Debian: /usr/share/datasets/fashion-mnist), or pass --download "
       "to let torchvision fetch them into <data-dir>/FashionMNIST/raw/")
_CACHE: dict = {}


def raw_folder(root: str) -> str:
    """torchvision's layout: <root>/FashionMNIST/raw/."""
    return os.path.join(root, "FashionMNIST", "raw")


def _find(root: str, name: str):
    for folder in (root, raw_folder(root)):
        for candidate in (name + ".gz", name):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None


def present(root: str) -> bool:
    """Whether all four files are under root (or root/FashionMNIST/raw/)."""
    return all(_find(root, n) is not None for split in FILES.values() for n in split)


def locate(root: str) -> dict:
    """{file name: its path} of the four files under root (or root/FashionMNIST/raw/); a missing one fails."""
    names = [n for split in FILES.values() for n in split]
    found = {n: _find(root, n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if len(missing) == len(names):
        fail(f"no Fashion-MNIST files in {root} (nor in {raw_folder(root)}). Expected the four original files "
             f"{', '.join(n + '.gz' for n in names)}. Get them: {GET}; then point --data-dir at their folder.")
    if missing:
        fail(f"Fashion-MNIST file {missing[0]}.gz is missing from {root} (nor in {raw_folder(root)}, gzipped or "
             f"not){' with ' + str(len(missing) - 1) + ' other(s)' if len(missing) > 1 else ''}. Copy it from "
             f"the release next to the others, or reinstall: {GET}.")
    return found


def download(root: str) -> None:
    """torchvision's download into root/FashionMNIST/raw/ (both splits, gzipped and un-gzipped)."""
    try:
        for train in (True, False):
            FASHION(root, train=train, download=True)
    except (RuntimeError, OSError) as e:
        fail(f"torchvision could not download Fashion-MNIST into {raw_folder(root)} ({str(e).splitlines()[0]}). "
             f"Without network: apt-get install dataset-fashion-mnist and pass --data-dir "
             "/usr/share/datasets/fashion-mnist.")


def read(path: str, ndim: int) -> torch.Tensor:
    """The uint8 tensor of an IDX file (big-endian header: magic 0x0803 / 0x0801, then the dimensions).
    A short, corrupt or unreadable file fails with its name and the fix."""
    fix = f"Replace it with the original file (the dataset's release), or reinstall: {GET}."
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip stream
        fail(f"{path} is truncated or corrupt ({type(e).__name__}: {e}). {fix}")
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if len(raw) < header or magic != MAGIC[ndim]:
        fail(f"{path} does not start with an IDX {'image' if ndim == 3 else 'label'} header (magic "
             f"{MAGIC[ndim]:#010x}, found {'nothing' if magic is None else f'{magic:#010x}'}"
             f"{', too short' if magic == MAGIC[ndim] else ''}): the file is corrupt or not the one named. {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) - header != math.prod(dims):
        fail(f"{path} is truncated or corrupt: its header says {' x '.join(map(str, dims))} = {math.prod(dims)} "
             f"bytes of data, the file holds {len(raw) - header}. {fix}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).view(*dims)


def load(root: str, split: str) -> tuple:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of 'train' or 'val' (the test files)."""
    paths = locate(root)
    image_path, label_path = (paths[n] for n in FILES[split])
    key = tuple((p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in (image_path, label_path))
    if key not in _CACHE:
        images, labels = read(image_path, 3), read(label_path, 1).to(torch.int64)
        if tuple(images.shape[1:]) != (28, 28):
            fail(f"{image_path} holds {images.shape[1]}x{images.shape[2]} images; Fashion-MNIST's are 28x28. "
                 f"Replace it with the original file: {GET}.")
        if len(labels) != len(images) or (len(labels) and int(labels.max()) >= len(FASHION.classes)):
            fail(f"{label_path} holds {len(labels)} labels (largest {int(labels.max()) if len(labels) else None}) "
                 f"for the {len(images)} images of {image_path}; expected one label 0-9 per image. "
                 f"Replace both with the original files: {GET}.")
        while len(_CACHE) >= 2:  # the two splits (47 + 8 MB), read once per process
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (images.unsqueeze(1), labels)
    return _CACHE[key]
