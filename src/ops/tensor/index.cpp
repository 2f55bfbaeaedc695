// Indexing and layout ops: Gather, GatherElements, GatherND, ScatterElements, ScatterND,
// TensorScatter, OneHot, NonZero, Compress, Pad, CenterCropPad, DepthToSpace, SpaceToDepth,
// ReverseSequence.
#include <algorithm>
#include <cmath>

#include "ops/tensor/tensor_common.h"

namespace kiln {
using namespace tensor_ops;

namespace {

Result<int64_t> fix_index(const OpContext& ctx, int64_t i, int64_t dim) {
  if (i < -dim || i >= dim)
    return ctx.bad_input("index " + std::to_string(i) + " is out of range for dimension " +
                         std::to_string(dim));
  return i < 0 ? i + dim : i;
}

// ---------------------------------------------------------------- Gather
Status eval_gather(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  if (x->rank() == 0) return ctx.bad_input("data must have rank >= 1");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  KILN_ASSIGN_OR_RETURN(auto ind, int_input(ctx, *it, "indices"));
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)];
  for (auto& i : ind) {
    KILN_ASSIGN_OR_RETURN(i, fix_index(ctx, i, dim));
  }
  Shape os(xs.begin(), xs.begin() + axis);
  os.insert(os.end(), it->shape().begin(), it->shape().end());
  os.insert(os.end(), xs.begin() + axis + 1, xs.end());
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, os));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), os));
  bool ok = dispatch_bytes(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = x->data<T>();
    T* d = t.data<T>();
    for (int64_t o = 0; o < outer; ++o)
      for (auto i : ind) {
        const T* sp = s + (o * dim + i) * inner;
        d = std::copy(sp, sp + inner, d);
      }
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}
Status infer_gather(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  if (!ti.has_shape || !in_ranked(ctx, 1)) {
    set_out_unranked(ctx, 0, ti.dtype);
    return Status::ok();
  }
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", 0), static_cast<int64_t>(ti.dims.size()));
  if (axis < 0 || ti.dims.empty()) return Status::ok();
  std::vector<Dim> d(ti.dims.begin(), ti.dims.begin() + axis);
  const auto& id = ctx.input_types[1].dims;
  d.insert(d.end(), id.begin(), id.end());
  d.insert(d.end(), ti.dims.begin() + axis + 1, ti.dims.end());
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}

