// Reductions (ReduceSum ... ReduceLogSumExp), ArgMax/ArgMin, CumSum/CumProd, TopK, Unique.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "ops/tensor/tensor_common.h"

namespace kiln {
using namespace tensor_ops;

namespace {

enum class RK { kSum, kMean, kMax, kMin, kProd, kL1, kL2, kLogSum, kLogSumExp, kSumSquare };

// Which axes are reduced, or nullopt-equivalent `identity` when noop_with_empty_axes applies.
Result<std::vector<bool>> reduce_mask(const OpContext& ctx, std::span<const Value> in, int64_t r,
                                      bool& identity) {
  identity = false;
  std::vector<int64_t> axes;
  if (auto* at = opt_tensor(in, 1)) {
    KILN_ASSIGN_OR_RETURN(axes, int_input(ctx, *at, "axes"));
  }
  std::vector<bool> m(static_cast<size_t>(r), axes.empty());
  if (axes.empty() && ctx.node.attr_int("noop_with_empty_axes", 0) != 0) {
    identity = true;
    return m;
  }
  for (auto a : axes) {
    if (a < -r || a >= r) return ctx.bad_input("axis " + std::to_string(a) + " out of range");
    m[static_cast<size_t>(a < 0 ? a + r : a)] = true;
  }
  return m;
}

template <RK K>
Status eval_reduce(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  bool identity;
  KILN_ASSIGN_OR_RETURN(auto mask, reduce_mask(ctx, in, x->rank(), identity));
  if (identity) {
    out[0] = *x;
    return Status::ok();
  }
  bool keep = ctx.node.attr_int("keepdims", 1) != 0;
  const Shape& xs = x->shape();
  Shape os, full;  // full: keepdims shape (for output strides)
  int64_t count = 1;
  for (size_t d = 0; d < xs.size(); ++d) {
    if (mask[d]) {
      count *= xs[d];
      full.push_back(1);
      if (keep) os.push_back(1);
    } else {
      full.push_back(xs[d]);
      os.push_back(xs[d]);
    }
  }
  auto fst = strides_of(full);
  for (size_t d = 0; d < xs.size(); ++d)
    if (mask[d]) fst[d] = 0;
  int64_t on = numel_of(full);
  DataType dt = x->dtype();
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, os));
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    using A = std::conditional_t<std::is_floating_point_v<C>, double, int64_t>;
    const T* s = x->data<T>();
    std::vector<A> acc(static_cast<size_t>(on));
    std::vector<A> mx;
    A init = 0;
    if constexpr (K == RK::kProd) init = 1;
    if constexpr (K == RK::kMax || K == RK::kLogSumExp) {
      init = std::is_floating_point_v<A> ? -std::numeric_limits<A>::infinity()
                                         : static_cast<A>(std::numeric_limits<C>::lowest());
    }
    if constexpr (K == RK::kMin) {
      init = std::is_floating_point_v<A> ? std::numeric_limits<A>::infinity()
                                         : static_cast<A>(std::numeric_limits<C>::max());
    }
    std::fill(acc.begin(), acc.end(), init);
    auto offsets = strided_offsets(xs, 0, fst);  // input element -> output slot
    if constexpr (K == RK::kLogSumExp) {
      for (size_t i = 0; i < offsets.size(); ++i)
        acc[offsets[i]] = std::max<A>(acc[offsets[i]], static_cast<A>(static_cast<C>(s[i])));
      mx = acc;
      for (auto& m : mx)
        if (!std::isfinite(static_cast<double>(m))) m = 0;
      std::fill(acc.begin(), acc.end(), A(0));
    }
    for (size_t i = 0; i < offsets.size(); ++i) {
      A v = static_cast<A>(static_cast<C>(s[i]));
      A& a = acc[offsets[i]];
      if constexpr (K == RK::kSum || K == RK::kMean || K == RK::kLogSum)
        a += v;
      else if constexpr (K == RK::kMax)
        a = std::max(a, v);
      else if constexpr (K == RK::kMin)
        a = std::min(a, v);
      else if constexpr (K == RK::kProd)
        a *= v;
      else if constexpr (K == RK::kL1)
        a += v < 0 ? -v : v;
      else if constexpr (K == RK::kL2 || K == RK::kSumSquare)
        a += v * v;
      else if constexpr (K == RK::kLogSumExp)
        a += static_cast<A>(std::exp(static_cast<double>(v - mx[offsets[i]])));
    }
    T* d = t.data<T>();
    for (int64_t i = 0; i < on; ++i) {
      A a = acc[static_cast<size_t>(i)];
      double r = static_cast<double>(a);
      if constexpr (K == RK::kMean) r = count ? r / static_cast<double>(count) : std::nan("");
      if constexpr (K == RK::kL2) r = std::sqrt(r);
      if constexpr (K == RK::kLogSum) r = std::log(r);
      if constexpr (K == RK::kLogSumExp)
        r = std::log(r) + static_cast<double>(mx[static_cast<size_t>(i)]);
      if constexpr (std::is_floating_point_v<A>)
        d[i] = T(static_cast<C>(r));
      else if constexpr (K == RK::kMean || K == RK::kL2 || K == RK::kLogSum || K == RK::kLogSumExp)
        d[i] = static_cast<T>(r);
      else
        d[i] = static_cast<T>(a);
    }
  };
  if (dispatch_numeric(dt, run)) {
    out[0] = t;
    return Status::ok();
  }
  if (dt == DataType::kBool && (K == RK::kMax || K == RK::kMin)) {
    auto offsets = strided_offsets(xs, 0, fst);
    std::vector<uint8_t> acc(static_cast<size_t>(on), K == RK::kMin ? 1 : 0);
    for (size_t i = 0; i < offsets.size(); ++i) {
      bool v = x->data<bool>()[i];
      if (K == RK::kMax)
        acc[offsets[i]] |= v;
      else
        acc[offsets[i]] &= v;
    }
    for (int64_t i = 0; i < on; ++i) t.data<bool>()[i] = acc[static_cast<size_t>(i)] != 0;
    out[0] = t;
    return Status::ok();
  }
  return unsupported_dtype(ctx, dt);
}

