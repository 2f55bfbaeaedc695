// Resize (nearest / linear / cubic, every coordinate_transformation_mode, antialias, axes,
// keep_aspect_ratio_policy, scales or sizes; follows the ONNX reference implementation's
// tap selection) and GridSample (2-D / 3-D; nearest / linear / cubic; zeros / border /
// reflection). Resize is applied separably, one axis at a time.
#include <algorithm>
#include <cmath>

#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;

struct Taps {
  std::vector<std::vector<std::pair<int64_t, double>>> at;  // per output index
  std::vector<bool> extrapolate;                            // per output index
};

double cubic_w(double x, double A) {
  x = std::fabs(x);
  if (x <= 1) return ((A + 2) * x - (A + 3)) * x * x + 1;
  if (x < 2) return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A;
  return 0;
}

struct ResizeAttrs {
  std::string mode, ctm, nearest;
  double A = -0.75, extrap = 0;
  bool exclude = false, antialias = false;
};

Taps make_taps(const ResizeAttrs& a, int64_t in, int64_t out, double scale, double roi_s,
               double roi_e) {
  Taps t;
  t.at.resize(static_cast<size_t>(out));
  t.extrapolate.assign(static_cast<size_t>(out), false);
  for (int64_t i = 0; i < out; ++i) {
    const double xr = static_cast<double>(i);
    const double ow = scale * static_cast<double>(in);  // the reference's fractional width
    double x;
    const std::string& m = a.ctm;
    if (m == "asymmetric") {
      x = xr / scale;
    } else if (m == "align_corners") {
      x = ow == 1 ? 0 : xr * (in - 1) / (ow - 1);
    } else if (m == "pytorch_half_pixel") {
      x = ow == 1 ? -0.5 : (xr + 0.5) / scale - 0.5;
    } else if (m == "half_pixel_symmetric") {
      const double adj = out / (scale * in);
      const double center = in / 2.0;
      const double offset = center * (1 - adj);
      x = offset + (xr + 0.5) / scale - 0.5;
    } else if (m == "tf_crop_and_resize") {
      x = ow == 1 ? (roi_e - roi_s) * (in - 1) / 2 : xr * (roi_e - roi_s) * (in - 1) / (ow - 1);
      x += roi_s * (in - 1);
      if (x < 0 || x > in - 1) {
        t.extrapolate[i] = true;
        continue;
      }
    } else if (m == "tf_half_pixel_for_nn") {
      x = (xr + 0.5) / scale;
    } else {  // half_pixel
      x = (xr + 0.5) / scale - 0.5;
    }
    if (!std::isfinite(x)) x = 0;  // NaN/inf roi or scale: keep indices defined
    auto& taps = t.at[i];
    auto clampi = [&](int64_t v) { return std::min<int64_t>(std::max<int64_t>(v, 0), in - 1); };
    if (a.mode == "nearest") {
      const double f = std::floor(x);
      const double r = x - f;
      int64_t idx = static_cast<int64_t>(f);
      if (r != 0) {
        bool up = false;
        if (a.nearest == "round_prefer_ceil")
          up = r >= 0.5;
        else if (a.nearest == "floor")
          up = false;
        else if (a.nearest == "ceil")
          up = true;
        else
          up = r > 0.5;  // round_prefer_floor
        idx += up ? 1 : 0;
      }
      taps.push_back({clampi(idx), 1.0});
      continue;
    }
    const bool cubic = a.mode == "cubic";
    const double s = a.antialias ? std::min(scale, 1.0) : 1.0;
    int64_t n;
    if (cubic)
      n = 2 - 2 * static_cast<int64_t>(std::floor(-2 / s) + 1);
    else
      n = 2 - 2 * static_cast<int64_t>(std::floor(-1 / s) + 1);
    // The n nearest integer positions (ties toward the smaller one).
    const int64_t start = static_cast<int64_t>(std::ceil(x)) - n / 2;
    double sum = 0;
    std::vector<std::pair<int64_t, double>> raw;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t p = start + k;
      const double d = s * (static_cast<double>(p) - x);
      const double w = cubic ? cubic_w(d, a.A) : std::max(0.0, 1 - std::fabs(d));
      raw.push_back({p, w});
      sum += w;
    }
    if (a.antialias && sum != 0)
      for (auto& pw : raw) pw.second /= sum;
    if (a.exclude) {
      double s2 = 0;
      for (auto& pw : raw) {
        if (pw.first < 0 || pw.first >= in) pw.second = 0;
        s2 += pw.second;
      }
      if (s2 != 0)
        for (auto& pw : raw) pw.second /= s2;
    }
    for (auto& pw : raw)
      if (pw.second != 0) taps.push_back({clampi(pw.first), pw.second});
  }
  return t;
}

