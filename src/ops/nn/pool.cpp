// Pooling: MaxPool (+Indices), AveragePool, LpPool, Global{Average,Max,Lp}Pool, MaxUnpool.
// Values are staged in float32 (exact for the 8-bit MaxPool types) and cast back.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;
using nn::Window;

enum class PoolKind { kMax, kAvg, kLp };

Status eval_pool(OpContext& ctx, std::span<const Value> in, std::span<Value> out, PoolKind kind) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  const DataType dt = X->dtype();
  if (!nn::is_float_type(dt) &&
      !(kind == PoolKind::kMax && (dt == DataType::kInt8 || dt == DataType::kUInt8)))
    return unsupported(ctx.node.where() + ": element type " + dtype_name(dt));
  if (X->rank() < 3)
    return ctx.bad_input("input has rank " + std::to_string(X->rank()) + ", expected >= 3");
  Shape xs(X->shape().begin() + 2, X->shape().end());
  KILN_ASSIGN_OR_RETURN(Window w, nn::make_window(ctx.node, xs, {}, true));
  const size_t nsp = w.nsp;
  const int64_t N = X->dim(0), C = X->dim(1), iprod = prod(xs), oprod = prod(w.out);
  const int64_t kprod = prod(w.kernel);
  const bool include_pad = ctx.node.attr_int("count_include_pad", 0) != 0;
  const float p = static_cast<float>(ctx.node.attr_int("p", 2));
  const bool col_major = ctx.node.attr_int("storage_order", 0) != 0;
  const bool want_idx = kind == PoolKind::kMax && out.size() > 1 && !ctx.node.outputs[1].empty();
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  Shape ys = {N, C};
  ys.insert(ys.end(), w.out.begin(), w.out.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  Tensor I;
  if (want_idx) {
    KILN_ASSIGN_OR_RETURN(I, Tensor::create(DataType::kInt64, ys));
  }
  // Column-major spatial strides for storage_order = 1.
  std::vector<int64_t> rstride = strides_of(xs), cstride(nsp, 1);
  for (size_t d = 1; d < nsp; ++d) cstride[d] = cstride[d - 1] * xs[d - 1];
  // Per-dim tap positions and validity, per output coordinate, precomputed.
  std::vector<int64_t> oidx(nsp), kidx(nsp);
  const float* x = xf.data<float>();
  float* y = Y.data<float>();
  for (int64_t o = 0; o < oprod; ++o) {
    int64_t rem = o;
    for (size_t d = nsp; d-- > 0;) {
      oidx[d] = rem % w.out[d];
      rem /= w.out[d];
    }
    // Divisor for AveragePool: separable per-dim counts.
    int64_t count = 1;
    if (kind == PoolKind::kAvg) {
      for (size_t d = 0; d < nsp; ++d) {
        int64_t c = 0;
        const int64_t lo = include_pad ? -w.pad_begin[d] : 0;
        const int64_t hi = include_pad ? xs[d] + w.pad_end[d] : xs[d];
        for (int64_t k = 0; k < w.kernel[d]; ++k) {
          const int64_t pos = oidx[d] * w.strides[d] - w.pad_begin[d] + k * w.dilations[d];
          if (pos >= lo && pos < hi) ++c;
        }
        count *= c;
      }
    }
    // Gather the valid taps (flat spatial offsets).
    std::vector<int64_t> taps;
    taps.reserve(static_cast<size_t>(std::min<int64_t>(kprod, 4096)));
    std::vector<int64_t> ctaps;
    std::fill(kidx.begin(), kidx.end(), 0);
    for (int64_t k = 0; k < kprod; ++k) {
      int64_t off = 0, coff = 0;
      bool inside = true;
      for (size_t d = 0; d < nsp; ++d) {
        const int64_t pos = oidx[d] * w.strides[d] - w.pad_begin[d] + kidx[d] * w.dilations[d];
        if (pos < 0 || pos >= xs[d]) {
          inside = false;
          break;
        }
        off += pos * rstride[d];
        coff += pos * cstride[d];
      }
      if (inside) {
        taps.push_back(off);
        if (want_idx) ctaps.push_back(col_major ? coff : off);
      }
      for (size_t d = nsp; d-- > 0;) {
        if (++kidx[d] < w.kernel[d]) break;
        kidx[d] = 0;
      }
    }
    for (int64_t nc = 0; nc < N * C; ++nc) {
      const float* xp = x + nc * iprod;
      float r;
      if (kind == PoolKind::kMax) {
        r = -std::numeric_limits<float>::infinity();
        size_t best = 0;
        for (size_t t = 0; t < taps.size(); ++t)
          if (xp[taps[t]] > r) {
            r = xp[taps[t]];
            best = t;
          }
        if (want_idx)
          I.data<int64_t>()[nc * oprod + o] = taps.empty() ? 0 : nc * iprod + ctaps[best];
      } else if (kind == PoolKind::kAvg) {
        double s = 0;
        for (int64_t t : taps) s += xp[t];
        r = count > 0 ? static_cast<float>(s / count) : 0.f;
      } else {
        double s = 0;
        for (int64_t t : taps) s += std::pow(std::fabs(static_cast<double>(xp[t])), p);
        r = static_cast<float>(std::pow(s, 1.0 / p));
      }
      y[nc * oprod + o] = r;
    }
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, dt));
  if (want_idx) out[1] = I;
  return Status::ok();
}

Status eval_maxpool(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_pool(c, i, o, PoolKind::kMax);
}
Status eval_avgpool(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_pool(c, i, o, PoolKind::kAvg);
}
Status eval_lppool(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_pool(c, i, o, PoolKind::kLp);
}