Status infer_reduce(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  set_out_unranked(ctx, 0, ti.dtype);
  if (!ti.has_shape) return Status::ok();
  std::vector<int64_t> axes;
  bool has_axes = ctx.input_types.size() > 1 && ctx.input_types[1].kind != TypeInfo::Kind::kUnknown;
  if (has_axes && !const_ints(ctx, 1, axes)) return Status::ok();
  int64_t r = static_cast<int64_t>(ti.dims.size());
  if (axes.empty() && ctx.node.attr_int("noop_with_empty_axes", 0) != 0) {
    ctx.output_types[0] = ti;
    return Status::ok();
  }
  std::vector<bool> m(ti.dims.size(), axes.empty());
  for (auto a : axes) {
    int64_t n = norm_axis_or(a, r);
    if (n < 0 || r == 0) return Status::ok();
    m[static_cast<size_t>(n)] = true;
  }
  bool keep = ctx.node.attr_int("keepdims", 1) != 0;
  std::vector<Dim> d;
  for (size_t i = 0; i < m.size(); ++i) {
    if (!m[i])
      d.push_back(ti.dims[i]);
    else if (keep)
      d.push_back(Dim::of(1));
  }
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}

// ---------------------------------------------------------------- ArgMax / ArgMin
template <bool kMax>
Status eval_arg(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int64_t r = x->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), r));
  if (r == 0) return ctx.bad_input("input must have rank >= 1");
  bool keep = ctx.node.attr_int("keepdims", 1) != 0;
  bool last = ctx.node.attr_int("select_last_index", 0) != 0;
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)];
  if (dim == 0) return ctx.bad_input("cannot take arg of an empty axis");
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  Shape os = xs;
  if (keep)
    os[static_cast<size_t>(axis)] = 1;
  else
    os.erase(os.begin() + axis);
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(DataType::kInt64, os));
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* s = x->data<T>();
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < inner; ++j) {
        int64_t best = 0;
        C bv = static_cast<C>(s[o * dim * inner + j]);
        for (int64_t k = 1; k < dim; ++k) {
          C v = static_cast<C>(s[(o * dim + k) * inner + j]);
          bool better = kMax ? (v > bv || (last && v == bv)) : (v < bv || (last && v == bv));
          if (better) {
            bv = v;
            best = k;
          }
        }
        t.data<int64_t>()[o * inner + j] = best;
      }
  };
  if (!dispatch_numeric(x->dtype(), run)) {
    if (x->dtype() != DataType::kBool) return unsupported_dtype(ctx, x->dtype());
    run(TypeTag<bool>{});
  }
  out[0] = t;
  return Status::ok();
}
Status infer_arg(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  set_out_unranked(ctx, 0, DataType::kInt64);
  if (!ti.has_shape || ti.dims.empty()) return Status::ok();
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", 0), static_cast<int64_t>(ti.dims.size()));
  if (axis < 0) return Status::ok();
  std::vector<Dim> d = ti.dims;
  if (ctx.node.attr_int("keepdims", 1) != 0)
    d[static_cast<size_t>(axis)] = Dim::of(1);
  else
    d.erase(d.begin() + axis);
  set_out_dims(ctx, 0, DataType::kInt64, d);
  return Status::ok();
}

