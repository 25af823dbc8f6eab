"""Training-loop pieces that squeeze and evaluate share: validation accuracy and the loader seed."""
from __future__ import annotations

import torch
from tqdm import tqdm


@torch.no_grad()
def validate(model, loader, device, progress: bool = True, desc: str = "validate", world=None) -> dict:
    """Top-1 and top-5 accuracy (percent) of `model` over `loader`. Under torchrun (`world`, a
    wmdd.dist.World) each rank passes its own part of the data and the counts are summed over ranks."""
    model.eval()
    correct1 = correct5 = total = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    if world is not None and world.enabled:
        from wmdd import dist
        counts = dist.all_reduce_sum_(torch.tensor([correct1, correct5, total], dtype=torch.float64, device=device), world)
        correct1, correct5, total = (int(v) for v in counts.tolist())
    return {"top1": 100.0 * correct1 / max(total, 1), "top5": 100.0 * correct5 / max(total, 1)}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch: a resumed run draws the same order as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def in_memory(dataset, max_bytes: int = 1 << 29):
    """`dataset` (items (float tensor, int label)) transformed once and held as tensors when its pixels fit
    in `max_bytes`: a student validated every few epochs then skips the per-image transforms (the
    tensors are the same, so the accuracies are too). Larger datasets are returned as they are."""
    from torch.utils.data import TensorDataset

    if len(dataset) == 0:
        return dataset
    x0 = dataset[0][0]
    if len(dataset) * x0.numel() * x0.element_size() > max_bytes:
        return dataset
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64))
