// Sequence and optional ops: SequenceEmpty/Construct/Insert/At/Erase/Length, SplitToSequence,
// ConcatFromSequence, SequenceMap, Optional, OptionalHasElement, OptionalGetElement.
#include <string>
#include <vector>

#include "ops/control/control_util.h"
#include "ops/op.h"

namespace kiln {

namespace {

Result<const Value*> req_seq(const OpContext& ctx, std::span<const Value> in, size_t i) {
  if (i >= in.size() || in[i].kind != ValueKind::kSequence)
    return ctx.bad_input("input " + std::to_string(i) + " must be a sequence, got " +
                         (i < in.size() ? in[i].describe() : std::string("nothing")));
  return &in[i];
}

// Normalizes a position tensor against a sequence of length n; `allow_end` admits n itself.
Result<int64_t> seq_pos(const OpContext& ctx, const Tensor& p, int64_t n, bool allow_end) {
  if (p.numel() != 1 || !is_integer(p.dtype()))
    return ctx.bad_input("position must be an integer scalar, got " + p.describe());
  int64_t pos = p.get_i64(0);
  const int64_t hi = allow_end ? n : n - 1;
  if (pos < -n || pos > hi)
    return ctx.bad_input("position " + std::to_string(pos) + " out of range for a sequence of " +
                         std::to_string(n));
  return pos < 0 ? pos + n : pos;
}

DataType seq_dtype(const Value& s) {
  if (s.elem_dtype != DataType::kUndefined) return s.elem_dtype;
  return s.sequence.empty() ? DataType::kUndefined : s.sequence[0].dtype();
}

Status eval_sequence_empty(OpContext& ctx, std::span<const Value>, std::span<Value> out) {
  const int64_t dt = ctx.node.attr_int("dtype", static_cast<int64_t>(DataType::kFloat));
  if (!dtype_valid(static_cast<int32_t>(dt)))
    return ctx.bad_input("invalid dtype " + std::to_string(dt));
  out[0] = Value::make_sequence({}, static_cast<DataType>(dt));
  return Status::ok();
}

Status eval_sequence_construct(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  std::vector<Tensor> items;
  for (size_t i = 0; i < in.size(); ++i) {
    KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
    if (!items.empty() && t->dtype() != items[0].dtype())
      return ctx.bad_input("sequence elements must share one type: " + t->describe() + " vs " +
                           items[0].describe());
    items.push_back(*t);
  }
  if (items.empty()) return ctx.bad_input("SequenceConstruct needs at least one input");
  DataType dt = items[0].dtype();
  out[0] = Value::make_sequence(std::move(items), dt);
  return Status::ok();
}

Status eval_sequence_insert(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Value* s, req_seq(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, 1));
  DataType dt = seq_dtype(*s);
  if (dt != DataType::kUndefined && dt != t->dtype())
    return ctx.bad_input("cannot insert " + t->describe() + " into a sequence of " +
                         dtype_name(dt));
  const int64_t n = static_cast<int64_t>(s->sequence.size());
  int64_t pos = n;
  if (const Tensor* p = opt_tensor(in, 2)) {
    KILN_ASSIGN_OR_RETURN(pos, seq_pos(ctx, *p, n, true));
  }
  std::vector<Tensor> items = s->sequence;
  items.insert(items.begin() + pos, *t);
  out[0] = Value::make_sequence(std::move(items), t->dtype());
  return Status::ok();
}

Status eval_sequence_at(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Value* s, req_seq(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* p, req_tensor(ctx, in, 1));
  KILN_ASSIGN_OR_RETURN(int64_t pos,
                        seq_pos(ctx, *p, static_cast<int64_t>(s->sequence.size()), false));
  out[0] = s->sequence[static_cast<size_t>(pos)];
  return Status::ok();
}

Status eval_sequence_erase(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Value* s, req_seq(ctx, in, 0));
  const int64_t n = static_cast<int64_t>(s->sequence.size());
  if (n == 0) return ctx.bad_input("cannot erase from an empty sequence");
  int64_t pos = n - 1;
  if (const Tensor* p = opt_tensor(in, 1)) {
    KILN_ASSIGN_OR_RETURN(pos, seq_pos(ctx, *p, n, false));
  }
  std::vector<Tensor> items = s->sequence;
  items.erase(items.begin() + pos);
  out[0] = Value::make_sequence(std::move(items), seq_dtype(*s));
  return Status::ok();
}

