"""The released WMDD protocol, choice for choice (docs/protocol.md).

More: docs/core.md, "wmdd/protocol.py".
"""
from __future__ import annotations

from dataclasses import dataclass

import io

import numpy as np
import torch
from PIL import Image

from wmdd.cli import fail

PROTOCOLS = ("wmdd", "released")


@dataclass(frozen=True)
class Choice:
    name: str        # attribute on the stage's args
    flag: str        # its command-line flag
    stage: str       # the stage that has the flag (squeeze-stats: squeeze.py's, acting on bn_stats.pt only)
    ours: object     # this project's value (--protocol wmdd)
    released: object  # the released code's value (--protocol released)
    source: str      # where the released value is, in Liu-Hy/WMDD
    meaning: bool    # True: it changes what the artifact holds, so downstream stages check it
    what: str        # one line for the printed block

    def value(self, protocol: str):
        return self.released if protocol == "released" else self.ours


CHOICES = (
    Choice("lr_step", "--lr-step", "squeeze", "iteration", "epoch",
           "pretrain/pretrain.py main: CosineAnnealingLR(T_max=epochs - warmup), lr_scheduler.step() after each "
           "epoch", False, "teacher's cosine (and warm-up) schedule stepped per iteration or per epoch"),
    Choice("class_var", "--class-var", "squeeze-stats", "exact", "batch-mean",
           "recover/utils.py BatchNorm2dWithPerClassStats.forward: class_var * input.size(0) accumulated over "
           "one-class batches of 100", True,
           "per-class BN variance of the real data (batch-mean: the mean of one-class batches' variances)"),
    Choice("barycenter_init", "--init", "barycenter", "kmeans++", "randn",
           "recover/barycenter.py compute_wasserstein_barycenter: np.random.randn(k, d)", True,
           "start of the barycenter atoms"),
    Choice("amp", "--amp", "recover", "auto", "fp32",
           "recover/data_synthesis_new.py get_images: fp32 inputs, no autocast", True,
           "teacher precision in recover (auto: bf16 autocast on CUDA, fp32 on CPU)"),
    Choice("pixel_rounding", "--pixel-rounding", "recover", "round", "floor",
           "recover/data_synthesis_new.py save_images: (x * 255).astype(np.uint8)", True,
           "[0, 1] pixels -> uint8"),
    Choice("image_format", "--image-format", "recover", "png", "jpeg",
           "recover/data_synthesis_new.py save_images: PIL save to class{c}_id{j}.jpg (quality 75)", True,
           "stored synthetic images (jpeg: the pixels relabel / evaluate read are the decoded JPEG)"),
    Choice("kd_weights", "--kd-weights", "evaluate", "mixed-set", "own-batch",
           "train/train_FKD.py train: weights /= torch.mean(weights); loss *= weights", False,
           "barycenter weight of a KD loss term"),
)
BY_NAME = {c.name: c for c in CHOICES}


def kd_batch_size(dataset: str, ipc: int) -> int:
    """run.sh: KD_BATCH_SIZE = 10 * IPC when IPC < 10 and the dataset is neither tiny-imagenet nor
    imagenet, else 100 (Tiny-ImageNet and ImageNet-1K keep 100 at every IPC)."""
    return 10 * ipc if ipc < 10 and dataset not in ("tiny", "imagenet") else 100


def resolve(args) -> None:
    """Fill every choice the stage has (an attribute of args) and left at None from --protocol;
    args.protocol_flags lists the choices set by their own flag."""
    protocol = getattr(args, "protocol", None) or "wmdd"
    if protocol not in PROTOCOLS:
        fail(f"--protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}.")
    args.protocol = protocol
    flags = []
    for c in CHOICES:
        if not hasattr(args, c.name):
            continue
        if getattr(args, c.name) is None:
            setattr(args, c.name, c.value(protocol))
        elif getattr(args, c.name) != c.value(protocol):
            flags.append(c.name)
    args.protocol_flags = flags


def _stage_choices(args) -> list:
    return [c for c in CHOICES if hasattr(args, c.name)]


def block(stage: str, args) -> list:
    """The printed lines: the protocol, then each choice of this stage with where its value came from."""
    protocol = getattr(args, "protocol", "wmdd")
    lines = [f"protocol: {protocol} (docs/protocol.md)"]
    if stage in ("relabel", "evaluate") and getattr(args, "ipc", None) is not None:
        lines.append(f"  {'kd_batch_size':>18} = {args.batch_size}   (run.sh rule, both protocols: "
                     f"{kd_batch_size(args.dataset, args.ipc)} for --dataset {args.dataset} --ipc {args.ipc})")
    for c in _stage_choices(args):
        value = getattr(args, c.name)
        origin = c.flag if c.name in getattr(args, "protocol_flags", []) else f"--protocol {protocol}"
        lines.append(f"  {c.name:>18} = {value}   ({origin}; wmdd: {c.ours}, released: {c.released}; {c.what})")
    return lines


def record(args, stage: str) -> dict:
    """meta["protocol"] of an artifact of `stage`: the protocol and the resolved value of each choice that
    acts on it (barycenters.pt records --init; features.pt, made by the same stage, none)."""
    if args is None:
        return {"name": "wmdd", "choices": {}, "flags": []}
    mine = [c for c in _stage_choices(args) if c.stage in (stage, stage.split("-")[0])]
    return {"name": getattr(args, "protocol", "wmdd"),
            "choices": {c.name: _json(getattr(args, c.name)) for c in mine},
            "flags": [n for n in getattr(args, "protocol_flags", []) if n in {c.name for c in mine}]}


