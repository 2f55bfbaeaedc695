// Gemm, MatMul (numpy batching, 1-D operands, float + integer), MatMulInteger, QLinearMatMul.
#include <algorithm>
#include <cmath>
#include <limits>

#include "ops/nn/gemm.h"
#include "ops/nn/nn_util.h"

namespace kiln {
namespace {

using nn::prod;

// ---- shape logic shared by the MatMul family ----
struct MMPlan {
  int64_t M = 1, K = 1, N = 1, batch = 1;
  Shape out;                          // final output shape (1-D promotions removed)
  std::vector<int64_t> a_off, b_off;  // per batch: element offsets of the A/B matrices
};

Result<MMPlan> plan_matmul(const OpContext& ctx, const Shape& as, const Shape& bs) {
  if (as.empty() || bs.empty()) return ctx.bad_input("MatMul operands must have rank >= 1");
  Shape a = as, b = bs;
  const bool a1 = a.size() == 1, b1 = b.size() == 1;
  if (a1) a.insert(a.begin(), 1);
  if (b1) b.push_back(1);
  MMPlan p;
  p.M = a[a.size() - 2];
  p.K = a[a.size() - 1];
  p.N = b[b.size() - 1];
  if (b[b.size() - 2] != p.K)
    return ctx.bad_input("inner dimensions of A " + shape_str(as) + " and B " + shape_str(bs) +
                         " differ");
  Shape ab(a.begin(), a.end() - 2), bb(b.begin(), b.end() - 2);
  KILN_ASSIGN_OR_RETURN(Shape ob, broadcast_shapes(ab, bb));
  auto ast = broadcast_strides(ab, ob), bst = broadcast_strides(bb, ob);
  p.batch = prod(ob);
  p.a_off.resize(static_cast<size_t>(p.batch));
  p.b_off.resize(static_cast<size_t>(p.batch));
  const int64_t am = p.M * p.K, bm = p.K * p.N;
  for (int64_t i = 0; i < p.batch; ++i) {
    int64_t rem = i, ao = 0, bo = 0;
    for (size_t d = ob.size(); d-- > 0;) {
      const int64_t c = rem % ob[d];
      rem /= ob[d];
      ao += c * ast[d];
      bo += c * bst[d];
    }
    p.a_off[i] = ao * am;
    p.b_off[i] = bo * bm;
  }
  p.out = ob;
  if (!a1) p.out.push_back(p.M);
  if (!b1) p.out.push_back(p.N);
  return p;
}

template <typename T>
void int_matmul(const MMPlan& p, const T* a, const T* b, T* y) {
  using A = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
  std::vector<A> acc(static_cast<size_t>(p.N));
  for (int64_t bi = 0; bi < p.batch; ++bi)
    for (int64_t i = 0; i < p.M; ++i) {
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k = 0; k < p.K; ++k) {
        const A av = static_cast<A>(a[p.a_off[bi] + i * p.K + k]);
        const T* br = b + p.b_off[bi] + k * p.N;
        for (int64_t j = 0; j < p.N; ++j) acc[j] += av * static_cast<A>(br[j]);
      }
      T* yr = y + (bi * p.M + i) * p.N;
      for (int64_t j = 0; j < p.N; ++j) yr[j] = static_cast<T>(acc[j]);
    }
}

bool int_mm_type(DataType dt) {
  return dt == DataType::kInt32 || dt == DataType::kInt64 || dt == DataType::kUInt32 ||
         dt == DataType::kUInt64;
}

Status eval_matmul(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* A, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* B, req_tensor(ctx, in, 1));
  if (A->dtype() != B->dtype())
    return ctx.bad_input(std::string("A is ") + dtype_name(A->dtype()) + " but B is " +
                         dtype_name(B->dtype()));
  KILN_ASSIGN_OR_RETURN(MMPlan p, plan_matmul(ctx, A->shape(), B->shape()));
  const DataType dt = A->dtype();
  if (int_mm_type(dt) || dt == DataType::kInt8 || dt == DataType::kUInt8 ||
      dt == DataType::kInt16 || dt == DataType::kUInt16) {
    KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(dt, p.out));
    dispatch_int(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      int_matmul<T>(p, A->data<T>(), B->data<T>(), Y.data<T>());
    });
    out[0] = Y;
    return Status::ok();
  }
  if (dt == DataType::kDouble) {
    KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(dt, p.out));
    for (int64_t bi = 0; bi < p.batch; ++bi)
      dgemm(false, false, p.M, p.N, p.K, 1.0, A->data<double>() + p.a_off[bi], p.K,
            B->data<double>() + p.b_off[bi], p.N, 0.0, Y.data<double>() + bi * p.M * p.N, p.N);
    out[0] = Y;
    return Status::ok();
  }
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *A, "A"));
  KILN_ASSIGN_OR_RETURN(Tensor af, nn::as_f32(*A));
  KILN_ASSIGN_OR_RETURN(Tensor bf, nn::as_f32(*B));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, p.out));
  // B shared by every batch and A's batches contiguous: one tall GEMM.
  bool shared_b = p.batch > 1;
  for (int64_t bi = 0; bi < p.batch && shared_b; ++bi)
    shared_b = p.b_off[bi] == 0 && p.a_off[bi] == bi * p.M * p.K;
  if (shared_b) {
    sgemm(false, false, p.batch * p.M, p.N, p.K, 1.f, af.data<float>(), p.K, bf.data<float>(), p.N,
          0.f, Y.data<float>(), p.N);
  } else {
    for (int64_t bi = 0; bi < p.batch; ++bi)
      sgemm(false, false, p.M, p.N, p.K, 1.f, af.data<float>() + p.a_off[bi], p.K,
            bf.data<float>() + p.b_off[bi], p.N, 0.f, Y.data<float>() + bi * p.M * p.N, p.N);
  }
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, dt));
  return Status::ok();
}

