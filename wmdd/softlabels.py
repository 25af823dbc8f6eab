"""Compact storage of the teacher's soft labels (relabel writes, evaluate reads, bench measures).

More: docs/core.md, "wmdd/softlabels.py".
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from wmdd import artifacts
from wmdd.cli import fail

PRECISIONS = ("fp16", "int8")


def index_dtype(num_classes: int) -> torch.dtype:
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32768:
        return torch.int16
    return torch.int32


def _quantize(v: torch.Tensor) -> dict:
    lo = v.min(dim=1).values
    step = (v.max(dim=1).values - lo) / 255.0
    lo16, step16 = lo.half(), step.half()
    safe = torch.where(step16.float() > 0, step16.float(), torch.ones_like(step))
    code = torch.round((v - lo16.float()[:, None]) / safe[:, None]).clamp_(0, 255).to(torch.uint8)
    return {"code": code, "lo": lo16, "step": step16}


def _dequantize(entry: dict) -> torch.Tensor:
    return entry["lo"].float()[:, None] + entry["code"].float() * entry["step"].float()[:, None]


def _encode_lowrank(logits: torch.Tensor, rank: int, precision: str) -> dict:
    x = logits.double()
    offset = x.mean(dim=1)
    xc = x - offset[:, None]
    center = xc.mean(dim=0)
    y = xc - center
    _, vectors = torch.linalg.eigh(y.T @ y)                     # ascending eigenvalues
    basis = vectors[:, -rank:].flip(1).T.contiguous()          # [r, C], largest first
    basis16, center16 = basis.half(), center.half()
    coef = ((xc - center16.double()) @ basis16.double().T).float()   # projection on the stored basis
    entry = {"shared_basis": basis16.cpu(), "shared_center": center16.cpu(), "offset": offset.half().cpu()}
    entry.update({"values": coef.half().cpu()} if precision == "fp16" else _quantize(coef.cpu()))
    return entry


def encode(logits: torch.Tensor, topk: int | None = None, precision: str = "fp16", rank: int | None = None) -> dict:
    """Compress float logits [n, C] (any device; a whole epoch for `rank`) to a dict of small CPU tensors."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if topk is not None and rank is not None:
        raise ValueError("topk and rank are two codecs: give one of them")
    n, C = logits.shape
    if rank is not None and rank < C - 1:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return _encode_lowrank(logits.detach().float(), rank, precision)   # on the logits' device
    logits = logits.detach().float().cpu()
    if topk is None or topk >= C:
        values, entry = logits, {}
    else:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        values, idx = logits.topk(topk, dim=1)
        rest = (logits.sum(dim=1) - values.sum(dim=1)) / (C - topk)
        entry = {"indices": idx.to(index_dtype(C)), "tail": rest.half()}
    if precision == "fp16":
        entry["values"] = values.half()
    else:
        entry.update(_quantize(values))
    return entry


def decode(entry: dict, num_classes: int) -> torch.Tensor:
    """float32 logits [n, C] from an `encode` dict (or a slice of one, see `slice_entry`)."""
    values = entry["values"].float() if "values" in entry else _dequantize(entry)
    if "shared_basis" in entry:
        return entry["offset"].float()[:, None] + entry["shared_center"].float() + \
            values @ entry["shared_basis"].float()
    if "indices" not in entry:
        return values
    dense = entry["tail"].float()[:, None].expand(values.shape[0], num_classes).clone()
    return dense.scatter_(1, entry["indices"].long(), values)


def fidelity(logits: torch.Tensor, entry: dict, num_classes: int) -> dict:
    """How close the stored labels are to the exact logits: the share of images whose top class is kept,
    the mean KL(exact || stored) at T = 20, and the relative L2 error of the per-image-centred logits.
    (A measure of what compression loses, unweighted; the student's loss is evaluate.py's Eq. KD.)"""
    exact = logits.detach().float().cpu()
    stored = decode(entry, num_classes)
    log_p, log_q = F.log_softmax(exact / 20, dim=1), F.log_softmax(stored / 20, dim=1)
    ce, cs = exact - exact.mean(1, keepdim=True), stored - stored.mean(1, keepdim=True)
    return {"argmax_agreement": (exact.argmax(1) == stored.argmax(1)).float().mean().item(),
            "kl_t20": (log_p.exp() * (log_p - log_q)).sum(1).mean().item(),
            "relative_error": ((ce - cs).norm() / ce.norm().clamp_min(1e-12)).item()}


def slice_entry(entry: dict, start: int, stop: int) -> dict:
    """Images start..stop-1 of an encoded epoch (the per-epoch `shared_*` tensors are kept whole)."""
    return {k: (v if k.startswith("shared_") else v[start:stop]) for k, v in entry.items()}


def entry_nbytes(entry: dict) -> int:
    return sum(v.numel() * v.element_size() for v in entry.values())


