// Fuzz target: TensorProto decoder (input_K.pb files and initializers), then the value-file
// reader (TensorProto, else SequenceProto, else OptionalProto, as `kiln run` reads inputs).
#include <cstddef>
#include <cstdint>
#include <string>

#include "base/file.h"
#include "fuzz_common.h"
#include "onnx/tensor_file.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kiln_fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string name;
  auto t = kiln::decode_tensor_proto(data, size, &name);
  if (t.is_ok() && t->defined() && t->dtype() != kiln::DataType::kString && t->nbytes()) {
    // Touch every byte so that a tensor larger than its storage shows up under ASan.
    const volatile uint8_t* p = static_cast<const uint8_t*>(t->raw_data());
    uint8_t acc = 0;
    for (size_t i = 0; i < t->nbytes(); ++i) acc ^= p[i];
    (void)acc;
  }
  auto v = kiln::decode_value(kiln::MappedFile::from_bytes(data, size), "", "/nonexistent-kiln-fuzz");
  (void)v;
  return 0;
}
