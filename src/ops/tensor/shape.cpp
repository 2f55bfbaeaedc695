// Shape-manipulation ops: Constant, ConstantOfShape, Identity, Shape, Size, Reshape, Flatten,
// Squeeze, Unsqueeze, Transpose, Concat, Split, Slice, Expand, Tile, Range, EyeLike, Trilu.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/tensor/tensor_common.h"

namespace kiln {
using namespace tensor_ops;

namespace {

// ---------------------------------------------------------------- Constant
Result<Tensor> constant_value(const Node& n) {
  for (const Attribute& a : n.attrs) {
    if (a.name == "value" || a.name == "sparse_value") {
      if (a.kind == Attribute::Kind::kTensor && a.t.defined()) return a.t;
      return unsupported(n.where() + ": attribute '" + a.name + "' is not a dense tensor");
    }
    if (a.name == "value_float") return Tensor::scalar<float>(a.f);
    if (a.name == "value_int") return Tensor::scalar<int64_t>(a.i);
    if (a.name == "value_string") return Tensor::scalar<std::string>(a.s);
    if (a.name == "value_floats")
      return Tensor::from_vector<float>({static_cast<int64_t>(a.floats.size())}, a.floats);
    if (a.name == "value_ints")
      return Tensor::from_vector<int64_t>({static_cast<int64_t>(a.ints.size())}, a.ints);
    if (a.name == "value_strings")
      return Tensor::from_vector<std::string>({static_cast<int64_t>(a.strings.size())}, a.strings);
  }
  return invalid_model(n.where() + ": Constant has no value attribute");
}

Status eval_constant(OpContext& ctx, std::span<const Value>, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(Tensor t, constant_value(ctx.node));
  out[0] = t;
  return Status::ok();
}
Status infer_constant(InferContext& ctx) {
  auto t = constant_value(ctx.node);
  if (t.is_ok()) set_out(ctx, 0, t->dtype(), t->shape());
  return Status::ok();
}

// ---------------------------------------------------------------- ConstantOfShape
Status eval_constant_of_shape(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* s, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(Shape shape, int_input(ctx, *s, "shape"));
  const Tensor* v = ctx.node.attr_tensor("value");
  DataType dt = v && v->defined() ? v->dtype() : DataType::kFloat;
  if (v && v->defined() && v->numel() != 1) return ctx.bad_input("value must have one element");
  for (auto d : shape)
    if (d < 0) return ctx.bad_input("negative dimension in shape " + shape_str(shape));
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, shape));
  if (v && v->defined()) {
    bool ok = dispatch_bytes(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      T x = v->data<T>()[0];
      for (int64_t i = 0; i < t.numel(); ++i) t.data<T>()[i] = x;
    });
    if (!ok) return unsupported_dtype(ctx, dt);
  }
  out[0] = t;
  return Status::ok();
}
Status infer_constant_of_shape(InferContext& ctx) {
  const Tensor* v = ctx.node.attr_tensor("value");
  DataType dt = v && v->defined() ? v->dtype() : DataType::kFloat;
  std::vector<int64_t> s;
  if (const_ints(ctx, 0, s))
    set_out(ctx, 0, dt, s);
  else
    set_out_unranked(ctx, 0, dt);
  return Status::ok();
}

// ---------------------------------------------------------------- Identity
Status eval_identity(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (in.empty()) return ctx.bad_input("missing input");
  out[0] = in[0];
  return Status::ok();
}
Status infer_identity(InferContext& ctx) {
  if (!ctx.input_types.empty() && !ctx.output_types.empty())
    ctx.output_types[0] = ctx.input_types[0];
  return Status::ok();
}

// ---------------------------------------------------------------- Shape / Size
void shape_range(const Node& n, int64_t rank, int64_t& start, int64_t& end) {
  start = n.attr_int("start", 0);
  end = n.attr_int("end", rank);
  if (start < 0) start += rank;
  if (end < 0) end += rank;
  start = std::clamp<int64_t>(start, 0, rank);
  end = std::clamp<int64_t>(end, 0, rank);
  if (end < start) end = start;
}
Status eval_shape(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int64_t s, e;
  shape_range(ctx.node, x->rank(), s, e);
  std::vector<int64_t> v(x->shape().begin() + s, x->shape().begin() + e);
  out[0] = Tensor::from_vector<int64_t>({e - s}, v);
  return Status::ok();
}
Status infer_shape(InferContext& ctx) {
  if (in_ranked(ctx, 0)) {
    int64_t s, e;
    shape_range(ctx.node, static_cast<int64_t>(ctx.input_types[0].dims.size()), s, e);
    set_out(ctx, 0, DataType::kInt64, {e - s});
  } else {
    set_out_dims(ctx, 0, DataType::kInt64, {Dim{}});
  }
  return Status::ok();
}
Status eval_size(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  out[0] = Tensor::scalar<int64_t>(x->numel());
  return Status::ok();
}
Status infer_size(InferContext& ctx) {
  set_out(ctx, 0, DataType::kInt64, {});
  return Status::ok();
}

