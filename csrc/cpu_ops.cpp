// CPU implementations of wmdd::class_moments and wmdd::sinkhorn_log(_ex): argument checks, layouts,
// threading (at::parallel_for) and the choice of instruction set. The arithmetic is in
// cpu_kernels_impl.h. The specification is the reference in wmdd/ops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "wmdd.h"

namespace wmdd {
namespace {

using wmdd_cpu::KernelTable;

bool cpu_has(const char* feature_set) {
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (std::string(feature_set) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(feature_set) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(feature_set) == "default";
}

const KernelTable* table_for(const std::string& name) {
  const KernelTable* t = nullptr;
  if (name == "avx512") t = wmdd_cpu::table_avx512();
  if (name == "avx2") t = wmdd_cpu::table_avx2();
  if (name == "default") t = wmdd_cpu::table_default();
  return (t != nullptr && cpu_has(name.c_str())) ? t : nullptr;
}

const KernelTable* best_table() {
  if (const char* forced = std::getenv("WMDD_CPU_ISA")) {
    if (const KernelTable* t = table_for(forced)) return t;
  }
  for (const char* name : {"avx512", "avx2"}) {
    if (const KernelTable* t = table_for(name)) return t;
  }
  return wmdd_cpu::table_default();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load();
  if (t == nullptr) {
    t = best_table();
    g_table.store(t);
  }
  return *t;
}

template <typename T>
const wmdd_cpu::Kernels<T>& kernels();
template <>
const wmdd_cpu::Kernels<float>& kernels<float>() { return table().f32; }
template <>
const wmdd_cpu::Kernels<double>& kernels<double>() { return table().f64; }

// ---------------------------------------------------------------------------------------------
// class_moments

std::atomic<int64_t> g_moments_parallel_min{int64_t{1} << 24};

template <typename T>
void moments_cpu(const at::Tensor& x, bool channels_inner, int64_t n, int64_t c, int64_t s, const int64_t* y,
                 int64_t num_classes, double* sum, double* sumsq) {
  const T* xp = x.data_ptr<T>();
  const auto& kern = kernels<T>();
  const int64_t threads = at::get_num_threads();
  const int64_t total = n * c * s;
  const int64_t kc = num_classes * c;
  // The sums are memory-bound and one core streams ~25 GB/s through them, so below g_moments_parallel_min
  // values (default 2^24: 64 MB of float32, ~3 ms) the calling thread does it alone. Threads would
  // save little there, and a parallel region costs microseconds on an idle machine but milliseconds on
  // a busy one (it waits until every thread is scheduled); these calls come from hooks on every
  // BatchNorm input of a forward pass.
  const bool serial = threads <= 1 || total < g_moments_parallel_min.load() || at::in_parallel_region();
  // Channels split across threads (no two threads write the same output) unless there are too few
  // channels to share; then samples are split and every thread keeps partial sums.
  const bool by_channel = c >= (channels_inner ? 16 : 2) * threads;
  std::vector<double> acc;
  if (channels_inner && s > 1) acc.assign(2 * c, 0.0);
  auto run = [&](int64_t n0, int64_t n1, int64_t c0, int64_t c1, double* os, double* oq, double* as, double* aq) {
    if (channels_inner)
      kern.moments_nsc(xp, y, n0, n1, s, c, c0, c1, os, oq, as, aq);
    else
      kern.moments_ncs(xp, y, n0, n1, c, s, c0, c1, os, oq);
  };
  double* acc_s = acc.empty() ? nullptr : acc.data();
  double* acc_q = acc.empty() ? nullptr : acc.data() + c;
  if (serial) {
    run(0, n, 0, c, sum, sumsq, acc_s, acc_q);
  } else if (by_channel) {
    at::parallel_for(0, c, 1, [&](int64_t c0, int64_t c1) { run(0, n, c0, c1, sum, sumsq, acc_s, acc_q); });
  } else {
    const int64_t chunks = std::min(threads, n);
    std::vector<double> partial(static_cast<size_t>(chunks * 2 * kc), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        std::vector<double> scratch(channels_inner && s > 1 ? 2 * c : 0);
        double* ps = partial.data() + p * 2 * kc;
        const int64_t n0 = n * p / chunks, n1 = n * (p + 1) / chunks;
        run(n0, n1, 0, c, ps, ps + kc, scratch.empty() ? nullptr : scratch.data(),
            scratch.empty() ? nullptr : scratch.data() + c);
      }
    });
    for (int64_t p = 0; p < chunks; ++p) {
      const double* ps = partial.data() + p * 2 * kc;
      for (int64_t i = 0; i < kc; ++i) {
        sum[i] += ps[i];
        sumsq[i] += ps[kc + i];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                                               int64_t num_classes) {
  TORCH_CHECK(x_in.dim() >= 2, "wmdd::class_moments: x must be [N, C, *], got ", x_in.dim(), " dims");
  TORCH_CHECK(y_in.dim() == 1 && y_in.size(0) == x_in.size(0),
              "wmdd::class_moments: y must be [N] with N = x.size(0) = ", x_in.size(0), ", got ", y_in.sizes());
  TORCH_CHECK(num_classes >= 0, "wmdd::class_moments: num_classes must be >= 0");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "wmdd::class_moments: x must be floating point, got ",
              x_in.scalar_type());
  TORCH_CHECK(!at::isFloatingType(y_in.scalar_type()) && !at::isComplexType(y_in.scalar_type()),
              "wmdd::class_moments: y must hold integer labels");
  const int64_t n = x_in.size(0), c = x_in.size(1);
  const int64_t s = n * c > 0 ? x_in.numel() / (n * c) : 1;
  // Zero-filled here rather than with at::zeros, whose fill runs threaded from 32768 values on (a
  // parallel region per call; see moments_cpu).
  auto dopt = x_in.options().dtype(at::kDouble);
  at::Tensor sum = at::empty({num_classes, c}, dopt);
  at::Tensor sumsq = at::empty({num_classes, c}, dopt);
  at::Tensor count = at::empty({num_classes}, dopt);
  for (const at::Tensor* o : {&sum, &sumsq, &count})
    std::fill_n(o->data_ptr<double>(), o->numel(), 0.0);
  at::Tensor y = y_in.to(at::kLong).contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  double* cp = count.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(yp[i] >= 0 && yp[i] < num_classes, "wmdd::class_moments: label ", yp[i], " of sample ", i,
                " is outside [0, num_classes = ", num_classes, ")");
    cp[yp[i]] += static_cast<double>(s);
  }
  if (n == 0 || c == 0 || s == 0) return {sum, sumsq, count};

  at::Tensor x = x_in;
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) x = x.to(at::kFloat);  // half, bfloat16
  // [N, C, S] with rows of S (NCHW), or [N, S, C] with channels inner (channels_last, or S == 1).
  bool channels_inner = s == 1;
  if (!channels_inner && !x.is_contiguous()) {
    if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
        (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)))
      channels_inner = true;
  }
  if (channels_inner && s > 1) {
    // already channels-last contiguous
  } else {
    x = x.contiguous();
  }
  double* sp = sum.data_ptr<double>();
  double* qp = sumsq.data_ptr<double>();
  if (x.scalar_type() == at::kDouble)
    moments_cpu<double>(x, channels_inner, n, c, s, yp, num_classes, sp, qp);
  else
    moments_cpu<float>(x, channels_inner, n, c, s, yp, num_classes, sp, qp);
  return {sum, sumsq, count};
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn

