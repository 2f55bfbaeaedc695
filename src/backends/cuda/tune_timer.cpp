// See tune_timer.h.
#include "backends/cuda/tune_timer.h"

#include <algorithm>
#include <cstdlib>

#include "backends/cuda/cuda_env.h"

namespace kiln::cuda {

namespace {

constexpr float kGraphBelowMs = 0.05f;  // calls this short are timed as graph replays

bool graph_timing_on() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CUDA_TUNE_GRAPH");
    return !(e && e[0] == '0');
  }();
  return on;
}

struct GraphGuard {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t x = nullptr;
  ~GraphGuard() {
    if (x) cudaGraphExecDestroy(x);
    if (g) cudaGraphDestroy(g);
  }
};

}  // namespace

TuneTimer::~TuneTimer() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (a_) cudaEventDestroy(a_);
  if (b_) cudaEventDestroy(b_);
  if (stream_) cudaStreamDestroy(stream_);
}

Status TuneTimer::init(const std::string& what) {
  what_ = what + ": tuning";
  KILN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), what_);
  KILN_CUDA_CHECK(cudaEventCreate(&a_), what_);
  KILN_CUDA_CHECK(cudaEventCreate(&b_), what_);
  return Status::ok();
}

Result<float> TuneTimer::time_launched(const std::function<bool()>& call, int reps) {
  KILN_CUDA_CHECK(cudaEventRecord(a_, stream_), what_);
  bool ok = true;
  for (int r = 0; r < reps && ok; ++r) ok = call();
  KILN_CUDA_CHECK(cudaEventRecord(b_, stream_), what_);
  KILN_CUDA_CHECK(cudaEventSynchronize(b_), what_);
  if (!ok) return -1.f;
  float ms = 0;
  KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_), what_);
  return ms / static_cast<float>(reps);
}

Result<float> TuneTimer::time(const std::function<bool()>& call) {
  if (!stream_) return internal_error("tuning timer used before init()");
  // Warm-up (and a launch check), then one call alone for the repetition count.
  const bool warm = call();
  if (!warm || cudaStreamSynchronize(stream_) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1.f;
  }
  KILN_ASSIGN_OR_RETURN(float first, time_launched(call, 1));
  if (first < 0) return -1.f;
  // About 2 ms of work, 10..200 calls (10 for the long ones): a few microseconds each at batch 1
  // need many to rank stably.
  const int reps = first > 0.2f ? 10 : std::min(200, std::max(10, static_cast<int>(2.f / std::max(first, 0.01f))));
  // Calls of 50 µs and more hide the host's launch time behind the GPU's work: launched one by
  // one they time as in a graph, without the capture and instantiation (which tripled the
  // build time of ResNet-50 at batch 256).
  if (!graph_timing_on() || first >= kGraphBelowMs) return time_launched(call, reps);
  GraphGuard gg;
  bool ok = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (ok) {
    for (int r = 0; r < reps && ok; ++r) ok = call();
    const bool ended = cudaStreamEndCapture(stream_, &gg.g) == cudaSuccess;
    ok = ok && ended && gg.g && cudaGraphInstantiate(&gg.x, gg.g, 0) == cudaSuccess;
  }
  if (!ok) {  // not capturable: time the calls launched one by one
    (void)cudaGetLastError();
    return time_launched(call, reps);
  }
  KILN_CUDA_CHECK(cudaGraphLaunch(gg.x, stream_), what_);  // warm replay
  float best = -1.f;
  for (int t = 0; t < 3; ++t) {
    KILN_CUDA_CHECK(cudaEventRecord(a_, stream_), what_);
    KILN_CUDA_CHECK(cudaGraphLaunch(gg.x, stream_), what_);
    KILN_CUDA_CHECK(cudaEventRecord(b_, stream_), what_);
    KILN_CUDA_CHECK(cudaEventSynchronize(b_), what_);
    float ms = 0;
    KILN_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_), what_);
    if (best < 0 || ms < best) best = ms;
  }
  return best / static_cast<float>(reps);
}

}  // namespace kiln::cuda
