"""evaluate.py's students: the jobs of one run, what each student's result depends on, where its file
lives and whether a file there is a finished student of this run, and the label sources it trains with
(docs/evaluate.md, "Resume" and "Labels").

More: docs/core.md, "wmdd/students.py".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from wmdd import artifacts, augment, classic, cli, dist, models, softlabels, subsets


def is_full_data(key: str) -> bool:
    """The full-data student's job key ('full/hard'): its own batch, recipe subset and file location."""
    return key.startswith("full/")


# the settings a full-data student depends on: the recipe and the dataset, not the synthetic set, the
# teacher, the labels or the IPC, so one is trained per dataset, student architecture and recipe
FULL_DATA_RECIPE = ("dataset", "resolution", "student", "epochs", "full_batch_size", "lr", "weight_decay", "eval_every",
                    "protocol", "recipe")


def student_fingerprint(args, key: str, seed: int, upstream: dict) -> str:
    """sha256 of everything one student's result depends on: a rerun keeps a student file only if equal."""
    config = {k: v for k, v in cli.args_dict(args).items()
              if k not in ("seeds", "baseline", "workers", "device", "impl", "out", "data_dir", "download",
                           "val_batch_size", "teacher", "synthetic", "full_data_acc", "hlr_reference", "ars",
                           "labels_dir", "full_data_dir", "soft_only")}
    if config.get("recipe") == "kd":  # the default recipe: the fingerprints of the files written before --recipe
        config.pop("recipe")
    if not config.get("ddranking", True):  # likewise before --ddranking
        config.pop("ddranking")
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


def check_flags(args) -> None:
    """Bad flag values, refused before anything is read or written."""
    if args.seeds < 1:
        cli.fail(f"--seeds must be at least 1, got {args.seeds}.")
    classic_student = getattr(args, "recipe", "kd") != "kd" and args.student in classic.STUDENTS
    if args.student not in models.student_names() and not classic_student:
        cli.fail(f"--student {args.student!r} is not an architecture this project can build. Valid names: the "
                 f"project's {', '.join(models.ARCHES)} (and {', '.join(classic.STUDENTS)} under --recipe dc / dsa); "
                 "torchvision's classification models "
                 f"{', '.join(n for n in models.torchvision_students() if n not in models.ARCHES)}.")
    if args.full_data_acc is not None and not 0.0 <= args.full_data_acc <= 100.0:
        cli.fail(f"--full-data-acc {args.full_data_acc:g} is outside [0, 100]: it is the full-data hard-label "
                 "top-1 accuracy in percent (e.g. --full-data-acc 56.5).")


def param_groups(model, weight_decay: float) -> list:
    """The released rule (train/utils.py `get_parameters`): weight decay on the parameters whose name holds
    'weight' and that have more than one dimension (conv, linear, attention and MLP weights); none on
    norms, biases, or a ViT's position and class embeddings (pos_embed, cls_token: 3-d, not 'weight').
    For ConvNets and ResNets this is every parameter with more than one dimension, as before."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if "weight" in name and p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------
# evaluate --ddranking: DD-Ranking 0.2.0's evaluator (the ddranking wheel), where it is well defined

DDRANKING_LR_GRID = (0.001, 0.005, 0.01, 0.05, 0.1)  # lr_list: ddranking/metrics/soft_label.py:211, :240
DDRANKING_TEST_INTERVAL = 20  # LabelRobustScoreSoft.test_interval: ddranking/metrics/soft_label.py:130


def ddranking_mode(args) -> str:
    """--ddranking: refuses what 0.2.0's soft-label evaluator does not define, sets its validation
    interval; returns the line evaluate prints in its configuration."""
    if not args.ddranking:
        return "off: DD-Ranking's formulas under WMDD's evaluation recipe (--ddranking: its 0.2.0 evaluator's)"
    if args.recipe != "kd" or args.labels == "hard":
        cli.fail("--ddranking follows DD-Ranking 0.2.0's soft-label evaluator (LabelRobustScoreSoft), which "
                 "trains soft-label students: drop --recipe dc / dsa and --labels hard, or drop --ddranking.")
    if args.eval_every not in (None, DDRANKING_TEST_INTERVAL):
        cli.fail(f"--eval-every {args.eval_every} contradicts --ddranking, which validates every "
                 f"{DDRANKING_TEST_INTERVAL} epochs as DD-Ranking 0.2.0 does: drop one of the two.")
    args.eval_every = DDRANKING_TEST_INTERVAL
    return (f"on (DD-Ranking 0.2.0): baseline rows and distilled/hard trained at each lr of "
            f"{list(DDRANKING_LR_GRID)}, the best kept; validation every {DDRANKING_TEST_INTERVAL} epochs (and "
            "the last); the best validated top-1 is DD-Ranking's number; LRS_ddr: its LRS on percent values")


def on_lr_grid(key: str) -> bool:
    """Whether --ddranking trains this row at every lr of the grid, as 0.2.0 does: every baseline row but
    the full-data student (its own recipe), and the distilled hard-label row; the distilled soft rows
    keep --lr, the evaluator's `syn_lr` (docs/evaluate.md, "--ddranking")."""
    return not is_full_data(key) and (not key.startswith("distilled/") or key == "distilled/hard")


