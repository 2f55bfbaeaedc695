// Normalizations: BatchNormalization (inference + training_mode statistics),
// InstanceNormalization, LayerNormalization, GroupNormalization, RMSNormalization, LRN,
// MeanVarianceNormalization, LpNormalization. Staged in float32, statistics in double.
#include <algorithm>
#include <cmath>

#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;

Result<Tensor> per_channel(const OpContext& ctx, const Tensor* t, int64_t C, const char* what) {
  if (!t) return ctx.bad_input(std::string("missing input ") + what);
  if (t->numel() != C)
    return ctx.bad_input(std::string(what) + " " + shape_str(t->shape()) + " must have " +
                         std::to_string(C) + " elements");
  return nn::as_f32(*t);
}

Status eval_batchnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() < 1) return ctx.bad_input("X must have rank >= 1");
  const int64_t N = X->dim(0), C = X->rank() > 1 ? X->dim(1) : 1, sp = prod(X->shape(), 2);
  KILN_ASSIGN_OR_RETURN(Tensor sc, per_channel(ctx, opt_tensor(in, 1), C, "scale"));
  KILN_ASSIGN_OR_RETURN(Tensor bi, per_channel(ctx, opt_tensor(in, 2), C, "B"));
  KILN_ASSIGN_OR_RETURN(Tensor mean, per_channel(ctx, opt_tensor(in, 3), C, "input_mean"));
  KILN_ASSIGN_OR_RETURN(Tensor var, per_channel(ctx, opt_tensor(in, 4), C, "input_var"));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  const double mom = ctx.node.attr_float("momentum", 0.9f);
  const bool training = ctx.node.attr_int("training_mode", 0) != 0;
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  const float* x = xf.data<float>();
  std::vector<double> m(C), v(C);
  for (int64_t c = 0; c < C; ++c) {
    m[c] = mean.data<float>()[c];
    v[c] = var.data<float>()[c];
  }
  if (training) {
    const double cnt = static_cast<double>(N * sp);
    for (int64_t c = 0; c < C; ++c) {
      double s = 0, s2 = 0;
      for (int64_t n = 0; n < N; ++n) {
        const float* p = x + (n * C + c) * sp;
        for (int64_t i = 0; i < sp; ++i) s += p[i];
      }
      const double mu = cnt > 0 ? s / cnt : 0;
      for (int64_t n = 0; n < N; ++n) {
        const float* p = x + (n * C + c) * sp;
        for (int64_t i = 0; i < sp; ++i) s2 += (p[i] - mu) * (p[i] - mu);
      }
      m[c] = mu;
      v[c] = cnt > 0 ? s2 / cnt : 0;
    }
  }
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  float* y = Y.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const double a = sc.data<float>()[c] / std::sqrt(v[c] + eps);
      const double b = bi.data<float>()[c] - a * m[c];
      const float* p = x + (n * C + c) * sp;
      float* q = y + (n * C + c) * sp;
      for (int64_t i = 0; i < sp; ++i) q[i] = static_cast<float>(a * p[i] + b);
    }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  for (size_t k = 1; k < 3 && k < out.size(); ++k) {
    if (ctx.node.outputs[k].empty()) continue;
    const Tensor* src = opt_tensor(in, 2 + k);
    KILN_ASSIGN_OR_RETURN(Tensor r, Tensor::create(DataType::kFloat, {C}));
    for (int64_t c = 0; c < C; ++c) {
      const double run = k == 1 ? mean.data<float>()[c] : var.data<float>()[c];
      const double cur = k == 1 ? m[c] : v[c];
      r.data<float>()[c] = static_cast<float>(training ? run * mom + cur * (1 - mom) : run);
    }
    KILN_ASSIGN_OR_RETURN(out[k], cast_tensor(r, src ? src->dtype() : X->dtype()));
  }
  return Status::ok();
}

Status infer_first_same(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty())
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

