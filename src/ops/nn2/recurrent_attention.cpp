// Newer sequence-model ops: LinearAttention and CausalConvWithState (opset 27), and
// FlexAttention (ai.onnx.preview, with optional score_mod / prob_mod subgraphs).
#include <cmath>
#include <limits>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

Status eval_causal_conv_state(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* w, nn2::req_float(ctx, in, 1));
  const Tensor* bias = opt_tensor(in, 2);
  const Tensor* past = opt_tensor(in, 3);
  const std::string act = ctx.node.attr_string("activation", "none");
  if (act != "none" && act != "silu" && act != "swish")
    return ctx.bad_input("unsupported activation '" + act + "'");
  if (x->rank() != 3)
    return ctx.bad_input("input must be [batch, channels, length], got " + x->describe());
  const int64_t B = x->dim(0), C = x->dim(1), L = x->dim(2);
  if (w->rank() != 3 || w->dim(0) != C || w->dim(1) != 1 || w->dim(2) < 1)
    return ctx.bad_input("weight must be [channels, 1, k], got " + w->describe());
  const int64_t K = w->dim(2), P = K - 1;
  if (bias && (bias->rank() != 1 || bias->dim(0) != C))
    return ctx.bad_input("bias must be [channels]");
  if (past && past->shape() != Shape{B, C, P})
    return ctx.bad_input("past_state must be " + shape_str({B, C, P}) + ", got " +
                         past->describe());
  const std::vector<double> xv = nn2::to_f64(*x), wv = nn2::to_f64(*w);
  const std::vector<double> bv =
      bias ? nn2::to_f64(*bias) : std::vector<double>(static_cast<size_t>(C), 0.0);
  const std::vector<double> pv =
      past ? nn2::to_f64(*past) : std::vector<double>(static_cast<size_t>(B * C * P), 0.0);
  const DataType dt = x->dtype();
  std::vector<double> y(static_cast<size_t>(B * C * L)), st(static_cast<size_t>(B * C * P));
  std::vector<double> padded(static_cast<size_t>(P + L));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const size_t bc = static_cast<size_t>(b * C + c);
      for (int64_t i = 0; i < P; ++i) padded[static_cast<size_t>(i)] = pv[bc * P + i];
      for (int64_t i = 0; i < L; ++i) padded[static_cast<size_t>(P + i)] = xv[bc * L + i];
      for (int64_t i = 0; i < L; ++i) {
        double s = bv[static_cast<size_t>(c)];
        for (int64_t k = 0; k < K; ++k)
          s += padded[static_cast<size_t>(i + k)] * wv[static_cast<size_t>(c * K + k)];
        if (act != "none") {
          s = nn2::round_to(dt, s);
          s = s / (1.0 + std::exp(-s));
        }
        y[bc * L + i] = s;
      }
      for (int64_t i = 0; i < P; ++i) st[bc * P + i] = padded[static_cast<size_t>(L + i)];
    }
  if (nn2::wants(ctx, out, 0)) {
    KILN_ASSIGN_OR_RETURN(out[0], nn2::from_f64(dt, x->shape(), y));
  }
  if (nn2::wants(ctx, out, 1)) {
    KILN_ASSIGN_OR_RETURN(out[1], nn2::from_f64(past ? past->dtype() : dt, {B, C, P}, st));
  }
  return Status::ok();
}

