// Attention pattern fusion: the scaled-dot-product attention subgraph exporters produce
//
//   MatMul(Q4, Kt) -> [Mul|Div by scalar constants]* -> [Add(mask)] -> Softmax(last axis)
//     -> MatMul(., V4)
//
// becomes one ONNX Attention node (opset-23 semantics, 4-D inputs, explicit `scale`). Kt is
// Transpose(K4, [0,1,3,2]) (HF eager / SDPA exports), Transpose(R, [0,2,3,1]) of a [B, S, H, D]
// tensor (key reshaped and transposed in one step), or any [B, H, D, T] value (a Transpose to
// [B, H, T, D] is inserted). Scalar Mul/Div on Q, on Kt or on K before the transpose fold into
// `scale` too. The mask must broadcast to the scores with its last dim equal to the key length
// (Attention pads a shorter last dim with -inf where Add would broadcast it). Every intermediate
// (scores, scaled, masked scores, probabilities) must have exactly one reader and not be a graph
// output; all shapes must be known to be 4-D (dims equal or the same symbol).
#include <cmath>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "kiln/half.h"
#include "passes/fusion.h"
#include "passes/uses.h"

namespace kiln {
namespace {

// Uses (passes/uses.h) plus every value name in use, for fresh names.
struct AttnUses : Uses {
  std::unordered_set<std::string> names;  // every value name in use

