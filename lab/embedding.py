"""The paper's Fig. 4 and the diversity numbers, measured in a space the distillation did not optimise.

The barycenter loss pulls the synthetic images' *teacher* features onto barycenters of the real
teacher features, so any spread or coverage measured with the teacher is partly the objective itself.
WMDD's Fig. 4 (arXiv 2311.18531, §IV-D) instead trains a fresh model on a mixture of real and
synthetic data and runs t-SNE on that model's last-layer (penultimate) features. This module does that:

1. **One transform for every set.** Every image reaches a model as uint8 [N, 3, S, S] at the model
   input size S, then `x / 255`, normalised with the preset's mean / std (`features`). Real images
   become uint8 exactly as the random real baseline does (wmdd/subsets.py: the eval transform, then
   quantised), so a real image, an image of the random real subset and a synthetic image that happen
   to be equal get equal features. The teacher-space picture of lab/report.py uses the same path.
2. **The embedding model** (`train_embedding_model`): the preset's architecture (the students'; not
   the teacher's weights: a fresh, seeded initialisation), trained with hard labels and cross-entropy
   on the real training images plus every synthetic set of the comparison (one model for all sets, so
   that every set is measured in the same space; a model per set would give each set its own space and
   make the numbers incomparable), no augmentation, AdamW with a cosine schedule for `Recipe.epochs`
   epochs. Its real validation top-1 is recorded. It is cached in the run directory
   (`embedding_model.pt`) with a fingerprint of everything it depends on (architecture, recipe, the
   bytes of the real and synthetic images and labels): a rerun loads it, a changed set retrains it.
3. **Fig. 4** (`tsne_figure`): one t-SNE (scikit-learn) of the real features (a seeded sample per class,
   dots) and every synthetic set's (markers), one panel per synthetic set on the same map, coloured by
   class, the first 10 classes (all of them on a 10-class dataset).
4. **Diversity** (`diversity`): within-class mean pairwise L2 distance of the features, averaged over
   classes, for all real images, the random real subset and every synthetic set (`mean_pairwise_distance`).

`figure4(run, compare)` does all of it for run directories (what `python -m lab.report` and the paper
harness call); the pieces take plain `ImageSet`s for other uses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from wmdd import artifacts, data, models, subsets
from wmdd.cli import UserError

CACHE_NAME = "embedding_model.pt"
SHOWN_CLASSES = 10  # t-SNE panels show the first 10 classes (the paper's ImageNette has 10)


@dataclass(frozen=True)
class Recipe:
    """The embedding model's fixed short training recipe (hard labels, cross-entropy, no augmentation)."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the one transform


def real_images(info, args, split: str = "train", per_class: int | None = None, seed: int = 0) -> subsets.ImageSet:
    """The real `split` as uint8 [N, 3, S, S]: the eval transform at the model input size, quantised to
    uint8 exactly as subsets.random_real_subset does. `per_class` keeps a seeded choice of that many
    images per class (None: every image)."""
    ds = data.build_dataset(info, args, split, augment=False)
    per_class_idx = data.class_indices(ds.targets, info.num_classes)
    if per_class is not None:
        g = torch.Generator().manual_seed(seed)
        per_class_idx = [[idx[int(i)] for i in torch.randperm(len(idx), generator=g)[:per_class].sort().values]
                         for idx in per_class_idx]
    chosen = sorted(i for idx in per_class_idx for i in idx)
    subset = torch.utils.data.Subset(ds, chosen) if per_class is not None else ds
    images, labels = [], []
    for x, y in DataLoader(subset, batch_size=256, num_workers=getattr(args, "workers", 0) or 0):
        images.append(to_uint8(info, x))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    labels = torch.cat(labels)
    counts = torch.bincount(labels, minlength=info.num_classes).float()
    return subsets.ImageSet(torch.cat(images), labels, 1.0 / counts[labels], int(counts.max()),
                            f"real {split} images", chosen)


def to_uint8(info, x: torch.Tensor) -> torch.Tensor:
    """Normalised eval-transform output -> uint8 pixels (the random real subset's quantisation)."""
    return subsets._to_uint8(info, x)


