// Einsum, Det, and the signal helpers HannWindow, HammingWindow, BlackmanWindow,
// MelWeightMatrix.
#include <cmath>
#include <map>
#include <numbers>

#include "ops/tensor/tensor_common.h"

namespace kiln {
using namespace tensor_ops;

namespace {

// ---------------------------------------------------------------- Einsum
// Labels: letters are 0..51 (A-Z, a-z); ellipsis dims get 64 + k (k counted from the left of the
// widest ellipsis). Evaluation loops over every combination of label values: plain and general
// (diagonals, broadcasting, implicit output), meant as the reference.
struct EinsumTerm {
  std::vector<int> labels;  // one per dim after ellipsis expansion
};

int letter_id(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';  // ASCII order, as the implicit output sorts
  if (c >= 'a' && c <= 'z') return 26 + (c - 'a');
  return -1;
}

// Parses one term; `ell` = -1 if no ellipsis, else the position (in letters) where it sits.
Status parse_term(const OpContext& ctx, const std::string& s, std::vector<int>& letters, int& ell) {
  letters.clear();
  ell = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '.') {
      if (ell >= 0 || s.compare(i, 3, "...") != 0) return ctx.bad_input("bad ellipsis in equation");
      ell = static_cast<int>(letters.size());
      i += 2;
      continue;
    }
    int id = letter_id(s[i]);
    if (id < 0) return ctx.bad_input(std::string("bad character '") + s[i] + "' in equation");
    letters.push_back(id);
  }
  return Status::ok();
}

