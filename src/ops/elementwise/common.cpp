// Shape/type inference shared by the elementwise family.
#include "ops/elementwise/ew_common.h"

namespace kiln {

bool infer_broadcast_dims(const std::vector<const TypeInfo*>& ins, std::vector<Dim>& out) {
  size_t rank = 0;
  for (auto* t : ins) {
    if (t->kind != TypeInfo::Kind::kTensor || !t->has_shape) return false;
    rank = std::max(rank, t->dims.size());
  }
  out.assign(rank, Dim::of(1));
  for (size_t pos = 0; pos < rank; ++pos) {
    int64_t known = -1;
    bool sym = false, mixed = false;
    std::string param;
    for (auto* t : ins) {
      const size_t off = rank - t->dims.size();
      if (pos < off) continue;
      const Dim& d = t->dims[pos - off];
      if (d.known()) {
        if (d.value == 1) continue;
        if (known >= 0 && known != d.value) return false;  // incompatible: left to run time
        known = d.value;
      } else if (!sym) {
        sym = true;
        param = d.param;
      } else if (param != d.param || d.param.empty()) {
        mixed = true;
      }
    }
    if (known >= 0)
      out[pos] = Dim::of(known);
    else if (sym)
      out[pos] = mixed || param.empty() ? Dim() : Dim::sym(param);
  }
  return true;
}

Status infer_broadcast_as(InferContext& ctx, DataType dt) {
  std::vector<const TypeInfo*> ins;
  for (auto& t : ctx.input_types)
    if (t.kind != TypeInfo::Kind::kUnknown) ins.push_back(&t);
  if (ctx.output_types.empty()) return Status::ok();
  if (dt == DataType::kUndefined) {
    if (ctx.input_types.empty() || ctx.input_types[0].kind != TypeInfo::Kind::kTensor)
      return Status::ok();
    dt = ctx.input_types[0].dtype;
  }
  TypeInfo o = TypeInfo::tensor(dt);
  if (!ins.empty() && ins.size() == ctx.input_types.size()) {
    std::vector<Dim> dims;
    if (infer_broadcast_dims(ins, dims)) {
      o.has_shape = true;
      o.dims = std::move(dims);
    }
  }
  ctx.output_types[0] = std::move(o);
  return Status::ok();
}

}  // namespace kiln