// ---------------------------------------------------------------- GatherElements
Status eval_gather_elements(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  if (x->rank() == 0 || it->rank() != x->rank())
    return ctx.bad_input("data and indices ranks differ");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  KILN_ASSIGN_OR_RETURN(auto ind, int_input(ctx, *it, "indices"));
  auto st = strides_of(x->shape());
  int64_t dim = x->dim(static_cast<int>(axis));
  std::vector<int64_t> offs(ind.size());
  Status bad = Status::ok();
  for_each_index(it->shape(), [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d) {
      int64_t v = idx[d];
      if (static_cast<int64_t>(d) == axis) {
        v = ind[static_cast<size_t>(i)];
        if (v < 0) v += dim;
        if (v < 0 || v >= dim) {
          bad = ctx.bad_input("index out of range");
          v = 0;
        }
      } else if (v >= x->shape()[d]) {
        bad = ctx.bad_input("indices shape exceeds data shape");
        v = 0;
      }
      o += v * st[d];
    }
    offs[static_cast<size_t>(i)] = o;
  });
  KILN_RETURN_IF_ERROR(bad);
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, it->shape(), offs));
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- GatherND
Status eval_gather_nd(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto ind, int_input(ctx, *it, "indices"));
  int64_t b = ctx.node.attr_int("batch_dims", 0);
  int64_t r = x->rank(), q = it->rank();
  if (q < 1 || r < 1 || b < 0 || b >= std::min(r, q))
    return ctx.bad_input("invalid ranks or batch_dims");
  int64_t m = it->shape().back();
  if (m < 1 || b + m > r) return ctx.bad_input("indices last dimension is too large");
  for (int64_t d = 0; d < b; ++d)
    if (x->dim(static_cast<int>(d)) != it->dim(static_cast<int>(d)))
      return ctx.bad_input("batch dimensions differ");
  Shape os(it->shape().begin(), it->shape().end() - 1);
  for (int64_t d = b + m; d < r; ++d) os.push_back(x->dim(static_cast<int>(d)));
  auto st = strides_of(x->shape());
  int64_t slice = 1;
  for (int64_t d = b + m; d < r; ++d) slice *= x->dim(static_cast<int>(d));
  int64_t ntup = numel_of(Shape(it->shape().begin(), it->shape().end() - 1));
  int64_t per_batch = 1;
  for (int64_t d = b; d < q - 1; ++d) per_batch *= it->dim(static_cast<int>(d));
  int64_t batch_stride = b > 0 ? st[static_cast<size_t>(b - 1)] : 0;
  std::vector<int64_t> offs;
  offs.reserve(static_cast<size_t>(ntup * slice));
  for (int64_t t = 0; t < ntup; ++t) {
    int64_t base = per_batch ? (t / per_batch) * batch_stride : 0;
    for (int64_t k = 0; k < m; ++k) {
      KILN_ASSIGN_OR_RETURN(int64_t v, fix_index(ctx, ind[static_cast<size_t>(t * m + k)],
                                                 x->dim(static_cast<int>(b + k))));
      base += v * st[static_cast<size_t>(b + k)];
    }
    for (int64_t s = 0; s < slice; ++s) offs.push_back(base + s);
  }
  KILN_ASSIGN_OR_RETURN(Tensor o, gather_flat(ctx, *x, os, offs));
  out[0] = o;
  return Status::ok();
}

// ---------------------------------------------------------------- Scatter helpers
enum class Red { kNone, kAdd, kMul, kMax, kMin };
Result<Red> get_reduction(const OpContext& ctx) {
  std::string r = ctx.node.attr_string("reduction", "none");
  if (r == "none") return Red::kNone;
  if (r == "add") return Red::kAdd;
  if (r == "mul") return Red::kMul;
  if (r == "max") return Red::kMax;
  if (r == "min") return Red::kMin;
  return ctx.bad_input("unknown reduction '" + r + "'");
}
// dst[doff[i]] (op)= upd[i] for every i.
Status scatter_apply(const OpContext& ctx, Tensor& dst, const Tensor& upd,
                     const std::vector<std::pair<int64_t, int64_t>>& pairs, Red red) {
  if (red == Red::kNone) {
    bool ok = dispatch_bytes(dst.dtype(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      for (auto [d, u] : pairs) dst.data<T>()[d] = upd.data<T>()[u];
    });
    return ok ? Status::ok() : unsupported_dtype(ctx, dst.dtype());
  }
  auto apply = [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    for (auto [d, u] : pairs) {
      C a = static_cast<C>(dst.data<T>()[d]), b = static_cast<C>(upd.data<T>()[u]);
      C r = red == Red::kAdd   ? static_cast<C>(a + b)
            : red == Red::kMul ? static_cast<C>(a * b)
            : red == Red::kMax ? std::max(a, b)
                               : std::min(a, b);
      dst.data<T>()[d] = T(r);
    }
  };
  if (dispatch_numeric(dst.dtype(), apply)) return Status::ok();
  if (dst.dtype() == DataType::kBool) {
    for (auto [d, u] : pairs) {
      bool a = dst.data<bool>()[d], b = upd.data<bool>()[u];
      dst.data<bool>()[d] = (red == Red::kAdd || red == Red::kMax) ? (a || b) : (a && b);
    }
    return Status::ok();
  }
  return unsupported_dtype(ctx, dst.dtype());
}

