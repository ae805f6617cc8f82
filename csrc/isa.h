// For the kernel sources compiled once per instruction set: DG_ISA (a compile definition,
// "base" by default) names the namespace dg::DG_ISA their definitions live in, so that the
// variants coexist in one library (cpu_dispatch.cpp picks one at run time).
#pragma once

#include <cstdint>

#include "view.h"

#ifndef DG_ISA
#define DG_ISA base
#endif

namespace dg {
namespace DG_ISA {

#include "cpu_kernels.inc"

}  // namespace DG_ISA
}  // namespace dg