Status infer_pool(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(x.dtype);
  if (x.has_shape && x.dims.size() >= 3) {
    std::vector<Dim> sp(x.dims.begin() + 2, x.dims.end()), os;
    if (nn::infer_window_out(ctx.node, sp, {}, true, &os)) {
      o.has_shape = true;
      o.dims = {x.dims[0], x.dims[1]};
      o.dims.insert(o.dims.end(), os.begin(), os.end());
    }
  }
  ctx.output_types[0] = o;
  if (ctx.output_types.size() > 1) {
    ctx.output_types[1] = o;
    ctx.output_types[1].dtype = DataType::kInt64;
  }
  return Status::ok();
}

Status eval_global(OpContext& ctx, std::span<const Value> in, std::span<Value> out, PoolKind kind) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() < 2) return ctx.bad_input("input rank must be >= 2");
  const int64_t NC = X->dim(0) * X->dim(1), sp = prod(X->shape(), 2);
  const float p = static_cast<float>(ctx.node.attr_int("p", 2));
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  Shape ys = X->shape();
  for (size_t i = 2; i < ys.size(); ++i) ys[i] = 1;
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  const float* x = xf.data<float>();
  for (int64_t i = 0; i < NC; ++i) {
    const float* xp = x + i * sp;
    double r = 0;
    if (kind == PoolKind::kMax) {
      r = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < sp; ++j) r = std::max<double>(r, xp[j]);
    } else if (kind == PoolKind::kAvg) {
      for (int64_t j = 0; j < sp; ++j) r += xp[j];
      r = sp > 0 ? r / sp : 0;
    } else {
      for (int64_t j = 0; j < sp; ++j) r += std::pow(std::fabs(static_cast<double>(xp[j])), p);
      r = std::pow(r, 1.0 / p);
    }
    Y.data<float>()[i] = static_cast<float>(r);
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}
Status eval_gmax(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_global(c, i, o, PoolKind::kMax);
}
Status eval_gavg(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_global(c, i, o, PoolKind::kAvg);
}
Status eval_glp(OpContext& c, std::span<const Value> i, std::span<Value> o) {
  return eval_global(c, i, o, PoolKind::kLp);
}

Status infer_global(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  TypeInfo o = ctx.input_types[0];
  if (o.kind != TypeInfo::Kind::kTensor) return Status::ok();
  for (size_t i = 2; i < o.dims.size(); ++i) o.dims[i] = Dim::of(1);
  ctx.output_types[0] = o;
  return Status::ok();
}

Status eval_maxunpool(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* I, req_tensor(ctx, in, 1));
  const Tensor* OS = opt_tensor(in, 2);
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() < 3 || I->shape() != X->shape())
    return ctx.bad_input("X " + shape_str(X->shape()) + " and I " + shape_str(I->shape()) +
                         " must have the same shape of rank >= 3");
  const size_t nsp = X->rank() - 2;
  auto ks = ctx.node.attr_ints("kernel_shape");
  auto st = ctx.node.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  auto pads = ctx.node.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  if (ks.size() != nsp || st.size() != nsp || pads.size() != 2 * nsp)
    return ctx.bad_input("kernel_shape/strides/pads do not match the input rank");
  // Scatter into the inferred shape, then place it at the origin of output_shape (reference).
  Shape inf = {X->dim(0), X->dim(1)};
  for (size_t i = 0; i < nsp; ++i)
    inf.push_back((X->dim(2 + i) - 1) * st[i] + ks[i] - pads[i] - pads[i + nsp]);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor Yi, Tensor::create(DataType::kFloat, inf));
  for (int64_t i = 0; i < X->numel(); ++i) {
    const int64_t idx = I->get_i64(i);
    if (idx < 0 || idx >= Yi.numel())
      return ctx.bad_input("index " + std::to_string(idx) + " is out of range for output " +
                           shape_str(inf));
    Yi.data<float>()[idx] = xf.data<float>()[i];
  }
  Tensor Y = Yi;
  if (OS) {
    Shape ys = OS->to_i64_vector();
    if (ys.size() != inf.size()) return ctx.bad_input("output_shape rank mismatch");
    KILN_ASSIGN_OR_RETURN(Y, Tensor::create(DataType::kFloat, ys));
    const auto si = strides_of(inf), so = strides_of(ys);
    for (int64_t i = 0; i < Yi.numel(); ++i) {
      int64_t rem = i, off = 0;
      bool inside = true;
      for (size_t d = 0; d < inf.size(); ++d) {
        const int64_t c = rem / si[d];
        rem %= si[d];
        if (c >= ys[d]) inside = false;
        off += c * so[d];
      }
      if (inside) Y.data<float>()[off] = Yi.data<float>()[i];
    }
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

}  // namespace

const OpDef kOp_MaxPool = {"MaxPool", "", &eval_maxpool, &infer_pool};
const OpDef kOp_AveragePool = {"AveragePool", "", &eval_avgpool, &infer_pool};
const OpDef kOp_LpPool = {"LpPool", "", &eval_lppool, &infer_pool};
const OpDef kOp_GlobalMaxPool = {"GlobalMaxPool", "", &eval_gmax, &infer_global};
const OpDef kOp_GlobalAveragePool = {"GlobalAveragePool", "", &eval_gavg, &infer_global};
const OpDef kOp_GlobalLpPool = {"GlobalLpPool", "", &eval_glp, &infer_global};
const OpDef kOp_MaxUnpool = {"MaxUnpool", "", &eval_maxunpool, nullptr};

}  // namespace kiln
