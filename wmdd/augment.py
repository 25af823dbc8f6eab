"""Replayable FKD-style augmentation: RandomResizedCrop + flip + CutMix drawn from (seed, epoch, batch).

More: docs/core.md, "wmdd/augment.py".
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

AUG_VERSION = 1  # bump when any draw or its order changes: stored labels then refuse to replay


@dataclass(frozen=True)
class AugmentSpec:
    """Everything the draws depend on besides (seed, epoch, batch)."""
    source_size: int                    # stored image side (square), pixels
    out_size: int                       # model input side
    scale: tuple = (0.08, 1.0)          # RandomResizedCrop area fraction
    ratio: tuple = (3 / 4, 4 / 3)       # RandomResizedCrop aspect ratio
    flip: bool = True                   # random horizontal flip (p = 1/2)
    cutmix: bool = True                 # CutMix with lambda ~ Beta(1, 1)
    version: int = AUG_VERSION

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = [float(v) for v in self.scale], [float(v) for v in self.ratio]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugmentSpec":
        d = dict(d)
        d["scale"], d["ratio"] = tuple(d["scale"]), tuple(d["ratio"])
        return cls(**d)


def spec_for(info, source_size: int | None = None, cutmix: bool = True) -> AugmentSpec:
    """The preset's augmentation (crop scale, flip) for images stored at `source_size` (default: the
    model input size, which is how recover stores synthetic images)."""
    return AugmentSpec(source_size=int(source_size or info.image_size), out_size=int(info.image_size),
                       scale=tuple(float(v) for v in info.crop_scale), flip=bool(info.flip), cutmix=cutmix)


def plain_spec(info, source_size: int | None = None) -> AugmentSpec:
    """No augmentation: the whole image (resized to the model input when stored at another size), no
    flip, no CutMix; only the per-epoch shuffle remains. DD-Ranking's hard-label students
    (use_aug_for_hard=False) and ARS's "without augmentation" students train on these."""
    return AugmentSpec(source_size=int(source_size or info.image_size), out_size=int(info.image_size),
                       scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, cutmix=False)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (blake2b): distinct (seed, epoch, batch) never share a stream."""
    h = hashlib.blake2b("/".join(str(int(v)) for v in values).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The CPU generator every augmentation draw of batch `batch` of epoch `epoch` comes from."""
    return torch.Generator().manual_seed(_mix(seed, epoch, batch, 0xA06))


