#include "onnx/importer.h"

#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "onnx/canonicalize.h"
#include "onnx/proto.h"
#include "ops/op.h"

namespace kiln {

namespace {

using onnx::AttrMsg;
using onnx::FunctionMsg;
using onnx::GraphMsg;
using onnx::ModelMsg;
using onnx::NodeMsg;
using onnx::OpsetMap;

constexpr int kMaxFunctionDepth = 32;
constexpr int kMaxGraphDepth = 64;

using NameMap = std::unordered_map<std::string, std::string>;

// Renames references to `names` inside a subgraph of an inlined function body, except where a
// local definition shadows them.
void rename_in_graph(GraphMsg& g, const NameMap& names) {
  std::unordered_set<std::string> local;
  for (auto& i : g.inputs) local.insert(i.name);
  for (auto& t : g.initializers) local.insert(t.name);
  for (auto& n : g.nodes)
    for (auto& o : n.outputs) local.insert(o);
  auto ren = [&](std::string& s) {
    if (s.empty() || local.count(s)) return;
    auto it = names.find(s);
    if (it != names.end()) s = it->second;
  };
  for (auto& n : g.nodes) {
    for (auto& i : n.inputs) ren(i);
    for (auto& a : n.attrs)
      for (auto& sg : a.graphs) {
        auto copy = std::make_shared<GraphMsg>(*sg);
        rename_in_graph(*copy, names);
        sg = std::move(copy);
      }
  }
  for (auto& o : g.outputs) ren(o.name);
}

// Replaces attribute references (ref_attr_name) by the caller's attributes or the function's
// defaults; unresolved references are dropped (the attribute was optional).
void substitute_refs(std::vector<AttrMsg>& attrs, const NodeMsg& caller, const FunctionMsg& fn) {
  std::vector<AttrMsg> out;
  for (auto& a : attrs) {
    if (a.ref_attr_name.empty()) {
      AttrMsg b = a;
      for (auto& sg : b.graphs) {
        auto copy = std::make_shared<GraphMsg>(*sg);
        for (auto& n : copy->nodes) substitute_refs(n.attrs, caller, fn);
        sg = std::move(copy);
      }
      out.push_back(std::move(b));
      continue;
    }
    const AttrMsg* src = nullptr;
    for (auto& c : caller.attrs)
      if (c.name == a.ref_attr_name) src = &c;
    if (!src)
      for (auto& d : fn.attribute_defaults)
        if (d.name == a.ref_attr_name) src = &d;
    if (!src) continue;
    AttrMsg b = *src;
    b.name = a.name;
    b.ref_attr_name.clear();
    out.push_back(std::move(b));
  }
  attrs = std::move(out);
}

struct ExpandedNode {
  NodeMsg msg;
  const OpsetMap* opsets;
};

class Importer {
 public:
  Importer(const ModelMsg& m, onnx::TensorSource& src) : model_(m), src_(src) {
    for (auto& f : m.functions) {
      funcs_[{f.domain, f.name, f.overload}] = &f;
      OpsetMap ops = m.opsets;
      for (auto& [d, v] : f.opsets) ops[d] = v;
      fn_opsets_[&f] = std::move(ops);
    }
  }

  Status import_graph(const GraphMsg& gm, const OpsetMap& opsets,
                      const std::vector<std::string>& outer, Graph& g, int depth);

 private:
  Status expand(const NodeMsg& n, const OpsetMap* opsets, int depth,
                std::vector<ExpandedNode>& out);
  Result<Attribute> convert_attr(const AttrMsg& a, const Node& node, const OpsetMap& opsets,
                                 const std::vector<std::string>& scope, int depth);

