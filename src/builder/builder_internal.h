// Builder internals shared with tests and the conformance harness.
#pragma once
#include <cstdint>
#include <vector>

#include "ir/graph.h"
#include "kiln/builder.h"

namespace kiln {

// Optimizes `model.graph` in place (passes + kernel choice) and serializes it as a plan.
Result<std::vector<uint8_t>> build_plan(Model& model, const BuilderConfig& config, uint64_t model_hash,
                                        BuildReport* report = nullptr);

// The cache file name for a model hash + config (without directory).
std::string cache_key(uint64_t model_hash, const BuilderConfig& config);

}  // namespace kiln
