// cuDNN 9 graph API engines (through the header-only cudnn-frontend in third_party/):
//   - ConvGraph: NHWC convolution with bias + residual add + ReLU fused into one engine
//     (kiln.FusedConv in fp16/bf16), tuned by timing the heuristics' candidate plans;
//   - SdpaGraph: fused scaled-dot-product attention (cuDNN's flash-attention engines) for the
//     ONNX Attention op in fp16/bf16.
// Both are built per input shape. A plan is chosen (a) by name, when the node carries a tuned
// tactic, (b) by timing up to N candidates at engine build, or (c) as the first candidate of
// cuDNN's heuristics that builds within the workspace limit. Plans are named
// "cuda.conv.cudnn_fe.<engine-and-knobs>" / "cuda.sdpa.cudnn_fe.<...>" (Kernel::tactic()).
// Nothing here synchronizes a stream except tune(), which runs at engine build only.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/cuda/cuda_env.h"

namespace kiln::cuda::fe {

// Runs f with the process-wide cuDNN handle the graph makers build with (created on first use),
// under their mutex: for queries that run nothing on a stream (the legacy API's heuristics at
// engine load). f must not call the makers below.
Status with_build_handle(const std::function<Status(void* cudnn_handle)>& f);

// One NHWC 2-D convolution: X [N, H, W, C], W in KRSC [K, R, S, C/group], Y [N, P, Q, K],
// optional bias [K] and residual Z (Y's shape). y = relu?(conv(x, w) + bias + z).
struct ConvSpec {
  DataType dt = DataType::kFloat16;  // float16 or bfloat16
  int64_t N = 0, C = 0, H = 0, W = 0, K = 0, R = 0, S = 0, P = 0, Q = 0, group = 1;
  int64_t pre[2] = {0, 0}, post[2] = {0, 0}, stride[2] = {1, 1}, dil[2] = {1, 1};
  bool bias = false, z = false, relu = false;
};

struct ConvPtrs {
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;
  const void* z = nullptr;
  void* y = nullptr;
};

// Attention on [B, H, S, D] views given by strides (element strides for b, h, s; d is dense).
// Optional additive bias [B or 1, H or 1, S, T] (dense, of the I/O dtype).
struct SdpaSpec {
  DataType dt = DataType::kFloat16;
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, T = 0, D = 0;
  int64_t qs[3] = {}, ks[3] = {}, vs[3] = {}, os[3] = {};
  float scale = 1.f;
  bool causal = false;
  bool bias = false;
  int64_t bias_b = 1, bias_h = 1;  // the bias' B and H dims (1 = broadcast)
  // bias_strided: the bias has element strides bias_str over [B, H, S] (T dense); else it is a
  // dense [bias_b, bias_h, S, T] tensor. A stride of 0 on S reads one row of keys for every
  // query (an ONNX [B, 1, 1, T] mask taken as it is, without expanding it first).
  bool bias_strided = false;
  int64_t bias_str[3] = {0, 0, 0};
};

struct SdpaPtrs {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* bias = nullptr;
  void* o = nullptr;
};

class GraphImpl;  // the cudnn-frontend graph and its candidate plans (cudnn_graph.cpp)

// What the two graph kinds share: plan selection, tuning and execution.
class PlannedGraph {
 public:
  ~PlannedGraph();
  PlannedGraph(const PlannedGraph&) = delete;
  PlannedGraph& operator=(const PlannedGraph&) = delete;

  // Builds the plan called `name` (a tactic from tactic()), else the first heuristic candidate
  // within `ws_limit`. Fails (kUnsupported) when no candidate builds.
  Status select(void* cudnn_handle, const std::string& name, size_t ws_limit);
  // Builds and times up to `max_candidates` candidate plans within `ws_limit` on scratch
  // buffers it allocates (engine build only: allocates and synchronizes), keeps the fastest.
  // Returns its time in ms.
  Result<float> tune(void* cudnn_handle, size_t ws_limit, int max_candidates);
  // Enqueues the selected plan on the handle's stream.
  Status run(void* cudnn_handle, void* const* ptrs, void* workspace) const;

  size_t workspace() const { return ws_; }
  // "cuda.<kind>.cudnn_fe.<plan name>", "" before select()/tune().
  std::string tactic() const;
  bool ready() const { return index_ >= 0; }
  // The selected plan serialized by cuDNN (its runtime-compiled kernel included), for the
  // engine's plan file: load() takes it back without compiling. "" when cuDNN cannot.
  std::string serialized() const;
  // Whether the selected plan came from serialized bytes (tests).
  bool loaded() const;

