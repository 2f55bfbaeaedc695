// Detection / geometry ops: RoiAlign, NonMaxSuppression, AffineGrid.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

Status eval_roi_align(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* R, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(const Tensor* BI, req_tensor(ctx, in, 2));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() != 4) return ctx.bad_input("X must be 4-D");
  if (R->rank() != 2 || R->dim(1) != 4) return ctx.bad_input("rois must be [num_rois, 4]");
  const int64_t nr = R->dim(0);
  if (BI->numel() != nr) return ctx.bad_input("batch_indices must have num_rois elements");
  const Node& nd = ctx.node;
  const bool half = nd.attr_string("coordinate_transformation_mode", "half_pixel") == "half_pixel";
  const bool is_max = nd.attr_string("mode", "avg") == "max";
  const int64_t OH = nd.attr_int("output_height", 1), OW = nd.attr_int("output_width", 1);
  const int64_t sr = nd.attr_int("sampling_ratio", 0);
  const double ss = nd.attr_float("spatial_scale", 1.f);
  if (OH < 1 || OW < 1) return ctx.bad_input("output_height/output_width must be >= 1");
  const int64_t N = X->dim(0), C = X->dim(1), H = X->dim(2), W = X->dim(3);
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor rf, nn::as_f32(*R));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, {nr, C, OH, OW}));
  const double off = half ? 0.5 : 0.0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t b = BI->get_i64(r);
    if (b < 0 || b >= N) return ctx.bad_input("batch index " + std::to_string(b) + " out of range");
    const float* roi = rf.data<float>() + r * 4;
    const double sw = roi[0] * ss - off, sh = roi[1] * ss - off;
    const double ew = roi[2] * ss - off, eh = roi[3] * ss - off;
    double rw = ew - sw, rh = eh - sh;
    if (!half) {
      rw = std::max(rw, 1.0);
      rh = std::max(rh, 1.0);
    }
    if (!std::isfinite(rw) || !std::isfinite(rh))
      return ctx.bad_input("roi " + std::to_string(r) + " has non-finite coordinates");
    const double bh = rh / OH, bw = rw / OW;
    const int64_t gh = sr > 0 ? sr : static_cast<int64_t>(std::ceil(rh / OH));
    const int64_t gw = sr > 0 ? sr : static_cast<int64_t>(std::ceil(rw / OW));
    if (gh > 4096 || gw > 4096)
      return ctx.bad_input("roi " + std::to_string(r) + " needs an unreasonable sampling grid");
    const double count = static_cast<double>(std::max<int64_t>(gh * gw, 1));
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = xf.data<float>() + (b * C + c) * H * W;
      for (int64_t ph = 0; ph < OH; ++ph)
        for (int64_t pw = 0; pw < OW; ++pw) {
          double acc = 0;
          bool first = true;
          for (int64_t iy = 0; iy < gh; ++iy) {
            double y = sh + ph * bh + (iy + 0.5) * bh / gh;
            for (int64_t ix = 0; ix < gw; ++ix) {
              double x = sw + pw * bw + (ix + 0.5) * bw / gw;
              double v = 0, vmax = 0;
              if (!(y < -1.0 || y > H || x < -1.0 || x > W)) {
                double yy = std::max(y, 0.0), xx = std::max(x, 0.0);
                int64_t yl = static_cast<int64_t>(yy), xl = static_cast<int64_t>(xx), yh, xh;
                if (yl >= H - 1) {
                  yh = yl = H - 1;
                  yy = static_cast<double>(yl);
                } else {
                  yh = yl + 1;
                }
                if (xl >= W - 1) {
                  xh = xl = W - 1;
                  xx = static_cast<double>(xl);
                } else {
                  xh = xl + 1;
                }
                const double ly = yy - yl, lx = xx - xl, hy = 1 - ly, hx = 1 - lx;
                const double w1 = hy * hx * xc[yl * W + xl], w2 = hy * lx * xc[yl * W + xh];
                const double w3 = ly * hx * xc[yh * W + xl], w4 = ly * lx * xc[yh * W + xh];
                v = w1 + w2 + w3 + w4;
                vmax = std::max(std::max(w1, w2), std::max(w3, w4));
              }
              if (is_max) {
                acc = first ? vmax : std::max(acc, vmax);
                first = false;
              } else {
                acc += v;
              }
            }
          }
          Y.data<float>()[((r * C + c) * OH + ph) * OW + pw] =
              static_cast<float>(is_max ? acc : acc / count);
        }
    }
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status eval_nms(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* boxes, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* scores, req_tensor(ctx, in, 1));
  const Tensor* mo = opt_tensor(in, 2);
  const Tensor* it = opt_tensor(in, 3);
  const Tensor* st = opt_tensor(in, 4);
  if (boxes->rank() != 3 || boxes->dim(2) != 4)
    return ctx.bad_input("boxes " + shape_str(boxes->shape()) + " must be [batch, boxes, 4]");
  if (scores->rank() != 3 || scores->dim(0) != boxes->dim(0) || scores->dim(2) != boxes->dim(1))
    return ctx.bad_input("scores " + shape_str(scores->shape()) + " do not match boxes " +
                         shape_str(boxes->shape()));
  const int64_t max_out = mo && mo->numel() > 0 ? mo->get_i64(0) : 0;
  const float iou_t = it && it->numel() > 0 ? static_cast<float>(it->get_f64(0)) : 0.f;
  const bool has_st = st && st->numel() > 0;
  const float score_t = has_st ? static_cast<float>(st->get_f64(0)) : 0.f;
  const bool center = ctx.node.attr_int("center_point_box", 0) != 0;
  const int64_t B = boxes->dim(0), NB = boxes->dim(1), NC = scores->dim(1);
  KILN_ASSIGN_OR_RETURN(Tensor bf, nn::as_f32(*boxes));
  KILN_ASSIGN_OR_RETURN(Tensor sf, nn::as_f32(*scores));
  std::vector<int64_t> sel;
  auto corners = [&](int64_t b, int64_t i, float* c) {
    const float* p = bf.data<float>() + (b * NB + i) * 4;
    if (center) {
      c[0] = p[1] - p[3] / 2;  // y1
      c[1] = p[0] - p[2] / 2;  // x1
      c[2] = p[1] + p[3] / 2;
      c[3] = p[0] + p[2] / 2;
    } else {
      c[0] = std::min(p[0], p[2]);
      c[1] = std::min(p[1], p[3]);
      c[2] = std::max(p[0], p[2]);
      c[3] = std::max(p[1], p[3]);
    }
  };
  for (int64_t b = 0; b < B && max_out > 0; ++b)
    for (int64_t c = 0; c < NC; ++c) {
      const float* s = sf.data<float>() + (b * NC + c) * NB;
      std::vector<int64_t> cand;
      for (int64_t i = 0; i < NB; ++i)
        if (!std::isnan(s[i]) && (!has_st || s[i] > score_t)) cand.push_back(i);
      std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) { return s[x] > s[y]; });
      std::vector<int64_t> kept;
      for (int64_t i : cand) {
        if (static_cast<int64_t>(kept.size()) >= max_out) break;
        float a[4];
        corners(b, i, a);
        const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
        bool keep = true;
        for (int64_t j : kept) {
          float k[4];
          corners(b, j, k);
          const float area_k = (k[2] - k[0]) * (k[3] - k[1]);
          const float ih = std::max(0.f, std::min(a[2], k[2]) - std::max(a[0], k[0]));
          const float iw = std::max(0.f, std::min(a[3], k[3]) - std::max(a[1], k[1]));
          const float inter = ih * iw;
          const float uni = area_a + area_k - inter;
          if (area_a <= 0 || area_k <= 0 || uni <= 0) continue;
          if (inter / uni > iou_t) {
            keep = false;
            break;
          }
        }
        if (keep) kept.push_back(i);
      }
      for (int64_t i : kept) {
        sel.push_back(b);
        sel.push_back(c);
        sel.push_back(i);
      }
    }
  KILN_ASSIGN_OR_RETURN(
      Tensor Y, Tensor::create(DataType::kInt64, {static_cast<int64_t>(sel.size() / 3), 3}));
  std::copy(sel.begin(), sel.end(), Y.data<int64_t>());
  out[0] = Y;
  return Status::ok();
}