// ---------------------------------------------------------------- Reshape
Result<Shape> reshape_target(const Node& n, const Shape& in, std::vector<int64_t> s) {
  bool allowzero = n.attr_int("allowzero", 0) != 0;
  int64_t neg = -1, known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == 0 && !allowzero) {
      if (i >= in.size())
        return invalid_argument(n.where() + ": shape has 0 at index beyond input rank");
      s[i] = in[i];
    }
    if (s[i] == -1) {
      if (neg >= 0) return invalid_argument(n.where() + ": shape has more than one -1");
      neg = static_cast<int64_t>(i);
    } else if (s[i] < 0) {
      return invalid_argument(n.where() + ": invalid dimension " + std::to_string(s[i]));
    } else {
      known *= s[i];
    }
  }
  if (neg >= 0) {
    int64_t total = numel_of(in);
    if (known == 0 || total % known != 0)
      return invalid_argument(n.where() + ": cannot reshape " + shape_str(in) + " to " +
                              shape_str(s));
    s[static_cast<size_t>(neg)] = total / known;
  }
  return s;
}
Status eval_reshape(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* st, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto s, int_input(ctx, *st, "shape"));
  KILN_ASSIGN_OR_RETURN(Shape target, reshape_target(ctx.node, x->shape(), s));
  auto r = x->reshaped(target);
  if (!r.is_ok()) return r.status().with_context(ctx.node.where());
  out[0] = *r;
  return Status::ok();
}
Status infer_reshape(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  DataType dt = ctx.input_types[0].dtype;
  std::vector<int64_t> s;
  const std::vector<Dim>* sv =
      ctx.input_shape_values.size() > 1 ? ctx.input_shape_values[1] : nullptr;
  if (!const_ints(ctx, 1, s) && sv) {
    // A computed target with known or symbolic elements: 0 copies the input's dim (unless
    // allowzero), -1 is inferred only when everything else is a known number.
    const bool allowzero = ctx.node.attr_int("allowzero", 0) != 0;
    const TypeInfo& ti = ctx.input_types[0];
    std::vector<Dim> dims(sv->size());
    int64_t known = 1, neg = -1;
    bool numeric = true;
    for (size_t i = 0; i < sv->size(); ++i) {
      const Dim& e = (*sv)[i];
      if (e.known() && e.value == 0 && !allowzero) {
        if (ti.has_shape && i < ti.dims.size()) dims[i] = ti.dims[i];
      } else if (e.known() && e.value == -1) {
        neg = static_cast<int64_t>(i);
        continue;
      } else {
        dims[i] = e;
      }
      if (dims[i].known()) known *= dims[i].value;
      else numeric = false;
    }
    if (neg >= 0 && numeric && ti.fully_known() && known > 0) {
      int64_t total = numel_of(ti.concrete_shape());
      if (total % known == 0) dims[static_cast<size_t>(neg)] = Dim::of(total / known);
    }
    set_out_dims(ctx, 0, dt, dims);
    return Status::ok();
  }
  if (s.empty() && !const_ints(ctx, 1, s)) {
    if (ctx.input_types.size() > 1 && ctx.input_types[1].has_shape &&
        ctx.input_types[1].dims.size() == 1 && ctx.input_types[1].dims[0].known()) {
      set_out_dims(ctx, 0, dt,
                   std::vector<Dim>(static_cast<size_t>(ctx.input_types[1].dims[0].value)));
    } else {
      set_out_unranked(ctx, 0, dt);
    }
    return Status::ok();
  }
  bool allowzero = ctx.node.attr_int("allowzero", 0) != 0;
  const TypeInfo& ti = ctx.input_types[0];
  std::vector<Dim> dims(s.size());
  int64_t known = 1, neg = -1;
  bool all_known = true;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == 0 && !allowzero) {
      if (ti.has_shape && i < ti.dims.size()) dims[i] = ti.dims[i];
      if (!dims[i].known())
        all_known = false;
      else
        known *= dims[i].value;
    } else if (s[i] == -1) {
      neg = static_cast<int64_t>(i);
    } else if (s[i] >= 0) {
      dims[i] = Dim::of(s[i]);
      known *= s[i];
    }
  }
  if (neg >= 0 && all_known && ti.fully_known() && known > 0) {
    int64_t total = numel_of(ti.concrete_shape());
    if (total % known == 0) dims[static_cast<size_t>(neg)] = Dim::of(total / known);
  }
  set_out_dims(ctx, 0, dt, dims);
  return Status::ok();
}