Status eval_einsum(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  std::string eq;
  for (char c : ctx.node.attr_string("equation"))
    if (c != ' ') eq += c;
  std::vector<const Tensor*> xs;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, i));
    xs.push_back(x);
  }
  if (xs.empty()) return ctx.bad_input("Einsum needs inputs");
  size_t arrow = eq.find("->");
  std::string lhs = eq.substr(0, arrow);
  std::vector<std::string> terms;
  size_t p = 0;
  while (true) {
    size_t c = lhs.find(',', p);
    terms.push_back(lhs.substr(p, c == std::string::npos ? std::string::npos : c - p));
    if (c == std::string::npos) break;
    p = c + 1;
  }
  if (terms.size() != xs.size())
    return ctx.bad_input("equation has " + std::to_string(terms.size()) + " terms for " +
                         std::to_string(xs.size()) + " inputs");
  // Expand ellipses.
  int ell_rank = 0;
  std::vector<EinsumTerm> ts(xs.size());
  std::vector<std::vector<int>> lets(xs.size());
  std::vector<int> ells(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    KILN_RETURN_IF_ERROR(parse_term(ctx, terms[i], lets[i], ells[i]));
    int r = xs[i]->rank(), nl = static_cast<int>(lets[i].size());
    if (ells[i] < 0 ? r != nl : r < nl)
      return ctx.bad_input("term '" + terms[i] + "' does not match input rank " +
                           std::to_string(r));
    if (ells[i] >= 0) ell_rank = std::max(ell_rank, r - nl);
  }
  std::map<int, int64_t> size;  // label -> extent
  for (size_t i = 0; i < xs.size(); ++i) {
    int r = xs[i]->rank(), nl = static_cast<int>(lets[i].size()), ne = r - nl;
    for (int d = 0, li = 0; d < r;) {
      if (ells[i] >= 0 && li == ells[i] && ne > 0) {
        for (int k = 0; k < ne; ++k, ++d) ts[i].labels.push_back(64 + ell_rank - ne + k);
        ne = 0;
        continue;
      }
      ts[i].labels.push_back(lets[i][static_cast<size_t>(li++)]);
      ++d;
    }
    for (int d = 0; d < r; ++d) {
      int l = ts[i].labels[static_cast<size_t>(d)];
      int64_t e = xs[i]->dim(d);
      auto it = size.find(l);
      if (it == size.end() || it->second == 1)
        size[l] = e;
      else if (e != 1 && e != it->second)
        return ctx.bad_input("label extents disagree (" + std::to_string(e) + " vs " +
                             std::to_string(it->second) + ")");
    }
  }
  // Output labels.
  std::vector<int> out_labels;
  if (arrow != std::string::npos) {
    std::vector<int> ol;
    int oe;
    KILN_RETURN_IF_ERROR(parse_term(ctx, eq.substr(arrow + 2), ol, oe));
    for (int i = 0; i <= static_cast<int>(ol.size()); ++i) {
      if (i == oe)
        for (int k = 0; k < ell_rank; ++k) out_labels.push_back(64 + k);
      if (i < static_cast<int>(ol.size())) {
        if (!size.count(ol[static_cast<size_t>(i)]))
          return ctx.bad_input("output label not in inputs");
        out_labels.push_back(ol[static_cast<size_t>(i)]);
      }
    }
  } else {
    for (int k = 0; k < ell_rank; ++k) out_labels.push_back(64 + k);
    std::map<int, int> cnt;
    for (auto& t : ts)
      for (int l : t.labels)
        if (l < 64) cnt[l]++;
    for (auto [l, c] : cnt)
      if (c == 1) out_labels.push_back(l);  // map is in letter order
  }
  std::vector<int> all = out_labels;
  for (auto [l, e] : size)
    if (std::find(all.begin(), all.end(), l) == all.end()) all.push_back(l);
  std::map<int, size_t> pos;
  for (size_t i = 0; i < all.size(); ++i) pos[all[i]] = i;
  Shape loop_shape, os;
  for (int l : all) loop_shape.push_back(size[l]);
  for (int l : out_labels) os.push_back(size[l]);
  // Per input, stride of each loop label (summed for repeated labels: diagonal).
  std::vector<std::vector<int64_t>> lst(xs.size(), std::vector<int64_t>(all.size(), 0));
  for (size_t i = 0; i < xs.size(); ++i) {
    auto st = strides_of(xs[i]->shape());
    for (size_t d = 0; d < st.size(); ++d)
      if (xs[i]->dim(static_cast<int>(d)) != 1) lst[i][pos[ts[i].labels[d]]] += st[d];
  }
  for (auto* x : xs)
    if (x->dtype() != xs[0]->dtype()) return ctx.bad_input("inputs differ in type");
  KILN_RETURN_IF_ERROR(check_out_shape(ctx, loop_shape));
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(xs[0]->dtype(), os));
  int64_t out_n = t.numel();
  int64_t inner = out_n ? numel_of(loop_shape) / out_n : 0;
  bool ok = dispatch_numeric(t.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = compute_t<T>;
    using A = std::conditional_t<std::is_floating_point_v<C>, double, C>;
    std::vector<A> acc(static_cast<size_t>(out_n), A(0));
    std::vector<int64_t> off(xs.size(), 0);
    for_each_index(loop_shape, [&](int64_t i, const std::vector<int64_t>& idx) {
      A prod = A(1);
      for (size_t k = 0; k < xs.size(); ++k) {
        int64_t o = 0;
        for (size_t d = 0; d < idx.size(); ++d) o += idx[d] * lst[k][d];
        prod = static_cast<A>(prod * static_cast<A>(static_cast<C>(xs[k]->data<T>()[o])));
      }
      acc[static_cast<size_t>(i / inner)] += prod;
    });
    for (int64_t i = 0; i < out_n; ++i)
      t.data<T>()[i] = T(static_cast<C>(acc[static_cast<size_t>(i)]));
  });
  if (!ok) return unsupported_dtype(ctx, t.dtype());
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- Det
Status eval_det(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  int r = x->rank();
  if (r < 2 || x->dim(r - 1) != x->dim(r - 2))
    return ctx.bad_input("input must be [*, M, M], got " + x->describe());
  int64_t m = x->dim(r - 1);
  Shape os(x->shape().begin(), x->shape().end() - 2);
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(x->dtype(), os));
  bool ok = dispatch_float(x->dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    std::vector<double> a(static_cast<size_t>(m * m));
    for (int64_t b = 0; b < t.numel(); ++b) {
      const T* s = x->data<T>() + b * m * m;
      for (int64_t i = 0; i < m * m; ++i) a[static_cast<size_t>(i)] = static_cast<double>(s[i]);
      double det = 1;
      for (int64_t c = 0; c < m; ++c) {
        int64_t piv = c;
        for (int64_t rr = c + 1; rr < m; ++rr)
          if (std::abs(a[rr * m + c]) > std::abs(a[piv * m + c])) piv = rr;
        if (a[piv * m + c] == 0) {
          det = 0;
          break;
        }
        if (piv != c) {
          for (int64_t k = 0; k < m; ++k) std::swap(a[c * m + k], a[piv * m + k]);
          det = -det;
        }
        det *= a[c * m + c];
        for (int64_t rr = c + 1; rr < m; ++rr) {
          double f = a[rr * m + c] / a[c * m + c];
          for (int64_t k = c; k < m; ++k) a[rr * m + k] -= f * a[c * m + k];
        }
      }
      t.data<T>()[b] = T(static_cast<compute_t<T>>(det));
    }
  });
  if (!ok) return unsupported_dtype(ctx, x->dtype());
  out[0] = t;
  return Status::ok();
}