  const ModelMsg& model_;
  onnx::TensorSource& src_;
  std::map<std::tuple<std::string, std::string, std::string>, const FunctionMsg*> funcs_;
  std::map<const FunctionMsg*, OpsetMap> fn_opsets_;
  int fn_counter_ = 0;
};

Status Importer::expand(const NodeMsg& n, const OpsetMap* opsets, int depth,
                        std::vector<ExpandedNode>& out) {
  auto it = funcs_.find({n.domain, n.op_type, n.overload});
  if (it == funcs_.end()) {
    out.push_back({n, opsets});
    return Status::ok();
  }
  const FunctionMsg& fn = *it->second;
  std::string who = "node '" + n.name + "' (" + n.op_type + ")";
  if (depth >= kMaxFunctionDepth)
    return invalid_model(who + ": model-local function calls nest deeper than " +
                         std::to_string(kMaxFunctionDepth) + " levels (recursive function '" +
                         fn.name + "'?)");
  if (n.inputs.size() > fn.inputs.size() || n.outputs.size() > fn.outputs.size())
    return invalid_model(who + ": " + std::to_string(n.inputs.size()) + " inputs / " +
                         std::to_string(n.outputs.size()) + " outputs, function '" + fn.name +
                         "' declares " + std::to_string(fn.inputs.size()) + " / " +
                         std::to_string(fn.outputs.size()));
  int call = fn_counter_++;
  std::string prefix = (n.name.empty() ? n.op_type : n.name) + "__" + std::to_string(call) + "__";
  NameMap names;
  for (size_t i = 0; i < fn.inputs.size(); ++i)
    names[fn.inputs[i]] = i < n.inputs.size() ? n.inputs[i] : std::string();
  for (size_t i = 0; i < fn.outputs.size(); ++i)
    names[fn.outputs[i]] =
        i < n.outputs.size() && !n.outputs[i].empty() ? n.outputs[i] : prefix + fn.outputs[i];
  for (auto& b : fn.nodes)
    for (auto& o : b.outputs)
      if (!o.empty() && !names.count(o)) names[o] = prefix + o;
  const OpsetMap* fops = &fn_opsets_[&fn];
  for (auto& b : fn.nodes) {
    NodeMsg c = b;
    c.name = prefix + (b.name.empty() ? b.op_type : b.name);
    for (auto& i : c.inputs) {
      if (i.empty()) continue;
      auto r = names.find(i);
      if (r == names.end())
        return invalid_model(who + ": function '" + fn.name + "' body uses undefined value '" + i +
                             "'");
      i = r->second;
    }
    for (auto& o : c.outputs)
      if (!o.empty()) o = names[o];
    substitute_refs(c.attrs, n, fn);
    for (auto& a : c.attrs)
      for (auto& sg : a.graphs) {
        auto copy = std::make_shared<GraphMsg>(*sg);
        rename_in_graph(*copy, names);
        sg = std::move(copy);
      }
    KILN_RETURN_IF_ERROR(expand(c, fops, depth + 1, out));
  }
  return Status::ok();
}

Result<Attribute> Importer::convert_attr(const AttrMsg& a, const Node& node, const OpsetMap& opsets,
                                         const std::vector<std::string>& scope, int depth) {
  using K = Attribute::Kind;
  std::string where = node.where() + ": attribute '" + a.name + "'";
  if (!a.ref_attr_name.empty())
    return invalid_model(where + " refers to function attribute '" + a.ref_attr_name +
                         "' outside a function body");
  int type = a.type;
  if (type == 0) {
    if (a.has_f)
      type = 1;
    else if (a.has_i)
      type = 2;
    else if (a.has_s)
      type = 3;
    else if (a.has_t)
      type = 4;
    else if (a.has_g)
      type = 5;
    else if (a.has_sparse)
      type = 11;
    else if (a.has_tp)
      type = 13;
    else if (!a.floats.empty())
      type = 6;
    else if (!a.ints.empty())
      type = 7;
    else if (!a.strings.empty())
      type = 8;
    else if (!a.tensors.empty())
      type = 9;
    else if (!a.graphs.empty())
      type = 10;
    else if (!a.sparse.empty())
      type = 12;
    else if (!a.types.empty())
      type = 14;
    else
      return invalid_model(where + " has no type and no value");
  }
  Attribute r;
  r.name = a.name;
  auto missing = [&](const char* what) {
    return invalid_model(where + " has type " + what + " but no value");
  };
  auto graph = [&](const GraphMsg& gm) -> Result<std::shared_ptr<Graph>> {
    auto g = std::make_shared<Graph>();
    Status st = import_graph(gm, opsets, scope, *g, depth + 1);
    if (!st.is_ok()) return st.with_context(where);
    return g;
  };
  switch (type) {
    case 1:
      r.kind = K::kFloat;
      r.f = a.f;
      break;
    case 2:
      r.kind = K::kInt;
      r.i = a.i;
      break;
    case 3:
      r.kind = K::kString;
      r.s = a.s;
      break;
    case 4:
    case 11: {
      r.kind = K::kTensor;
      if (a.has_t) {
        auto t = onnx::make_tensor(a.tensors[0], src_);
        if (!t.is_ok()) return t.status().with_context(where);
        r.t = std::move(*t);
      } else if (a.has_sparse) {
        auto t = onnx::make_sparse(a.sparse[0], src_);
        if (!t.is_ok()) return t.status().with_context(where);
        r.t = std::move(*t);
      } else {
        return missing(type == 4 ? "TENSOR" : "SPARSE_TENSOR");
      }
      break;
    }
    case 5: {
      r.kind = K::kGraph;
      if (!a.has_g) return missing("GRAPH");
      KILN_ASSIGN_OR_RETURN(r.g, graph(*a.graphs[0]));
      break;
    }
    case 6:
      r.kind = K::kFloats;
      r.floats = a.floats;
      break;
    case 7:
      r.kind = K::kInts;
      for (uint64_t v : a.ints) r.ints.push_back(static_cast<int64_t>(v));
      break;
    case 8:
      r.kind = K::kStrings;
      r.strings = a.strings;
      break;
    case 9:
    case 12: {
      r.kind = K::kTensors;
      for (size_t i = a.has_t ? 1 : 0; i < a.tensors.size(); ++i) {
        auto t = onnx::make_tensor(a.tensors[i], src_);
        if (!t.is_ok()) return t.status().with_context(where);
        r.tensors.push_back(std::move(*t));
      }
      for (size_t i = a.has_sparse ? 1 : 0; i < a.sparse.size(); ++i) {
        auto t = onnx::make_sparse(a.sparse[i], src_);
        if (!t.is_ok()) return t.status().with_context(where);
        r.tensors.push_back(std::move(*t));
      }
      break;
    }
    case 10:
      r.kind = K::kGraphs;
      for (size_t i = a.has_g ? 1 : 0; i < a.graphs.size(); ++i) {
        KILN_ASSIGN_OR_RETURN(auto g, graph(*a.graphs[i]));
        r.graphs.push_back(std::move(g));
      }
      break;
    case 13:
      r.kind = K::kTypeProto;
      if (!a.has_tp) return missing("TYPE_PROTO");
      r.types.push_back(a.types[0]);
      break;
    case 14:
      r.kind = K::kTypeProtos;
      for (size_t i = a.has_tp ? 1 : 0; i < a.types.size(); ++i) r.types.push_back(a.types[i]);
      break;
    default:
      return invalid_model(where + " has unknown type " + std::to_string(type));
  }
  return r;
}

Status Importer::import_graph(const GraphMsg& gm, const OpsetMap& opsets,
                              const std::vector<std::string>& outer, Graph& g, int depth) {
  if (depth > kMaxGraphDepth)
    return invalid_model("subgraphs nest deeper than " + std::to_string(kMaxGraphDepth) +
                         " levels");
  g.name = gm.name;
  std::string gwhere = "graph '" + gm.name + "'";
  for (auto& t : gm.initializers) {
    if (g.initializers.count(t.name))
      return invalid_model(gwhere + ": initializer '" + t.name + "' is defined more than once");
    auto r = onnx::make_tensor(t, src_);
    if (!r.is_ok()) return r.status().with_context(gwhere + " initializer");
    g.initializers[t.name] = std::move(*r);
  }
  for (auto& s : gm.sparse_initializers) {
    const std::string& name = s.values.name;
    if (g.initializers.count(name))
      return invalid_model(gwhere + ": initializer '" + name + "' is defined more than once");
    auto r = onnx::make_sparse(s, src_);
    if (!r.is_ok()) return r.status().with_context(gwhere + " sparse initializer '" + name + "'");
    g.initializers[name] = std::move(*r);
  }
  for (auto& v : gm.inputs)
    if (!g.initializers.count(v.name)) g.inputs.push_back({v.name, v.type});
  for (auto& v : gm.outputs) g.outputs.push_back({v.name, v.type});
  for (auto& v : gm.value_info) g.value_info.push_back({v.name, v.type});

  std::vector<ExpandedNode> nodes;
  for (auto& n : gm.nodes) KILN_RETURN_IF_ERROR(expand(n, &opsets, 0, nodes));

  // Names visible to subgraphs of this graph's nodes.
  std::vector<std::string> scope = outer;
  for (auto& v : gm.inputs) scope.push_back(v.name);
  for (auto& [k, v] : g.initializers) scope.push_back(k);
  for (auto& e : nodes)
    for (auto& o : e.msg.outputs)
      if (!o.empty()) scope.push_back(o);

  std::unordered_set<std::string> used_names;
  for (auto& e : nodes)
    if (!e.msg.name.empty()) used_names.insert(e.msg.name);
  g.nodes.reserve(nodes.size());
  for (size_t idx = 0; idx < nodes.size(); ++idx) {
    NodeMsg& m = nodes[idx].msg;
    Node n;
    n.name = m.name;
    if (n.name.empty()) {
      std::string base = m.op_type + "_" + std::to_string(idx);
      n.name = base;
      for (int k = 1; used_names.count(n.name); ++k) n.name = base + "_" + std::to_string(k);
      used_names.insert(n.name);
    }
    n.op_type = m.op_type;
    n.domain = m.domain;
    auto op = nodes[idx].opsets->find(m.domain);
    n.opset = op != nodes[idx].opsets->end() ? static_cast<int>(op->second) : 1;
    n.inputs = std::move(m.inputs);
    n.outputs = std::move(m.outputs);
    for (auto& a : m.attrs) {
      KILN_ASSIGN_OR_RETURN(Attribute at, convert_attr(a, n, *nodes[idx].opsets, scope, depth));
      n.set_attr(std::move(at));
    }
    g.nodes.push_back(std::move(n));
  }
  CanonContext ctx{g};
  for (auto& n : g.nodes) KILN_RETURN_IF_ERROR(canonicalize_node(n, n.opset, ctx));
  Status st = g.topo_sort(outer);
  if (!st.is_ok()) return st.with_context(gwhere);
  return Status::ok();
}

void collect_unsupported(const Graph& g, std::vector<std::pair<std::string, std::string>>& found,
                         std::set<std::string>& seen) {
  for (auto& n : g.nodes) {
    if (!find_op(n.domain, n.op_type)) {
      std::string key = n.domain.empty() ? n.op_type : n.domain + "." + n.op_type;
      if (seen.insert(key).second) found.push_back({key, n.name});
    }
    for (auto& a : n.attrs) {
      if (a.g) collect_unsupported(*a.g, found, seen);
      for (auto& sg : a.graphs) collect_unsupported(*sg, found, seen);
    }
  }
}

Result<Model> import_impl(std::shared_ptr<MappedFile> file, const std::string& base_dir,
                          const ImportOptions& opts) {
  ModelMsg mm;
  KILN_RETURN_IF_ERROR(onnx::parse_model(file->data(), file->size(), mm));
  onnx::TensorSource src;
  src.base = file->data();
  src.size = file->size();
  src.keepalive = file;
  src.base_dir = base_dir;
  Model model;
  model.ir_version = mm.ir_version;
  model.opsets = mm.opsets;
  if (model.opsets.empty()) model.opsets[""] = 1;  // pre-IR3 models: opset 1 implied
  model.producer_name = mm.producer_name;
  model.producer_version = mm.producer_version;
  model.domain = mm.domain;
  model.doc_string = mm.doc_string;
  model.model_version = mm.model_version;
  model.metadata = mm.metadata;
  mm.opsets = model.opsets;
  Importer imp(mm, src);
  KILN_RETURN_IF_ERROR(imp.import_graph(mm.graph, mm.opsets, {}, model.graph, 0));
  KILN_RETURN_IF_ERROR(verify_graph(model.graph));
  for (auto& [loc, f] : src.ext_files) model.external_files.push_back(f->path());
  if (opts.check_ops) {
    std::vector<std::pair<std::string, std::string>> found;
    std::set<std::string> seen;
    collect_unsupported(model.graph, found, seen);
    if (!found.empty()) {
      std::string msg = "model uses " + std::to_string(found.size()) + " unsupported operator" +
                        (found.size() == 1 ? "" : "s") + ": ";
      for (size_t i = 0; i < found.size(); ++i) {
        if (i) msg += ", ";
        msg += found[i].first + " (node '" + found[i].second + "')";
      }
      return unsupported(msg);
    }
  }
  return model;
}

}  // namespace

Result<Model> import_onnx_file(const std::string& path, const ImportOptions& opts) {
  auto f = MappedFile::open(path);
  if (!f.is_ok()) return f.status();
  std::string base = opts.base_dir.empty() ? dirname_of(path) : opts.base_dir;
  auto r = import_impl(*f, base, opts);
  if (!r.is_ok() && r.status().code() == StatusCode::kInvalidModel)
    return r.status().with_context("'" + path + "'");
  return r;
}

Result<Model> import_onnx_bytes(std::shared_ptr<MappedFile> bytes, const ImportOptions& opts) {
  if (!bytes) return invalid_argument("import_onnx_bytes: no buffer");
  return import_impl(std::move(bytes), opts.base_dir, opts);
}

}  // namespace kiln