@torch.no_grad()
def features(model, images_uint8: torch.Tensor, info, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features of uint8 images [N, 3, S, S]: x / 255, normalised, the model in eval mode.
    Every set (real, random real, synthetic) and every model (teacher, embedding model) goes through here."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [models.penultimate(model, model_input(info, chunk.to(device))).float().cpu()
           for chunk in images_uint8.split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def model_input(info, images_uint8: torch.Tensor) -> torch.Tensor:
    return info.normalize(images_uint8.float().div(255))


# ---------------------------------------------------------------------------------------------
# the embedding model


def fingerprint(info, arch: str, recipe: Recipe, real: subsets.ImageSet, synthetic: dict) -> str:
    """sha256 of everything the embedding model depends on (the images and labels by their bytes)."""
    def digest(iset):
        h = hashlib.sha256()
        h.update(iset.images.contiguous().numpy().tobytes())
        h.update(iset.labels.numpy().tobytes())
        return h.hexdigest()

    blob = {"dataset": info.name, "resolution": info.resolution, "image_size": info.image_size,
            "classes": list(info.classes), "arch": arch, "stem": info.stem, "recipe": asdict(recipe),
            "real": digest(real), "synthetic": [[name, digest(s)] for name, s in synthetic.items()]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def train_embedding_model(info, args, real: subsets.ImageSet, synthetic: dict, *, recipe: Recipe = Recipe(),
                          arch: str | None = None, cache: str | None = None, val: subsets.ImageSet | None = None,
                          device="cpu", progress: bool = True):
    """(model in eval mode, record): a fresh `arch` (default: the preset's) trained on `real` plus every
    synthetic ImageSet in `synthetic` (name -> set) with hard labels. `cache`: a file to load the model
    from when its fingerprint matches, and to write it to otherwise. The record says what it was trained
    on (`train_size`, `real_size`, `synthetic_sizes`), its `val_top1` on `val`, and whether it was `cached`."""
    arch = arch or info.arch
    spec = models.model_spec(arch, info.num_classes, info.stem, info.image_size)
    fp = fingerprint(info, arch, recipe, real, synthetic)
    if cache is not None and os.path.isfile(cache):
        try:
            stored = artifacts.load(cache, stage="embedding")
        except UserError as e:  # a torn or foreign cache file is only a cache: train again and replace it
            print(f"note: not using {cache} ({str(e).split('. ')[0]}); training the embedding model again")
            stored = {}
        if stored.get("fingerprint") == fp:
            model = models.build_from_spec(stored["model_args"])
            model.load_state_dict(stored["model"])
            return model.to(device).eval(), {**json.loads(stored["record"]), "cached": True}

    t0 = time.time()
    images = torch.cat([real.images] + [s.images for s in synthetic.values()])
    labels = torch.cat([real.labels] + [s.labels for s in synthetic.values()])
    train_set = torch.utils.data.TensorDataset(images, labels)
    torch.manual_seed(recipe.seed)
    model = models.build_from_spec(spec).to(device)
    channels_last = models.training_layout(model, device)
    loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True,
                        drop_last=len(train_set) > recipe.batch_size,
                        generator=torch.Generator().manual_seed(recipe.seed))
    steps = recipe.epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / steps)))
    model.train()
    bar = tqdm(total=steps, desc="embedding model (real + synthetic)", leave=False, disable=not progress)
    for _ in range(recipe.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(models.as_layout(model_input(info, x.to(device)), channels_last)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.to(memory_format=torch.contiguous_format).eval()  # the layout a cached copy loads in: equal features
    record = {"arch": arch, "recipe": asdict(recipe), "train_size": len(train_set), "real_size": len(real),
              "synthetic_sizes": {name: len(s) for name, s in synthetic.items()},
              "val_top1": accuracy(model, val, info) if val is not None else None,
              "train_s": round(time.time() - t0, 2), "fingerprint": fp}
    if cache is not None:
        artifacts.save(cache, {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "model_args": spec,
                               "fingerprint": fp, "record": json.dumps(record)},
                       artifacts.make_meta("embedding", args, info))
    return model, {**record, "cached": False}


@torch.no_grad()
def accuracy(model, iset: subsets.ImageSet, info, batch_size: int = 256) -> float:
    """Top-1 (percent) of `model` on a uint8 ImageSet, through the one transform."""
    device = next(model.parameters()).device
    correct = sum((model(model_input(info, x.to(device))).argmax(1).cpu() == y).sum().item()
                  for x, y in zip(iset.images.split(batch_size), iset.labels.split(batch_size)))
    return 100.0 * correct / max(len(iset), 1)


# ---------------------------------------------------------------------------------------------
# diversity and t-SNE


def mean_pairwise_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-class diversity: for each class with at least two samples, the mean L2 distance over all
    ordered pairs of distinct samples (sum of the distance matrix / (n (n - 1))); averaged over classes."""
    per_class = []
    for c in labels.unique():
        f = features[labels == c].double()
        n = f.shape[0]
        if n >= 2:
            per_class.append((torch.cdist(f, f).sum() / (n * (n - 1))).item())
    return sum(per_class) / max(len(per_class), 1)


def diversity(model, sets: dict, info) -> dict:
    """mean_pairwise_distance of every ImageSet in `sets` (name -> set), in `model`'s feature space."""
    return {name: mean_pairwise_distance(features(model, s.images, info), s.labels) for name, s in sets.items()}


def tsne_figure(real_f, real_y, syn: dict, path: str, class_names, title: str, seed: int = 0,
                shown_classes: int = SHOWN_CLASSES, real_per_class: int = 50) -> str:
    """One t-SNE (scikit-learn) of a seeded sample of `real_per_class` real features per class (dots) and
    every synthetic set's features (`syn`: name -> (features, labels); markers), drawn as one panel per
    synthetic set on the same map, coloured by class; only the first `shown_classes` classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    shown = list(range(min(shown_classes, len(class_names))))
    g = torch.Generator().manual_seed(seed)
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[:real_per_class]]
                      for idx in (torch.nonzero(real_y == c).flatten() for c in shown)])
    blocks = [(real_f[keep], real_y[keep])]
    for f, y in syn.values():
        mask = y < len(shown)
        blocks.append((f[mask], y[mask]))
    allf = torch.cat([f for f, _ in blocks]).double().numpy()
    emb = TSNE(n_components=2, init="pca", random_state=seed,
               perplexity=min(30.0, max(5.0, (allf.shape[0] - 1) / 4))).fit_transform(allf)
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, max(len(syn), 1), figsize=(5.5 * max(len(syn), 1), 5.2), squeeze=False)
    n_real = blocks[0][0].shape[0]
    start = n_real
    for ax, (name, (f, y)) in zip(axes[0], zip(syn, blocks[1:])):
        ax.scatter(emb[:n_real, 0], emb[:n_real, 1], c=[cmap(int(c)) for c in blocks[0][1]], s=6, alpha=0.35)
        e = emb[start:start + f.shape[0]]
        ax.scatter(e[:, 0], e[:, 1], c=[cmap(int(c)) for c in y], s=110, marker="*", edgecolors="black",
                   linewidths=0.6)
        start += f.shape[0]
        ax.set_title(f"{name}: real (dots), synthetic (stars)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(c), label=class_names[c]) for c in shown]
    fig.legend(handles=handles, loc="lower center", ncol=len(shown), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# run directories


def method_name(meta: dict) -> str:
    return "SRe2L" if meta["args"].get("sre2l") else "WMDD"


def dataset_args(meta: dict):
    """The dataset flags an artifact was made with, enough to rebuild its DatasetInfo."""
    import argparse

    a = meta["args"]
    return argparse.Namespace(dataset=a["dataset"], data_dir=a.get("data_dir"), resolution=a.get("resolution"),
                              download=False, workers=a.get("workers", 0), protocol=a.get("protocol", "wmdd"))


def load_sets(run: str, compare: dict | None = None):
    """(info, dataset args, {method name: synthetic ImageSet}) for a run and the runs in `compare`
    (name -> run directory made with the same dataset); the run's own set first."""
    path = artifacts.run_paths(run).synthetic
    meta = artifacts.load(path, stage="recover")["meta"]
    args = dataset_args(meta)
    info = data.resolve(args)
    sets = {method_name(meta): subsets.load_synthetic(path, info)}
    for name, other in (compare or {}).items():
        sets[name] = subsets.load_synthetic(artifacts.run_paths(other).synthetic, info)
    return info, args, sets


def caption(record: dict, info) -> str:
    """What the independent-space picture and numbers are: which model, trained on what, which transform."""
    r = record["recipe"]
    epochs = f"{r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}"
    syn = " + ".join(f"{name} ({n} images)" for name, n in record["synthetic_sizes"].items())
    val = "" if record.get("val_top1") is None else f", real validation top-1 {record['val_top1']:.2f}%"
    return (f"Features of a fresh {record['arch']} (seed {r['seed']}; not the teacher, whose feature space the "
            f"barycenter loss optimises), trained for {epochs} with hard labels and cross-entropy, no augmentation, "
            f"on {record['train_size']} images: the {record['real_size']} real training images + {syn}{val}. "
            f"Every set enters it through the same transform: uint8 {info.image_size}x{info.image_size} px (real "
            "images: the eval transform, then quantised, as the random real subset), / 255, normalised. The "
            "protocol of the paper's Fig. 4 (arXiv 2311.18531: a model trained on real + synthetic data, t-SNE of "
            "its last-layer features).")


def figure4(run: str, compare: dict | None = None, *, out_dir: str | None = None, recipe: Recipe = Recipe(),
            arch: str | None = None, ipc: int | None = None, real_per_class: int | None = None, seed: int = 0,
            device=None, progress: bool = True) -> dict:
    """The paper's Fig. 4 and the independent-space diversity for run directories (the paper harness's entry).

    `run`: a run directory with synthetic.pt; `compare`: name -> other run directories of the same dataset
    (e.g. {"SRe2L": "runs/demo/sre2l"}). Trains (or loads from `run`/embedding_model.pt) the embedding
    model on the real training images + every synthetic set, and writes into `out_dir` (default `run`)
    `tsne_independent.png` and `diversity_independent.json`. The random real subset has `ipc` images per
    class (default: the run's IPC), drawn as evaluate's baseline with `seed`. The real training images are
    held in memory as uint8 (ImageNette at 224 px: 1.4 GB); `real_per_class` keeps a seeded choice of that
    many per class instead (ImageNet-1K). Returns
    {"tsne": png path, "diversity": {set: value}, "caption": str, "diversity_caption": str,
     "record": the embedding model's record (arch, recipe, train_size, real_size, synthetic_sizes, val_top1,
     train_s, fingerprint, cached), "model": cache path}."""
    info, args, sets = load_sets(run, compare)
    ipc = ipc or next(iter(sets.values())).ipc
    return independent_view(info, args, sets, real_images(info, args, "train", real_per_class, seed),
                            subsets.random_real_subset(info, args, ipc, seed), run, out_dir=out_dir,
                            recipe=recipe, arch=arch, seed=seed, device=device, progress=progress)


def independent_view(info, args, sets: dict, real: subsets.ImageSet, random_real: subsets.ImageSet, run: str, *,
                     out_dir: str | None = None, recipe: Recipe = Recipe(), arch: str | None = None, seed: int = 0,
                     device=None, progress: bool = True) -> dict:
    """figure4 on sets already loaded (`sets`: name -> synthetic ImageSet; `real`: real_images(); the
    embedding model cached in `run`)."""
    out_dir = out_dir or run
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = os.path.join(run, CACHE_NAME)
    model, record = train_embedding_model(info, args, real, sets, recipe=recipe, arch=arch, cache=cache,
                                          val=real_images(info, args, "val"), device=device, progress=progress)
    every = {"real (all images)": real, f"random real ({random_real.ipc}/class)": random_real, **sets}
    div = diversity(model, every, info)
    with open(os.path.join(out_dir, "diversity_independent.json"), "w") as fh:
        json.dump({"diversity": div, "embedding_model": record}, fh, indent=1)
    syn_f = {name: (features(model, s.images, info), s.labels) for name, s in sets.items()}
    text = caption(record, info)
    png = tsne_figure(features(model, real.images, info), real.labels, syn_f,
                      os.path.join(out_dir, "tsne_independent.png"), info.classes,
                      f"t-SNE of a fresh {record['arch']}'s penultimate features (trained on real + synthetic; "
                      "not the teacher)", seed)
    return {"tsne": png, "diversity": div, "caption": text, "record": record, "model": cache,
            "diversity_caption": "Within-class mean pairwise L2 distance of the embedding model's penultimate "
                                 "features, averaged over classes. " + text}
