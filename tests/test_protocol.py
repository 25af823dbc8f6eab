"""--protocol wmdd|released: each choice against an independent oracle (run.sh's batch rule, torchvision's
own Resize(256) + CenterCrop(224), PIL's own JPEG round trip, numpy's randn + POT's barycenter, float64
recomputations of the released loss expressions), the downstream refusal, and the released protocol end to
end with its printed configuration checked against the table of docs/protocol.md."""
from __future__ import annotations

import argparse
import os
import re

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as TV
from PIL import Image
from torch import nn

import barycenter
import evaluate
import recover
import relabel
import squeeze
from tests.conftest import copy_run, make_folder_tree, make_tiny_tree, run_stage
from wmdd import artifacts, cli, data, presets, protocol, subsets
from wmdd import ot as wot

README = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")).read()


def _exit_code(module, argv) -> int:
    with pytest.raises(SystemExit) as e:
        cli.run(module.main, module.get_args_parser(), [str(a) for a in argv])
    return e.value.code


# ---------------------------------------------------------------------------------------------
# 1. KD batch size: run.sh's rule


@pytest.mark.parametrize("dataset,ipc,expected", [
    ("tiny", 1, 100), ("tiny", 5, 100), ("imagenet", 1, 100), ("imagenet", 9, 100),
    ("imagenette", 1, 10), ("imagenette", 5, 50), ("imagenette", 10, 100), ("imagenette", 50, 100),
    ("cifar100", 2, 20), ("digits", 1, 10), ("tiny", 50, 100)])
def test_kd_batch_size_is_run_sh_rule(dataset, ipc, expected):
    """run.sh: KD_BATCH_SIZE=10*IPC if the dataset is neither tiny-imagenet nor imagenet and IPC < 10,
    else 100 (the expected column is that bash condition evaluated by hand)."""
    for module in (relabel, evaluate):
        args = module.get_args_parser().parse_args(["--dataset", dataset, "--ipc", str(ipc)])
        subsets.default_batch_size(args)
        data.preset_defaults(args, module.__name__)
        assert args.batch_size == expected, (module.__name__, dataset, ipc)


@pytest.mark.parametrize("dataset,expected", [("tiny", 100), ("imagenette", 10)])
def test_relabel_prints_the_resolved_kd_batch_at_ipc_1(tmp_path, capsys, dataset, expected):
    """Acceptance: `relabel.py --dataset tiny ... --ipc 1` resolves and prints 100, imagenette 10 (the run
    then stops at the missing synthetic.pt with exit code 2)."""
    tree = make_tiny_tree(tmp_path / "t", num_classes=2, train_per_class=1, val_per_class=1) if dataset == "tiny" \
        else make_folder_tree(tmp_path / "f", num_classes=2, train_per_class=1, val_per_class=1)
    assert _exit_code(relabel, ["--dataset", dataset, "--data-dir", tree["root"], "--ipc", 1,
                                "--out", tmp_path / "run"]) == 2
    out = capsys.readouterr().out
    assert re.search(rf"^\s+batch_size = {expected}$", out, re.M)
    assert re.search(rf"^\s+kd_batch_size = {expected}\s", out, re.M)


# ---------------------------------------------------------------------------------------------
# 2. the 224 px eval transform


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("dataset", ["tiny", "imagenette"])
def test_eval_transform_is_torchvision_resize256_centercrop224(tmp_path, dataset):
    """Every dataset at 224 px, Tiny-ImageNet included (64 -> 256 -> 224): torchvision's own
    Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize on the PIL image, as the released prepare_data."""
    if dataset == "tiny":
        tree = make_tiny_tree(tmp_path / "t", num_classes=2, train_per_class=1, val_per_class=1)
    else:
        tree = make_folder_tree(tmp_path / "f", num_classes=2, train_per_class=1, val_per_class=1)
        path = os.path.join(tree["root"], "val", tree["classes"][0], f"{tree['classes'][0]}_0.JPEG")
        _photo(300, 200).save(path, quality=95)  # a non-square photo: the short side goes to 256
    args = argparse.Namespace(dataset=dataset, data_dir=tree["root"], resolution=224, download=False)
    info = data.resolve(args)
    ds = data.build_dataset(info, args, "val")
    oracle = TV.Compose([TV.Resize(256), TV.CenterCrop(224), TV.ToTensor(),
                         TV.Normalize(presets.IMAGENET_MEAN, presets.IMAGENET_STD)])
    for i in range(len(ds)):
        path = ds.samples[i][0]
        with Image.open(path) as im:
            expected = oracle(im.convert("RGB"))
        torch.testing.assert_close(ds[i][0], expected, rtol=0, atol=1e-6)
    assert ds[0][0].shape == (3, 224, 224)


