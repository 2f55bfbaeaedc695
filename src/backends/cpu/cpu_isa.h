// Run-time x86 instruction-set checks for Kiln's own CPU kernels (cpu_gemm.cpp,
// cpu_attention.cpp, cpu_winograd.cpp): each kernel is compiled for AVX-512 and/or AVX2 in
// target regions and picks its path with these. False off x86-64 or without GCC/clang builtins.
#pragma once

namespace kiln {
namespace cpu {

// AVX-512 F + DQ + VL (what the AVX-512 paths use).
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// AVX2 + FMA (what the AVX2 paths use).
inline bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace kiln
