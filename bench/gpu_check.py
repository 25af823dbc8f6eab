"""The Python half of bench/gpu_check.sh: one subcommand per step of the GPU check.

    python bench/gpu_check.py env
    python bench/gpu_check.py recover-bench --device cuda
    python bench/gpu_check.py recover-imagenet --device cuda --work /tmp/w   # --tiny: a CPU-sized run
    python bench/gpu_check.py barycenter --device cuda
    python bench/gpu_check.py torchrun --device cuda --work /tmp/w

Every number a subcommand measures is printed on a line `@@ key = value` (at the start of the line);
bench/gpu_check.sh copies those lines, prefixed with the step's name, into its one output file. The
output of the programs a subcommand runs is echoed indented ("  | "), so their lines never count.

This file reaches the project only through the stage scripts' and bench scripts' command lines, the
files they write (read with torch.load), and wmdd.ops (the kernels), because the module names inside
wmdd/ may change. The released recover loop at the ImageNet shape is ported here (the same port as
bench/bench_recover.py, on torchvision's ResNet-18) because bench_recover.py has no 224 px case.
docs/gpu.md says what each number is compared with.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# Reference points (docs/gpu.md): dense peaks of the H100 SXM / H200 (the same compute), and the paper's
# recover cost (WMDD, Table IV: ResNet-18, 224 px, on a V100).
PEAK_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}
PAPER_MS_PER_ITERATION = 2.4
PAPER_PEAK_GB = 0.78
V100_PEAK_TFLOPS = {"fp16 tensor": 125.0, "fp32": 15.7}

_children: set = set()  # process groups of the programs running now (killed with this process)


# ---------------------------------------------------------------------------------------------
# plumbing


def result(key: str, value) -> None:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    else:
        text = str(value).replace("\n", " ")
    print(f"@@ {key} = {text}", flush=True)


def _stop_children(signum, frame):
    for pgid in list(_children):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
    sys.exit(128 + signum)


def run(cmd, env=None, cwd=None, timeout=None) -> tuple:
    """(exit code, output, wall seconds) of a program, its output echoed indented. A program still
    running after `timeout` seconds is stopped (its whole process group) and gets exit code 124."""
    cmd = [str(c) for c in cmd]
    print("$ " + " ".join(cmd), flush=True)
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    for key, value in (env or {}).items():  # None: remove the variable
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    _children.add(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                pass
        out, _ = proc.communicate()
        rc = 124
        out += f"\n(stopped after {timeout} s)"
    finally:
        _children.discard(proc.pid)
    wall = time.perf_counter() - t0
    for line in out.splitlines():
        print("  | " + line.rstrip("\r")[-400:])
    print(f"  (exit code {rc}, {wall:.1f} s)", flush=True)
    return rc, out, wall


def last_error(out: str) -> str:
    """The most telling line of a failed program's output."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for pattern in (r"^error: ", r"(Error|Exception)\b.*:", r"FAILED|failed|refused"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][-300:]
    return lines[-1][-300:] if lines else "(no output)"


def require(rc: int, out: str, what: str) -> None:
    if rc != 0:
        print(f"{what} failed (exit code {rc}): {last_error(out)}", flush=True)
        sys.exit(rc if 0 < rc < 124 else 1)