 protected:
  explicit PlannedGraph(std::string kind);
  std::unique_ptr<GraphImpl> impl_;
  std::string kind_;                  // "conv" / "sdpa"
  std::vector<int64_t> uids_;         // variant-pack order of run()'s ptrs
  std::vector<size_t> buffer_bytes_;  // tuning buffer sizes, same order
  DataType dt_ = DataType::kFloat16;  // element type of the tuning buffers
  int64_t index_ = -1;                // selected plan
  size_t ws_ = 0;
  std::string name_;
  // Takes the plan `name` from `bytes` (serialized()): a graph of its own that run() executes.
  Status load(void* cudnn_handle, const std::string& bytes, const std::string& name);
  // The plan name inside a tactic ("cuda.<kind>.cudnn_fe.<name>"), "" for another tactic.
  std::string plan_name(const std::string& tactic) const;
};

// The makers build the operation graph with one process-wide cuDNN handle on GPU 0 (plans
// outlive the execution contexts whose handles run them), serialized by one mutex, and then
// select a plan: by `name` (a tactic), else the heuristics' first that fits `ws_limit`
// (make), or the fastest of up to `max_candidates` timed ones (make_tuned, engine build only).
// make returns the graph a live earlier make built for the same spec, plan name and limit;
// given the plan's serialized bytes (`compiled`, from serialized()), it loads them instead of
// building the plan (no compile), and builds it by name when they do not load.
class ConvGraph final : public PlannedGraph {
 public:
  static Result<std::shared_ptr<ConvGraph>> make(const ConvSpec& s, const std::string& name,
                                                 size_t ws_limit,
                                                 const std::string& compiled = std::string());
  // How many make() calls took their plan from serialized bytes (tests).
  static size_t loaded_count();
  static Result<std::unique_ptr<ConvGraph>> make_tuned(const ConvSpec& s, size_t ws_limit,
                                                       int max_candidates, float* ms);
  Status run(void* cudnn_handle, const ConvPtrs& p, void* workspace) const;

  // Builds the operation graph of each spec and up to `max_candidates` of its candidate plans
  // (those within its workspace limit), on up to 16 threads with a cuDNN handle each. Building a
  // plan is where cuDNN compiles its runtime-compiled engines, which is most of a cold ResNet-50
  // build when done one layer after the other. A later make_tuned with the same spec, limit and
  // count takes the graph with its built plans and only times them. Unclaimed graphs go when
  // the returned handle is released (nullptr: nothing to build).
  struct Prebuild {
    ConvSpec spec;
    size_t ws_limit = 0;
  };
  static std::shared_ptr<void> prebuild(const std::vector<Prebuild>& specs, int max_candidates);
  // How many pre-built graphs wait for their make_tuned, and how many make_tuned took (tests).
  static size_t prebuilt_count();
  static size_t prebuilt_taken();

 private:
  ConvGraph() : PlannedGraph("conv") {}
  // Builds the operation graph and asks cuDNN's heuristics for candidates (build lock held);
  // without `candidates`, only the tensors and operations (a plan then comes from load()).
  static Result<std::unique_ptr<ConvGraph>> create(void* cudnn_handle, const ConvSpec& s,
                                                   bool candidates = true);
  ConvSpec spec_;
};

class SdpaGraph final : public PlannedGraph {
 public:
  static Result<std::unique_ptr<SdpaGraph>> make(const SdpaSpec& s, size_t ws_limit);
  Status run(void* cudnn_handle, const SdpaPtrs& p, void* workspace) const;

 private:
  SdpaGraph() : PlannedGraph("sdpa") {}
  static Result<std::unique_ptr<SdpaGraph>> create(void* cudnn_handle, const SdpaSpec& s);
  SdpaSpec spec_;
};

// The ONNX Attention op through cuDNN's SDPA engines (attention_sdpa.cpp), called by the
// attention kernel for the geometries it can take: float16/bfloat16, no past K/V, no softcap,
// no nonpad lengths, no qk_matmul_output. Q/K/V/O are [B, H, S|T, D] views by strides (d dense).
struct SdpaCall {
  DataType dt = DataType::kFloat16;
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, T = 0, D = 0;
  int64_t qs[3] = {}, ks[3] = {}, vs[3] = {}, os[3] = {};
  float scale = 1.f;
  bool causal = false;  // top-left aligned (no past)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  // Optional mask (mask_dt set when the op has one) with strides over [B, Hq, S, T]: bool
  // (false masks) or additive float; keys j >= mask_len are masked (an empty mask: all keys).
  const void* mask = nullptr;
  DataType mask_dt = DataType::kUndefined;
  int64_t mstr[4] = {};
  int64_t mask_len = 0;
};
// true: cuDNN ran it; false: not applicable here (no engine for the shape, head size, ...) and
// the caller runs its own kernel. Errors are real failures.
Result<bool> try_sdpa(Env& env, const SdpaCall& c);

// Whether the graph API path is switched off (KILN_CUDNN_GRAPH=0: legacy conv API and Kiln's
// own attention kernels only; an A/B knob).
bool graph_api_disabled();

}  // namespace kiln::cuda::fe
