// The IR: a graph of nodes over named values. One canonical form per op: the importer maps
// every (op_type, opset) to it, so nothing below src/onnx knows about opsets.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include "base/status.h"
#include "ir/tensor.h"

namespace kiln {

struct Graph;

// A dimension: known (value >= 0), symbolic (param non-empty) or unknown (value < 0, no param).
struct Dim {
  int64_t value = -1;
  std::string param;
  bool known() const { return value >= 0; }
  static Dim of(int64_t v) { Dim d; d.value = v; return d; }
  static Dim sym(std::string p) { Dim d; d.param = std::move(p); return d; }
};

struct TypeInfo {
  enum class Kind { kUnknown, kTensor, kSequence, kOptional, kMap };
  Kind kind = Kind::kUnknown;
  DataType dtype = DataType::kUndefined;  // tensor element type (kTensor)
  bool has_shape = false;                 // rank known
  std::vector<Dim> dims;
  std::shared_ptr<TypeInfo> elem;         // kSequence / kOptional element type

  static TypeInfo tensor(DataType dt) { TypeInfo t; t.kind = Kind::kTensor; t.dtype = dt; return t; }
  static TypeInfo tensor(DataType dt, const Shape& s);
  bool fully_known() const;  // tensor with every dim known
  Shape concrete_shape() const;  // unknown dims as -1
  std::string to_string() const;  // "float32[N,3,224,224]"
};

struct Attribute {
  enum class Kind { kUndefined, kFloat, kInt, kString, kTensor, kGraph, kFloats, kInts, kStrings,
                    kTensors, kGraphs, kTypeProto, kTypeProtos };
  std::string name;
  Kind kind = Kind::kUndefined;
  float f = 0;
  int64_t i = 0;
  std::string s;
  Tensor t;
  std::shared_ptr<Graph> g;
  std::vector<float> floats;
  std::vector<int64_t> ints;
  std::vector<std::string> strings;
  std::vector<Tensor> tensors;
  std::vector<std::shared_ptr<Graph>> graphs;
  std::vector<TypeInfo> types;  // kTypeProto (one) / kTypeProtos
};
const char* attr_kind_name(Attribute::Kind k);

struct Node {
  std::string name;
  std::string op_type;  // canonical op name, e.g. "Conv"
  std::string domain;   // "" = ai.onnx; "ai.onnx.ml"; ...
  int opset = 0;        // opset of the domain at import; for messages only
  std::vector<std::string> inputs;   // "" = omitted optional input
  std::vector<std::string> outputs;  // "" = omitted optional output
  std::vector<Attribute> attrs;
  std::string kernel;  // implementation chosen by the builder, e.g. "cpu.ref.Conv"

  const Attribute* attr(std::string_view n) const;
  Attribute* attr(std::string_view n);
  bool has_attr(std::string_view n) const { return attr(n) != nullptr; }
  int64_t attr_int(std::string_view n, int64_t def) const;
  float attr_float(std::string_view n, float def) const;
  std::string attr_string(std::string_view n, const std::string& def = "") const;
  std::vector<int64_t> attr_ints(std::string_view n, std::vector<int64_t> def = {}) const;
  std::vector<float> attr_floats(std::string_view n, std::vector<float> def = {}) const;
  std::vector<std::string> attr_strings(std::string_view n) const;
  const Tensor* attr_tensor(std::string_view n) const;
  const Graph* attr_graph(std::string_view n) const;
  void set_attr(Attribute a);  // replaces one with the same name
  void remove_attr(std::string_view n);
  // "node 'conv_1' (Conv, opset 11)" for error messages.
  std::string where() const;
  size_t num_inputs() const { return inputs.size(); }
  bool has_input(size_t i) const { return i < inputs.size() && !inputs[i].empty(); }
};

struct ValueInfo {
  std::string name;
  TypeInfo type;
};

struct Graph {
  std::string name;
  std::vector<ValueInfo> inputs;   // graph inputs that are not initializers
  std::vector<ValueInfo> outputs;
  std::vector<ValueInfo> value_info;  // known types of intermediate values
  std::vector<Node> nodes;            // topological order once verified
  std::map<std::string, Tensor> initializers;

  const ValueInfo* find_value_info(std::string_view n) const;
  // Sorts nodes topologically; errors on cycles or values nobody produces. `outer` holds names
  // visible from enclosing graphs (for subgraphs).
  Status topo_sort(const std::vector<std::string>& outer = {});
};

struct Model {
  Graph graph;
  int64_t ir_version = 0;
  std::map<std::string, int64_t> opsets;  // domain -> version ("" = ai.onnx)
  std::string producer_name, producer_version, domain, doc_string;
  int64_t model_version = 0;
  std::vector<std::pair<std::string, std::string>> metadata;
  // External-data files the model's tensors were read from (resolved paths), for cache keys.
  std::vector<std::string> external_files;
};

// Structural checks: unique value names, every input defined (graph input, initializer,
// earlier node output or outer scope), known ops, subgraphs recursively.
Status verify_graph(const Graph& g, const std::vector<std::string>& outer = {});

// Names a (sub)graph reads from enclosing scopes: used but not defined inside it.
void collect_outer_refs(const Graph& g, std::unordered_set<std::string>& refs);

// Human-readable dump of a graph (for `kiln inspect --nodes` and debugging).
std::string print_graph(const Graph& g, int indent = 0);

// Counts of parameters (initializer elements) and nodes by op, subgraphs included.
int64_t count_parameters(const Graph& g);
void op_histogram(const Graph& g, std::map<std::string, int>& hist);

}  // namespace kiln
