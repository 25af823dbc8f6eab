"""Pictures and numbers that show what a run's synthetic set is, for any run directory:

    python -m wmdd.report runs/<dataset>/<name> [--compare SRe2L=runs/<dataset>/sre2l ...] [--write REPORT.md]

writes into the run directory
- `images.png`: per class (one row each), the synthetic images, a gap, then as many real images of the class;
- `tsne.png`: t-SNE (scikit-learn) of real and synthetic penultimate features (the paper's Fig. 4);
- `recover_loss.png`: the recover loss terms over iterations (mean over the recover batches);
- `diversity.json`: within-class diversity of the synthetic features (mean pairwise L2 distance of the
  teacher's penultimate features of a class's images, averaged over classes) beside the real data's and a
  random real subset's of the same size: the paper's "increased variety" claim (§IV-D), measured;
- with `--write PATH`: a markdown report with the settings, every run's results.json as one table (each
  method with soft and hard labels, the random real subset, the teacher; IOR and HLR) and the pictures.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from wmdd import artifacts, data, models  # noqa: E402


def dataset_args(meta: dict) -> argparse.Namespace:
    """The dataset flags an artifact was made with, enough to rebuild its DatasetInfo."""
    a = meta["args"]
    return argparse.Namespace(dataset=a["dataset"], data_dir=a.get("data_dir"), resolution=a.get("resolution"),
                              download=False, workers=a.get("workers", 0), protocol=a.get("protocol", "wmdd"))


@torch.no_grad()
def image_features(model, images_uint8: torch.Tensor, info, batch_size: int = 256) -> torch.Tensor:
    """Teacher penultimate features of uint8 images [N, 3, H, W] (normalised as the model expects)."""
    device = next(model.parameters()).device
    out = []
    for chunk in images_uint8.split(batch_size):
        x = info.normalize(chunk.float().div(255).to(device))
        out.append(models.penultimate(model, x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def real_images(info, args, per_class: int, seed: int = 0) -> tuple:
    """`per_class` real training images of every class as uint8 (seeded choice), and their labels."""
    ds = data.build_dataset(info, args, "train")
    ds.transform = data.T.Compose([data.T.ToImage(), data.T.ToDtype(torch.float32, scale=True),
                                   data.T.Resize((info.image_size, info.image_size), antialias=True)])
    g = torch.Generator().manual_seed(seed)
    picked, labels = [], []
    for c, idx in enumerate(data.class_indices(ds.targets, info.num_classes)):
        for i in torch.randperm(len(idx), generator=g)[:per_class].tolist():
            picked.append(ds[idx[i]][0])
            labels.append(c)
    images = torch.stack(picked).clamp(0, 1).mul(255).add(0.5).to(torch.uint8)
    return images, torch.tensor(labels)


def mean_pairwise_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-class mean pairwise L2 distance, averaged over classes with at least two samples."""
    per_class = []
    for c in labels.unique():
        f = features[labels == c].double()
        n = f.shape[0]
        if n >= 2:
            per_class.append((torch.cdist(f, f).sum() / (n * (n - 1))).item())
    return sum(per_class) / max(len(per_class), 1)


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


def tsne_plot(real_f, real_y, syn: dict, path: str, class_names, seed: int = 0) -> str:
    """t-SNE of real features (dots) and each synthetic set's (markers), coloured by class."""
    from sklearn.manifold import TSNE

    blocks = [real_f] + [f for f, _ in syn.values()]
    allf = torch.cat(blocks).numpy()
    emb = TSNE(n_components=2, init="pca", random_state=seed,
               perplexity=min(30.0, max(5.0, (allf.shape[0] - 1) / 4))).fit_transform(allf)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    n = real_f.shape[0]
    ax.scatter(emb[:n, 0], emb[:n, 1], c=[cmap(int(c) % cmap.N) for c in real_y], s=6, alpha=0.35)
    markers = ["*", "P", "X", "D"]
    start = n
    for (name, (f, y)), marker in zip(syn.items(), markers):
        e = emb[start:start + f.shape[0]]
        ax.scatter(e[:, 0], e[:, 1], c=[cmap(int(c) % cmap.N) for c in y], s=90, marker=marker,
                   edgecolors="black", linewidths=0.6, label=name)
        start += f.shape[0]
    ax.legend(loc="best", fontsize=8)
    ax.set_title("t-SNE of teacher features: real (dots) and synthetic")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
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


