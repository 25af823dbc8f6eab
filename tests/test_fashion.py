"""The fashion_mnist preset on a small dataset written in the real IDX format (gzip, big-endian header):
what the preset reads (one channel, native 28 px, torchvision's class names, the dataset's normalisation),
a tiny squeeze -> barycenter -> recover -> relabel on it (1-channel everywhere, grayscale PNGs), and the
messages for a missing, truncated or corrupt file (exit code 2, naming the file). Never reads
/usr/share/datasets."""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import barycenter
import recover
import relabel
import squeeze
from tests.conftest import run_stage
from wmdd import artifacts, cli, data, models, presets

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]  # torchvision's FashionMNIST.classes, label order


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """An IDX file as released: magic 0x00000803 (uint8, 3 dims) or 0x00000801 (1 dim), big-endian dims."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as fh:
        fh.write(payload)


def make_fashion(root, train_per_class: int = 4, test_per_class: int = 2, gz: bool = True, seed: int = 0) -> dict:
    """The four files under root with the original names; labels interleaved (0, 1, ..., 9, 0, ...)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, n in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.tile(np.arange(10), n)
        yy, xx = np.mgrid[0:28, 0:28]
        images = np.stack([np.clip(25 * c * ((xx + c * yy) % (c + 2) == 0) + rng.integers(0, 60, (28, 28)), 0, 255)
                           for c in labels]).astype(np.uint8)
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte" + (".gz" if gz else "")), images, gz)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte" + (".gz" if gz else "")), labels, gz)
        out[split] = (images, labels)
    return out


def _args(root=None):
    return squeeze.get_args_parser().parse_args(["--dataset", "fashion_mnist"]
                                                + (["--data-dir", str(root)] if root is not None else []))