  explicit AttnUses(const Graph& g) : Uses(g) {
    for (auto& o : g.outputs) names.insert(o.name);
    for (auto& i : g.inputs) names.insert(i.name);
    for (auto& [k, t] : g.initializers) names.insert(k);
    for (auto& n : g.nodes) {
      for (auto& in : n.inputs)
        if (!in.empty()) names.insert(in);
      for (auto& o : n.outputs)
        if (!o.empty()) names.insert(o);
    }
  }
  const Node* producer_of(const Graph& g, const std::string& v) const {
    auto it = producer.find(v);
    return it == producer.end() ? nullptr : &g.nodes[it->second];
  }
  size_t index_of(const std::string& v) const {
    auto it = producer.find(v);
    return it == producer.end() ? SIZE_MAX : it->second;
  }
  std::string fresh(const std::string& base) {
    std::string n = base;
    for (int k = 1; names.count(n); ++k) n = base + "_" + std::to_string(k);
    names.insert(n);
    return n;
  }
};

bool is_float_type(DataType d) {
  return d == DataType::kFloat || d == DataType::kFloat16 || d == DataType::kBFloat16;
}

std::optional<double> tensor_scalar(const Tensor& t) {
  if (t.numel() != 1 || t.on_device()) return std::nullopt;
  switch (t.dtype()) {
    case DataType::kFloat: return static_cast<double>(t.data<float>()[0]);
    case DataType::kDouble: return t.data<double>()[0];
    case DataType::kFloat16: return static_cast<double>(static_cast<float>(t.data<Half>()[0]));
    case DataType::kBFloat16:
      return static_cast<double>(static_cast<float>(t.data<BFloat16>()[0]));
    default: return std::nullopt;
  }
}

// A float scalar (any rank, one element) constant: an initializer no graph input overrides, or
// a Constant node's value.
std::optional<double> scalar_const(const Graph& g, const AttnUses& u, const std::string& name) {
  if (name.empty()) return std::nullopt;
  for (auto& in : g.inputs)
    if (in.name == name) return std::nullopt;
  auto it = g.initializers.find(name);
  if (it != g.initializers.end()) return tensor_scalar(it->second);
  const Node* p = u.producer_of(g, name);
  if (p && p->op_type == "Constant" && p->domain.empty()) {
    if (const Tensor* t = p->attr_tensor("value")) return tensor_scalar(*t);
    if (const Attribute* a = p->attr("value_float"); a && a->kind == Attribute::Kind::kFloat)
      return static_cast<double>(a->f);
  }
  return std::nullopt;
}

const TypeInfo* type_of(const Graph& g, const std::string& v) {
  if (const ValueInfo* vi = g.find_value_info(v)) return &vi->type;
  for (auto& in : g.inputs)
    if (in.name == v) return &in.type;
  for (auto& o : g.outputs)
    if (o.name == v) return &o.type;
  return nullptr;
}

// The dims of a float tensor value of rank `rank`, or nullptr.
const std::vector<Dim>* dims_of(const Graph& g, const std::string& v, size_t rank,
                                DataType* dt = nullptr) {
  const TypeInfo* t = type_of(g, v);
  if (!t || t->kind != TypeInfo::Kind::kTensor || !t->has_shape || t->dims.size() != rank ||
      !is_float_type(t->dtype))
    return nullptr;
  if (dt) *dt = t->dtype;
  return &t->dims;
}

bool dim_eq(const Dim& a, const Dim& b) {
  if (a.known() || b.known()) return a.known() && b.known() && a.value == b.value;
  return !a.param.empty() && a.param == b.param;
}

bool is_binary(const Node& n, const char* op) {
  return n.domain.empty() && n.op_type == op && n.inputs.size() == 2 && n.outputs.size() == 1 &&
         !n.inputs[0].empty() && !n.inputs[1].empty();
}

// If v = Mul(x, c) / Mul(c, x) / Div(x, c) with c a scalar constant: x, and factor *= c (or 1/c).
std::optional<std::string> scale_step(const Graph& g, const AttnUses& u, const std::string& v,
                                      double& factor) {
  const Node* p = u.producer_of(g, v);
  if (!p) return std::nullopt;
  if (is_binary(*p, "Mul")) {
    if (auto c = scalar_const(g, u, p->inputs[1])) {
      factor *= *c;
      return p->inputs[0];
    }
    if (auto c = scalar_const(g, u, p->inputs[0])) {
      factor *= *c;
      return p->inputs[1];
    }
  } else if (is_binary(*p, "Div")) {
    if (auto c = scalar_const(g, u, p->inputs[1]); c && *c != 0.0) {
      factor /= *c;
      return p->inputs[0];
    }
  }
  return std::nullopt;
}

// Peels scalar scalings off an operand (the bypassed nodes stay for DCE if unread).
std::string peel(const Graph& g, const AttnUses& u, std::string v, double& factor) {
  for (int k = 0; k < 8; ++k) {
    double f = factor;
    auto x = scale_step(g, u, v, f);
    if (!x) break;
    factor = f;
    v = *x;
  }
  return v;
}

bool transpose_perm(const Node& n, std::initializer_list<int64_t> want) {
  if (n.op_type != "Transpose" || !n.domain.empty() || n.inputs.size() != 1 ||
      n.outputs.size() != 1)
    return false;
  return n.attr_ints("perm") == std::vector<int64_t>(want);
}

// Identity, or Dropout in inference form (no training_mode input, mask output unused): the
// probabilities pass through unchanged.
bool is_identity_like(const Node& n) {
  if (!n.domain.empty() || n.inputs.empty() || n.inputs[0].empty() || n.outputs.empty() ||
      n.outputs[0].empty())
    return false;
  if (n.op_type == "Identity") return n.inputs.size() == 1 && n.outputs.size() == 1;
  if (n.op_type != "Dropout") return false;
  if (n.inputs.size() > 2 && !n.inputs[2].empty()) return false;  // training_mode given
  return n.outputs.size() == 1 || n.outputs[1].empty();
}

struct Match {
  std::vector<size_t> dead;     // nodes removed: QK MatMul, scalings, Add, Softmax
  std::vector<Node> pre;        // Transposes inserted before the Attention node
  std::string q, k, v, mask;
  std::string k_bshd;  // K as [B, T, H, D] when the match saw it (for the 3-D form)
  double scale = 1.0;
};

// Matches the scores chain ending at `x` (the Softmax or Add operand): scalings of
// MatMul(Q, Kt), every link read once.
bool match_scores(const Graph& g, AttnUses& u, const std::string& x, Match& m,
                  std::vector<Dim>& sdims) {
  std::string cur = x;
  double factor = 1.0;
  std::vector<size_t> chain;
  for (int k = 0; k < 8; ++k) {
    if (!u.single_use(cur)) return false;
    const Node* p = u.producer_of(g, cur);
    if (!p) return false;
    if (is_binary(*p, "MatMul")) break;
    auto nx = scale_step(g, u, cur, factor);
    if (!nx) return false;
    chain.push_back(u.index_of(cur));
    cur = *nx;
  }
  const Node* mm = u.producer_of(g, cur);
  if (!mm || !is_binary(*mm, "MatMul") || !u.single_use(cur)) return false;
  DataType dt = DataType::kUndefined, qdt = DataType::kUndefined, kdt = DataType::kUndefined;
  const std::vector<Dim>* sd = dims_of(g, cur, 4, &dt);
  if (!sd) return false;
  // Q side.
  const std::string q = peel(g, u, mm->inputs[0], factor);
  const std::vector<Dim>* qd = dims_of(g, q, 4, &qdt);
  if (!qd || qdt != dt) return false;
  // K side: [B, H, T, D] from the [B, H, D, T] operand.
  const std::string xt = peel(g, u, mm->inputs[1], factor);
  std::vector<Dim> kd;
  std::string k;
  const Node* tp = u.producer_of(g, xt);
  if (tp && transpose_perm(*tp, {0, 1, 3, 2})) {
    k = peel(g, u, tp->inputs[0], factor);
    const std::vector<Dim>* d = dims_of(g, k, 4, &kdt);
    if (!d) return false;
    kd = *d;
  } else if (tp && transpose_perm(*tp, {0, 2, 3, 1})) {
    const std::string r = peel(g, u, tp->inputs[0], factor);
    const std::vector<Dim>* d = dims_of(g, r, 4, &kdt);
    if (!d) return false;
    kd = {(*d)[0], (*d)[2], (*d)[1], (*d)[3]};
    m.k_bshd = r;
    k = u.fresh(r + "_bhsd");
    Node t;
    t.name = u.fresh(tp->name + "_bhsd");
    t.op_type = "Transpose";
    t.opset = tp->opset;
    t.inputs = {r};
    t.outputs = {k};
    Attribute a;
    a.name = "perm";
    a.kind = Attribute::Kind::kInts;
    a.ints = {0, 2, 1, 3};
    t.set_attr(a);
    m.pre.push_back(std::move(t));
  } else {
    const std::vector<Dim>* d = dims_of(g, xt, 4, &kdt);
    if (!d) return false;
    kd = {(*d)[0], (*d)[1], (*d)[3], (*d)[2]};
    k = u.fresh(xt + "_bhsd");
    Node t;
    t.name = u.fresh(mm->name + "_key_bhsd");
    t.op_type = "Transpose";
    t.opset = mm->opset;
    t.inputs = {xt};
    t.outputs = {k};
    Attribute a;
    a.name = "perm";
    a.kind = Attribute::Kind::kInts;
    a.ints = {0, 1, 3, 2};
    t.set_attr(a);
    m.pre.push_back(std::move(t));
  }
  if (kdt != dt) return false;
  const std::vector<Dim>& Q = *qd;
  // Batch equal, heads equal (or one K head: Attention's GQA covers MatMul's broadcast), head
  // size equal; the scores are exactly [B, Hq, S, T].
  if (!dim_eq(Q[0], kd[0]) || !dim_eq(Q[3], kd[3])) return false;
  if (!dim_eq(Q[1], kd[1]) && !(kd[1].known() && kd[1].value == 1)) return false;
  if (!dim_eq((*sd)[0], Q[0]) || !dim_eq((*sd)[1], Q[1]) || !dim_eq((*sd)[2], Q[2]) ||
      !dim_eq((*sd)[3], kd[2]))
    return false;
  if (!std::isfinite(factor) || !(factor > 0.0)) return false;
  chain.push_back(u.index_of(cur));
  m.dead.insert(m.dead.end(), chain.begin(), chain.end());
  m.q = q;
  m.k = k;
  m.scale = factor;
  sdims = *sd;
  sdims.push_back(kd[1]);  // sdims[4]: K's head count, for the V check
  return true;
}

// A mask that broadcasts to the scores [B, H, S, T] the same way under Add and Attention.
bool mask_ok(const Graph& g, const std::string& mask, const std::vector<Dim>& sd, DataType dt) {
  const TypeInfo* t = type_of(g, mask);
  auto init = g.initializers.find(mask);
  if (!t && init != g.initializers.end()) {
    const Tensor& c = init->second;
    if (c.dtype() != dt || c.rank() < 1 || c.rank() > 4) return false;
    const size_t off = 4 - static_cast<size_t>(c.rank());
    for (size_t i = 0; i < static_cast<size_t>(c.rank()); ++i) {
      const int64_t md = c.dim(static_cast<int>(i));
      if (i + off == 3 ? !dim_eq(Dim::of(md), sd[3])
                       : !(md == 1 || dim_eq(Dim::of(md), sd[i + off])))
        return false;
    }
    return true;
  }
  if (!t || t->kind != TypeInfo::Kind::kTensor || !t->has_shape || t->dtype != dt ||
      t->dims.empty() || t->dims.size() > 4)
    return false;
  const size_t off = 4 - t->dims.size();
  for (size_t i = 0; i < t->dims.size(); ++i) {
    const Dim& md = t->dims[i];
    if (i + off == 3) {
      if (!dim_eq(md, sd[3])) return false;
    } else if (!(md.known() && md.value == 1) && !dim_eq(md, sd[i + off])) {
      return false;
    }
  }
  return true;
}


// x3 [B, S, H*D] when v4 ([B, H, S, D]) is Transpose([0,2,1,3]) of bshd = Reshape(x3) with
// bshd [B, S, H, D]; or, with bshd given, from that value directly. Sets H.
std::string x3_source(const Graph& g, const AttnUses& u, const std::string& v4,
                      std::string bshd, int64_t& heads) {
  if (bshd.empty()) {
    const Node* t = u.producer_of(g, v4);
    if (!t || !transpose_perm(*t, {0, 2, 1, 3})) return "";
    bshd = t->inputs[0];
  }
  const Node* r = u.producer_of(g, bshd);
  if (!r || r->op_type != "Reshape" || !r->domain.empty() || r->inputs.empty() ||
      r->inputs[0].empty())
    return "";
  const std::vector<Dim>* d4 = dims_of(g, bshd, 4);
  const std::vector<Dim>* d3 = dims_of(g, r->inputs[0], 3);
  if (!d4 || !d3) return "";
  const std::vector<Dim>&a = *d4, &b = *d3;
  if (!dim_eq(a[0], b[0]) || !dim_eq(a[1], b[1]) || !a[2].known() || !a[3].known() ||
      !b[2].known() || a[2].value * a[3].value != b[2].value || a[2].value <= 0)
    return "";
  heads = a[2].value;
  return r->inputs[0];
}

// Rewrites a 4-D Attention node into the 3-D form when its inputs are head splits
// (Reshape [B,S,E] -> [B,S,H,D], Transpose [0,2,1,3]) and its output is merged back the same
// way (Transpose [0,2,1,3] -> Reshape [B,S,H*Dv]): the split/merge copies disappear and the
// kernel reads and writes [B, S, H*D] directly. Returns the merge nodes to remove, or {}.
std::vector<size_t> lift_to_3d(const Graph& g, const AttnUses& u, Node& a, const Match& m) {
  int64_t hq = 0, hk = 0, hv = 0;
  const std::string q3 = x3_source(g, u, a.inputs[0], "", hq);
  const std::string k3 = x3_source(g, u, a.inputs[1], m.k_bshd, hk);
  const std::string v3 = x3_source(g, u, a.inputs[2], "", hv);
  if (q3.empty() || k3.empty() || v3.empty() || hk != hv) return {};
  const std::string& y4 = a.outputs[0];
  if (!u.single_use(y4)) return {};
  size_t ti = SIZE_MAX;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (auto& in : g.nodes[i].inputs)
      if (in == y4) ti = i;
  if (ti == SIZE_MAX || !transpose_perm(g.nodes[ti], {0, 2, 1, 3})) return {};
  const std::string& t4 = g.nodes[ti].outputs[0];
  if (!u.single_use(t4)) return {};
  size_t ri = SIZE_MAX;
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (auto& in : g.nodes[i].inputs)
      if (in == t4) ri = i;
  if (ri == SIZE_MAX) return {};
  const Node& r = g.nodes[ri];
  if (r.op_type != "Reshape" || !r.domain.empty() || r.inputs.empty() || r.inputs[0] != t4 ||
      r.outputs.size() != 1)
    return {};
  const std::vector<Dim>* yd = dims_of(g, y4, 4);
  const std::vector<Dim>* od = dims_of(g, r.outputs[0], 3);
  const std::vector<Dim>* qd = dims_of(g, q3, 3);
  if (!yd || !od || !qd || !(*yd)[1].known() || !(*yd)[3].known()) return {};
  if (!dim_eq((*od)[0], (*qd)[0]) || !dim_eq((*od)[1], (*qd)[1]) || !(*od)[2].known() ||
      (*od)[2].value != (*yd)[1].value * (*yd)[3].value || (*yd)[1].value != hq)
    return {};
  a.inputs[0] = q3;
  a.inputs[1] = k3;
  a.inputs[2] = v3;
  a.outputs[0] = r.outputs[0];
  Attribute h;
  h.kind = Attribute::Kind::kInt;
  h.name = "q_num_heads";
  h.i = hq;
  a.set_attr(h);
  h.name = "kv_num_heads";
  h.i = hk;
  a.set_attr(h);
  return {ti, ri};
}

}  // namespace

Status fuse_attention(Graph& g, PassStats* stats) {
  AttnUses u(g);
  std::vector<bool> dead(g.nodes.size(), false);
  std::unordered_map<size_t, std::vector<Node>> replace;  // final MatMul index -> new nodes
  for (size_t si = 0; si < g.nodes.size(); ++si) {
    const Node& sm = g.nodes[si];
    if (dead[si] || sm.op_type != "Softmax" || !sm.domain.empty() || sm.inputs.size() != 1 ||
        sm.outputs.size() != 1 || sm.inputs[0].empty())
      continue;
    DataType dt = DataType::kUndefined;
    const std::vector<Dim>* xd = dims_of(g, sm.inputs[0], 4, &dt);
    if (!xd) continue;
    int64_t axis = sm.attr_int("axis", -1);
    if (axis < 0) axis += 4;
    if (axis != 3) continue;
    // Probabilities [-> inference Dropout / Identity] -> MatMul(P, V).
    std::string p = sm.outputs[0];
    std::vector<size_t> passthrough;
    if (!u.single_use(p)) {
      // PyTorch's SDPA export guards fully masked rows: Where(IsNaN(p), 0, p). The Attention
      // kernels already give 0 for such rows, so the guard folds into the node.
      size_t ni = SIZE_MAX, wi = SIZE_MAX;
      int uses = 0;
      for (size_t i = 0; i < g.nodes.size(); ++i) {
        if (dead[i]) continue;
        const Node& n = g.nodes[i];
        for (auto& in : n.inputs) {
          if (in != p) continue;
          ++uses;
          if (n.domain.empty() && n.op_type == "IsNaN" && n.outputs.size() == 1) ni = i;
          else if (n.domain.empty() && n.op_type == "Where" && n.inputs.size() == 3 && n.inputs[2] == p) wi = i;
        }
      }
      if (uses != 2 || ni == SIZE_MAX || wi == SIZE_MAX || u.pinned.count(p)) continue;
      const Node& w = g.nodes[wi];
      auto zero = g.initializers.find(w.inputs[1]);
      if (w.inputs[0] != g.nodes[ni].outputs[0] || !u.single_use(w.inputs[0]) || zero == g.initializers.end() ||
          zero->second.numel() != 1 || zero->second.get_f64(0) != 0.0 || !u.single_use(w.outputs[0]))
        continue;
      passthrough.push_back(ni);
      passthrough.push_back(wi);
      p = w.outputs[0];
    }
    for (int hop = 0; hop < 2; ++hop) {
      size_t ci = SIZE_MAX;
      for (size_t i = 0; i < g.nodes.size(); ++i)
        for (auto& in : g.nodes[i].inputs)
          if (in == p) ci = i;
      if (ci == SIZE_MAX || dead[ci] || !is_identity_like(g.nodes[ci])) break;
      const std::string& o = g.nodes[ci].outputs[0];
      if (!u.single_use(o)) break;
      passthrough.push_back(ci);
      p = o;
    }
    size_t mi = SIZE_MAX;
    for (size_t i = 0; i < g.nodes.size(); ++i)
      if (!dead[i] && is_binary(g.nodes[i], "MatMul") && g.nodes[i].inputs[0] == p &&
          g.nodes[i].inputs[1] != p)
        mi = i;
    if (mi == SIZE_MAX || replace.count(mi)) continue;
    const Node& mm2 = g.nodes[mi];
    DataType vdt = DataType::kUndefined, odt = DataType::kUndefined;
    const std::vector<Dim>* vd = dims_of(g, mm2.inputs[1], 4, &vdt);
    const std::vector<Dim>* od = dims_of(g, mm2.outputs[0], 4, &odt);
    if (!vd || !od || vdt != dt || odt != dt) continue;
    // Scores chain, with or without a mask.
    Match m;
    std::vector<Dim> sd;
    const std::string& x = sm.inputs[0];
    const Node* px = u.producer_of(g, x);
    bool ok = false;
    if (px && is_binary(*px, "Add") && u.single_use(x)) {
      for (int side = 0; side < 2 && !ok; ++side) {
        Match t;
        std::vector<Dim> tsd;
        const std::string& s = px->inputs[static_cast<size_t>(side)];
        const std::string& mk = px->inputs[static_cast<size_t>(1 - side)];
        if (s == mk || !match_scores(g, u, s, t, tsd)) continue;
        if (!mask_ok(g, mk, tsd, dt)) continue;
        t.mask = mk;
        t.dead.push_back(u.index_of(x));
        m = std::move(t);
        sd = std::move(tsd);
        ok = true;
      }
    }
    if (!ok) ok = match_scores(g, u, x, m, sd);
    if (!ok) continue;
    // V [B, Hkv, T, Dv] and the output [B, Hq, S, Dv].
    const std::vector<Dim>& V = *vd;
    const Dim& kh = sd[4];
    if (!dim_eq(V[0], sd[0]) || !dim_eq(V[1], kh) || !dim_eq(V[2], sd[3])) continue;
    if (!dim_eq((*od)[0], sd[0]) || !dim_eq((*od)[1], sd[1]) || !dim_eq((*od)[2], sd[2]) ||
        !dim_eq((*od)[3], V[3]))
      continue;
    bool clash = false;
    for (size_t d : m.dead) clash = clash || d == SIZE_MAX || dead[d];
    for (size_t d : passthrough) clash = clash || dead[d];
    if (clash) continue;
    Node a;
    a.name = mm2.name.empty() ? u.fresh("attention") : mm2.name;
    a.op_type = "Attention";
    a.domain = "";
    a.opset = 23;
    a.inputs = {m.q, m.k, mm2.inputs[1]};
    if (!m.mask.empty()) a.inputs.push_back(m.mask);
    a.outputs = {mm2.outputs[0]};
    Attribute sc;
    sc.name = "scale";
    sc.kind = Attribute::Kind::kFloat;
    sc.f = static_cast<float>(m.scale);
    a.set_attr(sc);
    std::vector<size_t> merged = lift_to_3d(g, u, a, m);
    bool merged_ok = !merged.empty();
    for (size_t d : merged) merged_ok = merged_ok && !dead[d] && !replace.count(d);
    if (merged_ok) {
      m.pre.clear();  // the 3-D form reads K as [B, T, H*D]: no key transpose needed
      for (size_t d : merged) dead[d] = true;
    } else if (!merged.empty()) {
      continue;  // cannot happen for a well-formed graph; stay safe
    }
    for (size_t d : m.dead) dead[d] = true;
    for (size_t d : passthrough) dead[d] = true;
    dead[si] = true;
    std::vector<Node> nodes = std::move(m.pre);
    nodes.push_back(std::move(a));
    replace[mi] = std::move(nodes);
  }
  if (replace.empty()) return Status::ok();
  std::vector<Node> kept;
  kept.reserve(g.nodes.size() + replace.size());
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    auto it = replace.find(i);
    if (it != replace.end()) {
      for (auto& n : it->second) kept.push_back(std::move(n));  // replaces the final MatMul
    } else if (!dead[i]) {
      kept.push_back(std::move(g.nodes[i]));
    } else if (stats) {
      stats->eliminated++;
    }
  }
  g.nodes = std::move(kept);
  return Status::ok();
}

}  // namespace kiln
