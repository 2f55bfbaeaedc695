// Conv and kiln.FusedConv on cuDNN's legacy convolution API (cuDNN 9).
//
// Covered:
// - ONNX Conv (X, W, B?) and kiln.FusedConv (X, W, B?, Z?; activation "", Relu, Clip,
//   LeakyRelu; layout NCHW or NHWC (4-D only; X/Z/Y NHWC, W stays OIHW in the model)),
//   1-D (run as 2-D with a trailing unit dim), 2-D and 3-D, any group / strides / dilations /
//   pads / auto_pad (geometry from nn::make_window, exactly as the reference). Asymmetric pads
//   (cuDNN pads symmetrically) are materialized by a zero-pad kernel into scratch first.
// - float32 (CUDNN_FMA_MATH: no TF32 unless the node has `tf32`=1), float16 and bfloat16
//   (tensor-op math, float accumulation), double.
// - Bias + residual + Relu (and identity with IMPLICIT_PRECOMP_GEMM) in one
//   cudnnConvolutionBiasActivationForward call; when cuDNN refuses (NOT_SUPPORTED) or for
//   Clip / LeakyRelu: cudnnConvolutionForward + one epilogue kernel (dnn_epilogue.cu).
// - NHWC with a constant W: the filter is re-laid out to KRSC once at prepare and uploaded.
//   Otherwise W is used as the device input the executor provides (so non-constant W works).
// Algorithm choice: per input shape (a mutex-protected cache of descriptors + algorithm):
//   node attribute `kiln_tactic` ("cuda.conv.cudnn.<ALGO>[.tc]", as describe_tactic prints it)
//   forces the algorithm; else the shape in `kiln_tune_shape` (X shape, W constant) is timed
//   at prepare with cudnnFindConvolutionForwardAlgorithmEx on scratch buffers; every other
//   shape uses cudnnGetConvolutionForwardAlgorithm_v7 heuristics. Workspace limit: node
//   attribute `kiln_workspace` (bytes) else 1 GiB.
// Pointwise NHWC convolutions (1x1, stride 1, unpadded, one group, float16 / bfloat16, ReLU or
//   none) also time cuBLASLt's algorithms for the same work as one GEMM with the residual as
//   its C operand and a RELU_BIAS epilogue (conv_gemm.h); the fastest of cuDNN and cuBLASLt
//   wins, persisted as "cuda.conv.cublaslt.<readable>@<hex>". ResNet-50's layer1 1x1 expansions
//   with a residual run 1.25x faster that way at batch 256 on an H100 (0.400 -> 0.319 ms as
//   timed at build); at batch 1 its 1x1 reductions gain 2-3 us each (split-K GEMMs).
// Other NHWC float16 / bfloat16 convolutions with one group and no dilation (3x3 and the like)
//   also time the tap-GEMM form (conv_gemm.h): one cuBLASLt GEMM D[N*H*W, R*S*K] = X * Wt^T into
//   16-bit (or float32) workspace, then launch_tap_sum adds each output pixel's R*S shifted taps with bias,
//   residual and activation. Persisted as "cuda.conv.tapgemm.<readable>@<hex>". It wins where the
//   output is small (ResNet-50's 14x14 and 7x7 convolutions at batch 1): N = R*S*K spreads the
//   GEMM over the GPU where cuDNN's kernels run a few blocks. Only offered while D fits the
//   context's library workspace (32 MiB, or the workspace limit when lower).
// Convolutions with few input channels (R*S*C <= 512, ResNet's stem) also time the im2col form:
//   launch_im2col into workspace, then one cuBLASLt GEMM with bias, residual and ReLU in its
//   epilogue. Persisted as "cuda.conv.im2col.<readable>@<hex>"; the same workspace rule.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#include <cublasLt.h>
#include <cudnn.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>

#include "backends/cuda/conv_gemm.h"
#include "backends/cuda/cudnn_graph.h"
#include "backends/cuda/dnn.h"
#include "backends/cuda/tune_timer.h"
#include "base/logging.h"
#include "ops/nn/nn_util.h"

