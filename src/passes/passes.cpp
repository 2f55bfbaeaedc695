#include "passes/passes.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "base/logging.h"
#include "ops/op.h"

namespace kiln {

namespace {

bool is_nondeterministic(const Node& n) {
  static const std::set<std::string> kRandom = {"RandomUniform", "RandomNormal", "RandomUniformLike",
                                                "RandomNormalLike", "Bernoulli", "Multinomial", "Dropout"};
  return kRandom.count(n.op_type) > 0;
}

bool has_subgraph(const Node& n) {
  for (auto& a : n.attrs)
    if (a.g || !a.graphs.empty()) return true;
  return false;
}

// Symbolic values of small int64 tensors (shape computations): what Shape(x) produced from x's
// dims, carried through Gather / Unsqueeze / Squeeze / Concat / Slice / Cast / Identity. A value
// is tracked only when every element is known exactly (a number or the same symbol).
using ShapeValues = std::unordered_map<std::string, std::vector<Dim>>;

void track_shape_values(const Graph& g, const Node& n, const std::unordered_map<std::string, TypeInfo>& types,
                        ShapeValues& sv) {
  if (!n.domain.empty() || n.outputs.empty() || n.outputs[0].empty()) return;
  auto value_of = [&](size_t i, std::vector<Dim>& out) -> bool {
    if (i >= n.inputs.size() || n.inputs[i].empty()) return false;
    auto it = sv.find(n.inputs[i]);
    if (it != sv.end()) {
      out = it->second;
      return true;
    }
    auto ci = g.initializers.find(n.inputs[i]);
    if (ci == g.initializers.end() || ci->second.rank() > 1 || ci->second.numel() > 64) return false;
    const Tensor& t = ci->second;
    if (t.dtype() != DataType::kInt64 && t.dtype() != DataType::kInt32) return false;
    out.clear();
    for (int64_t k = 0; k < t.numel(); ++k) out.push_back(Dim::of(t.get_i64(k)));
    return true;
  };
  auto is_scalar = [&](const std::string& v) {
    auto ci = g.initializers.find(v);
    if (ci != g.initializers.end()) return ci->second.rank() == 0;
    auto it = types.find(v);
    return it != types.end() && it->second.has_shape && it->second.dims.empty();
  };
  const std::string& op = n.op_type;
  const std::string& y = n.outputs[0];
  std::vector<Dim> a;
  if (op == "Shape") {
    auto it = n.inputs.empty() ? types.end() : types.find(n.inputs[0]);
    if (it == types.end() || !it->second.has_shape) return;
    int64_t r = static_cast<int64_t>(it->second.dims.size());
    int64_t start = n.attr_int("start", 0), end = n.attr_int("end", r);
    if (start < 0) start += r;
    if (end < 0) end += r;
    start = std::clamp<int64_t>(start, 0, r);
    end = std::clamp<int64_t>(end, 0, r);
    std::vector<Dim> d;
    for (int64_t k = start; k < end; ++k) d.push_back(it->second.dims[static_cast<size_t>(k)]);
    for (auto& x : d)
      if (!x.known() && x.param.empty()) return;  // an anonymous unknown cannot be tracked
    sv[y] = d;
  } else if (op == "Gather" && value_of(0, a) && n.attr_int("axis", 0) == 0) {
    std::vector<Dim> idx;
    if (!value_of(1, idx)) return;
    std::vector<Dim> d;
    for (auto& i : idx) {
      if (!i.known()) return;
      int64_t k = i.value < 0 ? i.value + static_cast<int64_t>(a.size()) : i.value;
      if (k < 0 || k >= static_cast<int64_t>(a.size())) return;
      d.push_back(a[static_cast<size_t>(k)]);
    }
    sv[y] = d;
  } else if ((op == "Unsqueeze" || op == "Squeeze" || op == "Identity" || op == "Cast") && value_of(0, a)) {
    if (op == "Cast" && n.attr_int("to", 0) != static_cast<int64_t>(DataType::kInt64)) return;
    sv[y] = a;
  } else if (op == "Concat" && n.attr_int("axis", 0) == 0) {
    std::vector<Dim> d;
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      std::vector<Dim> part;
      if (!value_of(i, part) || is_scalar(n.inputs[i])) return;
      d.insert(d.end(), part.begin(), part.end());
    }
    sv[y] = d;
  } else if (op == "Slice" && value_of(0, a)) {
    std::vector<Dim> st, en, ax, stp;
    if (!value_of(1, st) || !value_of(2, en) || st.size() != 1 || en.size() != 1 || !st[0].known() ||
        !en[0].known())
      return;
    if (n.has_input(3) && (!value_of(3, ax) || ax.size() != 1 || !ax[0].known() || (ax[0].value != 0 && ax[0].value != -1)))
      return;
    if (n.has_input(4) && (!value_of(4, stp) || stp.size() != 1 || !stp[0].known() || stp[0].value != 1)) return;
    int64_t len = static_cast<int64_t>(a.size());
    int64_t b = st[0].value < 0 ? st[0].value + len : st[0].value;
    int64_t e = en[0].value < 0 ? en[0].value + len : en[0].value;
    b = std::clamp<int64_t>(b, 0, len);
    e = std::clamp<int64_t>(e, 0, len);
    sv[y] = std::vector<Dim>(a.begin() + b, a.begin() + std::max(b, e));
  }
}

}  // namespace

