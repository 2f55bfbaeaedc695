// Tensor files: ONNX TensorProto/SequenceProto/OptionalProto `.pb` (model-zoo layout) and NumPy `.npy`.
#pragma once
#include <string>

#include "kiln/status.h"
#include "kiln/tensor.h"

namespace kiln {

// Reads a tensor file; the format follows the extension (.npy, else protobuf). `kind_hint`:
// "tensor", "sequence", "optional" or "" (detect).
Result<Value> read_tensor_file(const std::string& path, const std::string& kind_hint = "");
// Writes a tensor as .npy (extension .npy) or TensorProto .pb (anything else).
Status write_tensor_file(const std::string& path, const Tensor& t, const std::string& name = "");

}  // namespace kiln