namespace kiln::cuda {
namespace {

constexpr const char* kAlgoNames[] = {"IMPLICIT_GEMM", "IMPLICIT_PRECOMP_GEMM", "GEMM",
                                      "DIRECT",        "FFT",                   "FFT_TILING",
                                      "WINOGRAD",      "WINOGRAD_NONFUSED"};

std::string algo_name(cudnnConvolutionFwdAlgo_t a) {
  const int i = static_cast<int>(a);
  return i >= 0 && i < 8 ? kAlgoNames[i] : "ALGO" + std::to_string(i);
}

// cuDNN 9 status codes are grouped by thousands: 2xxx bad parameter, 3xxx not supported, ...
int status_class(cudnnStatus_t s) { return static_cast<int>(s) / 1000; }

Status dnn_status(cudnnStatus_t s, const std::string& where, const char* what) {
  if (s == CUDNN_STATUS_SUCCESS) return Status::ok();
  std::string msg = where + ": " + what + ": " + cudnnGetErrorString(s);
  char detail[512] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  if (detail[0]) msg += std::string(" (") + detail + ")";
  const int code = static_cast<int>(s);
  if (code == 4003 || code == 4004) return out_of_memory(msg);  // host / device allocation
  if (status_class(s) == 3) return unsupported(msg);
  return runtime_error(msg);
}
#define DNN_CHECK(expr, what) KILN_RETURN_IF_ERROR(dnn_status((expr), where_, (what)))

bool dnn_dtype(DataType dt, cudnnDataType_t* out) {
  switch (dt) {
    case DataType::kFloat: *out = CUDNN_DATA_FLOAT; return true;
    case DataType::kFloat16: *out = CUDNN_DATA_HALF; return true;
    case DataType::kBFloat16: *out = CUDNN_DATA_BFLOAT16; return true;
    case DataType::kDouble: *out = CUDNN_DATA_DOUBLE; return true;
    default: return false;
  }
}

// RAII owners of the legacy descriptors.
struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  ~TensorDesc() { if (d) cudnnDestroyTensorDescriptor(d); }
};
struct FilterDesc {
  cudnnFilterDescriptor_t d = nullptr;
  ~FilterDesc() { if (d) cudnnDestroyFilterDescriptor(d); }
};
struct ConvDesc {
  cudnnConvolutionDescriptor_t d = nullptr;
  ~ConvDesc() { if (d) cudnnDestroyConvolutionDescriptor(d); }
};

// The GEMM forms of a convolution (conv_gemm.h): their tactic prefixes and the environment
// variables that force them (="force", read at each tuning; tests and A/B runs).
enum GemmFormId : int { kFormPointwise = 0, kFormTaps = 1, kFormIm2col = 2, kGemmForms = 3 };
constexpr const char* kFormPrefix[kGemmForms] = {kPointwiseTacticPrefix, kTapTacticPrefix,
                                                 kIm2colTacticPrefix};
constexpr const char* kFormForceEnv[kGemmForms] = {"KILN_CUDA_CONV_GEMM", "KILN_CUDA_CONV_TAPS",
                                                   "KILN_CUDA_CONV_IM2COL"};
constexpr const char* kFormName[kGemmForms] = {"pointwise GEMM", "tap GEMM", "im2col GEMM"};

// Shape-independent configuration read from the node once.
struct ConvConfig {
  bool fused = false;  // kiln.FusedConv
  bool nhwc = false;
  EpAct act = EpAct::kNone;
  float a = 0, b = 0;
  int64_t group = 1;
  bool tf32 = false;
  size_t ws_limit = size_t{1} << 30;
  bool forced = false;  // kiln_tactic names the algorithm
  cudnnConvolutionFwdAlgo_t forced_algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
  bool forced_tc = false;
  std::string fe_name;  // kiln_tactic names a cuDNN graph API plan ("cuda.conv.cudnn_fe.<plan>")
  // kiln_tactic names a cuBLASLt algorithm of GEMM form f (conv_gemm.h): form_tactic[f].
  std::array<std::string, kGemmForms> form_tactic;
  int persisted_form() const {
    for (int f = 0; f < kGemmForms; ++f)
      if (!form_tactic[static_cast<size_t>(f)].empty()) return f;
    return -1;
  }
};

Result<ConvConfig> read_config(const Node& n) {
  ConvConfig c;
  c.fused = n.domain == "kiln";
  c.group = n.attr_int("group", 1);
  if (c.group < 1) return invalid_argument(n.where() + ": group must be >= 1");
  c.tf32 = n.attr_int("tf32", 0) != 0;
  const int64_t ws = n.attr_int("kiln_workspace", -1);
  if (ws >= 0) c.ws_limit = static_cast<size_t>(ws);
  if (c.fused) {
    const std::string layout = n.attr_string("layout", "NCHW");
    if (layout != "NCHW" && layout != "NHWC")
      return invalid_argument(n.where() + ": unknown layout '" + layout + "'");
    c.nhwc = layout == "NHWC";
    const std::string act = n.attr_string("activation", "");
    const std::vector<float> p = n.attr_floats("activation_params");
    if (act.empty()) {
      c.act = EpAct::kNone;
    } else if (act == "Relu") {
      c.act = EpAct::kRelu;
    } else if (act == "Clip") {
      c.act = EpAct::kClip;
      c.a = p.size() > 0 ? p[0] : -std::numeric_limits<float>::infinity();
      c.b = p.size() > 1 ? p[1] : std::numeric_limits<float>::infinity();
    } else if (act == "LeakyRelu") {
      c.act = EpAct::kLeakyRelu;
      c.a = p.size() > 0 ? p[0] : 0.01f;
    } else {
      return invalid_argument(n.where() + ": unknown fused activation '" + act + "'");
    }
  }
  const std::string t = n.attr_string("kiln_tactic", "");
  const std::string prefix = "cuda.conv.cudnn.";
  if (t.rfind("cuda.conv.cudnn_fe.", 0) == 0) c.fe_name = t.substr(0, t.find(' '));
  for (int f = 0; f < kGemmForms; ++f)
    if (t.rfind(kFormPrefix[f], 0) == 0) c.form_tactic[static_cast<size_t>(f)] = t.substr(0, t.find(' '));
  if (t.rfind(prefix, 0) == 0) {
    std::string rest = t.substr(prefix.size());
    const size_t dot = rest.find('.');
    const std::string name = rest.substr(0, dot);
    for (int i = 0; i < 8; ++i)
      if (name == kAlgoNames[i]) {
        c.forced = true;
        c.forced_algo = static_cast<cudnnConvolutionFwdAlgo_t>(i);
        c.forced_tc = rest.find(".tc") != std::string::npos;
      }
  }
  return c;
}

// Descriptors and algorithm for one (X shape, W shape).
struct Plan {
  TensorDesc x, y, bias;
  FilterDesc w;
  ConvDesc conv;
  cudnnConvolutionFwdAlgo_t algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
  size_t ws = 0;
  Shape y_shape;  // in the node's layout
  int64_t M = 0;  // output channels
  int64_t sp_out = 1;  // output spatial size (NCHW epilogue inner stride)
  // Asymmetric padding done by a zero-pad kernel first.
  bool explicit_pad = false;
  Dims pad_in, pad_out, pad_begin;
  int64_t padded_numel = 0;
  // cudnnConvolutionBiasActivationForward: 0 = untried, 1 = works, 2 = refused.
  mutable std::atomic<int> fused_state{0};
  bool tuned = false;
  // The cuDNN graph API path (NHWC fp16/bf16 with a KRSC filter): when set, run() uses it.
  bool fe_eligible = false;
  fe::ConvSpec spec;
  std::shared_ptr<fe::ConvGraph> fe;
  // The GEMM forms (NHWC fp16/bf16, conv_gemm.h), by GemmFormId: the pointwise GEMM (1x1 /
  // stride 1 / unpadded), the tap GEMM (RxS, one group, no dilation: the GEMM into `extra` bytes
  // of 16-bit (or float32) workspace, then launch_tap_sum with tap_args) and the im2col GEMM (few input
  // channels: launch_im2col with i2c_args into `extra` bytes, then the GEMM). When one's `g` is
  // set, run() uses it for 256-byte aligned operands; cuDNN stays the fallback.
  struct GemmForm {
    bool eligible = false;
    PointwiseProblem prob;
    size_t extra = 0;
    std::shared_ptr<const PointwiseGemm> g;
  };
  std::array<GemmForm, kGemmForms> forms;
  TapSumArgs tap_args;   // geometry and activation; pointers are set per call
  Im2colArgs i2c_args;
  int chosen_form() const {
    for (int f = 0; f < kGemmForms; ++f)
      if (forms[static_cast<size_t>(f)].g) return f;
    return -1;
  }
  std::string tactic() const {
    if (chosen_form() >= 0) return forms[static_cast<size_t>(chosen_form())].g->tactic();
    if (fe) return fe->tactic();
    std::string s = "cuda.conv.cudnn." + algo_name(algo);
    if (math == CUDNN_TENSOR_OP_MATH || math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) s += ".tc";
    return s;
  }
};

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// KILN_CUDA_CONV_GEMM=0: no cuBLASLt candidates for pointwise convolutions (A/B runs; plans
// that chose one fall back to the cuDNN heuristics). "force" (read at each tuning): the GEMM
// wherever it runs, faster or not.
bool gemm_disabled() {
  static const bool off = [] {
    const char* e = std::getenv("KILN_CUDA_CONV_GEMM");
    return e && e[0] == '0';
  }();
  return off;
}

// KILN_CUDA_CONV_TAPS=0: no tap-GEMM candidates (A/B runs); "force" (read at each tuning): the
// tap GEMM wherever it runs.
bool taps_disabled() {
  static const bool off = [] {
    const char* e = std::getenv("KILN_CUDA_CONV_TAPS");
    return e && e[0] == '0';
  }();
  return off;
}
// The tap GEMM writes D in the conv's own 16-bit type: half the bytes between the GEMM and the
// tap sum, each tap's partial sum (float-accumulated) rounded once to fp16 / bf16 before the
// float sum of the R*S taps. ResNet-50 fp16 b1 on an H100: 0.273 -> 0.270 ms, and 12 convs take
// the tap GEMM instead of 8 (session 9). KILN_CUDA_TAP_D16=0: float32 D (A/B, accuracy checks).
bool tap_d_reduced() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CUDA_TAP_D16");
    return !(e && e[0] == '0');
  }();
  return on;
}
bool env_is_force(const char* name) {
  const char* e = std::getenv(name);
  return e && std::string(e) == "force";
}

// The tap GEMM's D and cuBLASLt's workspace share the context's library workspace
// (cuda_context.cpp: at most 32 MiB).
constexpr size_t kTapWorkspaceCap = size_t{32} << 20;
// How many cuDNN graph API candidates tune() times per convolution.
constexpr int kGraphCandidates = 12;
size_t round_up_256(size_t v) { return (v + 255) / 256 * 256; }
bool aligned_to(const void* p, uintptr_t m) { return reinterpret_cast<uintptr_t>(p) % m == 0; }

class ConvKernel final : public DnnKernel {
 public:
  ConvKernel(const Node& n, ConvConfig cfg) : where_(n.where()), cfg_(cfg) {}

  // At prepare: KRSC filter upload (NHWC, constant W), zero bias for the fused call, tuning.
  Status prepare(const Node& n, const ConstantLookup& constants);

  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override;

  // With the KRSC filter on the device, run() reads only W's shape and dtype: the executor's
  // copy of W would double the engine's weight memory (ResNet-50 fp16: ~50 MB).
  bool owns_constant(size_t i) const override { return i == 1 && w_krsc_.defined(); }

  // The cuDNN graph API spec (with its workspace limit) that prepare() would build and time
  // candidates for, when it would: the builder's pretune step builds those in parallel first.
  static std::optional<fe::ConvGraph::Prebuild> pretune_spec(const Node& n,
                                                             const ConstantLookup& constants);