def bytes_per_image(num_classes: int, topk: int | None = None, precision: str = "fp16", rank: int | None = None) -> int:
    """Payload bytes one image-epoch takes in our format (the batch digest, 8 bytes per batch, the rank-r
    basis, `shared_bytes` per epoch, and the per-file container overhead come on top;
    bench/bench_labels.py measures them)."""
    if rank is not None and rank < num_classes - 1:
        return (2 * rank if precision == "fp16" else rank + 4) + 2   # coefficients + fp16 offset
    k = num_classes if topk is None or topk >= num_classes else topk
    value_bytes = 2 * k if precision == "fp16" else k + 4          # codes + fp16 lo + fp16 step
    if k == num_classes:
        return value_bytes
    return value_bytes + k * torch.empty(0, dtype=index_dtype(num_classes)).element_size() + 2  # + tail


def shared_bytes(num_classes: int, rank: int | None = None) -> int:
    """Per-epoch payload shared by all images: the rank-r basis and centre (fp16)."""
    return 2 * (rank + 1) * num_classes if rank is not None and rank < num_classes - 1 else 0


def describe(topk=None, precision="fp16", rank=None) -> str:
    what = f"rank {rank}" if rank is not None else ("all logits" if topk is None else f"top-{topk}")
    return f"{what}, {precision}"


def fkd_bytes_per_batch(num_classes: int, batch_size: int) -> int:
    """Payload bytes of one FKD/SRe2L batch record (`[coords, flip_status, mix_index, mix_lam, mix_bbox,
    soft_label]`): float32 crop coords [n, 4], bool flips [n], int64 CutMix index [n], float64 lambda,
    four int64 box corners, fp16 logits [n, C]."""
    n = batch_size
    return 16 * n + n + 8 * n + 8 + 4 * 8 + 2 * num_classes * n


def epoch_path(labels_dir: str, epoch: int) -> str:
    return os.path.join(labels_dir, f"epoch_{epoch:04d}.pt")


def manifest_path(labels_dir: str) -> str:
    return os.path.join(labels_dir, "manifest.pt")


# ---------------------------------------------------------------------------------------------
# the label directory


def settings_key(settings: dict) -> str:
    """Short fingerprint of the settings an epoch file was made with (stored in every epoch file). The
    total number of epochs is left out: epoch e's labels depend on (seed, e, batch) only, so a run
    extended from 60 to 100 epochs keeps its first 60 files."""
    key = {k: v for k, v in settings.items() if k != "epochs"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(labels_dir: str, settings: dict, labels: torch.Tensor, weights: torch.Tensor, meta: dict) -> str:
    meta = dict(meta, settings=settings, settings_key=settings_key(settings))
    return artifacts.save(manifest_path(labels_dir), {"settings": settings, "labels": labels.cpu(),
                                                      "weights": weights.cpu()}, meta)


def read_manifest(labels_dir: str) -> dict:
    path = manifest_path(labels_dir)
    if not os.path.isfile(path):
        fail(f"{path} does not exist: no stored soft labels in {labels_dir}. Run relabel.py with the same "
             "--out (and --ipc) first, or evaluate with --labels online (teacher on the fly) or --labels hard.")
    return artifacts.load(path, stage="relabel")


def write_epoch(labels_dir: str, epoch: int, entry: dict, digests: torch.Tensor, settings: dict, dataset: str) -> str:
    """One epoch's compressed logits. Its meta is lean (the manifest holds the full meta): format
    version, stage, dataset, epoch and the settings fingerprint."""
    meta = {"format_version": artifacts.FORMAT_VERSION, "stage": "relabel-epoch", "dataset": dataset,
            "epoch": int(epoch), "settings_key": settings_key(settings)}
    return artifacts.save(epoch_path(labels_dir, epoch), {"entry": entry, "digests": digests}, meta)


def epoch_is_current(labels_dir: str, epoch: int, settings: dict) -> bool:
    """True when the epoch file exists, loads, and was made with `settings` (resume skips it)."""
    key = settings_key(settings)  # mmap: only the meta is read, not the epoch's logits
    return artifacts.reuse(epoch_path(labels_dir, epoch), "relabel-epoch",
                           lambda obj: obj["meta"].get("settings_key") == key, mmap=True) is not None


def read_epoch(labels_dir: str, epoch: int, settings: dict) -> dict:
    path = epoch_path(labels_dir, epoch)
    if not os.path.isfile(path):
        fail(f"{path} does not exist: the stored labels stop before epoch {epoch + 1} of "
             f"{settings['epochs']}. Run relabel.py with the same flags (add --epochs-range {epoch}:"
             f"{settings['epochs']} to compute only the missing ones).")
    obj = artifacts.load(path, stage="relabel-epoch")
    if obj["meta"].get("settings_key") != settings_key(settings):
        fail(f"{path} was made with other relabel settings than {manifest_path(labels_dir)} (a shard or an "
             "older run with other flags). Rerun relabel.py with one set of flags over all epochs.")
    return obj