class ReplayPlan:
    """Which images form each batch: a seeded permutation per epoch, cut into batches (last one may be
    smaller, as a DataLoader with drop_last=False)."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        if num_images < 1 or batch_size < 1:
            raise ValueError(f"need images and a positive batch size, got {num_images} and {batch_size}")
        self.num_images, self.batch_size, self.seed = int(num_images), int(batch_size), int(seed)
        self._cache: dict = {}

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_images / self.batch_size)

    def batch_sizes(self) -> list:
        full, rest = divmod(self.num_images, self.batch_size)
        return [self.batch_size] * full + ([rest] if rest else [])

    def order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x0D3))
            self._cache[epoch] = torch.randperm(self.num_images, generator=g)
        return self._cache[epoch]

    def batch(self, epoch: int, batch: int) -> torch.Tensor:
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} of an epoch with {self.batches_per_epoch} batches")
        return self.order(epoch)[batch * self.batch_size:(batch + 1) * self.batch_size]


@dataclass
class BatchParams:
    """Every random choice of one batch. Boxes are in pixels."""
    index: torch.Tensor      # int64 [n]: dataset index of each image
    crop: torch.Tensor       # int64 [n, 4]: (top, left, height, width) in the stored image
    flip: torch.Tensor       # bool [n]
    mix_index: torch.Tensor  # int64 [n]: position in the batch of the image pasted into image i
    lam: float               # drawn lambda (before clipping the box)
    bbox: torch.Tensor       # int64 [4]: (y1, x1, y2, x2) of the pasted box in the output image
    lam_area: float          # 1 - box area / image area: the share of image i left after pasting

    def digest(self) -> int:
        """A signed 64-bit fingerprint of every draw (stored with the labels, checked on replay)."""
        h = hashlib.blake2b(digest_size=8)
        for t in (self.index, self.crop, self.flip.to(torch.int64), self.mix_index, self.bbox):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        h.update(np.float64(self.lam).tobytes())
        return int.from_bytes(h.digest(), "little", signed=True)


def crop_sizes(u_area: torch.Tensor, u_ratio: torch.Tensor, size: int, scale, ratio) -> tuple:
    """RandomResizedCrop's size rule (torchvision's get_params) for square images of side `size`, from
    uniforms [n, attempts] (float64): each attempt's area fraction is uniform in `scale`, its aspect
    ratio log-uniform in `ratio`; the first attempt that fits wins. Returns (h [n], w [n], the winning
    attempt [n], -1 where none fits). Both crop draws (relabel's replay, recover's shared view) use it."""
    target = float(size * size) * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full((len(ok),), -1, dtype=torch.int64))
    rows = torch.arange(len(ok))
    return h[rows, first.clamp(min=0)], w[rows, first.clamp(min=0)], first


def _crop_boxes(g: torch.Generator, n: int, size: int, scale, ratio, attempts: int = 10) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for n square images of side `size`, vectorised: the
    first of `attempts` (area, log-ratio) draws that fits, else the centre-crop fallback. The number
    of draws is fixed, so the stream layout does not depend on the outcome."""
    H = W = size
    u_area = torch.rand(n, attempts, generator=g, dtype=torch.float64)
    u_ratio = torch.rand(n, attempts, generator=g, dtype=torch.float64)
    u_top = torch.rand(n, generator=g, dtype=torch.float64)
    u_left = torch.rand(n, generator=g, dtype=torch.float64)
    h, w, first = crop_sizes(u_area, u_ratio, size, scale, ratio)
    # centre-crop fallback (square images: in_ratio = 1, always inside `ratio` for the usual (3/4, 4/3))
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = H, int(round(H * max(ratio)))
    else:
        fw, fh = W, H
    hh = torch.where(first >= 0, h, torch.full((n,), fh))
    ww = torch.where(first >= 0, w, torch.full((n,), fw))
    top = torch.where(first >= 0, torch.floor(u_top * (H - hh + 1).double()).to(torch.int64), (H - hh) // 2)
    left = torch.where(first >= 0, torch.floor(u_left * (W - ww + 1).double()).to(torch.int64), (W - ww) // 2)
    return torch.stack([top, left, hh, ww], dim=1)


def draw_batch(spec: AugmentSpec, index: torch.Tensor, seed: int, epoch: int, batch: int) -> BatchParams:
    """All random choices of batch `batch` of epoch `epoch`, from batch_generator(seed, epoch, batch)."""
    g = batch_generator(seed, epoch, batch)
    n = int(index.numel())
    crop = _crop_boxes(g, n, spec.source_size, spec.scale, spec.ratio)
    coin = torch.rand(n, generator=g, dtype=torch.float64)
    flip = (coin < 0.5) if spec.flip else torch.zeros(n, dtype=torch.bool)
    perm = torch.randperm(n, generator=g)
    u = torch.rand(3, generator=g, dtype=torch.float64)
    S = spec.out_size
    if spec.cutmix and n > 1:
        lam = float(u[0])                                   # Beta(1, 1)
        cut = int(S * math.sqrt(1.0 - lam))
        cy, cx = min(int(u[1] * S), S - 1), min(int(u[2] * S), S - 1)
        y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, S)
        x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, S)
    else:
        lam, y1 = 1.0, 0
        y2 = x1 = x2 = 0
        perm = torch.arange(n)
    bbox = torch.tensor([y1, x1, y2, x2], dtype=torch.int64)
    lam_area = 1.0 - (y2 - y1) * (x2 - x1) / float(S * S)
    return BatchParams(index.to(torch.int64).clone(), crop, flip, perm, lam, bbox, lam_area)


