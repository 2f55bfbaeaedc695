#include "passes/fusion.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "passes/uses.h"

namespace kiln {

namespace {

// An initializer of any element type that no graph input can override.
const Tensor* const_any(const Graph& g, const std::string& name) {
  if (name.empty()) return nullptr;
  auto it = g.initializers.find(name);
  if (it == g.initializers.end()) return nullptr;
  for (auto& in : g.inputs)
    if (in.name == name) return nullptr;
  return &it->second;
}

// A float32 initializer that no graph input can override.
const Tensor* const_f32(const Graph& g, const std::string& name) {
  const Tensor* t = const_any(g, name);
  return t && t->dtype() == DataType::kFloat ? t : nullptr;
}

// The unique index of the node reading `v` (call only when single_use(v)).
size_t consumer_of(const Graph& g, const std::string& v, const std::vector<bool>& dead) {
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (dead[i]) continue;
    for (auto& in : g.nodes[i].inputs)
      if (in == v) return i;
  }
  return SIZE_MAX;
}

std::string fresh_name(const Graph& g, const std::string& base) {
  std::string n = base;
  for (int k = 1; g.initializers.count(n); ++k) n = base + "_" + std::to_string(k);
  return n;
}

bool same_dims(const TypeInfo& a, const TypeInfo& b) {
  if (a.kind != TypeInfo::Kind::kTensor || b.kind != TypeInfo::Kind::kTensor) return false;
  if (!a.has_shape || !b.has_shape || a.dims.size() != b.dims.size() || a.dtype != b.dtype)
    return false;
  for (size_t i = 0; i < a.dims.size(); ++i) {
    const Dim &x = a.dims[i], &y = b.dims[i];
    if (x.known() && y.known() && x.value == y.value) continue;
    if (!x.known() && !y.known() && !x.param.empty() && x.param == y.param) continue;
    return false;
  }
  return true;
}

const TypeInfo* type_of(const Graph& g, const std::string& v) {
  const ValueInfo* vi = g.find_value_info(v);
  if (vi) return &vi->type;
  for (auto& in : g.inputs)
    if (in.name == v) return &in.type;
  return nullptr;
}

void erase_dead(Graph& g, const std::vector<bool>& dead, PassStats* stats) {
  std::vector<Node> kept;
  kept.reserve(g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (!dead[i]) kept.push_back(std::move(g.nodes[i]));
    else if (stats) stats->eliminated++;
  }
  g.nodes = std::move(kept);
}

// Conv -> BatchNormalization (inference form, per-channel constants) becomes one Conv with
// scaled weights and a shifted bias: y = (conv(x, W) + b - mean) * s + beta, s = scale/sqrt(var+eps).
Status fold_batchnorm_into_conv(Graph& g, PassStats* stats) {
  Uses uses(g);
  std::vector<bool> dead(g.nodes.size(), false);
  bool changed = false;
  for (size_t bi = 0; bi < g.nodes.size(); ++bi) {
    Node& bn = g.nodes[bi];
    if (bn.op_type != "BatchNormalization" || !bn.domain.empty() || bn.inputs.size() != 5) continue;
    if (bn.attr_int("training_mode", 0) != 0) continue;
    bool extra_out = false;
    for (size_t k = 1; k < bn.outputs.size(); ++k) extra_out = extra_out || !bn.outputs[k].empty();
    if (extra_out || bn.outputs.empty() || bn.outputs[0].empty()) continue;
    const std::string& x = bn.inputs[0];
    auto pit = uses.producer.find(x);
    if (pit == uses.producer.end() || !uses.single_use(x)) continue;
    Node& conv = g.nodes[pit->second];
    if (dead[pit->second] || conv.op_type != "Conv" || !conv.domain.empty()) continue;
    if (conv.outputs.size() != 1 || conv.inputs.size() < 2) continue;
    const Tensor* W = const_f32(g, conv.inputs[1]);
    const Tensor* B = conv.has_input(2) ? const_f32(g, conv.inputs[2]) : nullptr;
    if (!W || W->rank() < 3 || (conv.has_input(2) && !B)) continue;
    const int64_t M = W->dim(0);
    if (M <= 0) continue;
    const Tensor *scale = const_f32(g, bn.inputs[1]), *beta = const_f32(g, bn.inputs[2]),
                 *mean = const_f32(g, bn.inputs[3]), *var = const_f32(g, bn.inputs[4]);
    if (!scale || !beta || !mean || !var) continue;
    bool ok = true;
    for (const Tensor* t : {scale, beta, mean, var}) ok = ok && t->numel() == M && t->rank() == 1;
    if (B) ok = ok && B->numel() == M;
    if (!ok) continue;
    const float eps = bn.attr_float("epsilon", 1e-5f);
    KILN_ASSIGN_OR_RETURN(Tensor nw, Tensor::create(DataType::kFloat, W->shape()));
    KILN_ASSIGN_OR_RETURN(Tensor nb, Tensor::create(DataType::kFloat, {M}));
    const int64_t per = W->numel() / M;
    const float* w = W->data<float>();
    float* o = nw.data<float>();
    for (int64_t m = 0; m < M; ++m) {
      const double s = double(scale->data<float>()[m]) /
                       std::sqrt(double(var->data<float>()[m]) + double(eps));
      for (int64_t k = 0; k < per; ++k) o[m * per + k] = float(double(w[m * per + k]) * s);
      const double b0 = B ? double(B->data<float>()[m]) : 0.0;
      nb.data<float>()[m] =
          float((b0 - double(mean->data<float>()[m])) * s + double(beta->data<float>()[m]));
    }
    std::string wn = fresh_name(g, conv.name + "/bnfold_W");
    g.initializers[wn] = std::move(nw);
    std::string bname = fresh_name(g, conv.name + "/bnfold_B");
    g.initializers[bname] = std::move(nb);
    if (conv.inputs.size() < 3) conv.inputs.resize(3);
    conv.inputs[1] = wn;
    conv.inputs[2] = bname;
    conv.outputs[0] = bn.outputs[0];
    dead[bi] = true;
    changed = true;
  }
  if (changed) erase_dead(g, dead, stats);
  return Status::ok();
}

// Conv(+bias) [-> Add(residual)] [-> Relu | Clip | LeakyRelu] becomes one kiln.FusedConv placed
// where the last node of the chain was (the residual is computed by then).
Status fuse_conv_chains(Graph& g, PassStats* stats) {
  Uses uses(g);
  std::vector<bool> dead(g.nodes.size(), false);
  bool changed = false;
  for (size_t ci = 0; ci < g.nodes.size(); ++ci) {
    if (dead[ci]) continue;
    const Node& conv = g.nodes[ci];
    if (conv.op_type != "Conv" || !conv.domain.empty() || conv.outputs.size() != 1) continue;
    if (conv.inputs.size() < 2 || conv.inputs.size() > 3) continue;
    const TypeInfo* yt = type_of(g, conv.outputs[0]);
    if (!yt || yt->kind != TypeInfo::Kind::kTensor || yt->dtype != DataType::kFloat) continue;
    std::string cur = conv.outputs[0];
    std::string residual;
    std::vector<size_t> chain;
    // Residual Add: the other operand must have exactly the Conv output's shape (no broadcast).
    if (uses.single_use(cur)) {
      size_t ai = consumer_of(g, cur, dead);
      const Node* a = ai == SIZE_MAX ? nullptr : &g.nodes[ai];
      if (a && a->op_type == "Add" && a->domain.empty() && a->inputs.size() == 2 &&
          a->outputs.size() == 1 && a->inputs[0] != a->inputs[1]) {
        const std::string& other = a->inputs[0] == cur ? a->inputs[1] : a->inputs[0];
        const TypeInfo* ot = type_of(g, other);
        const TypeInfo* at = type_of(g, a->outputs[0]);
        if (!other.empty() && ot && at && same_dims(*ot, *yt) && same_dims(*at, *yt)) {
          residual = other;
          chain.push_back(ai);
          cur = a->outputs[0];
        }
      }
    }
    std::string act;
    std::vector<float> params;
    if (uses.single_use(cur)) {
      size_t ri = consumer_of(g, cur, dead);
      const Node* r = ri == SIZE_MAX ? nullptr : &g.nodes[ri];
      if (r && r->domain.empty() && r->outputs.size() == 1 && !r->inputs.empty() && r->inputs[0] == cur) {
        if (r->op_type == "Relu" && r->inputs.size() == 1) {
          act = "Relu";
        } else if (r->op_type == "LeakyRelu" && r->inputs.size() == 1) {
          act = "LeakyRelu";
          params = {r->attr_float("alpha", 0.01f)};
        } else if (r->op_type == "Clip" && r->inputs.size() <= 3) {
          float lo = -std::numeric_limits<float>::infinity(), hi = std::numeric_limits<float>::infinity();
          bool ok = true;
          for (size_t k = 1; k < r->inputs.size(); ++k) {
            if (r->inputs[k].empty()) continue;
            const Tensor* t = const_f32(g, r->inputs[k]);
            if (!t || t->numel() != 1) { ok = false; break; }
            (k == 1 ? lo : hi) = t->data<float>()[0];
          }
          if (ok) {
            act = "Clip";
            params = {lo, hi};
          }
        }
        if (!act.empty()) {
          chain.push_back(ri);
          cur = r->outputs[0];
        }
      }
    }
    if (chain.empty()) continue;
    Node f;
    f.name = conv.name;
    f.op_type = "FusedConv";
    f.domain = "kiln";
    f.opset = 1;
    f.attrs = conv.attrs;
    f.inputs = conv.inputs;
    f.inputs.resize(4);
    f.inputs[3] = residual;
    while (!f.inputs.empty() && f.inputs.back().empty()) f.inputs.pop_back();
    f.outputs = {cur};
    if (!act.empty()) {
      Attribute a;
      a.name = "activation";
      a.kind = Attribute::Kind::kString;
      a.s = act;
      f.set_attr(a);
      Attribute p;
      p.name = "activation_params";
      p.kind = Attribute::Kind::kFloats;
      p.floats = params;
      f.set_attr(p);
    }
    dead[ci] = true;
    for (size_t k = 0; k + 1 < chain.size(); ++k) dead[chain[k]] = true;
    g.nodes[chain.back()] = std::move(f);
    changed = true;
  }
  if (changed) erase_dead(g, dead, stats);
  return Status::ok();
}

std::vector<size_t> consumers(const Graph& g, const std::string& v, const std::vector<bool>& dead) {
  std::vector<size_t> r;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (dead[i]) continue;
    for (auto& in : g.nodes[i].inputs)
      if (in == v) {
        r.push_back(i);
        break;
      }
  }
  return r;
}