// ---------------------------------------------------------------- CumSum / CumProd
template <bool kProd>
Status eval_cum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* at, req_tensor(ctx, in, 1));
  if (at->numel() != 1 || !is_integer(at->dtype()))
    return ctx.bad_input("axis must be an integer scalar");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, at->get_i64(0), x->rank()));
  if (x->rank() == 0) return ctx.bad_input("input must have rank >= 1");
  bool excl = ctx.node.attr_int("exclusive", 0) != 0, rev = ctx.node.attr_int("reverse", 0) != 0;
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)], outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), xs));
  bool ok = dispatch_numeric(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    using A = std::conditional_t<std::is_floating_point_v<C>, double, C>;
    const T* s = x->data<T>();
    T* d = t.data<T>();
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < inner; ++j) {
        A acc = kProd ? A(1) : A(0);
        for (int64_t kk = 0; kk < dim; ++kk) {
          int64_t k = rev ? dim - 1 - kk : kk;
          int64_t off = (o * dim + k) * inner + j;
          A v = static_cast<A>(static_cast<C>(s[off]));
          if (excl) {
            d[off] = T(static_cast<C>(acc));
            acc = kProd ? static_cast<A>(acc * v) : static_cast<A>(acc + v);
          } else {
            acc = kProd ? static_cast<A>(acc * v) : static_cast<A>(acc + v);
            d[off] = T(static_cast<C>(acc));
          }
        }
      }
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}

Status infer_same(InferContext& ctx) {
  if (in_tensor(ctx, 0) && !ctx.output_types.empty()) ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

// ---------------------------------------------------------------- TopK
Status eval_topk(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* kt, req_tensor(ctx, in, 1));
  if (kt->numel() != 1 || !is_integer(kt->dtype()))
    return ctx.bad_input("K must be a 1-element integer tensor");
  int64_t k = kt->get_i64(0);
  int64_t r = x->rank();
  if (r == 0) return ctx.bad_input("input must have rank >= 1");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", -1), r));
  bool largest = ctx.node.attr_int("largest", 1) != 0;
  const Shape& xs = x->shape();
  int64_t dim = xs[static_cast<size_t>(axis)], outer = 1, inner = 1;
  if (k < 0 || k > dim)
    return ctx.bad_input("K=" + std::to_string(k) + " out of range for axis of " +
                         std::to_string(dim));
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  Shape os = xs;
  os[static_cast<size_t>(axis)] = k;
  KILN_ASSIGN_OR_RETURN(Tensor ti, Tensor::create(DataType::kInt64, os));
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  bool ok = dispatch_numeric(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* s = x->data<T>();
    std::vector<int64_t> idx(static_cast<size_t>(dim));
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t j = 0; j < inner; ++j) {
        auto val = [&](int64_t i) { return static_cast<C>(s[(o * dim + i) * inner + j]); };
        std::iota(idx.begin(), idx.end(), 0);
        // Ties keep the lower index first (stable); NaN counts as largest.
        auto cmp = [&](int64_t a, int64_t b) {
          C va = val(a), vb = val(b);
          if constexpr (std::is_floating_point_v<C>) {
            bool na = std::isnan(va), nb = std::isnan(vb);
            if (na || nb) return largest ? (na && !nb) : (!na && nb);
          }
          return largest ? va > vb : va < vb;
        };
        std::stable_sort(idx.begin(), idx.end(), cmp);
        for (int64_t q = 0; q < k; ++q) {
          int64_t oo = (o * k + q) * inner + j;
          ti.data<int64_t>()[oo] = idx[static_cast<size_t>(q)];
          offs[static_cast<size_t>(oo)] = (o * dim + idx[static_cast<size_t>(q)]) * inner + j;
        }
      }
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  KILN_ASSIGN_OR_RETURN(Tensor tv, gather_flat(ctx, *x, os, offs));
  out[0] = tv;
  if (out.size() > 1) out[1] = ti;
  return Status::ok();
}
Status infer_topk(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  set_out_unranked(ctx, 0, ti.dtype);
  set_out_unranked(ctx, 1, DataType::kInt64);
  if (!ti.has_shape || ti.dims.empty()) return Status::ok();
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", -1), static_cast<int64_t>(ti.dims.size()));
  if (axis < 0) return Status::ok();
  std::vector<int64_t> k;
  std::vector<Dim> d = ti.dims;
  d[static_cast<size_t>(axis)] = const_ints(ctx, 1, k) && k.size() == 1 ? Dim::of(k[0]) : Dim{};
  set_out_dims(ctx, 0, ti.dtype, d);
  set_out_dims(ctx, 1, DataType::kInt64, d);
  return Status::ok();
}

