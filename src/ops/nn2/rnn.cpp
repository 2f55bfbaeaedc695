// RNN, GRU and LSTM (opset 22 semantics): directions, layout, sequence_lens, initial states,
// peepholes, clip, input_forget, linear_before_reset, activations with alpha/beta.
#include <algorithm>
#include <cctype>
#include <cmath>

#include "ops/nn2/common.h"

namespace kiln {
namespace {

enum class Cell { kRnn, kGru, kLstm };

struct Act {
  enum Kind {
    kRelu,
    kTanh,
    kSigmoid,
    kAffine,
    kLeakyRelu,
    kThresholdedRelu,
    kScaledTanh,
    kHardSigmoid,
    kElu,
    kSoftsign,
    kSoftplus
  } kind = kTanh;
  double alpha = 0, beta = 0;
  double operator()(double x) const {
    switch (kind) {
      case kRelu:
        return x > 0 ? x : 0;
      case kTanh:
        return std::tanh(x);
      case kSigmoid:
        return 1.0 / (1.0 + std::exp(-x));
      case kAffine:
        return alpha * x + beta;
      case kLeakyRelu:
        return x >= 0 ? x : alpha * x;
      case kThresholdedRelu:
        return x > alpha ? x : 0;
      case kScaledTanh:
        return alpha * std::tanh(beta * x);
      case kHardSigmoid:
        return std::max(0.0, std::min(1.0, alpha * x + beta));
      case kElu:
        return x >= 0 ? x : alpha * (std::exp(x) - 1);
      case kSoftsign:
        return x / (1 + std::fabs(x));
      case kSoftplus:
        return std::log1p(std::exp(x));
    }
    return x;
  }
};

// Parses one activation name; defaults for alpha/beta follow the ONNX activation ops.
bool make_act(std::string name, Act* a, bool* uses_alpha, bool* uses_beta) {
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  *uses_alpha = *uses_beta = false;
  if (name == "relu")
    a->kind = Act::kRelu;
  else if (name == "tanh")
    a->kind = Act::kTanh;
  else if (name == "sigmoid")
    a->kind = Act::kSigmoid;
  else if (name == "affine") {
    a->kind = Act::kAffine;
    a->alpha = 1;
    a->beta = 0;
    *uses_alpha = *uses_beta = true;
  } else if (name == "leakyrelu") {
    a->kind = Act::kLeakyRelu;
    a->alpha = 0.01;
    *uses_alpha = true;
  } else if (name == "thresholdedrelu") {
    a->kind = Act::kThresholdedRelu;
    a->alpha = 1;
    *uses_alpha = true;
  } else if (name == "scaledtanh") {
    a->kind = Act::kScaledTanh;
    a->alpha = 1;
    a->beta = 1;
    *uses_alpha = *uses_beta = true;
  } else if (name == "hardsigmoid") {
    a->kind = Act::kHardSigmoid;
    a->alpha = 0.2;
    a->beta = 0.5;
    *uses_alpha = *uses_beta = true;
  } else if (name == "elu") {
    a->kind = Act::kElu;
    a->alpha = 1;
    *uses_alpha = true;
  } else if (name == "softsign")
    a->kind = Act::kSoftsign;
  else if (name == "softplus")
    a->kind = Act::kSoftplus;
  else
    return false;
  return true;
}

Status eval_rnn_common(OpContext& ctx, std::span<const Value> inputs, std::span<Value> outputs,
                       Cell cell) {
  const Node& n = ctx.node;
  const int64_t G = cell == Cell::kRnn ? 1 : cell == Cell::kGru ? 3 : 4;
  KILN_ASSIGN_OR_RETURN(const Tensor* x, nn2::req_float(ctx, inputs, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* w, nn2::req_float(ctx, inputs, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* r, nn2::req_float(ctx, inputs, 2));
  const Tensor* bias = opt_tensor(inputs, 3);
  const Tensor* seqlens = opt_tensor(inputs, 4);
  const Tensor* init_h = opt_tensor(inputs, 5);
  const Tensor* init_c = cell == Cell::kLstm ? opt_tensor(inputs, 6) : nullptr;
  const Tensor* peep = cell == Cell::kLstm ? opt_tensor(inputs, 7) : nullptr;
  const int64_t layout = n.attr_int("layout", 0);
  if (x->rank() != 3) return ctx.bad_input("X must be 3-D, got " + x->describe());
  const int64_t S = layout ? x->dim(1) : x->dim(0), B = layout ? x->dim(0) : x->dim(1);
  const int64_t I = x->dim(2);
  const std::string dir = n.attr_string("direction", "forward");
  const int64_t D = dir == "bidirectional" ? 2 : 1;
  if (dir != "forward" && dir != "reverse" && dir != "bidirectional")
    return ctx.bad_input("unknown direction '" + dir + "'");
  if (w->rank() != 3 || w->dim(0) != D || w->dim(2) != I || w->dim(1) % G != 0)
    return ctx.bad_input("W shape " + shape_str(w->shape()) + " does not match X " +
                         shape_str(x->shape()));
  const int64_t H = w->dim(1) / G;
  if (n.has_attr("hidden_size") && n.attr_int("hidden_size", 0) != H)
    return ctx.bad_input("hidden_size does not match W");
  if (r->shape() != Shape{D, G * H, H})
    return ctx.bad_input("R shape " + shape_str(r->shape()) + " invalid");
  if (bias && bias->shape() != Shape{D, 2 * G * H}) return ctx.bad_input("B shape invalid");
  const Shape state_shape = layout ? Shape{B, D, H} : Shape{D, B, H};
  if (init_h && init_h->shape() != state_shape) return ctx.bad_input("initial_h shape invalid");
  if (init_c && init_c->shape() != state_shape) return ctx.bad_input("initial_c shape invalid");
  if (peep && peep->shape() != Shape{D, 3 * H}) return ctx.bad_input("P shape invalid");
  std::vector<int64_t> lens(static_cast<size_t>(B), S);
  if (seqlens) {
    if (seqlens->rank() != 1 || seqlens->dim(0) != B)
      return ctx.bad_input("sequence_lens must be [batch]");
    lens = seqlens->to_i64_vector();
    for (int64_t l : lens)
      if (l < 0 || l > S) return ctx.bad_input("sequence_lens value out of range");
  }
  // Activations: per direction, RNN 1 (Tanh), GRU 2 (Sigmoid, Tanh), LSTM 3 (Sigmoid, Tanh, Tanh).
  const size_t nact = cell == Cell::kRnn ? 1 : cell == Cell::kGru ? 2 : 3;
  std::vector<std::string> names = n.attr_strings("activations");
  if (names.empty()) {
    for (int64_t d = 0; d < D; ++d) {
      if (cell == Cell::kRnn)
        names.push_back("Tanh");
      else if (cell == Cell::kGru)
        names.insert(names.end(), {"Sigmoid", "Tanh"});
      else
        names.insert(names.end(), {"Sigmoid", "Tanh", "Tanh"});
    }
  }
  if (names.size() == nact && D == 2) {
    std::vector<std::string> twice = names;
    names.insert(names.end(), twice.begin(), twice.end());
  }
  if (names.size() != nact * static_cast<size_t>(D))
    return ctx.bad_input("expected " + std::to_string(nact * D) + " activations, got " +
                         std::to_string(names.size()));
  const std::vector<float> alphas = n.attr_floats("activation_alpha");
  const std::vector<float> betas = n.attr_floats("activation_beta");
  std::vector<Act> acts(names.size());
  size_t ai = 0, bi = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    bool ua, ub;
    if (!make_act(names[i], &acts[i], &ua, &ub))
      return ctx.bad_input("unsupported activation '" + names[i] + "'");
    // Lists as long as `activations` are parallel to it; shorter ones are consumed in order.
    if (alphas.size() == names.size()) {
      if (ua) acts[i].alpha = alphas[i];
    } else if (ua && ai < alphas.size())
      acts[i].alpha = alphas[ai++];
    if (betas.size() == names.size()) {
      if (ub) acts[i].beta = betas[i];
    } else if (ub && bi < betas.size())
      acts[i].beta = betas[bi++];
  }
  const bool has_clip = n.has_attr("clip");
  const double clip = n.attr_float("clip", 0.0f);
  const bool lbr = n.attr_int("linear_before_reset", 0) != 0;
  const bool input_forget = n.attr_int("input_forget", 0) != 0;
  auto clipv = [&](double v) { return has_clip ? std::max(-clip, std::min(clip, v)) : v; };

  const std::vector<double> xv = nn2::to_f64(*x), wv = nn2::to_f64(*w), rv = nn2::to_f64(*r);
  const std::vector<double> bv =
      bias ? nn2::to_f64(*bias) : std::vector<double>(static_cast<size_t>(D * 2 * G * H), 0.0);
  const std::vector<double> h0 = init_h ? nn2::to_f64(*init_h) : std::vector<double>();
  const std::vector<double> c0 = init_c ? nn2::to_f64(*init_c) : std::vector<double>();
  const std::vector<double> pv =
      peep ? nn2::to_f64(*peep) : std::vector<double>(static_cast<size_t>(D * 3 * H), 0.0);
  auto state_idx = [&](int64_t d, int64_t b, int64_t j) {
    return static_cast<size_t>(layout ? (b * D + d) * H + j : (d * B + b) * H + j);
  };
  auto x_idx = [&](int64_t t, int64_t b, int64_t i) {
    return static_cast<size_t>(layout ? (b * S + t) * I + i : (t * B + b) * I + i);
  };
  auto y_idx = [&](int64_t t, int64_t d, int64_t b, int64_t j) {
    return static_cast<size_t>(layout ? ((b * S + t) * D + d) * H + j
                                      : ((t * D + d) * B + b) * H + j);
  };
  std::vector<double> y(static_cast<size_t>(S * D * B * H), 0.0);
  std::vector<double> yh(static_cast<size_t>(D * B * H), 0.0),
      yc(static_cast<size_t>(D * B * H), 0.0);
  std::vector<double> h(static_cast<size_t>(H)), c(static_cast<size_t>(H)),
      hn(static_cast<size_t>(H));
  std::vector<double> xw(static_cast<size_t>(G * H)), hr(static_cast<size_t>(G * H));
  for (int64_t d = 0; d < D; ++d) {
    const bool reverse = dir == "reverse" || d == 1;
    const Act* a = &acts[static_cast<size_t>(d) * nact];
    const double* W = wv.data() + d * G * H * I;
    const double* R = rv.data() + d * G * H * H;
    const double* Wb = bv.data() + d * 2 * G * H;
    const double* Rb = Wb + G * H;
    const double* P = pv.data() + d * 3 * H;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < H; ++j) {
        h[static_cast<size_t>(j)] = init_h ? h0[state_idx(d, b, j)] : 0.0;
        c[static_cast<size_t>(j)] = init_c ? c0[state_idx(d, b, j)] : 0.0;
      }
      const int64_t len = lens[static_cast<size_t>(b)];
      for (int64_t step = 0; step < len; ++step) {
        const int64_t t = reverse ? len - 1 - step : step;
        for (int64_t g = 0; g < G * H; ++g) {
          double s = Wb[g];
          for (int64_t i = 0; i < I; ++i) s += xv[x_idx(t, b, i)] * W[g * I + i];
          xw[static_cast<size_t>(g)] = s;
          double s2 = Rb[g];
          for (int64_t k = 0; k < H; ++k) s2 += h[static_cast<size_t>(k)] * R[g * H + k];
          hr[static_cast<size_t>(g)] = s2;
        }
        for (int64_t j = 0; j < H; ++j) {
          const size_t J = static_cast<size_t>(j), Hs = static_cast<size_t>(H);
          if (cell == Cell::kRnn) {
            hn[J] = a[0](clipv(xw[J] + hr[J]));
          } else if (cell == Cell::kGru) {
            const double z = a[0](clipv(xw[J] + hr[J]));
            if (lbr) {
              const double rr = a[0](clipv(xw[Hs + J] + hr[Hs + J]));
              hn[J] = (1 - z) * a[1](clipv(xw[2 * Hs + J] + rr * hr[2 * Hs + J])) + z * h[J];
            } else {
              hn[J] = z;  // the candidate needs the whole reset-gated state: finished below
            }
          } else {
            const double cprev = c[J];
            double ig = a[0](clipv(xw[J] + hr[J] + P[j] * cprev));
            double fg = a[0](clipv(xw[2 * Hs + J] + hr[2 * Hs + J] + P[2 * H + j] * cprev));
            if (input_forget) fg = 1 - ig;
            const double cg = a[1](clipv(xw[3 * Hs + J] + hr[3 * Hs + J]));
            const double cn = fg * cprev + ig * cg;
            const double og = a[0](clipv(xw[Hs + J] + hr[Hs + J] + P[H + j] * cn));
            hn[J] = og * a[2](cn);
            xw[J] = cn;  // stash the new cell state (xw[J] is no longer needed)
          }
        }
        if (cell == Cell::kGru && !lbr) {
          // ht = g(Xt*Wh + (rt . Ht-1)*Rh + Rbh + Wbh), with rt per hidden unit.
          std::vector<double> rh(static_cast<size_t>(H));
          for (int64_t k = 0; k < H; ++k)
            rh[static_cast<size_t>(k)] =
                a[0](clipv(xw[static_cast<size_t>(H + k)] + hr[static_cast<size_t>(H + k)])) *
                h[static_cast<size_t>(k)];
          for (int64_t j = 0; j < H; ++j) {
            double s = Rb[2 * H + j] + xw[static_cast<size_t>(2 * H + j)];
            for (int64_t k = 0; k < H; ++k)
              s += rh[static_cast<size_t>(k)] * R[(2 * H + j) * H + k];
            const double z = hn[static_cast<size_t>(j)];
            hn[static_cast<size_t>(j)] = (1 - z) * a[1](clipv(s)) + z * h[static_cast<size_t>(j)];
          }
        }
        for (int64_t j = 0; j < H; ++j) {
          if (cell == Cell::kLstm) c[static_cast<size_t>(j)] = xw[static_cast<size_t>(j)];
          h[static_cast<size_t>(j)] = hn[static_cast<size_t>(j)];
          y[y_idx(t, d, b, j)] = h[static_cast<size_t>(j)];
        }
      }
      for (int64_t j = 0; j < H; ++j) {
        yh[state_idx(d, b, j)] = h[static_cast<size_t>(j)];
        yc[state_idx(d, b, j)] = c[static_cast<size_t>(j)];
      }
    }
  }
  const DataType dt = x->dtype();
  if (nn2::wants(ctx, outputs, 0)) {
    KILN_ASSIGN_OR_RETURN(outputs[0],
                          nn2::from_f64(dt, layout ? Shape{B, S, D, H} : Shape{S, D, B, H}, y));
  }
  if (nn2::wants(ctx, outputs, 1)) {
    KILN_ASSIGN_OR_RETURN(outputs[1], nn2::from_f64(dt, state_shape, yh));
  }
  if (cell == Cell::kLstm && nn2::wants(ctx, outputs, 2)) {
    KILN_ASSIGN_OR_RETURN(outputs[2], nn2::from_f64(dt, state_shape, yc));
  }
  return Status::ok();
}

Status infer_rnn(InferContext& ctx) {
  const TypeInfo* x = nn2::in_type(ctx, 0);
  const TypeInfo* w = nn2::in_type(ctx, 1);
  if (!x) return Status::ok();
  const int64_t layout = ctx.node.attr_int("layout", 0);
  const int64_t D = ctx.node.attr_string("direction", "forward") == "bidirectional" ? 2 : 1;
  const Dim S = nn2::dim_at(x, layout ? 1 : 0), B = nn2::dim_at(x, layout ? 0 : 1);
  Dim H = ctx.node.has_attr("hidden_size") ? Dim::of(ctx.node.attr_int("hidden_size", 0)) : Dim{};
  const Dim rows = nn2::dim_at(w, 1);
  const int64_t G = ctx.node.op_type == "LSTM" ? 4 : ctx.node.op_type == "GRU" ? 3 : 1;
  if (!H.known() && rows.known()) H = Dim::of(rows.value / G);
  const Dim Dd = Dim::of(D);
  nn2::set_out(ctx, 0,
               layout ? nn2::tensor_type(x->dtype, {B, S, Dd, H})
                      : nn2::tensor_type(x->dtype, {S, Dd, B, H}));
  const TypeInfo st =
      layout ? nn2::tensor_type(x->dtype, {B, Dd, H}) : nn2::tensor_type(x->dtype, {Dd, B, H});
  nn2::set_out(ctx, 1, st);
  nn2::set_out(ctx, 2, st);
  return Status::ok();
}

Status eval_rnn(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return eval_rnn_common(ctx, in, out, Cell::kRnn);
}
Status eval_gru(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return eval_rnn_common(ctx, in, out, Cell::kGru);
}
Status eval_lstm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  return eval_rnn_common(ctx, in, out, Cell::kLstm);
}

}  // namespace

const OpDef kOp_RNN = {"RNN", "", &eval_rnn, &infer_rnn};
const OpDef kOp_GRU = {"GRU", "", &eval_gru, &infer_rnn};
const OpDef kOp_LSTM = {"LSTM", "", &eval_lstm, &infer_rnn};

}  // namespace kiln