Status eval_linear_attention(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* q, nn2::req_float(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* k, nn2::req_float(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* v, nn2::req_float(ctx, in, 2));
  const Tensor* past = opt_tensor(in, 3);
  const Tensor* decay = opt_tensor(in, 4);
  const Tensor* beta = opt_tensor(in, 5);
  const Node& n = ctx.node;
  const std::string rule = n.attr_string("update_rule", "gated_delta");
  if (rule != "linear" && rule != "gated" && rule != "delta" && rule != "gated_delta")
    return ctx.bad_input("unsupported update_rule '" + rule + "'");
  const bool gating = rule == "gated" || rule == "gated_delta";
  const bool delta = rule == "delta" || rule == "gated_delta";
  if (gating != (decay != nullptr))
    return ctx.bad_input("update_rule '" + rule + "' " + (gating ? "requires" : "forbids") +
                         " decay");
  if (delta != (beta != nullptr))
    return ctx.bad_input("update_rule '" + rule + "' " + (delta ? "requires" : "forbids") +
                         " beta");
  const int64_t Hq = n.attr_int("q_num_heads", 0), Hkv = n.attr_int("kv_num_heads", 0);
  if (Hq <= 0 || Hkv <= 0 || Hq % Hkv != 0)
    return ctx.bad_input("q_num_heads must be a positive multiple of kv_num_heads");
  if (q->rank() != 3 || k->rank() != 3 || v->rank() != 3)
    return ctx.bad_input("query, key and value must be 3-D [B, T, H*D]");
  const int64_t B = q->dim(0), T = q->dim(1);
  if (q->dim(2) % Hq != 0 || v->dim(2) % Hkv != 0)
    return ctx.bad_input("hidden sizes not divisible by heads");
  const int64_t dk = q->dim(2) / Hq, dv = v->dim(2) / Hkv;
  if (k->shape() != Shape{B, T, Hkv * dk} || v->dim(0) != B || v->dim(1) != T)
    return ctx.bad_input("key/value shapes do not match query");
  int64_t dlast = 0, blast = 0;
  if (decay) {
    dlast = decay->rank() == 3 ? decay->dim(2) : -1;
    if (decay->rank() != 3 || decay->dim(0) != B || decay->dim(1) != T ||
        (dlast != Hkv && dlast != Hkv * dk))
      return ctx.bad_input("decay must be [B, T, kv_heads] or [B, T, kv_heads*d_k], got " +
                           decay->describe());
  }
  if (beta) {
    blast = beta->rank() == 3 ? beta->dim(2) : -1;
    if (beta->rank() != 3 || beta->dim(0) != B || beta->dim(1) != T || (blast != Hkv && blast != 1))
      return ctx.bad_input("beta must be [B, T, kv_heads] or [B, T, 1], got " + beta->describe());
  }
  if (past && past->shape() != Shape{B, Hkv, dk, dv})
    return ctx.bad_input("past_state must be " + shape_str({B, Hkv, dk, dv}) + ", got " +
                         past->describe());
  double scale = n.attr_float("scale", 0.0f);
  if (scale == 0.0) scale = 1.0 / std::sqrt(double(dk));
  const std::vector<double> qv = nn2::to_f64(*q), kv = nn2::to_f64(*k), vv = nn2::to_f64(*v);
  const std::vector<double> dcv = decay ? nn2::to_f64(*decay) : std::vector<double>();
  const std::vector<double> btv = beta ? nn2::to_f64(*beta) : std::vector<double>();
  std::vector<double> S =
      past ? nn2::to_f64(*past) : std::vector<double>(static_cast<size_t>(B * Hkv * dk * dv), 0.0);
  std::vector<double> y(static_cast<size_t>(B * T * Hq * dv));
  std::vector<double> vt(static_cast<size_t>(dv));
  const int64_t group = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < Hkv; ++h) {
        double* st = S.data() + ((b * Hkv + h) * dk) * dv;
        const double* kt = kv.data() + (b * T + t) * Hkv * dk + h * dk;
        if (gating) {
          for (int64_t d = 0; d < dk; ++d) {
            const double g = dlast == Hkv
                                 ? dcv[static_cast<size_t>((b * T + t) * Hkv + h)]
                                 : dcv[static_cast<size_t>((b * T + t) * Hkv * dk + h * dk + d)];
            const double e = std::exp(g);
            for (int64_t m = 0; m < dv; ++m) st[d * dv + m] *= e;
          }
        }
        for (int64_t m = 0; m < dv; ++m)
          vt[static_cast<size_t>(m)] = vv[static_cast<size_t>((b * T + t) * Hkv * dv + h * dv + m)];
        if (delta) {
          const double bt = btv[static_cast<size_t>((b * T + t) * blast + (blast == 1 ? 0 : h))];
          for (int64_t m = 0; m < dv; ++m) {
            double r = 0;
            for (int64_t d = 0; d < dk; ++d) r += st[d * dv + m] * kt[d];
            vt[static_cast<size_t>(m)] = bt * (vt[static_cast<size_t>(m)] - r);
          }
        }
        for (int64_t d = 0; d < dk; ++d)
          for (int64_t m = 0; m < dv; ++m) st[d * dv + m] += kt[d] * vt[static_cast<size_t>(m)];
      }
      for (int64_t h = 0; h < Hq; ++h) {
        const double* st = S.data() + ((b * Hkv + h / group) * dk) * dv;
        const double* qt = qv.data() + (b * T + t) * Hq * dk + h * dk;
        for (int64_t m = 0; m < dv; ++m) {
          double s = 0;
          for (int64_t d = 0; d < dk; ++d) s += qt[d] * st[d * dv + m];
          y[static_cast<size_t>((b * T + t) * Hq * dv + h * dv + m)] = scale * s;
        }
      }
    }
  if (nn2::wants(ctx, out, 0)) {
    KILN_ASSIGN_OR_RETURN(out[0], nn2::from_f64(q->dtype(), {B, T, Hq * dv}, y));
  }
  if (nn2::wants(ctx, out, 1)) {
    KILN_ASSIGN_OR_RETURN(out[1],
                          nn2::from_f64(past ? past->dtype() : q->dtype(), {B, Hkv, dk, dv}, S));
  }
  return Status::ok();
}