// ---------------------------------------------------------------- Unique
Status eval_unique(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  bool sorted = ctx.node.attr_int("sorted", 1) != 0;
  Shape xs = x->shape();
  int64_t axis = 0;
  if (ctx.node.has_attr("axis")) {
    KILN_ASSIGN_OR_RETURN(axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
    if (x->rank() == 0) return ctx.bad_input("axis given for a scalar");
  } else {
    xs = {x->numel()};
  }
  int64_t dim = xs[static_cast<size_t>(axis)], outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= xs[static_cast<size_t>(d)];
  for (size_t d = static_cast<size_t>(axis) + 1; d < xs.size(); ++d) inner *= xs[d];
  std::vector<int64_t> uniq;  // slice index of each unique slice (first occurrence)
  std::vector<int64_t> inverse(static_cast<size_t>(dim));
  std::vector<int64_t> counts;
  bool ok = dispatch_all(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    const T* s = x->data<T>();
    auto elem = [&](int64_t sl, int64_t o, int64_t j) {
      return static_cast<C>(s[(o * dim + sl) * inner + j]);
    };
    auto less = [&](int64_t a, int64_t b) {  // lexicographic order of slices
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t j = 0; j < inner; ++j) {
          C va = elem(a, o, j), vb = elem(b, o, j);
          if (va < vb) return true;
          if (vb < va) return false;
        }
      return false;
    };
    auto equal = [&](int64_t a, int64_t b) { return !less(a, b) && !less(b, a); };
    std::vector<int64_t> order(static_cast<size_t>(dim));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), less);
    // Group equal slices; the first in each group (stable) is the first occurrence.
    std::vector<int64_t> group_of(static_cast<size_t>(dim));
    std::vector<int64_t> firsts, gcount;
    for (size_t i = 0; i < order.size(); ++i) {
      if (i == 0 || !equal(order[i - 1], order[i])) {
        firsts.push_back(order[i]);
        gcount.push_back(0);
      }
      group_of[static_cast<size_t>(order[i])] = static_cast<int64_t>(firsts.size()) - 1;
      gcount.back()++;
    }
    std::vector<int64_t> gorder(firsts.size());
    std::iota(gorder.begin(), gorder.end(), 0);
    if (!sorted)
      std::sort(gorder.begin(), gorder.end(),
                [&](int64_t a, int64_t b) { return firsts[a] < firsts[b]; });
    std::vector<int64_t> rank_of(firsts.size());
    for (size_t i = 0; i < gorder.size(); ++i) {
      rank_of[static_cast<size_t>(gorder[i])] = static_cast<int64_t>(i);
      uniq.push_back(firsts[static_cast<size_t>(gorder[i])]);
      counts.push_back(gcount[static_cast<size_t>(gorder[i])]);
    }
    for (int64_t i = 0; i < dim; ++i)
      inverse[static_cast<size_t>(i)] =
          rank_of[static_cast<size_t>(group_of[static_cast<size_t>(i)])];
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  int64_t u = static_cast<int64_t>(uniq.size());
  Shape ys = xs;
  ys[static_cast<size_t>(axis)] = u;
  std::vector<int64_t> offs;
  offs.reserve(static_cast<size_t>(outer * u * inner));
  for (int64_t o = 0; o < outer; ++o)
    for (auto sl : uniq)
      for (int64_t j = 0; j < inner; ++j) offs.push_back((o * dim + sl) * inner + j);
  KILN_ASSIGN_OR_RETURN(Tensor y, gather_flat(ctx, *x, ys, offs));
  out[0] = y;
  if (out.size() > 1) out[1] = Tensor::from_vector<int64_t>({u}, uniq);
  if (out.size() > 2) out[2] = Tensor::from_vector<int64_t>({dim}, inverse);
  if (out.size() > 3) out[3] = Tensor::from_vector<int64_t>({u}, counts);
  return Status::ok();
}

