// The CPU kernels of cpu_kernels_impl.h compiled for AVX-512 (x86-64-v4).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"

#if !(defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__)))
#define WMDD_ISA_UNAVAILABLE
#else
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#endif

#ifdef WMDD_ISA_UNAVAILABLE
namespace wmdd_cpu {
const KernelTable* table_avx512() { return nullptr; }
}  // namespace wmdd_cpu
#else
namespace wmdd_cpu {
namespace isa_avx512 {
#define WMDD_HAVE_FMA 1
#define WMDD_ISA_NAME "avx512"
#include "cpu_kernels_impl.h"
}  // namespace isa_avx512

const KernelTable* table_avx512() { return &isa_avx512::kTable; }
}  // namespace wmdd_cpu
#endif
