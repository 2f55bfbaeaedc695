// Control flow: If, Loop, Scan. Bodies run through ctx.run_subgraph, which binds formal inputs in
// order and resolves outer-scope names; values may be tensors, sequences or optionals.
#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "ops/control/control_util.h"
#include "ops/op.h"

namespace kiln {

namespace {

Result<std::vector<Value>> run_body(OpContext& ctx, const Graph& g, std::vector<Value> in) {
  if (!ctx.run_subgraph) return ctx.fail("no subgraph runner available");
  auto r = ctx.run_subgraph(g, std::move(in));
  if (!r.is_ok()) return r.status().with_context(ctx.node.where());
  return r;
}

// Empty scan output: [0] + the body output's static dims when fully known, else [0].
Result<Tensor> empty_scan_output(const TypeInfo& t, int64_t axis) {
  DataType dt = t.kind == TypeInfo::Kind::kTensor && t.dtype != DataType::kUndefined
                    ? t.dtype
                    : DataType::kFloat;
  Shape s;
  if (t.kind == TypeInfo::Kind::kTensor && t.fully_known()) s = t.concrete_shape();
  if (axis < 0 || axis > static_cast<int64_t>(s.size())) axis = 0;
  s.insert(s.begin() + axis, 0);
  return Tensor::create(dt, s);
}

// Merges two branch types: keeps what both agree on.
TypeInfo merge_types(const TypeInfo& a, const TypeInfo& b) {
  if (a.kind != b.kind) return {};
  if (a.kind != TypeInfo::Kind::kTensor) return a;
  if (a.dtype != b.dtype || a.dtype == DataType::kUndefined) return {};
  TypeInfo r = TypeInfo::tensor(a.dtype);
  if (a.has_shape && b.has_shape && a.dims.size() == b.dims.size()) {
    r.has_shape = true;
    for (size_t i = 0; i < a.dims.size(); ++i) {
      const Dim& x = a.dims[i];
      const Dim& y = b.dims[i];
      if ((x.known() && y.known() && x.value == y.value) ||
          (!x.param.empty() && x.param == y.param))
        r.dims.push_back(x);
      else
        r.dims.push_back(Dim{});
    }
  }
  return r;
}

// ---------------------------------------------------------------- If
Status eval_if(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* c, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(bool cond, ctl::scalar_bool(ctx, *c, "cond"));
  const char* branch = cond ? "then_branch" : "else_branch";
  const Graph* g = ctx.node.attr_graph(branch);
  if (!g) return ctx.bad_input(std::string("missing graph attribute '") + branch + "'");
  KILN_ASSIGN_OR_RETURN(std::vector<Value> res, run_body(ctx, *g, {}));
  if (res.size() < out.size())
    return ctx.fail(std::string(branch) + " produced " + std::to_string(res.size()) +
                    " outputs, the node has " + std::to_string(out.size()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = std::move(res[i]);
  return Status::ok();
}

Status infer_if(InferContext& ctx) {
  const Graph* t = ctx.node.attr_graph("then_branch");
  const Graph* e = ctx.node.attr_graph("else_branch");
  if (!t || !e) return Status::ok();
  for (size_t i = 0; i < ctx.output_types.size(); ++i) {
    if (i >= t->outputs.size() || i >= e->outputs.size()) break;
    ctx.output_types[i] = merge_types(t->outputs[i].type, e->outputs[i].type);
  }
  return Status::ok();
}

// ---------------------------------------------------------------- Loop
Status eval_loop(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Graph* body = ctx.node.attr_graph("body");
  if (!body) return ctx.bad_input("missing graph attribute 'body'");
  int64_t max_trip = std::numeric_limits<int64_t>::max();
  if (const Tensor* m = opt_tensor(in, 0)) {
    if (m->numel() != 1 || !is_integer(m->dtype()))
      return ctx.bad_input("trip count M must be an integer scalar, got " + m->describe());
    max_trip = m->get_i64(0);
  } else if (!in.empty() && !in[0].is_none()) {
    return ctx.bad_input("trip count M must be a tensor");
  }
  bool cond = true;
  if (const Tensor* c = opt_tensor(in, 1)) {
    KILN_ASSIGN_OR_RETURN(cond, ctl::scalar_bool(ctx, *c, "cond"));
  } else if (in.size() > 1 && !in[1].is_none()) {
    return ctx.bad_input("cond must be a tensor");
  }
  const size_t n_carried = in.size() > 2 ? in.size() - 2 : 0;
  if (body->inputs.size() != 2 + n_carried)
    return ctx.bad_input("body has " + std::to_string(body->inputs.size()) + " inputs, expected " +
                         std::to_string(2 + n_carried) + " (iteration, cond, loop-carried values)");
  if (body->outputs.size() < 1 + n_carried)
    return ctx.bad_input("body has " + std::to_string(body->outputs.size()) +
                         " outputs, expected at least " + std::to_string(1 + n_carried));
  const size_t n_scan = body->outputs.size() - 1 - n_carried;
  if (out.size() > n_carried + n_scan)
    return ctx.bad_input("node has more outputs than the body produces");

  std::vector<Value> carried;
  if (in.size() > 2) carried.assign(in.begin() + 2, in.end());
  std::vector<std::vector<Tensor>> scans(n_scan);
  for (int64_t it = 0; it < max_trip && cond; ++it) {
    std::vector<Value> bin;
    bin.reserve(2 + n_carried);
    bin.emplace_back(Tensor::scalar<int64_t>(it));
    bin.emplace_back(Tensor::scalar<bool>(cond));
    for (const Value& v : carried) bin.push_back(v);
    KILN_ASSIGN_OR_RETURN(std::vector<Value> res, run_body(ctx, *body, std::move(bin)));
    if (res.size() < 1 + n_carried + n_scan) return ctx.fail("body returned too few outputs");
    if (!res[0].is_tensor()) return ctx.fail("body's cond output must be a tensor");
    KILN_ASSIGN_OR_RETURN(cond, ctl::scalar_bool(ctx, res[0].tensor, "body cond output"));
    for (size_t i = 0; i < n_carried; ++i) carried[i] = std::move(res[1 + i]);
    for (size_t k = 0; k < n_scan; ++k) {
      Value& v = res[1 + n_carried + k];
      if (!v.is_tensor())
        return ctx.fail("scan output " + std::to_string(k) + " must be a tensor, got " +
                        v.describe());
      scans[k].push_back(std::move(v.tensor));
    }
  }
  for (size_t i = 0; i < n_carried && i < out.size(); ++i) out[i] = std::move(carried[i]);
  for (size_t k = 0; k < n_scan && n_carried + k < out.size(); ++k) {
    if (ctx.node.outputs[n_carried + k].empty()) continue;
    if (scans[k].empty()) {
      KILN_ASSIGN_OR_RETURN(Tensor t, empty_scan_output(body->outputs[1 + n_carried + k].type, 0));
      out[n_carried + k] = std::move(t);
    } else {
      KILN_ASSIGN_OR_RETURN(Tensor t, ctl::stack(scans[k], 0, ctx));
      out[n_carried + k] = std::move(t);
    }
  }
  return Status::ok();
}

Status infer_loop(InferContext& ctx) {
  const Graph* body = ctx.node.attr_graph("body");
  if (!body) return Status::ok();
  const size_t n_in = ctx.node.inputs.size();
  const size_t n_carried = n_in > 2 ? n_in - 2 : 0;
  for (size_t i = 0; i < ctx.output_types.size(); ++i) {
    if (1 + i >= body->outputs.size()) break;
    const TypeInfo& bt = body->outputs[1 + i].type;
    if (i < n_carried) {
      // Shapes may change across iterations; the type does not.
      if (bt.kind == TypeInfo::Kind::kTensor && bt.dtype != DataType::kUndefined)
        ctx.output_types[i] = TypeInfo::tensor(bt.dtype);
      else if (i + 2 < ctx.input_types.size()) {
        const TypeInfo& it = ctx.input_types[i + 2];
        ctx.output_types[i] = it.kind == TypeInfo::Kind::kTensor ? TypeInfo::tensor(it.dtype) : it;
      }
    } else if (bt.kind == TypeInfo::Kind::kTensor && bt.dtype != DataType::kUndefined) {
      TypeInfo t = TypeInfo::tensor(bt.dtype);
      if (bt.has_shape) {
        t.has_shape = true;
        t.dims.push_back(Dim{});
        t.dims.insert(t.dims.end(), bt.dims.begin(), bt.dims.end());
      }
      ctx.output_types[i] = t;
    }
  }
  return Status::ok();
}

// ---------------------------------------------------------------- Scan
struct ScanSpec {
  size_t n_state = 0, n_scan_in = 0, n_scan_out = 0;
  std::vector<int64_t> in_axes, in_dirs, out_axes, out_dirs;
};

// One scan over unbatched inputs: `states` then `xs` (scan inputs).
Status scan_core(OpContext& ctx, const Graph& body, const ScanSpec& sp, std::vector<Value> states,
                 const std::vector<const Tensor*>& xs, std::vector<Value>& results) {
  int64_t len = -1;
  std::vector<int64_t> axes(sp.n_scan_in);
  for (size_t j = 0; j < sp.n_scan_in; ++j) {
    const Tensor& x = *xs[j];
    int64_t a = sp.in_axes[j];
    if (a < -x.rank() || a >= x.rank())
      return ctx.bad_input("scan_input_axes[" + std::to_string(j) + "]=" + std::to_string(a) +
                           " out of range for " + x.describe());
    if (a < 0) a += x.rank();
    axes[j] = a;
    const int64_t l = x.dim(static_cast<int>(a));
    if (len >= 0 && l != len)
      return ctx.bad_input("scan inputs disagree on sequence length: " + std::to_string(len) +
                           " vs " + std::to_string(l));
    len = l;
  }
  if (len < 0) len = 0;
  std::vector<std::vector<Tensor>> scans(sp.n_scan_out);
  for (int64_t t = 0; t < len; ++t) {
    std::vector<Value> bin = states;
    for (size_t j = 0; j < sp.n_scan_in; ++j) {
      const int64_t idx = sp.in_dirs[j] ? len - 1 - t : t;
      KILN_ASSIGN_OR_RETURN(Tensor s, ctl::take(*xs[j], axes[j], idx));
      bin.emplace_back(std::move(s));
    }
    KILN_ASSIGN_OR_RETURN(std::vector<Value> res, run_body(ctx, body, std::move(bin)));
    if (res.size() < sp.n_state + sp.n_scan_out) return ctx.fail("body returned too few outputs");
    for (size_t i = 0; i < sp.n_state; ++i) states[i] = std::move(res[i]);
    for (size_t k = 0; k < sp.n_scan_out; ++k) {
      Value& v = res[sp.n_state + k];
      if (!v.is_tensor()) return ctx.fail("scan output must be a tensor, got " + v.describe());
      scans[k].push_back(std::move(v.tensor));
    }
  }
  results.clear();
  for (auto& s : states) results.push_back(std::move(s));
  for (size_t k = 0; k < sp.n_scan_out; ++k) {
    auto& items = scans[k];
    int64_t a = sp.out_axes[k];
    if (items.empty()) {
      const TypeInfo& bt = body.outputs[sp.n_state + k].type;
      int64_t r = bt.has_shape ? static_cast<int64_t>(bt.dims.size()) + 1 : 1;
      if (a < 0) a += r;
      KILN_ASSIGN_OR_RETURN(Tensor e, empty_scan_output(bt, a));
      results.emplace_back(std::move(e));
      continue;
    }
    const int64_t r = items[0].rank() + 1;
    if (a < -r || a >= r)
      return ctx.bad_input("scan_output_axes[" + std::to_string(k) + "]=" + std::to_string(a) +
                           " out of range for rank " + std::to_string(r));
    if (a < 0) a += r;
    if (sp.out_dirs[k]) std::reverse(items.begin(), items.end());
    KILN_ASSIGN_OR_RETURN(Tensor st, ctl::stack(items, a, ctx));
    results.emplace_back(std::move(st));
  }
  return Status::ok();
}

Status eval_scan(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Graph* body = ctx.node.attr_graph("body");
  if (!body) return ctx.bad_input("missing graph attribute 'body'");
  ScanSpec sp;
  const int64_t m = ctx.node.attr_int("num_scan_inputs", -1);
  if (m < 1 || static_cast<size_t>(m) > in.size())
    return ctx.bad_input("num_scan_inputs=" + std::to_string(m) + " invalid for " +
                         std::to_string(in.size()) + " inputs");
  sp.n_scan_in = static_cast<size_t>(m);
  sp.n_state = in.size() - sp.n_scan_in;
  if (body->inputs.size() != in.size())
    return ctx.bad_input("body has " + std::to_string(body->inputs.size()) + " inputs, expected " +
                         std::to_string(in.size()));
  if (body->outputs.size() < sp.n_state)
    return ctx.bad_input("body has fewer outputs than state variables");
  sp.n_scan_out = body->outputs.size() - sp.n_state;
  if (out.size() > body->outputs.size())
    return ctx.bad_input("node has more outputs than the body");
  auto list = [&](const char* name, size_t n, std::vector<int64_t>& v) -> Status {
    v = ctx.node.attr_ints(name, std::vector<int64_t>(n, 0));
    if (v.size() != n)
      return ctx.bad_input(std::string(name) + " has " + std::to_string(v.size()) +
                           " entries, expected " + std::to_string(n));
    return Status::ok();
  };
  KILN_RETURN_IF_ERROR(list("scan_input_axes", sp.n_scan_in, sp.in_axes));
  KILN_RETURN_IF_ERROR(list("scan_input_directions", sp.n_scan_in, sp.in_dirs));
  KILN_RETURN_IF_ERROR(list("scan_output_axes", sp.n_scan_out, sp.out_axes));
  KILN_RETURN_IF_ERROR(list("scan_output_directions", sp.n_scan_out, sp.out_dirs));

  std::vector<Value> states(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(sp.n_state));
  std::vector<const Tensor*> xs;
  for (size_t j = 0; j < sp.n_scan_in; ++j) {
    KILN_ASSIGN_OR_RETURN(const Tensor* x, req_tensor(ctx, in, sp.n_state + j));
    xs.push_back(x);
  }
  std::vector<Value> results;
  if (ctx.node.attr_int("kiln_batched", 0) == 0) {
    KILN_RETURN_IF_ERROR(scan_core(ctx, *body, sp, std::move(states), xs, results));
  } else {
    // Opset-8 form: axis 0 of every state and scan input is a batch; scan each batch item
    // separately (its scan axis is then axis 0 of the per-item slice) and restack.
    int64_t batch = -1;
    for (size_t i = 0; i < in.size(); ++i) {
      KILN_ASSIGN_OR_RETURN(const Tensor* t, req_tensor(ctx, in, i));
      if (t->rank() < 1) return ctx.bad_input("opset-8 Scan inputs need a batch axis");
      if (batch >= 0 && t->dim(0) != batch) return ctx.bad_input("inputs disagree on batch size");
      batch = t->dim(0);
    }
    std::vector<std::vector<Tensor>> per_out(sp.n_state + sp.n_scan_out);
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<Value> st;
      for (size_t i = 0; i < sp.n_state; ++i) {
        KILN_ASSIGN_OR_RETURN(Tensor s, ctl::take(in[i].tensor, 0, b));
        st.emplace_back(std::move(s));
      }
      std::vector<Tensor> xb;
      for (const Tensor* x : xs) {
        KILN_ASSIGN_OR_RETURN(Tensor s, ctl::take(*x, 0, b));
        xb.push_back(std::move(s));
      }
      std::vector<const Tensor*> xp;
      for (auto& t : xb) xp.push_back(&t);
      std::vector<Value> r;
      KILN_RETURN_IF_ERROR(scan_core(ctx, *body, sp, std::move(st), xp, r));
      for (size_t k = 0; k < r.size(); ++k) {
        if (!r[k].is_tensor()) return ctx.fail("opset-8 Scan states must be tensors");
        per_out[k].push_back(std::move(r[k].tensor));
      }
    }
    for (auto& items : per_out) {
      if (items.empty()) return ctx.bad_input("opset-8 Scan with batch size 0 is not supported");
      KILN_ASSIGN_OR_RETURN(Tensor t, ctl::stack(items, 0, ctx));
      results.emplace_back(std::move(t));
    }
  }
  for (size_t i = 0; i < out.size() && i < results.size(); ++i)
    if (!ctx.node.outputs[i].empty()) out[i] = std::move(results[i]);
  return Status::ok();
}

Status infer_scan(InferContext& ctx) {
  const Graph* body = ctx.node.attr_graph("body");
  const int64_t m = ctx.node.attr_int("num_scan_inputs", -1);
  if (!body || m < 1 || static_cast<size_t>(m) > ctx.node.inputs.size()) return Status::ok();
  const size_t n_state = ctx.node.inputs.size() - static_cast<size_t>(m);
  const bool batched = ctx.node.attr_int("kiln_batched", 0) != 0;
  const std::vector<int64_t> axes = ctx.node.attr_ints("scan_output_axes");
  for (size_t i = 0; i < ctx.output_types.size() && i < body->outputs.size(); ++i) {
    const TypeInfo& bt = body->outputs[i].type;
    if (bt.kind != TypeInfo::Kind::kTensor || bt.dtype == DataType::kUndefined) continue;
    TypeInfo t = TypeInfo::tensor(bt.dtype);
    if (i >= n_state && bt.has_shape && !batched) {
      const int64_t r = static_cast<int64_t>(bt.dims.size()) + 1;
      int64_t a = i - n_state < axes.size() ? axes[i - n_state] : 0;
      if (a < 0) a += r;
      if (a >= 0 && a < r) {
        t.has_shape = true;
        t.dims = bt.dims;
        t.dims.insert(t.dims.begin() + a, Dim{});
      }
    }
    ctx.output_types[i] = t;
  }
  return Status::ok();
}

}  // namespace

const OpDef kOp_If = {"If", "", &eval_if, &infer_if};
const OpDef kOp_Loop = {"Loop", "", &eval_loop, &infer_loop};
const OpDef kOp_Scan = {"Scan", "", &eval_scan, &infer_scan};

}  // namespace kiln