Status eval_affine_grid(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* T, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* S, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *T, "theta"));
  const bool ac = ctx.node.attr_int("align_corners", 0) != 0;
  Shape size = S->to_i64_vector();
  const int64_t nd = static_cast<int64_t>(size.size()) - 2;
  if (nd != 2 && nd != 3) return ctx.bad_input("size must have 4 or 5 elements");
  const int64_t N = size[0];
  if (T->shape() != Shape{N, nd, nd + 1})
    return ctx.bad_input("theta " + shape_str(T->shape()) + " must be [N, " + std::to_string(nd) +
                         ", " + std::to_string(nd + 1) + "]");
  Shape sp(size.begin() + 2, size.end());
  Shape ys = {N};
  ys.insert(ys.end(), sp.begin(), sp.end());
  ys.push_back(nd);
  KILN_ASSIGN_OR_RETURN(Tensor tf, nn::as_f32(*T));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, ys));
  auto coord = [&](int64_t i, int64_t L) -> double {
    if (ac) return L == 1 ? -1.0 : -1.0 + 2.0 * i / (L - 1);
    return (2.0 * i + 1) / L - 1;
  };
  const int64_t np = nn::prod(sp);
  float* y = Y.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* th = tf.data<float>() + n * nd * (nd + 1);
    for (int64_t p = 0; p < np; ++p) {
      // Spatial index -> (x, y[, z]) with x along the last dim.
      double v[4];
      int64_t rem = p;
      for (int64_t d = nd; d-- > 0;) {
        const int64_t i = rem % sp[d];
        rem /= sp[d];
        v[nd - 1 - d] = coord(i, sp[d]);
      }
      v[nd] = 1.0;
      for (int64_t r = 0; r < nd; ++r) {
        double s = 0;
        for (int64_t k = 0; k <= nd; ++k) s += th[r * (nd + 1) + k] * v[k];
        y[(n * np + p) * nd + r] = static_cast<float>(s);
      }
    }
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, T->dtype()));
  return Status::ok();
}

