"""Stage outputs: where they live, what their `meta` says, atomic saving and safe loading.

More: docs/core.md, "wmdd/artifacts.py".
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import platform
import time
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.utils import save_image

from wmdd import __version__, data, protocol
from wmdd.cli import UserError, args_dict, fail

FORMAT_VERSION = 1

# Which stage writes each artifact, for the "run this first" hint of a missing file.
_PRODUCER = {
    "teacher.pt": "squeeze.py", "bn_stats.pt": "squeeze.py", "features.pt": "barycenter.py",
    "barycenters.pt": "barycenter.py", "synthetic.pt": "recover.py",
}


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run directory, named in one place."""
    root: str

    def _p(self, name):
        return os.path.join(self.root, name)

    @property
    def teacher(self):
        return self._p("teacher.pt")

    @property
    def squeeze_checkpoint(self):
        return self._p("squeeze_checkpoint.pt")

    @property
    def bn_stats(self):
        return self._p("bn_stats.pt")

    @property
    def features(self):
        return self._p("features.pt")

    @property
    def barycenters(self):
        return self._p("barycenters.pt")

    @property
    def synthetic(self):
        return self._p("synthetic.pt")

    @property
    def images(self):
        return self._p("images")

    @property
    def labels(self):
        return self._p("labels")

    @property
    def shards(self):
        return self._p("shards")

    @property
    def results_json(self):
        return self._p("results.json")

    @property
    def results_md(self):
        return self._p("results.md")

    @property
    def students(self):
        """evaluate's finished students, one JSON file each (what a rerun keeps)."""
        return self._p("students")


def run_paths(out: str) -> RunPaths:
    return RunPaths(out)


_sha_cache: dict = {}


def _producer(path) -> str:
    return _PRODUCER.get(os.path.basename(str(path)), "the stage that writes it")


def _require_file(path) -> None:
    """A missing artifact is a UserError naming the stage that writes it."""
    if not os.path.isfile(path):
        producer = _producer(path)
        fail(f"{path} does not exist. Run {producer} with the same --out first (or point the flag at the file).")