Status eval_scatter_elements(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 2));
  if (x->rank() == 0 || it->rank() != x->rank() || up->shape() != it->shape() ||
      up->dtype() != x->dtype())
    return ctx.bad_input("data, indices and updates shapes disagree");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  KILN_ASSIGN_OR_RETURN(Red red, get_reduction(ctx));
  KILN_ASSIGN_OR_RETURN(auto ind, int_input(ctx, *it, "indices"));
  auto st = strides_of(x->shape());
  int64_t dim = x->dim(static_cast<int>(axis));
  std::vector<std::pair<int64_t, int64_t>> pairs(ind.size());
  Status bad = Status::ok();
  for_each_index(it->shape(), [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d) {
      int64_t v = idx[d];
      if (static_cast<int64_t>(d) == axis) {
        v = ind[static_cast<size_t>(i)];
        if (v < 0) v += dim;
        if (v < 0 || v >= dim) {
          bad = ctx.bad_input("index out of range");
          v = 0;
        }
      } else if (v >= x->shape()[d]) {
        bad = ctx.bad_input("indices shape exceeds data shape");
        v = 0;
      }
      o += v * st[d];
    }
    pairs[static_cast<size_t>(i)] = {o, i};
  });
  KILN_RETURN_IF_ERROR(bad);
  Tensor t = x->clone();
  KILN_RETURN_IF_ERROR(scatter_apply(ctx, t, *up, pairs, red));
  out[0] = t;
  return Status::ok();
}

Status eval_scatter_nd(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 2));
  KILN_ASSIGN_OR_RETURN(Red red, get_reduction(ctx));
  KILN_ASSIGN_OR_RETURN(auto ind, int_input(ctx, *it, "indices"));
  int64_t r = x->rank(), q = it->rank();
  if (q < 1 || r < 1) return ctx.bad_input("data and indices need rank >= 1");
  int64_t m = it->shape().back();
  if (m > r) return ctx.bad_input("indices last dimension exceeds data rank");
  Shape us(it->shape().begin(), it->shape().end() - 1);
  for (int64_t d = m; d < r; ++d) us.push_back(x->dim(static_cast<int>(d)));
  if (up->shape() != us || up->dtype() != x->dtype())
    return ctx.bad_input("updates must be " + shape_str(us) + ", got " + up->describe());
  auto st = strides_of(x->shape());
  int64_t slice = 1;
  for (int64_t d = m; d < r; ++d) slice *= x->dim(static_cast<int>(d));
  int64_t ntup = m > 0 ? static_cast<int64_t>(ind.size()) / m
                       : numel_of(Shape(it->shape().begin(), it->shape().end() - 1));
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t t = 0; t < ntup; ++t) {
    int64_t base = 0;
    for (int64_t k = 0; k < m; ++k) {
      KILN_ASSIGN_OR_RETURN(int64_t v, fix_index(ctx, ind[static_cast<size_t>(t * m + k)],
                                                 x->dim(static_cast<int>(k))));
      base += v * st[static_cast<size_t>(k)];
    }
    for (int64_t s = 0; s < slice; ++s) pairs.push_back({base + s, t * slice + s});
  }
  Tensor o = x->clone();
  KILN_RETURN_IF_ERROR(scatter_apply(ctx, o, *up, pairs, red));
  out[0] = o;
  return Status::ok();
}