// MaxRoiPool (Fast R-CNN / Caffe semantics): rois are [batch_id, x1, y1, x2, y2].
Status eval_max_roi_pool(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* R, req_tensor(ctx, in, 1));
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *X, "X"));
  if (X->rank() != 4) return ctx.bad_input("X must be 4-D");
  if (R->rank() != 2 || R->dim(1) != 5) return ctx.bad_input("rois must be [num_rois, 5]");
  auto ps = ctx.node.attr_ints("pooled_shape");
  if (ps.size() != 2 || ps[0] < 1 || ps[1] < 1)
    return ctx.bad_input("pooled_shape must be 2 positive ints");
  const double ss = ctx.node.attr_float("spatial_scale", 1.f);
  const int64_t N = X->dim(0), C = X->dim(1), H = X->dim(2), W = X->dim(3), nr = R->dim(0);
  const int64_t PH = ps[0], PW = ps[1];
  KILN_ASSIGN_OR_RETURN(Tensor xf, nn::as_f32(*X));
  KILN_ASSIGN_OR_RETURN(Tensor rf, nn::as_f32(*R));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, {nr, C, PH, PW}));
  for (int64_t r = 0; r < nr; ++r) {
    const float* roi = rf.data<float>() + r * 5;
    for (int k = 0; k < 5; ++k)
      if (!std::isfinite(roi[k]) || std::fabs(roi[k] * ss) > 1e15)
        return ctx.bad_input("roi " + std::to_string(r) + " has invalid coordinates");
    const int64_t b = static_cast<int64_t>(roi[0]);
    if (b < 0 || b >= N) return ctx.bad_input("roi batch index out of range");
    const float fs = static_cast<float>(ss);  // products in float, as ONNX Runtime rounds them
    const int64_t sw = std::llround(roi[1] * fs), sh = std::llround(roi[2] * fs);
    const int64_t ew = std::llround(roi[3] * fs), eh = std::llround(roi[4] * fs);
    const double bh = static_cast<double>(std::max<int64_t>(eh - sh + 1, 1)) / PH;
    const double bw = static_cast<double>(std::max<int64_t>(ew - sw + 1, 1)) / PW;
    for (int64_t c = 0; c < C; ++c) {
      const float* xc = xf.data<float>() + (b * C + c) * H * W;
      for (int64_t ph = 0; ph < PH; ++ph)
        for (int64_t pw = 0; pw < PW; ++pw) {
          const int64_t hs =
              std::min(std::max<int64_t>(static_cast<int64_t>(std::floor(ph * bh)) + sh, 0), H);
          const int64_t he = std::min(
              std::max<int64_t>(static_cast<int64_t>(std::ceil((ph + 1) * bh)) + sh, 0), H);
          const int64_t ws =
              std::min(std::max<int64_t>(static_cast<int64_t>(std::floor(pw * bw)) + sw, 0), W);
          const int64_t we = std::min(
              std::max<int64_t>(static_cast<int64_t>(std::ceil((pw + 1) * bw)) + sw, 0), W);
          float m = 0.f;
          if (he > hs && we > ws) {
            m = -std::numeric_limits<float>::infinity();
            for (int64_t h = hs; h < he; ++h)
              for (int64_t w = ws; w < we; ++w) m = std::max(m, xc[h * W + w]);
          }
          Y.data<float>()[((r * C + c) * PH + ph) * PW + pw] = m;
        }
    }
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, X->dtype()));
  return Status::ok();
}

