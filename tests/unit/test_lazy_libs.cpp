// A CUDA-enabled build must not load cuBLASLt or NVRTC until the CUDA backend calls them
// (src/backends/cuda/lazy_libs.cpp): their load-time initialization costs ~180 MB of resident
// memory, which CPU-only runs of such a build used to pay. Checked in this process's mappings;
// on a machine with a GPU other tests may have loaded them already, so there it is skipped (the
// CUDA tests exercise the loaded path).
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "kiln/runtime.h"
#include "runtime/device_context.h"

namespace {

bool mapped(const std::string& lib) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find(lib) != std::string::npos) return true;
  return false;
}

}  // namespace

TEST(LazyLibs, CublasLtAndNvrtcAreNotLoadedByCpuWork) {
  const kiln::DeviceRuntime* rt = kiln::cuda_runtime();
  if (!rt) GTEST_SKIP() << "a build without CUDA";
  if (!std::ifstream("/proc/self/maps")) GTEST_SKIP() << "no /proc/self/maps";
  if (rt->fingerprint().is_ok()) GTEST_SKIP() << "a GPU is present: other tests may have loaded them";
  EXPECT_FALSE(mapped("libcublasLt.so"));
  EXPECT_FALSE(mapped("libcublas.so"));
  EXPECT_FALSE(mapped("libnvrtc.so"));
  EXPECT_TRUE(mapped("libcudart") || mapped("/kiln_unit_tests"));  // the scan itself works
}
