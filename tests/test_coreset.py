"""The nearest-real choice (wmdd/coreset.py), recover's --init nearest and --crop-scale, and the coreset set:
the assignment against a brute-force oracle, atoms placed on known features picking exactly those images
(never one twice), recover starting from them, the coreset holding exactly those images, and the new
flags recorded in the artifacts and refused where they would mix recipes."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import barycenter
import recover
from conftest import copy_run, run_stage
from wmdd import artifacts, cli, coreset, data, models, subsets


def brute_force(features, points):
    """The injective atom -> image map of least total squared distance, by enumeration (the oracle)."""
    k, n = points.shape[0], features.shape[0]
    cost = ((points[:, None, :].double() - features[None, :, :].double()) ** 2).sum(-1)
    return min(itertools.permutations(range(n), k), key=lambda p: sum(float(cost[j, p[j]]) for j in range(k)))


def test_assignment_is_the_optimal_injective_map():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(14, 3, generator=g)
    labels = torch.tensor([0] * 6 + [1] * 8)
    points = torch.randn(2, 3, 3, generator=g)
    chosen = coreset.assign_nearest(features, labels, points)
    for c, idx in enumerate((torch.arange(6), torch.arange(6, 14))):
        expected = [int(idx[i]) for i in brute_force(features[idx], points[c])]
        assert chosen[c].tolist() == expected
    # two atoms on one feature: that image once, the other atom its next best, never the same image twice
    points = torch.stack([features[[2, 2, 4]], features[[7, 9, 9]]])
    chosen = coreset.assign_nearest(features, labels, points)
    for c in range(2):
        assert len(set(chosen[c].tolist())) == 3
        assert all(int(labels[i]) == c for i in chosen[c])
    assert 2 in chosen[0].tolist() and 4 in chosen[0].tolist() and {7, 9} <= set(chosen[1].tolist())


def test_too_few_images_is_a_clear_error():
    with pytest.raises(cli.UserError, match="class 1 has 2 training images"):
        coreset.assign_nearest(torch.randn(5, 2), torch.tensor([0, 0, 0, 1, 1]), torch.randn(2, 3, 2))


@pytest.fixture(scope="module")
def placed(digits_run, tmp_path_factory):
    """A digits run whose barycenters.pt holds, as atoms, the features of known training images
    (atom j of class c = the feature of the image `known[c, j]`)."""
    out = copy_run(digits_run, tmp_path_factory.mktemp("coreset_run"))
    run_stage(barycenter, ["--dataset", "digits", "--ipc", 2, "--out", out])
    paths = artifacts.run_paths(out)
    feats = artifacts.load(paths.features, stage="features")
    per_class = data.class_indices(feats["labels"].tolist(), 10)
    known = torch.tensor([[per_class[c][5 + 3 * c], per_class[c][1]] for c in range(10)])
    bary = artifacts.load(paths.barycenters, stage="barycenter")
    bary["points"] = feats["features"][known].clone()
    artifacts.save(paths.barycenters, {k: v for k, v in bary.items() if k != "meta"}, bary["meta"])
    return out, known


def test_init_nearest_starts_from_the_atoms_images(placed, tmp_path, capsys):
    out, known = placed
    out = copy_run(out, tmp_path / "run")
    paths = artifacts.run_paths(out)
    info = data.resolve(recover.get_args_parser().parse_args(["--dataset", "digits"]))
    chosen = coreset.load_assignment(info, paths.features, paths.barycenters, paths.teacher)
    assert torch.equal(chosen, known)
    # lr 0: recover leaves the starting images as they are, so synthetic.pt shows what --init nearest chose
    res = run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 1, "--lr", 0,
                              "--init", "nearest", "--no-png"])
    syn = artifacts.load(res["synthetic"])
    args = recover.get_args_parser().parse_args(["--dataset", "digits"])
    ds = data.build_dataset(info, args, "train", augment=False)
    expected = torch.stack([subsets._to_uint8(info, ds[int(i)][0]) for i in known.flatten()])
    assert (syn["images"].int() - expected.int()).abs().max() <= 1  # recover rounds half up, the set half even
    assert syn["recipe"]["init"] == "nearest" and syn["meta"]["args"]["init"] == "nearest"
    assert {"features", "barycenters"} <= set(syn["meta"]["upstream"])
    # the coreset set is exactly those images, in atom order, with their dataset indices
    core = coreset.coreset_subset(info, args, chosen)
    assert core.indices == known.flatten().tolist() and torch.equal(core.images, expected)
    assert core.labels.tolist() == [c for c in range(10) for _ in range(2)]
    # other barycenters (atoms swapped): the shards of the old start are not reused, the images follow
    bary = artifacts.load(paths.barycenters, stage="barycenter")
    bary["points"] = bary["points"].flip(1).clone()
    artifacts.save(paths.barycenters, {k: v for k, v in bary.items() if k != "meta"}, bary["meta"])
    capsys.readouterr()
    res = run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 1, "--lr", 0,
                              "--init", "nearest", "--no-png"])
    assert "resuming" not in capsys.readouterr().out
    swapped = artifacts.load(res["synthetic"])["images"].view(10, 2, 3, 16, 16).flip(1).reshape(20, 3, 16, 16)
    assert torch.equal(swapped, syn["images"])


def test_crop_scale_is_part_of_the_recipe_and_checked(placed, tmp_path):
    out = copy_run(placed[0], tmp_path / "run")
    common = ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 2, "--no-png"]
    a = artifacts.load(run_stage(recover, common)["synthetic"])
    assert a["recipe"]["crop_scale"] == [0.25, 1.0]  # the digits preset's, recorded when unset
    b = artifacts.load(run_stage(recover, common + ["--crop-scale", 0.5, 1])["synthetic"])
    assert b["recipe"]["crop_scale"] == [0.5, 1.0] and not torch.equal(a["images"], b["images"])
    # shards of two crop scales are never merged into one set
    split = copy_run(placed[0], tmp_path / "split")
    common = ["--dataset", "digits", "--ipc", 2, "--out", split, "--iterations", 2, "--no-png", "--batch-size", 10]
    assert run_stage(recover, common + ["--classes", "0:5", "--crop-scale", 0.5, 1])["synthetic"] is None
    assert run_stage(recover, common + ["--classes", "5:10"])["synthetic"] is None
    with pytest.raises(cli.UserError, match="--crop-scale"):
        run_stage(recover, common + ["--crop-scale", 0.6, 0.3])


def test_nearest_refuses_barycenters_of_another_ipc_or_teacher(placed, tmp_path):
    out = copy_run(placed[0], tmp_path / "run")
    with pytest.raises(cli.UserError, match="2 atoms per class"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 3, "--out", out, "--feature", "none", "--init",
                            "nearest", "--iterations", 1, "--no-png"])
    paths = artifacts.run_paths(out)
    feats = artifacts.load(paths.features, stage="features")
    feats["meta"]["upstream"]["teacher"] = "0" * 64  # features from another teacher
    artifacts.save(paths.features, {k: v for k, v in feats.items() if k != "meta"}, feats["meta"])
    with pytest.raises(cli.UserError, match="teacher"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--init", "nearest",
                            "--iterations", 1, "--no-png"])


def test_nearest_without_features_is_a_clear_error(placed, tmp_path):
    out = copy_run(placed[0], tmp_path / "run")
    os.remove(artifacts.run_paths(out).features)
    with pytest.raises(cli.UserError, match="features.pt"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--init", "nearest",
                            "--iterations", 1, "--no-png"])


# --init hardest / --baseline hardest: the hardest image of each atom's cell

def clusters(k=3, per=4, d=5, seed=0):
    """k tight, far-apart clusters of `per` features each (one class), atoms on their centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 50
    features = (centres[:, None, :] + 0.1 * torch.randn(k, per, d, generator=g)).reshape(k * per, d)
    return features, centres


