// Fuzz target: plan reader + engine load (graph validation, kernel binding). The header's
// payload size and checksum are recomputed for most inputs so that mutations reach the payload
// parser; inputs whose first byte after the magic is odd keep the header exactly as given.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "base/file.h"
#include "base/hash.h"
#include "fuzz_common.h"
#include "kiln/runtime.h"
#include "plan/plan.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kiln_fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> b(data, data + size);
  bool fixup = size >= kiln::kPlanHeaderSize && (size < 64 || (data[40] & 1) == 0);
  if (fixup) {
    std::memcpy(b.data(), kiln::kPlanMagic, 8);
    uint64_t payload = size - kiln::kPlanHeaderSize;
    std::memcpy(b.data() + 16, &payload, 8);
    uint64_t sum = kiln::hash_bytes(b.data() + kiln::kPlanHeaderSize, payload);
    std::memcpy(b.data() + 24, &sum, 8);
  }
  auto engine = kiln::Engine::deserialize(b.data(), b.size());
  if (engine.is_ok()) (void)(*engine)->create_execution_context();
  return 0;
}