bool const_scalar_near(const Graph& g, const std::string& name, double want) {
  const Tensor* t = const_f32(g, name);
  return t && t->numel() == 1 && std::fabs(double(t->data<float>()[0]) - want) <= 1e-4 * std::fabs(want);
}

bool is_binary(const Node& n, const char* op) {
  return n.domain.empty() && n.op_type == op && n.inputs.size() == 2 && n.outputs.size() == 1;
}

// The operand of binary node n that is not `v` ("" when both are v).
std::string other_operand(const Node& n, const std::string& v) {
  if (n.inputs[0] == v && n.inputs[1] != v) return n.inputs[1];
  if (n.inputs[1] == v && n.inputs[0] != v) return n.inputs[0];
  return "";
}

// Erf-form GELU reading x: Div(x, sqrt2) -> Erf -> Add(., 1) -> Mul(x, .) -> Mul(., 0.5).
// Returns the chain's node indices (last one produces the GELU output) or {}.
std::vector<size_t> match_gelu(const Graph& g, const Uses& uses, const std::string& x,
                               const std::vector<bool>& dead) {
  auto it = uses.count.find(x);
  if (it == uses.count.end() || it->second != 2 || uses.pinned.count(x)) return {};
  std::vector<size_t> cs = consumers(g, x, dead);
  if (cs.size() != 2) return {};
  size_t di = SIZE_MAX, mi = SIZE_MAX;
  for (size_t c : cs) {
    const Node& n = g.nodes[c];
    if (is_binary(n, "Div") && n.inputs[0] == x && const_scalar_near(g, n.inputs[1], std::sqrt(2.0))) di = c;
    else if (is_binary(n, "Mul")) mi = c;
  }
  if (di == SIZE_MAX || mi == SIZE_MAX) return {};
  auto next = [&](size_t i) -> const Node* {
    const std::string& o = g.nodes[i].outputs[0];
    if (!uses.single_use(o)) return nullptr;
    size_t k = consumer_of(g, o, dead);
    return k == SIZE_MAX ? nullptr : &g.nodes[k];
  };
  auto idx = [&](const Node* n) { return static_cast<size_t>(n - g.nodes.data()); };
  const Node* erf = next(di);
  if (!erf || erf->op_type != "Erf" || !erf->domain.empty() || erf->inputs.size() != 1) return {};
  const Node* add = next(idx(erf));
  if (!add || !is_binary(*add, "Add") || !const_scalar_near(g, other_operand(*add, erf->outputs[0]), 1.0))
    return {};
  const Node* mul = next(idx(add));
  if (!mul || idx(mul) != mi || other_operand(*mul, add->outputs[0]) != x) return {};
  const Node* half = next(mi);
  if (!half || !is_binary(*half, "Mul") || !const_scalar_near(g, other_operand(*half, mul->outputs[0]), 0.5))
    return {};
  return {di, idx(erf), idx(add), mi, idx(half)};
}