template <typename T>
struct SinkhornProblem {
  const T* cost;  // [k, n]
  const T* a;     // [k]
  const T* b;     // [n]
  const T* f_init;
  const T* g_init;
  T* f;  // [k] output (holds u = f / reg while iterating)
  T* g;  // [n] output (holds v = g / reg)
  int64_t k, n;
};

template <typename T>
struct Workspace {
  std::vector<T> loga, logb, lse, scratch, f_rows, alpha;
  void resize(int64_t k, int64_t n) {
    loga.resize(k);
    logb.resize(n);
    lse.resize(n);
    scratch.resize(n);
    f_rows.resize(k * n);
    alpha.resize(k);
  }
};

// One problem to convergence: the loop of POT's sinkhorn_log (update v, then u; after iterations 1, 11,
// 21, ..., in general 1 + m check_every, the b-marginal violation of (u, v) is compared with tol). The violation comes from the column
// sums that the next v update computes anyway, so a check costs nothing extra; a converged check
// discards that v update. See cpu_kernels_impl.h for the passes.
// inner_parallel splits the columns and rows of every iteration across threads (one large problem).
template <typename T>
void solve(const SinkhornProblem<T>& pr, T reg, int64_t max_iter, double tol, int64_t check_every, Workspace<T>& ws,
           bool inner_parallel, int64_t* n_iter_out, double* err_out) {
  const auto& kern = kernels<T>();
  const int64_t k = pr.k, n = pr.n;
  const T inv_reg = T(1) / reg;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  ws.resize(k, n);
  T* u = pr.f;
  T* v = pr.g;
  for (int64_t i = 0; i < k; ++i) {
    ws.loga[i] = std::log(pr.a[i]);
    u[i] = pr.f_init ? pr.f_init[i] * inv_reg : T(0);
  }
  for (int64_t j = 0; j < n; ++j) {
    const bool real = pr.b[j] > T(0);
    ws.logb[j] = real ? std::log(pr.b[j]) : neg_inf;
    v[j] = real ? (pr.g_init ? pr.g_init[j] * inv_reg : T(0)) : neg_inf;
  }
  const int64_t threads = inner_parallel ? at::get_num_threads() : 1;
  bool have_f = false;  // ws.f_rows / ws.alpha hold the last row pass
  auto cols = [&](bool check) -> double {
    if (threads <= 1)
      return kern.sinkhorn_cols(pr.cost, u, v, pr.b, ws.f_rows.data(), ws.alpha.data(), k, n, 0, n, inv_reg,
                                ws.lse.data(), ws.scratch.data(), check, have_f);
    std::vector<double> part(threads, 0.0);
    const int64_t step = (n + threads - 1) / threads;
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = std::min(n, t * step), j1 = std::min(n, j0 + step);
        if (j0 < j1)
          part[t] = kern.sinkhorn_cols(pr.cost, u, v, pr.b, ws.f_rows.data(), ws.alpha.data(), k, n, j0, j1, inv_reg,
                                       ws.lse.data(), ws.scratch.data(), check, have_f);
      }
    });
    double e = 0.0;
    for (double p : part) e += p;
    return e;
  };
  auto rows = [&]() {
    if (threads <= 1) {
      kern.sinkhorn_rows(pr.cost, v, ws.loga.data(), k, n, 0, k, inv_reg, u, ws.f_rows.data(), ws.alpha.data());
    } else {
      at::parallel_for(0, k, 1, [&](int64_t i0, int64_t i1) {
        kern.sinkhorn_rows(pr.cost, v, ws.loga.data(), k, n, i0, i1, inv_reg, u, ws.f_rows.data(), ws.alpha.data());
      });
    }
    have_f = true;
  };
  double err = std::numeric_limits<double>::infinity();
  int64_t it = 0;
  for (;; ++it) {
    const bool check = it == max_iter || (it > 0 && (it - 1) % check_every == 0);
    const double err2 = cols(check);
    if (check) {
      err = std::sqrt(err2);
      if (it == max_iter || err < tol) break;
    }
    const T* lse = ws.lse.data();
    const T* logb = ws.logb.data();
    for (int64_t j = 0; j < n; ++j) v[j] = logb[j] - lse[j];  // padded columns: -inf - (finite or +inf) = -inf
    rows();
  }
  for (int64_t i = 0; i < k; ++i) u[i] *= reg;
  for (int64_t j = 0; j < n; ++j) v[j] *= reg;
  *n_iter_out = it;
  *err_out = err;
}