Status infer_types(Graph& g, PassStats* stats) {
  std::unordered_map<std::string, TypeInfo> types;
  for (auto& v : g.inputs) types[v.name] = v.type;
  for (auto& v : g.value_info) types[v.name] = v.type;
  for (auto& [k, t] : g.initializers) types[k] = TypeInfo::tensor(t.dtype(), t.shape());
  ShapeValues shape_values;
  for (auto& n : g.nodes) {
    const OpDef* d = find_op(n.domain, n.op_type);
    // A node without outputs has nothing to infer (and InferFns may write output 0).
    if (!d || !d->infer || n.outputs.empty()) continue;
    track_shape_values(g, n, types, shape_values);
    InferContext ic{n, {}, {}, {}, {}};
    for (auto& in : n.inputs) {
      auto it = in.empty() ? types.end() : types.find(in);
      ic.input_types.push_back(it == types.end() ? TypeInfo{} : it->second);
      auto ci = in.empty() ? g.initializers.end() : g.initializers.find(in);
      ic.input_constants.push_back(ci == g.initializers.end() ? nullptr : &ci->second);
      auto si = in.empty() ? shape_values.end() : shape_values.find(in);
      ic.input_shape_values.push_back(si == shape_values.end() ? nullptr : &si->second);
    }
    ic.output_types.resize(n.outputs.size());
    Status st = d->infer(ic);
    if (!st.is_ok()) {
      // Inference is advisory for the reference backend; a real error surfaces when the node runs.
      KILN_LOG(kVerbose, "type inference: " << st.message());
      continue;
    }
    for (size_t i = 0; i < n.outputs.size(); ++i) {
      if (n.outputs[i].empty() || ic.output_types[i].kind == TypeInfo::Kind::kUnknown) continue;
      auto& slot = types[n.outputs[i]];
      const TypeInfo& nt = ic.output_types[i];
      if (slot.kind == TypeInfo::Kind::kUnknown || (!slot.has_shape && nt.has_shape)) {
        slot = nt;
        if (stats) stats->inferred++;
      } else if (slot.kind == TypeInfo::Kind::kTensor && nt.kind == TypeInfo::Kind::kTensor && slot.has_shape &&
                 nt.has_shape && slot.dims.size() == nt.dims.size()) {
        // A later round knows more (inputs folded to constants, refined producers): take every
        // dimension that became known or symbolic.
        bool changed = false;
        for (size_t d = 0; d < slot.dims.size(); ++d) {
          Dim& old = slot.dims[d];
          const Dim& now = nt.dims[d];
          if ((!old.known() && now.known()) || (!old.known() && old.param.empty() && !now.param.empty())) {
            old = now;
            changed = true;
          }
        }
        if (changed && stats) stats->inferred++;
      }
    }
  }
  std::unordered_set<std::string> io;
  for (auto& v : g.inputs) io.insert(v.name);
  std::vector<ValueInfo> vi;
  for (auto& n : g.nodes)
    for (auto& o : n.outputs) {
      if (o.empty()) continue;
      auto it = types.find(o);
      if (it != types.end() && it->second.kind != TypeInfo::Kind::kUnknown) vi.push_back({o, it->second});
    }
  g.value_info = std::move(vi);
  // Fill in graph output types the model left unspecified.
  for (auto& o : g.outputs) {
    if (o.type.kind != TypeInfo::Kind::kUnknown) continue;
    auto it = types.find(o.name);
    if (it != types.end()) o.type = it->second;
  }
  return Status::ok();
}