Status infer_roi_align(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& x = ctx.input_types[0];
  const TypeInfo& r = ctx.input_types[1];
  if (x.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(x.dtype);
  if (x.has_shape && r.has_shape && x.dims.size() == 4 && r.dims.size() == 2) {
    o.has_shape = true;
    if (ctx.node.op_type == "MaxRoiPool") {
      auto ps = ctx.node.attr_ints("pooled_shape");
      if (ps.size() != 2) return Status::ok();
      o.dims = {r.dims[0], x.dims[1], Dim::of(ps[0]), Dim::of(ps[1])};
    } else {
      o.dims = {r.dims[0], x.dims[1], Dim::of(ctx.node.attr_int("output_height", 1)),
                Dim::of(ctx.node.attr_int("output_width", 1))};
    }
  }
  ctx.output_types[0] = o;
  return Status::ok();
}

Status infer_nms(InferContext& ctx) {
  if (ctx.output_types.empty()) return Status::ok();
  TypeInfo o = TypeInfo::tensor(DataType::kInt64);
  o.has_shape = true;
  o.dims = {Dim(), Dim::of(3)};
  ctx.output_types[0] = o;
  return Status::ok();
}

}  // namespace

const OpDef kOp_RoiAlign = {"RoiAlign", "", &eval_roi_align, &infer_roi_align};
const OpDef kOp_NonMaxSuppression = {"NonMaxSuppression", "", &eval_nms, &infer_nms};
const OpDef kOp_MaxRoiPool = {"MaxRoiPool", "", &eval_max_roi_pool, &infer_roi_align};
const OpDef kOp_AffineGrid = {"AffineGrid", "", &eval_affine_grid, nullptr};

}  // namespace kiln
