// Tuning buffers filled with random values: tensor-core kernels draw less power on zeros and run
// at higher clocks, so timing candidates on zero-filled operands favours the compute-bound ones
// in a way real activations do not.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "backends/cuda/dnn.h"
#include "kiln/half.h"

namespace kiln::cuda {

namespace {

constexpr size_t kPattern = size_t{1} << 20;  // 1 MiB of random elements, then doubled on device

std::vector<uint8_t> make_pattern(DataType dt) {
  std::vector<uint8_t> buf(kPattern);
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  const size_t es = dtype_size(dt);
  for (size_t i = 0; i + es <= kPattern; i += es) {
    const float v = d(rng);
    switch (dt) {
      case DataType::kFloat16: {
        const Half h(v);
        std::memcpy(&buf[i], &h, 2);
        break;
      }
      case DataType::kBFloat16: {
        const BFloat16 h(v);
        std::memcpy(&buf[i], &h, 2);
        break;
      }
      case DataType::kDouble: {
        const double x = v;
        std::memcpy(&buf[i], &x, 8);
        break;
      }
      default:
        std::memcpy(&buf[i], &v, 4);
        break;
    }
  }
  return buf;
}

}  // namespace

Status fill_tuning_data(void* p, size_t bytes, DataType dt) {
  if (!p || bytes == 0) return Status::ok();
  if (dt != DataType::kFloat16 && dt != DataType::kBFloat16 && dt != DataType::kDouble)
    dt = DataType::kFloat;
  static const std::vector<uint8_t> pats[4] = {make_pattern(DataType::kFloat),
                                               make_pattern(DataType::kFloat16),
                                               make_pattern(DataType::kBFloat16),
                                               make_pattern(DataType::kDouble)};
  const auto& pat = pats[dt == DataType::kFloat16 ? 1 : dt == DataType::kBFloat16 ? 2 : dt == DataType::kDouble ? 3 : 0];
  auto* dst = static_cast<uint8_t*>(p);
  size_t have = std::min(bytes, kPattern);
  KILN_CUDA_CHECK(cudaMemcpy(dst, pat.data(), have, cudaMemcpyHostToDevice), "tuning data");
  while (have < bytes) {  // double the filled prefix on the device
    const size_t n = std::min(have, bytes - have);
    KILN_CUDA_CHECK(cudaMemcpy(dst + have, dst, n, cudaMemcpyDeviceToDevice), "tuning data");
    have += n;
  }
  return Status::ok();
}

}  // namespace kiln::cuda