  // The selected cuDNN graph plan, serialized (its runtime-compiled kernel included).
  std::string compiled() const override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [shapes, p] : plans_)
      if (p->fe && p->chosen_form() < 0 && p->tactic() == tactic_) return p->fe->serialized();
    return "";
  }

  std::string tactic() const override {
    std::lock_guard<std::mutex> lock(mu_);
    if (tune_error_.empty()) return tactic_;
    // One line, no tabs: the tactic goes into the text timing cache.
    std::string e = tune_error_.substr(0, 300);
    for (char& c : e)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    return tactic_ + " [tuning failed: " + e + "]";
  }

 private:
  // Builds descriptors for the shapes and picks the algorithm (heuristics unless forced).
  Result<std::shared_ptr<Plan>> build_plan(const Node& n, DataType dt, const Shape& xs,
                                           const Shape& ws) const;
  Status pick_heuristic(cudnnHandle_t h, DataType dt, Plan& p) const;
  Status set_algo(cudnnHandle_t h, DataType dt, Plan& p, cudnnConvolutionFwdAlgo_t algo,
                  cudnnMathType_t math) const;
  Result<std::shared_ptr<Plan>> get_plan(OpContext& ctx, DataType dt, const Shape& xs,
                                         const Shape& ws) const;
  Status tune(const Node& n, DataType dt, const Shape& xs, const Tensor& w_host);
  using AlgoChoice = std::pair<cudnnConvolutionFwdAlgo_t, cudnnMathType_t>;
  Result<std::pair<AlgoChoice, float>> time_fused_legacy(cudnnHandle_t h, DataType dt, Plan& p,
                                                         const std::vector<AlgoChoice>& algos,
                                                         const void* x, const void* w, void* y,
                                                         bool has_z, void* ws, size_t ws_bytes) const;
  cudnnMathType_t math_for(DataType dt, bool tc_result) const {
    if (dt == DataType::kDouble) return CUDNN_DEFAULT_MATH;
    if (dt == DataType::kFloat) return cfg_.tf32 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH;
    (void)tc_result;
    return CUDNN_TENSOR_OP_MATH;
  }
  // GEMM form f's filter on the device (the pointwise form uses the KRSC filter).
  const void* form_w(int f) const {
    return f == kFormPointwise ? w_krsc_.raw_data() : w_form_[static_cast<size_t>(f)].raw_data();
  }
  bool form_w_ready(int f) const {
    return f == kFormPointwise ? w_krsc_.defined() : w_form_[static_cast<size_t>(f)].defined();
  }
  // cuBLASLt's workspace limit for form f: what the library workspace leaves beside `extra`.
  size_t form_lt_limit(const Plan& p, int f) const {
    if (f == kFormPointwise) return cfg_.ws_limit;
    return std::min(cfg_.ws_limit, kTapWorkspaceCap) - p.forms[static_cast<size_t>(f)].extra;
  }
  // Uploads form f's filter layout (to_taps / to_im2col) unless it is there already.
  Status upload_form(const Plan& p, int f, const Tensor& w_host);
  // Enqueues form f with GEMM g: `extra` holds the form's extra workspace, `lt_ws` cuBLASLt's.
  Status enqueue_form(const Plan& p, int f, const PointwiseGemm& g, void* lt, cudaStream_t s,
                      const void* x, const void* bias, const void* z, void* y, void* extra,
                      void* lt_ws) const;
  // Times form f of `p` as run() calls it, on the tuning buffers x / y (the GEMM's algorithms
  // first, then the whole form with the best one); sets its `g`, and lowers *best_ms, when it
  // beats *best_ms (or its force variable is set), dropping a form chosen before.
  Status tune_form(Plan& p, int f, DataType dt, const Tensor& w_host, const void* x, void* y,
                   float* best_ms);
  void note_tactic(const Plan& p) const {
    std::lock_guard<std::mutex> lock(mu_);
    if (tactic_.empty()) tactic_ = p.tactic() + (p.tuned ? "" : ".heuristic");
  }

  // Whether the filter is (or, for pretune_spec, would be) on the device in KRSC.
  bool krsc() const { return w_krsc_.defined() || krsc_planned_; }

  std::string where_;
  ConvConfig cfg_;
  bool krsc_planned_ = false;  // pretune_spec: plan as if prepare() had uploaded the KRSC filter
  Tensor w_krsc_;     // device filter in KRSC (NHWC FusedConv with constant W), else undefined
  Tensor zero_bias_;  // device zeros [M] for the fused call without B, else undefined
  // Device filters of the GEMM forms while they are (or may be) used: [kFormTaps] as
  // [R*S*K, C], [kFormIm2col] as [K, kc] (KRSC rows, zero-padded); [kFormPointwise] unused.
  std::array<Tensor, kGemmForms> w_form_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<Shape, Shape>, std::shared_ptr<Plan>> plans_;
  mutable std::string tactic_;
  // Tuning is an optimization: a failure (say, out of memory for the scratch buffers) leaves
  // the heuristics in charge and is reported through tactic() instead of failing the load.
  std::string tune_error_;
};

Result<std::shared_ptr<Plan>> ConvKernel::build_plan(const Node& n, DataType dt, const Shape& xs,
                                                     const Shape& wsh) const {
  cudnnDataType_t cdt;
  if (!dnn_dtype(dt, &cdt)) return unsupported(where_ + ": dtype " + dtype_name(dt));
  const size_t r = xs.size();
  if (r < 3 || r > 5) return unsupported(where_ + ": X rank " + std::to_string(r) + " (1-3 spatial dims)");
  if (wsh.size() != r)
    return invalid_argument(where_ + ": weight W " + shape_str(wsh) + " rank differs from X " + shape_str(xs));
  if (cfg_.nhwc && r != 4) return invalid_argument(where_ + ": NHWC FusedConv needs 4-D X");
  const size_t nsp = r - 2;
  // NCHW view of X.
  const int64_t N = xs[0], C = cfg_.nhwc ? xs[3] : xs[1];
  Shape sp_in = cfg_.nhwc ? Shape{xs[1], xs[2]} : Shape(xs.begin() + 2, xs.end());
  const int64_t M = wsh[0], g = cfg_.group;
  if (wsh[1] * g != C || M % g != 0)
    return invalid_argument(where_ + ": X " + shape_str(xs) + " and W " + shape_str(wsh) +
                            " do not match with group " + std::to_string(g));
  Shape ks(wsh.begin() + 2, wsh.end());
  const auto attr_k = n.attr_ints("kernel_shape");
  if (!attr_k.empty() && attr_k != ks)
    return invalid_argument(where_ + ": kernel_shape " + shape_str(attr_k) + " does not match W " +
                            shape_str(wsh));
  KILN_ASSIGN_OR_RETURN(nn::Window win, nn::make_window(n, sp_in, ks, false));

  auto p = std::make_shared<Plan>();
  p->M = M;
  p->y_shape = cfg_.nhwc ? Shape{N, win.out[0], win.out[1], M} : Shape{N, M};
  if (!cfg_.nhwc) p->y_shape.insert(p->y_shape.end(), win.out.begin(), win.out.end());
  p->sp_out = nn::prod(win.out);

  // Symmetric part of the pads goes to cuDNN, the rest is materialized.
  std::vector<int64_t> pad(nsp), extra_b(nsp), extra_e(nsp);
  Shape sp_padded(nsp);
  for (size_t i = 0; i < nsp; ++i) {
    pad[i] = std::min(win.pad_begin[i], win.pad_end[i]);
    extra_b[i] = win.pad_begin[i] - pad[i];
    extra_e[i] = win.pad_end[i] - pad[i];
    sp_padded[i] = sp_in[i] + extra_b[i] + extra_e[i];
    if (extra_b[i] || extra_e[i]) p->explicit_pad = true;
  }
  if (p->explicit_pad) {
    p->pad_in.rank = p->pad_out.rank = p->pad_begin.rank = static_cast<int>(r);
    for (size_t d = 0; d < r; ++d) {
      p->pad_in.d[d] = xs[d];
      p->pad_out.d[d] = xs[d];
      p->pad_begin.d[d] = 0;
    }
    for (size_t i = 0; i < nsp; ++i) {
      const size_t d = cfg_.nhwc ? 1 + i : 2 + i;
      p->pad_out.d[d] = sp_padded[i];
      p->pad_begin.d[d] = extra_b[i];
    }
    p->padded_numel = N * C * nn::prod(sp_padded);
  }

  // cuDNN view: at least 2 spatial dims (1-D runs as [L, 1]).
  std::vector<int64_t> cx = sp_padded, cy = win.out, ck = ks, cpad = pad, cstr = win.strides,
                       cdil = win.dilations;
  if (nsp == 1) {
    cx.push_back(1); cy.push_back(1); ck.push_back(1); cpad.push_back(0); cstr.push_back(1);
    cdil.push_back(1);
  }
  const int cn = static_cast<int>(cx.size());
  std::vector<int> xd = {0, 0}, yd = {0, 0}, wd = {0, 0}, pa, st, di;
  auto to_int = [&](int64_t v, int* o) {
    if (!fits_int(v)) return false;
    *o = static_cast<int>(v);
    return true;
  };
  bool ok = to_int(N, &xd[0]) && to_int(C, &xd[1]) && to_int(N, &yd[0]) && to_int(M, &yd[1]) &&
            to_int(M, &wd[0]) && to_int(wsh[1], &wd[1]);
  for (int i = 0; i < cn && ok; ++i) {
    int a = 0, b = 0, c = 0, d = 0, e = 0, f = 0;
    ok = to_int(cx[i], &a) && to_int(cy[i], &b) && to_int(ck[i], &c) && to_int(cpad[i], &d) &&
         to_int(cstr[i], &e) && to_int(cdil[i], &f);
    xd.push_back(a); yd.push_back(b); wd.push_back(c); pa.push_back(d); st.push_back(e);
    di.push_back(f);
  }
  const int64_t xn = N * C * nn::prod(cx), yn = N * M * nn::prod(cy);
  if (!ok || !fits_int(xn) || !fits_int(yn) || !fits_int(g))
    return unsupported(where_ + ": X " + shape_str(xs) + " too large for cuDNN (int32 sizes)");
  if (N == 0 || yn == 0) return p;  // empty output: nothing to run

  // The graph API path: one engine for conv + bias + residual + ReLU (asymmetric pads too).
  if (cfg_.nhwc && r == 4 && krsc() && !fe::graph_api_disabled() &&
      (dt == DataType::kFloat16 || dt == DataType::kBFloat16) &&
      (cfg_.act == EpAct::kNone || cfg_.act == EpAct::kRelu)) {
    fe::ConvSpec& s = p->spec;
    s.dt = dt;
    s.N = N, s.C = C, s.H = sp_in[0], s.W = sp_in[1], s.K = M, s.R = ks[0], s.S = ks[1];
    s.P = win.out[0], s.Q = win.out[1], s.group = g;
    for (int i = 0; i < 2; ++i) {
      s.pre[i] = win.pad_begin[static_cast<size_t>(i)];
      s.post[i] = win.pad_end[static_cast<size_t>(i)];
      s.stride[i] = win.strides[static_cast<size_t>(i)];
      s.dil[i] = win.dilations[static_cast<size_t>(i)];
    }
    s.bias = n.inputs.size() > 2 && !n.inputs[2].empty();
    s.z = cfg_.fused && n.inputs.size() > 3 && !n.inputs[3].empty();
    s.relu = cfg_.act == EpAct::kRelu;
    p->fe_eligible = true;
    const bool pointwise = g == 1 && ks == Shape{1, 1} && s.stride[0] == 1 && s.stride[1] == 1 &&
                           s.dil[0] == 1 && s.dil[1] == 1 && s.pre[0] == 0 && s.pre[1] == 0 &&
                           s.post[0] == 0 && s.post[1] == 0;
    if (pointwise && !gemm_disabled()) {
      PointwiseProblem& q = p->forms[kFormPointwise].prob;
      q.dt = dt;
      q.rows = N * s.H * s.W;
      q.cin = C;
      q.cout = M;
      q.bias = s.bias;
      q.z = s.z;
      q.relu = s.relu;
      p->forms[kFormPointwise].eligible = pointwise_gemm_ok(q);
    }
    const size_t tap_cap = std::min(cfg_.ws_limit, kTapWorkspaceCap);
    if (!pointwise && g == 1 && s.dil[0] == 1 && s.dil[1] == 1 && !taps_disabled()) {
      Plan::GemmForm& fm = p->forms[kFormTaps];
      PointwiseProblem& q = fm.prob;
      q.dt = dt;
      q.rows = N * s.H * s.W;
      q.cin = C;
      q.cout = s.R * s.S * M;
      q.tap = true;
      q.f32_out = !tap_d_reduced();
      fm.extra = round_up_256(static_cast<size_t>(q.rows) * static_cast<size_t>(q.cout) *
                              (q.f32_out ? 4 : dtype_size(dt)));
      TapSumArgs& t = p->tap_args;
      t.dtype = dt;
      t.d_reduced = !q.f32_out;
      t.N = N, t.H = s.H, t.W = s.W, t.K = M, t.P = s.P, t.Q = s.Q;
      t.R = static_cast<int>(s.R), t.S = static_cast<int>(s.S);
      t.sh = static_cast<int>(s.stride[0]), t.sw = static_cast<int>(s.stride[1]);
      t.pt = static_cast<int>(s.pre[0]), t.pl = static_cast<int>(s.pre[1]);
      t.act = cfg_.act, t.a = cfg_.a, t.b = cfg_.b;
      fm.eligible = pointwise_gemm_ok(q) && M % 8 == 0 && s.R <= 64 && s.S <= 64 &&
                    s.stride[0] <= 1024 && s.stride[1] <= 1024 && s.pre[0] <= 1024 &&
                    s.pre[1] <= 1024 && fm.extra < tap_cap;
    }
    if (!pointwise && g == 1 && s.dil[0] == 1 && s.dil[1] == 1 && s.R * s.S * C <= 512 &&
        !taps_disabled()) {
      Plan::GemmForm& fm = p->forms[kFormIm2col];
      PointwiseProblem& q = fm.prob;
      q.dt = dt;
      q.rows = N * s.P * s.Q;
      q.cin = (s.R * s.S * C + 7) / 8 * 8;
      q.cout = M;
      q.bias = s.bias;
      q.z = s.z;
      q.relu = s.relu;
      q.im2col = true;
      fm.extra = round_up_256(static_cast<size_t>(q.rows) * static_cast<size_t>(q.cin) * 2);
      Im2colArgs& t = p->i2c_args;
      t.N = N, t.H = s.H, t.W = s.W, t.C = C, t.P = s.P, t.Q = s.Q, t.kc = q.cin;
      t.R = static_cast<int>(s.R), t.S = static_cast<int>(s.S);
      t.sh = static_cast<int>(s.stride[0]), t.sw = static_cast<int>(s.stride[1]);
      t.pt = static_cast<int>(s.pre[0]), t.pl = static_cast<int>(s.pre[1]);
      fm.eligible = pointwise_gemm_ok(q) && s.stride[0] <= 1024 && s.stride[1] <= 1024 &&
                    s.pre[0] <= 1024 && s.pre[1] <= 1024 && fm.extra < tap_cap;
    }
  }

  const cudnnTensorFormat_t fmt = cfg_.nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
  const cudnnTensorFormat_t wfmt = krsc() ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
  const int nb = cn + 2;
  DNN_CHECK(cudnnCreateTensorDescriptor(&p->x.d), "cudnnCreateTensorDescriptor");
  DNN_CHECK(cudnnSetTensorNdDescriptorEx(p->x.d, fmt, cdt, nb, xd.data()), "X descriptor");
  DNN_CHECK(cudnnCreateTensorDescriptor(&p->y.d), "cudnnCreateTensorDescriptor");
  DNN_CHECK(cudnnSetTensorNdDescriptorEx(p->y.d, fmt, cdt, nb, yd.data()), "Y descriptor");
  std::vector<int> bd(static_cast<size_t>(nb), 1);
  bd[1] = yd[1];
  DNN_CHECK(cudnnCreateTensorDescriptor(&p->bias.d), "cudnnCreateTensorDescriptor");
  DNN_CHECK(cudnnSetTensorNdDescriptorEx(p->bias.d, fmt, cdt, nb, bd.data()),
            "bias descriptor");
  DNN_CHECK(cudnnCreateFilterDescriptor(&p->w.d), "cudnnCreateFilterDescriptor");
  DNN_CHECK(cudnnSetFilterNdDescriptor(p->w.d, cdt, wfmt, nb, wd.data()), "W descriptor");
  DNN_CHECK(cudnnCreateConvolutionDescriptor(&p->conv.d), "cudnnCreateConvolutionDescriptor");
  const cudnnDataType_t compute = dt == DataType::kDouble ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
  DNN_CHECK(cudnnSetConvolutionNdDescriptor(p->conv.d, cn, pa.data(), st.data(), di.data(),
                                            CUDNN_CROSS_CORRELATION, compute),
            "convolution descriptor");
  DNN_CHECK(cudnnSetConvolutionGroupCount(p->conv.d, static_cast<int>(g)), "group count");
  DNN_CHECK(cudnnSetConvolutionMathType(p->conv.d, math_for(dt, true)), "math type");
  std::vector<int> od(static_cast<size_t>(nb));
  DNN_CHECK(cudnnGetConvolutionNdForwardOutputDim(p->conv.d, p->x.d, p->w.d, nb, od.data()),
            "output dims");
  if (od != yd)
    return internal_error(where_ + ": cuDNN output dims disagree with the ONNX geometry for X " +
                          shape_str(xs));
  return p;
}