// TensorScatter (opset 24): writes `update` into a KV cache along the sequence axis at
// per-batch offsets write_indices (linear or circular).
Status eval_tensor_scatter(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* up, req_tensor(ctx, in, 1));
  const Tensor* wi = opt_tensor(in, 2);
  int64_t r = x->rank();
  if (r < 2 || up->rank() != r || up->dtype() != x->dtype())
    return ctx.bad_input("cache and update ranks differ");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -2), r));
  if (axis == 0) return ctx.bad_input("axis must not be the batch axis");
  bool circular = ctx.node.attr_string("mode", "linear") == "circular";
  for (int64_t d = 0; d < r; ++d)
    if (d != axis && x->dim(static_cast<int>(d)) != up->dim(static_cast<int>(d)))
      return ctx.bad_input("cache " + x->describe() + " and update " + up->describe() + " differ");
  std::vector<int64_t> widx(static_cast<size_t>(x->dim(0)), 0);
  if (wi) {
    KILN_ASSIGN_OR_RETURN(widx, int_input(ctx, *wi, "write_indices"));
    if (static_cast<int64_t>(widx.size()) != x->dim(0))
      return ctx.bad_input("write_indices length differs from batch");
  }
  int64_t L = x->dim(static_cast<int>(axis));
  auto xst = strides_of(x->shape());
  std::vector<std::pair<int64_t, int64_t>> pairs;
  Status bad = Status::ok();
  for_each_index(up->shape(), [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t p = widx[static_cast<size_t>(idx[0])] + idx[static_cast<size_t>(axis)];
    if (circular && L > 0) p %= L;
    if (p < 0 || p >= L) {
      bad = ctx.bad_input("write position out of range");
      return;
    }
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d)
      o += (static_cast<int64_t>(d) == axis ? p : idx[d]) * xst[d];
    pairs.push_back({o, i});
  });
  KILN_RETURN_IF_ERROR(bad);
  Tensor o = x->clone();
  KILN_RETURN_IF_ERROR(scatter_apply(ctx, o, *up, pairs, Red::kNone));
  out[0] = o;
  return Status::ok();
}