// Output TypeInfo of a matmul of two known-rank operands.
bool infer_mm_dims(const TypeInfo& a, const TypeInfo& b, std::vector<Dim>* out) {
  if (!a.has_shape || !b.has_shape || a.dims.empty() || b.dims.empty()) return false;
  std::vector<Dim> ad = a.dims, bd = b.dims;
  const bool a1 = ad.size() == 1, b1 = bd.size() == 1;
  if (a1) ad.insert(ad.begin(), Dim::of(1));
  if (b1) bd.push_back(Dim::of(1));
  const size_t ab = ad.size() - 2, bb = bd.size() - 2, r = std::max(ab, bb);
  out->clear();
  for (size_t i = 0; i < r; ++i) {
    const Dim da = i < r - ab ? Dim::of(1) : ad[i - (r - ab)];
    const Dim db = i < r - bb ? Dim::of(1) : bd[i - (r - bb)];
    if (da.known() && da.value == 1)
      out->push_back(db);
    else if (db.known() && db.value == 1)
      out->push_back(da);
    else if (da.known())
      out->push_back(da);
    else
      out->push_back(db);
  }
  if (!a1) out->push_back(ad[ad.size() - 2]);
  if (!b1) out->push_back(bd.back());
  return true;
}

Status infer_matmul(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& a = ctx.input_types[0];
  if (a.kind != TypeInfo::Kind::kTensor) return Status::ok();
  TypeInfo o = TypeInfo::tensor(a.dtype);
  if (infer_mm_dims(a, ctx.input_types[1], &o.dims)) o.has_shape = true;
  ctx.output_types[0] = o;
  return Status::ok();
}

// ---- Gemm ----
Status eval_gemm(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* A, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* B, req_tensor(ctx, in, 1));
  const Tensor* C = opt_tensor(in, 2);
  const bool ta = ctx.node.attr_int("transA", 0) != 0, tb = ctx.node.attr_int("transB", 0) != 0;
  const float alpha = ctx.node.attr_float("alpha", 1.f);
  float beta = ctx.node.attr_float("beta", 1.f);
  if (A->rank() != 2 || B->rank() != 2)
    return ctx.bad_input("A " + shape_str(A->shape()) + " and B " + shape_str(B->shape()) +
                         " must be 2-D");
  const int64_t M = ta ? A->dim(1) : A->dim(0), K = ta ? A->dim(0) : A->dim(1);
  const int64_t N = tb ? B->dim(0) : B->dim(1), Kb = tb ? B->dim(1) : B->dim(0);
  if (K != Kb)
    return ctx.bad_input("inner dimensions of A " + shape_str(A->shape()) + " and B " +
                         shape_str(B->shape()) + " differ (transA " + std::to_string(ta) +
                         ", transB " + std::to_string(tb) + ")");
  const DataType dt = A->dtype();
  Shape cs;
  if (C) {
    cs = C->shape();
    if (cs.size() > 2) return ctx.bad_input("C " + shape_str(cs) + " has rank > 2");
    KILN_ASSIGN_OR_RETURN(Shape bsh, broadcast_shapes(cs, {M, N}));
    if (bsh != Shape{M, N})
      return ctx.bad_input("C " + shape_str(cs) + " does not broadcast to " + shape_str({M, N}));
  }
  auto cst = broadcast_strides(cs, {M, N});
  if (int_mm_type(dt)) {
    KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(dt, {M, N}));
    const int64_t ia = static_cast<int64_t>(alpha), ib = static_cast<int64_t>(beta);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        int64_t s = 0;
        for (int64_t k = 0; k < K; ++k)
          s += A->get_i64(ta ? k * M + i : i * K + k) * B->get_i64(tb ? j * K + k : k * N + j);
        s *= ia;
        if (C) s += ib * C->get_i64(i * cst[0] + j * cst[1]);
        dispatch_int(dt, [&](auto tag) {
          using T = typename decltype(tag)::type;
          Y.data<T>()[i * N + j] = static_cast<T>(s);
        });
      }
    out[0] = Y;
    return Status::ok();
  }
  KILN_RETURN_IF_ERROR(nn::require_float(ctx, *A, "A"));
  KILN_ASSIGN_OR_RETURN(Tensor af, nn::as_f32(*A));
  KILN_ASSIGN_OR_RETURN(Tensor bf, nn::as_f32(*B));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kFloat, {M, N}));
  float* y = Y.data<float>();
  if (C && beta != 0.f) {
    KILN_ASSIGN_OR_RETURN(Tensor cf, nn::as_f32(*C));
    const float* c = cf.data<float>();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) y[i * N + j] = c[i * cst[0] + j * cst[1]];
  } else {
    beta = 0.f;
  }
  sgemm(ta, tb, M, N, K, alpha, af.data<float>(), ta ? M : K, bf.data<float>(), tb ? K : N, beta, y,
        N);
  KILN_ASSIGN_OR_RETURN(out[0], cast_tensor(Y, dt));
  return Status::ok();
}

