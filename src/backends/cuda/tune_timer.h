// Timing of tactic candidates at engine build, the way engines run them: a short candidate's
// calls (under 50 µs) are captured into a CUDA graph and the graph is replayed between two
// events. Launched one by one, microsecond kernels measure the host's launch rate instead (a
// cuDNN graph-API execute costs a few microseconds of host time), which hides the difference
// between the candidates that matters inside Kiln's own CUDA-graph replay at batch 1. Longer
// calls hide the launch behind the GPU's work and are timed launched one by one.
// KILN_CUDA_TUNE_GRAPH=0 times every candidate launched one by one (A/B).
#pragma once
#include <cuda_runtime_api.h>

#include <functional>
#include <string>

#include "kiln/status.h"

namespace kiln::cuda {

class TuneTimer {
 public:
  TuneTimer() = default;
  ~TuneTimer();
  TuneTimer(const TuneTimer&) = delete;
  TuneTimer& operator=(const TuneTimer&) = delete;

  // Creates the timer's own non-blocking stream and events.
  Status init(const std::string& what);
  cudaStream_t stream() const { return stream_; }

  // Mean milliseconds of one call, or -1 when a call fails (the candidate is skipped). `call`
  // must enqueue its work on stream() only and return whether it was accepted. Errors are
  // failures of the timing itself (events, synchronization).
  Result<float> time(const std::function<bool()>& call);

 private:
  Result<float> time_launched(const std::function<bool()>& call, int reps);
  cudaStream_t stream_ = nullptr;
  cudaEvent_t a_ = nullptr, b_ = nullptr;
  std::string what_;
};

}  // namespace kiln::cuda