def build(run: str, compare: dict | None = None, per_class: int | None = None, seed: int = 0) -> dict:
    """Write images.png, tsne.png, recover_loss.png and diversity.json into `run`. Returns their paths and
    the diversity numbers. `compare` adds other run directories (name -> dir with synthetic.pt made with the
    same dataset) to the t-SNE and diversity."""
    paths = artifacts.run_paths(run)
    synthetic = artifacts.load(paths.synthetic, stage="recover")
    args = dataset_args(synthetic["meta"])
    info = data.resolve(args)
    artifacts.check_compatible(synthetic["meta"], info, paths.synthetic)
    model, _ = models.load_teacher(paths.teacher, info)
    ipc = int(synthetic["ipc"])
    n_real = per_class or ipc

    sets = {method_name(synthetic["meta"]): synthetic}
    for name, other_run in (compare or {}).items():
        path = artifacts.run_paths(other_run).synthetic
        other = artifacts.load(path, stage="recover")
        artifacts.check_compatible(other["meta"], info, path)
        sets[name] = other
    syn = {name: (image_features(model, s["images"], info), s["labels"]) for name, s in sets.items()}

    real_u8, real_y = real_images(info, args, n_real, seed)
    rows = [[synthetic["images"][synthetic["labels"] == c], real_u8[real_y == c]] for c in range(info.num_classes)]
    out = {"images": save_image_grid(rows, os.path.join(run, "images.png"))}

    # real features: every training image (features.pt from the barycenter stage when present)
    if os.path.exists(paths.features):
        feats = artifacts.load(paths.features)
        real_f, real_lab = feats["features"].float(), feats["labels"]
    else:
        ds = data.build_dataset(info, args, "train")
        chunks, labs = [], []
        with torch.no_grad():
            for x, y in DataLoader(ds, batch_size=256):
                chunks.append(models.penultimate(model, x).float())
                labs.append(y)
        real_f, real_lab = torch.cat(chunks), torch.cat(labs)
    random_f = image_features(model, real_u8, info)
    diversity = {"real (all images)": mean_pairwise_distance(real_f, real_lab),
                 f"random real ({n_real}/class)": mean_pairwise_distance(random_f, real_y)}
    diversity.update({name: mean_pairwise_distance(f, y) for name, (f, y) in syn.items()})
    with open(os.path.join(run, "diversity.json"), "w") as fh:
        json.dump(diversity, fh, indent=1)
    out["diversity"] = diversity

    g = torch.Generator().manual_seed(seed)
    keep = torch.cat([idx[torch.randperm(len(idx), generator=g)[:50]]
                      for idx in (torch.nonzero(real_lab == c).flatten() for c in range(info.num_classes))])
    out["tsne"] = tsne_plot(real_f[keep], real_lab[keep], syn, os.path.join(run, "tsne.png"), info.classes, seed)
    out["recover_loss"] = loss_plot(synthetic["loss_curve"], os.path.join(run, "recover_loss.png"))
    return out


def method_name(meta: dict) -> str:
    return "SRe2L" if meta["args"].get("sre2l") else "WMDD"


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
    div = pictures.get("diversity")
    if div:
        lines += ["", "## Within-class diversity of teacher features", "",
                  "Mean pairwise L2 distance between the penultimate features of a class's images, averaged over "
                  "classes (the paper's \"increased variety\" claim, §IV-D):", "",
                  "| set | mean pairwise distance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in div.items()]
    lines += ["", "## Pictures", ""]
    for key, title in (("images", "Synthetic images (left) beside real images of the same class (right)"),
                       ("tsne", "t-SNE of real (dots) and synthetic (markers) features"),
                       ("recover_loss", "Recover loss terms")):
        if key in pictures:
            lines += [f"### {title}", "", f"![{key}]({os.path.relpath(pictures[key], rel)})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    p = argparse.ArgumentParser("python -m wmdd.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory with teacher.pt and synthetic.pt")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="another run (its synthetic.pt, and results.json for --write) to place beside this one")
    p.add_argument("--write", default=None, metavar="REPORT_MD", help="also write a markdown report here")
    p.add_argument("--real-per-class", type=int, default=None, help="real images per class (default: IPC)")
    a = p.parse_args(argv)
    from wmdd import cli

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
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
