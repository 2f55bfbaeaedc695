#include "ops/control/control_util.h"

#include <cmath>
#include <cstring>
#include <functional>
#include <string>

namespace kiln::ctl {

namespace {
int64_t prod(const Shape& s, size_t b, size_t e) {
  int64_t p = 1;
  for (size_t i = b; i < e && i < s.size(); ++i) p *= s[i];
  return p;
}
}  // namespace

void copy_elems(const Tensor& src, int64_t so, Tensor& dst, int64_t dof, int64_t n) {
  if (n <= 0) return;
  if (src.dtype() == DataType::kString) {
    const std::string* s = src.data<std::string>();
    std::string* d = dst.data<std::string>();
    for (int64_t i = 0; i < n; ++i) d[dof + i] = s[so + i];
    return;
  }
  const size_t es = dtype_size(src.dtype());
  std::memcpy(static_cast<uint8_t*>(dst.raw_data()) + static_cast<size_t>(dof) * es,
              static_cast<const uint8_t*>(src.raw_data()) + static_cast<size_t>(so) * es,
              static_cast<size_t>(n) * es);
}

Result<Tensor> stack(const std::vector<Tensor>& items, int64_t axis, const OpContext& ctx) {
  if (items.empty()) return ctx.fail("cannot stack an empty list of tensors");
  const Shape& s0 = items[0].shape();
  if (axis < 0 || axis > static_cast<int64_t>(s0.size()))
    return ctx.fail("stack axis " + std::to_string(axis) + " out of range for rank " +
                    std::to_string(s0.size()));
  for (const Tensor& t : items) {
    if (t.shape() != s0 || t.dtype() != items[0].dtype())
      return ctx.fail("cannot stack " + t.describe() + " with " + items[0].describe() +
                      " (per-iteration values must agree in shape and type)");
  }
  Shape out_shape = s0;
  out_shape.insert(out_shape.begin() + axis, static_cast<int64_t>(items.size()));
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(items[0].dtype(), out_shape));
  const int64_t outer = prod(s0, 0, static_cast<size_t>(axis));
  const int64_t inner = prod(s0, static_cast<size_t>(axis), s0.size());
  const int64_t n = static_cast<int64_t>(items.size());
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t k = 0; k < n; ++k)
      copy_elems(items[static_cast<size_t>(k)], o * inner, out, (o * n + k) * inner, inner);
  return out;
}

Result<Tensor> concat(const std::vector<Tensor>& items, int64_t axis, const OpContext& ctx) {
  if (items.empty()) return ctx.fail("cannot concatenate an empty list of tensors");
  const Shape& s0 = items[0].shape();
  if (axis < 0 || axis >= static_cast<int64_t>(s0.size()))
    return ctx.fail("concat axis " + std::to_string(axis) + " out of range for rank " +
                    std::to_string(s0.size()));
  Shape out_shape = s0;
  out_shape[static_cast<size_t>(axis)] = 0;
  for (const Tensor& t : items) {
    bool ok = t.rank() == static_cast<int>(s0.size()) && t.dtype() == items[0].dtype();
    for (size_t d = 0; ok && d < s0.size(); ++d)
      if (d != static_cast<size_t>(axis) && t.shape()[d] != s0[d]) ok = false;
    if (!ok) return ctx.fail("cannot concatenate " + t.describe() + " with " + items[0].describe());
    out_shape[static_cast<size_t>(axis)] += t.shape()[static_cast<size_t>(axis)];
  }
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(items[0].dtype(), out_shape));
  const int64_t outer = prod(s0, 0, static_cast<size_t>(axis));
  const int64_t post = prod(s0, static_cast<size_t>(axis) + 1, s0.size());
  const int64_t out_row = out_shape[static_cast<size_t>(axis)] * post;
  int64_t col = 0;
  for (const Tensor& t : items) {
    const int64_t row = t.shape()[static_cast<size_t>(axis)] * post;
    for (int64_t o = 0; o < outer; ++o) copy_elems(t, o * row, out, o * out_row + col, row);
    col += row;
  }
  return out;
}

Result<Tensor> slice_axis(const Tensor& t, int64_t axis, int64_t start, int64_t len) {
  const Shape& s = t.shape();
  if (axis < 0 || axis >= t.rank() || start < 0 || len < 0 ||
      start + len > s[static_cast<size_t>(axis)])
    return invalid_argument("slice out of range of " + t.describe());
  Shape os = s;
  os[static_cast<size_t>(axis)] = len;
  KILN_ASSIGN_OR_RETURN(Tensor out, Tensor::create(t.dtype(), os));
  const int64_t outer = prod(s, 0, static_cast<size_t>(axis));
  const int64_t post = prod(s, static_cast<size_t>(axis) + 1, s.size());
  const int64_t in_row = s[static_cast<size_t>(axis)] * post;
  for (int64_t o = 0; o < outer; ++o)
    copy_elems(t, o * in_row + start * post, out, o * len * post, len * post);
  return out;
}

Result<Tensor> take(const Tensor& t, int64_t axis, int64_t i) {
  KILN_ASSIGN_OR_RETURN(Tensor s, slice_axis(t, axis, i, 1));
  Shape os = t.shape();
  os.erase(os.begin() + axis);
  return s.reshaped(os);
}

Result<bool> scalar_bool(const OpContext& ctx, const Tensor& t, const char* what) {
  if (t.numel() != 1)
    return ctx.bad_input(std::string(what) + " must have exactly one element, got " + t.describe());
  if (t.dtype() == DataType::kBool) return t.data<bool>()[0];
  if (t.dtype() == DataType::kString) return ctx.bad_input(std::string(what) + " must be boolean");
  return t.get_f64(0) != 0;
}

uint64_t node_seed(const OpContext& ctx) {
  if (const Attribute* a = ctx.node.attr("seed")) {
    double v =
        a->kind == Attribute::Kind::kInt ? static_cast<double>(a->i) : static_cast<double>(a->f);
    // Integral seeds map to themselves; other values by their bits.
    if (std::isfinite(v) && std::fabs(v) < 9e18 && v == std::floor(v))
      return static_cast<uint64_t>(static_cast<int64_t>(v));
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(bits));
    return bits;
  }
  // Distinct random nodes get distinct streams under one run seed.
  const std::string& id = ctx.node.outputs.empty() ? ctx.node.name : ctx.node.outputs[0];
  return ctx.seed ^ (std::hash<std::string>{}(id)*0x9E3779B97F4A7C15ull);
}

}  // namespace kiln::ctl
