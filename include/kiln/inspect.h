// Model and plan summaries for `kiln inspect`.
#pragma once
#include <string>

#include "kiln/status.h"

namespace kiln {

// Summary of an ONNX model: IR/opsets/producer, inputs and outputs with shapes, op histogram,
// parameter count, operators this build cannot run. `with_nodes` appends the whole graph.
Result<std::string> inspect_onnx(const std::string& path, bool with_nodes);
// Summary of a plan: format/Kiln version, device, build config, I/O, layers and their kernels.
Result<std::string> inspect_plan(const std::string& path);
// True when the file starts with the plan magic.
bool is_plan_file(const std::string& path);

}  // namespace kiln