// ---------------------------------------------------------------- Flatten
Status eval_flatten(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int64_t r = x->rank(), axis = ctx.node.attr_int("axis", 1);
  if (axis < 0) axis += r;
  if (axis < 0 || axis > r) return ctx.bad_input("axis out of range for rank " + std::to_string(r));
  int64_t a = 1, b = 1;
  for (int64_t i = 0; i < r; ++i) (i < axis ? a : b) *= x->dim(static_cast<int>(i));
  KILN_ASSIGN_OR_RETURN(Tensor t, x->reshaped({a, b}));
  out[0] = t;
  return Status::ok();
}
Status infer_flatten(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  if (!ti.has_shape) {
    set_out_dims(ctx, 0, ti.dtype, {Dim{}, Dim{}});
    return Status::ok();
  }
  int64_t r = static_cast<int64_t>(ti.dims.size()), axis = ctx.node.attr_int("axis", 1);
  if (axis < 0) axis += r;
  if (axis < 0 || axis > r) return Status::ok();
  int64_t a = 1, b = 1;
  for (int64_t i = 0; i < r; ++i) {
    int64_t& p = i < axis ? a : b;
    if (p >= 0 && ti.dims[static_cast<size_t>(i)].known())
      p *= ti.dims[static_cast<size_t>(i)].value;
    else
      p = -1;
  }
  set_out(ctx, 0, ti.dtype, {a, b});
  return Status::ok();
}

// ---------------------------------------------------------------- Squeeze / Unsqueeze
Status eval_squeeze(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  const Tensor* at = opt_tensor(in, 1);
  int64_t r = x->rank();
  std::vector<bool> drop(static_cast<size_t>(r), false);
  if (at) {
    KILN_ASSIGN_OR_RETURN(auto axes, int_input(ctx, *at, "axes"));
    for (auto a : axes) {
      if (a < -r || a >= r) return ctx.bad_input("axis " + std::to_string(a) + " out of range");
      if (a < 0) a += r;
      if (x->dim(static_cast<int>(a)) != 1)
        return ctx.bad_input("cannot squeeze axis " + std::to_string(a) + " of " + x->describe());
      drop[static_cast<size_t>(a)] = true;
    }
  } else {
    for (int64_t i = 0; i < r; ++i) drop[static_cast<size_t>(i)] = x->dim(static_cast<int>(i)) == 1;
  }
  Shape s;
  for (int64_t i = 0; i < r; ++i)
    if (!drop[static_cast<size_t>(i)]) s.push_back(x->dim(static_cast<int>(i)));
  KILN_ASSIGN_OR_RETURN(Tensor t, x->reshaped(s));
  out[0] = t;
  return Status::ok();
}
Status infer_squeeze(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  std::vector<int64_t> axes;
  bool has_axes = ctx.input_types.size() > 1 && ctx.input_types[1].kind != TypeInfo::Kind::kUnknown;
  if (!ti.has_shape || (has_axes && !const_ints(ctx, 1, axes))) {
    set_out_unranked(ctx, 0, ti.dtype);
    return Status::ok();
  }
  int64_t r = static_cast<int64_t>(ti.dims.size());
  std::vector<bool> drop(ti.dims.size(), false);
  if (has_axes) {
    for (auto a : axes) {
      int64_t n = norm_axis_or(a, r);
      if (n < 0 || r == 0) return Status::ok();
      drop[static_cast<size_t>(n)] = true;
    }
  } else {
    for (size_t i = 0; i < ti.dims.size(); ++i) {
      if (!ti.dims[i].known()) {
        set_out_unranked(ctx, 0, ti.dtype);
        return Status::ok();
      }
      drop[i] = ti.dims[i].value == 1;
    }
  }
  std::vector<Dim> d;
  for (size_t i = 0; i < ti.dims.size(); ++i)
    if (!drop[i]) d.push_back(ti.dims[i]);
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}

// Output rank and for each output axis whether it is a new (inserted) one.
Result<std::vector<bool>> unsqueeze_mask(const Node& n, int64_t r,
                                         const std::vector<int64_t>& axes) {
  int64_t orank = r + static_cast<int64_t>(axes.size());
  std::vector<bool> is_new(static_cast<size_t>(orank), false);
  for (auto a : axes) {
    if (a < -orank || a >= orank) return invalid_argument(n.where() + ": axis out of range");
    if (a < 0) a += orank;
    if (is_new[static_cast<size_t>(a)]) return invalid_argument(n.where() + ": repeated axis");
    is_new[static_cast<size_t>(a)] = true;
  }
  return is_new;
}
Status eval_unsqueeze(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* at, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto axes, int_input(ctx, *at, "axes"));
  KILN_ASSIGN_OR_RETURN(auto is_new, unsqueeze_mask(ctx.node, x->rank(), axes));
  Shape s;
  size_t j = 0;
  for (bool b : is_new) s.push_back(b ? 1 : x->shape()[j++]);
  KILN_ASSIGN_OR_RETURN(Tensor t, x->reshaped(s));
  out[0] = t;
  return Status::ok();
}
Status infer_unsqueeze(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  std::vector<int64_t> axes;
  if (!ti.has_shape || !const_ints(ctx, 1, axes)) {
    set_out_unranked(ctx, 0, ti.dtype);
    return Status::ok();
  }
  auto m = unsqueeze_mask(ctx.node, static_cast<int64_t>(ti.dims.size()), axes);
  if (!m.is_ok()) return Status::ok();
  std::vector<Dim> d;
  size_t j = 0;
  for (bool b : *m) d.push_back(b ? Dim::of(1) : ti.dims[j++]);
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}

