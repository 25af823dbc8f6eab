"""What every stage script shares on the command line: common flags, device, seeding, errors.

More: docs/core.md, "wmdd/cli.py".
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """Bad input the user can fix: the message says what, where and how to fix it. Exit code 2."""


def fail(message: str) -> "None":
    raise UserError(message)


def add_common_args(parser: argparse.ArgumentParser, *, ipc: bool = False) -> argparse.ArgumentParser:
    """Flags every stage takes. Defaults that depend on the dataset preset are None and resolved later."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default="digits",
                   help="dataset preset: digits, tiny, imagenette, imagenet, cifar10, cifar100, fashion_mnist, folder")
    g.add_argument("--data-dir", default=None,
                   help="dataset root (not needed for digits); default $WMDD_DATA/<release folder name>, e.g. "
                        "tiny-imagenet-200, imagenette2, imagenet, cifar (./data/<name> when WMDD_DATA is unset)")
    g.add_argument("--resolution", type=int, default=None,
                   help="protocol resolution; tiny: 224 (WMDD, upsampled) or 64 (SRe2L/RDED); digits: 16 or 32")
    g.add_argument("--download", action="store_true", help="allow torchvision to download CIFAR or Fashion-MNIST")
    g.add_argument("--out", default=None, help="run directory (default runs/<dataset>/default)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    g.add_argument("--seed", type=int, default=0, help="every random choice flows from this seed")
    g.add_argument("--impl", default=None, choices=["auto", "ext", "ref"],
                   help="kernel implementation: compiled extension, reference (POT / plain torch), "
                        "or auto (extension when built). Default: $WMDD_IMPL or auto")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument("--protocol", default="wmdd", choices=["wmdd", "released"],
                   help="wmdd: this project's choices; released: every choice as in the authors' released "
                        "code (docs/protocol.md); a choice's own flag wins")
    if ipc:
        g.add_argument("--ipc", type=int, default=10, help="images per class")
    return parser


def parse_range(spec, n: int, flag: str = "--classes", what: str = "class") -> range:
    """--classes / --epochs-range: 'a:b' (half-open, either side may be empty) or 'a' -> range(a, b)
    within [0, n); None -> range(n)."""
    if spec is None:
        return range(n)
    try:
        if ":" in str(spec):
            a, b = str(spec).split(":", 1)
            lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else n
        else:
            lo = int(spec)
            hi = lo + 1
    except ValueError:
        fail(f"{flag} {spec!r} is not a {what} range; write a:b ({what} a to b-1), e.g. 0:{max(n // 2, 1)}.")
    if not 0 <= lo < hi <= n:
        fail(f"{flag} {spec} is outside 0:{n} (every {what}) or empty; use a:b with 0 <= a < b <= {n}.")
    return range(lo, hi)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but torch sees no CUDA device. Use --device cpu (or auto).")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_out(args) -> str:
    return args.out or os.path.join("runs", args.dataset, "default")


def args_dict(args) -> dict:
    """argparse Namespace -> plain JSON-safe dict (stored in artifact meta)."""
    return json.loads(json.dumps(vars(args), default=str))


def run(main, parser: argparse.ArgumentParser, argv=None):
    """Parse, run main, and turn UserError into a clear message and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