Status fold_constants(Graph& g, PassStats* stats, size_t max_bytes) {
  std::unordered_map<std::string, const ValueInfo*> known;
  for (auto& v : g.value_info) known[v.name] = &v;
  for (auto& v : g.inputs) known[v.name] = &v;
  std::unordered_set<std::string> graph_inputs;
  for (auto& v : g.inputs) graph_inputs.insert(v.name);
  std::vector<Node> kept;
  kept.reserve(g.nodes.size());
  for (auto& n : g.nodes) {
    bool foldable = !is_nondeterministic(n) && !has_subgraph(n);
    // Shape of a value whose shape is fully known is a constant even if the value is not.
    if (foldable && n.op_type == "Shape" && n.domain.empty() && n.has_input(0) &&
        !g.initializers.count(n.inputs[0])) {
      auto it = known.find(n.inputs[0]);
      if (it != known.end() && it->second->type.fully_known()) {
        Shape s = it->second->type.concrete_shape();
        int64_t r = static_cast<int64_t>(s.size());
        int64_t start = n.attr_int("start", 0), end = n.attr_int("end", r);
        if (start < 0) start += r;
        if (end < 0) end += r;
        start = std::clamp<int64_t>(start, 0, r);
        end = std::clamp<int64_t>(end, 0, r);
        std::vector<int64_t> dims(s.begin() + start, s.begin() + std::max(start, end));
        g.initializers[n.outputs[0]] = Tensor::from_vector<int64_t>({static_cast<int64_t>(dims.size())}, dims);
        if (stats) stats->folded++;
        continue;
      }
    }
    std::vector<Value> ins;
    for (auto& in : n.inputs) {
      if (in.empty()) { ins.emplace_back(); continue; }
      auto it = g.initializers.find(in);
      if (it == g.initializers.end() || graph_inputs.count(in)) { foldable = false; break; }
      ins.emplace_back(it->second);
    }
    const OpDef* d = foldable ? find_op(n.domain, n.op_type) : nullptr;
    if (d) {
      std::vector<Value> outs(n.outputs.size());
      OpContext ctx{n, nullptr, 0};
      Status st = d->eval(ctx, ins, outs);
      bool ok = st.is_ok();
      for (size_t i = 0; ok && i < outs.size(); ++i) {
        if (n.outputs[i].empty()) continue;
        if (!outs[i].is_tensor() || outs[i].tensor.nbytes() > max_bytes) ok = false;
      }
      if (ok) {
        for (size_t i = 0; i < outs.size(); ++i)
          if (!n.outputs[i].empty()) g.initializers[n.outputs[i]] = outs[i].tensor;
        if (stats) stats->folded++;
        continue;
      }
    }
    kept.push_back(std::move(n));
  }
  g.nodes = std::move(kept);
  return Status::ok();
}

Status eliminate_dead_code(Graph& g, PassStats* stats) {
  std::unordered_set<std::string> live;
  for (auto& o : g.outputs) live.insert(o.name);
  std::vector<bool> keep(g.nodes.size(), false);
  for (size_t i = g.nodes.size(); i-- > 0;) {
    const Node& n = g.nodes[i];
    bool used = false;
    for (auto& o : n.outputs)
      if (!o.empty() && live.count(o)) used = true;
    if (!used) continue;
    keep[i] = true;
    for (auto& in : n.inputs)
      if (!in.empty()) live.insert(in);
    for (auto& a : n.attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& sg : a.graphs) subs.push_back(sg.get());
      for (auto* s : subs) {
        std::unordered_set<std::string> refs;
        collect_outer_refs(*s, refs);
        live.insert(refs.begin(), refs.end());
      }
    }
  }
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (keep[i]) kept.push_back(std::move(g.nodes[i]));
    else if (stats) stats->eliminated++;
  }
  g.nodes = std::move(kept);
  std::unordered_set<std::string> inputs;
  for (auto& v : g.inputs) inputs.insert(v.name);
  for (auto it = g.initializers.begin(); it != g.initializers.end();) {
    if (!live.count(it->first) && !inputs.count(it->first)) it = g.initializers.erase(it);
    else ++it;
  }
  return Status::ok();
}