def sha256_file(path) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime within the process)."""
    _require_file(path)
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def library_versions() -> dict:
    versions = {"torch": str(torch.__version__), "python": platform.python_version()}
    try:
        import torchvision
        versions["torchvision"] = str(torchvision.__version__)
    except Exception:
        pass
    try:
        import ot
        versions["pot"] = str(ot.__version__)
    except Exception:
        pass
    versions["wmdd"] = __version__
    return versions


def make_meta(stage: str, args, info, upstream: dict | None = None, **extra) -> dict:
    """The `meta` entry of an artifact. `upstream` maps names to the files it was made from."""
    meta = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "dataset": info.name,
        "classes": list(info.classes),
        "resolution": int(info.resolution),
        "image_size": int(info.image_size),
        "mean": list(info.mean),
        "std": list(info.std),
        "eval_transform": data.eval_transform_id(info),
        "protocol": protocol.record(args, stage),
        "upstream": {name: sha256_file(p) for name, p in (upstream or {}).items()},
        "args": args_dict(args) if args is not None else {},
        "seed": getattr(args, "seed", None),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta.update(extra)
    return meta


def write_text(path, text: str) -> str:
    """Atomically write a text file (temp file + rename): a reader never sees half of it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def save(path, payload: dict, meta: dict) -> str:
    """Atomically write {**payload, "meta": meta} to path (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj = dict(payload)
    obj["meta"] = meta
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not write {path} ({e}). Nothing was replaced: any earlier {os.path.basename(path)} "
             "is intact. Free disk space or fix the directory's permissions, then rerun.")
    return path


def load(path, stage: str | None = None, allow_plain: bool = False, mmap: bool = False) -> dict:
    """Load an artifact safely (weights_only=True). A missing, truncated, corrupt or unsafe file, or one
    from another stage, is a UserError naming the file and the fix."""
    producer = _producer(path)
    _require_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler" in line), "")
        fail(f"refused to load {path}: it holds Python objects that weights_only loading does not allow "
             f"({reason[:200]}). Nothing in it was run. Only load artifacts from sources you trust; "
             f"regenerate it with {producer}.")
    except Exception as e:  # truncated zip, bad magic number, ...
        fail(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
             f"Delete it and rerun {producer}.")
    if not isinstance(obj, dict):
        fail(f"{path} is not a wmdd artifact (a {type(obj).__name__}, not a dict). Regenerate it with {producer}.")
    if "meta" not in obj:
        if allow_plain:
            return obj
        fail(f"{path} has no `meta` entry: it was not written by wmdd. Regenerate it with {producer}.")
    meta = obj["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        fail(f"{path} has artifact format {meta.get('format_version')}, this code reads {FORMAT_VERSION}. "
             f"Regenerate it with {producer}.")
    if stage is not None and meta.get("stage") != stage:
        fail(f"{path} was written by the {meta.get('stage')!r} stage, expected {stage!r}.")
    return obj


def check_compatible(meta: dict, info, path, upstream: dict | None = None) -> None:
    """Refuse an artifact made for another dataset, class order or resolution, or from other upstream
    files than the ones given (`upstream` maps a name in meta['upstream'] to the current file)."""
    checks = [("dataset", meta.get("dataset"), info.name, "--dataset"),
              ("resolution", meta.get("resolution"), info.resolution, "--resolution")]
    for what, found, expected, flag in checks:
        if found != expected:
            fail(f"{path} was made for {what} {found!r}, but this run uses {expected!r}. Pass the matching "
                 f"{flag}, or regenerate the file (or use another --out).")
    found = meta.get("eval_transform") or data.eval_transform_id(info, legacy=True, mean=meta.get("mean"),
                                                                  std=meta.get("std"))
    if found != data.eval_transform_id(info):
        fail(f"{path} was made with the eval transform {found!r}, this code uses {data.eval_transform_id(info)!r} "
             "(the released Resize(256) -> CenterCrop(224) at 224 px, and the preset's normalisation): the "
             "teacher's validation accuracy, bn_stats.pt, features.pt and everything made from them differ. "
             "Regenerate it: rerun squeeze.py (and the later stages) into this --out, or use another --out.")
    protocol.check(meta, path, getattr(info, "protocol", "wmdd"))
    if list(meta.get("classes", [])) != list(info.classes):
        found = meta.get("classes", [])
        diff = next((i for i, (a, b) in enumerate(zip(found, info.classes)) if a != b), min(len(found), len(info.classes)))
        fail(f"{path} was made with another class list or order ({len(found)} classes; first difference at "
             f"index {diff}) than the dataset at {info.data_dir} ({info.num_classes} classes). Use the same "
             "--data-dir it was made from, or regenerate the file.")
    for name, current in (upstream or {}).items():
        recorded = meta.get("upstream", {}).get(name)
        if recorded is not None and recorded != sha256_file(current):
            fail(f"{path} was made from another {os.path.basename(current)} than the one at {current} "
                 f"(sha256 {recorded[:12]}... vs {sha256_file(current)[:12]}...): the {name} changed since. "
                 f"Rerun the stage that writes {os.path.basename(str(path))} so both come from the same {name}.")


def write_images(images: torch.Tensor, labels: torch.Tensor, info, ipc: int, root: str, encoded=None) -> None:
    """images/<class>/<class>_<j>.png (j zero-padded so that file order is image order; a "/" in a class
    name, as Fashion-MNIST's "T-shirt/top", written "_"); 1-channel images as grayscale PNGs. With `encoded`
    (--image-format jpeg: each image's JPEG bytes, which decode to `images`) <class>_<j>.jpg instead."""
    width = len(str(ipc - 1))
    index = torch.arange(labels.numel())
    for c in labels.unique().tolist():
        name = info.classes[c].replace("/", "_").replace(os.sep, "_")
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for ext in ("png", "jpg"):
            for old in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}_*.{ext}")):
                os.remove(old)
        for j, i in enumerate(index[labels == c].tolist()):
            path = os.path.join(folder, f"{name}_{j:0{width}d}")
            if encoded is not None:
                with open(path + ".jpg", "wb") as fh:
                    fh.write(encoded[i])
            elif images.shape[1] == 1:
                Image.fromarray(images[i, 0].to(torch.uint8).numpy()).save(path + ".png")
            else:
                save_image(images[i].float().div(255), path + ".png")


# ---------------------------------------------------------------------------------------------
# resume: one rule for every stage (squeeze's checkpoint, features.pt, barycenter and recover shards,
# relabel's epoch files, evaluate's students)


def reuse(path, stage: str | None, matches=None, log=None, mmap: bool = False):
    """The artifact at `path` if it exists, loads (a torn or corrupt file does not) and `matches(obj)`;
    else None, and the caller recomputes it. `.json` files (evaluate's students) are read as JSON.
    `log(reason)` hears why a file that exists was not reused; mmap=True reads only what `matches` touches."""
    if not os.path.isfile(path):
        return None
    try:
        if str(path).endswith(".json"):
            with open(path) as fh:
                obj = json.load(fh)
        else:
            obj = load(path, stage=stage, mmap=mmap)
    except (UserError, OSError, ValueError) as e:
        if log is not None:
            log(f"not reusing {path}: {e}")
        return None
    return obj if matches is None or matches(obj) else None


def shard_path(paths: RunPaths, stage: str, a: int, b: int) -> str:
    """The shard of classes [a, b) written by `stage` (recover, barycenter): <out>/shards/<stage>_a-b.pt."""
    return os.path.join(paths.shards, f"{stage}_{a:05d}-{b:05d}.pt")


def shard_files(paths: RunPaths, stage: str) -> list:
    """Every shard file of `stage` in the run directory, in class order."""
    return sorted(glob.glob(os.path.join(glob.escape(paths.shards), f"{stage}_*-*.pt")))
