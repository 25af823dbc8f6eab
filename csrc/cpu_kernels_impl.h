// Bodies of the CPU kernels declared in cpu_kernels.h. Included once per instruction set by
// cpu_isa_*.cpp, inside a namespace of its own and after a `#pragma GCC target(...)`, so every function
// here is compiled for that instruction set. It includes nothing (the includer has included <cmath>,
// <cstring>, <cstdint>, <limits> before the pragma) and must stay free of torch and of any inline
// function defined elsewhere (one-definition rule across instruction sets).
//
// The includer defines WMDD_HAVE_FMA (1 when the target has fused multiply-add).

#define WMDD_INLINE inline __attribute__((always_inline))

template <typename T>
static WMDD_INLINE T fmadd(T a, T b, T c) {
#if WMDD_HAVE_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}
template <>
WMDD_INLINE float fmadd<float>(float a, float b, float c) {
#if WMDD_HAVE_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for x <= 0, branch-free so that loops calling it vectorise. Range reduction x = k ln2 + r,
// |r| <= ln2 / 2, then a Taylor polynomial for exp(r) and 2^k put into the exponent bits. Results
// below about exp(-708) (double) / exp(-86) (float) are returned as 0: callers only sum terms
// relative to a maximum term of 1, so those are far below rounding. Accurate to ~1-2 ulp.
static WMDD_INLINE double exp_nonpos(double x) {
  const double lo = -708.0;
  const double shift = 0x1.8p52;  // adding it rounds to an integer held in the low mantissa bits
  double xc = x < lo ? lo : x;
  double kd = fmadd(xc, 1.4426950408889634, shift);
  uint64_t ki;
  std::memcpy(&ki, &kd, sizeof ki);
  kd -= shift;
  double r = fmadd(kd, -6.93147180369123816490e-01, xc);  // ln2 high part: k * it is exact
  r = fmadd(kd, -1.90821492927058770002e-10, r);          // ln2 low part
  double p = 1.0 / 479001600.0;                        // 1/12!
  p = fmadd(p, r, 1.0 / 39916800.0);
  p = fmadd(p, r, 1.0 / 3628800.0);
  p = fmadd(p, r, 1.0 / 362880.0);
  p = fmadd(p, r, 1.0 / 40320.0);
  p = fmadd(p, r, 1.0 / 5040.0);
  p = fmadd(p, r, 1.0 / 720.0);
  p = fmadd(p, r, 1.0 / 120.0);
  p = fmadd(p, r, 1.0 / 24.0);
  p = fmadd(p, r, 1.0 / 6.0);
  p = fmadd(p, r, 0.5);
  p = fmadd(p, r, 1.0);
  p = fmadd(p, r, 1.0);
  uint64_t pb;
  std::memcpy(&pb, &p, sizeof pb);
  pb += ki << 52;
  double res;
  std::memcpy(&res, &pb, sizeof res);
  return res * static_cast<double>(x >= lo);  // a multiply, not a select: it vectorises everywhere
}

static WMDD_INLINE float exp_nonpos(float x) {
  const float lo = -86.0f;
  const float shift = 0x1.8p23f;
  float xc = x < lo ? lo : x;
  float kf = fmadd(xc, 1.44269504f, shift);
  uint32_t ki;
  std::memcpy(&ki, &kf, sizeof ki);
  kf -= shift;
  float r = fmadd(kf, -6.9314575195e-01f, xc);  // ln2 high part: k * it is exact
  r = fmadd(kf, -1.4286067653e-06f, r);         // ln2 low part
  float p = 1.0f / 5040.0f;
  p = fmadd(p, r, 1.0f / 720.0f);
  p = fmadd(p, r, 1.0f / 120.0f);
  p = fmadd(p, r, 1.0f / 24.0f);
  p = fmadd(p, r, 1.0f / 6.0f);
  p = fmadd(p, r, 0.5f);
  p = fmadd(p, r, 1.0f);
  p = fmadd(p, r, 1.0f);
  uint32_t pb;
  std::memcpy(&pb, &p, sizeof pb);
  pb += ki << 23;
  float res;
  std::memcpy(&res, &pb, sizeof res);
  return res * static_cast<float>(x >= lo);
}

// ---------------------------------------------------------------------------------------------
// class_moments

template <typename T>
static WMDD_INLINE void row_moments(const T* __restrict p, int64_t s, double& out_s, double& out_ss) {
  double a = 0.0, q = 0.0;
#pragma omp simd reduction(+ : a, q)
  for (int64_t i = 0; i < s; ++i) {
    double v = static_cast<double>(p[i]);
    a += v;
    q += v * v;
  }
  out_s = a;
  out_ss = q;
}

template <typename T>
static void moments_ncs(const T* x, const int64_t* y, int64_t n0, int64_t n1, int64_t c, int64_t s, int64_t c0,
                        int64_t c1, double* sum, double* sumsq) {
  for (int64_t i = n0; i < n1; ++i) {
    const T* base = x + i * c * s;
    double* os = sum + y[i] * c;
    double* oq = sumsq + y[i] * c;
    for (int64_t ch = c0; ch < c1; ++ch) {
      double a, q;
      row_moments(base + ch * s, s, a, q);
      os[ch] += a;
      oq[ch] += q;
    }
  }
}

template <typename T>
static void moments_nsc(const T* x, const int64_t* y, int64_t n0, int64_t n1, int64_t s, int64_t c, int64_t c0,
                        int64_t c1, double* sum, double* sumsq, double* acc, double* acc_sq) {
  for (int64_t i = n0; i < n1; ++i) {
    double* __restrict os = sum + y[i] * c;
    double* __restrict oq = sumsq + y[i] * c;
    if (s == 1) {
      const T* __restrict row = x + i * c;
#pragma omp simd
      for (int64_t ch = c0; ch < c1; ++ch) {
        double v = static_cast<double>(row[ch]);
        os[ch] += v;
        oq[ch] += v * v;
      }
      continue;
    }
    double* __restrict as = acc;
    double* __restrict aq = acc_sq;
    for (int64_t ch = c0; ch < c1; ++ch) as[ch] = aq[ch] = 0.0;
    for (int64_t sp = 0; sp < s; ++sp) {
      const T* __restrict row = x + (i * s + sp) * c;
#pragma omp simd
      for (int64_t ch = c0; ch < c1; ++ch) {
        double v = static_cast<double>(row[ch]);
        as[ch] += v;
        aq[ch] += v * v;
      }
    }
    for (int64_t ch = c0; ch < c1; ++ch) {
      os[ch] += as[ch];
      oq[ch] += aq[ch];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn (log domain), one problem

template <typename T>
static double sinkhorn_cols(const T* cost, const T* u, const T* v, const T* b, int64_t k, int64_t n, int64_t j0,
                            int64_t j1, T inv_reg, T* lse, T* scratch, bool check) {
  const T ninv = -inv_reg;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t block = 1024;  // columns per block: the running max and sum stay in L1
  double err2 = 0.0;
  for (int64_t jb = j0; jb < j1; jb += block) {
    const int64_t je = jb + block < j1 ? jb + block : j1;
    T* __restrict m = lse;
    T* __restrict acc = scratch;
    for (int64_t j = jb; j < je; ++j) {
      m[j] = neg_inf;
      acc[j] = T(0);
    }
    for (int64_t i = 0; i < k; ++i) {
      const T* __restrict row = cost + i * n;
      const T ui = u[i];
#pragma omp simd
      for (int64_t j = jb; j < je; ++j) {
        T t = fmadd(row[j], ninv, ui);
        m[j] = t > m[j] ? t : m[j];
      }
    }
    for (int64_t i = 0; i < k; ++i) {
      const T* __restrict row = cost + i * n;
      const T ui = u[i];
#pragma omp simd
      for (int64_t j = jb; j < je; ++j) {
        acc[j] += exp_nonpos(fmadd(row[j], ninv, ui) - m[j]);
      }
    }
    for (int64_t j = jb; j < je; ++j) {
      const T mj = m[j];
      const T l = mj == neg_inf ? neg_inf : mj + std::log(acc[j]);
      lse[j] = l;
      if (check && b[j] > T(0)) {
        double e = std::exp(static_cast<double>(v[j]) + static_cast<double>(l)) - static_cast<double>(b[j]);
        err2 += e * e;
      }
    }
  }
  return err2;
}

template <typename T>
static void sinkhorn_rows(const T* cost, const T* v, const T* loga, int64_t k, int64_t n, int64_t i0, int64_t i1,
                          T inv_reg, T* u) {
  (void)k;
  const T ninv = -inv_reg;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* __restrict vv = v;
  for (int64_t i = i0; i < i1; ++i) {
    const T* __restrict row = cost + i * n;
    T m = neg_inf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) {
      T t = fmadd(row[j], ninv, vv[j]);
      m = t > m ? t : m;
    }
    if (m == neg_inf) {
      u[i] = neg_inf;
      continue;
    }
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < n; ++j) {
      acc += exp_nonpos(fmadd(row[j], ninv, vv[j]) - m);
    }
    u[i] = loga[i] - m - std::log(acc);
  }
}

static const KernelTable kTable = {
    WMDD_ISA_NAME,
    {&moments_ncs<float>, &moments_nsc<float>, &sinkhorn_cols<float>, &sinkhorn_rows<float>},
    {&moments_ncs<double>, &moments_nsc<double>, &sinkhorn_cols<double>, &sinkhorn_rows<double>},
};
