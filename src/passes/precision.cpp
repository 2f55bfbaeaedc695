// Reduced-precision conversion (see passes.h): float32 -> float16/bfloat16 with Casts at the
// graph edges and around the nodes kept in float32.
#include <algorithm>
#include <set>
#include <unordered_map>

#include "passes/passes.h"
#include "passes/uses.h"

namespace kiln {

const std::vector<std::string>& default_fp32_ops() {
  // Outputs that overflow fp16's 65504 or lose most bits: exponentials, logs, powers and
  // reductions of squares/exponentials. Softmax / normalizations / means run in fp32 inside
  // their fp16 kernels, so they need no casts.
  static const std::vector<std::string> ops = {"Exp", "Log", "Pow", "ReduceSumSquare", "ReduceL2",
                                               "ReduceLogSum", "ReduceLogSumExp", "Softplus", "ReduceProd"};
  return ops;
}

namespace {

bool listed(const std::vector<std::string>& l, const Node& n) {
  return std::find(l.begin(), l.end(), n.name) != l.end() || std::find(l.begin(), l.end(), n.op_type) != l.end();
}

// Inputs that ONNX types as float32 regardless of the data type (scales / roi).
bool must_stay_f32(const Node& n, size_t i) {
  if (!n.domain.empty()) return false;
  if (n.op_type == "Resize") return i == 1 || i == 2;
  if (n.op_type == "Upsample") return i == 1;
  return false;
}

Node make_cast(const std::string& in, const std::string& out, DataType to, const std::string& name) {
  Node c;
  c.name = name;
  c.op_type = "Cast";
  c.opset = 21;
  c.inputs = {in};
  c.outputs = {out};
  Attribute a;
  a.name = "to";
  a.kind = Attribute::Kind::kInt;
  a.i = static_cast<int64_t>(to);
  c.set_attr(a);
  return c;
}

Result<Tensor> convert_tensor(const Tensor& t, DataType to) {
  KILN_ASSIGN_OR_RETURN(Tensor r, Tensor::create_uninitialized(to, t.shape()));
  const float* src = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (to == DataType::kFloat16) r.data<Half>()[i] = Half(src[i]);
    else r.data<BFloat16>()[i] = BFloat16(src[i]);
  }
  return r;
}

}  // namespace

