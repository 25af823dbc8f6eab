// Shared declarations of the wmdd extension (csrc/). See wmdd/ops.py for the Python side and the
// conventions (shapes, units, stopping rule) that every implementation follows.
#pragma once

#include <cstdint>
#include <string>

namespace wmdd {

// Instruction set of the CPU kernels in use ("avx512", "avx2" or "default"): the best one the CPU
// supports, or the one named by $WMDD_CPU_ISA when the CPU supports it.
const char* cpu_isa();
// Force an instruction set (tests use it to cover every compiled variant); returns false when this CPU
// or this build cannot run it, and then leaves the choice unchanged.
bool set_cpu_isa(const std::string& name);
// class_moments uses threads from this many values on (default 2^24); returns the previous value.
int64_t set_moments_parallel_min(int64_t values);

}  // namespace wmdd
