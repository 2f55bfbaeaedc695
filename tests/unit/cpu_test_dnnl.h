// Whether this build has oneDNN (KILN_TEST_HAS_DNNL), and the CPU backend's kernel declarations
// with the oneDNN ones visible when it does (cpu_kernels.h shows them under KILN_WITH_DNNL, which
// the kiln_cpu target defines for itself only).
#pragma once
#if __has_include(<dnnl.hpp>)
#define KILN_TEST_HAS_DNNL 1
#else
#define KILN_TEST_HAS_DNNL 0
#endif
#ifndef KILN_WITH_DNNL
#define KILN_WITH_DNNL KILN_TEST_HAS_DNNL
#endif
#include "backends/cpu/cpu_kernels.h"
