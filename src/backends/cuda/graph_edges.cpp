#include "backends/cuda/graph_edges.h"

#include <cuda.h>  // driver types only: the functions are fetched through the runtime

#include <algorithm>
#include <map>
#include <sstream>

namespace kiln::cuda {

namespace {

using GetParamsFn = CUresult (*)(CUgraphNode, CUDA_KERNEL_NODE_PARAMS*);
using FuncNameFn = CUresult (*)(const char**, CUfunction);
using KernelNameFn = CUresult (*)(const char**, CUkernel);

template <typename F>
F driver_fn(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &p, CUDART_VERSION, cudaEnableDefault, &q) !=
          cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<F>(p);
}

struct KernelInfo {
  std::string name;
  unsigned grid[3] = {0, 0, 0}, block[3] = {0, 0, 0}, smem = 0;
};

bool kernel_info(cudaGraphNode_t n, KernelInfo* out) {
  static const auto get = driver_fn<GetParamsFn>("cuGraphKernelNodeGetParams");
  static const auto fname = driver_fn<FuncNameFn>("cuFuncGetName");
  static const auto kname = driver_fn<KernelNameFn>("cuKernelGetName");
  if (!get) return false;
  CUDA_KERNEL_NODE_PARAMS p{};
  if (get(reinterpret_cast<CUgraphNode>(n), &p) != CUDA_SUCCESS) return false;
  const char* s = nullptr;
  if (p.func && fname) fname(&s, p.func);
  if (!s && p.kern && kname) kname(&s, p.kern);
  out->name = s ? s : "?";
  out->grid[0] = p.gridDimX, out->grid[1] = p.gridDimY, out->grid[2] = p.gridDimZ;
  out->block[0] = p.blockDimX, out->block[1] = p.blockDimY, out->block[2] = p.blockDimZ;
  out->smem = p.sharedMemBytes;
  return true;
}

struct Edges {
  std::vector<cudaGraphNode_t> from, to;
  std::vector<cudaGraphEdgeData> data;
};

bool get_nodes(cudaGraph_t g, std::vector<cudaGraphNode_t>* nodes) {
  size_t n = 0;
  if (cudaGraphGetNodes(g, nullptr, &n) != cudaSuccess) return false;
  nodes->resize(n);
  return cudaGraphGetNodes(g, nodes->data(), &n) == cudaSuccess;
}

bool get_edges(cudaGraph_t g, Edges* e) {
  size_t n = 0;
  if (cudaGraphGetEdges(g, nullptr, nullptr, nullptr, &n) != cudaSuccess) return false;
  e->from.resize(n), e->to.resize(n), e->data.resize(n);
  return cudaGraphGetEdges(g, e->from.data(), e->to.data(), e->data.data(), &n) == cudaSuccess;
}

bool is_kernel(cudaGraphNode_t n) {
  cudaGraphNodeType t{};
  return cudaGraphNodeGetType(n, &t) == cudaSuccess && t == cudaGraphNodeTypeKernel;
}

const char* type_name(cudaGraphNode_t n) {
  cudaGraphNodeType t{};
  if (cudaGraphNodeGetType(n, &t) != cudaSuccess) return "?";
  switch (t) {
    case cudaGraphNodeTypeKernel:
      return "kernel";
    case cudaGraphNodeTypeMemcpy:
      return "memcpy";
    case cudaGraphNodeTypeMemset:
      return "memset";
    case cudaGraphNodeTypeHost:
      return "host";
    case cudaGraphNodeTypeGraph:
      return "graph";
    case cudaGraphNodeTypeEmpty:
      return "empty";
    case cudaGraphNodeTypeWaitEvent:
      return "wait_event";
    case cudaGraphNodeTypeEventRecord:
      return "event_record";
    default:
      return "other";
  }
}

}  // namespace

std::string describe_graph(cudaGraph_t g) {
  std::vector<cudaGraphNode_t> nodes;
  Edges e;
  if (!get_nodes(g, &nodes) || !get_edges(g, &e)) return "cannot read the graph\n";
  // Topological order (Kahn), ties by the order cudaGraphGetNodes gives (creation order).
  std::map<cudaGraphNode_t, size_t> pos;
  for (size_t i = 0; i < nodes.size(); ++i) pos[nodes[i]] = i;
  std::vector<int> indeg(nodes.size(), 0);
  std::vector<std::vector<size_t>> in(nodes.size()), out(nodes.size());
  for (size_t k = 0; k < e.from.size(); ++k) {
    size_t a = pos[e.from[k]], b = pos[e.to[k]];
    ++indeg[b];
    in[b].push_back(k);
    out[a].push_back(b);
  }
  std::vector<size_t> order, ready;
  for (size_t i = 0; i < nodes.size(); ++i)
    if (!indeg[i]) ready.push_back(i);
  while (!ready.empty()) {
    auto it = std::min_element(ready.begin(), ready.end());
    size_t i = *it;
    ready.erase(it);
    order.push_back(i);
    for (size_t b : out[i])
      if (--indeg[b] == 0) ready.push_back(b);
  }
  std::vector<size_t> rank(nodes.size());
  for (size_t r = 0; r < order.size(); ++r) rank[order[r]] = r;
  std::ostringstream os;
  for (size_t r = 0; r < order.size(); ++r) {
    size_t i = order[r];
    os << r << " ";
    KernelInfo ki;
    if (is_kernel(nodes[i]) && kernel_info(nodes[i], &ki)) {
      os << ki.name.substr(0, 120) << " grid " << ki.grid[0] << "x" << ki.grid[1] << "x"
         << ki.grid[2] << " block " << ki.block[0] << "x" << ki.block[1] << "x" << ki.block[2]
         << " smem " << ki.smem;
    } else {
      os << "[" << type_name(nodes[i]) << "]";
    }
    os << " <-";
    for (size_t k : in[i]) {
      os << " " << rank[pos[e.from[k]]];
      if (e.data[k].type == cudaGraphDependencyTypeProgrammatic)
        os << (e.data[k].from_port == cudaGraphKernelNodePortLaunchCompletion ? "L" : "p");
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace kiln::cuda