// MatMul(A, B const 2D) -> Add(bias [N]) [-> GELU | -> Add(residual)] becomes kiln.FusedMatMul.
Status fuse_matmul_chains(Graph& g, PassStats* stats) {
  Uses uses(g);
  std::vector<bool> dead(g.nodes.size(), false);
  bool changed = false;
  for (size_t mi = 0; mi < g.nodes.size(); ++mi) {
    if (dead[mi]) continue;
    const Node& mm = g.nodes[mi];
    if (!is_binary(mm, "MatMul")) continue;
    const Tensor* B = const_f32(g, mm.inputs[1]);
    const TypeInfo* yt = type_of(g, mm.outputs[0]);
    if (!B || B->rank() != 2 || !yt || yt->kind != TypeInfo::Kind::kTensor || yt->dtype != DataType::kFloat)
      continue;
    const int64_t N = B->dim(1);
    std::string cur = mm.outputs[0];
    if (!uses.single_use(cur)) continue;
    size_t ai = consumer_of(g, cur, dead);
    if (ai == SIZE_MAX || !is_binary(g.nodes[ai], "Add")) continue;
    const std::string bias = other_operand(g.nodes[ai], cur);
    const Tensor* bt = const_f32(g, bias);
    if (!bt || bt->numel() != N || bt->rank() < 1 || bt->dim(static_cast<int>(bt->rank()) - 1) != N) continue;
    // The bias must not broadcast the result bigger: a 1-D [N] bias never does (the MatMul output
    // has rank >= 1 and last dim N); any other bias needs the Add's result type to match.
    const TypeInfo* at = type_of(g, g.nodes[ai].outputs[0]);
    if (bt->rank() != 1 && (!at || !same_dims(*at, *yt))) continue;
    std::vector<size_t> chain = {ai};
    cur = g.nodes[ai].outputs[0];
    std::string act, residual;
    std::vector<size_t> gelu = match_gelu(g, uses, cur, dead);
    if (!gelu.empty()) {
      act = "Gelu";
      chain.insert(chain.end(), gelu.begin(), gelu.end());
      cur = g.nodes[gelu.back()].outputs[0];
    } else if (uses.single_use(cur)) {
      size_t ri = consumer_of(g, cur, dead);
      if (ri != SIZE_MAX && is_binary(g.nodes[ri], "Add")) {
        const std::string z = other_operand(g.nodes[ri], cur);
        const TypeInfo* zt = z.empty() ? nullptr : type_of(g, z);
        const TypeInfo* rt = type_of(g, g.nodes[ri].outputs[0]);
        if (zt && rt && same_dims(*zt, *yt) && same_dims(*rt, *yt)) {
          residual = z;
          chain.push_back(ri);
          cur = g.nodes[ri].outputs[0];
        }
      }
    }
    Node f;
    f.name = mm.name;
    f.op_type = "FusedMatMul";
    f.domain = "kiln";
    f.opset = 1;
    f.inputs = {mm.inputs[0], mm.inputs[1], bias};
    if (!residual.empty()) f.inputs.push_back(residual);
    f.outputs = {cur};
    if (!act.empty()) {
      Attribute a;
      a.name = "activation";
      a.kind = Attribute::Kind::kString;
      a.s = act;
      f.set_attr(a);
    }
    dead[mi] = true;
    for (size_t k = 0; k + 1 < chain.size(); ++k) dead[chain[k]] = true;
    g.nodes[chain.back()] = std::move(f);
    changed = true;
  }
  if (changed) erase_dead(g, dead, stats);
  return Status::ok();
}

std::string fresh_value(const std::unordered_set<std::string>& used, const std::string& base) {
  std::string n = base;
  for (int k = 1; used.count(n); ++k) n = base + "_" + std::to_string(k);
  return n;
}

// fresh_value, then reserved in `used`.
std::string take_fresh_value(std::unordered_set<std::string>& used, const std::string& base) {
  std::string v = fresh_value(used, base);
  used.insert(v);
  return v;
}