// Runs a score_mod / prob_mod graph on a [B, H, L, S] tensor, in place.
Status run_mod(OpContext& ctx, const Graph* g, DataType dt, const Shape& shape,
               std::vector<double>& vals, const char* what) {
  if (!g) return Status::ok();
  if (!ctx.run_subgraph) return ctx.fail(std::string("no subgraph runner for ") + what);
  KILN_ASSIGN_OR_RETURN(Tensor t, nn2::from_f64(dt, shape, vals));
  std::vector<Value> ins;
  ins.emplace_back(std::move(t));
  KILN_ASSIGN_OR_RETURN(std::vector<Value> outs, ctx.run_subgraph(*g, std::move(ins)));
  if (outs.size() != 1 || !outs[0].is_tensor() ||
      outs[0].tensor.numel() != static_cast<int64_t>(vals.size()) ||
      !nn2::is_float_type(outs[0].tensor.dtype()))
    return ctx.fail(std::string(what) + " must return one float tensor of shape " +
                    shape_str(shape));
  vals = nn2::to_f64(outs[0].tensor);
  return Status::ok();
}

Status eval_flex_attention(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* q, nn2::req_float(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* k, nn2::req_float(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* v, nn2::req_float(ctx, in, 2));
  if (q->rank() != 4 || k->rank() != 4 || v->rank() != 4)
    return ctx.bad_input("Q, K, V must be 4-D");
  const int64_t B = q->dim(0), Hq = q->dim(1), L = q->dim(2), E = q->dim(3);
  const int64_t Hkv = k->dim(1), S = k->dim(2), Ev = v->dim(3);
  if (k->dim(0) != B || v->dim(0) != B || k->dim(3) != E || v->dim(1) != Hkv || v->dim(2) != S)
    return ctx.bad_input("incompatible Q/K/V shapes");
  if (Hkv <= 0 || Hq % Hkv != 0) return ctx.bad_input("q heads must be a multiple of kv heads");
  const Node& n = ctx.node;
  const DataType dt = q->dtype();
  DataType cdt = dt == DataType::kFloat16 || dt == DataType::kBFloat16 ? DataType::kFloat : dt;
  if (n.has_attr("softmax_precision")) {
    cdt = static_cast<DataType>(n.attr_int("softmax_precision", 1));
    if (!nn2::is_float_type(cdt)) return ctx.bad_input("softmax_precision must be a float type");
  }
  double scale = n.has_attr("scale") ? n.attr_float("scale", 1.0f) : 1.0 / std::sqrt(double(E));
  {
    const double s = nn2::round_to(dt, static_cast<float>(std::sqrt(static_cast<float>(scale))));
    scale = s * s;
  }
  const std::vector<double> qv = nn2::to_f64(*q), kv = nn2::to_f64(*k), vv = nn2::to_f64(*v);
  const int64_t group = Hq / Hkv;
  const Shape sshape = {B, Hq, L, S};
  std::vector<double> sc(static_cast<size_t>(B * Hq * L * S));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < S; ++j) {
          double s = 0;
          for (int64_t e = 0; e < E; ++e)
            s += qv[static_cast<size_t>(((b * Hq + h) * L + i) * E + e)] *
                 kv[static_cast<size_t>(((b * Hkv + h / group) * S + j) * E + e)];
          sc[static_cast<size_t>(((b * Hq + h) * L + i) * S + j)] = nn2::round_to(cdt, s * scale);
        }
  KILN_RETURN_IF_ERROR(run_mod(ctx, n.attr_graph("score_mod"), cdt, sshape, sc, "score_mod"));
  for (int64_t r = 0; r < B * Hq * L; ++r) {
    double* row = sc.data() + r * S;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < S; ++j) mx = std::max(mx, row[j]);
    double sum = 0;
    for (int64_t j = 0; j < S; ++j) sum += (row[j] = std::exp(row[j] - mx));
    for (int64_t j = 0; j < S; ++j) row[j] = nn2::round_to(cdt, row[j] / sum);
  }
  KILN_RETURN_IF_ERROR(run_mod(ctx, n.attr_graph("prob_mod"), cdt, sshape, sc, "prob_mod"));
  std::vector<double> y(static_cast<size_t>(B * Hq * L * Ev));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t e = 0; e < Ev; ++e) {
          double s = 0;
          for (int64_t j = 0; j < S; ++j)
            s += sc[static_cast<size_t>(((b * Hq + h) * L + i) * S + j)] *
                 vv[static_cast<size_t>(((b * Hkv + h / group) * S + j) * Ev + e)];
          y[static_cast<size_t>(((b * Hq + h) * L + i) * Ev + e)] = s;
        }
  if (nn2::wants(ctx, out, 0)) {
    KILN_ASSIGN_OR_RETURN(out[0], nn2::from_f64(v->dtype(), {B, Hq, L, Ev}, y));
  }
  return Status::ok();
}

