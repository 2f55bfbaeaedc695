// The CUDA execution context: stream, library handles, device pool, pinned staging buffers,
// CUDA events for timings, and CUDA-graph capture/replay of the compute part.
#include <cublasLt.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "backends/cuda/conv_gemm.h"
#include "backends/cuda/cuda_env.h"
#include "backends/cuda/device_pool.h"
#include "backends/cuda/graph_edges.h"
#include "base/logging.h"
#include "runtime/device_context.h"

namespace kiln::cuda {

namespace {

Status dnn_check(cudnnStatus_t s, const std::string& what) {
  if (s == CUDNN_STATUS_SUCCESS) return Status::ok();
  return runtime_error(what + ": cuDNN error " + cudnnGetErrorString(s));
}

Status lt_check(cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::ok();
  return runtime_error(what + ": cuBLAS error " + std::to_string(static_cast<int>(s)));
}

// Grow-only pinned host buffer.
struct Pinned {
  std::shared_ptr<Storage> storage;
  Status ensure(size_t bytes) {
    if (storage && storage->size() >= bytes) return Status::ok();
    void* p = nullptr;
    size_t n = bytes ? bytes : 1;
    KILN_CUDA_CHECK(cudaMallocHost(&p, n), "allocating " + std::to_string(n) + " bytes of pinned host memory");
    storage = Storage::adopt(p, n, Device::kHost, [](void* q) { cudaFreeHost(q); });
    return Status::ok();
  }
};

std::string shape_key(const CompiledGraph& cg, const Frame& f) {
  std::string k;
  for (int s : cg.input_slots) {
    const Value& v = f.slots[static_cast<size_t>(s)];
    k += v.describe();
    if (v.is_tensor() && v.tensor.on_device())  // user-provided device buffers are baked into the graph
      k += "@" + std::to_string(reinterpret_cast<uintptr_t>(v.tensor.raw_data()));
    k += ";";
  }
  return k;
}

// Cancels the pool's run when enqueue fails before its end (nothing is planned from a failed run).
struct RunGuard {
  DevicePool* pool = nullptr;
  ~RunGuard() {
    if (pool) pool->cancel_run();
  }
};

class CudaContext final : public DeviceContext, public NodeObserver, public SideStream {
 public:
  ~CudaContext() override {
    if (side_stream_) cudaStreamSynchronize(side_stream_);
    for (auto& e : layer_ev_)
      if (e) cudaEventDestroy(e);
    if (last_stream_) cudaStreamSynchronize(last_stream_);
    if (exec_) cudaGraphExecDestroy(exec_);
    for (auto& e : ev_)
      if (e) cudaEventDestroy(e);
    if (dnn_) cudnnDestroy(dnn_);
    if (side_dnn_) cudnnDestroy(side_dnn_);
    if (lt_) cublasLtDestroy(lt_);
    for (auto& e : side_ev_)
      if (e) cudaEventDestroy(e);
    if (side_stream_) cudaStreamDestroy(side_stream_);
    if (own_stream_) cudaStreamDestroy(own_stream_);
  }