// The stacked form of fuse_parallel_matmuls (see there) for the members `same` of A `a`.
Status stack_matmuls(Graph& g, std::unordered_set<std::string>& names, const std::string& a,
                     const std::vector<size_t>& same, int64_t K, int64_t N, size_t rank,
                     std::unordered_map<size_t, std::vector<Node>>& replace_at) {
  const int64_t G = static_cast<int64_t>(same.size());
  Shape ws = {G}, bs = {G};
  for (size_t d = 0; d + 2 < rank; ++d) ws.push_back(1);
  ws.push_back(K);
  ws.push_back(N);
  for (size_t d = 0; d + 1 < rank; ++d) bs.push_back(1);
  bs.push_back(N);
  KILN_ASSIGN_OR_RETURN(Tensor W, Tensor::create(DataType::kFloat, ws));
  KILN_ASSIGN_OR_RETURN(Tensor bias, Tensor::create(DataType::kFloat, bs));
  KILN_ASSIGN_OR_RETURN(Tensor axes, Tensor::create(DataType::kInt64, {1}));
  axes.data<int64_t>()[0] = 0;
  for (int64_t m = 0; m < G; ++m) {
    const Tensor* Bm = const_f32(g, g.nodes[same[static_cast<size_t>(m)]].inputs[1]);
    const Tensor* bm = const_f32(g, g.nodes[same[static_cast<size_t>(m)]].inputs[2]);
    std::copy(Bm->data<float>(), Bm->data<float>() + K * N, W.data<float>() + m * K * N);
    std::copy(bm->data<float>(), bm->data<float>() + N, bias.data<float>() + m * N);
  }
  const Node& first = g.nodes[same[0]];
  auto fresh = [&](const std::string& base) { return take_fresh_value(names, base); };
  const std::string wn = fresh(first.name + "/stacked_W"), bn = fresh(first.name + "/stacked_bias"),
                    an = fresh(first.name + "/stacked_axes"), yn = fresh(first.name + "/stacked_Y");
  g.initializers[wn] = std::move(W);
  g.initializers[bn] = std::move(bias);
  g.initializers[an] = std::move(axes);
  std::vector<Node> nodes;
  Node f;
  f.name = fresh(first.name + "/stacked");
  f.op_type = "FusedMatMul";
  f.domain = "kiln";
  f.opset = 1;
  f.inputs = {a, wn, bn};
  f.outputs = {yn};
  nodes.push_back(std::move(f));
  Node sp;
  sp.name = fresh(first.name + "/unstack");
  sp.op_type = "Split";
  sp.opset = 18;
  sp.inputs = {yn};
  Attribute ax;
  ax.name = "axis";
  ax.kind = Attribute::Kind::kInt;
  ax.i = 0;
  sp.set_attr(ax);
  Attribute no;
  no.name = "num_outputs";
  no.kind = Attribute::Kind::kInt;
  no.i = G;
  sp.set_attr(no);
  std::vector<Node> squeezes;
  for (size_t i : same) {
    const std::string part = fresh(g.nodes[i].outputs[0] + "/stacked");
    sp.outputs.push_back(part);
    Node sq;
    sq.name = fresh(g.nodes[i].name + "/squeeze");
    sq.op_type = "Squeeze";
    sq.opset = 13;
    sq.inputs = {part, an};
    sq.outputs = {g.nodes[i].outputs[0]};
    squeezes.push_back(std::move(sq));
  }
  nodes.push_back(std::move(sp));
  for (auto& n : squeezes) nodes.push_back(std::move(n));
  replace_at[same[0]] = std::move(nodes);
  return Status::ok();
}