// ---------------------------------------------------------------- OneHot
Status eval_onehot(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* it, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* dt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* vt, req_tensor(ctx, in, 2));
  if (dt->numel() != 1 || vt->numel() != 2)
    return ctx.bad_input("depth must be a scalar, values 2 elements");
  double depth_f = dt->get_f64(0);
  if (!(depth_f >= 1 && depth_f < 1e15)) return ctx.bad_input("depth must be positive");
  int64_t depth = static_cast<int64_t>(depth_f);
  int64_t r = it->rank() + 1;
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  std::vector<int64_t> ind(static_cast<size_t>(it->numel()));
  for (int64_t i = 0; i < it->numel(); ++i) {
    double v = it->get_f64(i);  // indices may be float; out-of-range ones select nothing
    ind[static_cast<size_t>(i)] = std::abs(v) < 1e15 ? static_cast<int64_t>(v) : int64_t{1} << 60;
  }
  Shape os = it->shape();
  os.insert(os.begin() + axis, depth);
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, os));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= os[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < os.size(); ++d) inner *= os[d];
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t k = 0; k < depth; ++k)
      for (int64_t j = 0; j < inner; ++j) {
        int64_t v = ind[static_cast<size_t>(o * inner + j)];
        if (v < 0) v += depth;
        offs[static_cast<size_t>((o * depth + k) * inner + j)] = v == k ? 1 : 0;
      }
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *vt, os, offs));
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- NonZero / Compress
Result<std::vector<bool>> truthy(const OpContext& ctx, const Tensor& t) {
  std::vector<bool> v(static_cast<size_t>(t.numel()));
  if (t.dtype() == DataType::kBool) {
    for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.data<bool>()[i];
    return v;
  }
  bool ok = dispatch_numeric(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < t.numel(); ++i)
      v[static_cast<size_t>(i)] = static_cast<compute_t<T>>(t.data<T>()[i]) != compute_t<T>(0);
  });
  if (!ok) return unsupported_dtype(ctx, t.dtype());
  return v;
}
Status eval_nonzero(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(auto nz, truthy(ctx, *x));
  std::vector<std::vector<int64_t>> coords;
  for_each_index(x->shape(), [&](int64_t i, const std::vector<int64_t>& idx) {
    if (nz[static_cast<size_t>(i)]) coords.push_back(idx);
  });
  int64_t r = x->rank(), n = static_cast<int64_t>(coords.size());
  if (r == 0 && x->numel() == 1 && nz[0]) n = 1;
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(DataType::kInt64, {r, n}));
  for (int64_t d = 0; d < r; ++d)
    for (int64_t i = 0; i < n; ++i)
      t.data<int64_t>()[d * n + i] = coords[static_cast<size_t>(i)][static_cast<size_t>(d)];
  out[0] = t;
  return Status::ok();
}
Status eval_compress(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* ct, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto cond, truthy(ctx, *ct));
  Shape xs = x->shape();
  int64_t axis = 0;
  if (ctx.node.has_attr("axis")) {
    KILN_ASSIGN_OR_RETURN(axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  } else {
    xs = {x->numel()};
  }
  if (xs.empty()) return ctx.bad_input("cannot compress a scalar along an axis");
  int64_t dim = xs[static_cast<size_t>(axis)];
  if (static_cast<int64_t>(cond.size()) > dim)
    return ctx.bad_input("condition longer than the axis");
  std::vector<int64_t> keep;
  for (size_t i = 0; i < cond.size(); ++i)
    if (cond[i]) keep.push_back(static_cast<int64_t>(i));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  Shape os = xs;
  os[static_cast<size_t>(axis)] = static_cast<int64_t>(keep.size());
  std::vector<int64_t> offs;
  for (int64_t o = 0; o < outer; ++o)
    for (auto k : keep)
      for (int64_t j = 0; j < inner; ++j) offs.push_back((o * dim + k) * inner + j);
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, os, offs));
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- Pad
Status eval_pad(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* pt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto pads, int_input(ctx, *pt, "pads"));
  const Tensor* cv = opt_tensor(in, 2);
  if (cv && cv->numel() == 0) cv = nullptr;
  int64_t r = x->rank();
  std::vector<int64_t> axes;
  if (auto* at = opt_tensor(in, 3)) {
    KILN_ASSIGN_OR_RETURN(axes, int_input(ctx, *at, "axes"));
    for (auto& a : axes) {
      KILN_ASSIGN_OR_RETURN(a, norm_axis(ctx, a, r));
    }
  } else {
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  }
  if (pads.size() != 2 * axes.size())
    return ctx.bad_input("pads has " + std::to_string(pads.size()) + " entries, expected " +
                         std::to_string(2 * axes.size()));
  std::vector<int64_t> pb(static_cast<size_t>(r), 0), pe(static_cast<size_t>(r), 0);
  for (size_t i = 0; i < axes.size(); ++i) {
    pb[static_cast<size_t>(axes[i])] = pads[i];
    pe[static_cast<size_t>(axes[i])] = pads[i + axes.size()];
  }
  std::string mode = ctx.node.attr_string("mode", "constant");
  if (mode != "constant" && mode != "reflect" && mode != "edge" && mode != "wrap")
    return ctx.bad_input("unknown mode '" + mode + "'");
  const Shape& xs = x->shape();
  Shape os(xs.size());
  for (size_t d = 0; d < xs.size(); ++d) {
    if (__builtin_add_overflow(xs[d], pb[d], &os[d]) ||
        __builtin_add_overflow(os[d], pe[d], &os[d]))
      return ctx.bad_input("pads overflow");
    if (os[d] < 0) return ctx.bad_input("negative output dimension");
    if (mode != "constant" && xs[d] == 0 && os[d] > 0)
      return ctx.bad_input("cannot pad an empty axis");
  }
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, os));
  auto st = strides_of(xs);
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for_each_index(os, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d) {
      int64_t v = idx[d] - pb[d], n = xs[d];
      if (v < 0 || v >= n) {
        if (mode == "constant") {
          o = -1;
          break;
        }
        if (mode == "edge")
          v = v < 0 ? 0 : n - 1;
        else if (mode == "wrap")
          v = ((v % n) + n) % n;
        else if (n == 1)
          v = 0;
        else {
          int64_t period = 2 * (n - 1);
          v = ((v % period) + period) % period;
          if (v >= n) v = period - v;
        }
      }
      o += v * st[d];
    }
    offs[static_cast<size_t>(i)] = o;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), os));
  Tensor cv_cast;  // pre-opset-11 Pad carries a float value whatever the data type
  if (cv && cv->dtype() != x->dtype()) {
    KILN_ASSIGN_OR_RETURN(cv_cast, cast_tensor(*cv, x->dtype()));
    cv = &cv_cast;
  }
  bool ok = dispatch_bytes(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = x->data<T>();
    T* dd = t.data<T>();
    T fill = cv ? cv->data<T>()[0] : T{};
    for (size_t i = 0; i < offs.size(); ++i) dd[i] = offs[i] >= 0 ? s[offs[i]] : fill;
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- CenterCropPad
Status eval_center_crop_pad(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* stt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto shape, int_input(ctx, *stt, "shape"));
  int64_t r = x->rank();
  std::vector<int64_t> axes = ctx.node.attr_ints("axes");
  if (axes.empty())
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  if (axes.size() != shape.size()) return ctx.bad_input("shape and axes lengths differ");
  const Shape& xs = x->shape();
  Shape os = xs;
  std::vector<int64_t> shift(static_cast<size_t>(r), 0);  // in = out + shift
  for (size_t i = 0; i < axes.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(int64_t a, norm_axis(ctx, axes[i], r));
    int64_t n = xs[static_cast<size_t>(a)], m = shape[i];
    if (m < 0) return ctx.bad_input("negative target size");
    os[static_cast<size_t>(a)] = m;
    shift[static_cast<size_t>(a)] = m <= n ? (n - m) / 2 : -((m - n) / 2);
  }
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, os));
  auto st = strides_of(xs);
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for_each_index(os, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d) {
      int64_t v = idx[d] + shift[d];
      if (v < 0 || v >= xs[d]) {
        o = -1;
        break;
      }
      o += v * st[d];
    }
    offs[static_cast<size_t>(i)] = o;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), os));
  bool ok = dispatch_bytes(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (size_t i = 0; i < offs.size(); ++i)
      if (offs[i] >= 0) t.data<T>()[i] = x->data<T>()[offs[i]];
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- DepthToSpace / SpaceToDepth
Status eval_depth_to_space(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int64_t b = ctx.node.attr_int("blocksize", 0);
  if (x->rank() != 4 || b <= 0 || x->dim(1) % (b * b) != 0)
    return ctx.bad_input("needs a 4-D input with channels divisible by blocksize^2");
  bool crd = ctx.node.attr_string("mode", "DCR") == "CRD";
  int64_t N = x->dim(0), C = x->dim(1), H = x->dim(2), W = x->dim(3), Co = C / (b * b);
  Shape os = {N, Co, H * b, W * b};
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for_each_index(os, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t n = idx[0], c = idx[1], y = idx[2], xx = idx[3];
    int64_t bi = y % b, bj = xx % b;
    int64_t ci = crd ? c * b * b + bi * b + bj : (bi * b + bj) * Co + c;
    offs[static_cast<size_t>(i)] = ((n * C + ci) * H + y / b) * W + xx / b;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, os, offs));
  out[0] = t;
  return Status::ok();
}
Status eval_space_to_depth(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int64_t b = ctx.node.attr_int("blocksize", 0);
  if (x->rank() != 4 || b <= 0 || x->dim(2) % b != 0 || x->dim(3) % b != 0)
    return ctx.bad_input("needs a 4-D input with H and W divisible by blocksize");
  int64_t N = x->dim(0), C = x->dim(1), H = x->dim(2), W = x->dim(3);
  Shape os = {N, C * b * b, H / b, W / b};
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for_each_index(os, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t n = idx[0], co = idx[1], h = idx[2], w = idx[3];
    int64_t c = co % C, blk = co / C, bi = blk / b, bj = blk % b;
    offs[static_cast<size_t>(i)] = ((n * C + c) * H + h * b + bi) * W + w * b + bj;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, os, offs));
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- ReverseSequence
Status eval_reverse_sequence(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* lt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto lens, int_input(ctx, *lt, "sequence_lens"));
  int64_t r = x->rank();
  if (r < 2) return ctx.bad_input("input rank must be >= 2");
  KILN_ASSIGN_OR_RETURN(int64_t ba, norm_axis(ctx, ctx.node.attr_int("batch_axis", 1), r));
  KILN_ASSIGN_OR_RETURN(int64_t ta, norm_axis(ctx, ctx.node.attr_int("time_axis", 0), r));
  if (ba == ta) return ctx.bad_input("batch_axis equals time_axis");
  if (static_cast<int64_t>(lens.size()) != x->dim(static_cast<int>(ba)))
    return ctx.bad_input("sequence_lens length differs from batch size");
  int64_t T = x->dim(static_cast<int>(ta));
  for (auto& l : lens) l = std::clamp<int64_t>(l, 0, T);
  auto st = strides_of(x->shape());
  std::vector<int64_t> offs(static_cast<size_t>(x->numel()));
  for_each_index(x->shape(), [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    int64_t len = lens[static_cast<size_t>(idx[static_cast<size_t>(ba)])];
    for (size_t d = 0; d < idx.size(); ++d) {
      int64_t v = idx[d];
      if (static_cast<int64_t>(d) == ta && v < len) v = len - 1 - v;
      o += v * st[d];
    }
    offs[static_cast<size_t>(i)] = o;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, x->shape(), offs));
  out[0] = t;
  return Status::ok();
}

