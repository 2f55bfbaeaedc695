// oneDNN matmul (f32) for MatMul and Gemm. MatMul: A [..., M, K] x B [K, N] (batch folded into M)
// or A, B of one rank with equal batch dims (one batch dim after folding the leading ones). Gemm:
// transA/transB as strides, alpha as an output scale, a C that is [N] / [1, N] / scalar-free as the
// bias (beta = 1). Anything else runs the reference kernel.
// Tactics (MatMul / kiln.FusedMatMul with a constant 2-D float B, on AVX-512 CPUs): Kiln's own
// GEMM (cpu_gemm.h, B packed into its panels) as "cpu.f32.matmul.kiln", or oneDNN as
// "cpu.f32.matmul.dnnl". With `kiln_tune_shape` and no `kiln_tactic`, prepare times both on
// that shape (round robin, best run of each; epilogue included; B flushed from the caches
// before each run, as weights that exceed the last-level cache are) and keeps the faster; with
// `kiln_tactic` it takes that one without timing (the kiln one loads as oneDNN where this CPU
// lacks AVX-512). Without either, oneDNN. KILN_CPU_GEMM=0: no kiln candidate, and kiln tactics
// load as oneDNN (A/B on one plan).
// Strassen's one-level form of Kiln's GEMM (gemm_strassen: seven half-size products instead of
// eight, B's seven operand blocks packed, 1.75x its floats) is a fourth candidate for the big
// ones, "cpu.f32.matmul.kiln_strassen"; KILN_CPU_STRASSEN=0: no such candidate, and its tactic
// loads as oneDNN.
// OpenBLAS (Debian's OpenMP build, when found at configure time: KILN_WITH_OPENBLAS) is a third
// candidate for the same MatMuls, "cpu.f32.matmul.openblas": cblas_sgemm on the constant B as
// the node has it, then the epilogue (bias, GELU by oneDNN's eltwise, residual). Where oneDNN's
// AVX2 matmul is slow (oneDNN 2.6 has no AVX2 brgemm: B repacked at every call) it can win:
// AVX2 EPYC, 2 threads, 128x768x3072 9.6 ms vs oneDNN's 11.4 ms. KILN_CPU_OPENBLAS=0: no such
// candidate, and its tactic loads as oneDNN.
#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/cpu_parallel.h"
#include "backends/cpu/weight_pages.h"

#if KILN_WITH_DNNL
#include <malloc.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <unordered_map>

#include <dnnl.hpp>
#if KILN_WITH_OPENBLAS
#include <cblas.h>
#endif

#include "base/logging.h"

