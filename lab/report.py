"""Pictures and numbers that show what a run's synthetic set is, for any run directory:

    python -m lab.report runs/<dataset>/<name> [--compare SRe2L=runs/<dataset>/sre2l ...] [--write REPORT.md]

writes into the run directory
- `images.png`: per class (one row each), the synthetic images, a gap, then as many random real images of
  the class (evaluate's random real baseline, seed 0);
- `tsne_independent.png`: the paper's Fig. 4 as the paper made it: t-SNE (scikit-learn) of the penultimate
  features of a fresh model (the preset's architecture, not the teacher) trained with hard labels on the
  real training images + every synthetic set of the report; one panel per synthetic set (lab/embedding.py;
  the model is cached in `embedding_model.pt` with a fingerprint, so a rerun does not train it again);
- `tsne.png`: the same picture in the teacher's feature space, the space the barycenter loss optimises;
- `recover_loss.png`: the recover loss terms over iterations (mean over the recover batches);
- `diversity_independent.json` and `diversity.json`: within-class diversity (mean pairwise L2 distance of
  the penultimate features of a class's images, averaged over classes) of all real training images, a
  random real subset of the same size and every synthetic set, in the fresh model's space and in the
  teacher's (circular: the objective's own space): the paper's "increased variety" claim (§IV-D), measured.
  Every set reaches both models through one transform: uint8 images at the model input size (real ones
  by the eval transform, quantised as the random real subset), / 255, normalised;
- with `--write PATH`: a markdown report with the settings, every run's results.json as one table (each
  method with soft and hard labels, the random real subset, the teacher; IOR and HLR), the diversity table
  and the pictures, each captioned with the model, what it was trained on and the transform.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lab import embedding  # noqa: E402
from wmdd import artifacts, cli, models, subsets  # noqa: E402


def save_image_grid(rows: list, path: str, min_tile: int = 48) -> str:
    """rows: one list of uint8 tensors [n, 3, H, W] per grid row, separated by a blank tile; small
    images are enlarged (nearest neighbour) to `min_tile` pixels so that they can be seen."""
    from torchvision.utils import make_grid, save_image

    blank = torch.full_like(rows[0][0][:1], 255)
    cells = [torch.cat([part for block in row for part in (block, blank)][:-1]) for row in rows]
    width = max(c.shape[0] for c in cells)
    cells = [torch.cat([c, blank.expand(width - c.shape[0], -1, -1, -1)]) for c in cells]
    x = torch.cat(cells).float().div(255)
    if x.shape[-1] < min_tile:
        x = torch.nn.functional.interpolate(x, scale_factor=-(-min_tile // x.shape[-1]), mode="nearest")
    save_image(make_grid(x, nrow=width, padding=2, pad_value=1.0), path)
    return path


def loss_plot(loss_curve: dict, path: str, title: str = "recover loss") -> str:
    """Each term's curve (mean over recover batches) against the iteration."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for term, curves in loss_curve.items():
        curve = torch.as_tensor(curves).float()
        curve = curve.reshape(-1, curve.shape[-1]).mean(0)
        if curve.abs().sum() > 0:
            ax.plot(curve.numpy(), label=term)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build(run: str, compare: dict | None = None, per_class: int | None = None, seed: int = 0,
          recipe: embedding.Recipe = embedding.Recipe()) -> dict:
    """Write images.png, the two t-SNE pictures, recover_loss.png and the two diversity JSON files into
    `run`. Returns their paths, both spaces' diversity numbers and the captions. `compare` adds other run
    directories (name -> dir with synthetic.pt made with the same dataset) to the t-SNE and diversity;
    `recipe` is the embedding model's (lab/embedding.py)."""
    paths = artifacts.run_paths(run)
    info, args, sets = embedding.load_sets(run, compare)
    teacher, teacher_artifact = models.load_teacher(paths.teacher, info)
    own = next(iter(sets.values()))
    n_real = per_class or own.ipc
    real = embedding.real_images(info, args, "train")
    random_real = subsets.random_real_subset(info, args, n_real, seed)
    rows = [[own.images[own.labels == c], random_real.images[random_real.labels == c]] for c in range(info.num_classes)]
    out = {"images": save_image_grid(rows, os.path.join(run, "images.png"))}

    # teacher space: the space the barycenter loss optimises (circular for diversity), same transform
    every = {"real (all images)": real, f"random real ({n_real}/class)": random_real, **sets}
    out["diversity"] = embedding.diversity(teacher, every, info)
    with open(os.path.join(run, "diversity.json"), "w") as fh:
        json.dump(out["diversity"], fh, indent=1)
    syn_f = {name: (embedding.features(teacher, s.images, info), s.labels) for name, s in sets.items()}
    out["tsne"] = embedding.tsne_figure(embedding.features(teacher, real.images, info), real.labels, syn_f,
                                        os.path.join(run, "tsne.png"), info.classes,
                                        "t-SNE of the teacher's penultimate features (the space the barycenter "
                                        "loss optimises)", seed)
    out["tsne_caption"] = teacher_caption(info, teacher_artifact["model_args"]["arch"])

    # an independent space: a fresh model trained on real + synthetic (the paper's Fig. 4)
    fig4 = embedding.independent_view(info, args, sets, real, random_real, run, recipe=recipe, seed=seed)
    out.update(tsne_independent=fig4["tsne"], diversity_independent=fig4["diversity"],
               tsne_independent_caption=fig4["caption"], embedding_model=fig4["record"])
    synthetic = artifacts.load(paths.synthetic, stage="recover")
    out["recover_loss"] = loss_plot(synthetic["loss_curve"], os.path.join(run, "recover_loss.png"))
    return out