// ---------------------------------------------------------------- windows
Result<Tensor> fill_float(const OpContext& ctx, DataType dt, const Shape& s,
                          const std::vector<double>& v) {
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(dt, s));
  bool ok = dispatch_numeric(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (size_t i = 0; i < v.size(); ++i) t.data<T>()[i] = T(static_cast<compute_t<T>>(v[i]));
  });
  if (!ok) return unsupported_dtype(ctx, dt);
  return t;
}

enum class Win { kHann, kHamming, kBlackman };
template <Win W>
Status eval_window(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* st, req_tensor(ctx, in, 0));
  if (st->numel() != 1 || !is_integer(st->dtype()))
    return ctx.bad_input("size must be an integer scalar");
  int64_t n = st->get_i64(0);
  if (n < 0 || n > (int64_t{1} << 32)) return ctx.bad_input("bad window size");
  bool periodic = ctx.node.attr_int("periodic", 1) != 0;
  DataType dt = static_cast<DataType>(ctx.node.attr_int("output_datatype", 1));
  double den = static_cast<double>(periodic ? n : n - 1);
  const double pi = std::numbers::pi;
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double x = static_cast<double>(i);
    double w;
    if constexpr (W == Win::kHann) {
      double s = std::sin(x * pi / den);
      w = s * s;
    } else if constexpr (W == Win::kHamming) {
      double alpha = 25.0 / 46.0;
      w = alpha - std::cos(x * pi * 2 / den) * (1 - alpha);
    } else {
      w = 0.42 - 0.5 * std::cos(x * pi * 2 / den) + 0.08 * std::cos(x * pi * 4 / den);
    }
    v[static_cast<size_t>(i)] = w;
  }
  KILN_ASSIGN_OR_RETURN(Tensor t, fill_float(ctx, dt, {n}, v));
  out[0] = t;
  return Status::ok();
}