// Sibling FusedMatMuls reading the same A with constant [K, N_i] weights and [N_i] biases and no
// activation or residual (an attention block's Q, K and V projections) become one FusedMatMul
// over the concatenated weights, then a Split of its last axis into the original outputs: one
// GEMM with N = sum N_i instead of several narrow ones.
// Stacked form (`stacked`, device builds; equal widths N and A of known rank r): the weights are
// stacked as [G, 1 x (r-2), K, N] and the biases as [G, 1 x (r-1), N], so the one FusedMatMul
// gives [G, A's batch dims, M, N] (a strided-batched GEMM reading A G times), and a Split of axis
// 0 + Squeeze gives the original outputs as contiguous blocks: views, no copy, on the CUDA backend.
Status fuse_parallel_matmuls(Graph& g, PassStats* stats, bool stacked) {
  std::unordered_set<std::string> names;
  for (auto& n : g.nodes)
    for (auto& o : n.outputs) names.insert(o);
  for (auto& [k, v] : g.initializers) names.insert(k);
  for (auto& v : g.inputs) names.insert(v.name);
  std::unordered_map<std::string, std::vector<size_t>> by_a;
  std::vector<std::string> order;  // A names in first-use order (deterministic output)
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    if (n.domain != "kiln" || n.op_type != "FusedMatMul" || n.inputs.size() != 3 ||
        n.outputs.size() != 1 || !n.attr_string("activation", "").empty())
      continue;
    const Tensor* B = const_f32(g, n.inputs[1]);
    const Tensor* b = const_f32(g, n.inputs[2]);
    if (!B || !b || B->rank() != 2 || b->rank() != 1 || b->dim(0) != B->dim(1)) continue;
    auto& v = by_a[n.inputs[0]];
    if (v.empty()) order.push_back(n.inputs[0]);
    v.push_back(i);
  }
  std::unordered_map<size_t, std::vector<Node>> replace_at;  // first member -> new nodes
  std::vector<bool> dead(g.nodes.size(), false);
  for (const std::string& a : order) {
    std::vector<size_t> members = by_a[a];
    const int64_t K = const_f32(g, g.nodes[members[0]].inputs[1])->dim(0);
    std::vector<size_t> same;
    for (size_t i : members)
      if (const_f32(g, g.nodes[i].inputs[1])->dim(0) == K) same.push_back(i);
    if (same.size() < 2) continue;
    std::vector<int64_t> widths;
    int64_t total = 0;
    for (size_t i : same) {
      widths.push_back(const_f32(g, g.nodes[i].inputs[1])->dim(1));
      total += widths.back();
    }
    if (stacked) {
      const TypeInfo* at = nullptr;
      if (const ValueInfo* vi = g.find_value_info(a)) at = &vi->type;
      for (auto& in : g.inputs)
        if (!at && in.name == a) at = &in.type;
      if (!at || at->kind != TypeInfo::Kind::kTensor || !at->has_shape || at->dims.size() < 2 ||
          std::any_of(widths.begin(), widths.end(), [&](int64_t w) { return w != widths[0]; }))
        continue;
      KILN_RETURN_IF_ERROR(stack_matmuls(g, names, a, same, K, widths[0], at->dims.size(),
                                         replace_at));
      for (size_t k = 1; k < same.size(); ++k) dead[same[k]] = true;
      if (stats) stats->eliminated += same.size() - 1;
      continue;
    }
    KILN_ASSIGN_OR_RETURN(Tensor W, Tensor::create(DataType::kFloat, {K, total}));
    KILN_ASSIGN_OR_RETURN(Tensor bias, Tensor::create(DataType::kFloat, {total}));
    KILN_ASSIGN_OR_RETURN(Tensor split, Tensor::create(DataType::kInt64, {static_cast<int64_t>(same.size())}));
    int64_t col = 0;
    for (size_t m = 0; m < same.size(); ++m) {
      const Tensor* Bm = const_f32(g, g.nodes[same[m]].inputs[1]);
      const Tensor* bm = const_f32(g, g.nodes[same[m]].inputs[2]);
      const int64_t n = widths[m];
      for (int64_t r = 0; r < K; ++r)
        std::copy(Bm->data<float>() + r * n, Bm->data<float>() + (r + 1) * n,
                  W.data<float>() + r * total + col);
      std::copy(bm->data<float>(), bm->data<float>() + n, bias.data<float>() + col);
      split.data<int64_t>()[m] = n;
      col += n;
    }
    const Node& first = g.nodes[same[0]];
    auto fresh = [&](const std::string& base) { return take_fresh_value(names, base); };
    const std::string wn = fresh(first.name + "/packed_W"), bn = fresh(first.name + "/packed_bias"),
                      sn = fresh(first.name + "/packed_split"), yn = fresh(first.name + "/packed_Y");
    g.initializers[wn] = std::move(W);
    g.initializers[bn] = std::move(bias);
    g.initializers[sn] = std::move(split);
    Node f;
    f.name = fresh(first.name + "/packed");
    f.op_type = "FusedMatMul";
    f.domain = "kiln";
    f.opset = 1;
    f.inputs = {a, wn, bn};
    f.outputs = {yn};
    Node sp;
    sp.name = fresh(first.name + "/unpack");
    sp.op_type = "Split";
    sp.opset = 18;
    sp.inputs = {yn, sn};
    for (size_t i : same) sp.outputs.push_back(g.nodes[i].outputs[0]);
    Attribute ax;
    ax.name = "axis";
    ax.kind = Attribute::Kind::kInt;
    ax.i = -1;
    sp.set_attr(ax);
    replace_at[same[0]] = {std::move(f), std::move(sp)};
    for (size_t k = 1; k < same.size(); ++k) dead[same[k]] = true;
    if (stats) stats->eliminated += same.size() - 1;
  }
  if (replace_at.empty()) return Status::ok();
  std::vector<Node> out;
  out.reserve(g.nodes.size() + replace_at.size());
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (dead[i]) continue;
    auto it = replace_at.find(i);
    if (it == replace_at.end()) {
      out.push_back(std::move(g.nodes[i]));
    } else {
      for (auto& n : it->second) out.push_back(std::move(n));
    }
  }
  g.nodes = std::move(out);
  return Status::ok();
}

// Layout per chain: Conv/FusedConv nodes with constant 4D float32 weights run on NHWC tensors
// (`layout` = "NHWC"; oneDNN's fast direct convolutions use it without reorders). A Transpose
// enters NHWC where a chain starts; every conv also gets a Transpose back to the original NCHW
// name, which DCE drops when only NHWC convs read it. Residuals stay in the chain.
Node make_transpose(const std::string& name, const std::string& x, const std::string& y,
                    std::vector<int64_t> perm) {
  Node t;
  t.name = name;
  t.op_type = "Transpose";
  t.opset = 21;
  t.inputs = {x};
  t.outputs = {y};
  Attribute a;
  a.name = "perm";
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(perm);
  t.set_attr(a);
  return t;
}


// A MaxPool (no Indices) or GlobalAveragePool on a 4-D float32 value that has an NHWC twin.
bool nhwc_pool_candidate(const Graph& g, const Node& n,
                         const std::unordered_map<std::string, std::string>& nhwc) {
  if (!n.domain.empty() || (n.op_type != "MaxPool" && n.op_type != "GlobalAveragePool")) return false;
  if (n.inputs.size() != 1 || n.outputs.empty() || !nhwc.count(n.inputs[0])) return false;
  for (size_t i = 1; i < n.outputs.size(); ++i)
    if (!n.outputs[i].empty()) return false;  // MaxPool's Indices are NCHW positions
  const TypeInfo* xt = type_of(g, n.inputs[0]);
  return xt && xt->kind == TypeInfo::Kind::kTensor && xt->dtype == DataType::kFloat &&
         xt->has_shape && xt->dims.size() == 4;
}