namespace kiln {
namespace cpu {

namespace {

using dnnl::memory;
using dt = dnnl::memory::data_type;

constexpr const char kKilnTactic[] = "cpu.f32.matmul.kiln";
constexpr const char kStrassenTactic[] = "cpu.f32.matmul.kiln_strassen";
constexpr const char kDnnlTactic[] = "cpu.f32.matmul.dnnl";
constexpr const char kBlasTactic[] = "cpu.f32.matmul.openblas";

bool openblas_enabled() {
#if KILN_WITH_OPENBLAS
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_OPENBLAS");
    return !(e && e[0] == '0' && e[1] == 0);
  }();
  return on;
#else
  return false;
#endif
}

// GELU (erf form) in place over n floats, by oneDNN's eltwise primitive (one per size, kept).
bool gelu_in_place(float* y, int64_t n) {
  static std::mutex mu;
  static std::map<int64_t, std::shared_ptr<dnnl::eltwise_forward>> prims;
  std::shared_ptr<dnnl::eltwise_forward> prim;
  const memory::desc md({n}, dt::f32, memory::format_tag::a);
  try {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto& slot = prims[n];
      if (!slot) {
        dnnl::eltwise_forward::desc d(dnnl::prop_kind::forward_inference, dnnl::algorithm::eltwise_gelu_erf, md, 0.f,
                                      0.f);
        slot = std::make_shared<dnnl::eltwise_forward>(dnnl::eltwise_forward::primitive_desc(d, cpu_engine()));
      }
      prim = slot;
    }
    dnnl::stream s(cpu_engine());
    memory m(md, cpu_engine(), y);
    prim->execute(s, {{DNNL_ARG_SRC, m}, {DNNL_ARG_DST, m}});
    s.wait();
  } catch (const dnnl::error&) {
    return false;
  }
  return true;
}

bool kiln_gemm_enabled() {
  const char* e = std::getenv("KILN_CPU_GEMM");
  return gemm_available() && !(e && e[0] == '0' && e[1] == 0);
}

// KILN_CPU_STRASSEN=0: no Strassen candidate, and its tactic loads as oneDNN (A/B runs).
bool strassen_enabled() {
  const char* e = std::getenv("KILN_CPU_STRASSEN");
  return kiln_gemm_enabled() && gemm_strassen_available() && !(e && e[0] == '0' && e[1] == 0);
}

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
    b_user_ = b_const_;
  }
  // MatMul with a constant 2-D B: the kiln tactic may pack it (oneDNN takes B per call).
  void set_const_b(Tensor b_const) {
    b_const_ = std::move(b_const);
    b_user_ = b_const_;
  }
  // Gemm (no transA, alpha 1) with a constant 2-D B: b_kn is B as [K, N] (transposed when
  // transB), b the input itself.
  void set_gemm_const_b(Tensor b_kn, Tensor b) {
    b_const_ = std::move(b_kn);
    b_user_ = std::move(b);
    gemm_kiln_ = true;
  }
  // Once the kiln GEMM has B in its panels, a Gemm's transposed copy of B goes (the dims stay).
  void drop_gemm_copy() {
    if (!gemm_kiln_ || b_const_.rank() != 2) return;
    kk_ = b_const_.dim(0), kn_ = b_const_.dim(1);
    b_const_ = Tensor();
  }
  int64_t kiln_k() const { return b_const_.rank() == 2 ? b_const_.dim(0) : kk_; }
  int64_t kiln_n() const { return b_const_.rank() == 2 ? b_const_.dim(1) : kn_; }

  std::string tactic() const override { return tactic_; }

  // A kiln_tactic attribute: the kiln GEMM when it names it and this CPU runs it (B packed now).
  void apply_tactic(const std::string& t) {
    if (t == kStrassenTactic && strassen_possible()) {
      if (pack_strassen()) {
        tactic_ = t;
        packed_weight_done(b_user_.raw_data(), b_user_.nbytes());
        drop_gemm_copy();
        return;
      }
    }
    if (t == kKilnTactic && kiln_possible()) {
      if (pack_kiln()) {
        tactic_ = t;
        packed_weight_done(b_user_.raw_data(), b_user_.nbytes());
        drop_gemm_copy();
        return;
      }
    }
    if (t == kBlasTactic && blas_possible()) {
      tactic_ = t;
      return;
    }
    if (t == kKilnTactic || t == kDnnlTactic || t == kBlasTactic || t == kStrassenTactic)
      tactic_ = kDnnlTactic;
    if (gemm_kiln_) b_const_ = Tensor();  // Gemm's transposed copy: oneDNN reads B itself
  }

  // Times oneDNN and the kiln GEMM for A of shape `as` and keeps the faster (see the top).
  void tune(const Node& n, const Shape& as) {
    const bool blas = blas_possible();
    bool kiln = kiln_possible();
    if ((!kiln && !blas) || as.size() < 2 || as.back() != b_const_.dim(0)) return;
    int64_t M = 1;
    for (size_t i = 0; i + 1 < as.size(); ++i) M *= as[i];
    const int64_t K = b_const_.dim(0), N = b_const_.dim(1);
    if (M < 1 || M > (int64_t(1) << 20)) return;
    if (kiln && !pack_kiln()) {
      if (!blas) return;
      kiln = false;
    }
    // Strassen's form holds 1.75x B's floats: a candidate only for big GEMMs, where its halves
    // are whole micro-kernel work. BERT-base on a 2-core Zen 4: its FFN GEMMs (768 x 3072) ran
    // 5-8% faster this way; its 768 x 768 ones 4-6% alone but within the noise of build-time
    // timing, and with all 72 GEMMs in this form BERT's peak RSS was 655 MB (ORT's: 597), with
    // the 24 FFN ones 535 MB: the 768 x 768 ones stay off.
    bool strassen = kiln && strassen_possible() && M >= 32 && K >= 128 && N >= 192 &&
                    K * N >= (int64_t(1) << 21);
    if (strassen && !pack_strassen()) strassen = false;
    auto rnd = [](const Shape& s, uint32_t seed) -> Result<Tensor> {
      KILN_ASSIGN_OR_RETURN(Tensor t, new_output(s));
      std::mt19937 rng(seed);
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      float* p = t.data<float>();
      for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(rng);
      return t;
    };
    Shape ys(as.begin(), as.end() - 1);
    ys.push_back(N);
    auto A = rnd(as, 1);
    auto C = rnd(Shape{N}, 2);
    auto Y = rnd(ys, 3);  // the residual too: both accumulate into it, as with a donated Z
    if (!A.is_ok() || !C.is_ok() || !Y.is_ok()) return drop_kiln();
    const Tensor* Cp = has_bias_ ? &C.value() : nullptr;
    Shape dys;
    auto pr = plan_for(A.value(), b_user_, Cp, &dys);
    std::shared_ptr<const MmPlan> p = pr.is_ok() ? pr.value() : nullptr;
    using clock = std::chrono::steady_clock;
    // With GELU the kiln GEMM cannot sum into the residual's buffer: a separate output.
    Tensor Yk = Y.value();
    if (residual_ && gelu_) {
      auto t = new_output(ys);
      if (!t.is_ok()) return drop_kiln();
      Yk = std::move(t).value();
    }
    // Each run reads its B from memory (see evict_from_cache): BERT-size weights do.
    auto time_dnnl = [&]() -> double {
      try {
        if (p->has_packed_b)
          evict_from_cache(p->packed_b.get_data_handle(), p->packed_b.get_desc().get_size());
        else
          evict_from_cache(b_user_.raw_data(), b_user_.nbytes());
      } catch (const dnnl::error&) {
        return -1;
      }
      auto t0 = clock::now();
      try {
        if (!execute_dnnl(*p, A.value(), b_user_, Cp, Y.value())) return -1;
      } catch (const dnnl::error&) {
        return -1;
      }
      return std::chrono::duration<double>(clock::now() - t0).count();
    };
    auto time_kiln = [&]() -> double {
      if (!kiln) return -1;
      evict_from_cache(kb_, static_cast<size_t>(gemm_packed_floats(K, N)) * 4);
      auto t0 = clock::now();
      execute_kiln(M, A.value(), Cp, residual_ ? &Y.value() : nullptr, Yk);
      return std::chrono::duration<double>(clock::now() - t0).count();
    };
    auto time_strassen = [&]() -> double {
      if (!strassen) return -1;
      evict_from_cache(sb_, static_cast<size_t>(gemm_strassen_packed_floats(K, N)) * 4);
      auto t0 = clock::now();
      execute_strassen(M, A.value(), Cp, residual_ ? &Y.value() : nullptr, Yk);
      return std::chrono::duration<double>(clock::now() - t0).count();
    };
    auto time_blas = [&]() -> double {
      if (!blas) return -1;
      evict_from_cache(b_const_.raw_data(), b_const_.nbytes());
      auto t0 = clock::now();
      if (!execute_blas(M, A.value(), Cp, residual_ ? &Y.value() : nullptr, Yk)) return -1;
      return std::chrono::duration<double>(clock::now() - t0).count();
    };
    double bd = -1, bk = -1, bb = -1, bs = -1, total = 0;
    auto keep = [](double& best, double t) {
      if (t >= 0 && (best < 0 || t < best)) best = t;
    };
    if (p && dys == ys) {
      time_dnnl();  // warm-up (first touch, caches)
      time_kiln();
      time_strassen();
      time_blas();
      // Round robin, best run of each: a burst of load on a shared machine hits all alike.
      // At least 3 rounds, up to 12 while the total stays under 40 ms.
      for (int round = 0; round < 12; ++round) {
        const double d = time_dnnl(), k = time_kiln(), st = time_strassen(), b = time_blas();
        if (d < 0) {
          bd = -1;
          break;
        }
        keep(bd, d);
        keep(bk, k);
        keep(bs, st);
        keep(bb, b);
        total += d + std::max(k, 0.0) + std::max(st, 0.0) + std::max(b, 0.0);
        if (round >= 2 && total > 0.04) break;
      }
    }
    if (bd < 0) {  // oneDNN cannot run this shape: the others alone
      time_kiln();
      time_strassen();
      time_blas();
      for (int round = 0; round < 3; ++round) {
        keep(bk, time_kiln());
        keep(bs, time_strassen());
        keep(bb, time_blas());
      }
    }
    // The fastest. Strassen's form only where strictly so; the others as before (kiln over
    // OpenBLAS on a tie, oneDNN over either).
    auto beats = [](double a, double b) { return a >= 0 && (b < 0 || a < b); };
    const bool use_strassen = beats(bs, bk) && beats(bs, bd) && beats(bs, bb);
    const bool use_kiln = !use_strassen && bk >= 0 && (bs < 0 || bk <= bs) && beats(bk, bd) &&
                          (bb < 0 || bk <= bb);
    const bool use_blas = !use_kiln && !use_strassen && bb >= 0 && (bd < 0 || bb < bd);
    auto ms = [](double t) { return t < 0 ? std::string("unavailable") : std::to_string(t * 1e3) + "ms"; };
    KILN_LOG(kVerbose, "node '" << n.name << "': matmul M=" << M << " K=" << K << " N=" << N << ": oneDNN "
                                << ms(bd) << ", kiln " << ms(bk) << ", Strassen " << ms(bs)
                                << ", OpenBLAS " << ms(bb) << " -> "
                                << (use_kiln       ? "kiln"
                                    : use_strassen ? "Strassen"
                                    : use_blas     ? "OpenBLAS"
                                                   : "oneDNN"));
    if (!use_strassen) drop_strassen();
    if (use_blas) {
      tactic_ = kBlasTactic;
      drop_kiln();
      std::lock_guard<std::mutex> lock(mu_);
      plans_.clear();  // oneDNN's packed copy of B is not needed
      return;
    }
    if (use_kiln || use_strassen) {
      tactic_ = use_kiln ? kKilnTactic : kStrassenTactic;
      if (use_strassen) drop_plain();
      packed_weight_done(b_user_.raw_data(), b_user_.nbytes());
      drop_gemm_copy();
      std::lock_guard<std::mutex> lock(mu_);
      plans_.clear();  // oneDNN's packed copy of B is not needed
    } else {
      tactic_ = kDnnlTactic;
      drop_kiln();
      if (gemm_kiln_) b_const_ = Tensor();  // Gemm's transposed copy: oneDNN reads B itself
    }
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
    if (tactic_ == kKilnTactic || tactic_ == kBlasTactic || tactic_ == kStrassenTactic) {
      bool done = false;
      KILN_RETURN_IF_ERROR(run_kiln(ctx, *A, *B, C, Z, out, &done));
      if (done) return Status::ok();
    }
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
      if (!execute_dnnl(*p, *A, *B, C, Y))
        return ctx.fail("out of memory for the oneDNN scratchpad");
    } catch (const dnnl::error& e) {
      return ctx.fail(std::string("oneDNN matmul failed: ") + e.what());
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  // One oneDNN run into Y (holding Z already when there is a residual). False: no scratchpad
  // memory. Throws dnnl::error.
  bool execute_dnnl(const MmPlan& pl, const Tensor& A, const Tensor& B, const Tensor* C,
                    Tensor& Y) const {
    const MmPlan* p = &pl;
    const dnnl::engine& eng = cpu_engine();
    dnnl::stream s(eng);
    memory ma(p->a, eng, const_cast<float*>(A.data<float>()));
    memory mb =
        p->has_packed_b ? p->packed_b : memory(p->b, eng, const_cast<float*>(B.data<float>()));
    memory mc(p->c, eng, Y.data<float>());
    uint8_t* scratch = scratch_buffer(p->scratch_bytes);
    if (!scratch && p->scratch_bytes) return false;
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, ma},
        {DNNL_ARG_WEIGHTS, mb},
        {DNNL_ARG_DST, mc},
        {DNNL_ARG_SCRATCHPAD, memory(p->scratch, eng, scratch)}};
    if (C) args[DNNL_ARG_BIAS] = memory(p->bias, eng, const_cast<float*>(C->data<float>()));
    p->mm.execute(s, args);
    s.wait();
    return true;
  }

  // The kiln GEMM applies: MatMul / FusedMatMul with a constant 2-D float B, or Gemm with one
  // (set_gemm_const_b), on AVX-512.
  bool kiln_possible() const {
    return (!gemm_ || gemm_kiln_) && kiln_gemm_enabled() && b_const_.dtype() == DataType::kFloat &&
           b_const_.rank() == 2 && b_const_.numel() > 0;
  }
  // Packs B for the kiln GEMM. From 2 MB up, the copy starts on a 2 MB boundary (the slack
  // before it is never touched) and its whole 2 MB pages are advised huge: B streams from
  // memory at every run, and huge pages spare the TLB misses (~3% of the GEMM's time).
  bool pack_kiln() {
    if (kpacked_.numel() > 0) return true;
    const int64_t K = b_const_.dim(0), N = b_const_.dim(1);
    kb_ = weight_buffer(gemm_packed_floats(K, N), &kpacked_);
    if (!kb_) return false;
    gemm_pack_b(b_const_.data<float>(), K, N, kb_);
    return true;
  }
  // B's seven Strassen operands for gemm_strassen, in the same kind of buffer.
  bool pack_strassen() {
    if (spacked_.numel() > 0) return true;
    const int64_t K = b_const_.dim(0), N = b_const_.dim(1);
    sb_ = weight_buffer(gemm_strassen_packed_floats(K, N), &spacked_);
    if (!sb_) return false;
    gemm_strassen_pack_b(b_const_.data<float>(), K, N, sb_);
    return true;
  }
  // n floats in a new tensor *holder; from 2 MB up, they start on a 2 MB boundary (the slack
  // before is never touched) and their whole 2 MB pages are advised huge. Null: out of memory.
  static float* weight_buffer(int64_t n, Tensor* holder) {
    constexpr int64_t kHuge = int64_t(2) << 20;
    const bool huge = n * 4 >= kHuge && huge_pages_enabled();
    auto t = new_output(Shape{huge ? n + kHuge / 4 : n});
    if (!t.is_ok()) return nullptr;
    float* p = t.value().data<float>();
    if (huge) {
      const uintptr_t a = reinterpret_cast<uintptr_t>(p);
      p = reinterpret_cast<float*>((a + kHuge - 1) / kHuge * kHuge);
      advise_huge_pages(p, static_cast<size_t>(n) * 4);
    }
    *holder = std::move(t).value();
    return p;
  }

  // Both packed forms of B / one of them.
  void drop_kiln() {
    drop_plain();
    drop_strassen();
  }
  void drop_plain() {
    kpacked_ = Tensor();
    kb_ = nullptr;
  }
  void drop_strassen() {
    spacked_ = Tensor();
    sb_ = nullptr;
  }

  // Strassen's form applies where the kiln GEMM does, on AVX-512, with B's half depth <= 2048.
  bool strassen_possible() const {
    return kiln_possible() && strassen_enabled() && (b_const_.dim(0) + 1) / 2 <= 2048;
  }

  // Y = epilogue(A (M rows) x packed B); Z may be Y itself (a donated residual) unless GELU.
  void execute_kiln(int64_t M, const Tensor& A, const Tensor* C, const Tensor* Z, Tensor& Y) const {
    GemmEpilogue ep;
    ep.bias = C ? C->data<float>() : nullptr;
    ep.gelu = gelu_;
    ep.residual = Z ? Z->data<float>() : nullptr;
    gemm_packed(M, kiln_n(), kiln_k(), A.data<float>(), kiln_k(), kb_,
                Y.data<float>(), ep, omp_threads());
  }

  void execute_strassen(int64_t M, const Tensor& A, const Tensor* C, const Tensor* Z,
                        Tensor& Y) const {
    GemmEpilogue ep;
    ep.bias = C ? C->data<float>() : nullptr;
    ep.gelu = gelu_;
    ep.residual = Z ? Z->data<float>() : nullptr;
    gemm_strassen(M, kiln_n(), kiln_k(), A.data<float>(), kiln_k(), sb_, Y.data<float>(), ep,
                  omp_threads());
  }

  // The kiln tactic's run; *done false: the inputs are not its form (oneDNN or the reference
  // takes them).
  Status run_kiln(OpContext& ctx, const Tensor& A, const Tensor& B, const Tensor* C,
                  const Tensor* Z, std::span<Value> out, bool* done) const {
    *done = false;
    const bool blas = tactic_ == kBlasTactic;
    const bool strassen = tactic_ == kStrassenTactic;
    if (!blas && (strassen ? spacked_.numel() : kpacked_.numel()) == 0) return Status::ok();
    const int64_t K = kiln_k(), N = kiln_n();
    if (A.rank() < 2 || A.shape().back() != K ||
        B.shape() != b_user_.shape() || (gemm_ && A.rank() != 2))
      return Status::ok();
    if (C && (C->dtype() != DataType::kFloat || C->numel() != N)) return Status::ok();
    // Gemm's C as a bias: [N] or [1, N] (a [M, N] C with M = 1 is the same).
    if (gemm_ && C && !(C->rank() == 1 || (C->rank() == 2 && C->dim(0) == 1)))
      return Status::ok();
    const int64_t M = A.numel() / K;
    Shape ys(A.shape().begin(), A.shape().end() - 1);
    ys.push_back(N);
    if (Z && (Z->dtype() != DataType::kFloat || Z->shape() != ys)) return Status::ok();
    Tensor Y;
    if (Z && !gelu_ && ((ctx.donatable >> 3) & 1) && Z->storage().use_count() == 1) {
      Y = *Z;  // a donated residual: the sum happens in its buffer
    } else {
      KILN_ASSIGN_OR_RETURN(Y, new_output(ys));
    }
    if (blas) {
      if (!execute_blas(M, A, C, Z, Y)) return ctx.fail("OpenBLAS matmul: oneDNN's GELU failed");
    } else if (strassen) {
      execute_strassen(M, A, C, Z, Y);
    } else {
      execute_kiln(M, A, C, Z, Y);
    }
    out[0] = Value(std::move(Y));
    *done = true;
    return Status::ok();
  }

  // The OpenBLAS tactic applies: MatMul / FusedMatMul (not Gemm) with a constant 2-D float B.
  bool blas_possible() const {
    return !gemm_ && openblas_enabled() && b_const_.dtype() == DataType::kFloat && b_const_.rank() == 2 &&
           b_const_.numel() > 0;
  }

  // Y = epilogue(A (M rows) x B) by OpenBLAS: gelu(A B + bias) + Z, Z possibly Y itself (a
  // donated residual) unless GELU. False: the GELU primitive failed.
  bool execute_blas(int64_t M, const Tensor& A, const Tensor* C, const Tensor* Z, Tensor& Y) const {
#if KILN_WITH_OPENBLAS
    const int64_t K = b_const_.dim(0), N = b_const_.dim(1);
    float* y = Y.data<float>();
    const bool sum_in_gemm = Z && !gelu_;
    if (sum_in_gemm && Z->data<float>() != y) std::memcpy(y, Z->data<float>(), Y.nbytes());
    openblas_set_num_threads(omp_threads());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(M), static_cast<blasint>(N),
                static_cast<blasint>(K), 1.f, A.data<float>(), static_cast<blasint>(K), b_const_.data<float>(),
                static_cast<blasint>(N), sum_in_gemm ? 1.f : 0.f, y, static_cast<blasint>(N));
    if (C) {
      const float* bias = C->data<float>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < N; ++j) y[m * N + j] += bias[j];
    }
    if (gelu_ && !gelu_in_place(y, M * N)) return false;
    if (Z && gelu_) {
      const float* z = Z->data<float>();
      for (int64_t i = 0; i < M * N; ++i) y[i] += z[i];
    }
    return true;
