// CUDA implementations of wmdd::class_moments and wmdd::sinkhorn_log(_ex). Same conventions and
// results as the CPU kernels (cpu_ops.cpp) and the references in wmdd/ops.py.
//
// Light headers only (c10/cuda, ATen/core): the toolkits these are built with may lack the CUDA
// libraries that ATen/cuda/CUDAContext.h pulls in, and light headers compile faster.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace wmdd {
namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

int64_t grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{1} << 20));
}

// ---------------------------------------------------------------------------------------------
// class_moments

// Layout [N, C, S], S >= 32: one warp per (sample, channel) row.
template <typename T>
__global__ void moments_rows_warp(const T* __restrict__ x, const int64_t* __restrict__ y, int64_t rows, int64_t c,
                                  int64_t s, int64_t num_classes, double* __restrict__ sum,
                                  double* __restrict__ sumsq) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  for (int64_t row = blockIdx.x * warps + threadIdx.x / kWarp; row < rows; row += int64_t(gridDim.x) * warps) {
    const T* p = x + row * s;
    double a = 0.0, q = 0.0;
    for (int64_t i = lane; i < s; i += kWarp) {
      const double v = static_cast<double>(p[i]);
      a += v;
      q += v * v;
    }
    a = warp_sum(a);
    q = warp_sum(q);
    if (lane == 0) {
      const int64_t n = row / c, ch = row - n * c;
      const int64_t k = y[n];
      if (k >= 0 && k < num_classes) {
        atomicAdd(sum + k * c + ch, a);
        atomicAdd(sumsq + k * c + ch, q);
      }
    }
  }
}

// Layout [N, C, S], S < 32: one thread per row.
template <typename T>
__global__ void moments_rows_thread(const T* __restrict__ x, const int64_t* __restrict__ y, int64_t rows, int64_t c,
                                    int64_t s, int64_t num_classes, double* __restrict__ sum,
                                    double* __restrict__ sumsq) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const T* p = x + row * s;
    double a = 0.0, q = 0.0;
    for (int64_t i = 0; i < s; ++i) {
      const double v = static_cast<double>(p[i]);
      a += v;
      q += v * v;
    }
    const int64_t n = row / c, ch = row - n * c;
    const int64_t k = y[n];
    if (k >= 0 && k < num_classes) {
      atomicAdd(sum + k * c + ch, a);
      atomicAdd(sumsq + k * c + ch, q);
    }
  }
}

// Layout [N, S, C] (channels_last, or [N, C]): a block covers blockDim.x channels of one sample and a
// chunk of spatial positions; thread = channel, so loads are coalesced.
template <typename T>
__global__ void moments_channels_inner(const T* __restrict__ x, const int64_t* __restrict__ y, int64_t n, int64_t s,
                                       int64_t c, int64_t s_chunk, int64_t num_classes, double* __restrict__ sum,
                                       double* __restrict__ sumsq) {
  const int64_t c_blocks = (c + blockDim.x - 1) / blockDim.x;
  const int64_t s_chunks = (s + s_chunk - 1) / s_chunk;
  const int64_t tiles = n * s_chunks * c_blocks;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t cb = tile % c_blocks;
    const int64_t rest = tile / c_blocks;
    const int64_t sc = rest % s_chunks;
    const int64_t i = rest / s_chunks;
    const int64_t ch = cb * blockDim.x + threadIdx.x;
    const int64_t k = y[i];
    if (ch >= c || k < 0 || k >= num_classes) continue;
    const int64_t s0 = sc * s_chunk, s1 = s0 + s_chunk < s ? s0 + s_chunk : s;
    double a = 0.0, q = 0.0;
    for (int64_t sp = s0; sp < s1; ++sp) {
      const double v = static_cast<double>(x[(i * s + sp) * c + ch]);
      a += v;
      q += v * v;
    }
    atomicAdd(sum + k * c + ch, a);
    atomicAdd(sumsq + k * c + ch, q);
  }
}