// MelWeightMatrix, following the ONNX reference implementation (integer bin edges).
Status eval_mel(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  double a[5];
  for (size_t i = 0; i < 5; ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, i));
    if (x->numel() != 1) return ctx.bad_input("inputs must be scalars");
    a[i] = x->get_f64(0);
  }
  int64_t mels = static_cast<int64_t>(a[0]), dft = static_cast<int64_t>(a[1]);
  int64_t sr = static_cast<int64_t>(a[2]);
  if (mels <= 0 || dft <= 0 || sr <= 0 || mels > (1 << 20) || dft > (1 << 30))
    return ctx.bad_input("bad MelWeightMatrix parameters");
  double lo = a[3], hi = a[4];
  int64_t nspec = dft / 2 + 1;
  double lmel = 2595 * std::log1p(lo / 700) / std::log(10.0);
  double hmel = 2595 * std::log1p(hi / 700) / std::log(10.0);
  double step = (hmel - lmel) / static_cast<double>(mels + 2);
  std::vector<int64_t> bins(static_cast<size_t>(mels + 2));
  for (int64_t i = 0; i < mels + 2; ++i) {
    double f = static_cast<double>(i) * step + lmel;
    f = 700 * std::expm1(f / 2595 * std::log(10.0));
    bins[static_cast<size_t>(i)] = static_cast<int64_t>(
        std::floor((static_cast<double>(dft + 1) * f) / static_cast<double>(sr)));
  }
  std::vector<double> v(static_cast<size_t>(nspec * mels), 0.0);
  auto at = [&](int64_t j, int64_t i) -> double* {
    if (j < 0 || j >= nspec) return nullptr;
    return &v[static_cast<size_t>(j * mels + i)];
  };
  for (int64_t i = 0; i < mels; ++i) {
    int64_t l = bins[i], c = bins[i + 1], h = bins[i + 2];
    if (c - l == 0) {
      if (double* p = at(c, i)) *p = 1;
    } else {
      for (int64_t j = l; j <= c; ++j)
        if (double* p = at(j, i)) *p = static_cast<double>(j - l) / static_cast<double>(c - l);
    }
    if (h - c > 0)
      for (int64_t j = c; j < h; ++j)
        if (double* p = at(j, i)) *p = static_cast<double>(h - j) / static_cast<double>(h - c);
  }
  DataType dt = static_cast<DataType>(ctx.node.attr_int("output_datatype", 1));
  KILN_ASSIGN_OR_RETURN(Tensor t, fill_float(ctx, dt, {nspec, mels}, v));
  out[0] = t;
  return Status::ok();
}

Status infer_einsum(InferContext& ctx) {  // element type only; the shape needs the equation
  if (in_tensor(ctx, 0)) set_out_unranked(ctx, 0, ctx.input_types[0].dtype);
  return Status::ok();
}
Status infer_det(InferContext& ctx) {
  if (!in_tensor(ctx, 0)) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  if (x.has_shape && x.dims.size() >= 2)
    set_out_dims(ctx, 0, x.dtype, std::vector<Dim>(x.dims.begin(), x.dims.end() - 2));
  else
    set_out_unranked(ctx, 0, x.dtype);
  return Status::ok();
}
Status infer_window(InferContext& ctx) {
  DataType dt = static_cast<DataType>(ctx.node.attr_int("output_datatype", 1));
  if (!dtype_valid(static_cast<int32_t>(dt))) return Status::ok();
  std::vector<int64_t> n;
  if (const_ints(ctx, 0, n) && n.size() == 1)
    set_out(ctx, 0, dt, {n[0]});
  else
    set_out_dims(ctx, 0, dt, {Dim{}});
  return Status::ok();
}
Status infer_mel(InferContext& ctx) {
  DataType dt = static_cast<DataType>(ctx.node.attr_int("output_datatype", 1));
  if (!dtype_valid(static_cast<int32_t>(dt))) return Status::ok();
  std::vector<int64_t> mels, dft;
  Dim a, b;
  if (const_ints(ctx, 1, dft) && dft.size() == 1) a = Dim::of(dft[0] / 2 + 1);
  if (const_ints(ctx, 0, mels) && mels.size() == 1) b = Dim::of(mels[0]);
  set_out_dims(ctx, 0, dt, {a, b});
  return Status::ok();
}

}  // namespace

const OpDef kOp_Einsum = {"Einsum", "", &guarded<&eval_einsum>, &infer_einsum};
const OpDef kOp_Det = {"Det", "", &guarded<&eval_det>, &infer_det};
const OpDef kOp_HannWindow = {"HannWindow", "", &guarded<&eval_window<Win::kHann>>, &infer_window};
const OpDef kOp_HammingWindow = {"HammingWindow", "", &guarded<&eval_window<Win::kHamming>>,
                                 &infer_window};
const OpDef kOp_BlackmanWindow = {"BlackmanWindow", "", &guarded<&eval_window<Win::kBlackman>>,
                                  &infer_window};
const OpDef kOp_MelWeightMatrix = {"MelWeightMatrix", "", &guarded<&eval_mel>, &infer_mel};

}  // namespace kiln