def test_cells_are_the_clusters_and_the_hardest_member_is_picked():
    features, centres = clusters()
    labels = torch.zeros(12, dtype=torch.int64)
    # uniform weights, equal cluster sizes: the optimal coupling sends each cluster to its own atom
    cells = coreset.atom_cells(centres, torch.full((3,), 1 / 3), features)
    assert cells.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    margins = torch.tensor([3.0, 1.0, 2.0, 5.0, 0.5, 4.0, 4.5, 6.0, 2.0, 2.5, -1.0, 0.0], dtype=torch.float64)
    chosen = coreset.assign_hardest(features, labels, centres[None], torch.full((1, 3), 1 / 3), margins)
    assert chosen.tolist() == [[1, 4, 10]]  # the smallest margin of each cluster, in atom order
    # atoms listed in another order: the same images follow their atoms
    chosen = coreset.assign_hardest(features, labels, centres[[2, 0, 1]][None], torch.full((1, 3), 1 / 3), margins)
    assert chosen.tolist() == [[10, 1, 4]]


def test_an_empty_cell_takes_its_nearest_free_image_and_none_is_used_twice():
    # atom 1 carries a hundredth of the mass: every image gives more of itself to atom 0, so atom 1's cell
    # is empty; it takes its nearest image that atom 0 did not take
    features = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    points = torch.tensor([[[1.0], [9.0]]])
    weights = torch.tensor([[0.99, 0.01]])
    assert coreset.atom_cells(points[0], weights[0], features).tolist() == [0, 0, 0, 0]
    margins = torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    assert coreset.assign_hardest(features, torch.zeros(4, dtype=torch.int64), points, weights,
                                  margins).tolist() == [[3, 2]]
    # many atoms on few images: the picks are distinct, each from its own class
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(14, 3, generator=g), torch.tensor([0] * 6 + [1] * 8)
    chosen = coreset.assign_hardest(features, labels, torch.randn(2, 5, 3, generator=g), torch.full((2, 5), 0.2),
                                    torch.randn(14, generator=g).double())
    for c in range(2):
        assert len(set(chosen[c].tolist())) == 5 and all(int(labels[i]) == c for i in chosen[c])


