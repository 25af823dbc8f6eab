"""Builds the optional compiled kernels (csrc/) into `wmdd._C`; without them the stages fall back to
POT / plain torch (wmdd/ops.py), so every way of installing gives a working package.

    make install                                # = pip install -e ".[test,vit]" --no-build-isolation
    pip install -e . --no-build-isolation       # kernels compiled against the torch installed here
    WMDD_NO_EXT=1 pip install -e .              # pure Python, nothing compiled
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install -e . --no-build-isolation
                                                # also the CUDA kernels, without a visible GPU

- CPU kernels: always, when torch imports.
- CUDA kernels: when torch has CUDA, a CUDA toolkit is found ($CUDA_HOME, else from `nvcc` on PATH),
  and a GPU is visible or FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST defaults to 9.0 without a visible GPU.
  WMDD_NO_CUDA=1 leaves them out.
- Build isolation (plain `pip install -e .`) builds against a torch downloaded into a throw-away
  environment, whose binary interface may differ from the torch that will run the code. When the torch
  seen here is not the target environment's, nothing is compiled and the command that builds the
  kernels is printed. A stale or mismatched `_C` is refused at import time anyway (wmdd/ops.py).
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

BUILD_COMMAND = "pip install -e . --no-build-isolation"
SOURCES = ["csrc/module.cpp", "csrc/cpu_ops.cpp", "csrc/cpu_isa_default.cpp", "csrc/cpu_isa_avx2.cpp",
           "csrc/cpu_isa_avx512.cpp"]
CUDA_SOURCES = ["csrc/cuda_ops.cu"]
DEFAULT_CUDA_ARCH = "9.0"  # H100/H200; override with TORCH_CUDA_ARCH_LIST


def say(message):
    print(f"[wmdd setup] {message}", file=sys.stderr, flush=True)


def skip_message(reason):
    return (f"{reason}\n  -> no compiled kernels: the package works, with the reference implementations "
            f"(POT / plain torch).\n  To build the kernels: install torch in the environment that runs wmdd, "
            f"then `{BUILD_COMMAND}` (or `make install`).")


def find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the toolkit of `nvcc` on PATH (following a
    wrapper script that execs the real nvcc), else /usr/local/cuda. None when there is none."""
    def has_runtime(root):
        return root and any(os.path.exists(os.path.join(root, d, "libcudart.so"))
                            for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                                      os.path.join("targets", "sbsa-linux", "lib")))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if has_runtime(root):
            return root
        try:  # a small script in front of the real compiler, e.g. `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(real, "rb") as fh:
                head = fh.read(8192)
            if not head.startswith(b"\x7fELF"):
                for m in re.finditer(rb"(/[^\s\"']+)/bin/nvcc", head):
                    cand = m.group(1).decode()
                    if has_runtime(cand):
                        return cand
        except OSError:
            pass
    return "/usr/local/cuda" if has_runtime("/usr/local/cuda") else None


def isolation_problem(torch):
    """Why the torch seen by this build is not the one that will import the result, or None."""
    here = os.path.realpath(torch.__file__)
    if "pip-build-env" in here or os.sep + "build-env" in here or os.sep + "builds-v" in here:
        return f"isolated build environment (torch {torch.__version__} at {os.path.dirname(here)})"
    env = dict(os.environ)
    env.pop("PYTHONNOUSERSITE", None)
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and "pip-build-env" not in p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    probe = "import os, torch; print(torch.__version__); print(os.path.realpath(torch.__file__))"
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not check the target environment's torch ({e})"
    if out.returncode != 0:
        return f"torch {torch.__version__} is importable here but not in the target environment ({sys.executable})"
    version, where = out.stdout.strip().splitlines()[-2:]
    if where != here:
        return (f"building against torch {torch.__version__} ({os.path.dirname(here)}), but the target "
                f"environment has torch {version} ({os.path.dirname(where)})")
    return None


def cuda_plan(torch):
    """(True, note) when the CUDA sources are to be compiled, else (False, why not)."""
    if os.environ.get("WMDD_NO_CUDA") == "1":
        return False, "WMDD_NO_CUDA=1"
    force = os.environ.get("FORCE_CUDA") == "1"
    if torch.version.cuda is None:
        if force:
            sys.exit(f"[wmdd setup] FORCE_CUDA=1 but torch {torch.__version__} has no CUDA.")
        return False, f"torch {torch.__version__} has no CUDA"
    home = find_cuda_home()
    if home is not None:
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
    if home is None:
        if force:
            sys.exit("[wmdd setup] FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH.")
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    gpu = torch.cuda.is_available()
    if not (gpu or force):
        return False, "no GPU visible (FORCE_CUDA=1 compiles the CUDA kernels anyway)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not gpu:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
    return True, f"CUDA toolkit {home}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPUs')}"


def extension_setup():
    """setup() keyword arguments for the compiled part, or {} (pure Python) with the reason printed."""
    if os.environ.get("WMDD_NO_EXT") == "1":
        say("WMDD_NO_EXT=1: pure-Python install, no compiled kernels.")
        return {}
    try:
        import torch
    except ImportError as e:
        say(skip_message(f"torch is not importable in this build environment ({e})."))
        return {}

    with_cuda, cuda_note = cuda_plan(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    version_chars = ",".join(str(ord(ch)) for ch in torch.__version__)
    cxx = ["-O3", "-g0", f"-DWMDD_TORCH_VERSION_CHARS={version_chars}"]  # -g0: no debug info, faster build
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp-simd")  # the kernels' `#pragma omp simd` loops
        if torch.backends.openmp.is_available():
            # at::parallel_for is inline: without -fopenmp it would run on one thread. The runtime is
            # the libgomp torch has already loaded (same soname).
            cxx.append("-fopenmp")
            link.append("-fopenmp")
    sources = list(SOURCES)
    kwargs = dict(name="wmdd._C", extra_link_args=link)
    if with_cuda:
        cxx.append("-DWMDD_WITH_CUDA")
        sources += CUDA_SOURCES
        ext = CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, **kwargs)
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class BuildExt(BuildExtension):
        def run(self):
            problem = isolation_problem(torch)
            if problem:
                say(skip_message(f"{problem}: a binary built here could mismatch the torch that imports it."))
                self.extensions = []
                return
            say(f"building wmdd._C against torch {torch.__version__}: CPU kernels"
                + (f" + CUDA kernels ({cuda_note})" if with_cuda else f"; CUDA kernels skipped: {cuda_note}"))
            super().run()

    return dict(ext_modules=[ext], cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)})


setup(**extension_setup())
