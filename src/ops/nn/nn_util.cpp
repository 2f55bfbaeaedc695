#include "ops/nn/nn_util.h"

#include <algorithm>

namespace kiln {
namespace nn {

Result<Tensor> as_f32(const Tensor& t) {
  if (t.dtype() == DataType::kFloat) return t;
  return cast_tensor(t, DataType::kFloat);
}

Status require_float(const OpContext& ctx, const Tensor& t, const char* what) {
  if (is_float_type(t.dtype())) return Status::ok();
  return unsupported(ctx.node.where() + ": " + what + " has element type " + dtype_name(t.dtype()) +
                     "; expected a float type");
}

int64_t prod(const Shape& s, size_t from, size_t to) {
  int64_t p = 1;
  for (size_t i = from; i < s.size() && i < to; ++i) p *= s[i];
  return p;
}

std::string ints_str(const std::vector<int64_t>& v) {
  return shape_str(v);
}

namespace {
struct Attrs {
  std::vector<int64_t> kernel, strides, dil, pads;
  std::string auto_pad;
  bool ceil = false;
};

Status read_attrs(const Node& node, size_t nsp, const Shape& kernel, bool allow_ceil, Attrs* a) {
  a->kernel = kernel.empty() ? node.attr_ints("kernel_shape") : kernel;
  a->strides = node.attr_ints("strides", std::vector<int64_t>(nsp, 1));
  a->dil = node.attr_ints("dilations", std::vector<int64_t>(nsp, 1));
  a->pads = node.attr_ints("pads", std::vector<int64_t>(2 * nsp, 0));
  a->auto_pad = node.attr_string("auto_pad", "NOTSET");
  a->ceil = allow_ceil && node.attr_int("ceil_mode", 0) != 0;
  if (a->strides.empty()) a->strides.assign(nsp, 1);
  if (a->dil.empty()) a->dil.assign(nsp, 1);
  if (a->pads.empty()) a->pads.assign(2 * nsp, 0);
  if (a->kernel.size() != nsp)
    return invalid_argument(node.where() + ": kernel_shape " + shape_str(a->kernel) + " has " +
                            std::to_string(a->kernel.size()) + " dims, input has " +
                            std::to_string(nsp) + " spatial dims");
  if (a->strides.size() != nsp || a->dil.size() != nsp || a->pads.size() != 2 * nsp)
    return invalid_argument(node.where() + ": strides/dilations/pads sizes " +
                            std::to_string(a->strides.size()) + "/" +
                            std::to_string(a->dil.size()) + "/" + std::to_string(a->pads.size()) +
                            " do not match " + std::to_string(nsp) + " spatial dims");
  for (size_t i = 0; i < nsp; ++i) {
    if (a->kernel[i] < 1 || a->strides[i] < 1 || a->dil[i] < 1 || a->pads[i] < 0 ||
        a->pads[i + nsp] < 0)
      return invalid_argument(node.where() + ": invalid kernel/stride/dilation/pad values");
  }
  if (a->auto_pad != "NOTSET" && a->auto_pad != "SAME_UPPER" && a->auto_pad != "SAME_LOWER" &&
      a->auto_pad != "VALID")
    return invalid_argument(node.where() + ": unknown auto_pad '" + a->auto_pad + "'");
  return Status::ok();
}

// Output size and pads of one dim; returns false when the window does not fit.
bool one_dim(const Attrs& a, size_t i, size_t nsp, int64_t in, int64_t* out, int64_t* pb,
             int64_t* pe) {
  const int64_t s = a.strides[i], ek = (a.kernel[i] - 1) * a.dil[i] + 1;
  if (a.auto_pad == "SAME_UPPER" || a.auto_pad == "SAME_LOWER") {
    *out = (in + s - 1) / s;
    int64_t total = std::max<int64_t>(0, (*out - 1) * s + ek - in);
    if (a.auto_pad == "SAME_UPPER") {
      *pb = total / 2;
      *pe = total - *pb;
    } else {
      *pe = total / 2;
      *pb = total - *pe;
    }
    return true;
  }
  if (a.auto_pad == "VALID") {
    *pb = *pe = 0;
    if (in < ek) return false;
    *out = (in - ek) / s + 1;
    return true;
  }
  *pb = a.pads[i];
  *pe = a.pads[i + nsp];
  const int64_t span = in + *pb + *pe - ek;
  if (span < 0) return false;
  if (a.ceil) {
    *out = (span + s - 1) / s + 1;
    if ((*out - 1) * s >= in + *pb) --*out;  // last window would start in the end padding
  } else {
    *out = span / s + 1;
  }
  return true;
}
}  // namespace

Result<Window> make_window(const Node& node, const Shape& in_spatial, const Shape& kernel,
                           bool allow_ceil) {
  Window w;
  w.nsp = in_spatial.size();
  w.in = in_spatial;
  Attrs a;
  KILN_RETURN_IF_ERROR(read_attrs(node, w.nsp, kernel, allow_ceil, &a));
  w.kernel = a.kernel;
  w.strides = a.strides;
  w.dilations = a.dil;
  w.out.resize(w.nsp);
  w.pad_begin.resize(w.nsp);
  w.pad_end.resize(w.nsp);
  for (size_t i = 0; i < w.nsp; ++i) {
    if (!one_dim(a, i, w.nsp, in_spatial[i], &w.out[i], &w.pad_begin[i], &w.pad_end[i]))
      return invalid_argument(node.where() + ": window " + shape_str(a.kernel) + " (dilations " +
                              shape_str(a.dil) + ") does not fit input " + shape_str(in_spatial) +
                              " with pads " + shape_str(a.pads));
  }
  return w;
}

bool infer_window_out(const Node& node, const std::vector<Dim>& in_spatial, const Shape& kernel,
                      bool allow_ceil, std::vector<Dim>* out) {
  Attrs a;
  if (!read_attrs(node, in_spatial.size(), kernel, allow_ceil, &a).is_ok()) return false;
  out->assign(in_spatial.size(), Dim());
  for (size_t i = 0; i < in_spatial.size(); ++i) {
    if (!in_spatial[i].known()) continue;
    int64_t o, pb, pe;
    if (!one_dim(a, i, in_spatial.size(), in_spatial[i].value, &o, &pb, &pe)) return false;
    (*out)[i] = Dim::of(o);
  }
  return true;
}

template <typename T>
void im2col(const T* x, int64_t C, const Window& w, T* col) {
  const size_t nsp = w.nsp;
  const int64_t kprod = prod(w.kernel), oprod = prod(w.out), iprod = prod(w.in);
  if (nsp == 2) {
    const int64_t H = w.in[0], W = w.in[1], KH = w.kernel[0], KW = w.kernel[1];
    const int64_t OH = w.out[0], OW = w.out[1];
    const int64_t sh = w.strides[0], sw = w.strides[1], dh = w.dilations[0], dw = w.dilations[1];
    const int64_t ph = w.pad_begin[0], pw = w.pad_begin[1];
    for (int64_t c = 0; c < C; ++c) {
      const T* xc = x + c * iprod;
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) {
          T* row = col + ((c * KH + kh) * KW + kw) * oprod;
          // Range of ow whose iw = ow*sw - pw + kw*dw lies in [0, W).
          const int64_t off = kw * dw - pw;
          int64_t ow_lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
          int64_t ow_hi = W - off <= 0 ? 0 : (W - off + sw - 1) / sw;  // exclusive
          ow_lo = std::min(ow_lo, OW);
          ow_hi = std::min(std::max(ow_hi, ow_lo), OW);
          for (int64_t oh = 0; oh < OH; ++oh) {
            T* r = row + oh * OW;
            const int64_t ih = oh * sh - ph + kh * dh;
            if (ih < 0 || ih >= H) {
              std::fill(r, r + OW, T(0));
              continue;
            }
            const T* xr = xc + ih * W + off;
            for (int64_t ow = 0; ow < ow_lo; ++ow) r[ow] = T(0);
            if (sw == 1) {
              std::copy(xr + ow_lo, xr + ow_hi, r + ow_lo);
            } else {
              for (int64_t ow = ow_lo; ow < ow_hi; ++ow) r[ow] = xr[ow * sw];
            }
            for (int64_t ow = ow_hi; ow < OW; ++ow) r[ow] = T(0);
          }
        }
    }
    return;
  }
  std::vector<int64_t> kidx(nsp), oidx(nsp);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < kprod; ++k) {
      int64_t rem = k;
      for (size_t d = nsp; d-- > 0;) {
        kidx[d] = rem % w.kernel[d];
        rem /= w.kernel[d];
      }
      T* row = col + (c * kprod + k) * oprod;
      std::fill(oidx.begin(), oidx.end(), 0);
      for (int64_t o = 0; o < oprod; ++o) {
        int64_t off = 0;
        bool inside = true;
        for (size_t d = 0; d < nsp; ++d) {
          const int64_t p = oidx[d] * w.strides[d] - w.pad_begin[d] + kidx[d] * w.dilations[d];
          if (p < 0 || p >= w.in[d]) {
            inside = false;
            break;
          }
          off = off * w.in[d] + p;
        }
        row[o] = inside ? x[c * iprod + off] : T(0);
        for (size_t d = nsp; d-- > 0;) {
          if (++oidx[d] < w.out[d]) break;
          oidx[d] = 0;
        }
      }
    }
  }
}

