#include <dlfcn.h>

#include <atomic>
#include <string>
#include <vector>

#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/weight_pages.h"
#include "ops/fused/fused.h"
#include "runtime/backend.h"

namespace kiln {

namespace {
constexpr const char kRefPrefix[] = "cpu.ref.";
constexpr const char kConvDnnl[] = "cpu.f32.conv.dnnl";
constexpr const char kTransposeDnnl[] = "cpu.f32.transpose.dnnl";
constexpr const char kSoftmaxDnnl[] = "cpu.f32.softmax.dnnl";
constexpr const char kLayerNormDnnl[] = "cpu.f32.layernorm.dnnl";
constexpr const char kMaxPoolDnnl[] = "cpu.f32.maxpool.dnnl";
constexpr const char kGapDnnl[] = "cpu.f32.globalavgpool.dnnl";
constexpr const char kPoolNhwcDnnl[] = "cpu.f32.poolnhwc.dnnl";
constexpr const char kMatMulDnnl[] = "cpu.f32.matmul.dnnl";
constexpr const char kGemmDnnl[] = "cpu.f32.gemm.dnnl";
constexpr const char kAttention[] = "cpu.f32.attention.fused";
// kiln.FusedConv in mbconv block form (fused::is_mbconv_block; cpu_mbconv.h).
constexpr const char kMbConv[] = "cpu.f32.mbconv";

// Tactics with a reference fallback resolve to the op's reference kernel: a prepared kernel runs
// instead when prepare() made one; otherwise (non-constant weights, a build without oneDNN) the
// reference does, so a plan naming the tactic always runs.
Status eval_conv_family(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (ctx.node.op_type == "FusedConv") return kOp_kiln_FusedConv.eval(ctx, in, out);
  return kOp_Conv.eval(ctx, in, out);
}

Status eval_matmul_family(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  if (ctx.node.op_type == "FusedMatMul") return kOp_kiln_FusedMatMul.eval(ctx, in, out);
  return kOp_MatMul.eval(ctx, in, out);
}

[[maybe_unused]] bool is_conv_family(const Node& n) {
  return (n.domain.empty() && n.op_type == "Conv") || (n.domain == "kiln" && n.op_type == "FusedConv");
}

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  std::string choose_kernel(const Node& n) const override {
    const OpDef* d = find_op(n.domain, n.op_type);
    if (!d) return "";
    if (n.domain.empty() && n.op_type == "Attention") return kAttention;
#if KILN_WITH_DNNL
    if (fused::is_mbconv_block(n)) return kMbConv;
    if (is_conv_family(n)) return kConvDnnl;
    if ((n.domain.empty() && n.op_type == "MatMul") || (n.domain == "kiln" && n.op_type == "FusedMatMul"))
      return kMatMulDnnl;
    if (n.domain.empty() && n.op_type == "Gemm") return kGemmDnnl;
    if (n.domain.empty() && n.op_type == "Transpose" && n.attr_ints("perm").size() >= 2) return kTransposeDnnl;
    if (n.domain.empty() && n.op_type == "Softmax") return kSoftmaxDnnl;
    if (n.domain.empty() && n.op_type == "MaxPool") return kMaxPoolDnnl;
    if (n.domain.empty() && (n.op_type == "Add" || n.op_type == "Sub" || n.op_type == "Mul" || n.op_type == "Div"))
      return "cpu.f32.binary.dnnl." + n.op_type;
    if (n.domain.empty() && n.op_type == "GlobalAveragePool") return kGapDnnl;
    if (n.domain == "kiln" && n.op_type == "PoolNHWC") return kPoolNhwcDnnl;
    if (n.domain.empty() && n.op_type == "LayerNormalization") return kLayerNormDnnl;
#endif
    return std::string(kRefPrefix) + (n.domain.empty() ? "" : n.domain + ":") + n.op_type;
  }
  EvalFn resolve(const std::string& kernel) const override {
    if (kernel == kConvDnnl || kernel == kMbConv) return &eval_conv_family;
    if (kernel == kTransposeDnnl) return kOp_Transpose.eval;
    if (kernel == kSoftmaxDnnl) return kOp_Softmax.eval;
    if (kernel == kMaxPoolDnnl) return kOp_MaxPool.eval;
    if (kernel == "cpu.f32.binary.dnnl.Add") return kOp_Add.eval;
    if (kernel == "cpu.f32.binary.dnnl.Sub") return kOp_Sub.eval;
    if (kernel == "cpu.f32.binary.dnnl.Mul") return kOp_Mul.eval;
    if (kernel == "cpu.f32.binary.dnnl.Div") return kOp_Div.eval;
    if (kernel == kGapDnnl) return kOp_GlobalAveragePool.eval;
    if (kernel == kPoolNhwcDnnl) return kOp_kiln_PoolNHWC.eval;
    if (kernel == kLayerNormDnnl) return kOp_LayerNormalization.eval;
    if (kernel == kMatMulDnnl) return &eval_matmul_family;
    if (kernel == kGemmDnnl) return kOp_Gemm.eval;
    if (kernel == kAttention) return kOp_Attention.eval;
    if (kernel.rfind(kRefPrefix, 0) != 0) return nullptr;
    std::string rest = kernel.substr(sizeof(kRefPrefix) - 1);
    std::string domain, op = rest;
    auto colon = rest.find(':');
    if (colon != std::string::npos) {
      domain = rest.substr(0, colon);
      op = rest.substr(colon + 1);
    }
    const OpDef* d = find_op(domain, op);
    return d ? d->eval : nullptr;
  }
  Result<std::shared_ptr<const Kernel>> prepare(const std::string& kernel, const Node& n,
                                                const ConstantLookup& constants) const override {
    if (kernel == kAttention && n.domain.empty() && n.op_type == "Attention")
      return cpu::prepare_cpu_attention(n, kOp_Attention.eval);
#if KILN_WITH_DNNL
    if (kernel == kMbConv && fused::is_mbconv_block(n))
      return cpu::prepare_cpu_mbconv(n, constants, &eval_conv_family);
    if (kernel == kConvDnnl && is_conv_family(n))
      return cpu::prepare_dnnl_conv(n, constants, &eval_conv_family);
    if (kernel == kMatMulDnnl && (n.op_type == "MatMul" || n.op_type == "FusedMatMul"))
      return cpu::prepare_dnnl_matmul(n, constants, &eval_matmul_family);
    if (kernel == kGemmDnnl && n.op_type == "Gemm") return cpu::prepare_dnnl_matmul(n, constants, kOp_Gemm.eval);
    if (kernel == kLayerNormDnnl && n.op_type == "LayerNormalization")
      return cpu::prepare_dnnl_layernorm(n, kOp_LayerNormalization.eval);
    if (kernel == "cpu.f32.binary.dnnl." + n.op_type) return cpu::prepare_dnnl_binary(n, resolve(kernel));
    if (kernel == kMaxPoolDnnl && n.op_type == "MaxPool") return cpu::prepare_dnnl_pool(n, kOp_MaxPool.eval);
    if (kernel == kGapDnnl && n.op_type == "GlobalAveragePool")
      return cpu::prepare_dnnl_pool(n, kOp_GlobalAveragePool.eval);
    if (kernel == kPoolNhwcDnnl && n.domain == "kiln" && n.op_type == "PoolNHWC")
      return cpu::prepare_dnnl_pool(n, kOp_kiln_PoolNHWC.eval);
    if (kernel == kSoftmaxDnnl && n.op_type == "Softmax") return cpu::prepare_dnnl_softmax(n, kOp_Softmax.eval);
    if (kernel == kTransposeDnnl && n.op_type == "Transpose")
      return cpu::prepare_dnnl_transpose(n, kOp_Transpose.eval);
#endif
    (void)kernel; (void)n; (void)constants;
    return std::shared_ptr<const Kernel>();
  }
};
}  // namespace

namespace cpu {
namespace {
std::atomic<WeightPagesHook> g_weight_pages_hook{nullptr};
}  // namespace

void set_weight_pages_hook(WeightPagesHook hook) { g_weight_pages_hook.store(hook); }

size_t packed_weight_done(const void* data, size_t bytes) {
  WeightPagesHook h = g_weight_pages_hook.load();
  return h ? h(data, bytes) : 0;
}
}  // namespace cpu

Status set_cpu_threads(int threads) {
  if (threads < 1) return invalid_argument("the thread count must be at least 1");
  // The OpenMP runtime oneDNN runs on, looked up rather than linked so that builds without
  // OpenMP (sanitizer builds, no oneDNN) need nothing.
  using SetFn = void (*)(int);
  if (auto fn = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"))) fn(threads);
  return Status::ok();
}

const Backend& cpu_backend() {
  static const CpuBackend b;
  return b;
}

}  // namespace kiln