Status eval_instancenorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "input"));
  if (X->rank() < 2) return ctx.bad_input("input must have rank >= 2");
  const int64_t N = X->dim(0), C = X->dim(1), sp = prod(X->shape(), 2);
  KILN_ASSIGN_OR_RETURN(Tensor sc, per_channel(ctx, opt_tensor(in, 1), C, "scale"));
  KILN_ASSIGN_OR_RETURN(Tensor bi, per_channel(ctx, opt_tensor(in, 2), C, "B"));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const float* p = xf.data<float>() + (n * C + c) * sp;
      float* q = Y.data<float>() + (n * C + c) * sp;
      double s = 0, s2 = 0;
      for (int64_t i = 0; i < sp; ++i) s += p[i];
      const double mu = sp ? s / sp : 0;
      for (int64_t i = 0; i < sp; ++i) s2 += (p[i] - mu) * (p[i] - mu);
      const double a = sc.data<float>()[c] / std::sqrt((sp ? s2 / sp : 0) + eps);
      for (int64_t i = 0; i < sp; ++i)
        q[i] = static_cast<float>((p[i] - mu) * a + bi.data<float>()[c]);
    }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

// Scale/bias broadcast unidirectionally to the normalized block shape; offsets per element.
Result<std::vector<int64_t>> block_offsets(const OpContext& ctx, const Tensor* t,
                                           const Shape& block, const char* what) {
  std::vector<int64_t> off;
  if (!t) return off;
  const Shape& s = t->shape();
  if (s.size() > block.size()) {
    // Allow leading 1s beyond the block rank.
    for (size_t i = 0; i + block.size() < s.size(); ++i)
      if (s[i] != 1)
        return ctx.bad_input(std::string(what) + " " + shape_str(s) + " does not broadcast to " +
                             shape_str(block));
  }
  Shape ss(s.end() - std::min(s.size(), block.size()), s.end());
  for (size_t i = 0; i < ss.size(); ++i) {
    const int64_t bd = block[block.size() - ss.size() + i];
    if (ss[i] != 1 && ss[i] != bd)
      return ctx.bad_input(std::string(what) + " " + shape_str(s) + " does not broadcast to " +
                           shape_str(block));
  }
  auto st = broadcast_strides(ss, block);
  const int64_t n = prod(block);
  off.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int64_t rem = i, o = 0;
    for (size_t d = block.size(); d-- > 0;) {
      o += (rem % block[d]) * st[d];
      rem /= block[d];
    }
    off[i] = o;
  }
  return off;
}

// LayerNormalization (rms = false) and RMSNormalization (rms = true).
Status eval_layer_rms(OpContext& ctx, std::span<const Value> in, std::span<Value> out, bool rms) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  const Tensor* S = opt_tensor(in, 1);
  const Tensor* B = rms ? nullptr : opt_tensor(in, 2);
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), X->rank()));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  const bool stash32 = ctx.node.attr_int("stash_type", 1) == 1;
  const Shape& xs = X->shape();
  Shape block(xs.begin() + std::min<int64_t>(axis, X->rank()), xs.end());
  const int64_t outer = prod(xs, 0, static_cast<size_t>(axis)), inner = prod(block);
  KILN_ASSIGN_OR_RETURN(auto soff, block_offsets(ctx, S, block, "scale"));
  KILN_ASSIGN_OR_RETURN(auto boff, block_offsets(ctx, B, block, "B"));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  Tensor sf, bf;
  if (S) {
    KILN_ASSIGN_OR_RETURN(sf, nn::as_f32(*S));
  }
  if (B) {
    KILN_ASSIGN_OR_RETURN(bf, nn::as_f32(*B));
  }
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, xs));
  Shape ms(xs.begin(), xs.begin() + axis);
  ms.resize(xs.size(), 1);
  KILN_ASSIGN_OR_RETURN(Tensor Mt, Tensor::create(DataType::kFloat, ms));
  KILN_ASSIGN_OR_RETURN(Tensor It, Tensor::create(DataType::kFloat, ms));
  for (int64_t o = 0; o < outer; ++o) {
    const float* p = xf.data<float>() + o * inner;
    float* q = Y.data<float>() + o * inner;
    double mu = 0, s2 = 0;
    if (!rms) {
      for (int64_t i = 0; i < inner; ++i) mu += p[i];
      mu = inner ? mu / inner : 0;
    }
    for (int64_t i = 0; i < inner; ++i) s2 += (p[i] - mu) * (p[i] - mu);
    const double inv = 1.0 / std::sqrt((inner ? s2 / inner : 0) + eps);
    for (int64_t i = 0; i < inner; ++i) {
      double v = (p[i] - mu) * inv;
      if (S) v *= sf.data<float>()[soff[i]];
      if (B) v += bf.data<float>()[boff[i]];
      q[i] = static_cast<float>(v);
    }
    Mt.data<float>()[o] = static_cast<float>(mu);
    It.data<float>()[o] = static_cast<float>(inv);
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  const DataType st = stash32 ? DataType::kFloat : X->dtype();
  if (!rms && out.size() > 1 && !ctx.node.outputs[1].empty()) {
    KILN_ASSIGN_OR_RETURN(out[1], cast_tensor(Mt, st));
  }
  if (!rms && out.size() > 2 && !ctx.node.outputs[2].empty()) {
    KILN_ASSIGN_OR_RETURN(out[2], cast_tensor(It, st));
  }
  return Status::ok();
}
Status eval_layernorm(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_layer_rms(c, i, o, false);
}
Status eval_rmsnorm(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_layer_rms(c, i, o, true);
}

