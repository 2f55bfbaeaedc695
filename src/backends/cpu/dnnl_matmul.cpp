// oneDNN matmul (f32) for MatMul and Gemm. MatMul: A [..., M, K] x B [K, N] (batch folded into M)
// or A, B of one rank with equal batch dims (one batch dim after folding the leading ones). Gemm:
// transA/transB as strides, alpha as an output scale, a C that is [N] / [1, N] / scalar-free as the
// bias (beta = 1). Anything else runs the reference kernel.
#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/weight_pages.h"

#if KILN_WITH_DNNL
#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include <dnnl.hpp>

namespace kiln {
namespace cpu {

namespace {

using dnnl::memory;
using dt = dnnl::memory::data_type;

struct MmPlan {
  dnnl::matmul mm;
  memory packed_b;  // constant B reordered once into oneDNN's preferred layout
  bool has_packed_b = false;
  memory::desc a, b, c, bias, scratch;
  size_t scratch_bytes = 0;
};

// Shapes of one call, as the plan cache key.
struct MmKey {
  Shape a, b;
  bool operator<(const MmKey& o) const { return a != o.a ? a < o.a : b < o.b; }
};

class DnnlMatMul final : public Kernel {
 public:
  DnnlMatMul(bool gemm, bool ta, bool tb, float alpha, bool has_bias, EvalFn ref)
      : gemm_(gemm), ta_(ta), tb_(tb), alpha_(alpha), has_bias_(has_bias), ref_(ref) {}
  // kiln.FusedMatMul: bias (input 2) over the last axis, GELU, residual Z (input 3) as a sum.
  void set_fused(bool gelu, bool residual, Tensor b_const) {
    fused_ = true;
    gelu_ = gelu;
    residual_ = residual;
    b_const_ = std::move(b_const);
  }

  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* A = opt_tensor(in, 0);
    const Tensor* B = opt_tensor(in, 1);
    const Tensor* C = gemm_ || fused_ ? opt_tensor(in, 2) : nullptr;
    const Tensor* Z = residual_ ? opt_tensor(in, 3) : nullptr;
    if ((fused_ && has_bias_ && (!C || C->dtype() != DataType::kFloat)) ||
        (residual_ && (!Z || Z->dtype() != DataType::kFloat)))
      return ref_(ctx, in, out);
    if (!A || !B || A->dtype() != DataType::kFloat || B->dtype() != DataType::kFloat || A->numel() == 0 ||
        B->numel() == 0)
      return ref_(ctx, in, out);
    Shape ys;
    std::shared_ptr<const MmPlan> p;
    KILN_ASSIGN_OR_RETURN(p, plan_for(*A, *B, C, &ys));
    if (!p || (Z && Z->shape() != ys)) return ref_(ctx, in, out);
    // A residual Z handed over by the executor (it dies here, nothing else holds its storage):
    // the sum post-op accumulates into its buffer instead of a copy of it in a fresh Y.
    Tensor Y;
    if (Z && ((ctx.donatable >> 3) & 1) && Z->storage().use_count() == 1) {
      Y = *Z;
    } else {
      KILN_ASSIGN_OR_RETURN(Y, new_output(ys));
      if (Z) std::memcpy(Y.data<float>(), Z->data<float>(), Y.nbytes());
    }
    try {
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      memory ma(p->a, eng, const_cast<float*>(A->data<float>()));
      memory mb = p->has_packed_b ? p->packed_b : memory(p->b, eng, const_cast<float*>(B->data<float>()));
      memory mc(p->c, eng, Y.data<float>());
      uint8_t* scratch = scratch_buffer(p->scratch_bytes);
      if (!scratch && p->scratch_bytes) return ctx.fail("out of memory for the oneDNN scratchpad");
      std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, ma},
                                              {DNNL_ARG_WEIGHTS, mb},
                                              {DNNL_ARG_DST, mc},
                                              {DNNL_ARG_SCRATCHPAD, memory(p->scratch, eng, scratch)}};
      if (C) args[DNNL_ARG_BIAS] = memory(p->bias, eng, const_cast<float*>(C->data<float>()));
      p->mm.execute(s, args);
      s.wait();
    } catch (const dnnl::error& e) {
      return ctx.fail(std::string("oneDNN matmul failed: ") + e.what());
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  Result<std::shared_ptr<const MmPlan>> plan_for(const Tensor& A, const Tensor& B, const Tensor* C,
                                                 Shape* ys) const {
    std::shared_ptr<const MmPlan> none;
    const Shape &as = A.shape(), &bs = B.shape();
    memory::dims ad, bd, cd, astr, bstr;
    if (gemm_) {
      if (as.size() != 2 || bs.size() != 2) return none;
      const int64_t M = ta_ ? as[1] : as[0], K = ta_ ? as[0] : as[1];
      const int64_t Kb = tb_ ? bs[1] : bs[0], N = tb_ ? bs[0] : bs[1];
      if (K != Kb) return none;
      if (has_bias_) {
        if (!C || C->dtype() != DataType::kFloat || C->numel() != N) return none;
        if (!(C->rank() == 1 || (C->rank() == 2 && C->dim(0) == 1))) return none;
      }
      ad = {M, K};
      bd = {K, N};
      astr = ta_ ? memory::dims{1, M} : memory::dims{K, 1};
      bstr = tb_ ? memory::dims{1, K} : memory::dims{N, 1};
      cd = {M, N};
      *ys = {M, N};
    } else {
      if (as.size() < 2 || bs.size() < 2) return none;
      const int64_t K = as.back(), N = bs.back();
      if (bs[bs.size() - 2] != K) return none;
      int64_t batch = 1;
      for (size_t i = 0; i + 2 < as.size(); ++i) batch *= as[i];
      const int64_t M = as[as.size() - 2];
      if (bs.size() == 2) {  // fold A's batch into M
        ad = {batch * M, K};
        bd = {K, N};
        astr = {K, 1};
        bstr = {N, 1};
        cd = {batch * M, N};
      } else {
        if (as.size() != bs.size()) return none;
        for (size_t i = 0; i + 2 < as.size(); ++i)
          if (as[i] != bs[i]) return none;
        ad = {batch, M, K};
        bd = {batch, K, N};
        astr = {M * K, K, 1};
        bstr = {K * N, N, 1};
        cd = {batch, M, N};
      }
      *ys = Shape(as.begin(), as.end() - 1);
      ys->push_back(N);
      if (fused_ && has_bias_ && (!C || C->numel() != N)) return none;
    }
    std::lock_guard<std::mutex> lock(mu_);
    MmKey key{as, bs};
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    auto p = std::make_shared<MmPlan>();
    try {
      const dnnl::engine& eng = cpu_engine();
      memory::dims cstr(cd.size(), 1);
      for (size_t i = cd.size() - 1; i-- > 0;) cstr[i] = cstr[i + 1] * cd[i + 1];
      p->a = memory::desc(ad, dt::f32, astr);
      p->b = memory::desc(bd, dt::f32, bstr);
      p->c = memory::desc(cd, dt::f32, cstr);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      if (alpha_ != 1.f) attr.set_output_scales(0, {alpha_});
      std::unique_ptr<dnnl::matmul::desc> d;
      const bool pack = fused_ && b_const_.numel() > 0 && bd.size() == 2 && B.shape() == b_const_.shape();
      memory::desc b_use = pack ? memory::desc(bd, dt::f32, memory::format_tag::any) : p->b;
      if (fused_) {
        dnnl::post_ops po;
        if (gelu_) po.append_eltwise(1.f, dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f);
        if (residual_) po.append_sum(1.f);
        attr.set_post_ops(po);
      }
      if (has_bias_) {
        const int64_t N = cd.back();
        memory::dims bdims(cd.size(), 1), bstr(cd.size(), N);
        bdims.back() = N;
        bstr.back() = 1;
        p->bias = memory::desc(bdims, dt::f32, bstr);
        d = std::make_unique<dnnl::matmul::desc>(p->a, b_use, p->bias, p->c);
      } else {
        d = std::make_unique<dnnl::matmul::desc>(p->a, b_use, p->c);
      }
      dnnl::matmul::primitive_desc pd(*d, attr, eng);
      p->mm = dnnl::matmul(pd);
      if (pack) {
        memory user_b(p->b, eng, const_cast<float*>(b_const_.data<float>()));
        p->packed_b = memory(pd.weights_desc(), eng);
        dnnl::stream s(eng);
        dnnl::reorder(user_b, p->packed_b).execute(s, user_b, p->packed_b);
        s.wait();
        p->has_packed_b = true;
        // B is now read only from the packed copy (the reference fallback reads the original
        // again from the plan file if ever needed): drop the original's mmap'd pages.
        packed_weight_done(b_const_.raw_data(), b_const_.nbytes());
      }
      p->scratch = pd.scratchpad_desc();
      p->scratch_bytes = p->scratch.get_size();
    } catch (const dnnl::error&) {
      plans_[key] = none;
      return none;
    }
    std::shared_ptr<const MmPlan> cp = p;
    plans_[key] = cp;
    return cp;
  }

  bool gemm_, ta_, tb_;
  float alpha_;
  bool has_bias_;
  EvalFn ref_;
  bool fused_ = false, gelu_ = false, residual_ = false;
  Tensor b_const_;
  mutable std::mutex mu_;
  mutable std::map<MmKey, std::shared_ptr<const MmPlan>> plans_;
};

}  // namespace

Result<std::shared_ptr<const Kernel>> prepare_dnnl_matmul(const Node& n, const ConstantLookup& constants,
                                                          EvalFn ref) {
  std::shared_ptr<const Kernel> none;
  if (n.op_type == "FusedMatMul") {
    if (n.inputs.size() < 2 || n.inputs.size() > 4) return none;
    const std::string act = n.attr_string("activation", "");
    if (!act.empty() && act != "Gelu") return none;
    const Tensor* b = constants(n.inputs[1]);
    auto k = std::make_shared<DnnlMatMul>(false, false, false, 1.f, n.has_input(2), ref);
    k->set_fused(act == "Gelu", n.has_input(3),
                 b && b->dtype() == DataType::kFloat && b->rank() == 2 ? *b : Tensor());
    return std::shared_ptr<const Kernel>(k);
  }
  if (n.op_type == "MatMul") {
    if (n.inputs.size() != 2) return none;
    return std::shared_ptr<const Kernel>(std::make_shared<DnnlMatMul>(false, false, false, 1.f, false, ref));
  }
  if (n.op_type != "Gemm" || n.inputs.size() < 2 || n.inputs.size() > 3) return none;
  const bool has_c = n.has_input(2);
  if (has_c && n.attr_float("beta", 1.f) != 1.f) return none;
  // oneDNN's output scale would scale the bias too.
  if (has_c && n.attr_float("alpha", 1.f) != 1.f) return none;
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlMatMul>(
      true, n.attr_int("transA", 0) != 0, n.attr_int("transB", 0) != 0, n.attr_float("alpha", 1.f), has_c,
      ref));
}

}  // namespace cpu
}  // namespace kiln

#endif  // KILN_WITH_DNNL