#else
    (void)M, (void)A, (void)C, (void)Z, (void)Y;
    return false;
#endif
  }

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
  Tensor b_const_;              // constant B as [K, N] (the kiln GEMM's operand)
  Tensor b_user_;               // the constant B input as the node has it (oneDNN's operand)
  bool gemm_kiln_ = false;      // a Gemm the kiln GEMM may run (set_gemm_const_b)
  int64_t kk_ = 0, kn_ = 0;     // B's [K, N] once a Gemm's copy is dropped
  Tensor kpacked_;             // holds B in the kiln GEMM's panels (kiln tactic only)
  float* kb_ = nullptr;        // where in kpacked_ they start
  Tensor spacked_;             // B's Strassen operands (the Strassen tactic only)
  float* sb_ = nullptr;        // where in spacked_ they start
  std::string tactic_;         // what tactic() reports; kKilnTactic runs the kiln GEMM
  mutable std::mutex mu_;
  mutable std::map<MmKey, std::shared_ptr<const MmPlan>> plans_;
};

// kiln_tactic given: that one; else kiln_tune_shape: timed (see the top); else oneDNN.
void choose_tactic(DnnlMatMul& k, const Node& n) {
  if (n.has_attr("kiln_tactic")) {
    k.apply_tactic(n.attr_string("kiln_tactic"));
    return;
  }
  if (!n.has_attr("kiln_tune_shape")) return;
  std::vector<int64_t> ts = n.attr_ints("kiln_tune_shape");
  bool ok = ts.size() >= 2;
  for (int64_t d : ts) ok = ok && d > 0 && d <= (int64_t(1) << 24);
  if (ok) k.tune(n, Shape(ts.begin(), ts.end()));
}

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
    choose_tactic(*k, n);
    return std::shared_ptr<const Kernel>(k);
  }
  if (n.op_type == "MatMul") {
    if (n.inputs.size() != 2) return none;
    const Tensor* b = constants(n.inputs[1]);
    auto k = std::make_shared<DnnlMatMul>(false, false, false, 1.f, false, ref);
    if (b && b->dtype() == DataType::kFloat && b->rank() == 2) k->set_const_b(*b);
    choose_tactic(*k, n);
    return std::shared_ptr<const Kernel>(k);
  }
  if (n.op_type != "Gemm" || n.inputs.size() < 2 || n.inputs.size() > 3) return none;
  const bool has_c = n.has_input(2);
  if (has_c && n.attr_float("beta", 1.f) != 1.f) return none;
  // oneDNN's output scale would scale the bias too.
  if (has_c && n.attr_float("alpha", 1.f) != 1.f) return none;
  const bool ta = n.attr_int("transA", 0) != 0, tb = n.attr_int("transB", 0) != 0;
  const float alpha = n.attr_float("alpha", 1.f);
  auto k = std::make_shared<DnnlMatMul>(true, ta, tb, alpha, has_c, ref);
  // A constant B (a classifier's weights), no transA, alpha 1: the kiln GEMM is a candidate
  // too, on B as [K, N] (transposed once here when transB).
  const Tensor* b = constants(n.inputs[1]);
  const std::string t = n.attr_string("kiln_tactic");
  if (!ta && alpha == 1.f && b && b->dtype() == DataType::kFloat && b->rank() == 2 &&
      b->numel() > 0 && kiln_gemm_enabled() && t != kDnnlTactic) {
    Tensor bkn = *b;
    if (tb) {
      const int64_t N = b->dim(0), K = b->dim(1);
      auto t = Tensor::create_uninitialized(DataType::kFloat, Shape{K, N});
      if (!t.is_ok()) return none;
      bkn = std::move(t).value();
      const float* src = b->data<float>();
      float* dst = bkn.data<float>();
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < K; ++j) dst[j * N + i] = src[i * K + j];
    }
    k->set_gemm_const_b(std::move(bkn), *b);
  }
  choose_tactic(*k, n);
  return std::shared_ptr<const Kernel>(k);
}

}  // namespace cpu
}  // namespace kiln

#endif  // KILN_WITH_DNNL