__global__ void class_counts(const int64_t* __restrict__ y, int64_t n, int64_t s, int64_t num_classes,
                             double* __restrict__ count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = y[i];
    if (k >= 0 && k < num_classes) atomicAdd(count + k, static_cast<double>(s));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(const at::Tensor& x_in, const at::Tensor& y_in,
                                                                int64_t num_classes) {
  TORCH_CHECK(x_in.dim() >= 2, "wmdd::class_moments: x must be [N, C, *], got ", x_in.dim(), " dims");
  TORCH_CHECK(y_in.dim() == 1 && y_in.size(0) == x_in.size(0),
              "wmdd::class_moments: y must be [N] with N = x.size(0) = ", x_in.size(0), ", got ", y_in.sizes());
  TORCH_CHECK(y_in.device() == x_in.device(), "wmdd::class_moments: x and y must be on the same device");
  TORCH_CHECK(num_classes >= 0, "wmdd::class_moments: num_classes must be >= 0");
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "wmdd::class_moments: x must be floating point, got ",
              x_in.scalar_type());
  TORCH_CHECK(!at::isFloatingType(y_in.scalar_type()) && !at::isComplexType(y_in.scalar_type()),
              "wmdd::class_moments: y must hold integer labels");
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(0), c = x_in.size(1);
  const int64_t s = n * c > 0 ? x_in.numel() / (n * c) : 1;
  auto dopt = x_in.options().dtype(at::kDouble);
  at::Tensor sum = at::zeros({num_classes, c}, dopt);
  at::Tensor sumsq = at::zeros({num_classes, c}, dopt);
  at::Tensor count = at::zeros({num_classes}, dopt);
  if (n == 0 || num_classes == 0) return {sum, sumsq, count};
  const at::Tensor y = y_in.to(at::kLong).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  class_counts<<<grid_for(n, 256), 256, 0, stream>>>(y.data_ptr<int64_t>(), n, s, num_classes,
                                                      count.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (c == 0 || s == 0) return {sum, sumsq, count};

  at::Tensor x = x_in;
  bool channels_inner = s == 1;
  if (!channels_inner && !x.is_contiguous() &&
      ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
       (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))))
    channels_inner = true;
  if (!(channels_inner && s > 1)) x = x.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wmdd_class_moments_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* yp = y.data_ptr<int64_t>();
    double* sp = sum.data_ptr<double>();
    double* qp = sumsq.data_ptr<double>();
    if (channels_inner) {
      const int threads = static_cast<int>(std::min<int64_t>(256, ((c + kWarp - 1) / kWarp) * kWarp));
      const int64_t s_chunk = 64;
      const int64_t tiles = n * ((s + s_chunk - 1) / s_chunk) * ((c + threads - 1) / threads);
      moments_channels_inner<scalar_t><<<grid_for(tiles, 1), threads, 0, stream>>>(xp, yp, n, s, c, s_chunk,
                                                                                   num_classes, sp, qp);
    } else if (s >= kWarp) {
      moments_rows_warp<scalar_t><<<grid_for(n * c, 256 / kWarp), 256, 0, stream>>>(xp, yp, n * c, c, s,
                                                                                      num_classes, sp, qp);
    } else {
      moments_rows_thread<scalar_t><<<grid_for(n * c, 256), 256, 0, stream>>>(xp, yp, n * c, c, s, num_classes,
                                                                               sp, qp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum, sumsq, count};
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn: one block per problem, every iteration in one launch, convergence decided on the device.

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }
__device__ __forceinline__ float dev_log(float v) { return logf(v); }
__device__ __forceinline__ double dev_log(double v) { return log(v); }

// Running log-sum-exp: (m, s) stands for m + log(s).
template <typename T>
__device__ __forceinline__ void lse_push(T& m, T& s, T t) {
  if (t == -INFINITY) return;
  if (t > m) {
    s = s * dev_exp(m - t) + T(1);
    m = t;
  } else {
    s += dev_exp(t - m);
  }
}

template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 == -INFINITY) return;
  if (m2 > m) {
    s = s * dev_exp(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * dev_exp(m2 - m);
  }
}

template <typename T>
__device__ __forceinline__ T lse_value(T m, T s) {
  return m == -INFINITY ? m : m + dev_log(s);
}