Status eval_sequence_length(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Value* s, req_seq(ctx, in, 0));
  out[0] = Tensor::scalar<int64_t>(static_cast<int64_t>(s->sequence.size()));
  return Status::ok();
}

Status infer_sequence_length(InferContext& ctx) {
  ctx.output_types[0] = TypeInfo::tensor(DataType::kInt64, Shape{});
  return Status::ok();
}

Status eval_split_to_sequence(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, 0));
  if (x->rank() < 1) return ctx.bad_input("input must have rank >= 1");
  KILN_ASSIGN_OR_RETURN(int64_t axis, norm_axis(ctx, ctx.node.attr_int("axis", 0), x->rank()));
  const int64_t dim = x->dim(static_cast<int>(axis));
  std::vector<int64_t> sizes;
  bool squeeze = false;
  if (const Tensor* sp = opt_tensor(in, 1)) {
    if (!is_integer(sp->dtype()))
      return ctx.bad_input("split must be integer, got " + sp->describe());
    if (sp->rank() == 0) {
      const int64_t c = sp->get_i64(0);
      if (c <= 0) return ctx.bad_input("split chunk size must be positive");
      for (int64_t s = 0; s < dim; s += c) sizes.push_back(std::min(c, dim - s));
    } else if (sp->rank() == 1) {
      sizes = sp->to_i64_vector();
      int64_t total = 0;
      for (int64_t v : sizes) {
        if (v < 0) return ctx.bad_input("split sizes must be non-negative");
        total += v;
      }
      if (total != dim)
        return ctx.bad_input("split sizes sum to " + std::to_string(total) + ", axis has " +
                             std::to_string(dim));
    } else {
      return ctx.bad_input("split must be a scalar or 1-D, got " + sp->describe());
    }
  } else {
    sizes.assign(static_cast<size_t>(dim), 1);
    squeeze = ctx.node.attr_int("keepdims", 1) == 0;
  }
  std::vector<Tensor> items;
  int64_t start = 0;
  for (int64_t s : sizes) {
    KILN_ASSIGN_OR_RETURN(Tensor t, ctl::slice_axis(*x, axis, start, s));
    if (squeeze) {
      Shape sh = t.shape();
      sh.erase(sh.begin() + axis);
      KILN_ASSIGN_OR_RETURN(t, t.reshaped(sh));
    }
    items.push_back(std::move(t));
    start += s;
  }
  out[0] = Value::make_sequence(std::move(items), x->dtype());
  return Status::ok();
}

Status eval_concat_from_sequence(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Value* s, req_seq(ctx, in, 0));
  if (!ctx.node.has_attr("axis")) return ctx.bad_input("missing required attribute 'axis'");
  if (s->sequence.empty()) return ctx.bad_input("cannot concatenate an empty sequence");
  const int64_t rank = s->sequence[0].rank();
  const bool new_axis = ctx.node.attr_int("new_axis", 0) != 0;
  int64_t axis = ctx.node.attr_int("axis", 0);
  const int64_t r = new_axis ? rank + 1 : rank;
  if (axis < -r || axis >= r || r == 0)
    return ctx.bad_input("axis " + std::to_string(axis) + " out of range");
  if (axis < 0) axis += r;
  KILN_ASSIGN_OR_RETURN(Tensor t, new_axis ? ctl::stack(s->sequence, axis, ctx)
                                           : ctl::concat(s->sequence, axis, ctx));
  out[0] = std::move(t);
  return Status::ok();
}