Status infer_same_as_input(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty() && in_tensor(ctx, 0))
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}
Status infer_indices_shape(InferContext& ctx) {  // GatherElements: output shape = indices shape
  if (in_tensor(ctx, 0) && in_tensor(ctx, 1)) {
    TypeInfo t = ctx.input_types[1];
    t.dtype = ctx.input_types[0].dtype;
    ctx.output_types[0] = t;
  }
  return Status::ok();
}

Status infer_gather_nd(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  set_out_unranked(ctx, 0, x.dtype);
  if (!x.has_shape || !in_ranked(ctx, 1)) return Status::ok();
  const auto& id = ctx.input_types[1].dims;
  int64_t b = ctx.node.attr_int("batch_dims", 0);
  if (id.empty() || !id.back().known()) return Status::ok();
  int64_t m = id.back().value, r = static_cast<int64_t>(x.dims.size());
  if (b < 0 || b + m > r) return Status::ok();
  std::vector<Dim> d(id.begin(), id.end() - 1);
  d.insert(d.end(), x.dims.begin() + b + m, x.dims.end());
  set_out_dims(ctx, 0, x.dtype, d);
  return Status::ok();
}
Status infer_onehot(InferContext& ctx) {
  if (!in_tensor(ctx, 2)) return Status::ok();
  DataType dt = ctx.input_types[2].dtype;
  set_out_unranked(ctx, 0, dt);
  if (!in_ranked(ctx, 0)) return Status::ok();
  std::vector<Dim> d = ctx.input_types[0].dims;
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", -1), static_cast<int64_t>(d.size()) + 1);
  if (axis < 0) return Status::ok();
  Dim depth;
  const Tensor* dc = ctx.input_constants.size() > 1 ? ctx.input_constants[1] : nullptr;
  if (dc && dc->numel() == 1 && dc->dtype() != DataType::kString)
    depth = Dim::of(static_cast<int64_t>(dc->get_f64(0)));
  d.insert(d.begin() + axis, depth);
  set_out_dims(ctx, 0, dt, d);
  return Status::ok();
}
Status infer_pad(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  set_out_unranked(ctx, 0, x.dtype);
  if (!x.has_shape) return Status::ok();
  std::vector<Dim> d(x.dims.size());
  std::vector<int64_t> pads, axes;
  int64_t r = static_cast<int64_t>(d.size());
  bool has_axes = ctx.input_types.size() > 3 && ctx.input_types[3].kind != TypeInfo::Kind::kUnknown;
  if (!const_ints(ctx, 1, pads) || (has_axes && !const_ints(ctx, 3, axes))) {
    set_out_dims(ctx, 0, x.dtype, d);
    return Status::ok();
  }
  if (!has_axes)
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  if (pads.size() != 2 * axes.size()) return Status::ok();
  d = x.dims;
  for (size_t i = 0; i < axes.size(); ++i) {
    int64_t a = norm_axis_or(axes[i], r);
    if (a < 0 || r == 0) return Status::ok();
    Dim& di = d[static_cast<size_t>(a)];
    int64_t add = pads[i] + pads[i + axes.size()];
    if (di.known())
      di = Dim::of(di.value + add);
    else if (add != 0)
      di = Dim{};
  }
  set_out_dims(ctx, 0, x.dtype, d);
  return Status::ok();
}
template <bool kD2S>
Status infer_d2s(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  int64_t b = ctx.node.attr_int("blocksize", 0);
  if (!x.has_shape || x.dims.size() != 4 || b <= 0) {
    set_out_unranked(ctx, 0, x.dtype);
    return Status::ok();
  }
  std::vector<Dim> d = x.dims;
  auto scale = [](Dim& v, int64_t mul, int64_t div) {
    if (v.known())
      v = Dim::of(v.value * mul / div);
    else
      v = Dim{};
  };
  if (kD2S) {
    scale(d[1], 1, b * b);
    scale(d[2], b, 1);
    scale(d[3], b, 1);
  } else {
    scale(d[1], b * b, 1);
    scale(d[2], 1, b);
    scale(d[3], 1, b);
  }
  set_out_dims(ctx, 0, x.dtype, d);
  return Status::ok();
}
Status infer_dtype_only(InferContext& ctx) {  // Compress, CenterCropPad: data-dependent shape
  if (in_tensor(ctx, 0)) set_out_unranked(ctx, 0, ctx.input_types[0].dtype);
  return Status::ok();
}
Status infer_nonzero(InferContext& ctx) {
  if (in_ranked(ctx, 0))
    set_out_dims(ctx, 0, DataType::kInt64,
                 {Dim::of(static_cast<int64_t>(ctx.input_types[0].dims.size())), Dim{}});
  else
    set_out_dims(ctx, 0, DataType::kInt64, {Dim{}, Dim{}});
  return Status::ok();
}

}  // namespace