Status eval_resize(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  const Tensor* roi = opt_tensor(in, 1);
  const Tensor* sc = opt_tensor(in, 2);
  const Tensor* sz = opt_tensor(in, 3);
  if (sc && sc->numel() == 0) sc = nullptr;
  if (sz && sz->numel() == 0) sz = nullptr;
  if (roi && roi->numel() == 0) roi = nullptr;
  const Node& nd = ctx.node;
  ResizeAttrs a;
  a.mode = nd.attr_string("mode", "nearest");
  a.ctm = nd.attr_string("coordinate_transformation_mode", "half_pixel");
  a.nearest = nd.attr_string("nearest_mode", "round_prefer_floor");
  a.A = nd.attr_float("cubic_coeff_a", -0.75f);
  a.extrap = nd.attr_float("extrapolation_value", 0.f);
  a.exclude = nd.attr_int("exclude_outside", 0) != 0;
  a.antialias = nd.attr_int("antialias", 0) != 0 && a.mode != "nearest";
  if (a.mode != "nearest" && a.mode != "linear" && a.mode != "cubic")
    return ctx.bad_input("unknown mode '" + a.mode + "'");
  const std::string policy = nd.attr_string("keep_aspect_ratio_policy", "stretch");
  const int64_t r = X->rank();
  std::vector<int64_t> axes = nd.attr_ints("axes");
  if (axes.empty())
    for (int64_t i = 0; i < r; ++i) axes.push_back(i);
  for (auto& ax : axes) {
    KILN_ASSIGN_OR_RETURN(ax, norm_axis(ctx, ax, r));
  }
  if (!sc && !sz) return ctx.bad_input("one of scales and sizes must be given");
  const size_t na = axes.size();
  std::vector<double> scale(static_cast<size_t>(r), 1.0);
  Shape os = X->shape();
  if (sc) {
    if (static_cast<size_t>(sc->numel()) != na)
      return ctx.bad_input("scales has " + std::to_string(sc->numel()) + " values for " +
                           std::to_string(na) + " axes");
    for (size_t i = 0; i < na; ++i) {
      const double s = static_cast<float>(sc->get_f64(i));
      if (!(s > 0) || !std::isfinite(s)) return ctx.bad_input("scales must be positive and finite");
      scale[axes[i]] = s;
      os[axes[i]] = static_cast<int64_t>(std::floor(X->dim(axes[i]) * s));
    }
  } else {
    if (static_cast<size_t>(sz->numel()) != na)
      return ctx.bad_input("sizes has " + std::to_string(sz->numel()) + " values for " +
                           std::to_string(na) + " axes");
    if (policy == "stretch") {
      for (size_t i = 0; i < na; ++i) {
        os[axes[i]] = sz->get_i64(i);
        if (os[axes[i]] < 0) return ctx.bad_input("sizes must be >= 0");
        scale[axes[i]] = X->dim(axes[i]) ? static_cast<double>(os[axes[i]]) / X->dim(axes[i]) : 1;
      }
    } else {
      double s = policy == "not_larger" ? 1e300 : 0;
      for (size_t i = 0; i < na; ++i) {
        const double v =
            static_cast<double>(sz->get_i64(i)) / std::max<int64_t>(1, X->dim(axes[i]));
        s = policy == "not_larger" ? std::min(s, v) : std::max(s, v);
      }
      for (size_t i = 0; i < na; ++i) {
        scale[axes[i]] = s;
        os[axes[i]] = static_cast<int64_t>(std::nearbyint(s * X->dim(axes[i])));
      }
    }
  }
  {
    // Refuse hostile output sizes before building per-index tap tables.
    KILN_ASSIGN_OR_RETURN(int64_t total, checked_numel(os));
    for (int64_t d : os)
      if (d > (int64_t{1} << 31))
        return ctx.bad_input("output shape " + shape_str(os) + " is too large");
    if (static_cast<uint64_t>(total) * 8 > kMaxTensorBytes)
      return ctx.bad_input("output shape " + shape_str(os) + " is too large");
  }
  std::vector<double> rs(static_cast<size_t>(r), 0.0), re(static_cast<size_t>(r), 1.0);
  if (roi && a.ctm == "tf_crop_and_resize") {
    if (static_cast<size_t>(roi->numel()) != 2 * na && roi->numel() != 2 * r)
      return ctx.bad_input("roi must have 2 * len(axes) values");
    const bool full = roi->numel() == 2 * r && static_cast<size_t>(r) != na;
    for (size_t i = 0; i < na; ++i) {
      const int64_t ax = axes[i];
      rs[ax] = roi->get_f64(full ? ax : i);
      re[ax] = roi->get_f64(full ? ax + r : i + na);
    }
  }
  const DataType dt = X->dtype();
  if (!nn::is_float_type(dt) && !(a.mode == "nearest" && dispatch_numeric(dt, [](auto) {})))
    return unsupported(ctx.node.where() + std::string(": element type ") + dtype_name(dt));
  KILN_ASSIGN_OR_RETURN(Tensor cur, cast_tensor(*X, DataType::kDouble));
  std::vector<std::vector<bool>> extra(static_cast<size_t>(r));
  bool any_extra = false;
  for (int64_t d = 0; d < r; ++d) {
    const int64_t inn = cur.dim(d), o = os[d];
    const bool resized = std::find(axes.begin(), axes.end(), d) != axes.end();
    if (!resized || (inn == o && scale[d] == 1.0 && a.ctm != "tf_crop_and_resize")) continue;
    if (inn == 0 && o > 0) return ctx.bad_input("cannot resize an empty axis");
    Taps t = make_taps(a, inn, o, scale[d], rs[d], re[d]);
    extra[d] = t.extrapolate;
    for (bool e : t.extrapolate) any_extra = any_extra || e;
    Shape ns = cur.shape();
    ns[d] = o;
    KILN_ASSIGN_OR_RETURN(Tensor nxt, Tensor::create(DataType::kDouble, ns));
    const int64_t outer = prod(ns, 0, d), inner = prod(ns, d + 1);
    const double* src = cur.data<double>();
    double* dst = nxt.data<double>();
    for (int64_t ob = 0; ob < outer; ++ob)
      for (int64_t j = 0; j < o; ++j) {
        double* dp = dst + (ob * o + j) * inner;
        for (auto& [idx, w] : t.at[j]) {
          const double* sp = src + (ob * inn + idx) * inner;
          for (int64_t k = 0; k < inner; ++k) dp[k] += w * sp[k];
        }
      }
    cur = nxt;
  }
  if (any_extra) {
    const Shape& s = cur.shape();
    for (int64_t i = 0; i < cur.numel(); ++i) {
      int64_t rem = i;
      bool e = false;
      for (int64_t d = r; d-- > 0;) {
        const int64_t c = rem % s[d];
        rem /= s[d];
        if (!extra[d].empty() && extra[d][c]) e = true;
      }
      if (e) cur.data<double>()[i] = a.extrap;
    }
  }
  if (!nn::is_float_type(dt)) {
    // Integer inputs (nearest only): values are copies, exact in double.
    KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(cur, dt));
    return Status::ok();
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(cur, dt));
  return Status::ok();
}