Status choose_conv_layouts(Graph& g, bool nhwc_pools) {
  std::unordered_set<std::string> names;
  for (auto& n : g.nodes)
    for (auto& o : n.outputs) names.insert(o);
  for (auto& [k, v] : g.initializers) names.insert(k);
  for (auto& v : g.inputs) names.insert(v.name);
  std::unordered_map<std::string, std::string> nhwc;  // NCHW value -> its NHWC twin
  std::vector<Node> out;
  out.reserve(g.nodes.size() * 2);
  auto to_nhwc = [&](const std::string& v, const std::string& at) {
    auto it = nhwc.find(v);
    if (it != nhwc.end()) return it->second;
    std::string t = fresh_value(names, v + "/nhwc");
    names.insert(t);
    out.push_back(make_transpose(fresh_value(names, at + "/to_nhwc"), v, t, {0, 2, 3, 1}));
    nhwc[v] = t;
    return t;
  };
  bool changed = false;
  for (auto& n : g.nodes) {
    if (nhwc_pools && nhwc_pool_candidate(g, n, nhwc)) {
      Node p = std::move(n);
      const bool maxpool = p.op_type == "MaxPool";
      Attribute m;
      m.name = "mode";
      m.kind = Attribute::Kind::kString;
      m.s = p.op_type;
      p.set_attr(m);
      p.op_type = "PoolNHWC";
      p.domain = "kiln";
      p.opset = 1;
      p.inputs[0] = nhwc[p.inputs[0]];
      p.outputs.resize(1);
      if (maxpool) {  // NHWC out, with a Transpose back to the NCHW name (dropped when unused)
        const std::string y = p.outputs[0];
        std::string yt = fresh_value(names, y + "/nhwc");
        names.insert(yt);
        p.outputs[0] = yt;
        const std::string pname = p.name;
        out.push_back(std::move(p));
        out.push_back(make_transpose(fresh_value(names, pname + "/to_nchw"), yt, y, {0, 3, 1, 2}));
        nhwc[y] = yt;
      } else {  // [N, C, 1, 1] is the same in both layouts
        out.push_back(std::move(p));
      }
      continue;
    }
    const bool conv = n.domain.empty() && n.op_type == "Conv";
    const bool fconv = n.domain == "kiln" && n.op_type == "FusedConv";
    bool ok = (conv || fconv) && n.outputs.size() == 1 && n.inputs.size() >= 2 &&
              n.attr_string("layout", "NCHW") == "NCHW";
    if (ok) {
      const Tensor* W = const_f32(g, n.inputs[1]);
      const TypeInfo* xt = type_of(g, n.inputs[0]);
      ok = W && W->rank() == 4 && xt && xt->kind == TypeInfo::Kind::kTensor &&
           xt->dtype == DataType::kFloat && xt->has_shape && xt->dims.size() == 4 &&
           (!n.has_input(2) || const_f32(g, n.inputs[2]));
    }
    if (!ok) {
      out.push_back(std::move(n));
      continue;
    }
    Node f = std::move(n);
    if (conv) {
      f.op_type = "FusedConv";
      f.domain = "kiln";
      f.opset = 1;
    }
    f.inputs[0] = to_nhwc(f.inputs[0], f.name);
    if (f.has_input(3)) f.inputs[3] = to_nhwc(f.inputs[3], f.name);
    const std::string y = f.outputs[0];
    std::string yt = fresh_value(names, y + "/nhwc");
    names.insert(yt);
    f.outputs[0] = yt;
    Attribute a;
    a.name = "layout";
    a.kind = Attribute::Kind::kString;
    a.s = "NHWC";
    f.set_attr(a);
    const std::string fname = f.name;
    out.push_back(std::move(f));
    out.push_back(make_transpose(fresh_value(names, fname + "/to_nchw"), yt, y, {0, 3, 1, 2}));
    nhwc[y] = yt;
    changed = true;
  }
  g.nodes = std::move(out);
  (void)changed;
  return Status::ok();
}

// Every entry of ints attribute `name` equals v (or the attribute is absent).
bool ints_all(const Node& n, const char* name, int64_t v) {
  for (int64_t x : n.attr_ints(name))
    if (x != v) return false;
  return true;
}

// An NHWC FusedConv (not a block) with one output and a constant float32 4-D weight (and bias,
// when it has one); its weight, or null.
const Tensor* nhwc_conv_weight(const Graph& g, const Node& n) {
  if (n.domain != "kiln" || n.op_type != "FusedConv" || n.outputs.size() != 1 ||
      n.inputs.size() < 2 || n.attr_string("layout") != "NHWC" || n.has_attr("kiln_block"))
    return nullptr;
  const Tensor* W = const_f32(g, n.inputs[1]);
  if (!W || W->rank() != 4 || (n.has_input(2) && !const_f32(g, n.inputs[2]))) return nullptr;
  return W;
}

// A pointwise conv [N, K, 1, 1] (stride 1, no pads, one group) with the given K (or any K < 0).
bool is_pointwise(const Node& n, const Tensor& W, int64_t K) {
  return W.dim(2) == 1 && W.dim(3) == 1 && (K < 0 || W.dim(1) == K) &&
         n.attr_int("group", 1) == 1 && ints_all(n, "strides", 1) && ints_all(n, "pads", 0) &&
         ints_all(n, "dilations", 1) && n.attr_string("auto_pad", "NOTSET") == "NOTSET";
}