def _exit(module, argv, capsys) -> tuple:
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, module.get_args_parser(), [str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("layout", ["flat", "torchvision-raw", "un-gzipped"])
def test_the_preset_reads_one_channel_28px_with_torchvision_classes_and_its_normalisation(tmp_path, layout):
    root = tmp_path / "fashion"
    where = root / "FashionMNIST" / "raw" if layout == "torchvision-raw" else root
    arrays = make_fashion(where, gz=layout != "un-gzipped")
    args = _args(root)
    info = data.resolve(args)
    assert info.classes == tuple(CLASSES) and info.channels == 1 and info.image_size == 28
    assert info.mean == (0.2861,) and info.std == (0.3530,) and info.stem == "gray"
    for split, key in (("train", "train"), ("val", "t10k")):
        ds = data.build_dataset(info, args, split)
        images, labels = arrays[key]
        assert len(ds) == len(labels) and list(ds.targets) == labels.tolist()
        for i in (0, 7, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == labels[i]
            expected = (images[i].astype(np.float64) / 255.0 - 0.2861) / 0.3530  # independent of wmdd
            np.testing.assert_allclose(x[0].numpy(), expected, rtol=0, atol=1e-5)
    x, _ = data.build_dataset(info, args, "train", augment=True)[0]
    assert x.shape == (1, 28, 28)
    assert data.eval_transform_id(info).startswith("identity|mean=[0.2861]|std=[0.353]")


def test_models_take_one_channel_on_the_gray_stem_and_the_rgb_stems_are_unchanged():
    torch.manual_seed(0)
    teacher = models.build_model("convnet", 10, "gray", 28)
    conv = teacher.features[0]
    assert (conv.in_channels, conv.padding) == (1, (3, 3))  # DC's ConvNet: 28 -> 32, three pools -> 4x4
    assert models.penultimate(teacher, torch.zeros(2, 1, 28, 28)).shape == (2, 128 * 4 * 4)
    for arch in ("resnet18", "mobilenet_v2", "vit_tiny"):
        assert models.build_model(arch, 10, "gray", 28)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    torch.manual_seed(0)
    rgb = models.build_model("convnet", 10, "small", 16)
    assert rgb.features[0].in_channels == 3 and rgb.features[0].padding == (1, 1)
    assert rgb.classifier.in_features == 128 * 2 * 2


def test_squeeze_barycenter_recover_relabel_on_it_keep_one_channel(tmp_path):
    root = tmp_path / "fashion"
    make_fashion(root, train_per_class=6, test_per_class=2)
    out = tmp_path / "run"
    common = ["--dataset", "fashion_mnist", "--data-dir", root, "--out", out]
    run_stage(squeeze, common + ["--epochs", "1", "--batch-size", "20"])
    run_stage(barycenter, common + ["--ipc", "2"])
    run_stage(recover, common + ["--ipc", "2", "--iterations", "3"])
    run_stage(relabel, common + ["--ipc", "2", "--epochs", "1"])
    paths = artifacts.run_paths(str(out))
    teacher = artifacts.load(paths.teacher, stage="squeeze")
    assert teacher["model_args"]["stem"] == "gray" and teacher["meta"]["mean"] == [0.2861]
    assert teacher["model"]["features.0.weight"].shape == (128, 1, 3, 3)
    syn = artifacts.load(paths.synthetic, stage="recover")
    assert syn["images"].dtype == torch.uint8 and tuple(syn["images"].shape) == (20, 1, 28, 28)
    assert syn["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    png = os.path.join(paths.images, "T-shirt_top", "T-shirt_top_0.png")  # "/" in a class name: "_"
    with Image.open(png) as im:
        assert im.mode == "L" and im.size == (28, 28)
        assert torch.equal(torch.from_numpy(np.asarray(im).copy()), syn["images"][0, 0])
    assert os.path.isdir(paths.labels) and os.listdir(paths.labels)


def test_jpeg_storage_of_one_channel_images_stays_one_channel():
    from wmdd import protocol
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    decoded, encoded = protocol.jpeg_round_trip(images, 75)
    assert decoded.shape == (3, 1, 28, 28) and decoded.dtype == torch.uint8 and len(encoded) == 3


def _break(root, name: str, how: str) -> str:
    path = os.path.join(root, name + ".gz")
    if how == "missing":
        os.remove(path)
    elif how == "truncated-gzip":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    elif how == "truncated-idx":  # a valid gzip stream whose IDX data stops early
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
        with gzip.open(path, "wb") as fh:
            fh.write(raw[:-100])
    elif how == "corrupt-header":
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
        with gzip.open(path, "wb") as fh:
            fh.write(struct.pack(">I", 0x0000_0903) + raw[4:])
    return name


@pytest.mark.parametrize("how,name", [("missing", "t10k-labels-idx1-ubyte"),
                                      ("truncated-gzip", "train-images-idx3-ubyte"),
                                      ("truncated-idx", "train-images-idx3-ubyte"),
                                      ("corrupt-header", "train-labels-idx1-ubyte")])
def test_a_missing_truncated_or_corrupt_file_exits_2_naming_it(tmp_path, capsys, how, name):
    root = tmp_path / "fashion"
    make_fashion(root)
    _break(root, name, how)
    code, err = _exit(squeeze, ["--dataset", "fashion_mnist", "--data-dir", root, "--out", tmp_path / "run",
                                "--epochs", "1"], capsys)
    assert code == 2 and name in err, err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "teacher.pt")


def test_download_is_torchvisions_into_its_raw_folder(tmp_path, monkeypatch):
    from wmdd import idx
    calls = []

    class FakeFashionMNIST:  # torchvision's download, without the network: the files in <root>/FashionMNIST/raw/
        classes = CLASSES

        def __init__(self, root, train=True, download=False):
            calls.append((str(root), train, download))
            make_fashion(os.path.join(root, "FashionMNIST", "raw"), gz=False)

    monkeypatch.setattr(idx, "FASHION", FakeFashionMNIST)
    root = tmp_path / "new"
    info = data.resolve(squeeze.get_args_parser().parse_args(
        ["--dataset", "fashion_mnist", "--data-dir", str(root), "--download"]))
    assert calls == [(str(root), True, True), (str(root), False, True)] and info.classes == tuple(CLASSES)
    assert len(data.build_dataset(info, _args(root), "val")) == 20
    data.resolve(squeeze.get_args_parser().parse_args(  # already there: no second download
        ["--dataset", "fashion_mnist", "--data-dir", str(root), "--download"]))
    assert len(calls) == 2


def test_no_dataset_exits_2_naming_the_package_and_download(tmp_path, capsys, monkeypatch):
    code, err = _exit(squeeze, ["--dataset", "fashion_mnist", "--data-dir", tmp_path, "--out", tmp_path / "r"],
                      capsys)
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err and "--download" in err, err
    # no --data-dir: $WMDD_DATA/fashion-mnist, ./data/fashion-mnist, then the Debian folder (patched here)
    monkeypatch.setitem(presets.PRESETS, "fashion_mnist", dataclasses.replace(
        presets.PRESETS["fashion_mnist"], system_dir=str(tmp_path / "nowhere")))
    monkeypatch.setenv("WMDD_DATA", str(tmp_path / "wmdd_data"))
    monkeypatch.chdir(tmp_path)
    code, err = _exit(squeeze, ["--dataset", "fashion_mnist", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "fashion-mnist" in err and "apt-get install dataset-fashion-mnist" in err, err
    make_fashion(tmp_path / "wmdd_data" / "fashion-mnist")
    info = data.resolve(_args())
    assert info.data_dir == os.path.join(str(tmp_path / "wmdd_data"), "fashion-mnist")
    shutil.rmtree(tmp_path / "wmdd_data")
    make_fashion(tmp_path / "nowhere" / "FashionMNIST" / "raw")  # the system folder, torchvision's layout
    info = data.resolve(_args())
    assert info.data_dir == str(tmp_path / "nowhere")