Status infer_gemm(InferContext& ctx) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  const TypeInfo& a = ctx.input_types[0];
  const TypeInfo& b = ctx.input_types[1];
  if (a.kind != TypeInfo::Kind::kTensor) return Status::ok();
  // kiln_float_out (fold_gemm_output_casts, device builds): a 16-bit Gemm writing float32.
  const bool f32_out = ctx.node.attr_int("kiln_float_out", 0) != 0 &&
                       (a.dtype == DataType::kFloat16 || a.dtype == DataType::kBFloat16);
  TypeInfo o = TypeInfo::tensor(f32_out ? DataType::kFloat : a.dtype);
  if (a.has_shape && b.has_shape && a.dims.size() == 2 && b.dims.size() == 2) {
    const bool ta = ctx.node.attr_int("transA", 0) != 0, tb = ctx.node.attr_int("transB", 0) != 0;
    o.has_shape = true;
    o.dims = {a.dims[ta ? 1 : 0], b.dims[tb ? 0 : 1]};
  }
  ctx.output_types[0] = o;
  return Status::ok();
}

// ---- quantized ----
// (v - zp) as int32, zp scalar or per-index along `axis_len` with `stride` (1-D zero points).
Result<std::vector<int32_t>> shift_q(const OpContext& ctx, const Tensor& t, const Tensor* zp,
                                     int axis_from_end) {
  std::vector<int32_t> v(static_cast<size_t>(t.numel()));
  const int64_t nz = zp ? zp->numel() : 0;
  int64_t len = 1, stride = 1;
  if (nz > 1) {
    const int r = t.rank();
    const int ax = r - axis_from_end;
    if (ax < 0 || ax >= r || t.dim(ax) != nz)
      return ctx.bad_input("zero point " + shape_str(zp->shape()) + " does not match operand " +
                           shape_str(t.shape()));
    len = nz;
    stride = prod(t.shape(), static_cast<size_t>(ax) + 1);
  }
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t z = nz == 0 ? 0 : nz == 1 ? zp->get_i64(0) : zp->get_i64((i / stride) % len);
    v[i] = static_cast<int32_t>(t.get_i64(i) - z);
  }
  return v;
}

bool q8(DataType dt) {
  return dt == DataType::kInt8 || dt == DataType::kUInt8;
}

Status eval_matmul_integer(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(const Tensor* A, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* B, req_tensor(ctx, in, 1));
  if (!q8(A->dtype()) || !q8(B->dtype()))
    return unsupported(ctx.node.where() + ": operands must be int8/uint8");
  KILN_ASSIGN_OR_RETURN(MMPlan p, plan_matmul(ctx, A->shape(), B->shape()));
  KILN_ASSIGN_OR_RETURN(auto av, shift_q(ctx, *A, opt_tensor(in, 2), 2));
  KILN_ASSIGN_OR_RETURN(auto bv, shift_q(ctx, *B, opt_tensor(in, 3), 1));
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(DataType::kInt32, p.out));
  int_matmul<int32_t>(p, av.data(), bv.data(), Y.data<int32_t>());
  out[0] = Y;
  return Status::ok();
}