// Inverted-residual blocks: NHWC FusedConv 1x1 (expand) -> depthwise 3x3 (stride 1 or 2, pads
// <= 1) -> 1x1 (project, optional residual), the two intermediates read only by the next conv,
// become one FusedConv in block form (fused::is_mbconv_block), which only the CPU backend runs
// (its cpu.mbconv tactics time the fused kernel against the three convs). A depthwise conv whose
// input is not such an expand's (MobileNetV2's features.1) makes a block without one: depthwise
// -> project (W1, B1 empty); KILN_CPU_MBCONV_NOEXP=0 (read at build time) makes none (A/B).
Status fuse_mbconv_blocks(Graph& g, PassStats* stats) {
  KILN_RETURN_IF_ERROR(eliminate_dead_code(g));  // the layout pass's unused Transposes back
  const char* noexp_env = std::getenv("KILN_CPU_MBCONV_NOEXP");
  const bool noexp = !(noexp_env && noexp_env[0] == '0' && noexp_env[1] == 0);
  Uses uses(g);
  std::vector<bool> dead(g.nodes.size(), false);
  bool changed = false;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (dead[i]) continue;
    const Node& first = g.nodes[i];
    const Tensor* W0 = nhwc_conv_weight(g, first);
    if (!W0 || first.has_input(3)) continue;
    // The expand (ai, or SIZE_MAX: none) and the depthwise conv (bi).
    size_t ai = SIZE_MAX, bi = i;
    const int64_t ce = W0->dim(0);
    if (is_pointwise(first, *W0, -1)) {
      if (!uses.single_use(first.outputs[0])) continue;
      ai = i;
      bi = consumer_of(g, first.outputs[0], dead);
      if (bi == SIZE_MAX || bi <= ai) continue;
    } else if (!noexp) {
      continue;
    }
    const Node* a = ai == SIZE_MAX ? nullptr : &g.nodes[ai];
    const Node& b = g.nodes[bi];
    const Tensor* W2 = nhwc_conv_weight(g, b);
    if (!W2 || b.has_input(3) || (a && b.inputs[0] != a->outputs[0]) || W2->dim(0) != ce ||
        W2->dim(1) != 1 || W2->dim(2) != 3 || W2->dim(3) != 3 || b.attr_int("group", 1) != ce ||
        !ints_all(b, "dilations", 1) || b.attr_string("auto_pad", "NOTSET") != "NOTSET" ||
        !uses.single_use(b.outputs[0]))
      continue;
    const std::vector<int64_t> st = b.attr_ints("strides", {1, 1}), pads = b.attr_ints("pads", {0, 0, 0, 0});
    if (st.size() != 2 || st[0] != st[1] || (st[0] != 1 && st[0] != 2) || pads.size() != 4) continue;
    bool pads_ok = true;
    for (int64_t p : pads) pads_ok = pads_ok && p >= 0 && p <= 1;
    if (!pads_ok) continue;
    const size_t ci = consumer_of(g, b.outputs[0], dead);
    if (ci == SIZE_MAX || ci <= bi) continue;
    const Node& c = g.nodes[ci];
    const Tensor* W3 = nhwc_conv_weight(g, c);
    if (!W3 || c.inputs[0] != b.outputs[0] || !is_pointwise(c, *W3, ce) || c.inputs.size() > 4) continue;
    Node blk;
    blk.name = c.name + "/mbconv";
    blk.op_type = "FusedConv";
    blk.domain = "kiln";
    blk.opset = 1;
    const std::string& x = a ? a->inputs[0] : b.inputs[0];
    blk.inputs = {x, a ? a->inputs[1] : "", a && a->has_input(2) ? a->inputs[2] : "", b.inputs[1],
                  b.has_input(2) ? b.inputs[2] : "", c.inputs[1], c.has_input(2) ? c.inputs[2] : ""};
    blk.outputs = c.outputs;
    Attribute s;
    s.kind = Attribute::Kind::kString;
    s.name = "layout", s.s = "NHWC";
    blk.set_attr(s);
    s.name = "kiln_block", s.s = "mbconv";
    blk.set_attr(s);
    if (c.has_input(3)) {
      if (c.inputs[3] == x) {
        Attribute r;
        r.name = "kiln_mbconv_residual_x";
        r.kind = Attribute::Kind::kInt;
        r.i = 1;
        blk.set_attr(r);
      } else {
        blk.inputs.push_back(c.inputs[3]);
      }
    }
    const Node* parts[3] = {a, &b, &c};
    for (int k = a ? 0 : 1; k < 3; ++k)
      for (const Attribute& at : parts[k]->attrs) {
        Attribute p = at;
        p.name = "mb" + std::to_string(k) + "." + at.name;
        blk.set_attr(p);
      }
    g.nodes[ci] = std::move(blk);
    if (a) dead[ai] = true;
    dead[bi] = true;
    changed = true;
  }
  if (changed) erase_dead(g, dead, stats);
  return Status::ok();
}

// KILN_CPU_MBCONV=0 (read at build time): no block fusion (A/B against the unfused graph).
bool mbconv_env_off() {
  const char* e = std::getenv("KILN_CPU_MBCONV");
  return e && e[0] == '0' && e[1] == 0;
}

}  // namespace