def device_of(name: str):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_artifact(path: str):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def find(obj, key: str):
    """The first value stored under `key` anywhere in nested dicts / lists, or None."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        got = find(child, key)
        if got is not None:
            return got
    return None


def rel_diff(a: list, b: list) -> tuple:
    """(relative difference at the first entry, largest relative difference) of two equal-length series."""
    diffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    return (diffs[0], max(diffs)) if diffs else (float("nan"), float("nan"))


def stage(script: str) -> str:
    return os.path.join(REPO, script)


# ---------------------------------------------------------------------------------------------
# env


def cmd_env(a) -> None:
    import platform
    import shutil

    import numpy
    import torch
    import torchvision

    result("python", platform.python_version())
    result("python_path", sys.executable)
    result("torch", torch.__version__)
    result("torch_cuda", torch.version.cuda or "none")
    result("torchvision", torchvision.__version__)
    result("numpy", numpy.__version__)
    import importlib.metadata
    try:
        result("pot", importlib.metadata.version("pot"))
    except importlib.metadata.PackageNotFoundError:
        result("pot", "missing")
    result("cpus", os.cpu_count())
    result("torch_threads", torch.get_num_threads())
    result("cuda_available", torch.cuda.is_available())
    if shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        result("nvcc", out[-1] if out else "?")
    else:
        result("nvcc", "not on PATH")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        result("gpu", torch.cuda.get_device_name(0))
        result("gpu_count", torch.cuda.device_count())
        result("capability", "%d.%d" % torch.cuda.get_device_capability(0))
        result("sm_count", p.multi_processor_count)
        result("gpu_memory_gib", p.total_memory / 2**30)
        result("cudnn", torch.backends.cudnn.version())
        result("cudnn_allow_tf32", torch.backends.cudnn.allow_tf32)
        result("matmul_allow_tf32", torch.backends.cuda.matmul.allow_tf32)
        try:
            v = torch.cuda.nccl.version()
            result("nccl", ".".join(map(str, v)) if isinstance(v, tuple) else str(v))
        except Exception as e:  # noqa: BLE001 - a report, not a check
            result("nccl", f"unavailable ({type(e).__name__})")
        if shutil.which("nvidia-smi"):
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()
            result("driver", drv or "?")
    try:
        sys.path.insert(0, REPO)
        from wmdd import ops
        result("kernels", ops.describe())
    except Exception as e:  # noqa: BLE001
        result("kernels", f"wmdd.ops does not import: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# wheels, build, pytest


def cmd_wheels(a) -> None:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("ot") is not None:  # the barycenter steps import it
        result("pot", f"{importlib.metadata.version('pot')} (already installed)")
        return
    dirs = [d for d in a.dirs if d and os.path.isdir(d)]
    if not dirs:
        print(f"POT is not installed and no wheel folder exists (looked in: {', '.join(a.dirs) or 'none'}). "
              "docs/gpu.md says how to prepare one.")
        result("pot", "missing")
        sys.exit(1)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--no-cache-dir"]
    for d in dirs:
        cmd += ["--find-links", d]
    rc, out, _ = run(cmd + ["pot"])
    require(rc, out, "pip install pot")
    rc, out, _ = run([sys.executable, "-c", "import ot; print(ot.__version__)"])
    require(rc, out, "import ot")
    result("pot", f"{out.strip().splitlines()[-1]} (installed from {', '.join(dirs)})")


def cmd_build(a) -> None:
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: nothing to build for")
    arch = "%d.%d" % torch.cuda.get_device_capability(0)
    result("torch_cuda_arch_list", arch)
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(a.jobs), "FORCE_CUDA": "1", "WMDD_NO_EXT": None,
           "WMDD_NO_CUDA": None}
    rc, out, wall = run([sys.executable, "setup.py", "build_ext", "--inplace"], env=env)
    result("build_seconds", wall)
    require(rc, out, "setup.py build_ext --inplace")
    probe = ("from wmdd import ops; print(ops.describe()); "
             "print('with_cuda', ops.ext_available() and ops.ext_has_cuda())")
    rc, out, _ = run([sys.executable, "-c", probe])
    require(rc, out, "import of the built kernels")
    lines = out.strip().splitlines()
    result("kernels", lines[-2] if len(lines) > 1 else "?")
    has = lines[-1].endswith("True")
    result("cuda_kernels", has)
    if not has:
        print("the build finished but wmdd._C has no CUDA kernels")
        sys.exit(1)


def pytest_counts(out: str) -> dict:
    counts = {}
    tail = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", ln)]
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", tail[-1] if tail else ""):
        counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    return counts


def cmd_pytest(a) -> None:
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    worst = 0
    for name, args in (("gpu_marked", ["-m", "gpu", "tests"]), ("kernel_tests", ["tests/test_kernels.py"])):
        rc, out, wall = run(base + args, env={"WMDD_IMPL": "auto"})
        counts = pytest_counts(out)
        for what in ("passed", "failed", "skipped", "error"):
            result(f"{name}.{what}", counts.get(what, 0))
        result(f"{name}.seconds", wall)
        if rc not in (0, 5):  # 5: nothing collected
            worst = rc
        if name == "gpu_marked" and counts.get("skipped"):
            print("CUDA tests were skipped: see the -rs reasons above")
            worst = worst or 1
    sys.exit(worst)


# ---------------------------------------------------------------------------------------------
# recover: bench_recover.py (released loop vs ours, same inputs) and the ImageNet shape


def cmd_recover_bench(a) -> None:
    cuda = a.device == "cuda"
    steps, warmup = (a.steps or (49 if cuda else 2)), 1
    cases = a.cases or (None if cuda else "convnet-digits-16px")
    cmd = [sys.executable, os.path.join(HERE, "bench_recover.py"), "--device", a.device,
           "--steps", steps, "--warmup", warmup]
    if cases:
        cmd += ["--cases", cases]
    rc, out, _ = run(cmd)
    result("iterations", steps + warmup)
    if rc and cuda and "loss differs" in out:
        # cuDNN runs fp32 convolutions in TF32 by default, so the released loop (NCHW) and ours
        # (channels_last) may pick different TF32 kernels; again with TF32 off (true fp32)
        result("default_tf32_run", f"failed: {last_error(out)}")
        rc, out, _ = run(cmd, env={"NVIDIA_TF32_OVERRIDE": "0"})
        result("tf32", "off (NVIDIA_TF32_OVERRIDE=0)")
    case, rows = None, 0
    row = re.compile(r"^\| (released|ours-fp32|ours-bf16) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \| "
                     r"([\d.e+-]+) / ([\d.e+-]+) \|")
    for line in out.splitlines():
        m = re.match(r"^(\S+): batch (\d+) classes x (\d+) images at (\d+) px", line)
        if m:
            case = m.group(1)
            result(f"{case}.shape", f"{int(m.group(2)) * int(m.group(3))} images at {m.group(4)} px")
            continue
        m = row.match(line)
        if m and case:
            v = m.group(1).replace("-", "_")
            result(f"{case}.{v}.ms_per_step", float(m.group(2)))
            result(f"{case}.{v}.speedup_vs_released", float(m.group(4)))
            result(f"{case}.{v}.peak_step_mib", float(m.group(5)))
            result(f"{case}.{v}.rel_loss_step0", float(m.group(6)))
            result(f"{case}.{v}.rel_loss_max", float(m.group(7)))
            rows += 1
    require(rc, out, "bench/bench_recover.py")
    if not rows:
        print("bench_recover.py printed no table row this script can read")
        sys.exit(1)


def recover_flops(n: int, size: int) -> float:
    """FLOPs of one recover iteration of ResNet-18 (ImageNet stem, without its classifier) on n images
    of size x size: the forward and the backward to the pixels (the weights are frozen, so no weight
    gradients). Counted by torch's FlopCounterMode on the meta device (nothing is computed)."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval().requires_grad_(False)
    x = torch.empty(n, 3, size, size, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        model(x).square().sum().backward()
    return float(counter.get_total_flops())


def cmd_flops(a) -> None:
    flops = recover_flops(a.batch, a.size)
    result("shape", f"ResNet-18, {a.batch} images at {a.size} px, forward + backward to the pixels")
    result("gflop_per_iteration", flops / 1e9)
    result("paper_v100_ms_per_iteration", PAPER_MS_PER_ITERATION)
    implied = flops / (PAPER_MS_PER_ITERATION * 1e-3) / 1e12
    result("tflops_if_paper_ms_were_this_iteration", implied)
    result("v100_peak_tflops_fp16_tensor", V100_PEAK_TFLOPS["fp16 tensor"])
    result("paper_v100_peak_gb", PAPER_PEAK_GB)
    result("min_ms_at_h100_bf16_peak", flops / (PEAK_TFLOPS["bf16"] * 1e12) * 1e3)


class ReleasedLoop:
    """The released WMDD recover loop (per-class BN hooks with barycenter weights, feature hook, Adam
    0.5/0.9, per-channel clamp loop, loss.item() and a pixel clone every step), as ported in
    bench/bench_recover.py. amp=True runs the teacher under bf16 autocast in channels_last; the hooks'
    statistics stay float32 either way (as ours computes them)."""

    def __init__(self, model, x0, targets, ncls, ipc, size, iterations, lr=0.25, r_bn=10.0, amp=False):
        import torch
        self.torch, self.model, self.size, self.amp = torch, model, size, amp
        self.lr, self.iterations, self.r_bn, self.ncls, self.ipc = lr, iterations, r_bn, ncls, ipc
        self.inputs = x0.clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.inputs], lr=lr, betas=[0.5, 0.9], eps=1e-8)
        self.bary = targets["atoms"]
        self.weights = torch.full((ncls, ipc, 1, 1, 1), 1.0 / ipc, device=x0.device)
        self.bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.r_feature = [None] * len(self.bn)
        for i, (m, mu, var) in enumerate(zip(self.bn, targets["mean"], targets["var"])):
            m.register_forward_hook(self._bn_hook(i, mu, var))
        model.avgpool.register_forward_hook(self._feature_hook)
        self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self.best_cost, self.first_grad = 1e4, None

    def _bn_hook(self, i, mean_pc, var_pc):
        def hook(module, inputs, output):
            x = inputs[0].float()
            _, nch, h, w = x.shape
            inp = x.view(self.ncls, self.ipc, nch, h, w)
            wts = self.weights / self.weights.sum(dim=1, keepdim=True)
            mean = (inp * wts).sum(dim=1).mean(dim=[2, 3])
            centered = inp - mean.view(self.ncls, 1, nch, 1, 1)
            var = (wts * centered ** 2).sum(dim=1).mean(dim=[2, 3])
            self.r_feature[i] = (self.torch.norm(var_pc - var, dim=1).mean()
                                 + self.torch.norm(mean_pc - mean, dim=1).mean())
        return hook

    def _feature_hook(self, module, inputs, output):
        self.feature = output.float().view(output.shape[0], -1)

    def step(self, it, params):
        import torchvision.transforms.functional as TF
        torch = self.torch
        top, left, h, w, flip, dy, dx = params
        for group in self.optimizer.param_groups:
            group["lr"] = 0.5 * (1 + math.cos(math.pi * it / self.iterations)) * self.lr
        x = TF.resized_crop(self.inputs, top, left, h, w, [self.size, self.size])
        if flip:
            x = TF.hflip(x)
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        self.optimizer.zero_grad()
        if self.amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.model(x)
        loss_feature = torch.norm(self.feature - self.bary, 2)
        loss = loss_feature + self.r_bn * sum(self.r_feature)
        loss.backward()
        if it == 0:
            self.first_grad = self.inputs.grad.detach().clone()
        self.optimizer.step()
        with torch.no_grad():
            for c in range(3):
                m, s = self.mean[c], self.std[c]
                self.inputs[:, c] = torch.clamp(self.inputs[:, c], -m / s, (1 - m) / s)
        value = loss.item()
        if self.best_cost > value or it == 1:
            self.best_inputs = self.inputs.data.clone()
        return value