Status ConvKernel::set_algo(cudnnHandle_t h, DataType dt, Plan& p, cudnnConvolutionFwdAlgo_t algo,
                            cudnnMathType_t math) const {
  if (dt == DataType::kFloat && !cfg_.tf32) math = CUDNN_FMA_MATH;
  if (dt == DataType::kDouble) math = CUDNN_DEFAULT_MATH;
  DNN_CHECK(cudnnSetConvolutionMathType(p.conv.d, math), "math type");
  size_t ws = 0;
  DNN_CHECK(cudnnGetConvolutionForwardWorkspaceSize(h, p.x.d, p.w.d, p.conv.d, p.y.d, algo, &ws),
            "workspace size");
  p.algo = algo;
  p.math = math;
  p.ws = ws;
  return Status::ok();
}

Status ConvKernel::pick_heuristic(cudnnHandle_t h, DataType dt, Plan& p) const {
  if (cfg_.forced) {
    Status st = set_algo(h, dt, p, cfg_.forced_algo,
                         cfg_.forced_tc ? CUDNN_TENSOR_OP_MATH : CUDNN_DEFAULT_MATH);
    if (st.is_ok() && p.ws <= cfg_.ws_limit) {
      p.tuned = true;  // the persisted choice
      return st;
    }
  }
  int max_count = 0;
  DNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(h, &max_count), "algorithm count");
  std::vector<cudnnConvolutionFwdAlgoPerf_t> perf(static_cast<size_t>(std::max(max_count, 1)));
  int got = 0;
  DNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, p.x.d, p.w.d, p.conv.d, p.y.d,
                                                   static_cast<int>(perf.size()), &got, perf.data()),
            "cudnnGetConvolutionForwardAlgorithm_v7");
  const bool no_tc = dt == DataType::kFloat && !cfg_.tf32;
  for (int i = 0; i < got; ++i) {
    const auto& r = perf[static_cast<size_t>(i)];
    if (r.status != CUDNN_STATUS_SUCCESS) continue;
    if (no_tc && (r.mathType == CUDNN_TENSOR_OP_MATH ||
                  r.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION))
      continue;
    if (!set_algo(h, dt, p, r.algo, r.mathType).is_ok()) continue;
    if (p.ws > cfg_.ws_limit) continue;
    return Status::ok();
  }
  // IMPLICIT_GEMM needs no workspace and supports every configuration.
  KILN_RETURN_IF_ERROR(set_algo(h, dt, p, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                                CUDNN_DEFAULT_MATH));
  return Status::ok();
}