def _json(v):
    return v if isinstance(v, (str, int, float, bool)) or v is None else str(v)


def _matches(found, expected) -> bool:
    # "auto" precision resolves per device (bf16 on CUDA, fp32 on CPU): either is this project's default
    return found == expected or expected == "auto" and found in ("bf16", "fp32")


def check(meta: dict, path, protocol: str) -> None:
    """Refuse an artifact whose recorded choices (those that change what it holds) differ from what
    `protocol` sets, unless the artifact's run chose the value by its own flag. Artifacts from before
    this record existed were made with this project's values."""

    rec = meta.get("protocol") or {"name": "wmdd", "choices": {}, "flags": []}
    made = rec.get("name", "wmdd")
    wrong = []
    for c in CHOICES:
        if not c.meaning or c.name in rec.get("flags", []):
            continue
        if c.name in rec.get("choices", {}):
            found = rec["choices"][c.name]
        elif meta.get("protocol") is None and c.stage in (meta.get("stage", ""), meta.get("stage", "").split("-")[0]):
            found = c.ours  # made before choices were recorded: this project's value
        else:
            continue  # the artifact's stage does not have this choice
        if not _matches(found, c.value(protocol)):
            wrong.append((c, found))
    if wrong:
        said = "; ".join(f"{c.flag} {found} (this run expects {c.value(protocol)}: {c.what})" for c, found in wrong)
        stages = sorted({c.stage.split("-")[0] for c, _ in wrong})
        fail(f"{path} was made under --protocol {made} with {said}. Rerun {' and '.join(s + '.py' for s in stages)} "
             f"with --protocol {protocol} into this --out (or another --out), or run this stage with "
             f"--protocol {made}.")


# ---------------------------------------------------------------------------------------------
# what the choices do


def quantise(pixels01: torch.Tensor, rounding: str) -> torch.Tensor:
    """[0, 1] float pixels -> uint8: round (torchvision's save_image) or floor (the released astype)."""
    x = pixels01.clamp(0, 1).mul(255)
    return (x.add(0.5) if rounding == "round" else x).clamp_(0, 255).to(torch.uint8)


def jpeg_round_trip(images: torch.Tensor, quality: int) -> tuple:
    """uint8 [N, 3, H, W] (or [N, 1, H, W]: grayscale JPEGs) -> (the pixels PIL decodes from each image's
    JPEG at `quality`, the JPEG bytes): what the released relabel / training read back from recover's .jpg
    files."""

    decoded, encoded = [], []
    gray = images.shape[1] == 1
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0].numpy() if gray else img.permute(1, 2, 0).numpy()).save(buf, format="JPEG",
                                                                                      quality=quality)
        encoded.append(buf.getvalue())
        with Image.open(io.BytesIO(encoded[-1])) as im:
            pixels = np.asarray(im.convert("L"))[None] if gray else np.asarray(im.convert("RGB")).transpose(2, 0, 1)
            decoded.append(torch.from_numpy(pixels.copy()))
    return torch.stack(decoded).contiguous(), encoded


def add_image_args(p) -> None:
    """The flags of how recover stores its images (--protocol wmdd: png, round; released: jpeg, floor)."""
    g = p.add_argument_group("stored images (--protocol wmdd: png, round; released: jpeg, floor)")
    g.add_argument("--image-format", default=None, choices=["png", "jpeg"],
                   help="png: the pixels as optimised (lossless); jpeg: each image JPEG-encoded by PIL at "
                        "--jpeg-quality and decoded, before synthetic.pt is written (relabel, evaluate and "
                        "the images/ tree, .jpg files, all read the decoded pixels)")
    g.add_argument("--jpeg-quality", type=int, default=75, help="--image-format jpeg: PIL quality (75: PIL's "
                   "default, which the released save used)")
    g.add_argument("--pixel-rounding", default=None, choices=["round", "floor"],
                   help="[0, 1] -> uint8: round to nearest, or floor (the released astype(np.uint8))")


def store_images(pixels01: torch.Tensor, args) -> tuple:
    """(uint8 images, JPEG bytes or None): the images as --pixel-rounding and --image-format store them
    (jpeg: the decoded pixels, which the released relabel / training read back from the .jpg files)."""
    images = quantise(pixels01, args.pixel_rounding)
    if args.image_format == "jpeg":
        return jpeg_round_trip(images, args.jpeg_quality)
    return images, None


def kd_image_weights(weights: torch.Tensor, index: torch.Tensor, mix_index: torch.Tensor, lam: float,
                     mode: str) -> torch.Tensor:
    """Per-image weight of a CutMix batch's loss terms from the barycenter weights of the images.
    mixed-set: w / mean(w over the set), lam * own + (1 - lam) * pasted image's (this project);
    own-batch: each image's own weight / the mean over the batch (train_FKD.py, as released)."""
    if mode == "own-batch":
        w = weights[index]
        return w / w.mean()
    w = (weights / weights.mean())[index]
    return lam * w + (1.0 - lam) * w[mix_index]
