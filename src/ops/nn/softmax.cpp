// Softmax, LogSoftmax, Hardmax (axis; `coerce_2d` marks the opset < 13 flatten semantics, see
// canon_nn.cpp) and Dropout (inference identity + mask; training mode with a seeded RNG).
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;

enum class SmKind { kSoftmax, kLogSoftmax, kHardmax };

Status eval_softmax_like(OpContext& ctx, std::span<const Value> in, std::span<Value> out,
                         SmKind kind) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "input"));
  const int64_t r = X->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  const bool coerce = ctx.node.attr_int("coerce_2d", 0) != 0;
  const Shape& s = X->shape();
  int64_t outer = prod(s, 0, static_cast<size_t>(axis)), n, inner;
  if (r == 0) {
    outer = 1, n = 1, inner = 1;
  } else if (coerce) {
    n = prod(s, static_cast<size_t>(axis));
    inner = 1;
  } else {
    n = s[axis];
    inner = prod(s, static_cast<size_t>(axis) + 1);
  }
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, s));
  const float* x = xf.data<float>();
  float* y = Y.data<float>();
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const float* xp = x + o * n * inner + i;
      float* yp = y + o * n * inner + i;
      float mx = -std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t k = 0; k < n; ++k)
        if (xp[k * inner] > mx) {
          mx = xp[k * inner];
          arg = k;
        }
      if (kind == SmKind::kHardmax) {
        for (int64_t k = 0; k < n; ++k) yp[k * inner] = k == arg ? 1.f : 0.f;
        continue;
      }
      double sum = 0;
      for (int64_t k = 0; k < n; ++k) sum += std::exp(static_cast<double>(xp[k * inner] - mx));
      if (kind == SmKind::kSoftmax) {
        const double inv = 1.0 / sum;
        for (int64_t k = 0; k < n; ++k)
          yp[k * inner] =
              static_cast<float>(std::exp(static_cast<double>(xp[k * inner] - mx)) * inv);
      } else {
        const double ls = std::log(sum);
        for (int64_t k = 0; k < n; ++k)
          yp[k * inner] = static_cast<float>(static_cast<double>(xp[k * inner] - mx) - ls);
      }
    }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status eval_softmax(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_softmax_like(c, i, o, SmKind::kSoftmax);
}
Status eval_logsoftmax(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_softmax_like(c, i, o, SmKind::kLogSoftmax);
}
Status eval_hardmax(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_softmax_like(c, i, o, SmKind::kHardmax);
}

Status infer_same(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty())
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

Status eval_dropout(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  const Tensor* R = opt_tensor(in, 1);
  const Tensor* T = opt_tensor(in, 2);
  double ratio = R && R->numel() > 0 ? R->get_f64(0) : 0.5;
  const bool training = T && T->numel() > 0 && T->get_i64(0) != 0;
  const bool want_mask = out.size() > 1 && !ctx.node.outputs[1].empty();
  if (!training || ratio == 0.0) {
    out[0] = *X;
    if (want_mask) {
      KILN_ASSIGN_OR_RETURN(Tensor m, Tensor::create(DataType::kBool, X->shape()));
      std::fill(m.data<bool>(), m.data<bool>() + m.numel(), true);
      out[1] = m;
    }
    return Status::ok();
  }
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "data"));
  if (ratio < 0 || ratio >= 1) return ctx.bad_input("ratio must be in [0, 1)");
  const uint64_t seed =
      ctx.node.has_attr("seed") ? static_cast<uint64_t>(ctx.node.attr_int("seed", 0)) : ctx.seed;
  // Same stream as NumPy's legacy np.random.seed(seed); np.random.uniform(0, 1, shape), which
  // the ONNX test data was generated with: MT19937 + 53-bit doubles from two draws.
  std::mt19937 rng(static_cast<uint32_t>(seed));
  auto u = [&]() {
    const uint32_t a = rng() >> 5, b = rng() >> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
  };
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, X->shape()));
  KILN_ASSIGN_OR_RETURN(Tensor m, Tensor::create(DataType::kBool, X->shape()));
  const float scale = static_cast<float>(1.0 / (1.0 - ratio));
  for (int64_t i = 0; i < X->numel(); ++i) {
    const bool keep = u() >= ratio;
    m.data<bool>()[i] = keep;
    Y.data<float>()[i] = keep ? xf.data<float>()[i] * scale : 0.f;
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  if (want_mask) out[1] = m;
  return Status::ok();
}

Status infer_dropout(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  ctx.output_types[0] = ctx.input_types[0];
  if (ctx.output_types.size() > 1 && ctx.input_types[0].kind == TypeInfo::Kind::kTensor) {
    ctx.output_types[1] = ctx.input_types[0];
    ctx.output_types[1].dtype = DataType::kBool;
  }
  return Status::ok();
}

}  // namespace

const OpDef kOp_Softmax = {"Softmax", "", &eval_softmax, &infer_same};
const OpDef kOp_LogSoftmax = {"LogSoftmax", "", &eval_logsoftmax, &infer_same};
const OpDef kOp_Hardmax = {"Hardmax", "", &eval_hardmax, &infer_same};
const OpDef kOp_Dropout = {"Dropout", "", &eval_dropout, &infer_dropout};

}  // namespace kiln