Result<std::shared_ptr<Plan>> ConvKernel::get_plan(OpContext& ctx, DataType dt, const Shape& xs,
                                                   const Shape& wsh) const {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find({xs, wsh});
    if (it != plans_.end()) return it->second;
  }
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> p, build_plan(ctx.node, dt, xs, wsh));
  if (p->x.d) {
    auto& env = env_of(ctx);
    if (!env.cudnn) return ctx.fail("no cuDNN handle in the execution context");
    // Graph API first (the persisted plan, else cuDNN's heuristics) unless a legacy algorithm
    // was persisted; the legacy API otherwise.
    // A persisted cuBLASLt algorithm first (cuDNN's heuristics as its fallback).
    const int f = cfg_.persisted_form();
    if (f >= 0 && p->forms[static_cast<size_t>(f)].eligible && form_w_ready(f)) {
      auto g = PointwiseGemm::from_tactic(p->forms[static_cast<size_t>(f)].prob,
                                          cfg_.form_tactic[static_cast<size_t>(f)], form_lt_limit(*p, f), where_);
      if (g.is_ok() && g.value()) {
        p->forms[static_cast<size_t>(f)].g = std::move(g.value());
        p->tuned = true;
      }
    }
    if (p->fe_eligible && !cfg_.forced && p->chosen_form() < 0) {
      auto cg = fe::ConvGraph::make(p->spec, cfg_.fe_name, cfg_.ws_limit);
      if (cg.is_ok()) p->fe = std::move(cg.value());
    }
    if (!p->fe) KILN_RETURN_IF_ERROR(pick_heuristic(static_cast<cudnnHandle_t>(env.cudnn), dt, *p));
    note_tactic(*p);
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto [it, inserted] = plans_.emplace(std::make_pair(xs, wsh), p);
  return it->second;
}

bool fused_call_ok(const Plan& p, EpAct act, bool has_bias_or_z) {
  if (act == EpAct::kRelu) return true;
  // The identity activation is only implemented with IMPLICIT_PRECOMP_GEMM.
  return act == EpAct::kNone && has_bias_or_z &&
         p.algo == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM;
}

Status ConvKernel::run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const {
  if (out.empty()) return ctx.bad_input("Conv needs one output");
  KILN_ASSIGN_OR_RETURN(const Tensor* X, req_tensor(ctx, in, 0));
  KILN_ASSIGN_OR_RETURN(const Tensor* W, req_tensor(ctx, in, 1));
  const Tensor* B = opt_tensor(in, 2);
  const Tensor* Z = cfg_.fused ? opt_tensor(in, 3) : nullptr;
  const DataType dt = X->dtype();
  cudnnDataType_t cdt;
  if (!dnn_dtype(dt, &cdt)) return ctx.bad_input(std::string("unsupported dtype ") + dtype_name(dt));
  if (W->dtype() != dt) return ctx.bad_input("W dtype differs from X");
  if (!X->on_device() || (!w_krsc_.defined() && !W->on_device()))
    return ctx.fail("X and W must be device tensors");
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> p, get_plan(ctx, dt, X->shape(), W->shape()));
  if (B) {
    if (B->dtype() != dt || B->numel() != p->M || !B->on_device())
      return ctx.bad_input("bias B " + B->describe() + " must be a device tensor of " +
                           std::to_string(p->M) + " elements of X's dtype");
  }
  if (Z) {
    if (Z->dtype() != dt || Z->shape() != p->y_shape || !Z->on_device())
      return ctx.bad_input("residual input Z " + Z->describe() + " must have the output's shape " +
                           shape_str(p->y_shape) + " and dtype");
  }
  auto& env = env_of(ctx);
  KILN_ASSIGN_OR_RETURN(Tensor Y, env.alloc(dt, p->y_shape));
  out[0] = Value(Y);
  if (!p->x.d) return Status::ok();  // empty output

  const void* x = X->raw_data();
  std::shared_ptr<Storage> pad_buf, ws_buf;
  const void* zp = Z ? Z->raw_data() : nullptr;
  if (const int f = p->chosen_form(); f >= 0 && env.cublaslt &&
      PointwiseGemm::aligned(x, form_w(f), zp, Y.raw_data()) &&
      PointwiseGemm::aligned(B ? B->raw_data() : nullptr, nullptr, nullptr, nullptr)) {
    const Plan::GemmForm& fm = p->forms[static_cast<size_t>(f)];
    KILN_ASSIGN_OR_RETURN(void* ws, env.library_workspace(fm.extra + fm.g->workspace(), &ws_buf));
    return enqueue_form(*p, f, *fm.g, env.cublaslt, env.stream, x, B ? B->raw_data() : nullptr, zp,
                        Y.raw_data(), ws, static_cast<char*>(ws) + fm.extra)
        .with_context(where_);
  }
  if (p->fe) {  // one graph API engine does it all (pads included)
    KILN_ASSIGN_OR_RETURN(void* ws, env.library_workspace(p->fe->workspace(), &ws_buf));
    fe::ConvPtrs ptrs;
    ptrs.x = x;
    ptrs.w = w_krsc_.raw_data();
    ptrs.bias = B ? B->raw_data() : nullptr;
    ptrs.z = Z ? Z->raw_data() : nullptr;
    ptrs.y = Y.raw_data();
    return p->fe->run(env.cudnn, ptrs, ws).with_context(where_);
  }
  if (p->explicit_pad) {
    const size_t bytes = static_cast<size_t>(p->padded_numel) * dtype_size(dt);
    KILN_ASSIGN_OR_RETURN(pad_buf, env.scratch(bytes));
    KILN_RETURN_IF_ERROR(launch_zero_pad(dtype_size(dt), x, pad_buf->data(), p->pad_in,
                                         p->pad_out, p->pad_begin, env.stream)
                             .with_context(where_));
    x = pad_buf->data();
  }
  KILN_ASSIGN_OR_RETURN(void* ws, env.library_workspace(p->ws, &ws_buf));
  const void* w = w_krsc_.defined() ? w_krsc_.raw_data() : W->raw_data();
  const void* bias = B ? B->raw_data() : (zero_bias_.defined() ? zero_bias_.raw_data() : nullptr);
  auto h = static_cast<cudnnHandle_t>(env.cudnn);
  if (!h) return ctx.fail("no cuDNN handle in the execution context");
  const double one_d = 1.0, zero_d = 0.0;
  const float one_f = 1.f, zero_f = 0.f;
  const bool dbl = dt == DataType::kDouble;
  const void* one = dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  const void* zero = dbl ? static_cast<const void*>(&zero_d) : static_cast<const void*>(&zero_f);

  // KILN_CUDNN_UNFUSED=1: always conv + Kiln's epilogue kernel (an A/B knob for profiling).
  static const bool unfused = [] {
    const char* e = std::getenv("KILN_CUDNN_UNFUSED");
    return e && *e == '1';
  }();
  if (!unfused && bias && p->fused_state.load() != 2 && fused_call_ok(*p, cfg_.act, B || Z)) {
    const cudnnActivationMode_t mode =
        cfg_.act == EpAct::kRelu ? CUDNN_ACTIVATION_RELU : CUDNN_ACTIVATION_IDENTITY;
    cudnnActivationDescriptor_t act = nullptr;
    DNN_CHECK(cudnnCreateActivationDescriptor(&act), "cudnnCreateActivationDescriptor");
    cudnnStatus_t s = cudnnSetActivationDescriptor(act, mode, CUDNN_PROPAGATE_NAN, 0.0);
    if (s == CUDNN_STATUS_SUCCESS)
      s = cudnnConvolutionBiasActivationForward(
          h, one, p->x.d, x, p->w.d, w, p->conv.d, p->algo, ws, p->ws, Z ? one : zero, p->y.d,
          Z ? Z->raw_data() : Y.raw_data(), p->bias.d, bias, act, p->y.d, Y.raw_data());
    cudnnDestroyActivationDescriptor(act);
    if (s == CUDNN_STATUS_SUCCESS) {
      p->fused_state.store(1);
      return Status::ok();
    }
    // Refusals (not supported / bad parameter for this config) fall back; real failures don't.
    if (status_class(s) != 2 && status_class(s) != 3)
      return dnn_status(s, where_, "cudnnConvolutionBiasActivationForward");
    p->fused_state.store(2);  // refused: conv + epilogue kernel from now on
  }
  DNN_CHECK(cudnnConvolutionForward(h, one, p->x.d, x, p->w.d, w, p->conv.d, p->algo, ws, p->ws,
                                    zero, p->y.d, Y.raw_data()),
            "cudnnConvolutionForward");
  if (B || Z || cfg_.act != EpAct::kNone) {
    EpilogueArgs e;
    e.dtype = dt;
    e.y = Y.raw_data();
    e.bias = B ? B->raw_data() : nullptr;
    e.z = Z ? Z->raw_data() : nullptr;
    e.n = Y.numel();
    e.channels = p->M;
    e.inner = cfg_.nhwc ? 1 : p->sp_out;
    e.act = cfg_.act;
    e.a = cfg_.a;
    e.b = cfg_.b;
    KILN_RETURN_IF_ERROR(launch_epilogue(e, env.stream).with_context(where_));
  }
  return Status::ok();
}

