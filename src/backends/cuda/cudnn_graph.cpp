// cuDNN graph API engines through cudnn-frontend (see cudnn_graph.h).
#include "backends/cuda/cudnn_graph.h"

#include "backends/cuda/dnn.h"
#include "backends/cuda/tune_timer.h"
#include "base/logging.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#include <cudnn_frontend.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

namespace kiln::cuda::fe {

namespace cfe = cudnn_frontend;

namespace {

Status fe_error(cfe::error_t e, const std::string& what) {
  std::string msg = "cuDNN graph API: " + what + ": " + e.get_message();
  switch (e.get_code()) {
    case cfe::error_code_t::GRAPH_NOT_SUPPORTED:
    case cfe::error_code_t::GRAPH_EXECUTION_PLAN_CREATION_FAILED:
    case cfe::error_code_t::HEURISTIC_QUERY_FAILED:
    case cfe::error_code_t::UNSUPPORTED_GRAPH_FORMAT:
      return unsupported(msg);
    default:
      return runtime_error(msg);
  }
}

#define FE_CHECK(expr, what)                                          \
  do {                                                                \
    auto fe_err_ = (expr);                                            \
    if (fe_err_.is_bad()) return fe_error(std::move(fe_err_), what); \
  } while (0)

cfe::DataType_t fe_dtype(DataType dt) {
  switch (dt) {
    case DataType::kFloat16: return cfe::DataType_t::HALF;
    case DataType::kBFloat16: return cfe::DataType_t::BFLOAT16;
    default: return cfe::DataType_t::FLOAT;
  }
}

// Plan names go into node attributes and the text timing cache: keep them one clean token.
bool clean_name(const std::string& s) {
  if (s.empty() || s.size() > 400) return false;
  for (char c : s)
    if (c <= ' ' || c == '\t' || c > '~') return false;
  return true;
}

struct DevBuf {
  void* p = nullptr;
  ~DevBuf() {
    if (p) cudaFree(p);
  }
};

}  // namespace

class GraphImpl {
 public:
  cfe::graph::Graph g;
  int64_t candidates = 0;
  // A plan deserialized by PlannedGraph::load: a graph of its own (plan only), run instead of g.
  std::unique_ptr<cfe::graph::Graph> loaded;
  cfe::graph::Graph& running() { return loaded ? *loaded : g; }

  // Builds candidate i (once: the outcome is kept, so a plan pre-built by ConvGraph::prebuild
  // is not built again); true when it built, fits `ws_limit` and has a clean name (out: its
  // workspace and name). `why` collects build failures (bounded).
  bool build(cudnnHandle_t h, int64_t i, size_t ws_limit, size_t* ws, std::string* name,
             std::string* why = nullptr) {
    if (i < 0 || i >= candidates) return false;
    if (attempts.size() < static_cast<size_t>(candidates))
      attempts.resize(static_cast<size_t>(candidates));
    Attempt& a = attempts[static_cast<size_t>(i)];
    if (!a.done) {
      a.done = true;
      auto st = g.build_plan_at_index(h, i);
      int64_t w = 0;
      if (st.is_bad()) {
        a.why = st.get_message();
      } else if (g.get_workspace_size_plan_at_index(i, w).is_good() && w >= 0 &&
                 g.get_plan_name_at_index(i, a.name).is_good() && clean_name(a.name)) {
        a.ok = true;
        a.ws = static_cast<size_t>(w);
      }
    }
    if (!a.ok) {
      if (why && !a.why.empty() && why->size() < 600)
        *why += " [" + std::to_string(i) + ": " + a.why + "]";
      return false;
    }
    if (a.ws > ws_limit) return false;
    *ws = a.ws;
    *name = a.name;
    return true;
  }