Status infer_unique(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  if (x.has_shape && ctx.node.has_attr("axis")) {
    std::vector<Dim> d = x.dims;
    int64_t a = norm_axis_or(ctx.node.attr_int("axis", 0), static_cast<int64_t>(d.size()));
    if (a >= 0 && !d.empty()) d[static_cast<size_t>(a)] = Dim{};
    set_out_dims(ctx, 0, x.dtype, d);
  } else {
    set_out_dims(ctx, 0, x.dtype, {Dim{}});
  }
  for (size_t i = 1; i < ctx.output_types.size(); ++i)
    set_out_dims(ctx, i, DataType::kInt64, {Dim{}});
  return Status::ok();
}

}  // namespace

const OpDef kOp_ReduceSum = {"ReduceSum", "", &guarded<&eval_reduce<RK::kSum>>, &infer_reduce};
const OpDef kOp_ReduceMean = {"ReduceMean", "", &guarded<&eval_reduce<RK::kMean>>, &infer_reduce};
const OpDef kOp_ReduceMax = {"ReduceMax", "", &guarded<&eval_reduce<RK::kMax>>, &infer_reduce};
const OpDef kOp_ReduceMin = {"ReduceMin", "", &guarded<&eval_reduce<RK::kMin>>, &infer_reduce};
const OpDef kOp_ReduceProd = {"ReduceProd", "", &guarded<&eval_reduce<RK::kProd>>, &infer_reduce};
const OpDef kOp_ReduceL1 = {"ReduceL1", "", &guarded<&eval_reduce<RK::kL1>>, &infer_reduce};
const OpDef kOp_ReduceL2 = {"ReduceL2", "", &guarded<&eval_reduce<RK::kL2>>, &infer_reduce};
const OpDef kOp_ReduceLogSum = {"ReduceLogSum", "", &guarded<&eval_reduce<RK::kLogSum>>,
                                &infer_reduce};
const OpDef kOp_ReduceLogSumExp = {"ReduceLogSumExp", "", &guarded<&eval_reduce<RK::kLogSumExp>>,
                                   &infer_reduce};
const OpDef kOp_ReduceSumSquare = {"ReduceSumSquare", "", &guarded<&eval_reduce<RK::kSumSquare>>,
                                   &infer_reduce};
const OpDef kOp_ArgMax = {"ArgMax", "", &guarded<&eval_arg<true>>, &infer_arg};
const OpDef kOp_ArgMin = {"ArgMin", "", &guarded<&eval_arg<false>>, &infer_arg};
const OpDef kOp_CumSum = {"CumSum", "", &guarded<&eval_cum<false>>, &infer_same};
const OpDef kOp_CumProd = {"CumProd", "", &guarded<&eval_cum<true>>, &infer_same};
const OpDef kOp_TopK = {"TopK", "", &guarded<&eval_topk>, &infer_topk};
const OpDef kOp_Unique = {"Unique", "", &guarded<&eval_unique>, &infer_unique};

}  // namespace kiln
