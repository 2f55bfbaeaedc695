// Attention (opset 23/24), RotaryEmbedding (23), SwiGLU.
#include <cmath>
#include <limits>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// A [B, H, S, D] view of a 4-D tensor, or of a 3-D [B, S, H*D] tensor.
struct HeadView {
  const std::vector<double>* v = nullptr;
  int64_t B = 0, H = 0, S = 0, D = 0;
  bool three_d = false;
  double at(int64_t b, int64_t h, int64_t s, int64_t d) const {
    size_t i = three_d ? static_cast<size_t>(((b * S + s) * H + h) * D + d)
                       : static_cast<size_t>(((b * H + h) * S + s) * D + d);
    return (*v)[i];
  }
};

Result<HeadView> head_view(const OpContext& ctx, const Tensor& t, const std::vector<double>& v,
                           int64_t heads, const char* what) {
  HeadView hv;
  hv.v = &v;
  if (t.rank() == 4) {
    hv.B = t.dim(0), hv.H = t.dim(1), hv.S = t.dim(2), hv.D = t.dim(3);
  } else if (t.rank() == 3) {
    if (heads <= 0 || t.dim(2) % heads != 0)
      return ctx.bad_input(std::string(what) + " hidden size " + std::to_string(t.dim(2)) +
                           " is not divisible by its num_heads attribute (" +
                           std::to_string(heads) + ")");
    hv.B = t.dim(0), hv.S = t.dim(1), hv.H = heads, hv.D = t.dim(2) / heads;
    hv.three_d = true;
  } else {
    return ctx.bad_input(std::string(what) + " must be 3-D or 4-D, got " + t.describe());
  }
  return hv;
}

