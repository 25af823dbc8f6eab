"""evaluate.py's finished students: what one student's result depends on, where its file lives, and
whether a file there is a finished student of this run (evaluate.py's manual, "Resume").

Each student is one JSON file under students/ holding its record and a fingerprint: the sha256 of every
setting and upstream file its result depends on. A rerun keeps a file only when the fingerprint is equal;
a missing, torn or stale file is trained again.
"""
from __future__ import annotations

import hashlib
import json
import os

from wmdd import cli


def is_full_data(key: str) -> bool:
    """The full-data student's job key ('full/hard'): its own batch, recipe subset and file location."""
    return key.startswith("full/")


# the settings a full-data student depends on: the recipe and the dataset, not the synthetic set, the
# teacher, the labels or the IPC, so one is trained per dataset, student architecture and recipe
FULL_DATA_RECIPE = ("dataset", "resolution", "student", "epochs", "full_batch_size", "lr", "weight_decay", "eval_every",
                    "protocol")


def student_fingerprint(args, key: str, seed: int, upstream: dict) -> str:
    """sha256 of everything one student's result depends on: a rerun keeps a student file only if equal."""
    config = {k: v for k, v in cli.args_dict(args).items()
              if k not in ("seeds", "baseline", "workers", "device", "impl", "out", "data_dir", "download",
                           "val_batch_size", "teacher", "synthetic", "full_data_acc", "hlr_reference", "ars",
                           "labels_dir", "full_data_dir")}
    if is_full_data(key):
        config = {k: v for k, v in config.items() if k in FULL_DATA_RECIPE}
    else:  # the IPC's batch is the others' own
        config.pop("full_batch_size", None)
    blob = json.dumps({"config": config, "key": key, "seed": seed, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def student_path(paths, key: str, seed: int, arch: str, full_data_dir: str | None = None) -> str:
    if is_full_data(key):  # the full-data student: one per architecture, in --full-data-dir if given
        return os.path.join(full_data_dir or paths.students, f"{key.replace('/', '-')}-{arch}-seed{seed}.json")
    return os.path.join(paths.students, f"{key.replace('/', '-')}-seed{seed}.json")


def finished_student(path: str, fingerprint: str):
    """The stored record if `path` holds a finished student with this fingerprint, else None
    (a missing, torn or stale file is trained again)."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj["record"] if obj.get("fingerprint") == fingerprint else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
