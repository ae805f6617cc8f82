// The CPU kernels as the bindings call them (dg::...): each dispatches to the variant
// compiled for the best instruction set the CPU supports (cpu_dispatch.cpp).
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

#include "cpu_kernels.inc"

// Instruction set of the kernel variant in use: "avx2" (AVX2 + FMA) or "base".
const char *cpu_isa();

}  // namespace dg