Status infer_causal_conv_state(InferContext& ctx) {
  const TypeInfo* x = nn2::in_type(ctx, 0);
  const TypeInfo* w = nn2::in_type(ctx, 1);
  if (!x) return Status::ok();
  nn2::set_out(ctx, 0, *x);
  const Dim k = nn2::dim_at(w, 2);
  nn2::set_out(ctx, 1,
               nn2::tensor_type(x->dtype, {nn2::dim_at(x, 0), nn2::dim_at(x, 1),
                                           k.known() ? Dim::of(k.value - 1) : Dim{}}));
  return Status::ok();
}

Status infer_linear_attention(InferContext& ctx) {
  const TypeInfo* q = nn2::in_type(ctx, 0);
  const TypeInfo* v = nn2::in_type(ctx, 2);
  const TypeInfo* past = nn2::in_type(ctx, 3);
  if (!q) return Status::ok();
  const int64_t hq = ctx.node.attr_int("q_num_heads", 0),
                hkv = ctx.node.attr_int("kv_num_heads", 0);
  if (hq <= 0 || hkv <= 0) return Status::ok();
  const Dim qh = nn2::dim_at(q, 2), vh = nn2::dim_at(v, 2);
  const Dim dk = qh.known() ? Dim::of(qh.value / hq) : Dim{};
  const Dim dv = vh.known() ? Dim::of(vh.value / hkv) : Dim{};
  nn2::set_out(ctx, 0,
               nn2::tensor_type(q->dtype, {nn2::dim_at(q, 0), nn2::dim_at(q, 1),
                                           nn2::dim_mul(Dim::of(hq), dv)}));
  nn2::set_out(
      ctx, 1,
      nn2::tensor_type(past ? past->dtype : q->dtype, {nn2::dim_at(q, 0), Dim::of(hkv), dk, dv}));
  return Status::ok();
}

Status infer_flex_attention(InferContext& ctx) {
  const TypeInfo* q = nn2::in_type(ctx, 0);
  const TypeInfo* v = nn2::in_type(ctx, 2);
  if (!q || !v) return Status::ok();
  nn2::set_out(ctx, 0,
               nn2::tensor_type(v->dtype, {nn2::dim_at(q, 0), nn2::dim_at(q, 1), nn2::dim_at(q, 2),
                                           nn2::dim_at(v, 3)}));
  return Status::ok();
}

}  // namespace

const OpDef kOp_CausalConvWithState = {"CausalConvWithState", "", &eval_causal_conv_state,
                                       &infer_causal_conv_state};
const OpDef kOp_LinearAttention = {"LinearAttention", "", &eval_linear_attention,
                                   &infer_linear_attention};
const OpDef kOp_preview_FlexAttention = {"FlexAttention", "ai.onnx.preview", &eval_flex_attention,
                                         &infer_flex_attention};

}  // namespace kiln