Status eval_sequence_map(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Graph* body = ctx.node.attr_graph("body");
  if (!body) return ctx.bad_input("missing graph attribute 'body'");
  KILN_ASSIGN_OR_RETURN(const Value* s0, req_seq(ctx, in, 0));
  const size_t n = s0->sequence.size();
  if (body->inputs.size() != in.size())
    return ctx.bad_input("body has " + std::to_string(body->inputs.size()) + " inputs, node has " +
                         std::to_string(in.size()));
  for (size_t j = 0; j < in.size(); ++j) {
    if (in[j].kind == ValueKind::kSequence && in[j].sequence.size() != n)
      return ctx.bad_input("input sequences differ in length");
    if (in[j].kind != ValueKind::kSequence && in[j].kind != ValueKind::kTensor)
      return ctx.bad_input("inputs must be sequences or tensors");
  }
  if (!ctx.run_subgraph) return ctx.fail("no subgraph runner available");
  std::vector<std::vector<Tensor>> res(out.size());
  for (size_t i = 0; i < n; ++i) {
    std::vector<Value> bin;
    for (size_t j = 0; j < in.size(); ++j)
      bin.emplace_back(in[j].kind == ValueKind::kSequence ? in[j].sequence[i] : in[j].tensor);
    auto r = ctx.run_subgraph(*body, std::move(bin));
    if (!r.is_ok()) return r.status().with_context(ctx.node.where());
    if (r->size() < out.size()) return ctx.fail("body returned too few outputs");
    for (size_t k = 0; k < out.size(); ++k) {
      Value& v = (*r)[k];
      if (!v.is_tensor()) return ctx.fail("body outputs must be tensors, got " + v.describe());
      res[k].push_back(std::move(v.tensor));
    }
  }
  for (size_t k = 0; k < out.size(); ++k) {
    DataType dt = DataType::kUndefined;
    if (!res[k].empty())
      dt = res[k][0].dtype();
    else if (k < body->outputs.size()) {
      const TypeInfo& t = body->outputs[k].type;
      if (t.kind == TypeInfo::Kind::kTensor)
        dt = t.dtype;
      else if (t.kind == TypeInfo::Kind::kSequence && t.elem)
        dt = t.elem->dtype;
    }
    out[k] = Value::make_sequence(std::move(res[k]), dt);
  }
  return Status::ok();
}

// ---------------------------------------------------------------- type inference
TypeInfo seq_of(const TypeInfo& elem) {
  TypeInfo t;
  t.kind = TypeInfo::Kind::kSequence;
  t.elem = std::make_shared<TypeInfo>(elem);
  return t;
}
// Element type of a sequence-typed input; unknown when not a known sequence.
TypeInfo elem_of(const InferContext& ctx, size_t i) {
  if (i < ctx.input_types.size() && ctx.input_types[i].kind == TypeInfo::Kind::kSequence &&
      ctx.input_types[i].elem)
    return *ctx.input_types[i].elem;
  return {};
}
// A sequence of tensors of `dt` (shape left open: elements may differ).
Status infer_seq_dtype(InferContext& ctx, DataType dt) {
  if (dt != DataType::kUndefined) ctx.output_types[0] = seq_of(TypeInfo::tensor(dt));
  return Status::ok();
}
Status infer_sequence_empty(InferContext& ctx) {
  const int64_t dt = ctx.node.attr_int("dtype", static_cast<int64_t>(DataType::kFloat));
  if (!dtype_valid(static_cast<int32_t>(dt))) return Status::ok();
  return infer_seq_dtype(ctx, static_cast<DataType>(dt));
}
Status infer_seq_from_tensor0(InferContext& ctx) {  // SequenceConstruct, SplitToSequence
  if (ctx.input_types.empty() || ctx.input_types[0].kind != TypeInfo::Kind::kTensor)
    return Status::ok();
  return infer_seq_dtype(ctx, ctx.input_types[0].dtype);
}
Status infer_seq_passthrough(InferContext& ctx) {  // SequenceInsert, SequenceErase
  TypeInfo e = elem_of(ctx, 0);
  if (e.kind == TypeInfo::Kind::kTensor) return infer_seq_dtype(ctx, e.dtype);
  return Status::ok();
}
Status infer_sequence_at(InferContext& ctx) {
  TypeInfo e = elem_of(ctx, 0);
  if (e.kind == TypeInfo::Kind::kTensor) ctx.output_types[0] = TypeInfo::tensor(e.dtype);
  return Status::ok();
}
Status infer_concat_from_sequence(InferContext& ctx) {
  TypeInfo e = elem_of(ctx, 0);
  if (e.kind == TypeInfo::Kind::kTensor) ctx.output_types[0] = TypeInfo::tensor(e.dtype);
  return Status::ok();
}

