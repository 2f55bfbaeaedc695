// ONNX model import: our own protobuf wire-format reader over an mmap (zero-copy weights),
// producing the canonical IR (src/ir/graph.h). Opset differences are resolved here and only
// here (see canonicalize.h).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "base/file.h"
#include "base/status.h"
#include "ir/graph.h"

namespace kiln {

struct ImportOptions {
  // Folder that external-data `location`s are relative to; default: the model file's folder.
  std::string base_dir;
  // Check every node's (domain, op_type) against the op registry and report all unsupported
  // nodes in one Status (kUnsupported) listing them.
  bool check_ops = true;
};

// Parses and imports a model file. Errors name the field and byte offset for malformed
// protobuf, and the node for semantic problems. Initializer data stays in the mmap when it is
// raw_data and suitably aligned (kept alive by the tensors).
Result<Model> import_onnx_file(const std::string& path, const ImportOptions& opts = {});
// Same, from bytes already in memory (fuzzing, tests). External data resolves against base_dir.
Result<Model> import_onnx_bytes(std::shared_ptr<MappedFile> bytes, const ImportOptions& opts = {});

}  // namespace kiln
