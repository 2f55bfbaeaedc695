#include "passes/passes.h"

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

}  // namespace

Status infer_types(Graph& g, PassStats* stats) {
  std::unordered_map<std::string, TypeInfo> types;
  for (auto& v : g.inputs) types[v.name] = v.type;
  for (auto& v : g.value_info) types[v.name] = v.type;
  for (auto& [k, t] : g.initializers) types[k] = TypeInfo::tensor(t.dtype(), t.shape());
  for (auto& n : g.nodes) {
    const OpDef* d = find_op(n.domain, n.op_type);
    // A node without outputs has nothing to infer (and InferFns may write output 0).
    if (!d || !d->infer || n.outputs.empty()) continue;
    InferContext ic{n, {}, {}, {}};
    for (auto& in : n.inputs) {
      auto it = in.empty() ? types.end() : types.find(in);
      ic.input_types.push_back(it == types.end() ? TypeInfo{} : it->second);
      auto ci = in.empty() ? g.initializers.end() : g.initializers.find(in);
      ic.input_constants.push_back(ci == g.initializers.end() ? nullptr : &ci->second);
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