Status convert_precision(Graph& g, const PrecisionOptions& opts, PassStats* stats) {
  const DataType to = opts.to;
  if (to != DataType::kFloat16 && to != DataType::kBFloat16)
    return invalid_argument("reduced precision must be float16 or bfloat16");
  for (auto& n : g.nodes)
    for (auto& a : n.attrs)
      if (a.g || !a.graphs.empty())
        return unsupported(n.where() + " has a subgraph; reduced precision is not applied to control flow");

  std::unordered_map<std::string, DataType> type;
  for (auto& vi : g.inputs) type[vi.name] = vi.type.kind == TypeInfo::Kind::kTensor ? vi.type.dtype : DataType::kUndefined;
  for (auto& vi : g.value_info) type[vi.name] = vi.type.kind == TypeInfo::Kind::kTensor ? vi.type.dtype : DataType::kUndefined;
  for (auto& vi : g.outputs)
    if (vi.type.kind == TypeInfo::Kind::kTensor && !type.count(vi.name)) type[vi.name] = vi.type.dtype;
  for (auto& [name, t] : g.initializers) type[name] = t.dtype();
  auto is_f32 = [&](const std::string& v) {
    auto it = type.find(v);
    return it != type.end() && it->second == DataType::kFloat;
  };
  auto keep = [&](const Node& n) {
    if (listed(opts.keep_fp32, n)) return true;
    if (listed(opts.force_reduced, n)) return false;
    return n.domain.empty() && std::find(default_fp32_ops().begin(), default_fp32_ops().end(), n.op_type) !=
                                   default_fp32_ops().end();
  };

  // Which float initializers are read in float32 (kept nodes, scale inputs) and which reduced.
  std::set<std::string> init_f32_use, init_red_use;
  for (auto& n : g.nodes)
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      const std::string& v = n.inputs[i];
      if (v.empty() || !g.initializers.count(v) || !is_f32(v)) continue;
      if (keep(n) || must_stay_f32(n, i)) init_f32_use.insert(v);
      else init_red_use.insert(v);
    }
  std::unordered_map<std::string, std::string> reduced_init;  // f32 initializer -> reduced name
  for (auto& v : init_red_use) {
    KILN_ASSIGN_OR_RETURN(Tensor r, convert_tensor(g.initializers.at(v), to));
    if (init_f32_use.count(v)) {
      std::string name = v + "__kiln_reduced";
      g.initializers[name] = r;
      reduced_init[v] = name;
    } else {
      g.initializers[v] = r;
      reduced_init[v] = v;
    }
  }

  std::vector<Node> out;
  size_t casts = 0;
  auto cast_name = [&](const std::string& base) { return "kiln_cast_" + std::to_string(casts++) + "_" + base; };
  // Graph inputs: float32 at the edge, reduced inside.
  std::unordered_map<std::string, std::string> renamed;  // value -> reduced-world name
  for (auto& vi : g.inputs) {
    if (!is_f32(vi.name)) continue;
    if (opts.io_reduced) {
      vi.type.dtype = to;
      continue;
    }
    std::string r = vi.name + "__kiln_reduced";
    out.push_back(make_cast(vi.name, r, to, cast_name(vi.name)));
    renamed[vi.name] = r;
  }
  std::unordered_map<std::string, std::string> f32_copy;  // reduced value -> its float32 cast
  for (auto& n0 : g.nodes) {
    Node n = n0;
    const bool k = keep(n);
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      std::string& v = n.inputs[i];
      if (v.empty()) continue;
      const bool init = g.initializers.count(v) > 0;
      if (init) {
        // Float initializers: the reduced copy unless this input reads float32.
        if (is_f32(v) && !(k || must_stay_f32(n, i)) && reduced_init.count(v)) v = reduced_init[v];
        continue;
      }
      if (auto it = renamed.find(v); it != renamed.end()) v = it->second;
      if ((k || must_stay_f32(n, i)) && is_f32(n0.inputs[i])) {
        auto it = f32_copy.find(v);
        if (it == f32_copy.end()) {
          std::string f = v + "__kiln_f32";
          out.push_back(make_cast(v, f, DataType::kFloat, cast_name(v)));
          it = f32_copy.emplace(v, f).first;
        }
        v = it->second;
      }
    }
    std::vector<Node> after;
    if (k) {
      for (auto& o : n.outputs) {
        if (o.empty() || !is_f32(o)) continue;
        std::string f = o + "__kiln_f32out";
        after.push_back(make_cast(f, o, to, cast_name(o)));
        o = f;
      }
    } else if (n.domain.empty() && n.op_type == "Cast" && n.attr_int("to", 0) == static_cast<int64_t>(DataType::kFloat)) {
      Attribute* a = n.attr("to");
      a->i = static_cast<int64_t>(to);
    } else if (n.domain.empty() && n.op_type == "ConstantOfShape") {
      const Tensor* v = n.attr_tensor("value");
      if (v && v->dtype() == DataType::kFloat) {
        Attribute* a = n.attr("value");
        KILN_ASSIGN_OR_RETURN(a->t, convert_tensor(*v, to));
      }
    }
    out.push_back(std::move(n));
    for (auto& c : after) out.push_back(std::move(c));
  }
  // Graph outputs: back to float32.
  if (!opts.io_reduced) {
    for (auto& vo : g.outputs) {
      if (!is_f32(vo.name) || g.initializers.count(vo.name)) continue;
      std::string r = vo.name + "__kiln_reduced_out";
      bool produced = false;
      for (auto& n : out)
        for (auto& o : n.outputs)
          if (o == vo.name) {
            o = r;
            produced = true;
          }
      if (!produced) {
        auto it = renamed.find(vo.name);  // a graph input passed straight through
        if (it == renamed.end()) continue;
        r = it->second;
      } else {
        for (auto& n : out)
          for (auto& in : n.inputs)
            if (in == vo.name) in = r;
      }
      out.push_back(make_cast(r, vo.name, DataType::kFloat, cast_name(vo.name)));
    }
  } else {
    for (auto& vo : g.outputs)
      if (is_f32(vo.name)) vo.type.dtype = to;
  }
  g.nodes = std::move(out);
  // Types changed: recompute them from the inputs.
  g.value_info.clear();
  if (stats) stats->inferred += casts;
  return infer_types(g, stats);
}

