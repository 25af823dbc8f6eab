// Plain C++ CPU kernels: raw pointers, no torch headers.
//
// Each kernel is compiled three times (cpu_isa_default.cpp, cpu_isa_avx2.cpp, cpu_isa_avx512.cpp) with
// different instruction sets; cpu_ops.cpp picks the table that the running CPU supports and does the
// threading (at::parallel_for). The loops are written to be vectorised by the compiler
// (`#pragma omp simd` + -fopenmp-simd); nothing here allocates or throws.
#pragma once

#include <cstdint>

namespace wmdd_cpu {

template <typename T>
struct Kernels {
  // class_moments, layout [N, C, S] (rows of S contiguous values): channels [c0, c1) of samples [n0, n1).
  // sum/sumsq are [K, C] float64 and accumulated into (+=). y must be in [0, K).
  void (*moments_ncs)(const T* x, const int64_t* y, int64_t n0, int64_t n1, int64_t c, int64_t s, int64_t c0,
                      int64_t c1, double* sum, double* sumsq);
  // class_moments, layout [N, S, C] (channels contiguous: channels_last, or [N, C] with S = 1):
  // channels [c0, c1) of samples [n0, n1). acc, acc_sq: scratch of C doubles (only [c0, c1) is used).
  void (*moments_nsc)(const T* x, const int64_t* y, int64_t n0, int64_t n1, int64_t s, int64_t c, int64_t c0,
                      int64_t c1, double* sum, double* sumsq, double* acc, double* acc_sq);

  // Sinkhorn, one problem, scaled potentials u = f / reg [k], v = g / reg [N], cost [k, N] row-major.
  // Row pass over rows [i0, i1): u_i = log a_i - logsumexp_j(v_j - cost_ij / reg); u holds the previous
  // values on entry (their log-sum-exps, log a_i - u_i, are the shifts). Writes rows [i0, i1) of
  // f_rows [k, N] (the shifted exps) and alpha [k], which the next column pass reuses.
  void (*sinkhorn_rows)(const T* cost, const T* v, const T* loga, int64_t k, int64_t n, int64_t i0, int64_t i1,
                        T inv_reg, T* u, T* f_rows, T* alpha);
  // Column pass over columns [j0, j1): lse[j] = logsumexp_i(u_i - cost_ij / reg) (columns with b_j > 0);
  // with have_f from f_rows / alpha of the last row pass. scratch: N values. When check, returns
  // sum_j (exp(v_j + lse_j) - b_j)^2 over columns with b_j > 0 (the squared b-marginal violation of the
  // current (u, v)), else 0.
  double (*sinkhorn_cols)(const T* cost, const T* u, const T* v, const T* b, const T* f_rows, const T* alpha,
                          int64_t k, int64_t n, int64_t j0, int64_t j1, T inv_reg, T* lse, T* scratch, bool check,
                          bool have_f);
};

struct KernelTable {
  const char* isa;
  Kernels<float> f32;
  Kernels<double> f64;
};

// One per compiled instruction set; avx2/avx512 are null where the compiler cannot target them.
const KernelTable* table_default();
const KernelTable* table_avx2();
const KernelTable* table_avx512();

}  // namespace wmdd_cpu
