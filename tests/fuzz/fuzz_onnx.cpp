// Fuzz target: ONNX protobuf reader + import to the canonical IR + type/shape inference.
#include <cstddef>
#include <cstdint>

#include "base/file.h"
#include "fuzz_common.h"
#include "onnx/importer.h"
#include "passes/passes.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  kiln_fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  kiln::ImportOptions opts;
  // External data must not reach real files: a folder that does not exist.
  opts.base_dir = "/nonexistent-kiln-fuzz";
  auto model = kiln::import_onnx_bytes(kiln::MappedFile::from_bytes(data, size), opts);
  if (!model.is_ok()) return 0;
  (void)kiln::infer_types(model->graph);
  return 0;
}