void check_sinkhorn_args(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double reg,
                         int64_t max_iter, const std::optional<at::Tensor>& f_init,
                         const std::optional<at::Tensor>& g_init, int64_t check_every) {
  TORCH_CHECK(cost.dim() == 3, "wmdd::sinkhorn_log: cost must be [B, k, N], got ", cost.sizes());
  const int64_t bsz = cost.size(0), k = cost.size(1), n = cost.size(2);
  TORCH_CHECK(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
              "wmdd::sinkhorn_log: cost must be float32 or float64, got ", cost.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == bsz && a.size(1) == k, "wmdd::sinkhorn_log: a must be [B, k] = [", bsz,
              ", ", k, "], got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == bsz && b.size(1) == n, "wmdd::sinkhorn_log: b must be [B, N] = [", bsz,
              ", ", n, "], got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == cost.scalar_type() && b.scalar_type() == cost.scalar_type(),
              "wmdd::sinkhorn_log: cost, a and b must have the same dtype");
  TORCH_CHECK(k > 0 && n > 0, "wmdd::sinkhorn_log: k and N must be positive");
  TORCH_CHECK(reg > 0, "wmdd::sinkhorn_log: reg must be > 0, got ", reg);
  TORCH_CHECK(max_iter >= 0, "wmdd::sinkhorn_log: max_iter must be >= 0");
  TORCH_CHECK(check_every >= 1, "wmdd::sinkhorn_log: check_every must be >= 1, got ", check_every);
  if (f_init.has_value()) {
    TORCH_CHECK(f_init->sizes() == a.sizes() && f_init->scalar_type() == cost.scalar_type() &&
                    f_init->device() == cost.device(),
                "wmdd::sinkhorn_log: f_init must be like a: ", a.sizes(), " ", cost.scalar_type());
  }
  if (g_init.has_value()) {
    TORCH_CHECK(g_init->sizes() == b.sizes() && g_init->scalar_type() == cost.scalar_type() &&
                    g_init->device() == cost.device(),
                "wmdd::sinkhorn_log: g_init must be like b: ", b.sizes(), " ", cost.scalar_type());
  }
}

template <typename T>
void sinkhorn_cpu_typed(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, T reg, int64_t max_iter,
                        double tol, int64_t check_every, const at::Tensor* f_init, const at::Tensor* g_init,
                        at::Tensor& f, at::Tensor& g,
                        at::Tensor& n_iter, at::Tensor& err) {
  const int64_t bsz = cost.size(0), k = cost.size(1), n = cost.size(2);
  const T* cp = cost.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  const T* fi = f_init ? f_init->data_ptr<T>() : nullptr;
  const T* gi = g_init ? g_init->data_ptr<T>() : nullptr;
  T* fp = f.data_ptr<T>();
  T* gp = g.data_ptr<T>();
  int64_t* ip = n_iter.data_ptr<int64_t>();
  double* ep = err.data_ptr<double>();
  auto problem = [&](int64_t p) {
    return SinkhornProblem<T>{cp + p * k * n, ap + p * k,           bp + p * n, fi ? fi + p * k : nullptr,
                              gi ? gi + p * n : nullptr, fp + p * k, gp + p * n, k, n};
  };
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (bsz < threads && k * n >= (int64_t{1} << 16)) {
    // Fewer problems than threads and large ones: the threads share each problem's rows and columns.
    Workspace<T> ws;
    for (int64_t p = 0; p < bsz; ++p) solve(problem(p), reg, max_iter, tol, check_every, ws, true, ip + p, ep + p);
    return;
  }
  // One problem per thread at a time, taken from a shared counter: problems that converge early free
  // their thread for the next one.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min(threads, bsz));
  auto work = [&](int64_t, int64_t) {
    Workspace<T> ws;
    for (int64_t p = next++; p < bsz; p = next++)
      solve(problem(p), reg, max_iter, tol, check_every, ws, false, ip + p, ep + p);
  };
  if (workers == 1)
    work(0, 1);
  else
    at::parallel_for(0, workers, 1, work);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_ex_cpu(
    const at::Tensor& cost_in, const at::Tensor& a_in, const at::Tensor& b_in, double reg, int64_t max_iter,
    double tol, const std::optional<at::Tensor>& f_init_in, const std::optional<at::Tensor>& g_init_in,
    int64_t check_every) {
  check_sinkhorn_args(cost_in, a_in, b_in, reg, max_iter, f_init_in, g_init_in, check_every);
  const at::Tensor cost = cost_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor f_init, g_init;
  if (f_init_in.has_value()) f_init = f_init_in->contiguous();
  if (g_init_in.has_value()) g_init = g_init_in->contiguous();
  at::Tensor f = at::empty(a.sizes(), a.options());
  at::Tensor g = at::empty(b.sizes(), b.options());
  at::Tensor n_iter = at::zeros({cost.size(0)}, a.options().dtype(at::kLong));
  at::Tensor err = at::zeros({cost.size(0)}, a.options().dtype(at::kDouble));
  const at::Tensor* fi = f_init.defined() ? &f_init : nullptr;
  const at::Tensor* gi = g_init.defined() ? &g_init : nullptr;
  if (cost.scalar_type() == at::kDouble)
    sinkhorn_cpu_typed<double>(cost, a, b, reg, max_iter, tol, check_every, fi, gi, f, g, n_iter, err);
  else
    sinkhorn_cpu_typed<float>(cost, a, b, static_cast<float>(reg), max_iter, tol, check_every, fi, gi, f, g, n_iter,
                              err);
  return {f, g, n_iter, err};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_cpu(const at::Tensor& cost, const at::Tensor& a,
                                                    const at::Tensor& b, double reg, int64_t max_iter, double tol,
                                                    const std::optional<at::Tensor>& f_init,
                                                    const std::optional<at::Tensor>& g_init) {
  auto out = sinkhorn_log_ex_cpu(cost, a, b, reg, max_iter, tol, f_init, g_init, 10);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace

const char* cpu_isa() { return table().isa; }

int64_t set_moments_parallel_min(int64_t values) { return g_moments_parallel_min.exchange(values); }

bool set_cpu_isa(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (t == nullptr) return false;
  g_table.store(t);
  return true;
}

}  // namespace wmdd

TORCH_LIBRARY_IMPL(wmdd, CPU, m) {
  m.impl("class_moments", &wmdd::class_moments_cpu);
  m.impl("sinkhorn_log", &wmdd::sinkhorn_log_cpu);
  m.impl("sinkhorn_log_ex", &wmdd::sinkhorn_log_ex_cpu);
}
