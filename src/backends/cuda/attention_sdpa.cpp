// The ONNX Attention op on cuDNN's fused SDPA engines (see cudnn_graph.h, try_sdpa).
//
// One graph per geometry (dtype, B, heads, S, T, D, strides, scale, causal, bias shape), built
// on first use with cuDNN's heuristics and kept for the process; geometries cuDNN has no
// engine for are remembered too, so the caller's own kernel takes them without a retry.
// A float mask in the I/O dtype that covers every key with dense, 16-byte aligned rows goes in
// as the bias itself, by its strides (a [B, 1, 1, T] padding mask is read with stride 0 over the
// queries: no copy). Any other mask becomes a dense additive bias [B or 1, H or 1, S, T] in the
// I/O dtype first (one small kernel per call); also when cuDNN refuses the strided bias.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "backends/cuda/cudnn_graph.h"
#include "backends/cuda/dnn.h"

namespace kiln::cuda::fe {
namespace {

struct Cache {
  std::mutex mu;
  std::map<std::string, std::shared_ptr<SdpaGraph>> graphs;  // nullptr: no engine
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: graphs may be used until exit
  return *c;
}

std::string key_of(const SdpaSpec& s) {
  std::string k = std::to_string(static_cast<int>(s.dt));
  auto add = [&](int64_t v) { k += ',' + std::to_string(v); };
  for (int64_t v : {s.B, s.Hq, s.Hkv, s.S, s.T, s.D, s.bias_b, s.bias_h}) add(v);
  for (const int64_t* st : {s.qs, s.ks, s.vs, s.os})
    for (int i = 0; i < 3; ++i) add(st[i]);
  add(s.causal ? 1 : 0);
  add(s.bias ? 1 : 0);
  add(s.bias_strided ? 1 : 0);
  for (int64_t v : s.bias_str) add(v);
  char buf[32];
  std::snprintf(buf, sizeof(buf), ",%a", static_cast<double>(s.scale));
  return k + buf;
}

}  // namespace

Result<bool> try_sdpa(Env& env, const SdpaCall& c) {
  if (graph_api_disabled()) return false;
  if (c.dt != DataType::kFloat16 && c.dt != DataType::kBFloat16) return false;
  // The flash engines: head size a multiple of 8 up to 256, at least one query and key.
  if (c.D <= 0 || c.D % 8 != 0 || c.D > 256 || c.S <= 0 || c.T <= 0 || c.B <= 0) return false;
  if (c.Hkv <= 0 || c.Hq % c.Hkv != 0) return false;
  if (!env.cudnn) return false;
  for (const int64_t* st : {c.qs, c.ks, c.vs, c.os})
    for (int i = 0; i < 3; ++i)
      if (st[i] <= 0 || st[i] % 8 != 0) return false;  // 16-byte aligned rows
  for (const void* p : {static_cast<const void*>(c.q), static_cast<const void*>(c.k),
                        static_cast<const void*>(c.v), static_cast<const void*>(c.o)})
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;

  SdpaSpec s;
  s.dt = c.dt;
  s.B = c.B, s.Hq = c.Hq, s.Hkv = c.Hkv, s.S = c.S, s.T = c.T, s.D = c.D;
  for (int i = 0; i < 3; ++i) {
    s.qs[i] = c.qs[i], s.ks[i] = c.ks[i], s.vs[i] = c.vs[i], s.os[i] = c.os[i];
  }
  s.scale = c.scale;
  s.causal = c.causal;
  const bool has_mask = c.mask_dt != DataType::kUndefined;
  if (has_mask) {
    s.bias = true;
    s.bias_b = c.mstr[0] != 0 ? c.B : 1;
    s.bias_h = c.mstr[1] != 0 ? c.Hq : 1;
  }

  auto lookup = [](const SdpaSpec& spec) {
    std::shared_ptr<SdpaGraph> g;
    const std::string key = key_of(spec);
    Cache& ca = cache();
    std::lock_guard<std::mutex> lock(ca.mu);
    auto it = ca.graphs.find(key);
    if (it != ca.graphs.end()) return it->second;
    auto made = SdpaGraph::make(spec, size_t{1} << 30);
    if (made.is_ok()) g = std::move(made.value());
    ca.graphs[key] = g;  // nullptr remembers "no engine"
    return g;
  };
  std::shared_ptr<SdpaGraph> g;
  SdpaPtrs p;
  p.q = c.q, p.k = c.k, p.v = c.v, p.o = c.o;
  // The mask as the bias itself (see the top).
  const bool direct = has_mask && c.mask && c.mask_dt == c.dt && c.mask_len == c.T &&
                      c.mstr[3] == 1 && c.T % 8 == 0 && c.mstr[0] % 8 == 0 &&
                      c.mstr[1] % 8 == 0 && c.mstr[2] % 8 == 0 && c.mstr[0] >= 0 &&
                      c.mstr[1] >= 0 && c.mstr[2] >= 0 &&
                      reinterpret_cast<uintptr_t>(c.mask) % 16 == 0;
  if (direct) {
    SdpaSpec sd = s;
    sd.bias_strided = true;
    for (int i = 0; i < 3; ++i) sd.bias_str[i] = c.mstr[i];
    g = lookup(sd);
    if (g) p.bias = c.mask;
  }
  if (!g) g = lookup(s);
  if (!g) return false;

  std::shared_ptr<Storage> bias_buf, ws_buf;
  if (s.bias && !p.bias) {
    const size_t bytes = static_cast<size_t>(s.bias_b * s.bias_h * s.S * s.T) * dtype_size(c.dt);
    KILN_ASSIGN_OR_RETURN(bias_buf, env.scratch(bytes));
    KILN_RETURN_IF_ERROR(launch_attn_bias(c.dt, bias_buf->data(), c.mask, c.mask_dt, c.mstr,
                                          c.mask ? c.mask_len : 0, s.bias_b, s.bias_h, s.S, s.T,
                                          env.stream));
    p.bias = bias_buf->data();
  }
  KILN_ASSIGN_OR_RETURN(void* ws, env.library_workspace(g->workspace(), &ws_buf));
  KILN_RETURN_IF_ERROR(g->run(env.cudnn, p, ws));
  return true;
}

}  // namespace kiln::cuda::fe