Status eval_attention(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* q, nn2::req_float(ctx, inputs, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* k, nn2::req_float(ctx, inputs, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* v, nn2::req_float(ctx, inputs, 2));
  const Tensor* mask = opt_tensor(inputs, 3);
  const Tensor* past_k = opt_tensor(inputs, 4);
  const Tensor* past_v = opt_tensor(inputs, 5);
  const Tensor* nonpad = opt_tensor(inputs, 6);
  const Node& n = ctx.node;
  if (q->rank() != k->rank() || q->rank() != v->rank())
    return ctx.bad_input("Q, K and V must have the same rank");
  if ((past_k == nullptr) != (past_v == nullptr))
    return ctx.bad_input("past_key and past_value must be given together");
  if (nonpad && past_k) return ctx.bad_input("nonpad_kv_seqlen cannot be combined with past_key");
  const DataType dt = q->dtype();
  const std::vector<double> qv = nn2::to_f64(*q), kv = nn2::to_f64(*k), vv = nn2::to_f64(*v);
  KILN_ASSIGN_OR_RETURN(HeadView Q, head_view(ctx, *q, qv, n.attr_int("q_num_heads", 0), "Q"));
  KILN_ASSIGN_OR_RETURN(HeadView K, head_view(ctx, *k, kv, n.attr_int("kv_num_heads", 0), "K"));
  KILN_ASSIGN_OR_RETURN(HeadView V, head_view(ctx, *v, vv, n.attr_int("kv_num_heads", 0), "V"));
  const int64_t B = Q.B, Hq = Q.H, S = Q.S, Dh = Q.D, Hkv = K.H, L = K.S, Dv = V.D;
  if (K.B != B || V.B != B || V.H != Hkv || V.S != L || K.D != Dh)
    return ctx.bad_input("incompatible Q/K/V shapes " + shape_str(q->shape()) + ", " +
                         shape_str(k->shape()) + ", " + shape_str(v->shape()));
  if (Hkv <= 0 || Hq % Hkv != 0)
    return ctx.bad_input("q heads (" + std::to_string(Hq) + ") must be a multiple of kv heads (" +
                         std::to_string(Hkv) + ")");
  int64_t P = 0;
  std::vector<double> pk, pv;
  if (past_k) {
    if (past_k->rank() != 4 || past_v->rank() != 4 || past_k->dim(0) != B ||
        past_k->dim(1) != Hkv || past_k->dim(3) != Dh || past_v->dim(0) != B ||
        past_v->dim(1) != Hkv || past_v->dim(2) != past_k->dim(2) || past_v->dim(3) != Dv)
      return ctx.bad_input("past_key/past_value shapes " + shape_str(past_k->shape()) + ", " +
                           shape_str(past_v->shape()) + " do not match K/V");
    P = past_k->dim(2);
    pk = nn2::to_f64(*past_k);
    pv = nn2::to_f64(*past_v);
  }
  const int64_t T = P + L;
  // Present K/V: [B, Hkv, T, D].
  std::vector<double> presk(static_cast<size_t>(B * Hkv * T * Dh)),
      presv(static_cast<size_t>(B * Hkv * T * Dv));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t d = 0; d < Dh; ++d)
          presk[static_cast<size_t>(((b * Hkv + h) * T + t) * Dh + d)] =
              t < P ? pk[static_cast<size_t>(((b * Hkv + h) * P + t) * Dh + d)]
                    : K.at(b, h, t - P, d);
        for (int64_t d = 0; d < Dv; ++d)
          presv[static_cast<size_t>(((b * Hkv + h) * T + t) * Dv + d)] =
              t < P ? pv[static_cast<size_t>(((b * Hkv + h) * P + t) * Dv + d)]
                    : V.at(b, h, t - P, d);
      }

  // Mask: right-aligned broadcast against [B, Hq, S, T], last dim padded (masked) up to T.
  std::vector<double> mv;
  std::vector<int64_t> mshape(4, 1), mstr(4, 0);
  const bool mask_bool = mask && mask->dtype() == DataType::kBool;
  if (mask) {
    if (mask->rank() < 1 || mask->rank() > 4)
      return ctx.bad_input("attn_mask must have rank 1..4, got " + mask->describe());
    if (!mask_bool && !nn2::is_float_type(mask->dtype()))
      return ctx.bad_input("attn_mask must be bool or float, got " + mask->describe());
    const int off = 4 - mask->rank();
    for (int i = 0; i < mask->rank(); ++i) mshape[static_cast<size_t>(off + i)] = mask->dim(i);
    const int64_t full[4] = {B, Hq, S, T};
    int64_t st = 1;
    for (int d = 3; d >= 0; --d) {
      const int64_t md = mshape[static_cast<size_t>(d)];
      if (d == 3 ? md > T : (md != 1 && md != full[d]))
        return ctx.bad_input("attn_mask shape " + shape_str(mask->shape()) +
                             " does not broadcast to " + shape_str({B, Hq, S, T}));
      mstr[static_cast<size_t>(d)] = (md == 1 && d != 3) ? 0 : st;
      st *= md;
    }
    if (mask_bool) {
      mv.resize(static_cast<size_t>(mask->numel()));
      for (int64_t i = 0; i < mask->numel(); ++i)
        mv[static_cast<size_t>(i)] = mask->data<bool>()[i] ? 0.0 : kNegInf;
    } else {
      mv = nn2::to_f64(*mask);
    }
  }
  std::vector<int64_t> nonpad_len;
  if (nonpad) {
    if (nonpad->rank() != 1 || nonpad->dim(0) != B)
      return ctx.bad_input("nonpad_kv_seqlen must have shape [batch], got " + nonpad->describe());
    nonpad_len = nonpad->to_i64_vector();
  }
  const bool causal = n.attr_int("is_causal", 0) != 0;
  const double softcap = n.attr_float("softcap", 0.0f);
  const int64_t mode = n.attr_int("qk_matmul_output_mode", 0);
  if (mode < 0 || mode > 3)
    return ctx.bad_input("qk_matmul_output_mode must be 0..3, got " + std::to_string(mode));
  double scale = n.has_attr("scale") ? n.attr_float("scale", 1.0f) : 1.0 / std::sqrt(double(Dh));
  // The reference scales Q and K each by sqrt(scale), rounded to the input type.
  {
    const double s = nn2::round_to(dt, std::sqrt(scale));
    scale = s * s;
  }
  const int64_t reps = Hq / Hkv;
  std::vector<double> y(static_cast<size_t>(B * Hq * S * Dv));
  std::vector<double> qkout(static_cast<size_t>(B * Hq * S * T));
  std::vector<double> bias(static_cast<size_t>(T)), logits(static_cast<size_t>(T)),
      prob(static_cast<size_t>(T));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t hk = h / reps;
      for (int64_t i = 0; i < S; ++i) {
        bool all_masked = true;
        for (int64_t j = 0; j < T; ++j) {
          double bj = 0;
          if (mask) {
            if (j >= mshape[3]) {
              bj = kNegInf;
            } else {
              bj = mv[static_cast<size_t>(b * mstr[0] + h * mstr[1] + i * mstr[2] + j * mstr[3])];
            }
          }
          if (causal) {
            const int64_t offset =
                past_k ? P : (nonpad ? nonpad_len[static_cast<size_t>(b)] - S : 0);
            if (j > i + offset) bj += kNegInf;
          }
          if (nonpad && j >= nonpad_len[static_cast<size_t>(b)]) bj += kNegInf;
          bias[static_cast<size_t>(j)] = bj;
          if (!(std::isinf(bj) && bj < 0)) all_masked = false;
          double dot = 0;
          for (int64_t d = 0; d < Dh; ++d)
            dot += Q.at(b, h, i, d) * presk[static_cast<size_t>(((b * Hkv + hk) * T + j) * Dh + d)];
          const double raw = dot * scale;
          // Softcap comes before the mask so masked (-inf) scores stay masked.
          const double qk = softcap > 0 ? softcap * std::tanh(raw / softcap) : raw;
          const double withb = qk + bj;
          logits[static_cast<size_t>(j)] = withb;
          // qk_matmul_output_mode: 0 raw scaled QK^T, 1 after softcap, 2 after mask, 3 softmax.
          double& out = qkout[static_cast<size_t>(((b * Hq + h) * S + i) * T + j)];
          out = mode == 0 ? raw : mode == 1 ? qk : withb;
        }
        double mx = kNegInf;
        for (int64_t j = 0; j < T; ++j) mx = std::max(mx, logits[static_cast<size_t>(j)]);
        if (std::isinf(mx) && mx < 0) mx = 0;
        double sum = 0;
        for (int64_t j = 0; j < T; ++j) {
          prob[static_cast<size_t>(j)] = std::exp(logits[static_cast<size_t>(j)] - mx);
          sum += prob[static_cast<size_t>(j)];
        }
        if (sum == 0) sum = 1;
        for (int64_t j = 0; j < T; ++j) {
          double p = all_masked ? 0.0 : prob[static_cast<size_t>(j)] / sum;
          p = nn2::round_to(dt, p);
          prob[static_cast<size_t>(j)] = p;
          if (mode == 3) qkout[static_cast<size_t>(((b * Hq + h) * S + i) * T + j)] = p;
        }
        for (int64_t d = 0; d < Dv; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < T; ++j)
            acc += prob[static_cast<size_t>(j)] *
                   presv[static_cast<size_t>(((b * Hkv + hk) * T + j) * Dv + d)];
          // 3-D output is [B, S, Hq*Dv]; 4-D is [B, Hq, S, Dv].
          size_t oi = Q.three_d ? static_cast<size_t>(((b * S + i) * Hq + h) * Dv + d)
                                : static_cast<size_t>(((b * Hq + h) * S + i) * Dv + d);
          y[oi] = acc;
        }
      }
    }
  }
  if (nn2::wants(ctx, outputs, 0)) {
    Shape ys = Q.three_d ? Shape{B, S, Hq * Dv} : Shape{B, Hq, S, Dv};
    KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(dt, ys, y));
  }
  if (nn2::wants(ctx, outputs, 1)) {
    KILN_ASSIGN_OR_RETURN(outputs[1], nn2::from_f64(dt, {B, Hkv, T, Dh}, presk));
  }
  if (nn2::wants(ctx, outputs, 2)) {
    KILN_ASSIGN_OR_RETURN(outputs[2], nn2::from_f64(dt, {B, Hkv, T, Dv}, presv));
  }
  if (nn2::wants(ctx, outputs, 3)) {
    KILN_ASSIGN_OR_RETURN(outputs[3], nn2::from_f64(dt, {B, Hq, S, T}, qkout));
  }
  return Status::ok();
}