Status infer_layernorm(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  ctx.output_types[0] = x;
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  const DataType st = ctx.node.attr_int("stash_type", 1) == 1 ? DataType::kFloat : x.dtype;
  for (size_t k = 1; k < ctx.output_types.size() && k < 3; ++k) {
    TypeInfo t = TypeInfo::tensor(st);
    if (x.has_shape) {
      const int64_t r = static_cast<int64_t>(x.dims.size());
      int64_t axis = ctx.node.attr_int("axis", -1);
      if (axis < 0) axis += r;
      if (axis >= 0 && axis <= r) {
        t.has_shape = true;
        t.dims = x.dims;
        for (int64_t i = axis; i < r; ++i) t.dims[i] = Dim::of(1);
      }
    }
    ctx.output_types[k] = t;
  }
  return Status::ok();
}

Status eval_groupnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() < 2) return ctx.bad_input("X must have rank >= 2");
  const int64_t G = ctx.node.attr_int("num_groups", 0);
  const int64_t N = X->dim(0), C = X->dim(1), sp = prod(X->shape(), 2);
  if (G <= 0 || C % G != 0)
    return ctx.bad_input("num_groups " + std::to_string(G) +
                         " must divide C = " + std::to_string(C));
  const bool per_group = ctx.node.attr_int("per_group_affine", 0) != 0;
  const int64_t na = per_group ? G : C;
  KILN_ASSIGN_OR_RETURN(Tensor sc, per_channel(ctx, opt_tensor(in, 1), na, "scale"));
  KILN_ASSIGN_OR_RETURN(Tensor bi, per_channel(ctx, opt_tensor(in, 2), na, "bias"));
  const double eps = ctx.node.attr_float("epsilon", 1e-5f);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  const int64_t cg = C / G, blk = cg * sp;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float* p = xf.data<float>() + (n * C + g * cg) * sp;
      float* q = Y.data<float>() + (n * C + g * cg) * sp;
      double s = 0, s2 = 0;
      for (int64_t i = 0; i < blk; ++i) s += p[i];
      const double mu = blk ? s / blk : 0;
      for (int64_t i = 0; i < blk; ++i) s2 += (p[i] - mu) * (p[i] - mu);
      const double inv = 1.0 / std::sqrt((blk ? s2 / blk : 0) + eps);
      for (int64_t c = 0; c < cg; ++c) {
        const int64_t a = per_group ? g : g * cg + c;
        const double scv = sc.data<float>()[a], biv = bi.data<float>()[a];
        for (int64_t i = 0; i < sp; ++i)
          q[c * sp + i] = static_cast<float>((p[c * sp + i] - mu) * inv * scv + biv);
      }
    }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status eval_lrn(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() < 2) return ctx.bad_input("X must have rank >= 2");
  const double alpha = ctx.node.attr_float("alpha", 1e-4f),
               beta = ctx.node.attr_float("beta", 0.75f);
  const double bias = ctx.node.attr_float("bias", 1.f);
  const int64_t size = ctx.node.attr_int("size", 0);
  if (size < 1) return ctx.bad_input("size must be >= 1");
  const int64_t N = X->dim(0), C = X->dim(1), sp = prod(X->shape(), 2);
  const int64_t lo = (size - 1) / 2, hi = (size - 1) - lo;  // floor / ceil halves
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  const float* x = xf.data<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < sp; ++i) {
        double s = 0;
        for (int64_t k = std::max<int64_t>(0, c - lo); k <= std::min(C - 1, c + hi); ++k) {
          const double v = x[(n * C + k) * sp + i];
          s += v * v;
        }
        const int64_t idx = (n * C + c) * sp + i;
        Y.data<float>()[idx] = static_cast<float>(x[idx] / std::pow(bias + alpha / size * s, beta));
      }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