  Status init(const PlanInfo& info) {
    KILN_CUDA_CHECK(cudaSetDevice(0), "selecting GPU 0");
    KILN_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking), "creating a CUDA stream");
    for (auto& e : ev_) KILN_CUDA_CHECK(cudaEventCreate(&e), "creating a CUDA event");
    KILN_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking), "creating a CUDA stream");
    for (auto& e : side_ev_)
      KILN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "creating a CUDA event");
    pool_ = DevicePool::create(0);
    env_.device = 0;
    env_.pool = pool_.get();
    // Library workspace: the builder's limit caps it; kernels needing more ask env.scratch().
    // Allocated here, outside any run, it is a long-lived pool block, never part of the arena plan.
    size_t ws = std::min<uint64_t>(info.workspace_bytes ? info.workspace_bytes : (32u << 20), 32u << 20);
    KILN_ASSIGN_OR_RETURN(workspace_, pool_->allocate(ws));
    env_.workspace = workspace_->data();
    env_.workspace_bytes = ws;
    return Status::ok();
  }

  Status enqueue(const CompiledGraph& cg, Frame& frame, void* stream, uint64_t seed) override {
    cudaStream_t s = stream ? static_cast<cudaStream_t>(stream) : own_stream_;
    // The previous run must be done reading the staging buffers before they are overwritten.
    if (pending_) KILN_CUDA_CHECK(cudaEventSynchronize(ev_[1]), "waiting for the previous inference's input copies");
    // Device blocks the previous run released are reused in stream order (the arena reuses the very
    // same addresses every run): on another stream, first wait for the previous run's work.
    if (pending_ && last_stream_ && last_stream_ != s)
      KILN_CUDA_CHECK(cudaStreamWaitEvent(s, ev_[3], 0), "ordering this inference after the previous one");
    last_stream_ = s;
    env_.stream = s;
    if (!handles_ready_) KILN_RETURN_IF_ERROR(create_handles(cg));
    if (dnn_) KILN_RETURN_IF_ERROR(dnn_check(cudnnSetStream(dnn_, s), "binding the cuDNN handle to the stream"));
    frame.device_env = &env_;
    frame.side = nullptr;
    if (!profiling_ && has_side_nodes(cg)) {
      KILN_RETURN_IF_ERROR(prepare_side());
      frame.side = this;
    }
    if (profiling_) {
      KILN_RETURN_IF_ERROR(collect_profile());
      if (layer_ev_.size() < 2 * cg.nodes.size()) {
        size_t old = layer_ev_.size();
        layer_ev_.resize(2 * cg.nodes.size(), nullptr);
        for (size_t i = old; i < layer_ev_.size(); ++i)
          KILN_CUDA_CHECK(cudaEventCreate(&layer_ev_[i]), "creating a CUDA event");
      }
      recorded_.assign(cg.nodes.size(), 0);
      frame.observer = this;
    }
    if (frame.alt.size() != frame.slots.size()) frame.alt.assign(frame.slots.size(), Value());
    const std::string key = graph_on_ ? shape_key(cg, frame) : std::string();
    if (graph_on_ && key != key_) {
      reset_graph();
      key_ = key;
    }

    KILN_CUDA_CHECK(cudaEventRecord(ev_[0], s), "recording a CUDA event");
    // Inputs: host tensors -> pinned staging -> device (async).
    in_stage_.resize(cg.input_slots.size());
    dev_in_.resize(cg.input_slots.size());
    for (size_t i = 0; i < cg.input_slots.size(); ++i) {
      size_t slot = static_cast<size_t>(cg.input_slots[i]);
      Value& v = frame.slots[slot];
      if (!v.is_tensor() || v.tensor.on_device() || v.tensor.dtype() == DataType::kString) continue;
      const Tensor& h = v.tensor;
      KILN_RETURN_IF_ERROR(in_stage_[i].ensure(h.nbytes()));
      if (h.nbytes()) std::memcpy(in_stage_[i].storage->data(), h.raw_data(), h.nbytes());
      KILN_ASSIGN_OR_RETURN(Tensor staged, Tensor::view(h.dtype(), h.shape(), in_stage_[i].storage));
      Tensor& d = dev_in_[i];
      if (!graph_on_ || !d.defined() || d.dtype() != h.dtype() || d.shape() != h.shape()) {
        KILN_ASSIGN_OR_RETURN(d, env_.alloc(h.dtype(), h.shape()));
      }
      if (h.nbytes())
        KILN_CUDA_CHECK(cudaMemcpyAsync(d.raw_data(), staged.raw_data(), h.nbytes(), cudaMemcpyHostToDevice, s),
                        "copying input " + std::to_string(i) + " to the GPU");
      frame.slots[slot] = Value(d);
      frame.alt[slot] = Value(staged);
      if (!graph_on_) d = Tensor();  // the slot holds it; freed after its last use
    }
    KILN_CUDA_CHECK(cudaEventRecord(ev_[1], s), "recording a CUDA event");

    // One run of the pool's arena (device_pool.h): compute + output staging. The first run is
    // recorded and planned at end_run; later runs are served from the arena. Input buffers are
    // allocated above, outside the run (with CUDA graphs they persist in dev_in_), so the trace
    // holds compute allocations only and the warm-up run's trace matches the capture run's.
    // CUDA graphs: the warm-up run is the recorded one, so the capture run is the first served
    // from the arena and the graph bakes in arena addresses, reserved for the pool's lifetime (the
    // arena is never freed or moved). The graph's outputs stay alive in captured_, so the server
    // lends their bytes to no other request; requests the arena cannot serve come from the pool,
    // whose blocks a captured graph keeps using as before. Replays allocate nothing. A run that
    // captures or replays is never recorded (its graph would keep the pool blocks the arena
    // replaces and that end_run hands back).
    const bool graph_run = graph_on_ && !graph_failed_ && !profiling_ && (exec_ || warm_ != 0);
    pool_->begin_run(/*may_record=*/!graph_run);
    RunGuard run{pool_.get()};
    // KILN_CUDA_PROFILE_RUN=N: cudaProfilerStart/Stop around this context's N-th run's kernels,
    // so `ncu --profile-from-start off` (or nsys' capture range) sees one inference and none of
    // the build's tactic timing.
    ++runs_;
    const bool profile_this = profile_run() > 0 && runs_ == profile_run();
    if (profile_this) KILN_CUDA_CHECK(cudaProfilerStart(), "cudaProfilerStart");
    Status computed = compute(cg, frame, s, seed);
    if (profile_this) {
      cudaStreamSynchronize(s);
      cudaProfilerStop();
    }
    KILN_RETURN_IF_ERROR(computed);
    KILN_CUDA_CHECK(cudaEventRecord(ev_[2], s), "recording a CUDA event");

    // Outputs: device -> pinned host buffers (async); valid after synchronize().
    out_stage_.resize(cg.output_slots.size());
    for (size_t i = 0; i < cg.output_slots.size(); ++i) {
      Value& v = frame.slots[static_cast<size_t>(cg.output_slots[i])];
      if (outputs_on_device_ || !v.is_tensor() || !v.tensor.on_device()) continue;
      const Tensor& d = v.tensor;
      if (!out_stage_[i].storage || out_stage_[i].storage->size() < d.nbytes()) {
        // Growing: the previous run may still be copying into the old buffer.
        if (pending_) KILN_CUDA_CHECK(cudaEventSynchronize(ev_[3]), "waiting for the previous inference");
        KILN_RETURN_IF_ERROR(out_stage_[i].ensure(d.nbytes()));
      }
      KILN_ASSIGN_OR_RETURN(Tensor h, Tensor::view(d.dtype(), d.shape(), out_stage_[i].storage));
      if (d.nbytes())
        KILN_CUDA_CHECK(cudaMemcpyAsync(h.raw_data(), d.raw_data(), d.nbytes(), cudaMemcpyDeviceToHost, s),
                        "copying output " + std::to_string(i) + " to the host");
      v = Value(h);
    }
    KILN_CUDA_CHECK(cudaEventRecord(ev_[3], s), "recording a CUDA event");
    pending_ = true;
    // Outside capture: the recorded run's end plans the arena (waits for this run once). The
    // pool's cached blocks go back to the driver unless a captured graph still uses them.
    run.pool = nullptr;
    return pool_->end_run(s, /*may_free_cached=*/exec_ == nullptr);
  }

  Status synchronize() override {
    if (!last_stream_) return Status::ok();
    KILN_CUDA_CHECK(cudaStreamSynchronize(last_stream_), "running inference on the GPU");
    return Status::ok();
  }

  // NodeObserver: events around each top-level layer while profiling.
  void before(size_t i) override {
    if (2 * i + 1 < layer_ev_.size()) cudaEventRecord(layer_ev_[2 * i], env_.stream);
  }
  void after(size_t i) override {
    if (2 * i + 1 < layer_ev_.size()) {
      cudaEventRecord(layer_ev_[2 * i + 1], env_.stream);
      recorded_[i] = 1;
    }
  }
  Status collect_profile() {
    if (recorded_.empty()) return Status::ok();
    KILN_CUDA_CHECK(cudaEventSynchronize(ev_[3]), "waiting for the profiled inference");
    if (layer_total_.size() < recorded_.size()) layer_total_.resize(recorded_.size(), 0.0);
    for (size_t i = 0; i < recorded_.size(); ++i) {
      if (!recorded_[i]) continue;
      float ms = 0;
      KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, layer_ev_[2 * i], layer_ev_[2 * i + 1]), "reading layer times");
      layer_total_[i] += ms;
    }
    recorded_.clear();
    return Status::ok();
  }
  Status set_profiling(bool on) override {
    profiling_ = on;
    layer_total_.clear();
    recorded_.clear();
    return Status::ok();
  }
  Result<std::vector<double>> layer_ms(size_t num_nodes) override {
    KILN_RETURN_IF_ERROR(collect_profile());
    std::vector<double> r = layer_total_;
    r.resize(num_nodes, 0.0);
    return r;
  }

  // SideStream (executor.h): side nodes run on side_stream_ with their own cuDNN handle and
  // library workspace; the pool parks released memory until the join.
  Result<void*> fork() override {
    pool_->set_parking(true);
    side_env_ = env_;
    side_env_.stream = side_stream_;
    side_env_.cudnn = side_dnn_;
    side_env_.workspace = side_ws_->data();
    side_env_.workspace_bytes = env_.workspace_bytes;
    Status st = check(cudaEventRecord(side_ev_[0], env_.stream), "forking the side stream");
    if (st.is_ok()) st = check(cudaStreamWaitEvent(side_stream_, side_ev_[0], 0), "forking the side stream");
    if (!st.is_ok()) {
      pool_->set_parking(false);
      return st;
    }
    return static_cast<void*>(&side_env_);
  }
  Status join() override {
    Status st = check(cudaEventRecord(side_ev_[1], side_stream_), "joining the side stream");
    if (st.is_ok()) st = check(cudaStreamWaitEvent(env_.stream, side_ev_[1], 0), "joining the side stream");
    pool_->set_parking(false);
    return st;
  }

  Status set_cuda_graph(bool on) override {
    graph_on_ = on;
    reset_graph();
    return Status::ok();
  }
  void set_outputs_on_device(bool on) override { outputs_on_device_ = on; }

  Result<InferenceTimings> last_timings() override {
    if (!pending_) return invalid_argument("no inference has run on this context yet");
    KILN_CUDA_CHECK(cudaEventSynchronize(ev_[3]), "waiting for the inference");
    InferenceTimings t;
    float ms = 0;
    KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[0], ev_[1]), "reading CUDA event times");
    t.h2d_ms = ms;
    KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[1], ev_[2]), "reading CUDA event times");
    t.compute_ms = ms;
    KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[2], ev_[3]), "reading CUDA event times");
    t.d2h_ms = ms;
    KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, ev_[0], ev_[3]), "reading CUDA event times");
    t.total_ms = ms;
    return t;
  }

  size_t device_memory_bytes() const override { return pool_ ? pool_->reserved_bytes() : 0; }

  Result<Tensor> upload(const Tensor& h) override {
    if (h.on_device()) return h;
    KILN_ASSIGN_OR_RETURN(Tensor d, env_.alloc(h.dtype(), h.shape()));
    if (h.nbytes()) KILN_CUDA_CHECK(cudaMemcpy(d.raw_data(), h.raw_data(), h.nbytes(), cudaMemcpyHostToDevice),
                                    "uploading " + h.describe());
    return d;
  }

 private:
  // Library handles cost tens of milliseconds each: made only when a kernel of the graph uses them.
  static void scan_kernels(const CompiledGraph& cg, bool& conv, bool& gemm) {
    for (auto& cn : cg.nodes) {
      const std::string& k = cn.node->kernel;
      // cuDNN: convolutions, and attention (cuDNN's SDPA engines).
      if (k.find("Conv") != std::string::npos || k.find("Attention") != std::string::npos) conv = true;
      if (k.find("Gemm") != std::string::npos || k.find("MatMul") != std::string::npos) gemm = true;
      // Pointwise convolutions may run as cuBLASLt GEMMs (conv_gemm.h).
      // So may other convolutions (the tap-GEMM and im2col forms).
      const std::string t = cn.node->attr_string("kiln_tactic");
      if (t.rfind(kPointwiseTacticPrefix, 0) == 0 || t.rfind(kTapTacticPrefix, 0) == 0 ||
          t.rfind(kIm2colTacticPrefix, 0) == 0)
        gemm = true;
    }
    for (auto& [g, sub] : cg.subgraphs) scan_kernels(*sub, conv, gemm);
  }
  Status create_handles(const CompiledGraph& cg) {
    bool conv = false, gemm = false;
    scan_kernels(cg, conv, gemm);
    if (conv && !dnn_) KILN_RETURN_IF_ERROR(dnn_check(cudnnCreate(&dnn_), "creating a cuDNN handle"));
    if (gemm && !lt_) KILN_RETURN_IF_ERROR(lt_check(cublasLtCreate(&lt_), "creating a cuBLASLt handle"));
    env_.cudnn = dnn_;
    env_.cublaslt = lt_;
    handles_ready_ = true;
    return Status::ok();
  }

  static bool has_side_nodes(const CompiledGraph& cg) {
    for (auto& cn : cg.nodes)
      if (cn.side) return true;
    return false;
  }
  // The side stream's cuDNN handle and workspace, made once, outside any run.
  Status prepare_side() {
    if (dnn_ && !side_dnn_) {
      KILN_RETURN_IF_ERROR(dnn_check(cudnnCreate(&side_dnn_), "creating a cuDNN handle"));
      KILN_RETURN_IF_ERROR(dnn_check(cudnnSetStream(side_dnn_, side_stream_), "binding the cuDNN handle to the side stream"));
    }
    if (!side_ws_) {
      KILN_ASSIGN_OR_RETURN(side_ws_, pool_->allocate(env_.workspace_bytes));
    }
    return Status::ok();
  }

  void reset_graph() {
    if (exec_) cudaGraphExecDestroy(exec_);
    exec_ = nullptr;
    key_.clear();
    warm_ = 0;
    captured_.clear();
    graph_failed_ = false;
  }

  Status compute(const CompiledGraph& cg, Frame& frame, cudaStream_t s, uint64_t seed) {
    if (!graph_on_ || graph_failed_ || profiling_) return run_graph(cg, frame, seed);
    if (exec_) {
      KILN_CUDA_CHECK(cudaGraphLaunch(exec_, s), "launching the CUDA graph");
      for (auto& [slot, v] : captured_) frame.slots[static_cast<size_t>(slot)] = v;
      return Status::ok();
    }
    if (warm_++ == 0) return run_graph(cg, frame, seed);  // warm-up: fills the pool, loads modules
    // Capture. Relaxed mode: other threads may use the CUDA API meanwhile.
    KILN_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), "starting CUDA graph capture");
    env_.capturing = true;
    Status st = run_graph(cg, frame, seed);
    env_.capturing = false;
    cudaGraph_t graph = nullptr;
    cudaError_t e = cudaStreamEndCapture(s, &graph);
    if (st.is_ok() && e == cudaSuccess) {
      if (const char* dump = std::getenv("KILN_CUDA_GRAPH_DUMP"); dump && *dump) {
        if (FILE* f = std::fopen(dump, "w")) {
          std::string d = describe_graph(graph);
          std::fwrite(d.data(), 1, d.size(), f);
          std::fclose(f);
        } else {
          KILN_LOG(kWarning, "KILN_CUDA_GRAPH_DUMP: cannot write " << dump);
        }
      }
      e = cudaGraphInstantiate(&exec_, graph, 0);
    }
    if (graph) cudaGraphDestroy(graph);
    if (!st.is_ok() || e != cudaSuccess) {
      cudaGetLastError();
      exec_ = nullptr;
      graph_failed_ = true;
      KILN_LOG(kWarning, "this engine cannot run as a CUDA graph ("
                             << (st.is_ok() ? std::string(cudaGetErrorString(e)) : st.message())
                             << "); running it kernel by kernel");
      // The captured work never ran: run it for real now.
      return run_graph(cg, frame, seed);
    }
    captured_.clear();
    for (int slot : cg.output_slots) captured_.emplace_back(slot, frame.slots[static_cast<size_t>(slot)]);
    KILN_CUDA_CHECK(cudaGraphLaunch(exec_, s), "launching the CUDA graph");
    return Status::ok();
  }

  std::shared_ptr<DevicePool> pool_;
  std::shared_ptr<Storage> workspace_, side_ws_;
  Env env_, side_env_;
  cudaStream_t side_stream_ = nullptr;
  cudnnHandle_t side_dnn_ = nullptr;
  cudaEvent_t side_ev_[2] = {};  // fork, join
  cudaStream_t own_stream_ = nullptr, last_stream_ = nullptr;
  cudnnHandle_t dnn_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  cudaEvent_t ev_[4] = {};
  bool pending_ = false, handles_ready_ = false, profiling_ = false;
  std::vector<cudaEvent_t> layer_ev_;  // 2 per top-level node: before, after
  std::vector<char> recorded_;         // nodes timed in the last run (not yet collected)
  std::vector<double> layer_total_;
  std::vector<Pinned> in_stage_, out_stage_;
  std::vector<Tensor> dev_in_;
  bool graph_on_ = false, outputs_on_device_ = false, graph_failed_ = false;
  std::string key_;
  int warm_ = 0;
  int64_t runs_ = 0;
  static int64_t profile_run() {
    static const int64_t n = [] {
      const char* e = std::getenv("KILN_CUDA_PROFILE_RUN");
      return e ? std::atoll(e) : int64_t{0};
    }();
    return n;
  }
  cudaGraphExec_t exec_ = nullptr;
  std::vector<std::pair<int, Value>> captured_;
};