def draw_augmentation(g, size: int, scale=(0.08, 1.0), jitter: int = 32) -> tuple:
    """(top, left, h, w, flip, dy, dx): one RandomResizedCrop (ratio 3/4-4/3), a flip and a roll."""
    import torch
    u = torch.rand(32, generator=g).tolist()
    area = size * size
    for t in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[3 * t])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[3 * t + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= size and 0 < h <= size:
            top = int(u[3 * t + 2] * (size - h + 1))
            left = int(u[30] * (size - w + 1))
            break
    else:
        top, left, h, w = 0, 0, size, size
    shifts = torch.randint(-jitter, jitter + 1, (2,), generator=g).tolist()
    return top, left, h, w, u[31] < 0.5, shifts[0], shifts[1]


def released_port(device, size, ncls, ipc, iterations, amp) -> dict:
    """Run the released loop: ms per iteration (median after the first 3), peak memory, loss curve and
    the pixel gradient of the first step."""
    import gc

    import torch
    import torchvision

    gc.collect()  # the previous run's model and hooks (a reference cycle) must not count in this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=ncls)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    model.to(device).eval().requires_grad_(False)
    if amp:
        model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    n = ncls * ipc
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    targets = {"atoms": (torch.randn(n, 512, generator=g) * 0.5).abs().to(device),
               "mean": [(torch.randn(ncls, m.num_features, generator=g) * 0.3).to(device) for m in bns],
               "var": [(torch.rand(ncls, m.num_features, generator=g) + 0.5).to(device) for m in bns]}
    x0 = torch.randn(n, 3, size, size, generator=g).to(device)
    loop = ReleasedLoop(model, x0, targets, ncls, ipc, size, iterations, amp=amp)
    aug = torch.Generator().manual_seed(2)
    params = [draw_augmentation(aug, size, jitter=max(1, round(32 * size / 224))) for _ in range(iterations)]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        sync(device)
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for it in range(iterations):
        sync(device)
        t = time.perf_counter()
        losses.append(loop.step(it, params[it]))
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    timed = times[min(3, len(times) - 1):]
    return {"ms": 1e3 * statistics.median(timed), "first_ms": 1e3 * times[0], "peak_mib": peak / 2**20,
            "losses": losses, "grad": loop.first_grad.float().cpu()}


def write_tree(root: str, classes: int, train: int, val: int, size: int = 64) -> None:
    """A folder dataset (train/<class>/*.jpg, val/<class>/*.jpg) of class-coloured noise images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"c{c:03d}")
            os.makedirs(folder, exist_ok=True)
            colour = np.array([(c * 67) % 256, (c * 131 + 40) % 256, (c * 29 + 90) % 256])
            for i in range(count):
                img = colour * 0.6 + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"))


def utilisation(device, tflops: float, amp: str):
    """The achieved rate against the H100/H200 dense peak of the precision the convolutions ran in."""
    import torch
    if device.type != "cuda":
        return
    if amp == "bf16":
        kind = "bf16"
    else:
        kind = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return kind, tflops / PEAK_TFLOPS[kind]


def cmd_recover_imagenet(a) -> None:
    import torch

    device = device_of(a.device)
    if a.tiny:
        size, ncls, ipc, iters, short, train = 32, 2, 2, 4, 2, 3
    else:
        size, ncls, ipc, iters, short, train = 224, 10, 10, 50, 10, 12
    n = ncls * ipc
    result("shape", f"ResNet-18, batch {n} ({ncls} classes x IPC {ipc}) at {size} px, {iters} iterations")
    flops = recover_flops(n, size)
    result("gflop_per_iteration", flops / 1e9)
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    result("device", gpu_name)

    # 1. the released loop (ported), fp32 as released and with the teacher in bf16
    port = {}
    for amp in ("fp32", "bf16"):
        r = released_port(device, size, ncls, ipc, iters, amp == "bf16")
        port[amp] = r
        result(f"released_{amp}.ms_per_iteration", r["ms"])
        result(f"released_{amp}.first_iteration_ms", r["first_ms"])
        result(f"released_{amp}.peak_mib", r["peak_mib"])
        result(f"released_{amp}.tflops", flops / (r["ms"] * 1e-3) / 1e12)
        u = utilisation(device, flops / (r["ms"] * 1e-3) / 1e12, amp)
        if u:
            result(f"released_{amp}.fraction_of_{u[0]}_peak", u[1])
    step0, worst = rel_diff(port["bf16"]["losses"], port["fp32"]["losses"])
    result("released_bf16_vs_fp32.rel_loss_step0", step0)
    result(f"released_bf16_vs_fp32.rel_loss_max_{iters}", worst)
    g32, g16 = port["fp32"]["grad"], port["bf16"]["grad"]
    result("released_bf16_vs_fp32.rel_grad_step1", float((g16 - g32).norm() / g32.norm()))
    result("released_bf16_vs_fp32.cos_grad_step1", float(torch.nn.functional.cosine_similarity(
        g16.flatten(), g32.flatten(), dim=0)))
    port_ms = {amp: r["ms"] for amp, r in port.items()}
    del port

    # 2. ours: recover.py on a folder dataset at the same shape (a random teacher: squeeze --epochs 0)
    work = os.path.abspath(a.work)
    tree, base = os.path.join(work, "tree"), os.path.join(work, "base")
    write_tree(tree, ncls, train, 2)
    data = ["--dataset", "folder", "--data-dir", tree, "--resolution", size, "--device", a.device]
    rc, out, _ = run([sys.executable, stage("squeeze.py"), *data, "--epochs", 0, "--out", base], cwd=work)
    require(rc, out, "squeeze.py")
    rc, out, _ = run([sys.executable, stage("barycenter.py"), *data, "--ipc", ipc, "--out", base], cwd=work)
    require(rc, out, "barycenter.py")
    ours = {}
    for amp in ("fp32", "bf16"):
        for its in (iters, short):
            out_dir = os.path.join(work, f"ours_{amp}_{its}")
            rc, out, wall = run([sys.executable, stage("recover.py"), *data, "--ipc", ipc, "--batch-size", n,
                                 "--iterations", its, "--amp", amp, "--no-png",
                                 "--teacher", os.path.join(base, "teacher.pt"),
                                 "--bn-stats", os.path.join(base, "bn_stats.pt"),
                                 "--barycenters", os.path.join(base, "barycenters.pt"), "--out", out_dir], cwd=work)
            require(rc, out, f"recover.py --amp {amp} --iterations {its}")
            syn = load_artifact(os.path.join(out_dir, "synthetic.pt"))
            timing = find(syn, "timing")
            if not timing or "seconds" not in timing:
                print(f"{out_dir}/synthetic.pt has no timing record")
                sys.exit(1)
            ours[(amp, its)] = {"seconds": float(timing["seconds"]), "peak": float(timing.get("peak_memory_bytes", "nan")),
                                "curve": find(syn, "loss_curve"), "wall": wall}
    for amp in ("fp32", "bf16"):
        long_, short_ = ours[(amp, iters)], ours[(amp, short)]
        ms = 1e3 * (long_["seconds"] - short_["seconds"]) / (iters - short)
        result(f"ours_{amp}.ms_per_iteration", ms)
        result(f"ours_{amp}.ms_per_iteration_with_warmup", 1e3 * long_["seconds"] / iters)
        result(f"ours_{amp}.{'peak_mib' if device.type == 'cuda' else 'peak_rss_mib'}", long_["peak"] / 2**20)
        tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
        result(f"ours_{amp}.tflops", tflops)
        u = utilisation(device, tflops, amp)
        if u:
            result(f"ours_{amp}.fraction_of_{u[0]}_peak", u[1])
        result(f"ours_{amp}.vs_paper_v100", ms / PAPER_MS_PER_ITERATION)
        if ms <= 0:
            print(f"ours {amp}: {iters} iterations took no longer than {short}: the timing is noise")
    a32, a16 = ours[("fp32", iters)]["curve"], ours[("bf16", iters)]["curve"]
    worst0, worst = 0.0, 0.0
    for term in ("total", "feature", "bn"):
        if a32 is None or term not in a32:
            continue
        s0, sm = rel_diff(a16[term].flatten().tolist(), a32[term].flatten().tolist())
        worst0, worst = max(worst0, s0), max(worst, sm)
    result("ours_bf16_vs_fp32.rel_loss_step0", worst0)
    result(f"ours_bf16_vs_fp32.rel_loss_max_{iters}", worst)
    # ours against the released loop: the same shape and work, different random teachers (the loss values
    # differ; bench_recover.py compares the two on identical inputs at its smaller shapes)
    for amp in ("fp32", "bf16"):
        ms = 1e3 * (ours[(amp, iters)]["seconds"] - ours[(amp, short)]["seconds"]) / (iters - short)
        result(f"speedup.ours_{amp}_vs_released_fp32", port_ms["fp32"] / ms if ms > 0 else float("nan"))


# ---------------------------------------------------------------------------------------------
# barycenter: the batched Sinkhorn kernel at the ImageNet shape


def feature_batch(classes: int, n: int, d: int, seed: int, device):
    """[classes, n, d] non-negative clouds, a few modes per class (post-ReLU-like features)."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    modes = 5
    centres = torch.rand(classes, modes, d, generator=g, device=device) * 2
    z = torch.randint(0, modes, (classes, n), generator=g, device=device)
    x = torch.gather(centres, 1, z.unsqueeze(-1).expand(classes, n, d))
    return (x + 0.5 * torch.randn(classes, n, d, generator=g, device=device)).clamp_min_(0)


def sinkhorn_barycenter(y, k: int, outer: int, reg: float, impl: str, inner: int = 500, tol: float = 1e-6) -> tuple:
    """Free-support barycenters with uniform weights of B clouds y [B, n, d] at once (the alternation
    of wmdd/ot.py's sinkhorn solver without its epsilon scaling): entropic plans from
    ops.sinkhorn_log_batched, barycentric location updates. Returns (atoms [B, k, d], transport cost
    of the last plan [B], mean Sinkhorn iterations per solve)."""
    import torch
    from wmdd import ops

    bsz, n, _ = y.shape
    x = y[:, :: max(1, n // k)][:, :k].clone()  # k spread-out points of each cloud
    a = torch.full((bsz, k), 1.0 / k, device=y.device, dtype=y.dtype)
    b = torch.full((bsz, n), 1.0 / n, device=y.device, dtype=y.dtype)
    scale, f, iters = None, None, []
    for _ in range(outer):
        cost = torch.cdist(x, y).square_()
        if scale is None:
            scale = cost.mean((1, 2), keepdim=True)  # fixed per class, so warm starts stay in the same units
        cost_n = cost / scale
        f, g, info = ops.sinkhorn_log_batched(cost_n, a, b, reg, max_iter=inner, tol=tol, f_init=f, impl=impl,
                                              return_info=True)
        iters.append(float(info["n_iter"].float().mean()))
        plan = ops.sinkhorn_plan(cost_n, f, g, reg)
        x = (plan @ y) / plan.sum(2, keepdim=True).clamp_min(1e-30)
    return x, (plan * cost).sum((1, 2)), sum(iters) / len(iters)


def cmd_barycenter(a) -> None:
    import torch
    sys.path.insert(0, REPO)
    from wmdd import ops

    device = device_of(a.device)
    cuda = device.type == "cuda"
    classes, n, d, k = (a.classes, a.n, a.d, a.k) if a.classes else ((1000, 1300, 512, 50) if cuda else (10, 50, 16, 5))
    result("kernels", ops.describe())
    fast = ops.ext_available() and (not cuda or ops.ext_has_cuda())
    impl = "ext" if fast else "ref"
    if not fast:
        print(f"no compiled kernel for {device.type} tensors: the reference (POT) solves 4 classes only")
        classes = min(classes, 4)
    result("shape", f"{classes} classes x {n} points x {d} dims, k = {k}, {a.outer} outer iterations, reg {a.reg}")
    result("impl", impl)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total, cost_sum, inner, t_gen = 0.0, 0.0, [], 0.0
    for s in range(0, classes, a.class_batch):
        t = time.perf_counter()
        y = feature_batch(min(a.class_batch, classes - s), n, d, seed=s, device=device)
        sync(device)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        x, cost, it = sinkhorn_barycenter(y, k, a.outer, a.reg, impl)
        sync(device)
        total += time.perf_counter() - t
        cost_sum += float(cost.sum())
        inner.append(it)
        if not torch.isfinite(x).all():
            print(f"non-finite atoms in classes {s}:{s + len(y)}")
            sys.exit(1)
    result("seconds", total)
    result("ms_per_class", 1e3 * total / classes)
    result("mean_transport_cost", cost_sum / classes)
    result("sinkhorn_iterations_per_solve", sum(inner) / len(inner))
    result("feature_generation_seconds", t_gen)
    if cuda:
        result("peak_mib", torch.cuda.max_memory_allocated() / 2**20)
    if fast:  # the kernel against the reference (POT, same device) on a few classes
        try:
            import ot  # noqa: F401
        except ImportError:
            print("POT is not installed: no comparison with the reference")
            result("ext_vs_ref", "skipped: no POT")
            return
        y = feature_batch(min(4, classes), n, d, seed=0, device=device)
        t = time.perf_counter()
        x_ref, c_ref, _ = sinkhorn_barycenter(y, k, a.outer, a.reg, "ref")
        sync(device)
        result("ref_seconds_4_classes", time.perf_counter() - t)
        x_ext, c_ext, _ = sinkhorn_barycenter(y, k, a.outer, a.reg, "ext")
        result("ext_vs_ref.max_atom_diff_rel", float((x_ext - x_ref).abs().max() / x_ref.abs().max()))
        result("ext_vs_ref.max_cost_diff_rel", float(((c_ext - c_ref).abs() / c_ref.abs()).max()))


# ---------------------------------------------------------------------------------------------
# torchrun: 2 ranks against 1 process


def compare_synthetic(p1: str, p2: str) -> tuple:
    """(all tensors equal, largest absolute difference) of two synthetic.pt files (meta ignored)."""
    import torch
    one, two = load_artifact(p1), load_artifact(p2)
    equal, worst = True, 0.0

    def walk(x, y, where):
        nonlocal equal, worst
        if isinstance(x, dict):
            for key in x:
                if key != "meta":
                    walk(x[key], y.get(key) if isinstance(y, dict) else None, f"{where}.{key}")
        elif isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape:
                equal, worst = False, float("inf")
                print(f"{where}: shapes differ")
                return
            if not torch.equal(x, y):
                equal = False
                diff = float((x.double() - y.double()).abs().max())
                worst = max(worst, diff)
                print(f"{where}: max abs diff {diff:.3g}")

    walk(one, two, "synthetic")
    return equal, worst


def cmd_torchrun(a) -> None:
    device = device_of(a.device)
    cuda = device.type == "cuda"
    work = os.path.abspath(a.work)
    base = os.path.join(work, "base")
    os.makedirs(work, exist_ok=True)
    data = ["--dataset", "digits", "--device", a.device]
    one_thread = {"OMP_NUM_THREADS": "1"}
    rc, out, _ = run([sys.executable, stage("squeeze.py"), *data, "--epochs", 0, "--out", base], cwd=work)
    require(rc, out, "squeeze.py")
    # --feature none: no barycenters.pt needed (recover_imagenet runs barycenter.py on the GPU)
    rec = [*data, "--ipc", 2, "--batch-size", 2, "--iterations", 8, "--no-png", "--feature", "none",
           "--teacher", os.path.join(base, "teacher.pt"), "--bn-stats", os.path.join(base, "bn_stats.pt")]
    one = os.path.join(work, "one")
    rc, out, wall = run([sys.executable, stage("recover.py"), *rec, "--out", one], env=one_thread, cwd=work)
    require(rc, out, "recover.py (1 process)")
    result("one_process_seconds", wall)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2]
    shim = [os.path.join(HERE, "gpu_check.py"), "rank-shim"]
    two, backend = None, None
    if cuda:
        # as a user would run it: rank 1 asks for cuda:1 (LOCAL_RANK), which one GPU does not have
        plain = os.path.join(work, "plain")
        rc, out, _ = run(launch + [stage("recover.py"), *rec, "--out", plain], env=one_thread, cwd=work,
                         timeout=a.timeout)
        result("plain_torchrun.rc", rc)
        if rc:
            result("plain_torchrun.error", last_error(out))
        # both ranks on cuda:0 (LOCAL_RANK=0 for each), NCCL, then gloo on CUDA tensors if NCCL refuses
        for be in ("nccl", "gloo"):
            rc, out, _ = run(launch + shim + ["--backend", be, "--probe"], cwd=work, timeout=min(a.timeout, 60))
            ok = rc == 0 and out.count("PROBE ok") == 2
            result(f"{be}_probe_cuda_all_reduce", "ok" if ok else f"failed rc={rc}: {last_error(out)}")
        for be in ("nccl", "gloo"):
            out_dir = os.path.join(work, f"two_{be}")
            rc, out, wall = run(launch + shim + ["--share-device", "--backend", be, "--", stage("recover.py"), *rec,
                                                 "--out", out_dir], env=one_thread, cwd=work, timeout=a.timeout)
            result(f"two_ranks_{be}.rc", rc)
            if rc == 0:
                two, backend = out_dir, be
                result("two_ranks_seconds", wall)
                break
            result(f"two_ranks_{be}.error", last_error(out))
    else:
        result("nccl_probe", "skipped: no CUDA")
        out_dir = os.path.join(work, "two_gloo")
        rc, out, wall = run(launch + shim + ["--", stage("recover.py"), *rec, "--out", out_dir], env=one_thread,
                            cwd=work, timeout=a.timeout)
        result("two_ranks_gloo.rc", rc)
        if rc == 0:
            two, backend = out_dir, "gloo"
            result("two_ranks_seconds", wall)
        else:
            result("two_ranks_gloo.error", last_error(out))
    if two is None:
        print("no 2-rank recover finished")
        sys.exit(1)
    result("backend", backend)
    syn = load_artifact(os.path.join(two, "synthetic.pt"))
    result("world_size", find(syn.get("meta", {}), "world_size"))
    equal, worst = compare_synthetic(os.path.join(one, "synthetic.pt"), os.path.join(two, "synthetic.pt"))
    result("equal_to_one_process", equal)
    result("max_abs_diff", worst)


def cmd_rank_shim(a) -> None:
    """Run under torchrun: a stage script as this rank would, with every rank on device 0
    (--share-device: LOCAL_RANK=0) and the process group's backend replaced (--backend); or, with
    --probe, one all_reduce of a CUDA tensor on device 0 over the group."""
    import torch
    import torch.distributed as torch_dist

    rank = os.environ.get("RANK", "?")
    if a.share_device:
        os.environ["LOCAL_RANK"] = "0"
    if a.backend:
        original = torch_dist.init_process_group

        def init_process_group(backend=None, *args, **kwargs):
            print(f"[rank-shim] rank {rank}: process group backend {backend!r} -> {a.backend!r}", flush=True)
            return original(a.backend, *args, **kwargs)
        torch_dist.init_process_group = init_process_group
    if a.probe:
        torch.cuda.set_device(0)
        torch_dist.init_process_group(a.backend or "nccl")
        t = torch.full((4,), float(int(rank) + 1), device="cuda:0")
        torch_dist.all_reduce(t)
        torch.cuda.synchronize()
        world = torch_dist.get_world_size()
        expected = world * (world + 1) / 2
        print(f"PROBE {'ok' if bool((t == expected).all()) else 'wrong sum'} rank {rank}: {t.tolist()}", flush=True)
        torch_dist.destroy_process_group()
        return
    if not a.script:
        sys.exit("rank-shim: name the script to run after --")
    script = os.path.abspath(a.script[0])
    sys.argv = [script, *a.script[1:]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, the GPU, the kernels")
    s = sub.add_parser("wheels", help="install POT from wheel folders when it is missing")
    s.add_argument("dirs", nargs="*")
    s = sub.add_parser("build", help="build wmdd._C for the GPU present (in place)")
    s.add_argument("--jobs", type=int, default=16)
    sub.add_parser("pytest", help="pytest -m gpu, then the kernel tests")
    s = sub.add_parser("recover-bench", help="bench/bench_recover.py: released loop vs ours")
    s.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    s.add_argument("--steps", type=int, default=None, help="timed steps (default: 49 on CUDA, 2 on CPU)")
    s.add_argument("--cases", default=None)
    s = sub.add_parser("flops", help="FLOPs of one recover iteration at the ImageNet shape (meta device)")
    s.add_argument("--batch", type=int, default=100)
    s.add_argument("--size", type=int, default=224)
    s = sub.add_parser("recover-imagenet", help="recover at ResNet-18, 224 px, batch 100: released port vs recover.py")
    s.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    s.add_argument("--work", required=True)
    s.add_argument("--tiny", action="store_true", help="32 px, 4 images, 4 iterations (a CPU check of the plumbing)")
    s = sub.add_parser("barycenter", help="batched Sinkhorn barycenters (default 1000 x 1300 x 512, k 50 on CUDA)")
    s.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    s.add_argument("--classes", type=int, default=None)
    s.add_argument("--n", type=int, default=1300)
    s.add_argument("--d", type=int, default=512)
    s.add_argument("--k", type=int, default=50)
    s.add_argument("--outer", type=int, default=10)
    s.add_argument("--reg", type=float, default=0.05)
    s.add_argument("--class-batch", type=int, default=100)
    s = sub.add_parser("torchrun", help="recover on digits: 2 ranks (torchrun) vs 1 process")
    s.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    s.add_argument("--work", required=True)
    s.add_argument("--timeout", type=float, default=100, help="seconds per torchrun launch")
    s = sub.add_parser("rank-shim", help="(under torchrun) run a stage script, every rank on cuda:0")
    s.add_argument("--share-device", action="store_true")
    s.add_argument("--backend", default=None, choices=["nccl", "gloo"])
    s.add_argument("--probe", action="store_true")
    s.add_argument("script", nargs=argparse.REMAINDER)
    s = sub.add_parser("fail", help="exit with a code (bench/gpu_check.sh --fail-step)")
    s.add_argument("--code", type=int, default=3)
    a = p.parse_args(argv)
    if getattr(a, "script", None) and a.script[0] == "--":
        a.script = a.script[1:]
    signal.signal(signal.SIGTERM, _stop_children)
    if a.cmd == "fail":
        print(f"failing on purpose (exit code {a.code})")
        sys.exit(a.code)
    {"env": cmd_env, "wheels": cmd_wheels, "build": cmd_build, "pytest": cmd_pytest,
     "recover-bench": cmd_recover_bench, "flops": cmd_flops, "recover-imagenet": cmd_recover_imagenet,
     "barycenter": cmd_barycenter, "torchrun": cmd_torchrun, "rank-shim": cmd_rank_shim}[a.cmd](a)


if __name__ == "__main__":
    main()