// ---------------------------------------------------------------- Transpose
Result<std::vector<int64_t>> get_perm(const Node& n, int64_t r) {
  std::vector<int64_t> perm = n.attr_ints("perm");
  if (perm.empty() && !n.has_attr("perm")) {
    for (int64_t i = r - 1; i >= 0; --i) perm.push_back(i);
  }
  if (static_cast<int64_t>(perm.size()) != r)
    return invalid_argument(n.where() + ": perm has " + std::to_string(perm.size()) +
                            " entries, input rank is " + std::to_string(r));
  std::vector<bool> seen(static_cast<size_t>(r), false);
  for (auto& p : perm) {
    if (p < -r || p >= r) return invalid_argument(n.where() + ": perm entry out of range");
    if (p < 0) p += r;
    if (seen[static_cast<size_t>(p)]) return invalid_argument(n.where() + ": perm repeats an axis");
    seen[static_cast<size_t>(p)] = true;
  }
  return perm;
}
Status eval_transpose(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(auto perm, get_perm(ctx.node, x->rank()));
  auto st = strides_of(x->shape());
  Shape os;
  std::vector<int64_t> ost;
  for (auto p : perm) {
    os.push_back(x->shape()[static_cast<size_t>(p)]);
    ost.push_back(st[static_cast<size_t>(p)]);
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_strided(ctx, *x, os, 0, ost));
  out[0] = t;
  return Status::ok();
}
Status infer_transpose(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  // kiln_to (fold_cast_into_transpose, device builds): the Transpose also converts float32.
  const DataType dt = ctx.node.has_attr("kiln_to") && ti.dtype == DataType::kFloat
                          ? static_cast<DataType>(ctx.node.attr_int("kiln_to", 0))
                          : ti.dtype;
  if (!ti.has_shape) {
    set_out_unranked(ctx, 0, dt);
    return Status::ok();
  }
  auto perm = get_perm(ctx.node, static_cast<int64_t>(ti.dims.size()));
  if (!perm.is_ok()) return Status::ok();
  std::vector<Dim> d;
  for (auto p : *perm) d.push_back(ti.dims[static_cast<size_t>(p)]);
  set_out_dims(ctx, 0, dt, d);
  return Status::ok();
}

// ---------------------------------------------------------------- Concat
Status eval_concat(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  std::vector<const Tensor*> xs;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, i));
    xs.push_back(x);
  }
  if (xs.empty()) return ctx.bad_input("Concat needs at least one input");
  int64_t r = xs[0]->rank();
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), r));
  if (r == 0) return ctx.bad_input("Concat of scalars");
  Shape os = xs[0]->shape();
  os[static_cast<size_t>(axis)] = 0;
  for (auto* x : xs) {
    if (x->rank() != r || x->dtype() != xs[0]->dtype())
      return ctx.bad_input("inputs " + xs[0]->describe() + " and " + x->describe() + " differ");
    for (int64_t d = 0; d < r; ++d)
      if (d != axis && x->dim(static_cast<int>(d)) != os[static_cast<size_t>(d)])
        return ctx.bad_input("inputs " + xs[0]->describe() + " and " + x->describe() + " differ");
    os[static_cast<size_t>(axis)] += x->dim(static_cast<int>(axis));
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(xs[0]->dtype(), os));
  int64_t outer = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= os[static_cast<size_t>(d)];
  int64_t inner_out = t.numel() / std::max<int64_t>(outer, 1);
  bool ok = dispatch_bytes(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = t.data<T>();
    int64_t col = 0;
    for (auto* x : xs) {
      int64_t inner = outer ? x->numel() / std::max<int64_t>(outer, 1) : 0;
      const T* src = x->data<T>();
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t k = 0; k < inner; ++k) dst[o * inner_out + col + k] = src[o * inner + k];
      col += inner;
    }
  });
  if (!ok) return unsupported_dtype(ctx, t.dtype());
  out[0] = t;
  return Status::ok();
}
Status infer_concat(InferContext& ctx) {
  if (ctx.input_types.empty() || !in_tensor(ctx, 0)) return Status::ok();
  DataType dt = ctx.input_types[0].dtype;
  size_t r = 0;
  bool ranked = false;
  for (size_t i = 0; i < ctx.input_types.size(); ++i)
    if (in_ranked(ctx, i)) {
      r = ctx.input_types[i].dims.size();
      ranked = true;
      break;
    }
  if (!ranked || r == 0) {
    set_out_unranked(ctx, 0, dt);
    return Status::ok();
  }
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", 0), static_cast<int64_t>(r));
  if (axis < 0) return Status::ok();
  std::vector<Dim> d(r);
  int64_t sum = 0;
  for (size_t i = 0; i < ctx.input_types.size(); ++i) {
    if (!in_ranked(ctx, i)) {
      sum = -1;
      continue;
    }
    const auto& di = ctx.input_types[i].dims;
    if (di.size() != r) return Status::ok();
    for (size_t k = 0; k < r; ++k)
      if (static_cast<int64_t>(k) != axis && !d[k].known() && d[k].param.empty()) d[k] = di[k];
    if (sum >= 0 && di[static_cast<size_t>(axis)].known())
      sum += di[static_cast<size_t>(axis)].value;
    else
      sum = -1;
  }
  d[static_cast<size_t>(axis)] = sum >= 0 ? Dim::of(sum) : Dim{};
  set_out_dims(ctx, 0, dt, d);
  return Status::ok();
}

