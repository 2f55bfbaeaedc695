#include <array>

#include "ops/op.h"

namespace kiln {

namespace {
const OpDef* const kAllOps[] = {
#define KILN_OP(ident, name, domain) &kOp_##ident,
#include "ops/ops.def"
#undef KILN_OP
    nullptr};
constexpr size_t kNumOps = sizeof(kAllOps) / sizeof(kAllOps[0]) - 1;
}  // namespace

const OpDef* find_op(std::string_view domain, std::string_view name) {
  if (domain == "ai.onnx") domain = "";
  for (size_t i = 0; i < kNumOps; ++i) {
    const OpDef* d = kAllOps[i];
    if (name == d->name && domain == d->domain) return d;
  }
  return nullptr;
}

std::span<const OpDef* const> all_ops() { return {kAllOps, kNumOps}; }

Result<const Tensor*> req_tensor(const OpContext& ctx, std::span<const Value> in, size_t i) {
  if (i >= in.size() || in[i].kind == ValueKind::kNone)
    return invalid_argument(ctx.node.where() + ": required input " + std::to_string(i) + " is missing");
  if (in[i].kind != ValueKind::kTensor)
    return invalid_argument(ctx.node.where() + ": input " + std::to_string(i) + " must be a tensor, got " +
                            in[i].describe());
  return &in[i].tensor;
}

Result<int64_t> norm_axis(const OpContext& ctx, int64_t axis, int64_t rank) {
  int64_t r = rank == 0 ? 1 : rank;
  if (axis < -r || axis >= r)
    return invalid_argument(ctx.node.where() + ": axis " + std::to_string(axis) +
                            " is out of range for rank " + std::to_string(rank));
  return axis < 0 ? axis + r : axis;
}

}  // namespace kiln