Status eval_rotary(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* cosc, nn2::req_float(ctx, inputs, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* sinc, nn2::req_float(ctx, inputs, 2));
  const Tensor* pos = opt_tensor(inputs, 3);
  const std::vector<double> xv = nn2::to_f64(*x);
  // Input is [B, H, S, D] (4-D) or [B, S, H*D] (3-D).
  int64_t B, H, S, D;
  const bool three_d = x->rank() == 3;
  if (x->rank() == 4) {
    B = x->dim(0), H = x->dim(1), S = x->dim(2), D = x->dim(3);
  } else if (three_d) {
    H = ctx.node.attr_int("num_heads", 0);
    if (H <= 0 || x->dim(2) % H != 0)
      return ctx.bad_input("3-D input needs num_heads dividing the hidden size, got " +
                           std::to_string(H) + " for " + x->describe());
    B = x->dim(0), S = x->dim(1), D = x->dim(2) / H;
  } else {
    return ctx.bad_input("input must be 3-D or 4-D, got " + x->describe());
  }
  int64_t rd = ctx.node.attr_int("rotary_embedding_dim", 0);
  if (rd == 0) rd = D;
  if (rd < 0 || rd > D || rd % 2 != 0)
    return ctx.bad_input("rotary_embedding_dim " + std::to_string(rd) + " invalid for head size " +
                         std::to_string(D));
  const int64_t half = rd / 2;
  const bool interleaved = ctx.node.attr_int("interleaved", 0) != 0;
  const std::vector<double> cv = nn2::to_f64(*cosc), sv = nn2::to_f64(*sinc);
  if (cosc->shape() != sinc->shape() || cosc->rank() < 2 || cosc->dim(cosc->rank() - 1) != half)
    return ctx.bad_input("cos/sin cache shapes " + shape_str(cosc->shape()) + ", " +
                         shape_str(sinc->shape()) + " must match with last dim " +
                         std::to_string(half));
  std::vector<int64_t> pids;
  if (pos) {
    if (cosc->rank() != 2 || pos->rank() != 2 || pos->dim(0) != B || pos->dim(1) != S)
      return ctx.bad_input("position_ids must be [B, S] with a 2-D cache, got " + pos->describe());
    pids = pos->to_i64_vector();
    for (int64_t p : pids)
      if (p < 0 || p >= cosc->dim(0)) return ctx.bad_input("position id out of cache range");
  } else if (cosc->rank() != 3 || cosc->dim(0) != B || cosc->dim(1) != S) {
    return ctx.bad_input("without position_ids the cache must be [B, S, rd/2], got " +
                         cosc->describe());
  }
  std::vector<double> y = xv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const size_t base = three_d ? static_cast<size_t>(((b * S + s) * H + h) * D)
                                    : static_cast<size_t>(((b * H + h) * S + s) * D);
        const size_t crow = pos ? static_cast<size_t>(pids[static_cast<size_t>(b * S + s)] * half)
                                : static_cast<size_t>((b * S + s) * half);
        for (int64_t i = 0; i < half; ++i) {
          const size_t i1 = base + static_cast<size_t>(interleaved ? 2 * i : i);
          const size_t i2 = base + static_cast<size_t>(interleaved ? 2 * i + 1 : i + half);
          const double c = cv[crow + static_cast<size_t>(i)],
                       sn = sv[crow + static_cast<size_t>(i)];
          const double x1 = xv[i1], x2 = xv[i2];
          y[i1] = c * x1 - sn * x2;
          y[i2] = sn * x1 + c * x2;
        }
      }
  if (nn2::wants(ctx, outputs, 0)) {
    KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(x->dtype(), x->shape(), y));
  }
  return Status::ok();
}

