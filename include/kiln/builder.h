// Kiln builder API: ONNX model -> optimized plan (bytes or file), and the engine cache.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kiln/runtime.h"
#include "kiln/status.h"

namespace kiln {

struct BuilderConfig {
  int64_t max_batch = 0;          // >0: engine accepts any batch <= max_batch on dim 0 of inputs
  bool fp16 = false;              // request fp16 (warns and builds fp32 where not fast)
  uint64_t workspace_bytes = uint64_t{1} << 30;  // scratch limit for tactic selection
  std::string device = "cpu";     // backend: "cpu" or "cuda"
  bool bf16 = false;              // CUDA: bfloat16 instead of float16 for the reduced precision
  bool tf32 = false;              // CUDA: allow TF32 tensor cores for float32 convs/GEMMs
  bool io_reduced = false;        // --ioFormats=fp16: inputs/outputs in the reduced type too
  std::vector<std::string> fp32_layers;     // --precisionConstraints: node names / op types kept fp32
  std::vector<std::string> reduced_layers;  // node names / op types taken out of the default fp32 list
  std::string timing_cache;       // file of measured tactics, read before and written after a build
  bool progress = false;          // a progress line on stderr while timing tactics
};

struct BuildReport {
  size_t nodes_in = 0, nodes_out = 0;  // before / after passes
  size_t folded = 0, eliminated = 0;
  size_t tuned = 0, tuned_from_cache = 0;  // layers whose tactic was timed / taken from the cache
  double seconds = 0;
};

// Builds a plan from an ONNX file.
Result<std::vector<uint8_t>> build_plan_from_onnx(const std::string& onnx_path,
                                                  const BuilderConfig& config,
                                                  BuildReport* report = nullptr);

// Hash of a model: its bytes plus any external-data files it references.
Result<uint64_t> hash_model(const std::string& onnx_path);

// The engine cache (TensorRT sample's getCudaEngine): looks for a plan in `cache_dir` keyed by
// hash(model bytes + external data) + build config + device + plan format version; loads it if
// valid, else builds, saves and loads. A damaged or incompatible cached plan is reported in one
// sentence (warning) and rebuilt. `cache_hit` says which happened.
Result<std::shared_ptr<Engine>> load_or_build_cached(const std::string& onnx_path,
                                                     const BuilderConfig& config,
                                                     const std::string& cache_dir,
                                                     bool* cache_hit = nullptr,
                                                     std::string* plan_path = nullptr);

}  // namespace kiln