// u = f / reg and v = g / reg live in the outputs f, g while iterating; lse is [B, N] scratch.
template <typename T>
__global__ void sinkhorn_kernel(const T* __restrict__ cost_all, const T* __restrict__ a_all,
                                const T* __restrict__ b_all, int64_t k, int64_t n, T reg, int64_t max_iter, double tol,
                                int64_t check_every, const T* __restrict__ f_init, const T* __restrict__ g_init,
                                T* f_all, T* g_all, T* lse_all, int64_t* __restrict__ n_iter_out, double* __restrict__ err_out) {
  const int64_t p = blockIdx.x;
  const T* cost = cost_all + p * k * n;
  const T* a = a_all + p * k;
  const T* b = b_all + p * n;
  T* u = f_all + p * k;
  T* v = g_all + p * n;
  T* lse = lse_all + p * n;
  const T inv_reg = T(1) / reg;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  __shared__ double red[32];
  __shared__ double err_shared;
  __shared__ int stop;

  for (int64_t i = tid; i < k; i += blockDim.x) u[i] = f_init ? f_init[p * k + i] * inv_reg : T(0);
  for (int64_t j = tid; j < n; j += blockDim.x)
    v[j] = b[j] > T(0) ? (g_init ? g_init[p * n + j] * inv_reg : T(0)) : T(-INFINITY);
  if (tid == 0) err_shared = INFINITY;
  __syncthreads();

  int64_t it = 0;
  for (;; ++it) {
    const bool check = it == max_iter || (it > 0 && (it - 1) % check_every == 0);
    // Columns: lse_j = logsumexp_i(u_i - C_ij / reg); on check iterations also the b-marginal violation
    // of the current (u, v), whose column sums are exp(v_j + lse_j).
    double e2 = 0.0;
    for (int64_t j = tid; j < n; j += blockDim.x) {
      T m = T(-INFINITY), s = T(0);
      for (int64_t i = 0; i < k; ++i) lse_push(m, s, u[i] - cost[i * n + j] * inv_reg);
      const T l = lse_value(m, s);
      lse[j] = l;
      if (check && b[j] > T(0)) {
        const double e = exp(static_cast<double>(v[j]) + static_cast<double>(l)) - static_cast<double>(b[j]);
        e2 += e * e;
      }
    }
    if (check) {
      e2 = warp_sum(e2);
      if (lane == 0) red[warp] = e2;
      __syncthreads();
      if (tid == 0) {
        double t = 0.0;
        for (int w = 0; w < warps; ++w) t += red[w];
        err_shared = sqrt(t);
        stop = (it == max_iter || err_shared < tol) ? 1 : 0;
      }
      __syncthreads();
      if (stop) break;
    }
    // v update: each thread its own columns (the ones whose lse it wrote).
    for (int64_t j = tid; j < n; j += blockDim.x) v[j] = b[j] > T(0) ? dev_log(b[j]) - lse[j] : T(-INFINITY);
    __syncthreads();
    // Rows: u_i = log a_i - logsumexp_j(v_j - C_ij / reg); one warp per row.
    for (int64_t i = warp; i < k; i += warps) {
      const T* row = cost + i * n;
      T m = T(-INFINITY), s = T(0);
      for (int64_t j = lane; j < n; j += kWarp) lse_push(m, s, v[j] - row[j] * inv_reg);
      for (int off = kWarp / 2; off > 0; off /= 2) {
        const T m2 = __shfl_down_sync(0xffffffffu, m, off);
        const T s2 = __shfl_down_sync(0xffffffffu, s, off);
        lse_merge(m, s, m2, s2);
      }
      if (lane == 0) u[i] = dev_log(a[i]) - lse_value(m, s);
    }
    __syncthreads();
  }
  for (int64_t i = tid; i < k; i += blockDim.x) u[i] *= reg;
  for (int64_t j = tid; j < n; j += blockDim.x) v[j] *= reg;
  if (tid == 0) {
    n_iter_out[p] = it;
    err_out[p] = err_shared;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_ex_cuda(
    const at::Tensor& cost_in, const at::Tensor& a_in, const at::Tensor& b_in, double reg, int64_t max_iter,
    double tol, const std::optional<at::Tensor>& f_init_in, const std::optional<at::Tensor>& g_init_in,
    int64_t check_every) {
  TORCH_CHECK(cost_in.dim() == 3, "wmdd::sinkhorn_log: cost must be [B, k, N], got ", cost_in.sizes());
  const int64_t bsz = cost_in.size(0), k = cost_in.size(1), n = cost_in.size(2);
  TORCH_CHECK(cost_in.scalar_type() == at::kFloat || cost_in.scalar_type() == at::kDouble,
              "wmdd::sinkhorn_log: cost must be float32 or float64, got ", cost_in.scalar_type());
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == bsz && a_in.size(1) == k, "wmdd::sinkhorn_log: a must be [B, k]");
  TORCH_CHECK(b_in.dim() == 2 && b_in.size(0) == bsz && b_in.size(1) == n, "wmdd::sinkhorn_log: b must be [B, N]");
  TORCH_CHECK(a_in.scalar_type() == cost_in.scalar_type() && b_in.scalar_type() == cost_in.scalar_type(),
              "wmdd::sinkhorn_log: cost, a and b must have the same dtype");
  TORCH_CHECK(a_in.device() == cost_in.device() && b_in.device() == cost_in.device(),
              "wmdd::sinkhorn_log: cost, a and b must be on the same device");
  TORCH_CHECK(k > 0 && n > 0, "wmdd::sinkhorn_log: k and N must be positive");
  TORCH_CHECK(reg > 0, "wmdd::sinkhorn_log: reg must be > 0, got ", reg);
  TORCH_CHECK(max_iter >= 0, "wmdd::sinkhorn_log: max_iter must be >= 0");
  TORCH_CHECK(check_every >= 1, "wmdd::sinkhorn_log: check_every must be >= 1, got ", check_every);
  at::Tensor f_init, g_init;
  if (f_init_in.has_value()) {
    TORCH_CHECK(f_init_in->sizes() == a_in.sizes() && f_init_in->scalar_type() == cost_in.scalar_type() &&
                    f_init_in->device() == cost_in.device(),
                "wmdd::sinkhorn_log: f_init must be like a");
    f_init = f_init_in->contiguous();
  }
  if (g_init_in.has_value()) {
    TORCH_CHECK(g_init_in->sizes() == b_in.sizes() && g_init_in->scalar_type() == cost_in.scalar_type() &&
                    g_init_in->device() == cost_in.device(),
                "wmdd::sinkhorn_log: g_init must be like b");
    g_init = g_init_in->contiguous();
  }
  c10::cuda::CUDAGuard guard(cost_in.device());
  const at::Tensor cost = cost_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor f = at::empty(a.sizes(), a.options());
  at::Tensor g = at::empty(b.sizes(), b.options());
  at::Tensor lse = at::empty(b.sizes(), b.options());
  at::Tensor n_iter = at::zeros({bsz}, a.options().dtype(at::kLong));
  at::Tensor err = at::zeros({bsz}, a.options().dtype(at::kDouble));
  if (bsz == 0) return {f, g, n_iter, err};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "wmdd_sinkhorn_cuda", [&] {
    sinkhorn_kernel<scalar_t><<<static_cast<unsigned>(bsz), threads, 0, stream>>>(
        cost.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), k, n, static_cast<scalar_t>(reg),
        max_iter, tol, check_every, f_init.defined() ? f_init.data_ptr<scalar_t>() : nullptr,
        g_init.defined() ? g_init.data_ptr<scalar_t>() : nullptr, f.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        lse.data_ptr<scalar_t>(), n_iter.data_ptr<int64_t>(), err.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f, g, n_iter, err};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_cuda(const at::Tensor& cost, const at::Tensor& a,
                                                     const at::Tensor& b, double reg, int64_t max_iter, double tol,
                                                     const std::optional<at::Tensor>& f_init,
                                                     const std::optional<at::Tensor>& g_init) {
  auto out = sinkhorn_log_ex_cuda(cost, a, b, reg, max_iter, tol, f_init, g_init, 10);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace
}  // namespace wmdd

TORCH_LIBRARY_IMPL(wmdd, CUDA, m) {
  m.impl("class_moments", &wmdd::class_moments_cuda);
  m.impl("sinkhorn_log", &wmdd::sinkhorn_log_cuda);
  m.impl("sinkhorn_log_ex", &wmdd::sinkhorn_log_ex_cuda);
}