// Iterates over groups of elements sharing the non-reduced coordinates: calls f(offsets).
Result<std::vector<std::vector<int64_t>>> reduction_groups(const OpContext& ctx, const Shape& s,
                                                           std::vector<int64_t> axes) {
  const int64_t r = static_cast<int64_t>(s.size());
  std::vector<bool> red(s.size(), false);
  for (int64_t a : axes) {
    KILN_ASSIGN_OR_RETURN(int64_t na, norm_axis(ctx, a, r));
    if (na < r) red[na] = true;
  }
  Shape ks, rs;
  for (size_t i = 0; i < s.size(); ++i) (red[i] ? rs : ks).push_back(s[i]);
  const auto st = strides_of(s);
  const int64_t nk = prod(ks), nr = prod(rs);
  std::vector<std::vector<int64_t>> groups(static_cast<size_t>(nk));
  for (int64_t g = 0; g < nk; ++g) {
    int64_t base = 0, rem = g;
    for (size_t i = s.size(); i-- > 0;)
      if (!red[i]) {
        base += (rem % s[i]) * st[i];
        rem /= s[i];
      }
    auto& v = groups[g];
    v.resize(static_cast<size_t>(nr));
    for (int64_t j = 0; j < nr; ++j) {
      int64_t off = base, rj = j;
      for (size_t i = s.size(); i-- > 0;)
        if (red[i]) {
          off += (rj % s[i]) * st[i];
          rj /= s[i];
        }
      v[j] = off;
    }
  }
  return groups;
}

Status eval_mvn(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  auto axes = ctx.node.attr_ints("axes", {0, 2, 3});
  KILN_ASSIGN_OR_RETURN(auto groups, reduction_groups(ctx, X->shape(), axes));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  const float* x = xf.data<float>();
  for (auto& g : groups) {
    double s = 0, s2 = 0;
    for (int64_t o : g) {
      s += x[o];
      s2 += static_cast<double>(x[o]) * x[o];
    }
    const double n = static_cast<double>(g.size());
    const double mu = n ? s / n : 0, var = n ? std::max(0.0, s2 / n - mu * mu) : 0;
    const double d = std::sqrt(var) + 1e-9;
    for (int64_t o : g) Y.data<float>()[o] = static_cast<float>((x[o] - mu) / d);
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status eval_lpnorm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "input"));
  const int64_t p = ctx.node.attr_int("p", 2);
  if (p != 1 && p != 2) return ctx.bad_input("p must be 1 or 2");
  KILN_ASSIGN_OR_RETURN(auto groups,
                        reduction_groups(ctx, X->shape(), {ctx.node.attr_int("axis", -1)}));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  const float* x = xf.data<float>();
  for (auto& g : groups) {
    double s = 0;
    for (int64_t o : g) s += p == 1 ? std::fabs(x[o]) : static_cast<double>(x[o]) * x[o];
    const double nrm = p == 1 ? s : std::sqrt(s);
    for (int64_t o : g) Y.data<float>()[o] = nrm == 0 ? 0.f : static_cast<float>(x[o] / nrm);
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status infer_batchnorm(InferContext& ctx) {
  if (ctx.input_types.empty()) return Status::ok();
  if (!ctx.output_types.empty()) ctx.output_types[0] = ctx.input_types[0];
  for (size_t k = 1; k < 3 && k < ctx.output_types.size(); ++k)
    if (ctx.input_types.size() > 2 + k) ctx.output_types[k] = ctx.input_types[2 + k];
  return Status::ok();
}

}  // namespace

const OpDef kOp_BatchNormalization = {"BatchNormalization", "", &eval_batchnorm, &infer_batchnorm};
const OpDef kOp_InstanceNormalization = {"InstanceNormalization", "", &eval_instancenorm,
                                         &infer_first_same};
const OpDef kOp_LayerNormalization = {"LayerNormalization", "", &eval_layernorm, &infer_layernorm};
const OpDef kOp_RMSNormalization = {"RMSNormalization", "", &eval_rmsnorm, &infer_first_same};
const OpDef kOp_GroupNormalization = {"GroupNormalization", "", &eval_groupnorm, &infer_first_same};
const OpDef kOp_LRN = {"LRN", "", &eval_lrn, &infer_first_same};
const OpDef kOp_MeanVarianceNormalization = {"MeanVarianceNormalization", "", &eval_mvn,
                                             &infer_first_same};
const OpDef kOp_LpNormalization = {"LpNormalization", "", &eval_lpnorm, &infer_first_same};

}  // namespace kiln
