// The CPU kernels of cpu_kernels_impl.h compiled for the compiler's baseline instruction set (any CPU).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"



namespace wmdd_cpu {
namespace isa_default {
#define WMDD_HAVE_FMA 0
#define WMDD_ISA_NAME "default"
#include "cpu_kernels_impl.h"
}  // namespace isa_default

const KernelTable* table_default() { return &isa_default::kTable; }
}  // namespace wmdd_cpu
