// Fuzz target: NumPy .npy reader.
#include <cstddef>
#include <cstdint>

#include "fuzz_common.h"
#include "onnx/tensor_file.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kiln_fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto t = kiln::decode_npy(data, size);
  if (t.is_ok() && t->nbytes()) {
    const volatile uint8_t* p = static_cast<const uint8_t*>(t->raw_data());
    uint8_t acc = 0;
    for (size_t i = 0; i < t->nbytes(); ++i) acc ^= p[i];
    (void)acc;
  }
  return 0;
}