// Copies the [K, C, R] elements of `w` to the positions dst_index(k, c, r) of `t` (same dtype), in
// whole elements of 1, 2, 4 or 8 bytes (a byte-wise memcpy per element made loading ResNet-50's
// layer4 filters take 25 ms each).
template <typename Index>
void permute_elems(const Tensor& w, Tensor& t, int64_t K, int64_t C, int64_t R, Index dst_index) {
  auto run = [&](auto tag) {
    using E = decltype(tag);
    const E* src = static_cast<const E*>(w.raw_data());
    E* dst = static_cast<E*>(t.raw_data());
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = 0; r < R; ++r) dst[dst_index(k, c, r)] = src[(k * C + c) * R + r];
  };
  switch (dtype_size(w.dtype())) {
    case 1:
      run(uint8_t{});
      break;
    case 2:
      run(uint16_t{});
      break;
    case 4:
      run(uint32_t{});
      break;
    default:
      run(uint64_t{});
      break;
  }
}

// OIHW (host) -> OHWI ("KRSC") bytes.
Result<Tensor> to_krsc(const Tensor& w) {
  const Shape& s = w.shape();
  Shape o = {s[0]};
  o.insert(o.end(), s.begin() + 2, s.end());
  o.push_back(s[1]);
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(w.dtype(), o));
  const int64_t K = s[0], C = s[1], R = nn::prod(s, 2);
  // dst[k, r, c] = src[k, c, r]
  permute_elems(w, t, K, C, R,
                [&](int64_t k, int64_t c, int64_t r) { return (k * R + r) * C + c; });
  return t;
}

// OIHW (host, 4-D) -> [R*S*K, C]: row (r*S + s)*K + k holds W[k, :, r, s] (the tap GEMM's B).
Result<Tensor> to_taps(const Tensor& w) {
  const Shape& s = w.shape();
  const int64_t K = s[0], C = s[1], R = s[2], S = s[3];
  KILN_ASSIGN_OR_RETURN(Tensor t, Tensor::create(w.dtype(), {R * S * K, C}));
  // dst[rs, k, c] = src[k, c, rs]
  permute_elems(w, t, K, C, R * S,
                [&](int64_t k, int64_t c, int64_t rs) { return (rs * K + k) * C + c; });
  return t;
}

// Device buffers for tuning, freed on scope exit (engine load only, never in a run).
struct DevBuf {
  void* p = nullptr;
  ~DevBuf() { if (p) cudaFree(p); }
};

// Times each algorithm as run() would call it when the fused legacy call applies
// (cudnnConvolutionBiasActivationForward with the bias, the residual and the activation): the
// fastest and its time per call. Time <= 0 when nothing could be timed that way.
Result<std::pair<ConvKernel::AlgoChoice, float>> ConvKernel::time_fused_legacy(
    cudnnHandle_t h, DataType dt, Plan& p, const std::vector<AlgoChoice>& algos, const void* x,
    const void* w, void* y, bool has_z, void* ws, size_t ws_bytes) const {
  std::pair<AlgoChoice, float> best{algos.front(), -1.f};
  const size_t es = dtype_size(dt);
  DevBuf zb, bb;
  const size_t yb = static_cast<size_t>(nn::prod(p.y_shape)) * es;
  if (has_z) {
    KILN_CUDA_CHECK(cudaMalloc(&zb.p, std::max<size_t>(1, yb)), where_ + ": tuning Z");
    KILN_RETURN_IF_ERROR(fill_tuning_data(zb.p, yb, dt).with_context(where_));
  }
  KILN_CUDA_CHECK(cudaMalloc(&bb.p, std::max<size_t>(1, static_cast<size_t>(p.M) * es)), where_ + ": tuning bias");
  KILN_RETURN_IF_ERROR(fill_tuning_data(bb.p, static_cast<size_t>(p.M) * es, dt).with_context(where_));
  cudnnActivationDescriptor_t act = nullptr;
  DNN_CHECK(cudnnCreateActivationDescriptor(&act), "cudnnCreateActivationDescriptor");
  struct ActGuard {
    cudnnActivationDescriptor_t a;
    ~ActGuard() { cudnnDestroyActivationDescriptor(a); }
  } ag{act};
  DNN_CHECK(cudnnSetActivationDescriptor(act, cfg_.act == EpAct::kRelu ? CUDNN_ACTIVATION_RELU
                                                                       : CUDNN_ACTIVATION_IDENTITY,
                                         CUDNN_PROPAGATE_NAN, 0.0),
            "cudnnSetActivationDescriptor");
  // The handle runs on the timer's stream while timing (it is this tune()'s own handle).
  TuneTimer timer;
  KILN_RETURN_IF_ERROR(timer.init(where_));
  DNN_CHECK(cudnnSetStream(h, timer.stream()), "cudnnSetStream");
  struct StreamBack {
    cudnnHandle_t h;
    ~StreamBack() { cudnnSetStream(h, nullptr); }
  } stream_back{h};
  const float one = 1.f, zero = 0.f;
  for (const AlgoChoice& a : algos) {
    if (!set_algo(h, dt, p, a.first, a.second).is_ok() || p.ws > ws_bytes) continue;
    if (!fused_call_ok(p, cfg_.act, true)) continue;
    auto call = [&]() {
      return cudnnConvolutionBiasActivationForward(h, &one, p.x.d, x, p.w.d, w, p.conv.d, p.algo,
                                                   ws, p.ws, has_z ? &one : &zero, p.y.d,
                                                   has_z ? zb.p : y, p.bias.d, bb.p, act, p.y.d, y);
    };
    // A refused call is skipped: run() would not use it either.
    KILN_ASSIGN_OR_RETURN(float ms, timer.time([&] { return call() == CUDNN_STATUS_SUCCESS; }));
    if (ms < 0) continue;
    if (best.second < 0 || ms < best.second) best = {a, ms};
  }
  return best;
}

