// wmdd._C: the operator schemas (namespace wmdd) and the Python module. Importing wmdd._C registers
// torch.ops.wmdd.*; the CPU kernels are in cpu_ops.cpp, the CUDA kernels in cuda_ops.cu.
//
// pybind11 + torch/library.h rather than torch/extension.h: the same module, compiled in about 40%
// of the time (torch/extension.h pulls in the whole C++ frontend).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "wmdd.h"

TORCH_LIBRARY(wmdd, m) {
  // Per-class, per-channel sum and sum of squares over samples and spatial positions (float64), and
  // the number of values summed per channel for each class.
  m.def("class_moments(Tensor x, Tensor y, int num_classes) -> (Tensor sum, Tensor sumsq, Tensor count)");
  // Batched log-domain Sinkhorn; dual potentials in cost units (see wmdd/ops.py).
  m.def(
      "sinkhorn_log(Tensor cost, Tensor a, Tensor b, float reg, int max_iter, float tol, Tensor? f_init=None, "
      "Tensor? g_init=None) -> (Tensor f, Tensor g)");
  // The same, plus the iterations run and the final b-marginal violation of each problem. check_every:
  // the stopping test runs after iterations 1, 1 + check_every, 1 + 2 check_every, ... (10: POT's).
  m.def(
      "sinkhorn_log_ex(Tensor cost, Tensor a, Tensor b, float reg, int max_iter, float tol, Tensor? f_init=None, "
      "Tensor? g_init=None, int check_every=10) -> (Tensor f, Tensor g, Tensor n_iter, Tensor err)");
}

namespace {
// The torch version this was compiled against, spelled as character codes by setup.py (robust to any
// characters in a version string); wmdd/ops.py refuses the module when the running torch differs.
#ifdef WMDD_TORCH_VERSION_CHARS
const char kTorchVersion[] = {WMDD_TORCH_VERSION_CHARS, 0};
#else
const char kTorchVersion[] = "unknown";
#endif
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "wmdd compiled kernels; the operators are torch.ops.wmdd.*";
  m.def("with_cuda", []() {
#ifdef WMDD_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether this build has the CUDA kernels");
  m.def("torch_version", []() { return std::string(kTorchVersion); }, "torch version compiled against");
  m.def("cpu_isa", []() { return std::string(wmdd::cpu_isa()); }, "instruction set of the CPU kernels in use");
  m.def("set_cpu_isa", [](const std::string& name) { return wmdd::set_cpu_isa(name); },
        "use the CPU kernels compiled for this instruction set (avx512, avx2, default); False if unavailable");
  m.def("set_moments_parallel_min", [](int64_t values) { return wmdd::set_moments_parallel_min(values); },
        "class_moments uses threads from this many values on (default 2**24); returns the previous value");
}