// ---------------------------------------------------------------- Split
Result<std::vector<int64_t>> split_sizes(const Node& n, const Tensor* split, int64_t dim,
                                         size_t nout) {
  std::vector<int64_t> sizes;
  if (split) {
    sizes = split->to_i64_vector();
    int64_t s = 0;
    for (auto v : sizes) {
      if (v < 0) return invalid_argument(n.where() + ": negative split size");
      s += v;
    }
    if (s != dim || sizes.size() != nout)
      return invalid_argument(n.where() + ": split sizes do not match dimension " +
                              std::to_string(dim));
    return sizes;
  }
  int64_t k = n.attr_int("num_outputs", static_cast<int64_t>(nout));
  if (k <= 0 || static_cast<size_t>(k) != nout)
    return invalid_argument(n.where() + ": num_outputs does not match outputs");
  int64_t chunk = (dim + k - 1) / k;
  int64_t left = dim;
  for (int64_t i = 0; i < k; ++i) {
    int64_t c = std::min(chunk, std::max<int64_t>(left, 0));
    sizes.push_back(c);
    left -= c;
  }
  return sizes;
}
Status eval_split(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  if (x->rank() == 0) return ctx.bad_input("cannot split a scalar");
  int64_t dim = x->dim(static_cast<int>(axis));
  KILN_ASSIGN_OR_RETURN(auto sizes, split_sizes(ctx.node, opt_tensor(in, 1), dim, out.size()));
  auto st = strides_of(x->shape());
  int64_t start = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    Shape os = x->shape();
    os[static_cast<size_t>(axis)] = sizes[i];
    if (!ctx.node.outputs[i].empty()) {
      KILN_ASSIGN_OR_RETURN(Tensor t,
                            gather_strided(ctx, *x, os, start * st[static_cast<size_t>(axis)], st));
      out[i] = t;
    }
    start += sizes[i];
  }
  return Status::ok();
}
Status infer_split(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  for (size_t i = 0; i < ctx.output_types.size(); ++i) set_out_unranked(ctx, i, ti.dtype);
  if (!ti.has_shape) return Status::ok();
  int64_t r = static_cast<int64_t>(ti.dims.size());
  int64_t axis = norm_axis_or(ctx.node.attr_int("axis", 0), r);
  if (axis < 0 || r == 0) return Status::ok();
  const Dim& ad = ti.dims[static_cast<size_t>(axis)];
  bool has_split =
      ctx.input_types.size() > 1 && ctx.input_types[1].kind != TypeInfo::Kind::kUnknown;
  const Tensor* sp = has_split && ctx.input_constants.size() > 1 ? ctx.input_constants[1] : nullptr;
  if (has_split && !sp) return Status::ok();
  if (!sp && !ad.known()) return Status::ok();
  auto sizes = split_sizes(ctx.node, sp, ad.known() ? ad.value : 0, ctx.output_types.size());
  if (!sizes.is_ok()) return Status::ok();
  for (size_t i = 0; i < ctx.output_types.size(); ++i) {
    auto d = ti.dims;
    d[static_cast<size_t>(axis)] = Dim::of((*sizes)[i]);
    set_out_dims(ctx, i, ti.dtype, d);
  }
  return Status::ok();
}