def test_margins_are_the_teachers_on_the_images(placed):
    out, _ = placed
    paths = artifacts.run_paths(out)
    info = data.resolve(recover.get_args_parser().parse_args(["--dataset", "digits"]))
    model, _ = models.load_teacher(paths.teacher, info)
    feats = artifacts.load(paths.features, stage="features")
    got = coreset.teacher_margins(feats["features"], feats["labels"], models.classifier(model))
    ds = data.build_dataset(info, recover.get_args_parser().parse_args(["--dataset", "digits"]), "train")
    pick = [0, 7, 100, 500, len(ds) - 1]
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in pick])).double()  # the oracle: the teacher's own forward
    for row, i in zip(logits, pick):
        y = ds[i][1]
        expected = row[y] - torch.cat([row[:y], row[y + 1:]]).max()
        assert abs(float(got[i]) - float(expected)) < 1e-4


def test_init_hardest_and_its_baseline_hold_the_hardest_images(placed, tmp_path):
    out = copy_run(placed[0], tmp_path / "run")
    paths = artifacts.run_paths(out)
    args = recover.get_args_parser().parse_args(["--dataset", "digits", "--ipc", "2", "--out", out])
    info = data.resolve(args)
    feats = artifacts.load(paths.features, stage="features")
    bary = artifacts.load(paths.barycenters, stage="barycenter")
    model, _ = models.load_teacher(paths.teacher, info)
    margins = coreset.teacher_margins(feats["features"], feats["labels"], models.classifier(model))
    expected_idx = coreset.assign_hardest(feats["features"], feats["labels"], bary["points"], bary["weights"],
                                          margins)
    assert not torch.equal(expected_idx, coreset.load_assignment(info, paths.features, paths.barycenters))
    res = run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", out, "--iterations", 1, "--lr", 0,
                              "--init", "hardest", "--no-png"])
    syn = artifacts.load(res["synthetic"])
    ds = data.build_dataset(info, args, "train", augment=False)
    expected = torch.stack([subsets._to_uint8(info, ds[int(i)][0]) for i in expected_idx.flatten()])
    assert (syn["images"].int() - expected.int()).abs().max() <= 1
    assert syn["recipe"]["init"] == "hardest" and {"features", "barycenters", "teacher"} <= set(syn["meta"]["upstream"])
    base = coreset.baseline_subset(info, args, 2, "hardest")  # evaluate's --baseline hardest
    assert base.indices == expected_idx.flatten().tolist() and torch.equal(base.images, expected)
    assert "hardest" in base.source
    # --iterations 0 from a real start: the starting images themselves, the baseline's set as synthetic.pt
    zero = copy_run(placed[0], tmp_path / "zero")
    res = run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", zero, "--iterations", 0,
                              "--init", "hardest", "--no-png"])
    assert torch.equal(artifacts.load(res["synthetic"])["images"], base.images)
    with pytest.raises(cli.UserError, match="--iterations 0"):
        run_stage(recover, ["--dataset", "digits", "--ipc", 2, "--out", zero, "--iterations", 0, "--no-png"])


def test_shards_of_nearest_and_hardest_starts_are_never_merged(placed, tmp_path):
    split = copy_run(placed[0], tmp_path / "split")
    common = ["--dataset", "digits", "--ipc", 2, "--out", split, "--iterations", 1, "--no-png", "--batch-size", 10]
    assert run_stage(recover, common + ["--classes", "0:5", "--init", "nearest"])["synthetic"] is None
    assert run_stage(recover, common + ["--classes", "5:10", "--init", "hardest"])["synthetic"] is None