def test_artifacts_from_the_old_eval_transform_are_refused(tmp_path):
    """A Tiny 224 artifact made with the old plain resize (no eval-transform record) changes meaning:
    refused with a clear message; digits (unchanged transform) is still accepted."""
    tree = make_tiny_tree(tmp_path / "t", num_classes=2, train_per_class=1, val_per_class=1)
    info = data.resolve(argparse.Namespace(dataset="tiny", data_dir=tree["root"], resolution=224, download=False))
    meta = artifacts.make_meta("squeeze", None, info)
    artifacts.check_compatible(meta, info, "teacher.pt")
    del meta["eval_transform"]
    with pytest.raises(cli.UserError, match="Resize\\(256\\) -> CenterCrop\\(224\\).*Regenerate"):
        artifacts.check_compatible(meta, info, "teacher.pt")
    digits = data.resolve(argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False))
    old = artifacts.make_meta("squeeze", None, digits)
    del old["eval_transform"]
    artifacts.check_compatible(old, digits, "teacher.pt")


# ---------------------------------------------------------------------------------------------
# 3. image storage


def test_jpeg_path_is_pils_own_round_trip(tmp_path):
    """The released save (PIL, .jpg, default quality) and load (PIL, RGB): bit for bit."""
    images = torch.from_numpy(np.stack([np.asarray(_photo(24, 24, s)) for s in range(3)])).permute(0, 3, 1, 2)
    decoded, encoded = protocol.jpeg_round_trip(images.contiguous(), 75)
    for i in range(len(images)):
        path = tmp_path / f"class000_id{i:03d}.jpg"
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path)  # PIL's default quality
        with Image.open(path) as im:
            expected = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(decoded[i], expected)
        assert path.read_bytes() == encoded[i]
    assert not torch.equal(decoded, images)  # it is lossy: the choice matters


def test_pixel_rounding_floor_is_the_released_astype():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    released = (x.numpy() * 255).astype(np.uint8)  # save_images: (image_np * 255).astype(np.uint8)
    assert np.array_equal(protocol.quantise(x, "floor").numpy(), released)
    assert np.array_equal(protocol.quantise(x, "round").numpy(), np.floor(x.numpy() * 255 + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# 4. the released barycenter start


def test_released_barycenter_start_is_numpy_randn_then_pots_barycenter():
    """--init randn: atoms np.random.randn(k, d) (np.random.seed(class seed)), then POT's exact
    free-support barycenter from them, on the raw features (as recover/barycenter.py)."""
    g = torch.Generator().manual_seed(1)
    feats = [torch.rand(40, 6, generator=g) * 3 + c for c in range(2)]
    args = barycenter.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "4", "--init", "randn",
                                                    "--seed", "7"])
    protocol.resolve(args)
    data.preset_defaults(args, "barycenter")
    out = barycenter.solve(args, feats, first_class=3)
    for i, f in enumerate(feats):
        np.random.seed(wot.class_seed(7, 3 + i))
        start = np.random.randn(4, 6)
        y = f.double().numpy()
        expected = ot.lp.free_support_barycenter([y], [np.full(len(y), 1 / len(y))], start, b=np.full(4, 0.25))
        np.testing.assert_allclose(out.points[i].numpy(), expected, rtol=1e-5, atol=1e-5)
    kmeans = barycenter.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "4", "--seed", "7"])
    protocol.resolve(kmeans)
    data.preset_defaults(kmeans, "barycenter")
    assert kmeans.barycenter_init == "kmeans++" and "barycenter_init" in barycenter.RESULT_KEYS


# ---------------------------------------------------------------------------------------------
# 5. learned barycenter weights


def test_kd_weights_match_the_released_and_our_expressions_in_float64():
    g = torch.Generator().manual_seed(3)
    n, C, T = 12, 7, 20.0
    raw = torch.rand(30, generator=g) + 0.1                   # the set's barycenter weights
    index = torch.randperm(30, generator=g)[:n]               # the batch's images
    mix = torch.randperm(n, generator=g)                      # CutMix partner of each row
    lam = 0.37
    s, t = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
    norm = raw / raw.mean()

    # train_FKD.py: loss = KLDiv(reduction='none').sum(1); weights /= mean(weights); loss *= weights; mean
    loss = nn.KLDivLoss(reduction="none")(F.log_softmax(s.double() / T, 1), F.softmax(t.double() / T, 1)).sum(1)
    weights = raw.double()[index]
    weights = weights / weights.mean()
    released = (loss * weights).mean()  # (soft_kl is float32: compared at rtol 1e-4)
    w = protocol.kd_image_weights(norm, index, mix, lam, "own-batch")
    torch.testing.assert_close(evaluate.soft_kl(s, t, T, w).double(), released, rtol=1e-4, atol=0)
    # one torchrun rank's rows: the weights are the whole batch's (normalised over the batch, then sliced)
    parts = sum(evaluate.soft_kl(s[r], t[r], T, w[r], n) for r in (slice(0, 5), slice(5, n)))
    torch.testing.assert_close(parts.double(), released, rtol=1e-4, atol=0)

    # ours: w / mean over the set, area mix of the two images' weights
    ours = (loss * (lam * norm.double()[index] + (1 - lam) * norm.double()[index][mix])).mean()
    w = protocol.kd_image_weights(norm, index, mix, lam, "mixed-set")
    torch.testing.assert_close(evaluate.soft_kl(s, t, T, w).double(), ours, rtol=1e-4, atol=0)
    assert abs(ours - released) > 1e-2 * released  # the two weightings differ here by far more than the tolerance
    # uniform weights: both are the plain batch mean
    u = torch.full((30,), 1 / 30)
    for mode in ("own-batch", "mixed-set"):
        assert torch.allclose(protocol.kd_image_weights(u / u.mean(), index, mix, lam, mode), torch.ones(n))