template <typename T>
void col2im(const T* col, int64_t C, const Window& w, T* y) {
  const size_t nsp = w.nsp;
  const int64_t kprod = prod(w.kernel), oprod = prod(w.out), iprod = prod(w.in);
  std::vector<int64_t> kidx(nsp), oidx(nsp);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < kprod; ++k) {
      int64_t rem = k;
      for (size_t d = nsp; d-- > 0;) {
        kidx[d] = rem % w.kernel[d];
        rem /= w.kernel[d];
      }
      const T* row = col + (c * kprod + k) * oprod;
      std::fill(oidx.begin(), oidx.end(), 0);
      for (int64_t o = 0; o < oprod; ++o) {
        int64_t off = 0;
        bool inside = true;
        for (size_t d = 0; d < nsp; ++d) {
          const int64_t p = oidx[d] * w.strides[d] - w.pad_begin[d] + kidx[d] * w.dilations[d];
          if (p < 0 || p >= w.in[d]) {
            inside = false;
            break;
          }
          off = off * w.in[d] + p;
        }
        if (inside) y[c * iprod + off] += row[o];
        for (size_t d = nsp; d-- > 0;) {
          if (++oidx[d] < w.out[d]) break;
          oidx[d] = 0;
        }
      }
    }
  }
}

template void im2col<float>(const float*, int64_t, const Window&, float*);
template void im2col<int32_t>(const int32_t*, int64_t, const Window&, int32_t*);
template void col2im<float>(const float*, int64_t, const Window&, float*);

}  // namespace nn
}  // namespace kiln