Status infer_resize(InferContext& ctx) {
  if (ctx.input_types.empty() || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(x.dtype);
  const Tensor* sc = ctx.input_constants.size() > 2 ? ctx.input_constants[2] : nullptr;
  const Tensor* sz = ctx.input_constants.size() > 3 ? ctx.input_constants[3] : nullptr;
  if (sc && sc->numel() == 0) sc = nullptr;
  if (sz && sz->numel() == 0) sz = nullptr;
  const std::string policy = ctx.node.attr_string("keep_aspect_ratio_policy", "stretch");
  if (x.has_shape && (sc || (sz && policy == "stretch"))) {
    const int64_t r = static_cast<int64_t>(x.dims.size());
    std::vector<int64_t> axes = ctx.node.attr_ints("axes");
    if (axes.empty())
      for (int64_t i = 0; i < r; ++i) axes.push_back(i);
    const Tensor* t = sc ? sc : sz;
    if (static_cast<size_t>(t->numel()) == axes.size()) {
      o.has_shape = true;
      o.dims = x.dims;
      for (size_t i = 0; i < axes.size(); ++i) {
        int64_t ax = axes[i] < 0 ? axes[i] + r : axes[i];
        if (ax < 0 || ax >= r) return Status::ok();
        if (sz) {
          o.dims[ax] = Dim::of(sz->get_i64(i));
        } else if (x.dims[ax].known()) {
          o.dims[ax] = Dim::of(static_cast<int64_t>(std::floor(
              x.dims[ax].value * static_cast<double>(static_cast<float>(sc->get_f64(i))))));
        } else {
          o.dims[ax] = Dim();
        }
      }
    }
  }
  ctx.output_types[0] = o;
  return Status::ok();
}

// ---- GridSample ----
double gs_reflect(double x, double lo, double hi) {
  const double rng = hi - lo;
  if (rng <= 0) return lo;
  if (x < lo) {
    const double dx = lo - x;
    const int64_t n = static_cast<int64_t>(dx / rng);
    const double r = dx - n * rng;
    return n % 2 == 0 ? lo + r : hi - r;
  }
  if (x > hi) {
    const double dx = x - hi;
    const int64_t n = static_cast<int64_t>(dx / rng);
    const double r = dx - n * rng;
    return n % 2 == 0 ? hi - r : lo + r;
  }
  return x;
}

Status eval_grid_sample(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* G, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  std::string mode = ctx.node.attr_string("mode", "linear");
  if (mode == "bilinear") mode = "linear";
  if (mode == "bicubic") mode = "cubic";
  const std::string pad = ctx.node.attr_string("padding_mode", "zeros");
  const bool ac = ctx.node.attr_int("align_corners", 0) != 0;
  const int64_t nd = X->rank() - 2;
  if (nd < 1 || nd > 3 || G->rank() != nd + 2 || G->dim(0) != X->dim(0) || G->dim(nd + 1) != nd)
    return ctx.bad_input("X " + shape_str(X->shape()) + " and grid " + shape_str(G->shape()) +
                         " do not match");
  if (mode != "linear" && mode != "nearest" && mode != "cubic")
    return ctx.bad_input("unknown mode '" + mode + "'");
  const int64_t N = X->dim(0), C = X->dim(1);
  Shape dims(X->shape().begin() + 2, X->shape().end());
  Shape gsp(G->shape().begin() + 1, G->shape().end() - 1);
  const int64_t iprod = prod(dims), oprod = prod(gsp);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor gf, nn::as_f32(*G));
  Shape ys = {N, C};
  ys.insert(ys.end(), gsp.begin(), gsp.end());
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  std::vector<double> lo(nd), hi(nd);
  for (int64_t i = 0; i < nd; ++i) {
    lo[i] = ac ? 0.0 : -0.5;
    hi[i] = ac ? dims[i] - 1.0 : dims[i] - 0.5;
  }
  const auto st = strides_of(dims);
  auto pixel = [&](const float* xc, const std::vector<int64_t>& idx) -> double {
    int64_t off = 0;
    for (int64_t d = 0; d < nd; ++d) {
      int64_t i = idx[d];
      if (i < 0 || i >= dims[d]) {
        if (pad == "zeros") return 0.0;
        if (pad == "border")
          i = std::min<int64_t>(std::max<int64_t>(i, 0), dims[d] - 1);
        else
          i = static_cast<int64_t>(gs_reflect(static_cast<double>(i), lo[d], hi[d]));
        i = std::min<int64_t>(std::max<int64_t>(i, 0), dims[d] - 1);
      }
      off += i * st[d];
    }
    return xc[off];
  };
  std::vector<double> x(nd);
  std::vector<int64_t> base(nd), idx(nd);
  const int ntap = mode == "cubic" ? 4 : mode == "linear" ? 2 : 1;
  std::vector<std::vector<double>> w(nd, std::vector<double>(4));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < oprod; ++o) {
      const float* g = gf.data<float>() + (n * oprod + o) * nd;
      for (int64_t d = 0; d < nd; ++d) {
        const double v = g[nd - 1 - d];  // grid holds (x, y[, z]): reversed dim order
        double c = ac ? (v + 1) / 2.0 * (dims[d] - 1) : ((v + 1) * dims[d] - 1) / 2.0;
        c = static_cast<float>(c);
        c = std::isnan(c) ? -1e9 : std::min(std::max(c, -1e9), 1e9);  // keep int casts defined
        if (mode == "nearest") c = std::nearbyint(c);
        if (c < lo[d] || c > hi[d]) {
          if (pad == "border")
            c = std::min<double>(std::max<double>(c, 0), dims[d] - 1);
          else if (pad == "reflection")
            c = gs_reflect(c, lo[d], hi[d]);
        }
        x[d] = c;
        if (mode == "nearest") {
          base[d] = static_cast<int64_t>(c);
          w[d][0] = 1;
        } else {
          const double f = std::floor(c);
          const double t = c - f;
          if (mode == "linear") {
            base[d] = static_cast<int64_t>(f);
            w[d][0] = 1 - t;
            w[d][1] = t;
          } else {
            base[d] = static_cast<int64_t>(f) - 1;
            const double A = -0.75;
            w[d][0] = ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A;
            w[d][1] = ((A + 2) * t - (A + 3)) * t * t + 1;
            w[d][2] = ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1;
            w[d][3] = ((A * (2 - t) - 5 * A) * (2 - t) + 8 * A) * (2 - t) - 4 * A;
          }
        }
      }
      int64_t combos = 1;
      for (int64_t d = 0; d < nd; ++d) combos *= ntap;
      for (int64_t c = 0; c < C; ++c) {
        const float* xc = xf.data<float>() + (n * C + c) * iprod;
        double acc = 0;
        for (int64_t k = 0; k < combos; ++k) {
          int64_t rem = k;
          double wt = 1;
          for (int64_t d = nd; d-- > 0;) {
            const int64_t t = rem % ntap;
            rem /= ntap;
            idx[d] = base[d] + t;
            wt *= w[d][t];
          }
          if (wt != 0) acc += wt * pixel(xc, idx);
        }
        Y.data<float>()[(n * C + c) * oprod + o] = static_cast<float>(acc);
      }
    }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status infer_grid_sample(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  const TypeInfo& g = ctx.input_types[1];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(x.dtype);
  if (x.has_shape && g.has_shape && x.dims.size() >= 3 && g.dims.size() == x.dims.size()) {
    o.has_shape = true;
    o.dims = {x.dims[0], x.dims[1]};
    o.dims.insert(o.dims.end(), g.dims.begin() + 1, g.dims.end() - 1);
  }
  ctx.output_types[0] = o;
  return Status::ok();
}

}  // namespace

const OpDef kOp_Resize = {"Resize", "", &eval_resize, &infer_resize};
const OpDef kOp_GridSample = {"GridSample", "", &eval_grid_sample, &infer_grid_sample};

}  // namespace kiln