namespace {

// Removes the nodes marked in `drop` (a fold's absorbed Casts) and counts them as eliminated.
Status drop_folded(Graph& g, const std::vector<bool>& drop, size_t folded, PassStats* stats) {
  if (!folded) return Status::ok();
  std::vector<Node> kept;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    if (!drop[i]) kept.push_back(std::move(g.nodes[i]));
  g.nodes = std::move(kept);
  if (stats) stats->eliminated += folded;
  return Status::ok();
}

}  // namespace

Status fold_gemm_output_casts(Graph& g, PassStats* stats) {
  const Uses uses(g);
  std::vector<bool> drop(g.nodes.size(), false);
  size_t folded = 0;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& c = g.nodes[i];
    if (!c.domain.empty() || c.op_type != "Cast" || c.inputs.size() != 1 || c.outputs.size() != 1 ||
        c.attr_int("to", 0) != static_cast<int64_t>(DataType::kFloat))
      continue;
    const std::string& v = c.inputs[0];
    auto it = uses.producer.find(v);
    if (it == uses.producer.end() || !uses.single_use(v) || drop[it->second]) continue;
    Node& gm = g.nodes[it->second];
    if (!gm.domain.empty() || gm.op_type != "Gemm" || gm.outputs.size() != 1 ||
        gm.inputs.size() < 2)
      continue;
    const ValueInfo* vi = g.find_value_info(v);
    const DataType dt = vi ? vi->type.dtype : DataType::kUndefined;
    if (dt != DataType::kFloat16 && dt != DataType::kBFloat16) continue;
    auto b = g.initializers.find(gm.inputs[1]);
    if (b == g.initializers.end() || b->second.numel() == 0) continue;
    gm.outputs[0] = c.outputs[0];
    Attribute a;
    a.name = "kiln_float_out";
    a.kind = Attribute::Kind::kInt;
    a.i = 1;
    gm.set_attr(a);
    drop[i] = true;
    ++folded;
  }
  return drop_folded(g, drop, folded, stats);
}

Status fold_cast_into_transpose(Graph& g, PassStats* stats) {
  const Uses uses(g);
  std::vector<bool> drop(g.nodes.size(), false);
  size_t folded = 0;
  for (Node& t : g.nodes) {
    if (!t.domain.empty() || t.op_type != "Transpose" || t.inputs.size() != 1 ||
        t.has_attr("kiln_to"))
      continue;
    const std::string& v = t.inputs[0];
    auto it = uses.producer.find(v);
    if (it == uses.producer.end() || !uses.single_use(v) || drop[it->second]) continue;
    const Node& c = g.nodes[it->second];
    if (!c.domain.empty() || c.op_type != "Cast" || c.inputs.size() != 1 || c.inputs[0].empty())
      continue;
    const int64_t to = c.attr_int("to", 0);
    if (to != static_cast<int64_t>(DataType::kFloat16) &&
        to != static_cast<int64_t>(DataType::kBFloat16))
      continue;
    const TypeInfo* src = nullptr;
    if (const ValueInfo* vi = g.find_value_info(c.inputs[0])) src = &vi->type;
    for (const auto& in : g.inputs)
      if (in.name == c.inputs[0]) src = &in.type;
    if (!src || src->dtype != DataType::kFloat) continue;
    drop[it->second] = true;
    t.inputs[0] = c.inputs[0];
    Attribute a;
    a.name = "kiln_to";
    a.kind = Attribute::Kind::kInt;
    a.i = to;
    t.set_attr(a);
    ++folded;
  }
  return drop_folded(g, drop, folded, stats);
}

}  // namespace kiln
