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

// exp(x), branch-free so that loops calling it vectorise. x is clamped to [lo, hi] of Limits<T> (below
// lo the result is 0): callers sum terms relative to a shift and detect sums that left the safe range.
// Range reduction x = k ln2 + r, |r| <= ln2 / 2, a Taylor polynomial for exp(r), 2^k put into the
// exponent bits. Accurate to ~1-2 ulp.
template <typename T>
struct Limits;
template <>
struct Limits<double> {
  static constexpr double lo = -708.0, hi = 700.0;
  // A row sum in [row_lo, row_hi] (e^-300, e^300) is accurate: no term overflowed, and the terms lost
  // below e^lo are < e^-400 of it. A column sum of F (see below) is accepted from col_min = e^-300.
  static constexpr double row_lo = 5.14820022872342e-131, row_hi = 1.9424263952412558e+130;
  static constexpr double col_min = 5.14820022872342e-131;
};
template <>
struct Limits<float> {
  static constexpr float lo = -86.0f, hi = 80.0f;
  static constexpr float row_lo = 2.0611536e-09f, row_hi = 4.8516520e+08f;  // e^-20, e^20
  // Terms lost from a column sum of F are < e^(lo + 20) = 2e-29 of the mass: accept from 1e-18.
  static constexpr float col_min = 1e-18f;
};

static WMDD_INLINE double exp_clamped(double x) {
  const double shift = 0x1.8p52;  // adding it rounds to an integer held in the low mantissa bits
  double xc = x < Limits<double>::lo ? Limits<double>::lo : x;
  xc = xc > Limits<double>::hi ? Limits<double>::hi : xc;
  double kd = fmadd(xc, 1.4426950408889634, shift);
  uint64_t ki;
  std::memcpy(&ki, &kd, sizeof ki);
  kd -= shift;
  double r = fmadd(kd, -6.93147180369123816490e-01, xc);  // ln2 high part: k * it is exact
  r = fmadd(kd, -1.90821492927058770002e-10, r);          // ln2 low part
  double p = 1.0 / 479001600.0;                             // 1/12!
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
  return res * static_cast<double>(x >= Limits<double>::lo);  // a multiply, not a select: vectorises everywhere
}

static WMDD_INLINE float exp_clamped(float x) {
  const float shift = 0x1.8p23f;
  float xc = x < Limits<float>::lo ? Limits<float>::lo : x;
  xc = xc > Limits<float>::hi ? Limits<float>::hi : xc;
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
  return res * static_cast<float>(x >= Limits<float>::lo);
}

// log(x) for finite normal x > 0, branch-free (fdlibm's e_log.c / e_logf.c reduction and
// polynomials): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m from s = (m - 1) / (m + 1). ~1 ulp.
static WMDD_INLINE double log_normal(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  // Subtracting the bits of sqrt(1/2) puts the mantissa split at sqrt(1/2) (the trick of musl's log).
  const uint64_t tmp = bits - 0x3fe6a09e667f3bcdULL;
  const uint64_t mbits = bits - (tmp & (0xfffULL << 52));
  double m;
  std::memcpy(&m, &mbits, sizeof m);
  // The exponent e = (signed) tmp >> 52 as a double, with unsigned 64-bit operations only (AVX2 has
  // neither a 64-bit arithmetic shift nor an int64 -> double conversion): e + 2048 in the low bits of
  // 2^52, then subtract.
  const uint64_t ebits = (((tmp + (2048ULL << 52)) >> 52) | 0x4330000000000000ULL);
  double dk;
  std::memcpy(&dk, &ebits, sizeof dk);
  dk -= 4503599627372544.0;  // 2^52 + 2048
  const double f = m - 1.0;
  const double hfsq = 0.5 * f * f;
  const double s = f / (2.0 + f);
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * fmadd(w, fmadd(w, 1.531383769920937332e-01, 2.222219843214978396e-01), 3.999999999940941908e-01);
  const double t2 = z * fmadd(w, fmadd(w, fmadd(w, 1.479819860511658591e-01, 1.818357216161805012e-01),
                                       2.857142874366239149e-01), 6.666666666666735130e-01);
  const double rr = t2 + t1;
  return dk * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + rr) + dk * 1.90821492927058770002e-10)) - f);
}

