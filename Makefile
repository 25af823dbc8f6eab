# The commands the README names. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.wmdd-installed
# Anything that changes what `pip install -e .` builds re-runs the install.
INSTALL_DEPS := pyproject.toml setup.py $(wildcard csrc/*)

.PHONY: install test test-ref test-readme test-all demo bench fmnist clean cuda-check

install: $(STAMP)

# 1) the build requirements (torch first: setup.py compiles the kernels against the installed torch),
# 2) the package itself without build isolation, so the kernels match this torch's ABI, with the test
#    extra and timm (the `vit` extra: the released ViT-Tiny, so the suite tests it; the stages run without it).
$(STAMP): $(INSTALL_DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch>=2.4" "torchvision>=0.19" setuptools wheel ninja pybind11
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e ".[test,vit]"
	$(PY) -c "import torch, torchvision, ot; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| POT', ot.__version__)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# The same suite with the compiled kernels switched off (WMDD_NO_EXT=1): the POT / plain-torch fallback
# every stage takes where the extension is not built. Kernel-vs-reference tests skip, the rest must pass.
# Only squeeze, barycenter and recover call a kernel (wmdd/ops.py): the test files of relabel, evaluate,
# its metrics, Fig. 4's embedding model and the paper harness run the same code either way and are not
# repeated (their fixtures' squeeze and recover runs are what test_squeeze / test_recover / test_pipeline
# cover here).
NO_KERNEL_TESTS := test_relabel test_labels_dist test_evaluate test_metrics test_embedding test_paper test_copy test_gpu_check test_docs test_structure
test-ref: install
	WMDD_NO_EXT=1 $(PY) -m pytest -q $(foreach t,$(NO_KERNEL_TESTS),--ignore=tests/$(t).py)

# The README's digits command block, run as written (the whole default digits pipeline, ~3 min on 2 cores).
test-readme: install
	$(PY) -m pytest -q -m slow tests/test_readme.py

test-all: install
	$(PY) -m pytest -q -m ""

# The paper's reproduction tool on scikit-learn's digits (no download) with its quick preset: Table I at
# IPC 10 (WMDD beside a random real subset, soft and hard labels), Fig. 4 and Fig. 6 (WMDD beside SRe2L),
# ending in runs/demo/PAPER.md. The same code path as `python -m lab.paper` for the paper's datasets;
# --in-process runs each stage's main() on the printed flags in one interpreter (the same numbers as the
# subprocesses, without ~4 s of start-up per stage; 1m41s-1m45s on an idle 2-core AVX-512 machine;
# docs/paper.md, "Measured").
DEMO     ?= runs/demo
DEMO_IPC ?= 10
demo: install
	$(PY) -m lab.paper --dataset digits --out $(DEMO) --preset quick --ipc $(DEMO_IPC) --in-process

# Fashion-MNIST's table (docs/fashion_mnist.md; bench/RESULTS.md, "Fashion-MNIST: the table"): the protocol
# check, then every row at IPC 1, 10 and 50, hard labels under DC's recipe and soft labels under the KD
# recipe; a new distilled set per seed. Resumable: a rerun reuses every finished stage and student. Hours
# on 2 CPU cores (the teacher alone ~30 min); FMNIST_WORK keeps the runs.
FMNIST_WORK ?= runs/fmnist_bench
FMNIST_ROWS := --rows random,herding,kcenter,coreset,sre2l,wmdd,best --baselines random,herding,kcenter,coreset
fmnist: install
	$(PY) bench/bench_fmnist.py --ipc 1 10 --students 5 --work runs/fmnist_check
	$(PY) bench/bench_fmnist.py --ipc 50 --students 3 --work runs/fmnist_check
	for ipc in 1 10 50; do \
	  $(PY) bench/bench_vs_random.py --dataset fashion_mnist --ipc $$ipc --seeds 3 --redistill --iterations 200 \
	    --epochs 300 $(FMNIST_ROWS) --work $(FMNIST_WORK) --tag dc --eval-args "--recipe dc --labels hard" \
	    --report $(FMNIST_WORK)/hard_ipc$$ipc.md || exit 1; \
	  $(PY) bench/bench_vs_random.py --dataset fashion_mnist --ipc $$ipc --seeds 3 --redistill --iterations 200 \
	    --epochs 300 $(FMNIST_ROWS) --work $(FMNIST_WORK) --eval-args=--soft-only \
	    --report $(FMNIST_WORK)/soft_ipc$$ipc.md || exit 1; \
	done

# The speed benchmarks; the study drivers (bench_vs_random.py, bench_fmnist.py) take their settings on the
# command line and run for hours: `make fmnist`, docs/studies.md.
bench: install
	for f in bench/bench_*.py; do case $$f in *vs_random*|*fmnist*) continue;; esac; \
	  echo "== $$f"; $(PY) $$f || exit 1; done

# Compile the CUDA kernels (FORCE_CUDA=1, one architecture) into a throw-away directory: catches CUDA
# build errors on machines without a GPU; the CPU build in the venv is untouched. Needs nvcc.
CUDA_CHECK_DIR ?= build/cuda-check
cuda-check: install
	rm -rf $(CUDA_CHECK_DIR)
	FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="$${MAX_JOBS:-2}" \
		$(PY) setup.py -q build_ext --build-temp $(CUDA_CHECK_DIR)/tmp --build-lib $(CUDA_CHECK_DIR)/lib
	test -n "$$(ls $(CUDA_CHECK_DIR)/lib/wmdd/_C*.so)" && rm -rf $(CUDA_CHECK_DIR) && echo "cuda-check: CUDA kernels compile"

clean:
	rm -rf build *.egg-info wmdd/*.so