def over_lr_grid(job, args, train) -> dict:
    """train(args): once, or under --ddranking for a grid row at every lr of the grid, returning the
    record of the lr with the highest best-validated top-1 (the first on a tie, as 0.2.0's strict `>`),
    with `lr` and `lr_grid` ({lr: best validated top-1})."""
    if not args.ddranking or not on_lr_grid(job.key):
        return train(args)
    recs = {lr: train(argparse.Namespace(**{**vars(args), "lr": lr})) for lr in DDRANKING_LR_GRID}
    lr = max(recs, key=lambda k: recs[k]["best_top1"])
    return {**recs[lr], "lr": lr, "lr_grid": {f"{k:g}": r["best_top1"] for k, r in recs.items()},
            "wall_s": round(sum(r["wall_s"] for r in recs.values()), 2)}


# ---------------------------------------------------------------------------------------------
# label sources


class StoredLabels:
    """relabel's files, read one epoch at a time, each batch checked against its replay digest."""
    kind = "stored"

    def __init__(self, labels_dir: str, settings: dict, plan: augment.ReplayPlan):
        self.dir, self.settings, self.num_classes = labels_dir, settings, settings["num_classes"]
        self.offsets = [0]
        for n in plan.batch_sizes():
            self.offsets.append(self.offsets[-1] + n)
        self.epoch, self.obj = None, None

    def targets(self, item: dict, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """The soft targets of batch `item` (of its `rows` when x is one rank's part of the batch)."""
        e, b = int(item["epoch"]), int(item["batch"])
        rows = rows or range(x.shape[0])
        if e != self.epoch:
            self.obj, self.epoch = softlabels.read_epoch(self.dir, e, self.settings), e
        stored = int(self.obj["digests"][b])
        if stored != int(item["digest"]):
            cli.fail(f"the replayed augmentation of epoch {e} batch {b} differs from the one relabel used "
                     f"(digest {stored} vs {int(item['digest'])}): another torch version or augmentation code. "
                     f"Rerun relabel.py in this environment.")
        start = self.offsets[b] + rows.start
        entry = softlabels.slice_entry(self.obj["entry"], start, start + len(rows))
        return softlabels.decode(entry, self.num_classes).to(x.device)


class OnlineLabels:
    """The teacher on each batch, optionally compressed exactly as relabel would store it. A rank-r
    codec needs the whole epoch (its basis is the epoch's): the epoch's batches are then replayed and
    labelled at its first batch, so the targets equal stored ones bit for bit."""
    kind = "online"

    def __init__(self, teacher, num_classes: int, topk=None, precision=None, rank=None):
        self.teacher, self.num_classes = teacher, num_classes
        self.topk, self.precision, self.rank = topk, precision, rank
        self.dataset = self.plan = self.epoch = self.entry = None

    def bind(self, dataset, plan) -> None:
        """The replay the student trains on (used by the per-epoch codec)."""
        self.dataset, self.plan, self.epoch = dataset, plan, None

    @torch.no_grad()
    def targets(self, item: dict, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """The soft targets of batch `item` (of its `rows` when x is one rank's part of the batch)."""
        rows = rows or range(x.shape[0])
        if self.rank is not None:
            e, b = int(item["epoch"]), int(item["batch"])
            if e != self.epoch:
                logits = [self.teacher(self.dataset[(e, k)]["x"].to(x.device))
                          for k in range(self.plan.batches_per_epoch)]
                self.entry = softlabels.encode(torch.cat(logits), None, self.precision or "fp16", self.rank)
                self.epoch = e
            start = b * self.plan.batch_size + rows.start
            entry = softlabels.slice_entry(self.entry, start, start + len(rows))
            return softlabels.decode(entry, self.num_classes).to(x.device)
        t = self.teacher(x)
        if self.topk is None and self.precision is None:
            return t.float()
        return softlabels.decode(softlabels.encode(t, self.topk, self.precision or "fp16"), self.num_classes).to(x.device)


def resolve_label_settings(args, info, syn, labels_dir, teacher_path, synthetic_path):
    """With --labels stored: the stored settings, checked against this run. Fills epochs / batch size."""
    manifest = softlabels.read_manifest(labels_dir)
    settings = manifest["settings"]
    for flag, key in (("epochs", "epochs"), ("batch_size", "batch_size")):
        given = getattr(args, flag)
        if given is not None and given != settings[key]:
            cli.fail(f"--{flag.replace('_', '-')} {given} differs from the stored labels' {key} {settings[key]} "
                     f"({softlabels.manifest_path(labels_dir)}): a student replays relabel's batches, so both "
                     f"must match. Drop the flag (it defaults to the stored {settings[key]}), or rerun relabel.py "
                     f"with --{flag.replace('_', '-')} {given}.")
        setattr(args, flag, settings[key])
    if settings["synthetic_sha256"] != artifacts.sha256_file(synthetic_path):
        cli.fail(f"the labels in {labels_dir} were made from another synthetic set than {synthetic_path} "
                 "(sha256 differs): the images changed since relabel. Rerun relabel.py.")
    if os.path.isfile(teacher_path) and settings["teacher_sha256"] != artifacts.sha256_file(teacher_path):
        cli.fail(f"the labels in {labels_dir} were made by another teacher than {teacher_path} (sha256 "
                 "differs). Rerun relabel.py with this teacher, or pass --teacher with the one used.")
    if settings["num_images"] != len(syn) or settings["num_classes"] != info.num_classes:
        cli.fail(f"the labels in {labels_dir} are for {settings['num_images']} images of "
                 f"{settings['num_classes']} classes; {synthetic_path} has {len(syn)} of {info.num_classes}. "
                 "Rerun relabel.py.")
    if settings["augment"].get("version") != augment.AUG_VERSION:
        cli.fail(f"the labels in {labels_dir} use augmentation version {settings['augment'].get('version')}, "
                 f"this code replays version {augment.AUG_VERSION}. Rerun relabel.py.")
    settings.setdefault("rank", None)
    for flag in ("topk", "rank", "precision"):
        if getattr(args, flag) is not None and getattr(args, flag) != settings[flag]:
            cli.fail(f"--{flag} {getattr(args, flag)} differs from the stored labels' {settings[flag]}; drop the "
                     "flag (the random baseline uses the stored compression) or rerun relabel.py.")
    return settings


def label_recipe(args, info, syn, labels_dir, teacher_path, synthetic_path) -> tuple:
    """The label source's settings (stored: relabel's, checked; else None), the soft recipe's augmentation,
    its seed and the label compression (topk, precision, rank)."""
    settings = None
    if args.labels == "stored":
        settings = resolve_label_settings(args, info, syn, labels_dir, teacher_path, synthetic_path)
        spec = augment.AugmentSpec.from_dict(settings["augment"])
        aug_seed, topk, precision, rank = settings["seed"], settings["topk"], settings["precision"], settings["rank"]
        if args.no_cutmix and spec.cutmix:
            cli.fail("--no-cutmix does not apply to --labels stored: the student replays relabel's batches, "
                     "which used CutMix. Rerun relabel.py with --no-cutmix, or use --labels online / hard.")
    else:
        subsets.default_batch_size(args)
        spec = augment.spec_for(info, source_size=syn.images.shape[-1], cutmix=not args.no_cutmix)
        aug_seed, topk, precision, rank = args.seed, args.topk, args.precision, args.rank
        if topk is not None and rank is not None:
            cli.fail("--topk and --rank are two ways to compress the labels: pass one of them.")
    return settings, spec, aug_seed, (topk, precision, rank)


# ---------------------------------------------------------------------------------------------
# the students of one run


@dataclass
class Job:
    """One student to train (or keep, when its file under students/ has this fingerprint)."""
    key: str
    seed: int
    iset: subsets.ImageSet
    source: object          # StoredLabels / OnlineLabels, or None for hard labels
    spec: augment.AugmentSpec
    plan: augment.ReplayPlan
    images_desc: str
    label_desc: str
    path: str = ""
    fingerprint: str = ""


def student_jobs(args, info, syn, bases, seeds, teacher, settings, paths, spec, plain, hard_spec, aug_seed,
                 compression, full_source, upstream) -> list:
    """Every student of this run, grouped by configuration, seeds in order: the distilled set (soft, hard,
    and without augmentation for --ars), each baseline's sets (a new one per seed for `random`), and the
    full-data student once (with --seed) when it is HLR's reference."""
    topk, precision, rank = compression
    comp = softlabels.describe(topk, precision or ("fp16" if topk or rank else "fp32"), rank)
    loss_desc = f"T = {args.temperature:g}" if args.loss == "kl" else f"MSE + {args.gt_weight:g} CE"
    soft_desc = {"stored": "soft, stored", "online": "soft, teacher online", "hard": "hard"}[args.labels]
    hard_desc = "hard, soft recipe's augmentation (--hard-label-aug)" if args.hard_label_aug else \
        "hard, no augmentation (DD-Ranking)"
    if getattr(args, "recipe", "kd") != "kd":
        hard_desc = classic.describe(args)
    online = lambda: OnlineLabels(teacher, info.num_classes, topk, precision, rank)  # noqa: E731
    jobs = []

    def add(key, seed, iset, source, sp, images_desc, label_desc, depends):
        if getattr(args, "soft_only", False) and key.endswith("/hard") and not is_full_data(key):
            return
        batch = args.full_batch_size if is_full_data(key) else args.batch_size
        plan = augment.ReplayPlan(len(iset), batch, aug_seed)
        jobs.append(Job(key, seed, iset, source, sp, plan, images_desc, label_desc,
                        student_path(paths, key, seed, args.student, args.full_data_dir),
                        student_fingerprint(args, key, seed, depends)))

    soft = args.labels != "hard"
    distilled_soft = (StoredLabels(args.labels_dir or paths.labels, settings, augment.ReplayPlan(len(syn), args.batch_size, aug_seed))
                      if args.labels == "stored" else online) if soft else None
    for s in seeds:
        if soft:
            add("distilled/soft", s, syn, distilled_soft if args.labels == "stored" else online(), spec, "distilled",
                f"{soft_desc} ({comp}), {loss_desc}", upstream)
    for s in seeds:
        add("distilled/hard", s, syn, None, hard_spec, "distilled", hard_desc, upstream)
    if args.ars and soft:
        for s in seeds:
            add("distilled/soft-noaug", s, syn, online(), plain, "distilled",
                f"soft, teacher online ({comp}), no augmentation (ARS), {loss_desc}", upstream)
    for name, base in bases.items():
        if name == "full":
            continue
        sets = {s: base.build(info, args, syn.ipc, s) for s in seeds}
        label_kinds = [k for k in base.labels if soft or k == "hard"]
        for kind in label_kinds + (["soft-noaug"] if args.ars and "soft" in label_kinds else []):
            for s in seeds:
                dep = {**upstream, "images": sets[s].indices}
                if kind == "soft":
                    add(f"{name}/soft", s, sets[s], online(), spec, base.describe,
                        f"soft, teacher online ({comp}, as distilled), {loss_desc}", dep)
                elif kind == "hard":
                    add(f"{name}/hard", s, sets[s], None, hard_spec, base.describe, hard_desc, dep)
                else:
                    add(f"{name}/soft-noaug", s, sets[s], online(), plain, base.describe,
                        f"soft, teacher online ({comp}), no augmentation (ARS), {loss_desc}", dep)
    if full_source == "student":
        full = bases["full"].build(info, args, syn.ipc, args.seed)
        add("full/hard", args.seed, full, None, hard_spec, bases["full"].describe, hard_desc,
            {"augmentation": hard_spec.as_dict(), "images": len(full), "dataset": info.name})
    return jobs


# ---------------------------------------------------------------------------------------------
# resume


def finished_record(job: Job):
    """The stored record if the job's file is a finished student with its fingerprint, else None (a
    missing, torn or stale file is trained again)."""
    obj = artifacts.reuse(job.path, None, lambda obj: obj.get("fingerprint") == job.fingerprint)
    return None if obj is None else obj.get("record")


def finished_records(jobs: list, world: dist.World, students_dir: str) -> list:
    """Each job's stored record or None: rank 0 decides which students are finished; every rank gets
    its answer and trains the same remaining ones."""
    finished = None
    if world.is_main:
        finished = [finished_record(j) for j in jobs]
        kept = sum(r is not None for r in finished)
        if kept:
            print(f"[evaluate] resuming: {kept} of {len(finished)} students already finished in {students_dir}")
    return dist.gather_objects(finished, world, None)[0]


def save_record(job: Job, record: dict) -> None:
    """A finished student, written at once (atomically) with its fingerprint."""
    os.makedirs(os.path.dirname(job.path), exist_ok=True)
    artifacts.write_text(job.path, json.dumps({"fingerprint": job.fingerprint, "record": record}, indent=1))