class CudaRuntime final : public DeviceRuntime {
 public:
  Result<std::unique_ptr<DeviceContext>> create_context(const PlanInfo& info) const override {
    auto c = std::make_unique<CudaContext>();
    KILN_RETURN_IF_ERROR(c->init(info));
    return std::unique_ptr<DeviceContext>(std::move(c));
  }
  Result<std::string> fingerprint() const override { return device_fingerprint(); }
};

}  // namespace

Result<std::string> device_fingerprint() {
  static std::mutex mu;
  static std::string cached;
  std::lock_guard<std::mutex> lock(mu);
  if (!cached.empty()) return cached;
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    cudaGetLastError();
    return Status(StatusCode::kUnsupported,
                  std::string("no usable CUDA GPU (") + (e == cudaSuccess ? "none found" : cudaGetErrorString(e)) + ")");
  }
  cudaDeviceProp p{};
  KILN_CUDA_CHECK(cudaGetDeviceProperties(&p, 0), "reading GPU 0's properties");
  size_t dnn = cudnnGetVersion();
  size_t lt = cublasLtGetVersion();
  cached = "cuda:sm_" + std::to_string(p.major * 10 + p.minor) + ":cudnn-" + std::to_string(dnn) + ":cublasLt-" +
           std::to_string(lt);
  return cached;
}

std::string device_name() {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) {
    cudaGetLastError();
    return "unknown GPU";
  }
  return p.name;
}

}  // namespace kiln::cuda

namespace kiln {
const DeviceRuntime* cuda_runtime() {
  static const cuda::CudaRuntime r;
  return &r;
}
}  // namespace kiln