def teacher_caption(info, arch: str) -> str:
    return (f"Features of the teacher (the run's teacher.pt, a {arch} trained by squeeze.py on the real "
            "training set): the space the barycenters are computed in and recover's loss matches, so "
            "how the synthetic sets spread here is partly the objective itself (circular as evidence of "
            f"diversity). Same transform for every set: uint8 {info.image_size}x{info.image_size} px, / 255, "
            "normalised.")


method_name = embedding.method_name


def _fmt(summary: dict | None) -> str:
    return "–" if summary is None else f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def results_table(results: dict) -> list:
    """Markdown lines: every method's distilled rows (soft and hard), the random real subset once, the
    teacher; then IOR and HLR per method. `results` maps a method name to its results.json dict."""
    lines = ["| images | labels | top-1 (%) | top-5 (%) |", "|---|---|---|---|"]
    random_rows = []
    for name, res in results.items():
        for run in res["runs"]:
            if run["key"].startswith("distilled/"):
                lines.append(f"| {name} (distilled) | {run['label_desc']} | {_fmt(run['top1'])} | {_fmt(run['top5'])} |")
            elif not random_rows or random_rows[0][0] == name:
                random_rows.append((name, f"| {run['images']} | {run['label_desc']} | {_fmt(run['top1'])} | "
                                          f"{_fmt(run['top5'])} |"))
    lines += [row for _, row in random_rows]
    teacher = next(iter(results.values()))
    t = teacher.get("teacher_val_top1")
    lines.append(f"| full training set (teacher, {teacher.get('teacher_arch')}) | hard | "
                 f"{'–' if t is None else f'{t:.2f}'} | – |")
    lines.append("")
    for name, res in results.items():
        m = res["metrics"]
        parts = [f"{k} = {m[k]['mean']:+.2f} ± {m[k]['std']:.2f} pt" for k in ("IOR", "IOR_hard", "HLR") if k in m]
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts))
    lines.append("- IOR = acc(distilled) − acc(random real, same IPC, same recipe), paired by seed; "
                 "HLR = acc(full data, hard) − acc(distilled, hard), the teacher's val top-1 standing in for the "
                 "full-data hard-label accuracy (DD-Ranking, arXiv 2505.13300). Mean ± sample std over seeds.")
    return lines