// NHWC FusedConv (few input channels) -> MaxPool PoolNHWC, the conv's output read by the pool
// alone, in 16-bit floats: one kiln.FusedConvPool (ResNet's stem on CUDA: one kernel instead of
// im2col, GEMM and pool). The limits are the CUDA kernel's (kernels_conv_pool.cu): C <= 4,
// 8 <= M <= 64 with M % 8 == 0, R, S <= 8 (so that a tile's input patch, at most 24 x 40
// pixels, fits its buffer), conv strides 1-2, one group, no dilation, no
// residual, activation none or Relu; pool windows of 1-3 with strides 1-2, no dilation, no
// ceil_mode, pads smaller than the window. KILN_CUDA_CONV_POOL=0 (read at build time): off.
// A float32 NCHW -> NHWC Transpose feeding the conv alone is folded in too (x_layout "NCHW") at
// small batches (X's batch dim, else `max_batch`: the engine's --batch).
Status fuse_conv_maxpool(Graph& g, PassStats* stats, int64_t max_batch) {
  constexpr int64_t kFoldXMaxBatch = 16;
  if (const char* e = std::getenv("KILN_CUDA_CONV_POOL"); e && e[0] == '0' && e[1] == 0)
    return Status::ok();
  const char* fx = std::getenv("KILN_CUDA_CONV_POOL_X");
  const bool fold_x = !(fx && fx[0] == '0' && fx[1] == 0);
  Uses uses(g);
  std::vector<bool> dead(g.nodes.size(), false);
  bool changed = false;
  auto in_range = [](const std::vector<int64_t>& v, size_t n, int64_t lo, int64_t hi) {
    if (v.size() != n) return false;
    for (int64_t x : v)
      if (x < lo || x > hi) return false;
    return true;
  };
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& c = g.nodes[i];
    if (c.domain != "kiln" || c.op_type != "FusedConv" || c.has_attr("kiln_block") ||
        c.attr_string("layout") != "NHWC" || c.outputs.size() != 1 || c.inputs.size() < 2 ||
        c.inputs.size() > 3 || !uses.single_use(c.outputs[0]))
      continue;
    const Tensor* wp = const_any(g, c.inputs[1]);
    if (!wp) continue;
    const Tensor& W = *wp;
    const TypeInfo* xt = type_of(g, c.inputs[0]);
    if (!xt || xt->kind != TypeInfo::Kind::kTensor || !xt->has_shape || xt->dims.size() != 4 ||
        (xt->dtype != DataType::kFloat16 && xt->dtype != DataType::kBFloat16))
      continue;
    if (W.rank() != 4 || W.dim(1) > 4 || W.dim(0) % 8 != 0 || W.dim(0) > 64 || W.dim(2) > 8 ||
        W.dim(3) > 8 || c.attr_int("group", 1) != 1 || !ints_all(c, "dilations", 1) ||
        c.attr_string("auto_pad", "NOTSET") != "NOTSET" ||
        !in_range(c.attr_ints("strides", {1, 1}), 2, 1, 2))
      continue;
    const std::string act = c.attr_string("activation", "");
    if (act != "" && act != "Relu") continue;
    const std::vector<int64_t> cpads = c.attr_ints("pads", {0, 0, 0, 0});
    if (cpads.size() != 4 || !in_range({cpads[0], cpads[2]}, 2, 0, W.dim(2) - 1) ||
        !in_range({cpads[1], cpads[3]}, 2, 0, W.dim(3) - 1))
      continue;
    if (c.has_input(2)) {
      const Tensor* B = const_any(g, c.inputs[2]);
      if (!B || B->numel() != W.dim(0)) continue;
    }
    const size_t pi = consumer_of(g, c.outputs[0], dead);
    if (pi == SIZE_MAX || pi <= i) continue;
    const Node& p = g.nodes[pi];
    if (p.domain != "kiln" || p.op_type != "PoolNHWC" || p.attr_string("mode") != "MaxPool" ||
        p.inputs.size() != 1 || p.outputs.size() != 1 || p.attr_int("ceil_mode", 0) != 0 ||
        p.attr_string("auto_pad", "NOTSET") != "NOTSET" || !ints_all(p, "dilations", 1) ||
        p.attr_int("storage_order", 0) != 0)
      continue;
    const std::vector<int64_t> pk = p.attr_ints("kernel_shape");
    const std::vector<int64_t> pp = p.attr_ints("pads", {0, 0, 0, 0});
    if (!in_range(pk, 2, 1, 3) || !in_range(p.attr_ints("strides", {1, 1}), 2, 1, 2) ||
        pp.size() != 4 || !in_range({pp[0], pp[2]}, 2, 0, pk[0] - 1) ||
        !in_range({pp[1], pp[3]}, 2, 0, pk[1] - 1))
      continue;
    Node f;
    f.name = p.name;
    f.op_type = "FusedConvPool";
    f.domain = "kiln";
    f.opset = 1;
    f.inputs = c.inputs;
    f.outputs = p.outputs;
    for (const Attribute& a : c.attrs) f.set_attr(a);
    for (const Attribute& a : p.attrs) {
      Attribute q = a;
      q.name = "pool." + a.name;
      f.set_attr(q);
    }
    // X from the layout Transpose of a float32 NCHW value (the model input; its cast to 16 bits
    // folded in: kiln_to), read by nothing else: the kernel reads the NCHW value itself, one
    // kernel fewer, at batches up to kFoldXMaxBatch (X's batch, else the engine's maximum).
    // H100, ResNet-50: batch 1 0.248-0.249 ms folded vs 0.250 not; batch 256 6.79-6.80 vs
    // 6.75-6.78 ms (the float32 planes cost more to gather than the Transpose saves).
    // KILN_CUDA_CONV_POOL_X=0 (read at build time): never.
    const int64_t batch = xt->dims[0].known() ? xt->dims[0].value : max_batch;
    auto ti = uses.producer.find(c.inputs[0]);
    if (fold_x && batch > 0 && batch <= kFoldXMaxBatch && ti != uses.producer.end() &&
        ti->second < i && !dead[ti->second] && uses.single_use(c.inputs[0])) {
      const Node& t = g.nodes[ti->second];
      const TypeInfo* st = t.inputs.size() == 1 ? type_of(g, t.inputs[0]) : nullptr;
      if (t.domain.empty() && t.op_type == "Transpose" && t.outputs.size() == 1 &&
          t.attr_ints("perm") == std::vector<int64_t>{0, 2, 3, 1} &&
          t.attr_int("kiln_to", static_cast<int64_t>(xt->dtype)) ==
              static_cast<int64_t>(xt->dtype) &&
          st && st->kind == TypeInfo::Kind::kTensor && st->dtype == DataType::kFloat &&
          st->has_shape && st->dims.size() == 4) {
        f.inputs[0] = t.inputs[0];
        Attribute l;
        l.name = "x_layout";
        l.kind = Attribute::Kind::kString;
        l.s = "NCHW";
        f.set_attr(l);
        dead[ti->second] = true;
      }
    }
    g.nodes[pi] = std::move(f);
    dead[i] = true;
    changed = true;
  }
  if (changed) erase_dead(g, dead, stats);
  return Status::ok();
}

Status run_fusion_passes(Graph& g, const FusionOptions& opts, PassStats* stats) {
  if (!opts.enable) return Status::ok();
  KILN_RETURN_IF_ERROR(fold_batchnorm_into_conv(g, stats));
  KILN_RETURN_IF_ERROR(fuse_conv_chains(g, stats));
  KILN_RETURN_IF_ERROR(fuse_matmul_chains(g, stats));
  if (opts.pack_parallel_matmuls)
    KILN_RETURN_IF_ERROR(fuse_parallel_matmuls(g, stats, opts.stack_parallel_matmuls));
  if (opts.conv_layouts) KILN_RETURN_IF_ERROR(choose_conv_layouts(g, opts.nhwc_pools));
  if (opts.conv_layouts && opts.mbconv_blocks && !mbconv_env_off())
    KILN_RETURN_IF_ERROR(fuse_mbconv_blocks(g, stats));
  return Status::ok();
}

}  // namespace kiln