// ---------------------------------------------------------------- Optional
Status eval_optional(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (!in.empty() && !in[0].is_none()) {
    const Value& v = in[0];
    DataType dt = v.kind == ValueKind::kTensor ? v.tensor.dtype() : v.elem_dtype;
    out[0] = Value::make_optional(std::make_shared<Value>(v), dt);
    return Status::ok();
  }
  const Attribute* a = ctx.node.attr("type");
  if (!a || a->types.empty())
    return ctx.bad_input("an Optional without input needs the 'type' attribute");
  const TypeInfo& t = a->types[0];
  DataType dt =
      t.kind == TypeInfo::Kind::kTensor ? t.dtype : (t.elem ? t.elem->dtype : DataType::kUndefined);
  out[0] = Value::make_optional(nullptr, dt);
  return Status::ok();
}

Status infer_optional(InferContext& ctx) {
  TypeInfo t;
  t.kind = TypeInfo::Kind::kOptional;
  if (!ctx.input_types.empty() && ctx.input_types[0].kind != TypeInfo::Kind::kUnknown) {
    t.elem = std::make_shared<TypeInfo>(ctx.input_types[0]);
  } else if (const Attribute* a = ctx.node.attr("type");
             a && !a->types.empty() && (ctx.node.inputs.empty() || ctx.node.inputs[0].empty())) {
    t.elem = std::make_shared<TypeInfo>(a->types[0]);
  } else {
    return Status::ok();
  }
  ctx.output_types[0] = t;
  return Status::ok();
}

Status eval_optional_has_element(OpContext&, std::span<const Value> in, std::span<Value> out) {
  bool has = false;
  if (!in.empty()) {
    const Value& v = in[0];
    has = v.kind == ValueKind::kOptional ? v.optional != nullptr && !v.optional->is_none()
                                         : !v.is_none();
  }
  out[0] = Tensor::scalar<bool>(has);
  return Status::ok();
}

Status infer_optional_has_element(InferContext& ctx) {
  ctx.output_types[0] = TypeInfo::tensor(DataType::kBool, Shape{});
  return Status::ok();
}

Status infer_optional_get_element(InferContext& ctx) {
  if (ctx.input_types.empty()) return Status::ok();
  const TypeInfo& t = ctx.input_types[0];
  if (t.kind == TypeInfo::Kind::kOptional && t.elem)
    ctx.output_types[0] = *t.elem;
  else if (t.kind == TypeInfo::Kind::kTensor || t.kind == TypeInfo::Kind::kSequence)
    ctx.output_types[0] = t;
  return Status::ok();
}

Status eval_optional_get_element(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (in.empty() || in[0].is_none()) return ctx.bad_input("input is missing");
  const Value& v = in[0];
  if (v.kind == ValueKind::kOptional) {
    if (!v.optional || v.optional->is_none()) return ctx.bad_input("the optional input is empty");
    out[0] = *v.optional;
  } else {
    out[0] = v;
  }
  return Status::ok();
}

}  // namespace

const OpDef kOp_SequenceEmpty = {"SequenceEmpty", "", &eval_sequence_empty, &infer_sequence_empty};
const OpDef kOp_SequenceConstruct = {"SequenceConstruct", "", &eval_sequence_construct,
                                     &infer_seq_from_tensor0};
const OpDef kOp_SequenceInsert = {"SequenceInsert", "", &eval_sequence_insert,
                                  &infer_seq_passthrough};
const OpDef kOp_SequenceAt = {"SequenceAt", "", &eval_sequence_at, &infer_sequence_at};
const OpDef kOp_SequenceErase = {"SequenceErase", "", &eval_sequence_erase, &infer_seq_passthrough};
const OpDef kOp_SequenceLength = {"SequenceLength", "", &eval_sequence_length,
                                  &infer_sequence_length};
const OpDef kOp_SplitToSequence = {"SplitToSequence", "", &eval_split_to_sequence,
                                   &infer_seq_from_tensor0};
const OpDef kOp_ConcatFromSequence = {"ConcatFromSequence", "", &eval_concat_from_sequence,
                                      &infer_concat_from_sequence};
const OpDef kOp_SequenceMap = {"SequenceMap", "", &eval_sequence_map, nullptr};
const OpDef kOp_Optional = {"Optional", "", &eval_optional, &infer_optional};
const OpDef kOp_OptionalHasElement = {"OptionalHasElement", "", &eval_optional_has_element,
                                      &infer_optional_has_element};
const OpDef kOp_OptionalGetElement = {"OptionalGetElement", "", &eval_optional_get_element,
                                      &infer_optional_get_element};

}  // namespace kiln