 private:
  struct Attempt {
    bool done = false, ok = false;
    size_t ws = 0;
    std::string name, why;
  };
  std::vector<Attempt> attempts;
};

namespace {

std::mutex& build_mutex() {
  static std::mutex mu;
  return mu;
}

// The process-wide build handle; call with build_mutex() held.
Result<void*> build_handle() {
  static cudnnHandle_t h = nullptr;
  if (!h) {
    cudnnHandle_t made = nullptr;
    const cudnnStatus_t s = cudnnCreate(&made);
    if (s != CUDNN_STATUS_SUCCESS)
      return runtime_error(std::string("cuDNN graph API: cudnnCreate: ") + cudnnGetErrorString(s));
    h = made;
  }
  return static_cast<void*>(h);
}

}  // namespace

Status with_build_handle(const std::function<Status(void* cudnn_handle)>& f) {
  std::lock_guard<std::mutex> lock(build_mutex());
  KILN_ASSIGN_OR_RETURN(void* h, build_handle());
  return f(h);
}

namespace {

// Everything make_tuned's result depends on.
std::string prebuild_key(const ConvSpec& s, size_t ws_limit, int max_candidates) {
  std::string k = std::to_string(static_cast<int>(s.dt));
  for (int64_t v : {s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.P, s.Q, s.group, s.pre[0], s.pre[1],
                    s.post[0], s.post[1], s.stride[0], s.stride[1], s.dil[0], s.dil[1]})
    k += "," + std::to_string(v);
  k += s.bias ? ",b" : ",-";
  k += s.z ? "z" : "-";
  k += s.relu ? "r" : "-";
  return k + "|" + std::to_string(ws_limit) + "|" + std::to_string(max_candidates);
}

struct Prebuilt {
  std::mutex mu;
  std::unordered_map<std::string, std::unique_ptr<ConvGraph>> graphs;
  size_t taken = 0;
};
Prebuilt& prebuilt() {
  static Prebuilt p;
  return p;
}

// Releases the graphs one prebuild made that no make_tuned took.
struct PrebuildScope {
  std::vector<std::string> keys;
  ~PrebuildScope() {
    std::lock_guard<std::mutex> lock(prebuilt().mu);
    for (auto& k : keys) prebuilt().graphs.erase(k);
  }
};

// The prebuild workers' cuDNN handles, made once and kept for the process: the plans they
// finalize may outlive the build (like the build handle's).
Result<cudnnHandle_t> worker_handle(size_t k) {
  static std::mutex mu;
  static std::vector<cudnnHandle_t> handles;
  std::lock_guard<std::mutex> lock(mu);
  if (handles.size() <= k) handles.resize(k + 1, nullptr);
  if (!handles[k]) {
    const cudnnStatus_t s = cudnnCreate(&handles[k]);
    if (s != CUDNN_STATUS_SUCCESS) {
      handles[k] = nullptr;
      return runtime_error(std::string("cuDNN graph API: cudnnCreate: ") + cudnnGetErrorString(s));
    }
  }
  return handles[k];
}

}  // namespace

std::shared_ptr<void> ConvGraph::prebuild(const std::vector<Prebuild>& specs, int max_candidates) {
  std::vector<std::pair<std::string, const Prebuild*>> todo;
  {
    std::lock_guard<std::mutex> lock(prebuilt().mu);
    std::unordered_map<std::string, bool> seen;
    for (auto& p : specs) {
      std::string k = prebuild_key(p.spec, p.ws_limit, max_candidates);
      if (prebuilt().graphs.count(k) || !seen.emplace(k, true).second) continue;
      todo.emplace_back(std::move(k), &p);
    }
  }
  if (todo.empty()) return nullptr;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return nullptr;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t workers = std::min<size_t>({todo.size(), hw, 16});
  auto scope = std::make_shared<PrebuildScope>();
  std::mutex scope_mu;
  std::atomic<size_t> next{0};
  auto work = [&](size_t w) {
    if (cudaSetDevice(device) != cudaSuccess) return;
    auto h = worker_handle(w);
    if (!h.is_ok()) return;
    for (size_t i = next++; i < todo.size(); i = next++) {
      auto g = create(h.value(), todo[i].second->spec);  // failures: make_tuned reports them
      if (!g.is_ok()) continue;
      try {
        size_t ws = 0;
        std::string name;
        int built = 0;
        for (int64_t c = 0; c < g.value()->impl_->candidates && built < max_candidates; ++c)
          built +=
              g.value()->impl_->build(h.value(), c, todo[i].second->ws_limit, &ws, &name) ? 1 : 0;
      } catch (const std::exception&) {
        continue;  // make_tuned builds what is missing, and reports
      }
      std::lock_guard<std::mutex> lock(prebuilt().mu);
      if (prebuilt().graphs.emplace(todo[i].first, std::move(g.value())).second) {
        std::lock_guard<std::mutex> slock(scope_mu);
        scope->keys.push_back(todo[i].first);
      }
    }
  };
  std::vector<std::thread> threads;
  try {
    for (size_t w = 1; w < workers; ++w) threads.emplace_back(work, w);
  } catch (const std::system_error&) {
    // No more threads: the ones started and this one share the work.
  }
  work(0);
  for (auto& t : threads) t.join();
  return scope;
}

size_t ConvGraph::prebuilt_count() {
  std::lock_guard<std::mutex> lock(prebuilt().mu);
  return prebuilt().graphs.size();
}
size_t ConvGraph::prebuilt_taken() {
  std::lock_guard<std::mutex> lock(prebuilt().mu);
  return prebuilt().taken;
}

namespace {
Status finish_graph(cudnnHandle_t h, GraphImpl& impl, const std::string& what);  // below

size_t& loaded_total() {
  static size_t n = 0;  // under build_mutex()
  return n;
}
}  // namespace

size_t ConvGraph::loaded_count() {
  std::lock_guard<std::mutex> lock(build_mutex());
  return loaded_total();
}

Result<std::shared_ptr<ConvGraph>> ConvGraph::make(const ConvSpec& s, const std::string& name,
                                                   size_t ws_limit, const std::string& compiled) {
  // Layers with the same spec and plan share one graph, as an engine's contexts share each
  // layer's: ResNet-50's 16 conv3 layers have 4 specs, and each plan build is an NVRTC compile
  // (73-98 ms on an H100). Graphs built on other threads ran the engine slower (docs/design.md,
  // session 17), so this stays on the loading thread.
  static std::unordered_map<std::string, std::weak_ptr<ConvGraph>> live;
  const std::string key = prebuild_key(s, ws_limit, 0) + "|plan " + name;
  std::lock_guard<std::mutex> lock(build_mutex());
  if (auto it = live.find(key); it != live.end())
    if (std::shared_ptr<ConvGraph> g = it->second.lock()) return g;
  KILN_ASSIGN_OR_RETURN(void* h, build_handle());
  // KILN_CUDA_PLAN_BYTES=0 ignores the serialized bytes (A/B runs).
  static const bool use_bytes = [] {
    const char* e = std::getenv("KILN_CUDA_PLAN_BYTES");
    return !(e && e[0] == '0');
  }();
  const std::string& bytes = use_bytes ? compiled : std::string();
  // (With serialized bytes, the heuristics' candidates are only asked for if they do not load.)
  KILN_ASSIGN_OR_RETURN(std::unique_ptr<ConvGraph> made, create(h, s, bytes.empty()));
  // The plan's serialized bytes first (a runtime-compiled plan loads in ~2 ms instead of its
  // 75-700 ms compile), by name when they do not load (another cuDNN, damaged bytes).
  Status from_bytes =
      bytes.empty() ? unsupported("no serialized plan") : made->load(h, bytes, name);
  if (from_bytes.is_ok() && made->ws_ <= ws_limit) {
    ++loaded_total();
  } else {
    if (!bytes.empty())
      KILN_LOG(kVerbose, "cuDNN graph API: the plan's serialized " << name << " did not load ("
                                                                   << from_bytes.message()
                                                                   << "); building it");
    made->impl_->loaded.reset();
    made->index_ = -1;
    if (!bytes.empty())
      KILN_RETURN_IF_ERROR(finish_graph(static_cast<cudnnHandle_t>(h), *made->impl_, "conv"));
    KILN_RETURN_IF_ERROR(made->select(h, name, ws_limit));
  }
  std::shared_ptr<ConvGraph> g(std::move(made));
  for (auto it = live.begin(); it != live.end();)  // forget graphs no engine holds
    it = it->second.expired() ? live.erase(it) : std::next(it);
  live[key] = g;
  return g;
}

Result<std::unique_ptr<ConvGraph>> ConvGraph::make_tuned(const ConvSpec& s, size_t ws_limit,
                                                         int max_candidates, float* ms) {
  std::lock_guard<std::mutex> lock(build_mutex());
  KILN_ASSIGN_OR_RETURN(void* h, build_handle());
  std::unique_ptr<ConvGraph> g;
  {
    std::lock_guard<std::mutex> plock(prebuilt().mu);
    auto it = prebuilt().graphs.find(prebuild_key(s, ws_limit, max_candidates));
    if (it != prebuilt().graphs.end()) {
      g = std::move(it->second);
      prebuilt().graphs.erase(it);
      ++prebuilt().taken;
    }
  }
  if (!g) {
    KILN_ASSIGN_OR_RETURN(g, create(h, s));
  }
  KILN_ASSIGN_OR_RETURN(float t, g->tune(h, ws_limit, max_candidates));
  if (ms) *ms = t;
  return g;
}

Result<std::unique_ptr<SdpaGraph>> SdpaGraph::make(const SdpaSpec& s, size_t ws_limit) {
  std::lock_guard<std::mutex> lock(build_mutex());
  KILN_ASSIGN_OR_RETURN(void* h, build_handle());
  KILN_ASSIGN_OR_RETURN(std::unique_ptr<SdpaGraph> g, create(h, s));
  KILN_RETURN_IF_ERROR(g->select(h, "", ws_limit));
  return g;
}

bool graph_api_disabled() {
  static const bool off = [] {
    const char* e = std::getenv("KILN_CUDNN_GRAPH");
    return e && e[0] == '0';
  }();
  return off;
}

PlannedGraph::PlannedGraph(std::string kind)
    : impl_(std::make_unique<GraphImpl>()), kind_(std::move(kind)) {}
PlannedGraph::~PlannedGraph() = default;

std::string PlannedGraph::tactic() const {
  return index_ < 0 ? std::string() : "cuda." + kind_ + ".cudnn_fe." + name_;
}

Status PlannedGraph::select(void* handle, const std::string& name, size_t ws_limit) {
  try {
    auto h = static_cast<cudnnHandle_t>(handle);
    auto& g = impl_->g;
    const std::string want = plan_name(name);
    std::string failures;
    auto try_index = [&](int64_t i) -> bool {
      size_t ws = 0;
      std::string n;
      if (!impl_->build(h, i, ws_limit, &ws, &n, &failures)) return false;
      index_ = i;
      ws_ = ws;
      name_ = n;
      return true;
    };
    if (!want.empty()) {
      for (int64_t i = 0; i < impl_->candidates; ++i) {
        std::string n;
        if (g.get_plan_name_at_index(i, n).is_good() && n == want && try_index(i))
          return Status::ok();
      }
    }
    // The heuristics' order: the first one that builds within the limit.
    for (int64_t i = 0; i < impl_->candidates && i < 16; ++i)
      if (try_index(i)) return Status::ok();
    return unsupported("cuDNN graph API: no " + kind_ + " plan builds within the workspace limit" +
                       failures);
  } catch (const std::exception& e) {
    return runtime_error("cuDNN graph API (" + kind_ + "): " + e.what());
  }
}

Result<float> PlannedGraph::tune(void* handle, size_t ws_limit, int max_candidates) {
  try {
    auto h = static_cast<cudnnHandle_t>(handle);
    auto& g = impl_->g;
    // Operands: random values (see fill_tuning_data).
    std::vector<DevBuf> bufs(buffer_bytes_.size());
    std::vector<void*> ptrs(buffer_bytes_.size());
    for (size_t i = 0; i < bufs.size(); ++i) {
      KILN_CUDA_CHECK(cudaMalloc(&bufs[i].p, std::max<size_t>(buffer_bytes_[i], 256)),
                      "tuning " + kind_ + " buffers");
      KILN_RETURN_IF_ERROR(fill_tuning_data(bufs[i].p, std::max<size_t>(buffer_bytes_[i], 256), dt_));
      ptrs[i] = bufs[i].p;
    }
    std::unordered_map<int64_t, void*> vp;
    for (size_t k = 0; k < uids_.size(); ++k) vp[uids_[k]] = ptrs[k];
    // The timer's stream carries the handle's work while tuning (the build handle is shared:
    // its stream is put back after).
    TuneTimer timer;
    KILN_RETURN_IF_ERROR(timer.init("cuDNN graph API " + kind_));
    cudaStream_t prev = nullptr;
    if (cudnnGetStream(h, &prev) != CUDNN_STATUS_SUCCESS) prev = nullptr;
    if (cudnnSetStream(h, timer.stream()) != CUDNN_STATUS_SUCCESS)
      return runtime_error("cuDNN graph API: binding the tuning stream");
    struct StreamBack {
      cudnnHandle_t h;
      cudaStream_t s;
      ~StreamBack() { cudnnSetStream(h, s); }
    } stream_back{h, prev};
    float best = -1.f;
    int64_t best_i = -1;
    size_t best_ws = 0;
    std::string best_name;
    DevBuf ws;
    size_t ws_have = 0;
    // Builds and times plan i; false when it does not build, fit or run.
    auto time_plan = [&](int64_t i) -> Result<bool> {
      size_t wsz = 0;
      std::string n;
      if (!impl_->build(h, i, ws_limit, &wsz, &n)) return false;
      if (wsz > ws_have) {
        if (ws.p) cudaFree(ws.p);
        ws.p = nullptr;
        ws_have = 0;
        if (cudaMalloc(&ws.p, wsz) != cudaSuccess) {
          (void)cudaGetLastError();
          ws.p = nullptr;
          return false;
        }
        ws_have = wsz;
      }
      KILN_ASSIGN_OR_RETURN(float ms, timer.time([&] {
        return g.execute_plan_at_index(h, vp, ws.p, i).is_good();
      }));
      if (ms < 0) return false;
      if (best < 0 || ms < best) {
        best = ms;
        best_i = i;
        best_ws = wsz;
        best_name = n;
      }
      return true;
    };
    int timed = 0;
    for (int64_t i = 0; i < impl_->candidates && timed < max_candidates; ++i) {
      KILN_ASSIGN_OR_RETURN(bool t, time_plan(i));
      timed += t ? 1 : 0;
    }
    if (best_i < 0) return unsupported("cuDNN graph API: no " + kind_ + " plan could be timed");
    index_ = best_i;
    ws_ = best_ws;
    name_ = best_name;
    return best;
  } catch (const std::exception& e) {
    return runtime_error("cuDNN graph API (" + kind_ + "): " + e.what());
  }
}

std::string PlannedGraph::serialized() const {
  if (index_ < 0) return {};
  try {
    std::lock_guard<std::mutex> lock(build_mutex());
    std::vector<uint8_t> data;
    if (impl_->loaded) {
      if (impl_->loaded->serialize(data, false).is_bad()) return {};
    } else {
      // Serializes the graph's current candidate: make it the selected plan (already built,
      // so this only selects it).
      if (impl_->g.build_plan_at_index(index_).is_bad() || impl_->g.serialize(data, false).is_bad())
        return {};
    }
    return std::string(data.begin(), data.end());
  } catch (const std::exception&) {
    return {};
  }
}

bool PlannedGraph::loaded() const {
  return impl_->loaded != nullptr;
}

std::string PlannedGraph::plan_name(const std::string& tactic) const {
  const std::string prefix = "cuda." + kind_ + ".cudnn_fe.";
  return tactic.rfind(prefix, 0) == 0 ? tactic.substr(prefix.size()) : "";
}

Status PlannedGraph::load(void* handle, const std::string& bytes, const std::string& name) {
  const std::string want = plan_name(name);
  if (want.empty()) return invalid_argument("cuDNN graph API: '" + name + "' is not a graph plan");
  try {
    auto g = std::make_unique<cfe::graph::Graph>();
    const std::vector<uint8_t> data(bytes.begin(), bytes.end());
    FE_CHECK(g->deserialize(static_cast<cudnnHandle_t>(handle), data, /*enforce_precompiled=*/true,
                            /*run_warmup=*/false),
             kind_ + " deserialize");
    // (A deserialized graph has its plan but no engine configs to ask the name of: the bytes
    // come from the same checksummed plan node as the tactic.)
    int64_t w = 0;
    FE_CHECK(g->get_workspace_size_plan_at_index(0, w), kind_ + " deserialized plan workspace");
    if (w < 0) return invalid_argument("cuDNN graph API: negative workspace");
    impl_->loaded = std::move(g);
    index_ = 0;
    ws_ = static_cast<size_t>(w);
    name_ = want;
    return Status::ok();
  } catch (const std::exception& e) {
    return runtime_error("cuDNN graph API (" + kind_ + ") deserialize: " + e.what());
  }
}

Status PlannedGraph::run(void* handle, void* const* ptrs, void* workspace) const {
  if (index_ < 0) return internal_error("cuDNN graph API: " + kind_ + " run before a plan was selected");
  try {
    std::unordered_map<int64_t, void*> vp;
    for (size_t k = 0; k < uids_.size(); ++k)
      if (ptrs[k]) vp[uids_[k]] = ptrs[k];
    FE_CHECK(impl_->running().execute_plan_at_index(static_cast<cudnnHandle_t>(handle), vp,
                                                    workspace, index_),
             kind_ + " execute (" + name_ + ")");
    return Status::ok();
  } catch (const std::exception& e) {
    return runtime_error("cuDNN graph API (" + kind_ + "): " + e.what());
  }
}

namespace {

// Builds the operation graph and the heuristics' candidate list shared by both kinds.
Status finish_graph(cudnnHandle_t h, GraphImpl& impl, const std::string& what) {
  auto& g = impl.g;
  FE_CHECK(g.validate(), what + " validate");
  FE_CHECK(g.build_operation_graph(h), what + " operation graph");
  FE_CHECK(g.create_execution_plans({cfe::HeurMode_t::A, cfe::HeurMode_t::FALLBACK}),
           what + " heuristics");
  impl.candidates = g.get_execution_plan_count();
  if (impl.candidates <= 0) return unsupported("cuDNN graph API: no engine for this " + what);
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<ConvGraph>> ConvGraph::create(void* handle, const ConvSpec& s,
                                                     bool candidates) {
  if (s.dt != DataType::kFloat16 && s.dt != DataType::kBFloat16)
    return unsupported("cuDNN graph conv: float16/bfloat16 only");
  if (s.group < 1 || s.C % s.group != 0) return invalid_argument("cuDNN graph conv: bad group");
  try {
    std::unique_ptr<ConvGraph> cg(new ConvGraph());
    cg->spec_ = s;
    cg->dt_ = s.dt;
    auto& g = cg->impl_->g;
    const auto io = fe_dtype(s.dt);
    g.set_io_data_type(io)
        .set_intermediate_data_type(cfe::DataType_t::FLOAT)
        .set_compute_data_type(cfe::DataType_t::FLOAT);
    const int64_t Cg = s.C / s.group;
    using TA = cfe::graph::Tensor_attributes;
    auto X = g.tensor(TA().set_name("X").set_uid(1).set_data_type(io)
                          .set_dim({s.N, s.C, s.H, s.W})
                          .set_stride({s.H * s.W * s.C, 1, s.W * s.C, s.C}));
    auto W = g.tensor(TA().set_name("W").set_uid(2).set_data_type(io)
                          .set_dim({s.K, Cg, s.R, s.S})
                          .set_stride({s.R * s.S * Cg, 1, s.S * Cg, Cg}));
    auto conv = cfe::graph::Conv_fprop_attributes()
                    .set_name("conv")
                    .set_pre_padding({s.pre[0], s.pre[1]})
                    .set_post_padding({s.post[0], s.post[1]})
                    .set_stride({s.stride[0], s.stride[1]})
                    .set_dilation({s.dil[0], s.dil[1]});
    auto y = g.conv_fprop(X, W, conv);
    const std::vector<int64_t> ydim = {s.N, s.K, s.P, s.Q};
    const std::vector<int64_t> ystr = {s.P * s.Q * s.K, 1, s.Q * s.K, s.K};
    y->set_dim(ydim).set_stride(ystr);
    if (s.bias) {
      auto B = g.tensor(TA().set_name("B").set_uid(3).set_data_type(io)
                            .set_dim({1, s.K, 1, 1})
                            .set_stride({s.K, 1, s.K, s.K}));
      y = g.pointwise(y, B, cfe::graph::Pointwise_attributes().set_name("bias")
                                .set_mode(cfe::PointwiseMode_t::ADD));
      y->set_dim(ydim).set_stride(ystr);
    }
    if (s.z) {
      auto Z = g.tensor(TA().set_name("Z").set_uid(4).set_data_type(io).set_dim(ydim)
                            .set_stride(ystr));
      y = g.pointwise(y, Z, cfe::graph::Pointwise_attributes().set_name("residual")
                                .set_mode(cfe::PointwiseMode_t::ADD));
      y->set_dim(ydim).set_stride(ystr);
    }
    if (s.relu) {
      y = g.pointwise(y, cfe::graph::Pointwise_attributes().set_name("relu")
                             .set_mode(cfe::PointwiseMode_t::RELU_FWD));
      y->set_dim(ydim).set_stride(ystr);
    }
    y->set_output(true).set_uid(5).set_data_type(io);
    if (candidates)
      KILN_RETURN_IF_ERROR(finish_graph(static_cast<cudnnHandle_t>(handle), *cg->impl_, "conv"));
    const size_t es = dtype_size(s.dt);
    cg->uids_ = {1, 2, 3, 4, 5};
    cg->buffer_bytes_ = {static_cast<size_t>(s.N * s.H * s.W * s.C) * es,
                         static_cast<size_t>(s.K * s.R * s.S * Cg) * es,
                         static_cast<size_t>(s.K) * es,
                         static_cast<size_t>(s.N * s.P * s.Q * s.K) * es,
                         static_cast<size_t>(s.N * s.P * s.Q * s.K) * es};
    if (!s.bias) cg->buffer_bytes_[2] = 0;
    if (!s.z) cg->buffer_bytes_[3] = 0;
    // Tensors absent from the graph must not be in its variant pack.
    std::vector<int64_t> uids;
    std::vector<size_t> bytes;
    for (size_t i = 0; i < cg->uids_.size(); ++i) {
      if ((i == 2 && !s.bias) || (i == 3 && !s.z)) continue;
      uids.push_back(cg->uids_[i]);
      bytes.push_back(cg->buffer_bytes_[i]);
    }
    cg->uids_ = uids;
    cg->buffer_bytes_ = bytes;
    return cg;
  } catch (const std::exception& e) {
    return runtime_error(std::string("cuDNN graph API (conv): ") + e.what());
  }
}

Status ConvGraph::run(void* handle, const ConvPtrs& p, void* workspace) const {
  void* ptrs[5];
  size_t n = 0;
  ptrs[n++] = const_cast<void*>(p.x);
  ptrs[n++] = const_cast<void*>(p.w);
  if (spec_.bias) ptrs[n++] = const_cast<void*>(p.bias);
  if (spec_.z) ptrs[n++] = const_cast<void*>(p.z);
  ptrs[n++] = p.y;
  for (size_t i = 0; i < n; ++i)
    if (!ptrs[i]) return internal_error("cuDNN graph conv: a null operand");
  return PlannedGraph::run(handle, ptrs, workspace);
}

Result<std::unique_ptr<SdpaGraph>> SdpaGraph::create(void* handle, const SdpaSpec& s) {
  if (s.dt != DataType::kFloat16 && s.dt != DataType::kBFloat16)
    return unsupported("cuDNN SDPA: float16/bfloat16 only");
  if (s.Hkv <= 0 || s.Hq % s.Hkv != 0) return invalid_argument("cuDNN SDPA: bad head counts");
  try {
    std::unique_ptr<SdpaGraph> sg(new SdpaGraph());
    sg->spec_ = s;
    sg->dt_ = s.dt;
    auto& g = sg->impl_->g;
    const auto io = fe_dtype(s.dt);
    g.set_io_data_type(io)
        .set_intermediate_data_type(cfe::DataType_t::FLOAT)
        .set_compute_data_type(cfe::DataType_t::FLOAT);
    using TA = cfe::graph::Tensor_attributes;
    auto Q = g.tensor(TA().set_name("Q").set_uid(1).set_data_type(io)
                          .set_dim({s.B, s.Hq, s.S, s.D})
                          .set_stride({s.qs[0], s.qs[1], s.qs[2], 1}));
    auto K = g.tensor(TA().set_name("K").set_uid(2).set_data_type(io)
                          .set_dim({s.B, s.Hkv, s.T, s.D})
                          .set_stride({s.ks[0], s.ks[1], s.ks[2], 1}));
    auto V = g.tensor(TA().set_name("V").set_uid(3).set_data_type(io)
                          .set_dim({s.B, s.Hkv, s.T, s.D})
                          .set_stride({s.vs[0], s.vs[1], s.vs[2], 1}));
    auto opts = cfe::graph::SDPA_attributes()
                    .set_name("sdpa")
                    .set_generate_stats(false)
                    .set_attn_scale(s.scale);
    if (s.causal) opts.set_causal_mask(true);
    if (s.bias) {
      const std::vector<int64_t> bst =
          s.bias_strided ? std::vector<int64_t>{s.bias_str[0], s.bias_str[1], s.bias_str[2], 1}
                  : std::vector<int64_t>{s.bias_h * s.S * s.T, s.S * s.T, s.T, 1};
      auto Bt = g.tensor(TA().set_name("bias").set_uid(5).set_data_type(io)
                             .set_dim({s.bias_b, s.bias_h, s.S, s.T})
                             .set_stride(bst));
      opts.set_bias(Bt);
    }
    auto [O, stats] = g.sdpa(Q, K, V, opts);
    (void)stats;
    O->set_output(true).set_uid(4).set_data_type(io)
        .set_dim({s.B, s.Hq, s.S, s.D})
        .set_stride({s.os[0], s.os[1], s.os[2], 1});
    KILN_RETURN_IF_ERROR(finish_graph(static_cast<cudnnHandle_t>(handle), *sg->impl_, "attention"));
    const size_t es = dtype_size(s.dt);
    auto span = [](int64_t b, int64_t h, int64_t sq, const int64_t st[3], int64_t d) {
      return static_cast<size_t>((b - 1) * st[0] + (h - 1) * st[1] + (sq - 1) * st[2] + d);
    };
    sg->uids_ = {1, 2, 3, 4};
    sg->buffer_bytes_ = {span(s.B, s.Hq, s.S, s.qs, s.D) * es, span(s.B, s.Hkv, s.T, s.ks, s.D) * es,
                         span(s.B, s.Hkv, s.T, s.vs, s.D) * es, span(s.B, s.Hq, s.S, s.os, s.D) * es};
    if (s.bias) {
      sg->uids_.push_back(5);
      sg->buffer_bytes_.push_back(
          s.bias_strided ? span(s.bias_b, s.bias_h, s.S, s.bias_str, s.T) * es
                  : static_cast<size_t>(s.bias_b * s.bias_h * s.S * s.T) * es);
    }
    return sg;
  } catch (const std::exception& e) {
    return runtime_error(std::string("cuDNN graph API (attention): ") + e.what());
  }
}

Status SdpaGraph::run(void* handle, const SdpaPtrs& p, void* workspace) const {
  void* ptrs[5] = {const_cast<void*>(p.q), const_cast<void*>(p.k), const_cast<void*>(p.v), p.o,
                   const_cast<void*>(p.bias)};
  const size_t n = spec_.bias ? 5 : 4;
  for (size_t i = 0; i < n; ++i)
    if (!ptrs[i]) return internal_error("cuDNN SDPA: a null operand");
  return PlannedGraph::run(handle, ptrs, workspace);
}

}  // namespace kiln::cuda::fe