# ---------------------------------------------------------------------------------------------
# 6. Tiny-ImageNet at 64 px: SRe2L's recipe


def test_tiny_64_takes_sre2ls_recipe(tmp_path):
    tree = make_tiny_tree(tmp_path / "t", num_classes=2, train_per_class=1, val_per_class=1)
    args = squeeze.get_args_parser().parse_args(["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", "64"])
    info = data.resolve(args)
    data.preset_defaults(args, "squeeze")
    # SRe2L *small_dataset/utils.py denormalize_tiny; zeyuanyin/tiny-imagenet script/train_rn18.sh
    assert info.mean == (0.4802, 0.4481, 0.3975) and info.std == (0.2302, 0.2265, 0.2262) and info.stem == "small"
    assert (args.lr, args.batch_size, args.epochs, args.weight_decay, args.warmup_epochs) == (0.2, 256, 50, 1e-4, 5)
    r = recover.get_args_parser().parse_args(["--dataset", "tiny", "--data-dir", tree["root"], "--resolution", "64"])
    recover.resolve_args(r, data.resolve(r), torch.device("cpu"))
    assert r.jitter == 4  # recover_tiny.py --jitter 4
    r224 = squeeze.get_args_parser().parse_args(["--dataset", "tiny", "--data-dir", tree["root"]])
    info224 = data.resolve(r224)
    data.preset_defaults(r224, "squeeze")
    assert info224.mean == presets.IMAGENET_MEAN and (r224.lr, r224.batch_size, r224.warmup_epochs) == (0.025, 32, 0)


# ---------------------------------------------------------------------------------------------
# --data-dir default