Status eval_qlinear_matmul(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  const Tensor* t[8];
  for (size_t i = 0; i < 8; ++i) {
    if (i == 2 || i == 5 || i == 7) {
      t[i] = opt_tensor(in, i);
    } else {
      KILN_ASSIGN_OR_RETURN(t[i], req_tensor(ctx, in, i));
    }
  }
  const Tensor &A = *t[0], &B = *t[3];
  if (!q8(A.dtype()) || !q8(B.dtype()))
    return unsupported(ctx.node.where() + ": operands must be int8/uint8");
  const DataType yt = t[7] ? t[7]->dtype() : A.dtype();
  if (!q8(yt)) return unsupported(ctx.node.where() + ": output type " + dtype_name(yt));
  KILN_ASSIGN_OR_RETURN(MMPlan p, plan_matmul(ctx, A.shape(), B.shape()));
  KILN_ASSIGN_OR_RETURN(auto av, shift_q(ctx, A, t[2], 2));
  KILN_ASSIGN_OR_RETURN(auto bv, shift_q(ctx, B, t[5], 1));
  std::vector<int32_t> acc(static_cast<size_t>(p.batch * p.M * p.N));
  int_matmul<int32_t>(p, av.data(), bv.data(), acc.data());
  const Tensor &as = *t[1], &bs = *t[4], &ys = *t[6];
  if (as.numel() != 1 && as.numel() != p.M) return ctx.bad_input("a_scale size mismatch");
  if (bs.numel() != 1 && bs.numel() != p.N) return ctx.bad_input("b_scale size mismatch");
  if (ys.numel() != 1 || (t[7] && t[7]->numel() != 1) || as.numel() == 0 || bs.numel() == 0)
    return unsupported(ctx.node.where() + ": per-axis y_scale/y_zero_point");
  const float ysc = static_cast<float>(ys.get_f64(0));
  const int64_t yzp = t[7] ? t[7]->get_i64(0) : 0;
  KILN_ASSIGN_OR_RETURN(Tensor Y, Tensor::create(yt, p.out));
  const int64_t lo = yt == DataType::kUInt8 ? 0 : -128, hi = yt == DataType::kUInt8 ? 255 : 127;
  for (int64_t bi = 0; bi < p.batch; ++bi)
    for (int64_t i = 0; i < p.M; ++i)
      for (int64_t j = 0; j < p.N; ++j) {
        const int64_t idx = (bi * p.M + i) * p.N + j;
        const float s = static_cast<float>(as.get_f64(as.numel() == 1 ? 0 : i)) *
                        static_cast<float>(bs.get_f64(bs.numel() == 1 ? 0 : j)) / ysc;
        int64_t v = static_cast<int64_t>(std::nearbyint(static_cast<float>(acc[idx]) * s)) + yzp;
        v = std::min(std::max(v, lo), hi);
        if (yt == DataType::kUInt8)
          Y.data<uint8_t>()[idx] = static_cast<uint8_t>(v);
        else
          Y.data<int8_t>()[idx] = static_cast<int8_t>(v);
      }
  out[0] = Y;
  return Status::ok();
}

Status infer_mm_int(InferContext& ctx, DataType dt) {
  if (ctx.input_types.size() < 2 || ctx.output_types.empty()) return Status::ok();
  TypeInfo o = TypeInfo::tensor(dt);
  size_t bi = ctx.input_types.size() >= 4 && ctx.node.op_type == "QLinearMatMul" ? 3 : 1;
  if (infer_mm_dims(ctx.input_types[0], ctx.input_types[bi], &o.dims)) o.has_shape = true;
  ctx.output_types[0] = o;
  return Status::ok();
}
Status infer_matmul_integer(InferContext& ctx) {
  return infer_mm_int(ctx, DataType::kInt32);
}
Status infer_qlinear_matmul(InferContext& ctx) {
  DataType dt = ctx.input_types.size() > 7 && ctx.input_types[7].kind == TypeInfo::Kind::kTensor
                    ? ctx.input_types[7].dtype
                    : (ctx.input_types.empty() ? DataType::kUndefined : ctx.input_types[0].dtype);
  return infer_mm_int(ctx, dt);
}

}  // namespace

const OpDef kOp_MatMul = {"MatMul", "", &eval_matmul, &infer_matmul};
const OpDef kOp_Gemm = {"Gemm", "", &eval_gemm, &infer_gemm};
const OpDef kOp_MatMulInteger = {"MatMulInteger", "", &eval_matmul_integer, &infer_matmul_integer};
const OpDef kOp_QLinearMatMul = {"QLinearMatMul", "", &eval_qlinear_matmul, &infer_qlinear_matmul};

}  // namespace kiln
