"""relabel: the replayable augmentation, the compact label format, and the stored logits.

The synthetic set is a random real digits subset written in recover's synthetic.pt format
(subsets.save_as_synthetic), so these tests do not wait for a recover run.
"""
from __future__ import annotations

import argparse
import os
import random

import pytest
import torch

import relabel
from tests.conftest import copy_run, run_stage
from wmdd import artifacts, augment, cli, data, models, softlabels, subsets


def make_synthetic(run_dir, ipc: int = 10, seed: int = 5, weights=None) -> subsets.ImageSet:
    """synthetic.pt in `run_dir` from a seeded random real digits subset (optionally other weights)."""
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False, seed=seed, ipc=ipc)
    info = data.resolve(args)
    iset = subsets.random_real_subset(info, args, ipc, seed)
    if weights is not None:
        iset.weights = weights
    paths = artifacts.run_paths(run_dir)
    subsets.save_as_synthetic(iset, paths.synthetic, info, args, paths.teacher)
    return iset


def digits_info():
    return data.resolve(argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False))


@pytest.fixture(scope="module")
def relabelled(digits_run, tmp_path_factory):
    """A run with synthetic.pt and 2 epochs of labels (batch 30: 4 batches per epoch, the last of 10),
    recording every augmentation draw relabel made."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("relabelled"))
    make_synthetic(out)
    drawn = {}
    original = augment.draw_batch

    def recording(spec, index, seed, epoch, batch):
        p = original(spec, index, seed, epoch, batch)
        drawn[(epoch, batch)] = p
        return p

    augment.draw_batch = recording
    try:
        run_stage(relabel, ["--dataset", "digits", "--ipc", 10, "--out", out, "--epochs", 2, "--batch-size", 30,
                            "--seed", 3])
    finally:
        augment.draw_batch = original
    return {"out": out, "drawn": drawn}


def test_replay_is_bit_exact(relabelled):
    """Evaluate's replay (from the manifest alone, after the global RNG moved) draws exactly the crops,
    flips, CutMix indices, lambdas and boxes relabel used, and their digests match the stored ones."""
    labels_dir = artifacts.run_paths(relabelled["out"]).labels
    settings = softlabels.read_manifest(labels_dir)["settings"]
    torch.manual_seed(12345)
    random.seed(7)
    torch.rand(100)
    spec = augment.AugmentSpec.from_dict(settings["augment"])
    plan = augment.ReplayPlan(settings["num_images"], settings["batch_size"], settings["seed"])
    assert plan.batch_sizes() == [30, 30, 30, 10]
    assert len(relabelled["drawn"]) == 2 * 4
    syn = artifacts.load(artifacts.run_paths(relabelled["out"]).synthetic)
    ds = augment.ReplayDataset(syn["images"], plan, spec, (0.3,) * 3, (0.4,) * 3)
    seen = []
    for (e, b), used in relabelled["drawn"].items():
        again = ds.params(e, b)
        for field in ("index", "crop", "flip", "mix_index", "bbox"):
            assert torch.equal(getattr(used, field), getattr(again, field)), (e, b, field)
        assert used.lam == again.lam and used.lam_area == again.lam_area
        assert again.digest() == int(softlabels.read_epoch(labels_dir, e, settings)["digests"][b])
        seen.append(again.index)
    # every image appears once per epoch; epochs differ in order
    for e in range(2):
        order = torch.cat([ds.params(e, b).index for b in range(4)])
        assert torch.equal(order.sort().values, torch.arange(100))
    assert not torch.equal(ds.params(0, 0).index, ds.params(1, 0).index)


def test_stored_logits_equal_fresh_teacher_forward(relabelled, digits_run):
    out = relabelled["out"]
    paths = artifacts.run_paths(out)
    info = digits_info()
    teacher, _ = models.load_teacher(paths.teacher, info)
    settings = softlabels.read_manifest(paths.labels)["settings"]
    syn = artifacts.load(paths.synthetic)
    plan = augment.ReplayPlan(100, 30, 3)
    ds = augment.ReplayDataset(syn["images"], plan, augment.AugmentSpec.from_dict(settings["augment"]),
                               info.mean, info.std)
    for e in range(2):
        stored = softlabels.read_epoch(paths.labels, e, settings)
        assert stored["entry"]["values"].dtype == torch.float16
        start = 0
        for b, n in enumerate(plan.batch_sizes()):
            with torch.no_grad():
                fresh = teacher(ds[(e, b)]["x"])
            got = softlabels.decode(softlabels.slice_entry(stored["entry"], start, start + n), 10)
            torch.testing.assert_close(got, fresh, rtol=1e-3, atol=1e-2)
            assert torch.equal(got, fresh.half().float())  # exactly the fp16 rounding of the forward
            start += n


def test_manifest_meta(relabelled):
    paths = artifacts.run_paths(relabelled["out"])
    man = softlabels.read_manifest(paths.labels)
    s, meta = man["settings"], man["meta"]
    assert (s["batch_size"], s["epochs"], s["seed"], s["topk"], s["precision"]) == (30, 2, 3, None, "fp16")
    assert s["teacher_sha256"] == artifacts.sha256_file(paths.teacher)
    assert s["synthetic_sha256"] == artifacts.sha256_file(paths.synthetic)
    assert meta["upstream"]["synthetic"] == s["synthetic_sha256"]
    torch.testing.assert_close(man["weights"], torch.full((100,), 0.1))
    assert s["augment"]["scale"] == [0.25, 1.0] and s["augment"]["flip"] is False and s["augment"]["cutmix"]


def test_resume_and_epoch_shards_fill_the_same_files(relabelled, tmp_path):
    out = copy_run(relabelled["out"], tmp_path / "run")
    labels_dir = artifacts.run_paths(out).labels
    before = {e: torch.load(softlabels.epoch_path(labels_dir, e), weights_only=True) for e in range(2)}
    mtimes = [os.path.getmtime(softlabels.epoch_path(labels_dir, e)) for e in range(2)]
    base = ["--dataset", "digits", "--ipc", 10, "--out", out, "--epochs", 3, "--batch-size", 30, "--seed", 3]
    run_stage(relabel, base + ["--epochs-range", "2:3"])            # a shard: only the new epoch
    assert [os.path.getmtime(softlabels.epoch_path(labels_dir, e)) for e in range(2)] == mtimes
    settings = softlabels.read_manifest(labels_dir)["settings"]
    assert settings["epochs"] == 3 and all(softlabels.epoch_is_current(labels_dir, e, settings) for e in range(3))
    mtimes = [os.path.getmtime(softlabels.epoch_path(labels_dir, e)) for e in range(3)]
    run_stage(relabel, base)                                         # resume: nothing left to do
    assert [os.path.getmtime(softlabels.epoch_path(labels_dir, e)) for e in range(3)] == mtimes
    # another seed is another label set: every epoch is recomputed, to other draws
    run_stage(relabel, base[:-1] + [4])
    for e in range(2):
        now = torch.load(softlabels.epoch_path(labels_dir, e), weights_only=True)
        assert not torch.equal(now["digests"], before[e]["digests"])
    assert softlabels.read_manifest(labels_dir)["settings"]["seed"] == 4


def test_topk_and_int8_reconstruction():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=g) * 4
    full = softlabels.decode(softlabels.encode(logits), 1000)
    assert torch.equal(full, logits.half().float())
    k = 20
    entry = softlabels.encode(logits, topk=k)
    assert entry["indices"].dtype == torch.int16 and entry["values"].shape == (64, k)
    dense = softlabels.decode(entry, 1000)
    top = logits.topk(k, dim=1)
    torch.testing.assert_close(dense.gather(1, top.indices), top.values.half().float())
    mask = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top.indices, False)
    tail = (logits * mask).sum(1) / (1000 - k)
    torch.testing.assert_close(dense[mask].view(64, -1), tail.half().float()[:, None].expand(64, 1000 - k))
    assert softlabels.entry_nbytes(entry) == 64 * softlabels.bytes_per_image(1000, k, "fp16")
    # int8 codes: error at most half a step (+ fp16 rounding of lo / step)
    q = softlabels.encode(logits, topk=k, precision="int8")
    back = softlabels.decode(q, 1000).gather(1, top.indices)
    step = (top.values.max(1).values - top.values.min(1).values) / 255
    assert ((back - top.values).abs() <= step[:, None] * 0.5 + 2e-2).all()
    assert softlabels.entry_nbytes(q) == 64 * softlabels.bytes_per_image(1000, k, "int8")
    # rank r: the best rank-r approximation of the per-image centred logits, up to fp16 rounding
    logits = logits[:, :200]
    low = logits[:, :40] @ torch.randn(40, 200, generator=g) * 0.1 + torch.randn(64, 1, generator=g) * 5
    r = softlabels.encode(low, rank=40)
    assert r["shared_basis"].shape == (40, 200) and r["values"].shape == (64, 40)
    torch.testing.assert_close(softlabels.decode(r, 200), low, atol=0.05, rtol=0)  # rank 40 data: exact
    approx = softlabels.decode(softlabels.encode(logits, rank=8), 200)
    centred = logits - logits.mean(1, keepdim=True)
    sv = torch.linalg.svdvals(centred - centred.mean(0))
    best = (sv[8:] ** 2).sum()                                                # Eckart-Young
    err = ((approx - approx.mean(1, keepdim=True)) - centred).pow(2).sum()
    assert best * 0.999 <= err <= best * 1.01
    torch.testing.assert_close(approx.mean(1), logits.mean(1), atol=1e-2, rtol=0)   # offsets kept
    q = softlabels.encode(logits, rank=8, precision="int8")
    assert softlabels.entry_nbytes(q) == 64 * softlabels.bytes_per_image(200, None, "int8", 8) + \
        softlabels.shared_bytes(200, 8)
    part = softlabels.slice_entry(q, 10, 20)
    torch.testing.assert_close(softlabels.decode(part, 200), softlabels.decode(q, 200)[10:20])
    assert "shared_basis" not in softlabels.encode(logits[:, :10], rank=9)   # rank >= C - 1: lossless codec
    # small class counts: uint8 indices; k >= C keeps everything
    assert softlabels.encode(logits[:, :10], topk=3)["indices"].dtype == torch.uint8
    assert "indices" not in softlabels.encode(logits[:, :10], topk=10)


def test_batched_crop_resize_matches_interpolate():
    imgs = (torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    for src, out, scale, flip in [(16, 16, (0.25, 1.0), False), (32, 16, (0.08, 1.0), True), (32, 48, (0.5, 1.0), True)]:
        spec = augment.AugmentSpec(src, out, scale, (3 / 4, 4 / 3), flip, True)
        im = imgs[..., :src, :src].contiguous()
        plan = augment.ReplayPlan(40, 40, 0)
        for e in range(3):
            p = augment.draw_batch(spec, plan.batch(e, 0), 0, e, 0)
            torch.testing.assert_close(augment.apply_batch(im, p, spec, (0.5,) * 3, (0.25,) * 3),
                                       augment.apply_batch_reference(im, p, spec, (0.5,) * 3, (0.25,) * 3),
                                       rtol=0, atol=3e-5)


def test_draws_follow_the_recipe():
    spec = augment.AugmentSpec(64, 64, (0.08, 1.0), (3 / 4, 4 / 3), True, True)
    crops, flips, lams = [], [], []
    for b in range(200):
        p = augment.draw_batch(spec, torch.arange(50), 1, 0, b)
        t, l, h, w = p.crop.unbind(1)
        assert ((t >= 0) & (l >= 0) & (t + h <= 64) & (l + w <= 64) & (h > 0) & (w > 0)).all()
        crops.append(h * w / 64 ** 2)
        flips.append(p.flip.float().mean())
        y1, x1, y2, x2 = p.bbox.tolist()
        assert 0 <= y1 <= y2 <= 64 and 0 <= x1 <= x2 <= 64
        assert p.lam_area == pytest.approx(1 - (y2 - y1) * (x2 - x1) / 64 ** 2)
        assert sorted(p.mix_index.tolist()) == list(range(50))
        lams.append(p.lam)
    area = torch.cat(crops)
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.45 < area.mean() < 0.63  # U(0.08, 1): 0.54
    assert 0.45 < torch.stack(flips).mean() < 0.55
    assert 0.4 < sum(lams) / len(lams) < 0.6                                        # Beta(1, 1)
    no_flip = augment.AugmentSpec(16, 16, (0.25, 1.0), (3 / 4, 4 / 3), False, False)
    p = augment.draw_batch(no_flip, torch.arange(10), 1, 0, 0)
    assert not p.flip.any() and p.lam_area == 1.0 and torch.equal(p.mix_index, torch.arange(10))


def test_clear_errors(digits_run, tmp_path):
    out = copy_run(digits_run, tmp_path / "run")
    base = ["--dataset", "digits", "--out", out, "--epochs", 1]
    with pytest.raises(cli.UserError, match="synthetic.pt does not exist"):
        run_stage(relabel, base + ["--ipc", 10])
    make_synthetic(out, ipc=5)
    with pytest.raises(cli.UserError, match="holds 5 images per class, but --ipc is 10"):
        run_stage(relabel, base + ["--ipc", 10])
    with pytest.raises(cli.UserError, match="--epochs-range"):
        run_stage(relabel, base + ["--ipc", 5, "--epochs-range", "1:3"])
    with pytest.raises(SystemExit) as e:
        cli.run(relabel.main, relabel.get_args_parser(), [str(a) for a in base + ["--ipc", 10]])
    assert e.value.code == 2