def diversity_section(pictures: dict) -> list:
    """Markdown lines: every set's within-class diversity in the independent space and in teacher space."""
    indep, teacher = pictures.get("diversity_independent"), pictures.get("diversity")
    if not (indep or teacher):
        return []
    names = list(indep or teacher)
    cell = lambda d, k: "–" if not d or k not in d else f"{d[k]:.3f}"  # noqa: E731
    lines = ["", "## Within-class diversity", "",
             "Mean pairwise L2 distance between the penultimate features of a class's images, averaged over "
             "classes (the paper's \"increased variety\" claim, §IV-D), in two feature spaces. **Independent**: a "
             "fresh model trained on real + synthetic images, not the teacher (the Fig. 4 model below). "
             "**Teacher**: the space the barycenter loss optimises, so a synthetic set's spread there is partly "
             "the objective itself (circular); kept for comparison with earlier reports. Each column compares "
             "sets within one space; the two columns are not on one scale. Every set enters both models through "
             "the same transform (uint8 at the model input size, / 255, normalised).", "",
             "| set | independent space | teacher space (circular) |", "|---|---|---|"]
    lines += [f"| {k} | {cell(indep, k)} | {cell(teacher, k)} |" for k in names]
    return lines


def write_report(path: str, runs: dict, pictures: dict) -> str:
    """REPORT.md for runs (method name -> run directory with synthetic.pt and results.json)."""
    results = {}
    for name, run in runs.items():
        with open(artifacts.run_paths(run).results_json) as fh:
            results[name] = json.load(fh)
    first = next(iter(runs.values()))
    syn_meta = {name: artifacts.load(artifacts.run_paths(run).synthetic)["meta"] for name, run in runs.items()}
    teacher_meta = artifacts.load(artifacts.run_paths(first).teacher)["meta"]
    c = next(iter(results.values()))["config"]
    rel = os.path.dirname(os.path.abspath(path))
    lines = [f"# Report: {c['dataset']} at {c['resolution']} px, IPC {c['ipc']}", "",
             "## Settings", "",
             f"- teacher: {teacher_meta['args'].get('arch')}, {teacher_meta['args'].get('epochs')} epochs, "
             f"val top-1 {teacher_meta.get('val_top1') or float('nan'):.2f}%"]
    for name, meta in syn_meta.items():
        a = meta["args"]
        lines.append(f"- {name} recover: {a.get('iterations')} iterations, lr {a.get('lr')}, λ_BN {a.get('lambda_bn')}, "
                     f"BN {a.get('bn')}, feature {a.get('feature')}, CE weight {a.get('r_ce')}, "
                     f"first-BN ×{a.get('first_bn_mult')}")
    lines += [f"- students: {c['student']}, {c['epochs']} epochs, batch {c['batch_size']}, T = {c['temperature']}, "
              f"{c['seeds']} seeds, labels {c['labels']}", "", "## Results", ""]
    lines += results_table(results)
    lines += diversity_section(pictures)
    lines += ["", "## Pictures", ""]
    for key, title, caption_key in (
            ("images", "Synthetic images (left) beside random real images of the same class (right)", None),
            ("tsne_independent", "Fig. 4 as the paper made it: t-SNE of a fresh model's features (not the teacher)",
             "tsne_independent_caption"),
            ("tsne", "t-SNE of the teacher's features (the space the distillation optimised)", "tsne_caption"),
            ("recover_loss", "Recover loss terms", None)):
        if key in pictures:
            lines += [f"### {title}", "", f"![{key}]({os.path.relpath(pictures[key], rel)})", ""]
            if caption_key in pictures:
                lines += [pictures[caption_key], ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser("python -m lab.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory with teacher.pt and synthetic.pt")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="another run (its synthetic.pt, and results.json for --write) to place beside this one")
    p.add_argument("--write", default=None, metavar="REPORT_MD", help="also write a markdown report here")
    p.add_argument("--real-per-class", type=int, default=None,
                   help="images per class of the random real subset (images.png, diversity; default: IPC)")
    a = p.parse_args(argv)


    compare = dict(item.split("=", 1) for item in a.compare)
    try:
        out = build(a.run, compare, a.real_per_class)
        if a.write:
            name = method_name(artifacts.load(artifacts.run_paths(a.run).synthetic)["meta"])
            out["report"] = write_report(a.write, {name: a.run, **compare}, out)
    except cli.UserError as e:
        print(f"error: {e}")
        raise SystemExit(2)
    for k, v in out.items():
        if not k.endswith("caption"):
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