Status eval_swiglu(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs) {
  KILN_ASSIGN_OR_RETURN(const Tensor* a, nn2::req_float(ctx, inputs, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* b, nn2::req_float(ctx, inputs, 1));
  if (a->shape() != b->shape() || a->dtype() != b->dtype())
    return ctx.bad_input("A and B must have the same shape and type, got " + a->describe() +
                         " and " + b->describe());
  const double alpha = ctx.node.attr_float("alpha", 1.0f);
  std::vector<double> av = nn2::to_f64(*a), bv = nn2::to_f64(*b);
  for (size_t i = 0; i < av.size(); ++i) {
    const double sig = nn2::round_to(a->dtype(), 1.0 / (1.0 + std::exp(-alpha * av[i])));
    av[i] = nn2::round_to(a->dtype(), av[i] * sig) * bv[i];
  }
  if (nn2::wants(ctx, outputs, 0)) {
    KILN_ASSIGN_OR_RETURN(outputs[0], nn2::from_f64(a->dtype(), a->shape(), av));
  }
  return Status::ok();
}

Status infer_attention(InferContext& ctx) {
  const TypeInfo* q = nn2::in_type(ctx, 0);
  const TypeInfo* k = nn2::in_type(ctx, 1);
  const TypeInfo* v = nn2::in_type(ctx, 2);
  const TypeInfo* pk = nn2::in_type(ctx, 4);
  if (!q) return Status::ok();
  const DataType dt = q->dtype;
  const size_t r = nn2::rank_of(q);
  const int64_t hq = ctx.node.attr_int("q_num_heads", 0),
                hkv = ctx.node.attr_int("kv_num_heads", 0);
  Dim B = nn2::dim_at(q, 0), S, Hq, Hkv, Dh, Dv, L = nn2::dim_at(k, r == 3 ? 1 : 2);
  if (r == 4) {
    Hq = nn2::dim_at(q, 1), S = nn2::dim_at(q, 2), Dh = nn2::dim_at(q, 3);
    Hkv = nn2::dim_at(k, 1), Dv = nn2::dim_at(v, 3);
  } else if (r == 3 && hq > 0 && hkv > 0) {
    S = nn2::dim_at(q, 1), Hq = Dim::of(hq), Hkv = Dim::of(hkv);
    const Dim qh = nn2::dim_at(q, 2), vh = nn2::dim_at(v, 2);
    if (qh.known()) Dh = Dim::of(qh.value / hq);
    if (vh.known()) Dv = Dim::of(vh.value / hkv);
  } else {
    for (size_t i = 0; i < 4; ++i) nn2::set_out(ctx, i, TypeInfo::tensor(dt));
    return Status::ok();
  }
  const Dim T = pk ? nn2::dim_add(nn2::dim_at(pk, 2), L) : L;
  nn2::set_out(ctx, 0,
               r == 4 ? nn2::tensor_type(dt, {B, Hq, S, Dv})
                      : nn2::tensor_type(dt, {B, S, nn2::dim_mul(Hq, Dv)}));
  nn2::set_out(ctx, 1, nn2::tensor_type(dt, {B, Hkv, T, Dh}));
  nn2::set_out(ctx, 2, nn2::tensor_type(dt, {B, Hkv, T, Dv}));
  nn2::set_out(ctx, 3, nn2::tensor_type(dt, {B, Hq, S, T}));
  return Status::ok();
}

Status infer_same_as_input0(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty())
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

}  // namespace

const OpDef kOp_Attention = {"Attention", "", &eval_attention, &infer_attention};
const OpDef kOp_RotaryEmbedding = {"RotaryEmbedding", "", &eval_rotary, &infer_same_as_input0};
const OpDef kOp_SwiGLU = {"SwiGLU", "", &eval_swiglu, &infer_same_as_input0};

}  // namespace kiln