def resize_matrices(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """[n, out_size, in_size] matrices R with R @ signal = the crop signal[start:start + length] resized
    to out_size by antialiased bilinear interpolation (F.interpolate(mode="bilinear", antialias=True,
    align_corners=False): a triangle filter widened by the scale factor when shrinking, weights
    renormalised at the borders). Crop + resize of a batch is then two batched matmuls."""
    start = start.to(torch.float64)[:, None, None]
    length = length.to(torch.float64)[:, None, None]
    scale = length / out_size                                   # input pixels per output pixel
    support = torch.clamp(scale, min=1.0)
    inv = 1.0 / support
    i = torch.arange(out_size, dtype=torch.float64)[None, :, None]
    center = scale * (i + 0.5)
    lo = torch.clamp(torch.floor(center - support + 0.5), min=0.0)
    hi = torch.minimum(torch.floor(center + support + 0.5), length)
    j = torch.arange(in_size, dtype=torch.float64)[None, None, :] - start   # source pixel, crop coordinates
    w = torch.clamp(1.0 - torch.abs((j - center + 0.5) * inv), min=0.0)
    w = w * ((j >= lo) & (j < hi))
    return (w / w.sum(dim=2, keepdim=True)).to(torch.float32)


def apply_batch(images: torch.Tensor, params: BatchParams, spec: AugmentSpec, mean, std) -> torch.Tensor:
    """The augmented, normalised batch float32 [n, C, S, S] from stored uint8 (or [0, 1] float) images
    [N, C, H, W] (on any device): crop -> resize -> flip per image (as two batched matmuls), normalise,
    then CutMix."""
    S = spec.out_size
    idx = params.index.to(images.device)
    x = images[idx]
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    H, W = x.shape[-2:]
    whole = torch.tensor([0, 0, H, W], dtype=params.crop.dtype)
    if not (H == W == S and not bool(params.flip.any()) and bool((params.crop == whole).all())):
        # (else every crop is the whole image at the output size: the resize matrices are the identity)
        ry = resize_matrices(params.crop[:, 0], params.crop[:, 2], H, S).to(x.device)
        rx = resize_matrices(params.crop[:, 1], params.crop[:, 3], W, S)
        rx = torch.where(params.flip[:, None, None], rx.flip(1), rx).to(x.device)
        x = torch.matmul(torch.matmul(ry[:, None], x), rx.transpose(1, 2)[:, None])
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    y1, x1, y2, x2 = (int(v) for v in params.bbox)
    if y2 > y1 and x2 > x1:
        mix = params.mix_index.to(x.device)
        x[:, :, y1:y2, x1:x2] = x[mix, :, y1:y2, x1:x2].clone()
    return x


def apply_batch_reference(images: torch.Tensor, params: BatchParams, spec: AugmentSpec, mean, std) -> torch.Tensor:
    """`apply_batch` one image at a time with F.interpolate (the specification it is tested against)."""
    S = spec.out_size
    out = []
    for k in range(params.index.numel()):
        img = images[int(params.index[k])]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        t, l, h, w = (int(v) for v in params.crop[k])
        x = F.interpolate(img[:, t:t + h, l:l + w].unsqueeze(0), size=(S, S), mode="bilinear",
                          align_corners=False, antialias=True)
        out.append(x.flip(-1) if bool(params.flip[k]) else x)
    x = torch.cat(out)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y1, x1, y2, x2 = (int(v) for v in params.bbox)
    x[:, :, y1:y2, x1:x2] = x[params.mix_index, :, y1:y2, x1:x2].clone()
    return x


class ReplaySampler(Sampler):
    """Yields the (epoch, batch) keys of `epochs` (any iterable of epoch numbers), in order."""

    def __init__(self, plan: ReplayPlan, epochs):
        self.plan, self.epochs = plan, list(epochs)

    def __iter__(self):
        for e in self.epochs:
            for b in range(self.plan.batches_per_epoch):
                yield (e, b)

    def __len__(self):
        return len(self.epochs) * self.plan.batches_per_epoch


class ReplayDataset(Dataset):
    """Key (epoch, batch) -> the augmented batch and its draws. Use with DataLoader(batch_size=None,
    sampler=ReplaySampler(...)); `images` are the stored uint8 images [N, C, H, W] (CPU)."""

    def __init__(self, images: torch.Tensor, plan: ReplayPlan, spec: AugmentSpec, mean, std):
        if images.shape[-1] != spec.source_size or images.shape[-2] != spec.source_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the augmentation expects "
                             f"{spec.source_size}x{spec.source_size}")
        self.images, self.plan, self.spec, self.mean, self.std = images, plan, spec, tuple(mean), tuple(std)

    def __len__(self):  # keys are not positions; the sampler enumerates them
        return self.plan.batches_per_epoch

    def params(self, epoch: int, batch: int) -> BatchParams:
        return draw_batch(self.spec, self.plan.batch(epoch, batch), self.plan.seed, epoch, batch)

    def __getitem__(self, key):
        epoch, batch = key
        p = self.params(epoch, batch)
        return {"epoch": epoch, "batch": batch, "x": apply_batch(self.images, p, self.spec, self.mean, self.std),
                "index": p.index, "mix_index": p.mix_index, "lam_area": p.lam_area, "digest": p.digest(),
                "crop": p.crop, "flip": p.flip, "bbox": p.bbox}


# ---------------------------------------------------------------------------------------------
# recover: one crop + flip + roll shared by the whole batch, drawn from the batch's generator


def recover_generator(seed: int, first_class: int, index, purpose: int = 0) -> torch.Generator:
    """The CPU generator of one batch: depends only on the seed, the group's first class and j
    (purpose 1: the choice of real images for --init real, per class)."""
    words = [seed % 2**32, purpose, first_class, 0 if index is None else index + 1]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def draw_shared_view(gen: torch.Generator, size: int, scale, flip: bool, jitter: int,
                      ratio=(3 / 4, 4 / 3)) -> tuple:
    """recover's augmentation, one view for the whole batch (its images are optimised, not replayed):
    (top, left, height, width, flip, dy, dx): RandomResizedCrop's box (10 tries of an area fraction
    uniform in `scale` and a log-uniform aspect ratio, else the whole image), a coin flip, a roll."""
    u = torch.rand(30, generator=gen).double().view(10, 3)  # (area, ratio, top) per attempt
    h, w, first = (int(v) for v in crop_sizes(u[None, :, 0], u[None, :, 1], size, scale, ratio))
    box = (0, 0, size, size)
    if first >= 0:
        top = min(int(float(u[first, 2]) * (size - h + 1)), size - h)
        left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
        box = (top, left, h, w)
    rest = torch.randint(0, 2**30, (3,), generator=gen).tolist()
    do_flip = flip and rest[0] % 2 == 1
    dy, dx = rest[1] % (jitter + 1), rest[2] % (jitter + 1)
    return box + (do_flip, dy, dx)


def shared_view(x: torch.Tensor, params: tuple, size: int) -> torch.Tensor:
    top, left, h, w, do_flip, dy, dx = params
    x = x[..., top:top + h, left:left + w]
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if do_flip:
        x = x.flip(-1)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    return x
