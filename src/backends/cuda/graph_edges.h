// A readable description of a captured CUDA graph: which kernels it launches, in what order, and
// which of its edges are programmatic (the dependent may launch before its producer finishes;
// cuda_types.cuh). Written by the execution context when KILN_CUDA_GRAPH_DUMP names a file, for
// profiling and for the PDL tests.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

namespace kiln::cuda {

// One line per node in topological order: index, kernel name (or node type), grid and block,
// and the incoming edges (producer index, "p" for a programmatic edge).
std::string describe_graph(cudaGraph_t graph);

}  // namespace kiln::cuda