def test_data_dir_default_and_the_places_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WMDD_DATA", str(tmp_path / "store"))
    assert _exit_code(squeeze, ["--dataset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path / "store"), "tiny-imagenet-200") in err
    assert os.path.join("data", "tiny-imagenet-200") in err and "--data-dir" in err
    tree = make_tiny_tree(tmp_path / "store" / "tiny-imagenet-200", num_classes=2, train_per_class=1, val_per_class=1)
    args = squeeze.get_args_parser().parse_args(["--dataset", "tiny"])
    assert data.resolve(args).data_dir == tree["root"]
    monkeypatch.delenv("WMDD_DATA")
    make_folder_tree(tmp_path / "data" / "imagenette2", num_classes=2, train_per_class=1, val_per_class=1)
    args = squeeze.get_args_parser().parse_args(["--dataset", "imagenette"])
    assert data.resolve(args).data_dir == os.path.join("data", "imagenette2")


# ---------------------------------------------------------------------------------------------
# --protocol released end to end, the printed block against the README, the downstream refusal


def _readme_rows() -> list:
    section = README.split("## Differences from the released code", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]


def _check_block_against_readme(out: str, stage: str) -> int:
    """Every choice line the stage printed under --protocol released names a README row whose flag cell
    restores exactly that value, and whose 'ours' cell holds this project's value."""
    rows = _readme_rows()
    lines = re.findall(r"^\s+(\w+) = (\S+)\s+\(--protocol released; wmdd: (\S+), released: (\S+);", out, re.M)
    for name, value, ours, released in lines:
        c = protocol.BY_NAME[name]
        assert value == released == str(c.released) and ours == str(c.ours)
        row = [r for r in rows if f"`{c.flag} {value}`" in r.split("|")[-2]]
        assert len(row) == 1, f"README has no single row restoring {c.flag} {value}"
        assert str(c.ours) in row[0].split("|")[3], row[0]
        assert c.source.split(" ")[0] in row[0].split("|")[2], row[0]
    assert f"[{stage}] protocol: released" in out
    return len(lines)


def test_every_choice_has_a_readme_row():
    rows = _readme_rows()
    for c in protocol.CHOICES:
        assert sum(f"`{c.flag} {c.released}`" in r for r in rows) == 1, c.flag


def test_released_protocol_end_to_end_on_digits(digits_run, tmp_path, capsys):
    out = copy_run(digits_run, tmp_path / "run")
    common = ["--dataset", "digits", "--ipc", 2, "--out", out, "--protocol", "released"]
    run_stage(squeeze, ["--dataset", "digits", "--out", out, "--protocol", "released", "--stats-only"])
    printed = _check_block_against_readme(capsys.readouterr().out, "squeeze")
    for module, extra in ((barycenter, []), (recover, ["--iterations", 2]), (relabel, ["--epochs", 1]),
                          (evaluate, ["--epochs", 1, "--baseline", "none"])):
        run_stage(module, common + extra)
        printed += _check_block_against_readme(capsys.readouterr().out, module.__name__)
    assert printed == len(protocol.CHOICES)  # every choice was printed by its stage
    bary = artifacts.load(artifacts.run_paths(out).barycenters)
    assert bary["meta"]["protocol"] == {"name": "released", "choices": {"barycenter_init": "randn"}, "flags": []}
    syn = artifacts.load(artifacts.run_paths(out).synthetic)
    assert syn["meta"]["protocol"]["choices"] == {"amp": "fp32", "pixel_rounding": "floor", "image_format": "jpeg"}
    # relabel / evaluate read the decoded JPEG pixels, the same as the .jpg tree holds
    for i, c in enumerate(syn["labels"].tolist()):
        with Image.open(os.path.join(artifacts.run_paths(out).images, str(c), f"{c}_{i % 2}.jpg")) as im:
            assert torch.equal(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1),
                               syn["images"][i])

    # downstream under the other protocol: refused, exit code 2, nothing written
    manifest = os.path.join(artifacts.run_paths(out).labels, "manifest.pt")
    before = os.path.getmtime(manifest)
    assert _exit_code(relabel, ["--dataset", "digits", "--ipc", 2, "--out", out, "--epochs", 1]) == 2
    err = capsys.readouterr().err
    assert "--protocol released" in err and "--image-format jpeg" in err and "--pixel-rounding floor" in err
    assert os.path.getmtime(manifest) == before
    assert _exit_code(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 1]) == 2
    err = capsys.readouterr().err
    assert "bn_stats.pt was made under --protocol released" in err and "--class-var batch-mean" in err
    assert _exit_code(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 1,
                                "--bn-stats", os.path.join(digits_run, "bn_stats.pt")]) == 2
    assert "--init randn" in capsys.readouterr().err
    # a choice set by its own flag upstream is what the user asked for: accepted downstream
    run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", tmp_path / "own", "--teacher",
                        os.path.join(out, "teacher.pt"), "--bn-stats", os.path.join(out, "bn_stats.pt"),
                        "--barycenters", os.path.join(out, "barycenters.pt"), "--iterations", 1,
                        "--protocol", "released", "--image-format", "png"])
    assert "--image-format" in capsys.readouterr().out


@pytest.mark.slow
def test_released_protocol_end_to_end_on_a_raw_tiny_tree_at_224(tmp_path, monkeypatch, capsys):
    """The bare commands (no --data-dir: $WMDD_DATA/tiny-imagenet-200) under --protocol released, 224 px."""
    monkeypatch.setenv("WMDD_DATA", str(tmp_path / "store"))
    make_tiny_tree(tmp_path / "store" / "tiny-imagenet-200", num_classes=2, train_per_class=3, val_per_class=1)
    common = ["--dataset", "tiny", "--out", tmp_path / "run", "--protocol", "released"]
    run_stage(squeeze, common + ["--arch", "convnet", "--epochs", 1, "--batch-size", 3])
    printed = _check_block_against_readme(capsys.readouterr().out, "squeeze")
    for module, extra in ((barycenter, ["--ipc", 1]), (recover, ["--ipc", 1, "--iterations", 2]),
                          (relabel, ["--ipc", 1, "--epochs", 1]),
                          (evaluate, ["--ipc", 1, "--epochs", 1, "--baseline", "none", "--student", "convnet"])):
        run_stage(module, common + extra)
        out = capsys.readouterr().out
        printed += _check_block_against_readme(out, module.__name__)
        assert "resolution = 224" in out
    assert printed == len(protocol.CHOICES)
    meta = artifacts.load(artifacts.run_paths(tmp_path / "run").features)["meta"]
    assert meta["eval_transform"].startswith("resize256-centercrop224")
    labels = artifacts.load(os.path.join(artifacts.run_paths(tmp_path / "run").labels, "manifest.pt"))
    assert labels["settings"]["batch_size"] == 100  # tiny keeps 100 at IPC 1