// ---------------------------------------------------------------- Slice
struct SliceSpec {
  Shape out;
  std::vector<int64_t> start, step;  // per input axis
};
Result<SliceSpec> slice_spec(const Node& n, const Shape& in, const std::vector<int64_t>& starts,
                             const std::vector<int64_t>& ends, std::vector<int64_t> axes,
                             std::vector<int64_t> steps) {
  int64_t r = static_cast<int64_t>(in.size());
  size_t k = starts.size();
  if (ends.size() != k) return invalid_argument(n.where() + ": starts and ends differ in length");
  if (axes.empty())
    for (size_t i = 0; i < k; ++i) axes.push_back(static_cast<int64_t>(i));
  if (steps.empty()) steps.assign(k, 1);
  if (axes.size() != k || steps.size() != k)
    return invalid_argument(n.where() + ": axes/steps length differs from starts");
  SliceSpec sp;
  sp.out = in;
  sp.start.assign(in.size(), 0);
  sp.step.assign(in.size(), 1);
  std::vector<bool> seen(in.size(), false);
  for (size_t i = 0; i < k; ++i) {
    int64_t a = axes[i];
    if (a < -r || a >= r) return invalid_argument(n.where() + ": axis out of range");
    if (a < 0) a += r;
    if (seen[static_cast<size_t>(a)]) return invalid_argument(n.where() + ": repeated axis");
    seen[static_cast<size_t>(a)] = true;
    int64_t d = in[static_cast<size_t>(a)], st = steps[i];
    if (st == 0) return invalid_argument(n.where() + ": step is 0");
    if (st == std::numeric_limits<int64_t>::min()) ++st;  // keep -st representable
    int64_t s = starts[i], e = ends[i];
    if (s < 0) s = s < -d ? (st > 0 ? 0 : -1) : s + d;  // avoid overflow on INT64_MIN
    if (e < 0) e = e < -d ? -1 : e + d;
    if (st > 0) {
      s = std::clamp<int64_t>(s, 0, d);
      e = std::clamp<int64_t>(e, 0, d);
    } else {
      s = std::clamp<int64_t>(s, -1, d - 1);
      e = std::clamp<int64_t>(e, -1, d - 1);
    }
    int64_t len = 0;
    if (st > 0 && e > s) len = 1 + (e - s - 1) / st;
    if (st < 0 && s > e) len = 1 + (s - e - 1) / (-st);
    sp.out[static_cast<size_t>(a)] = len;
    sp.start[static_cast<size_t>(a)] = len > 0 ? s : 0;
    sp.step[static_cast<size_t>(a)] = len > 1 ? st : 1;  // huge steps never multiply a stride
  }
  return sp;
}
Status eval_slice(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* ts, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* te, req_tensor(ctx, in, 2));
  KILN_ASSIGN_OR_RETURN(auto starts, int_input(ctx, *ts, "starts"));
  KILN_ASSIGN_OR_RETURN(auto ends, int_input(ctx, *te, "ends"));
  std::vector<int64_t> axes, steps;
  if (auto* t = opt_tensor(in, 3)) {
    KILN_ASSIGN_OR_RETURN(axes, int_input(ctx, *t, "axes"));
  }
  if (auto* t = opt_tensor(in, 4)) {
    KILN_ASSIGN_OR_RETURN(steps, int_input(ctx, *t, "steps"));
  }
  KILN_ASSIGN_OR_RETURN(SliceSpec sp, slice_spec(ctx.node, x->shape(), starts, ends, axes, steps));
  auto st = strides_of(x->shape());
  int64_t base = 0;
  std::vector<int64_t> ost(st.size());
  for (size_t d = 0; d < st.size(); ++d) {
    base += sp.start[d] * st[d];
    ost[d] = sp.step[d] * st[d];
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_strided(ctx, *x, sp.out, base, ost));
  out[0] = t;
  return Status::ok();
}
Status infer_slice(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  set_out_unranked(ctx, 0, ti.dtype);
  if (!ti.has_shape) return Status::ok();
  std::vector<int64_t> starts, ends, axes, steps;
  if (!const_ints(ctx, 1, starts) || !const_ints(ctx, 2, ends)) {
    set_out_dims(ctx, 0, ti.dtype, std::vector<Dim>(ti.dims.size()));
    return Status::ok();
  }
  bool ha = ctx.input_types.size() > 3 && ctx.input_types[3].kind != TypeInfo::Kind::kUnknown;
  bool hs = ctx.input_types.size() > 4 && ctx.input_types[4].kind != TypeInfo::Kind::kUnknown;
  if ((ha && !const_ints(ctx, 3, axes)) || (hs && !const_ints(ctx, 4, steps))) {
    set_out_dims(ctx, 0, ti.dtype, std::vector<Dim>(ti.dims.size()));
    return Status::ok();
  }
  // Unknown dims: compute with a huge placeholder, then mark touched unknown axes unknown.
  Shape s = ti.concrete_shape();
  Shape probe = s;
  for (auto& d : probe)
    if (d < 0) d = int64_t{1} << 40;
  auto sp = slice_spec(ctx.node, probe, starts, ends, axes, steps);
  if (!sp.is_ok()) return Status::ok();
  std::vector<Dim> d = ti.dims;
  for (size_t i = 0; i < d.size(); ++i) {
    if (sp->out[i] == probe[i] && sp->step[i] == 1 && sp->start[i] == 0) continue;  // untouched
    d[i] = s[i] >= 0 ? Dim::of(sp->out[i]) : Dim{};
  }
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}