Status ConvKernel::tune(const Node& n, DataType dt, const Shape& xs, const Tensor& w_host) {
  KILN_ASSIGN_OR_RETURN(std::shared_ptr<Plan> p, build_plan(n, dt, xs, w_host.shape()));
  if (!p->x.d) return Status::ok();
  // Graph API candidates, timed; compared below with the legacy API's best algorithm.
  std::shared_ptr<fe::ConvGraph> fg;
  float fe_ms = -1.f;
  std::string fe_error;
  if (p->fe_eligible) {
    auto cg = fe::ConvGraph::make_tuned(p->spec, cfg_.ws_limit, kGraphCandidates, &fe_ms);
    if (cg.is_ok()) {
      fg = std::move(cg.value());
    } else {
      fe_error = cg.status().message();
    }
  }
  cudnnHandle_t h = nullptr;
  DNN_CHECK(cudnnCreate(&h), "cudnnCreate");
  struct HandleGuard {
    cudnnHandle_t h;
    ~HandleGuard() { cudnnDestroy(h); }
  } guard{h};
  const size_t es = dtype_size(dt);
  const int64_t xn = p->explicit_pad ? p->padded_numel : nn::prod(xs);
  DevBuf xb, wb, yb, wsb;
  KILN_CUDA_CHECK(cudaMalloc(&xb.p, std::max<size_t>(1, static_cast<size_t>(xn) * es)), where_ + ": tuning X");
  KILN_RETURN_IF_ERROR(fill_tuning_data(xb.p, static_cast<size_t>(xn) * es, dt).with_context(where_));
  KILN_CUDA_CHECK(cudaMalloc(&yb.p, std::max<size_t>(1, static_cast<size_t>(nn::prod(p->y_shape)) * es)),
                  where_ + ": tuning Y");
  const void* w = w_krsc_.defined() ? w_krsc_.raw_data() : nullptr;
  if (!w) {
    KILN_CUDA_CHECK(cudaMalloc(&wb.p, std::max<size_t>(1, w_host.nbytes())), where_ + ": tuning W");
    KILN_CUDA_CHECK(cudaMemcpy(wb.p, w_host.raw_data(), w_host.nbytes(), cudaMemcpyHostToDevice),
                    where_ + ": tuning W");
    w = wb.p;
  }
  // Workspace: the largest any algorithm wants within the limit.
  size_t ws_max = 0;
  DNN_CHECK(cudnnSetConvolutionMathType(p->conv.d, math_for(dt, true)), "math type");
  for (int a = 0; a < CUDNN_CONVOLUTION_FWD_ALGO_COUNT; ++a) {
    size_t s = 0;
    if (cudnnGetConvolutionForwardWorkspaceSize(h, p->x.d, p->w.d, p->conv.d, p->y.d,
                                                static_cast<cudnnConvolutionFwdAlgo_t>(a), &s) ==
            CUDNN_STATUS_SUCCESS &&
        s <= cfg_.ws_limit)
      ws_max = std::max(ws_max, s);
  }
  while (ws_max > 0 && cudaMalloc(&wsb.p, ws_max) != cudaSuccess) {
    (void)cudaGetLastError();
    wsb.p = nullptr;
    ws_max /= 2;
  }
  std::vector<cudnnConvolutionFwdAlgoPerf_t> perf(CUDNN_CONVOLUTION_FWD_ALGO_COUNT * 2);
  int got = 0;
  DNN_CHECK(cudnnFindConvolutionForwardAlgorithmEx(h, p->x.d, xb.p, p->w.d, w, p->conv.d, p->y.d,
                                                   yb.p, static_cast<int>(perf.size()), &got,
                                                   perf.data(), wsb.p, ws_max),
            "cudnnFindConvolutionForwardAlgorithmEx");
  const bool no_tc = dt == DataType::kFloat && !cfg_.tf32;
  bool chosen = false;
  float legacy_ms = std::numeric_limits<float>::infinity();
  std::vector<std::pair<cudnnConvolutionFwdAlgo_t, cudnnMathType_t>> finalists;
  for (int i = 0; i < got; ++i) {  // sorted fastest first
    const auto& r = perf[static_cast<size_t>(i)];
    if (r.status != CUDNN_STATUS_SUCCESS || r.memory > cfg_.ws_limit) continue;
    if (no_tc && (r.mathType == CUDNN_TENSOR_OP_MATH ||
                  r.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION))
      continue;
    if (!chosen) {
      chosen = set_algo(h, dt, *p, r.algo, r.mathType).is_ok() && p->ws <= cfg_.ws_limit;
      if (chosen) legacy_ms = r.time;
    }
    if (finalists.size() < 3) finalists.push_back({r.algo, r.mathType});
  }
  if (!chosen) KILN_RETURN_IF_ERROR(pick_heuristic(h, dt, *p));
  p->tuned = chosen;
  // cudnnFind times the convolution alone, while the graph API time includes bias, residual and
  // ReLU. Where the run would use the fused legacy call, the legacy finalists are timed again
  // as that call, with the same harness as the graph API plans, so both sides count the same work
  // (ResNet-50's 1x1 expansions with a residual ran 1.5x slower on a graph plan chosen against
  // the convolution-only time).
  const bool has_bias = n.inputs.size() > 2 && !n.inputs[2].empty();
  const bool has_z = cfg_.fused && n.inputs.size() > 3 && !n.inputs[3].empty();
  static const bool retime = [] {  // KILN_CUDNN_RETIME_LEGACY=0: the convolution-only time (A/B)
    const char* e = std::getenv("KILN_CUDNN_RETIME_LEGACY");
    return !(e && e[0] == '0');
  }();
  if (retime && fg && chosen && !finalists.empty() && (has_bias || zero_bias_.defined()) &&
      (dt == DataType::kFloat16 || dt == DataType::kBFloat16)) {
    const AlgoChoice found{p->algo, p->math};
    auto full = time_fused_legacy(h, dt, *p, finalists, xb.p, w, yb.p, has_z, wsb.p, ws_max);
    const bool timed = full.is_ok() && full->second > 0;
    const AlgoChoice keep = timed ? full->first : found;
    KILN_RETURN_IF_ERROR(set_algo(h, dt, *p, keep.first, keep.second));
    if (timed) legacy_ms = full->second;
  }
  if (fg && fe_ms <= legacy_ms) p->fe = std::move(fg);
  // The GEMM forms, each timed as run() calls it (bias, residual, ReLU); the fastest of all wins.
  float best_ms = p->fe ? fe_ms : legacy_ms;
  for (int f = 0; f < kGemmForms; ++f) {
    if (!p->forms[static_cast<size_t>(f)].eligible || !w_krsc_.defined()) continue;
    Status st = tune_form(*p, f, dt, w_host, xb.p, yb.p, &best_ms);
    if (!st.is_ok()) KILN_LOG(kVerbose, where_ << ": " << kFormName[f] << " not timed: " << st.message());
    if (p->forms[static_cast<size_t>(f)].g && env_is_force(kFormForceEnv[f])) break;  // forced: no rival
  }
  for (int f = kFormTaps; f < kGemmForms; ++f)
    if (!p->forms[static_cast<size_t>(f)].g) w_form_[static_cast<size_t>(f)] = Tensor();
  KILN_CUDA_CHECK(cudaDeviceSynchronize(), where_ + ": tuning");
  std::lock_guard<std::mutex> lock(mu_);
  plans_[{xs, w_host.shape()}] = p;
  tactic_ = p->tactic() + (p->chosen_form() >= 0 || p->fe || chosen ? "" : ".heuristic");
  if (!fe_error.empty() && !p->fe) tune_error_ = "graph API: " + fe_error;
  return Status::ok();
}

Status ConvKernel::upload_form(const Plan& p, int f, const Tensor& w_host) {
  if (f == kFormPointwise || w_form_[static_cast<size_t>(f)].defined()) return Status::ok();
  const Backend* be = cuda_backend();
  if (!be) return internal_error(where_ + ": no CUDA backend for the " + kFormName[f] + "'s filter");
  Tensor t;
  if (f == kFormTaps) {
    KILN_ASSIGN_OR_RETURN(t, to_taps(w_host));
  } else {
    KILN_ASSIGN_OR_RETURN(Tensor krsc, to_krsc(w_host));
    const int64_t K = p.M, row = krsc.numel() / std::max<int64_t>(K, 1), kc = p.forms[kFormIm2col].prob.cin;
    KILN_ASSIGN_OR_RETURN(t, Tensor::create(w_host.dtype(), {K, kc}));  // zero-filled
    const size_t es = dtype_size(w_host.dtype());
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(static_cast<uint8_t*>(t.raw_data()) + k * kc * es,
                  static_cast<const uint8_t*>(krsc.raw_data()) + k * row * es, row * es);
  }
  KILN_ASSIGN_OR_RETURN(w_form_[static_cast<size_t>(f)], be->upload_constant(t));
  return Status::ok();
}

Status ConvKernel::enqueue_form(const Plan& p, int f, const PointwiseGemm& g, void* lt,
                                cudaStream_t s, const void* x, const void* bias, const void* z,
                                void* y, void* extra, void* lt_ws) const {
  const void* w = form_w(f);
  if (f == kFormPointwise) return g.run(lt, s, x, w, bias, z, y, lt_ws);
  if (f == kFormTaps) {
    KILN_RETURN_IF_ERROR(g.run(lt, s, x, w, nullptr, nullptr, extra, lt_ws));
    TapSumArgs a = p.tap_args;
    a.d = extra;
    a.y = y;
    a.bias = bias;
    a.z = z;
    return launch_tap_sum(a, s);
  }
  Im2colArgs a = p.i2c_args;
  a.x = x;
  a.col = extra;
  KILN_RETURN_IF_ERROR(launch_im2col(a, s));
  return g.run(lt, s, extra, w, bias, z, y, lt_ws);
}

Status ConvKernel::tune_form(Plan& p, int f, DataType dt, const Tensor& w_host, const void* x,
                             void* y, float* best_ms) {
  KILN_RETURN_IF_ERROR(upload_form(p, f, w_host));
  Plan::GemmForm& fm = p.forms[static_cast<size_t>(f)];
  const size_t es = dtype_size(dt);
  const size_t y_bytes = static_cast<size_t>(nn::prod(p.y_shape)) * es;
  DevBuf extra, gz, gb, lws;
  if (fm.extra) KILN_CUDA_CHECK(cudaMalloc(&extra.p, fm.extra), where_ + ": tuning workspace");
  if (p.spec.z) {
    KILN_CUDA_CHECK(cudaMalloc(&gz.p, std::max<size_t>(1, y_bytes)), where_ + ": tuning Z");
    KILN_RETURN_IF_ERROR(fill_tuning_data(gz.p, y_bytes, dt).with_context(where_));
  }
  if (p.spec.bias) {
    const size_t bb = static_cast<size_t>(p.M) * es;
    KILN_CUDA_CHECK(cudaMalloc(&gb.p, std::max<size_t>(1, bb)), where_ + ": tuning bias");
    KILN_RETURN_IF_ERROR(fill_tuning_data(gb.p, bb, dt).with_context(where_));
  }
  // The GEMM's own operands: the tap GEMM writes D (no epilogue), the im2col GEMM reads the
  // im2col matrix (made once here).
  const void* gx = x;
  const void *gbias = gb.p, *gzp = gz.p;
  void* gy = y;
  if (f == kFormTaps) gbias = gzp = nullptr, gy = extra.p;
  if (f == kFormIm2col) {
    Im2colArgs a = p.i2c_args;
    a.x = x;
    a.col = extra.p;
    KILN_RETURN_IF_ERROR(launch_im2col(a, nullptr).with_context(where_));
    KILN_CUDA_CHECK(cudaDeviceSynchronize(), where_ + ": tuning im2col");
    gx = extra.p;
  }
  KILN_ASSIGN_OR_RETURN(auto t, PointwiseGemm::tune(fm.prob, form_lt_limit(p, f), 16, gx, form_w(f),
                                                    gbias, gzp, gy, where_));
  if (!t.first) return Status::ok();
  float ms = t.second;  // the pointwise form is its GEMM
  if (f != kFormPointwise) {
    const PointwiseGemm& g = *t.first;
    if (g.workspace())
      KILN_CUDA_CHECK(cudaMalloc(&lws.p, g.workspace()), where_ + ": tuning GEMM workspace");
    cublasLtHandle_t lt = nullptr;
    if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) return runtime_error(where_ + ": cublasLtCreate");
    struct LtGuard {
      cublasLtHandle_t h;
      ~LtGuard() {
        cudaDeviceSynchronize();
        cublasLtDestroy(h);
      }
    } lt_guard{lt};
    TuneTimer timer;
    KILN_RETURN_IF_ERROR(timer.init(where_));
    KILN_ASSIGN_OR_RETURN(ms, timer.time([&] {
      return enqueue_form(p, f, g, lt, timer.stream(), x, gb.p, gz.p, y, extra.p, lws.p).is_ok();
    }));
  }
  KILN_LOG(kVerbose, where_ << ": " << kFormName[f] << ": best so far " << *best_ms << " ms, GEMM "
                            << t.second << " ms, whole form " << ms << " ms");
  if (ms > 0 && (ms < *best_ms || env_is_force(kFormForceEnv[f]))) {
    for (auto& other : p.forms) other.g.reset();
    fm.g = std::move(t.first);
    *best_ms = ms;
  }
  return Status::ok();
}

