// Tensor files: serialized onnx.TensorProto / SequenceProto / OptionalProto (.pb, the model zoo
// and ONNX test layout) and NumPy .npy.
#pragma once
#include <memory>
#include <string>

#include "base/file.h"
#include "base/status.h"
#include "ir/tensor.h"

namespace kiln {

// Decodes a TensorProto from bytes (also used for initializers). `name` receives its name.
Result<Tensor> decode_tensor_proto(const uint8_t* data, size_t size, std::string* name = nullptr);
// Reads a .pb file holding a TensorProto, SequenceProto or OptionalProto (detected from the
// content; `kind_hint` "tensor"/"sequence"/"optional" or "" to detect), or a .npy file.
Result<Value> read_value_file(const std::string& path, const std::string& kind_hint = "");
// The same for bytes already in memory (fuzzing); external data resolves against `base_dir`,
// `what` names the source in errors.
Result<Value> decode_value(std::shared_ptr<MappedFile> bytes, const std::string& kind_hint = "",
                           const std::string& base_dir = "", const std::string& what = "<memory>");
// Writes a TensorProto .pb (raw_data) / a .npy file.
Status write_tensor_pb(const std::string& path, const Tensor& t, const std::string& name = "");
Status write_npy(const std::string& path, const Tensor& t);
Result<Tensor> read_npy(const std::string& path);
// Decodes .npy bytes already in memory (fuzzing); `what` names the source in errors.
Result<Tensor> decode_npy(const uint8_t* data, size_t size, const std::string& what = "<memory>");

}  // namespace kiln