// ---------------------------------------------------------------- Expand / Tile
Status eval_expand(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* st, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto s, int_input(ctx, *st, "shape"));
  auto os = broadcast_shapes(x->shape(), s);
  if (!os.is_ok()) return os.status().with_context(ctx.node.where());
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, *os));
  KILN_ASSIGN_OR_RETURN(Tensor t,
                        gather_strided(ctx, *x, *os, 0, broadcast_strides(x->shape(), *os)));
  out[0] = t;
  return Status::ok();
}
Status infer_expand(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  std::vector<int64_t> s;
  if (ti.fully_known() && const_ints(ctx, 1, s)) {
    auto os = broadcast_shapes(ti.concrete_shape(), s);
    if (os.is_ok()) {
      set_out(ctx, 0, ti.dtype, *os);
      return Status::ok();
    }
  }
  // Partly known: the rank is max(rank(x), len(shape)); a dim is x's where x's is known and not
  // 1 (the shape's entry must then be 1 or equal), else the shape's entry when it is known (a
  // constant or a tracked shape value) and not 1.
  std::vector<Dim> sd;
  if (const_ints(ctx, 1, s)) {
    for (int64_t v : s) sd.push_back(Dim::of(v));
  } else if (ctx.input_shape_values.size() > 1 && ctx.input_shape_values[1]) {
    sd = *ctx.input_shape_values[1];
  } else if (ctx.input_types.size() > 1 && ctx.input_types[1].has_shape && ctx.input_types[1].dims.size() == 1 &&
             ctx.input_types[1].dims[0].known() && ctx.input_types[1].dims[0].value <= 16) {
    sd.assign(static_cast<size_t>(ctx.input_types[1].dims[0].value), Dim());
  } else {
    set_out_unranked(ctx, 0, ti.dtype);
    return Status::ok();
  }
  if (!ti.has_shape) {
    set_out_unranked(ctx, 0, ti.dtype);
    return Status::ok();
  }
  const size_t r = std::max(ti.dims.size(), sd.size());
  std::vector<Dim> d(r);
  for (size_t i = 0; i < r; ++i) {
    const Dim* xd = i + ti.dims.size() >= r ? &ti.dims[i + ti.dims.size() - r] : nullptr;
    const Dim* e = i + sd.size() >= r ? &sd[i + sd.size() - r] : nullptr;
    if (xd && xd->known() && xd->value != 1) d[i] = *xd;
    else if (e && e->known() && e->value > 1) d[i] = *e;
    else if (e && e->known() && e->value == 1) d[i] = xd ? *xd : Dim::of(1);
    else if (!xd && e && !e->param.empty()) d[i] = *e;
    else if (xd && xd->known() && xd->value == 1 && e && !e->param.empty()) d[i] = *e;
  }
  set_out_dims(ctx, 0, ti.dtype, d);
  return Status::ok();
}
Status eval_tile(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* rt, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(auto reps, int_input(ctx, *rt, "repeats"));
  if (static_cast<int64_t>(reps.size()) != x->rank())
    return ctx.bad_input("repeats has " + std::to_string(reps.size()) + " entries for rank " +
                         std::to_string(x->rank()));
  Shape os = x->shape();
  for (size_t i = 0; i < os.size(); ++i) {
    if (reps[i] < 0) return ctx.bad_input("negative repeat");
    if (__builtin_mul_overflow(os[i], reps[i], &os[i])) return ctx.bad_input("output too large");
  }
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, os));
  auto st = strides_of(x->shape());
  std::vector<int64_t> offs(static_cast<size_t>(numel_of(os)));
  for_each_index(os, [&](int64_t i, const std::vector<int64_t>& idx) {
    int64_t o = 0;
    for (size_t d = 0; d < idx.size(); ++d) o += (idx[d] % x->shape()[d]) * st[d];
    offs[static_cast<size_t>(i)] = o;
  });
  KILN_ASSIGN_OR_RETURN(Tensor t, gather_flat(ctx, *x, os, offs));
  out[0] = t;
  return Status::ok();
}
Status infer_tile(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& ti = ctx.input_types[0];
  std::vector<int64_t> r;
  if (ti.has_shape && const_ints(ctx, 1, r) && r.size() == ti.dims.size()) {
    std::vector<Dim> d = ti.dims;
    for (size_t i = 0; i < d.size(); ++i)
      d[i] = d[i].known() ? Dim::of(d[i].value * r[i]) : (r[i] == 1 ? d[i] : Dim{});
    set_out_dims(ctx, 0, ti.dtype, d);
  } else {
    set_out_unranked(ctx, 0, ti.dtype);
  }
  return Status::ok();
}

// ---------------------------------------------------------------- Range
Status eval_range(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* ts, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* tl, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* td, req_tensor(ctx, in, 2));
  if (ts->numel() != 1 || tl->numel() != 1 || td->numel() != 1)
    return ctx.bad_input("start, limit and delta must be scalars");
  DataType dt = ts->dtype();
  Status st = Status::ok();
  bool ok = dispatch_numeric(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    C s = static_cast<C>(ts->data<T>()[0]), l = static_cast<C>(tl->data<T>()[0]),
      d = static_cast<C>(td->data<T>()[0]);
    if (d == C(0)) {
      st = ctx.bad_input("delta is 0");
      return;
    }
    double n =
        std::ceil((static_cast<double>(l) - static_cast<double>(s)) / static_cast<double>(d));
    if (!(n > 0)) n = 0;
    if (n > 1e12) {
      st = ctx.bad_input("range too long");
      return;
    }
    auto t = Tensor::create(dt, {static_cast<int64_t>(n)});
    if (!t.is_ok()) {
      st = t.status();
      return;
    }
    C v = s;
    for (int64_t i = 0; i < t->numel(); ++i) {
      t->data<T>()[i] = T(v);
      v = static_cast<C>(v + d);
    }
    out[0] = *t;
  });
  if (!ok) return unsupported_dtype(ctx, dt);
  return st;
}
Status infer_range(InferContext& ctx) {
  if (in_tensor(ctx, 0)) set_out_dims(ctx, 0, ctx.input_types[0].dtype, {Dim{}});
  return Status::ok();
}