Status ConvKernel::prepare(const Node& n, const ConstantLookup& constants) {
  const Tensor* W = n.inputs.size() > 1 && constants ? constants(n.inputs[1]) : nullptr;
  if (!W || W->device() != Device::kHost || W->rank() < 3) return Status::ok();
  const Backend* be = cuda_backend();
  if (!be) return Status::ok();
  const DataType dt = W->dtype();
  cudnnDataType_t cdt;
  if (!dnn_dtype(dt, &cdt)) return Status::ok();  // run() reports the dtype
  if (cfg_.nhwc && W->rank() == 4) {
    KILN_ASSIGN_OR_RETURN(Tensor k, to_krsc(*W));
    KILN_ASSIGN_OR_RETURN(w_krsc_, be->upload_constant(k));
  }
  if (cfg_.fused && (cfg_.act == EpAct::kRelu || cfg_.act == EpAct::kNone) &&
      !(n.inputs.size() > 2 && !n.inputs[2].empty())) {
    KILN_ASSIGN_OR_RETURN(Tensor zb, Tensor::create(dt, {W->dim(0)}));
    KILN_ASSIGN_OR_RETURN(zero_bias_, be->upload_constant(zb));
  }
  const std::vector<int64_t> tune_shape = n.attr_ints("kiln_tune_shape");
  for (int64_t d : tune_shape)
    if (d < 0) return invalid_argument(where_ + ": kiln_tune_shape has a negative dim");
  if (!tune_shape.empty() && !cfg_.fe_name.empty()) {
    // A persisted graph API plan: build it now (no timing) so the first run does not.
    auto p = build_plan(n, dt, tune_shape, W->shape());
    if (p.is_ok() && p.value()->x.d && p.value()->fe_eligible) {
      auto cg = fe::ConvGraph::make(p.value()->spec, cfg_.fe_name, cfg_.ws_limit,
                                    n.attr_string("kiln_compiled"));
      if (cg.is_ok()) {
        p.value()->fe = std::move(cg.value());
        std::lock_guard<std::mutex> lk(mu_);
        plans_[{tune_shape, W->shape()}] = p.value();
        tactic_ = p.value()->tactic();
      }
    }
  } else if (const int f = cfg_.persisted_form(); !tune_shape.empty() && f >= 0) {
    // A persisted GEMM form: set up now (with cuDNN's heuristic algorithm as the fallback for
    // unaligned operands) so that the first run does not.
    auto p = build_plan(n, dt, tune_shape, W->shape());
    if (p.is_ok() && p.value()->x.d && p.value()->forms[static_cast<size_t>(f)].eligible &&
        upload_form(*p.value(), f, *W).is_ok()) {
      auto g = PointwiseGemm::from_tactic(p.value()->forms[static_cast<size_t>(f)].prob,
                                          cfg_.form_tactic[static_cast<size_t>(f)],
                                          form_lt_limit(*p.value(), f), where_);
      if (g.is_ok() && g.value()) {
        // On the graph makers' handle (a cudnnCreate per layer cost milliseconds each).
        Status st = fe::with_build_handle(
            [&](void* h) { return pick_heuristic(static_cast<cudnnHandle_t>(h), dt, *p.value()); });
        if (st.is_ok()) {
          p.value()->forms[static_cast<size_t>(f)].g = std::move(g.value());
          p.value()->tuned = true;
          std::lock_guard<std::mutex> lk(mu_);
          plans_[{tune_shape, W->shape()}] = p.value();
          tactic_ = p.value()->tactic();
        }
      }
    }
    // A refused tactic: the form's own filter layout is not needed.
    if (f != kFormPointwise && tactic_.rfind(kFormPrefix[f], 0) != 0) w_form_[static_cast<size_t>(f)] = Tensor();
  } else if (!tune_shape.empty() && !cfg_.forced) {
    Status st = tune(n, dt, tune_shape, *W);
    if (!st.is_ok()) tune_error_ = st.message();
  }
  return Status::ok();
}

std::optional<fe::ConvGraph::Prebuild> ConvKernel::pretune_spec(const Node& n,
                                                                const ConstantLookup& constants) {
  // prepare()'s conditions for tune() and tune()'s for timing graph API candidates.
  const Tensor* W = n.inputs.size() > 1 && constants ? constants(n.inputs[1]) : nullptr;
  if (!W || W->device() != Device::kHost || W->rank() != 4) return std::nullopt;
  cudnnDataType_t cdt;
  if (!dnn_dtype(W->dtype(), &cdt)) return std::nullopt;
  auto cfg = read_config(n);
  if (!cfg.is_ok() || !cfg.value().nhwc || !cfg.value().fe_name.empty() || cfg.value().forced ||
      cfg.value().persisted_form() >= 0)
    return std::nullopt;
  const std::vector<int64_t> tune_shape = n.attr_ints("kiln_tune_shape");
  if (tune_shape.empty()) return std::nullopt;
  for (int64_t d : tune_shape)
    if (d < 0) return std::nullopt;
  ConvKernel k(n, cfg.value());
  k.krsc_planned_ = true;
  auto p = k.build_plan(n, W->dtype(), tune_shape, W->shape());
  if (!p.is_ok() || !p.value()->x.d || !p.value()->fe_eligible) return std::nullopt;
  return fe::ConvGraph::Prebuild{p.value()->spec, cfg.value().ws_limit};
}

Result<std::shared_ptr<const Kernel>> prepare_conv(const Node& n, const ConstantLookup& constants) {
  KILN_ASSIGN_OR_RETURN(ConvConfig cfg, read_config(n));
  auto k = std::make_shared<ConvKernel>(n, cfg);
  KILN_RETURN_IF_ERROR(k->prepare(n, constants));
  return std::shared_ptr<const Kernel>(std::move(k));
}

// Unprepared use: a throwaway kernel (descriptors built per call, heuristics).
Status run_conv(OpContext& ctx, std::span<const Value> in, std::span<Value> out) {
  KILN_ASSIGN_OR_RETURN(ConvConfig cfg, read_config(ctx.node));
  ConvKernel k(ctx.node, cfg);
  return k.run(ctx, in, out);
}

bool float_dtype_ok(DataType dt) {
  return dt == DataType::kUndefined || dt == DataType::kFloat || dt == DataType::kFloat16 ||
         dt == DataType::kBFloat16 || dt == DataType::kDouble;
}

bool supports_conv(const Node& n, const TypeLookup& types) {
  if (n.inputs.size() < 2 || n.outputs.empty()) return false;
  const DataType dt = value_dtype(types, n.inputs[0]);
  if (!float_dtype_ok(dt)) return false;
  const DataType wt = value_dtype(types, n.inputs[1]);
  if (wt != DataType::kUndefined && dt != DataType::kUndefined && wt != dt) return false;
  if (!read_config(n).is_ok()) return false;
  if (n.attr_int("group", 1) < 1) return false;
  const TypeInfo* t = types ? types(n.inputs[0]) : nullptr;
  if (t && t->kind == TypeInfo::Kind::kTensor && t->has_shape) {
    const size_t r = t->dims.size();
    if (r < 3 || r > 5) return false;
    if (n.domain == "kiln" && n.attr_string("layout", "NCHW") == "NHWC" && r != 4) return false;
  }
  return true;
}

}  // namespace

std::shared_ptr<void> pretune_convs(const std::vector<const Node*>& nodes,
                                    const ConstantLookup& constants) {
  static const bool off = [] {
    const char* e = std::getenv("KILN_CUDA_PRETUNE");
    return e && e[0] == '0';
  }();
  if (off) return nullptr;
  std::vector<fe::ConvGraph::Prebuild> specs;
  for (const Node* n : nodes) {
    if (!((n->domain.empty() && n->op_type == "Conv") ||
          (n->domain == "kiln" && n->op_type == "FusedConv")))
      continue;
    if (auto s = ConvKernel::pretune_spec(*n, constants)) specs.push_back(*s);
  }
  return fe::ConvGraph::prebuild(specs, kGraphCandidates);
}

void register_conv_kernels(Registry& r) {
  r.add({"", "Conv", &run_conv, &prepare_conv, &supports_conv, {}, {}});
  r.add({"kiln", "FusedConv", &run_conv, &prepare_conv, &supports_conv, {}, {}});
}

}  // namespace kiln::cuda
