// ONNX protobuf messages as parsed from the wire (before import to the IR). Tensor payloads
// stay as offsets into the source buffer until materialized (zero-copy when possible).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/file.h"
#include "base/status.h"
#include "ir/graph.h"
#include "onnx/wire.h"

namespace kiln::onnx {

struct TensorMsg {
  std::string name;
  std::vector<int64_t> dims;
  int32_t data_type = 0;
  size_t off = 0;  // byte offset of the message (for errors)
  bool has_raw = false;
  size_t raw_start = 0, raw_len = 0;  // into the source buffer
  std::vector<float> float_data;
  std::vector<uint64_t> int32_data, int64_data, uint64_data;  // raw varints
  std::vector<double> double_data;
  std::vector<std::string> string_data;
  int32_t data_location = 0;  // 1 = EXTERNAL
  std::vector<std::pair<std::string, std::string>> external_data;
};

struct SparseTensorMsg {
  TensorMsg values, indices;
  std::vector<int64_t> dims;
  size_t off = 0;
};

struct GraphMsg;

struct AttrMsg {
  std::string name, ref_attr_name;
  int32_t type = 0;  // AttributeProto.AttributeType; 0: infer from the field set
  size_t off = 0;
  float f = 0;
  int64_t i = 0;
  std::string s;
  std::vector<float> floats;
  std::vector<uint64_t> ints;
  std::vector<std::string> strings;
  std::vector<TensorMsg> tensors;                 // t (one) or tensors
  std::vector<SparseTensorMsg> sparse;            // sparse_tensor (one) or sparse_tensors
  std::vector<std::shared_ptr<GraphMsg>> graphs;  // g (one) or graphs
  std::vector<TypeInfo> types;                    // tp (one) or tps
  bool has_f = false, has_i = false, has_s = false, has_t = false, has_g = false, has_tp = false,
       has_sparse = false;
};

struct NodeMsg {
  std::string name, op_type, domain, overload;
  std::vector<std::string> inputs, outputs;
  std::vector<AttrMsg> attrs;
  size_t off = 0;
};

struct ValueInfoMsg {
  std::string name;
  TypeInfo type;
};

struct GraphMsg {
  std::string name;
  std::vector<NodeMsg> nodes;
  std::vector<TensorMsg> initializers;
  std::vector<SparseTensorMsg> sparse_initializers;
  std::vector<ValueInfoMsg> inputs, outputs, value_info;
};

using OpsetMap = std::map<std::string, int64_t>;

struct FunctionMsg {
  std::string name, domain, overload;
  std::vector<std::string> inputs, outputs, attribute_names;
  std::vector<AttrMsg> attribute_defaults;
  std::vector<NodeMsg> nodes;
  OpsetMap opsets;
};

struct ModelMsg {
  int64_t ir_version = 0, model_version = 0;
  std::string producer_name, producer_version, domain, doc_string;
  OpsetMap opsets;
  bool has_graph = false;
  GraphMsg graph;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<FunctionMsg> functions;
};

// "ai.onnx" -> "".
std::string normalize_domain(const std::string& d);

Status parse_model(const uint8_t* base, size_t size, ModelMsg& m);
Status parse_tensor(wire::Reader r, TensorMsg& t);
Status parse_sparse(wire::Reader r, SparseTensorMsg& s);
Status parse_type(wire::Reader r, TypeInfo& t, int depth);

// Where tensor payloads come from: the buffer that holds the messages (kept alive by
// `keepalive`) and, for external data, files under `base_dir`.
struct TensorSource {
  const uint8_t* base = nullptr;
  size_t size = 0;
  std::shared_ptr<const void> keepalive;  // null: always copy
  std::string base_dir;
  std::map<std::string, std::shared_ptr<MappedFile>> ext_files;
};

Result<Tensor> make_tensor(const TensorMsg& t, TensorSource& src);
Result<Tensor> make_sparse(const SparseTensorMsg& s, TensorSource& src);

}  // namespace kiln::onnx