// ---------------------------------------------------------------- EyeLike / Trilu
Status eval_eyelike(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->rank() != 2) return ctx.bad_input("input must be 2-D, got " + x->describe());
  DataType dt = static_cast<DataType>(ctx.node.attr_int("dtype", static_cast<int64_t>(x->dtype())));
  if (!dtype_valid(static_cast<int32_t>(dt))) return ctx.bad_input("invalid dtype");
  int64_t k = ctx.node.attr_int("k", 0);
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, x->shape()));
  int64_t R = x->dim(0), C = x->dim(1);
  bool ok = dispatch_numeric(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t i = 0; i < R; ++i) {
      int64_t j = i + k;
      if (j >= 0 && j < C) t.data<T>()[i * C + j] = T(1);
    }
  });
  if (!ok && dt == DataType::kBool) {
    ok = true;
    for (int64_t i = 0; i < R; ++i) {
      int64_t j = i + k;
      if (j >= 0 && j < C) t.data<bool>()[i * C + j] = true;
    }
  }
  if (!ok) return unsupported_dtype(ctx, dt);
  out[0] = t;
  return Status::ok();
}
Status infer_eyelike(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  DataType dt = static_cast<DataType>(
      ctx.node.attr_int("dtype", static_cast<int64_t>(ctx.input_types[0].dtype)));
  TypeInfo t = ctx.input_types[0];
  t.dtype = dt;
  ctx.output_types[0] = t;
  return Status::ok();
}
Status eval_trilu(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->rank() < 2) return ctx.bad_input("input rank must be >= 2, got " + x->describe());
  int64_t k = 0;
  if (auto* kt = opt_tensor(in, 1)) {
    if (kt->numel() != 1 || !is_integer(kt->dtype()))
      return ctx.bad_input("k must be an integer scalar");
    k = kt->get_i64(0);
  }
  bool upper = ctx.node.attr_int("upper", 1) != 0;
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), x->shape()));
  int64_t R = x->dim(x->rank() - 2), C = x->dim(x->rank() - 1);
  int64_t mats = R * C != 0 ? x->numel() / (R * C) : 0;
  bool ok = dispatch_bytes(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* s = x->data<T>();
    T* d = t.data<T>();
    for (int64_t m = 0; m < mats; ++m)
      for (int64_t i = 0; i < R; ++i)
        for (int64_t j = 0; j < C; ++j) {
          bool keep = upper ? (j - i >= k) : (j - i <= k);
          int64_t o = m * R * C + i * C + j;
          if (keep) d[o] = s[o];
        }
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}

}  // namespace

const OpDef kOp_Constant = {"Constant", "", &guarded<&eval_constant>, &infer_constant};
const OpDef kOp_ConstantOfShape = {"ConstantOfShape", "", &guarded<&eval_constant_of_shape>,
                                   &infer_constant_of_shape};
const OpDef kOp_Identity = {"Identity", "", &guarded<&eval_identity>, &infer_identity};
const OpDef kOp_Shape = {"Shape", "", &guarded<&eval_shape>, &infer_shape};
const OpDef kOp_Size = {"Size", "", &guarded<&eval_size>, &infer_size};
const OpDef kOp_Reshape = {"Reshape", "", &guarded<&eval_reshape>, &infer_reshape};
const OpDef kOp_Flatten = {"Flatten", "", &guarded<&eval_flatten>, &infer_flatten};
const OpDef kOp_Squeeze = {"Squeeze", "", &guarded<&eval_squeeze>, &infer_squeeze};
const OpDef kOp_Unsqueeze = {"Unsqueeze", "", &guarded<&eval_unsqueeze>, &infer_unsqueeze};
const OpDef kOp_Transpose = {"Transpose", "", &guarded<&eval_transpose>, &infer_transpose};
const OpDef kOp_Concat = {"Concat", "", &guarded<&eval_concat>, &infer_concat};
const OpDef kOp_Split = {"Split", "", &guarded<&eval_split>, &infer_split};
const OpDef kOp_Slice = {"Slice", "", &guarded<&eval_slice>, &infer_slice};
const OpDef kOp_Expand = {"Expand", "", &guarded<&eval_expand>, &infer_expand};
const OpDef kOp_Tile = {"Tile", "", &guarded<&eval_tile>, &infer_tile};
const OpDef kOp_Range = {"Range", "", &guarded<&eval_range>, &infer_range};
const OpDef kOp_EyeLike = {"EyeLike", "", &guarded<&eval_eyelike>, &infer_eyelike};
const OpDef kOp_Trilu = {"Trilu", "", &guarded<&eval_trilu>, &infer_identity};

}  // namespace kiln
