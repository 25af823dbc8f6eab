"""The independent feature space of the report (lab/embedding.py): a fresh model trained on real +
synthetic images, one transform for every set, the diversity formula, the cache."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from scipy.spatial.distance import pdist

from lab import embedding
from wmdd import data, models, subsets

FAST = embedding.Recipe(epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def digits():
    args = argparse.Namespace(dataset="digits", data_dir=None, resolution=None, download=False, workers=0)
    info = data.resolve(args)
    return info, args, embedding.real_images(info, args, "train", per_class=12)


def _synthetic(info, n_per_class: int, seed: int) -> subsets.ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_per_class * info.num_classes, 3, info.image_size, info.image_size),
                           generator=g, dtype=torch.uint8)
    labels = torch.arange(info.num_classes).repeat_interleave(n_per_class)
    return subsets.ImageSet(images, labels, torch.full((len(labels),), 1.0 / n_per_class), n_per_class, "noise")


def test_embedding_model_is_a_fresh_model_trained_on_real_plus_synthetic(digits, digits_run):
    info, args, real = digits
    syn = {"A": _synthetic(info, 2, 1), "B": _synthetic(info, 1, 2)}
    model, record = embedding.train_embedding_model(info, args, real, syn, recipe=FAST, progress=False)
    assert record["train_size"] == len(real) + 20 + 10 == 120 + 30
    assert record["real_size"] == 120 and record["synthetic_sizes"] == {"A": 20, "B": 10}

    teacher, _ = models.load_teacher(os.path.join(digits_run, "teacher.pt"), info)
    ours, theirs = model.state_dict(), teacher.state_dict()
    assert ours.keys() == theirs.keys()  # the preset's architecture ...
    weights = [k for k, v in ours.items() if v.is_floating_point() and v.ndim > 1]
    assert weights and all(not torch.allclose(ours[k], theirs[k]) for k in weights)  # ... not the teacher's weights

    torch.manual_seed(FAST.seed)  # trained: moved away from its seeded initialisation
    init = models.build_model(info.arch, info.num_classes, info.stem, info.image_size).state_dict()
    assert all(not torch.allclose(ours[k], init[k]) for k in weights)
    real_only, _ = embedding.train_embedding_model(info, args, real, {}, recipe=FAST, progress=False)
    assert not torch.allclose(real_only.state_dict()[weights[0]], ours[weights[0]])  # the synthetic images count


def test_every_set_goes_through_one_transform(digits, tmp_path):
    info, args, _ = digits
    real = embedding.real_images(info, args, "train")
    ds = data.build_dataset(info, args, "train")
    # oracle: torchvision's own eval transform without Normalize, on the stored image, quantised
    resize = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                        T.Resize((info.image_size, info.image_size), antialias=True)])
    for i in (0, 7, len(ds) - 1):
        expected = resize(ds.images[i]).clamp(0, 1).mul(255).round()
        assert (real.images[i].float() - expected).abs().max() <= 1

    # the random real baseline's images are exactly the real images at its indices
    random_real = subsets.random_real_subset(info, args, 3, seed=0)
    assert torch.equal(random_real.images, real.images[random_real.indices])

    # a real subset stored as a "synthetic" set and read back as recover's output gets the real features
    path = subsets.save_as_synthetic(random_real, str(tmp_path / "synthetic.pt"), info, args)
    as_synthetic = subsets.load_synthetic(path, info)
    torch.manual_seed(0)
    model = models.build_model(info.arch, info.num_classes, info.stem, info.image_size).eval()
    f_syn = embedding.features(model, as_synthetic.images, info)
    f_real = embedding.features(model, real.images, info)[random_real.indices]
    assert torch.equal(f_syn, f_real)
    normalize = T.Normalize(info.mean, info.std)  # oracle: torchvision's Normalize on x / 255
    with torch.no_grad():
        f_tv = models.penultimate(model, normalize(as_synthetic.images.float() / 255))
    torch.testing.assert_close(f_syn, f_tv, rtol=1e-5, atol=1e-5)


def test_mean_pairwise_distance_against_float64_pairs():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(12, 7, generator=g)
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 1 + [3] * 4)
    expected = np.mean([pdist(feats[labels == c].double().numpy()).mean() for c in (0, 1, 3)])  # class 2: one image
    assert embedding.mean_pairwise_distance(feats, labels) == pytest.approx(expected, rel=1e-12)


def test_cache_is_reused_and_retrained_when_a_set_changes(digits, tmp_path):
    info, args, real = digits
    cache = str(tmp_path / embedding.CACHE_NAME)
    syn = {"WMDD": _synthetic(info, 1, 5)}
    first, rec1 = embedding.train_embedding_model(info, args, real, syn, recipe=FAST, cache=cache, progress=False)
    again, rec2 = embedding.train_embedding_model(info, args, real, syn, recipe=FAST, cache=cache, progress=False)
    assert not rec1["cached"] and rec2["cached"] and rec2["fingerprint"] == rec1["fingerprint"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))

    changed = _synthetic(info, 1, 5)
    changed.images[0, 0, 0, 0] ^= 1  # one pixel of the synthetic set
    _, rec3 = embedding.train_embedding_model(info, args, real, {"WMDD": changed}, recipe=FAST, cache=cache,
                                              progress=False)
    assert not rec3["cached"] and rec3["fingerprint"] != rec1["fingerprint"]
    _, rec4 = embedding.train_embedding_model(info, args, real, {"WMDD": changed}, cache=cache, progress=False,
                                              recipe=embedding.Recipe(epochs=1, batch_size=64, seed=1))
    assert not rec4["cached"]  # another recipe
    with open(cache, "wb") as fh:
        fh.write(b"torn")  # a torn cache file is trained again and replaced, not an error
    _, rec5 = embedding.train_embedding_model(info, args, real, syn, recipe=FAST, cache=cache, progress=False)
    assert not rec5["cached"] and rec5["fingerprint"] == rec1["fingerprint"]
    assert embedding.train_embedding_model(info, args, real, syn, recipe=FAST, cache=cache, progress=False)[1]["cached"]