namespace {

bool cse_candidate(const Node& n) {
  static const std::unordered_set<std::string> kRandom = {
      "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
      "Bernoulli", "Dropout"};
  if (n.outputs.empty() || kRandom.count(n.op_type)) return false;
  for (auto& a : n.attrs) {
    switch (a.kind) {
      case Attribute::Kind::kFloat: case Attribute::Kind::kInt: case Attribute::Kind::kString:
      case Attribute::Kind::kFloats: case Attribute::Kind::kInts: case Attribute::Kind::kStrings:
        break;
      default:
        return false;  // tensors, subgraphs, types: not compared
    }
  }
  return true;
}

std::string cse_key(const Node& n) {
  std::string k = n.domain + '\x1f' + n.op_type + '\x1f';
  for (auto& in : n.inputs) k += in + '\x1e';
  std::vector<const Attribute*> attrs;
  for (auto& a : n.attrs) attrs.push_back(&a);
  std::sort(attrs.begin(), attrs.end(),
            [](const Attribute* x, const Attribute* y) { return x->name < y->name; });
  char buf[40];
  for (const Attribute* a : attrs) {
    k += '\x1f' + a->name + '=' + std::to_string(static_cast<int>(a->kind)) + ':';
    std::snprintf(buf, sizeof(buf), "%a", static_cast<double>(a->f));
    k += std::to_string(a->i) + ',' + buf + ',' + a->s;
    for (float f : a->floats) {
      std::snprintf(buf, sizeof(buf), ",%a", static_cast<double>(f));
      k += buf;
    }
    for (int64_t v : a->ints) k += ',' + std::to_string(v);
    for (auto& str : a->strings) k += '\x1e' + str;
  }
  return k;
}

}  // namespace

Status eliminate_common_subexpressions(Graph& g, PassStats* stats) {
  std::unordered_set<std::string> keep_names;  // graph outputs and names subgraphs read
  for (auto& o : g.outputs) keep_names.insert(o.name);
  for (auto& n : g.nodes)
    for (auto& a : n.attrs) {
      if (a.g) collect_outer_refs(*a.g, keep_names);
      for (auto& sg : a.graphs) collect_outer_refs(*sg, keep_names);
    }
  std::unordered_map<std::string, std::string> rename;
  // Small initializers with equal type and bytes are one value (exporters emit one constant per
  // layer: the same -inf, the same scalar): read the first of each, so the nodes using them match.
  {
    std::unordered_set<std::string> graph_inputs;
    for (auto& v : g.inputs) graph_inputs.insert(v.name);
    std::map<std::string, std::string> by_value;  // ordered: deterministic canonical names
    std::vector<std::string> names;
    for (auto& [name, t] : g.initializers) names.push_back(name);
    std::sort(names.begin(), names.end());
    for (const std::string& name : names) {
      const Tensor& t = g.initializers.at(name);
      if (graph_inputs.count(name) || t.nbytes() > 256 || t.device() != Device::kHost ||
          t.dtype() == DataType::kString)
        continue;  // strings: the bytes are std::string objects, not their text
      std::string key = std::to_string(static_cast<int>(t.dtype())) + ':';
      for (int64_t d : t.shape()) key += std::to_string(d) + ',';
      key.append(static_cast<const char*>(t.raw_data()), t.nbytes());
      auto [it, inserted] = by_value.emplace(std::move(key), name);
      if (!inserted) rename[name] = it->second;
    }
  }
  std::unordered_map<std::string, size_t> seen;
  std::vector<bool> dead(g.nodes.size(), false);
  bool any = false;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    Node& n = g.nodes[i];
    for (auto& in : n.inputs)
      if (auto it = rename.find(in); it != rename.end()) in = it->second;
    if (!cse_candidate(n)) continue;
    auto [it, inserted] = seen.emplace(cse_key(n), i);
    if (inserted) continue;
    const Node& first = g.nodes[it->second];
    bool ok = first.outputs.size() == n.outputs.size();
    for (size_t k = 0; ok && k < n.outputs.size(); ++k) {
      if (n.outputs[k].empty()) continue;
      ok = !first.outputs[k].empty() && !keep_names.count(n.outputs[k]);
    }
    if (!ok) continue;
    for (size_t k = 0; k < n.outputs.size(); ++k)
      if (!n.outputs[k].empty()) rename[n.outputs[k]] = first.outputs[k];
    dead[i] = true;
    any = true;
    if (stats) stats->eliminated++;
  }
  if (!any) return Status::ok();
  std::vector<Node> kept;
  kept.reserve(g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (!dead[i]) kept.push_back(std::move(g.nodes[i]));
  g.nodes = std::move(kept);
  return Status::ok();
}

Status relax_batch_dim(Graph& g) {
  for (auto* list : {&g.inputs, &g.outputs}) {
    for (auto& v : *list) {
      if (v.type.kind == TypeInfo::Kind::kTensor && v.type.has_shape && !v.type.dims.empty())
        v.type.dims[0] = Dim::sym("batch");
    }
  }
  g.value_info.clear();  // recomputed by infer_types with the symbolic batch
  return Status::ok();
}

}  // namespace kiln