const OpDef kOp_Gather = {"Gather", "", &guarded<&eval_gather>, &infer_gather};
const OpDef kOp_GatherElements = {"GatherElements", "", &guarded<&eval_gather_elements>,
                                  &infer_indices_shape};
const OpDef kOp_GatherND = {"GatherND", "", &guarded<&eval_gather_nd>, &infer_gather_nd};
const OpDef kOp_ScatterElements = {"ScatterElements", "", &guarded<&eval_scatter_elements>,
                                   &infer_same_as_input};
const OpDef kOp_ScatterND = {"ScatterND", "", &guarded<&eval_scatter_nd>, &infer_same_as_input};
const OpDef kOp_TensorScatter = {"TensorScatter", "", &guarded<&eval_tensor_scatter>,
                                 &infer_same_as_input};
const OpDef kOp_OneHot = {"OneHot", "", &guarded<&eval_onehot>, &infer_onehot};
const OpDef kOp_NonZero = {"NonZero", "", &guarded<&eval_nonzero>, &infer_nonzero};
const OpDef kOp_Compress = {"Compress", "", &guarded<&eval_compress>, &infer_dtype_only};
const OpDef kOp_Pad = {"Pad", "", &guarded<&eval_pad>, &infer_pad};
const OpDef kOp_CenterCropPad = {"CenterCropPad", "", &guarded<&eval_center_crop_pad>,
                                 &infer_dtype_only};
const OpDef kOp_DepthToSpace = {"DepthToSpace", "", &guarded<&eval_depth_to_space>,
                                &infer_d2s<true>};
const OpDef kOp_SpaceToDepth = {"SpaceToDepth", "", &guarded<&eval_space_to_depth>,
                                &infer_d2s<false>};
const OpDef kOp_ReverseSequence = {"ReverseSequence", "", &guarded<&eval_reverse_sequence>,
                                   &infer_same_as_input};

}  // namespace kiln