static WMDD_INLINE float log_normal(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t tmp = bits - 0x3f3504f3u;  // sqrt(1/2)
  const int32_t e = static_cast<int32_t>(tmp) >> 23;
  const uint32_t mbits = bits - (tmp & (0x1ffu << 23));
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const float dk = static_cast<float>(e);
  const float f = m - 1.0f;
  const float hfsq = 0.5f * f * f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * fmadd(w, 0.24279078841f, 0.40000972152f);
  const float t2 = z * fmadd(w, 0.28498786688f, 0.66666662693f);
  const float rr = t2 + t1;
  return dk * 6.9314575195e-01f - ((hfsq - (s * (hfsq + rr) + dk * 1.4286067653e-06f)) - f);
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
    int64_t sp = 0;
    for (; sp + 4 <= s; sp += 4) {  // four positions per sweep: a quarter of the accumulator traffic
      const T* __restrict r0 = x + (i * s + sp) * c;
      const T* __restrict r1 = r0 + c;
      const T* __restrict r2 = r1 + c;
      const T* __restrict r3 = r2 + c;
#pragma omp simd
      for (int64_t ch = c0; ch < c1; ++ch) {
        double v0 = static_cast<double>(r0[ch]), v1 = static_cast<double>(r1[ch]);
        double v2 = static_cast<double>(r2[ch]), v3 = static_cast<double>(r3[ch]);
        as[ch] += (v0 + v1) + (v2 + v3);
        aq[ch] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
      }
    }
    for (; sp < s; ++sp) {
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

// One exp per cost entry per iteration. The row pass computes F_ij = exp(v_j - C_ij / reg - s_i) with
// some shift s_i, its row sums r_i, and u_i = log a_i - s_i - log r_i; it keeps F and alpha_i = a_i / r_i.
// Then, exactly,
//     sum_i exp(u_i - C_ij / reg) = exp(-v_j) * sum_i alpha_i F_ij,
// so the next column pass is a weighted column sum of F (no exp), and c_j = sum_i alpha_i F_ij is the
// j-th column sum of the current plan, i.e. the b-marginal the stopping test needs. Terms of F below
// exp's range were flushed to 0: they are < e^(lo + row_hi) of a_i, so c_j is accepted only when it is
// far above that; otherwise (first iteration, columns far from their marginal) the column is computed
// exactly, with its maximum as the shift.

// Column pass over [j0, j1): lse_j = logsumexp_i(u_i - C_ij / reg) for columns with b_j > 0. With
// have_f, from F / alpha of the last row pass. scratch: N values. When check, returns
// sum_j (exp(v_j + lse_j) - b_j)^2 over columns with b_j > 0 (the squared b-marginal violation of the
// current (u, v)), else 0.
template <typename T>
static double sinkhorn_cols(const T* cost, const T* u, const T* v, const T* b, const T* f_rows, const T* alpha,
                            int64_t k, int64_t n, int64_t j0, int64_t j1, T inv_reg, T* lse, T* scratch, bool check,
                            bool have_f) {
  const T ninv = -inv_reg;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t block = 1024;  // columns per block: the running sums stay in L1
  double err2 = 0.0;
  for (int64_t jb = j0; jb < j1; jb += block) {
    const int64_t je = jb + block < j1 ? jb + block : j1;
    T* __restrict l = lse;
    T* __restrict acc = scratch;
    bool ok = have_f;
    if (ok) {
      for (int64_t j = jb; j < je; ++j) acc[j] = T(0);
      for (int64_t i = 0; i < k; ++i) {
        const T* __restrict fr = f_rows + i * n;
        const T ai = alpha[i];
        if (ai == T(0)) continue;
#pragma omp simd
        for (int64_t j = jb; j < je; ++j) acc[j] = fmadd(ai, fr[j], acc[j]);
      }
      for (int64_t j = jb; j < je; ++j) ok = ok && (b[j] <= T(0) || acc[j] >= Limits<T>::col_min);
      if (ok) {
        const T* __restrict vv = v;
#pragma omp simd
        for (int64_t j = jb; j < je; ++j) {
          const T c = acc[j] > T(0) ? acc[j] : T(1);  // padded columns (b_j = 0): unused
          l[j] = log_normal(c) - vv[j];
        }
        if (check) {
          for (int64_t j = jb; j < je; ++j) {
            if (b[j] > T(0)) {
              const double e = static_cast<double>(acc[j]) - static_cast<double>(b[j]);
              err2 += e * e;
            }
          }
        }
        continue;
      }
    }
    T* __restrict m = lse;
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
      for (int64_t j = jb; j < je; ++j) acc[j] += exp_clamped(fmadd(row[j], ninv, ui) - m[j]);
    }
    for (int64_t j = jb; j < je; ++j) m[j] = m[j] == neg_inf ? neg_inf : m[j] + log_normal(acc[j]);
    if (check) {
      for (int64_t j = jb; j < je; ++j) {
        if (b[j] > T(0)) {
          double e = std::exp(static_cast<double>(v[j]) + static_cast<double>(lse[j])) - static_cast<double>(b[j]);
          err2 += e * e;
        }
      }
    }
  }
  return err2;
}

// Row pass over [i0, i1): u_i = log a_i - logsumexp_j(v_j - C_ij / reg), keeping F (rows [i0, i1) of
// f_rows) and alpha (see above). The previous log-sum-exp, log a_i - u_i, is the shift (one pass); a
// row whose shifted sum leaves the safe range is redone with its maximum as the shift.
template <typename T>
static void sinkhorn_rows(const T* cost, const T* v, const T* loga, int64_t k, int64_t n, int64_t i0, int64_t i1,
                          T inv_reg, T* u, T* f_rows, T* alpha) {
  (void)k;
  const T ninv = -inv_reg;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T* __restrict vv = v;
  for (int64_t i = i0; i < i1; ++i) {
    const T* __restrict row = cost + i * n;
    T* __restrict fr = f_rows + i * n;
    T shift = loga[i] - u[i];
    T acc = T(0);
    if (loga[i] != neg_inf && std::isfinite(shift)) {
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < n; ++j) {
        const T e = exp_clamped(fmadd(row[j], ninv, vv[j]) - shift);
        fr[j] = e;
        acc += e;
      }
    }
    if (loga[i] != neg_inf && !(acc >= Limits<T>::row_lo && acc <= Limits<T>::row_hi)) {
      T m = neg_inf;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) {
        T t = fmadd(row[j], ninv, vv[j]);
        m = t > m ? t : m;
      }
      shift = m;
      acc = T(0);
      if (m != neg_inf) {
#pragma omp simd reduction(+ : acc)
        for (int64_t j = 0; j < n; ++j) {
          const T e = exp_clamped(fmadd(row[j], ninv, vv[j]) - m);
          fr[j] = e;
          acc += e;
        }
      }
    }
    if (loga[i] == neg_inf || acc == T(0)) {  // a_i = 0 (or no column at all): an empty row
      u[i] = neg_inf;
      alpha[i] = T(0);
      continue;
    }
    u[i] = loga[i] - shift - std::log(acc);
    alpha[i] = std::exp(loga[i]) / acc;
  }
}

static const KernelTable kTable = {
    WMDD_ISA_NAME,
    {&moments_ncs<float>, &moments_nsc<float>, &sinkhorn_rows<float>, &sinkhorn_cols<float>},
    {&moments_ncs<double>, &moments_nsc<double>, &sinkhorn_rows<double>, &sinkhorn_cols<double>},
};
