#include "runtime/executor.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <unordered_set>

#include "base/logging.h"

namespace kiln {

namespace {

bool has_subgraph(const Node& n) {
  for (auto& a : n.attrs)
    if (a.g || !a.graphs.empty()) return true;
  return false;
}

// True when every output of n has a known shape of at most 2^20 elements: work small enough to
// leave most of a GPU idle (batch 1), so running it beside the main chain gains. Large work fills
// the GPU on its own and only contends (ResNet-50 batch 256: 6.93 vs 6.90 ms with its downsample
// convolutions on the side stream).
// A leading dim that is not known (an engine built with --batch relaxes the batch) counts as
// `max_batch` when the engine has one; any other unknown dim makes the outputs not small.
bool small_outputs(const Graph& g, const Node& n, int64_t max_batch) {
  for (auto& o : n.outputs) {
    if (o.empty()) continue;
    const ValueInfo* vi = g.find_value_info(o);
    if (!vi || !vi->type.has_shape) return false;
    int64_t numel = 1;
    for (size_t i = 0; i < vi->type.dims.size(); ++i) {
      const Dim& d = vi->type.dims[i];
      if (d.known())
        numel *= d.value;
      else if (i == 0 && max_batch > 0)
        numel *= max_batch;
      else
        return false;
    }
    if (numel > (int64_t{1} << 20)) return false;
  }
  return true;
}

// Device backends: single-node branches that may overlap the main chain (ResNet's downsample
// convolution beside its block's first two). Node i becomes a side node when
//   - it is a prepared kernel reading device memory only, without subgraphs;
//   - its inputs' last producer p comes at least two nodes before it, so a node between them
//     runs beside it;
//   - its outputs are no graph outputs and are read later; the first reader j joins;
//   - its window (p, j) starts after the previous side node's join (one side stream);
//   - its outputs are small (small_outputs, at the engine's maximum batch).
// It then runs right after p. KILN_SIDE_STREAM=0: none (every node in graph order).
void plan_side_branches(CompiledGraph& cg, const std::vector<std::vector<int>>& read_slots,
                        int64_t max_batch) {
  const int n = static_cast<int>(cg.nodes.size());
  cg.order.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) cg.order[static_cast<size_t>(i)] = i;
  const char* knob = std::getenv("KILN_SIDE_STREAM");
  if (!cg.backend->is_device() || (knob && std::string(knob) == "0")) return;
  const size_t slots = static_cast<size_t>(cg.num_slots);
  std::vector<int> producer(slots, -1), first_reader(slots, n);
  std::vector<char> is_output(slots, 0);
  for (int s : cg.output_slots) is_output[static_cast<size_t>(s)] = 1;
  for (int i = 0; i < n; ++i) {
    for (int o : cg.nodes[static_cast<size_t>(i)].out)
      if (o >= 0) producer[static_cast<size_t>(o)] = i;
    for (int s : read_slots[static_cast<size_t>(i)])
      first_reader[static_cast<size_t>(s)] = std::min(first_reader[static_cast<size_t>(s)], i);
  }
  std::vector<std::vector<int>> follows(static_cast<size_t>(n) + 1);  // [p + 1]: side nodes run after p
  int prev_join = -1;
  for (int i = 0; i < n; ++i) {
    CompiledNode& cn = cg.nodes[static_cast<size_t>(i)];
    if (!cn.kernel || has_subgraph(*cn.node)) continue;
    if (std::count(cn.residency.begin(), cn.residency.end(), Residency::kHost)) continue;
    int p = -1;
    for (int s : read_slots[static_cast<size_t>(i)]) p = std::max(p, producer[static_cast<size_t>(s)]);
    if (i - p < 2 || p < prev_join) continue;
    int j = n;
    bool ok = true;
    for (int o : cn.out) {
      if (o < 0) continue;
      ok = ok && !is_output[static_cast<size_t>(o)];
      j = std::min(j, first_reader[static_cast<size_t>(o)]);
    }
    if (!ok || j == n || !small_outputs(*cg.graph, *cn.node, max_batch)) continue;
    cn.side = true;
    cg.nodes[static_cast<size_t>(j)].join_before = true;
    follows[static_cast<size_t>(p + 1)].push_back(i);
    prev_join = j;
    KILN_LOG(kVerbose, "side stream: " << cn.node->where() << " beside " << (j - p - 2) << " node(s)");
  }
  cg.order.clear();
  for (int i : follows[0]) cg.order.push_back(i);
  for (int k = 0; k < n; ++k) {
    if (cg.nodes[static_cast<size_t>(k)].side) continue;
    cg.order.push_back(k);
    for (int i : follows[static_cast<size_t>(k + 1)]) cg.order.push_back(i);
  }
}

Status compile_into(const Graph& g, const Backend& backend, bool fallback, int64_t max_batch,
                    CompiledGraph& cg) {
  cg.graph = &g;
  cg.backend = &backend;
  auto slot = [&](const std::string& name) {
    auto it = cg.slot_of.find(name);
    if (it != cg.slot_of.end()) return it->second;
    int s = cg.num_slots++;
    cg.slot_of.emplace(name, s);
    return s;
  };
  std::unordered_set<std::string> defined;
  for (auto& in : g.inputs) {
    cg.input_slots.push_back(slot(in.name));
    defined.insert(in.name);
  }
  for (auto& [name, t] : g.initializers) {
    if (defined.count(name)) continue;  // an input overriding its initializer default
    cg.constants.emplace_back(slot(name), t);
    defined.insert(name);
  }
  std::vector<std::vector<std::string>> reads(g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    for (auto& in : n.inputs)
      if (!in.empty()) reads[i].push_back(in);
    for (auto& a : n.attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& sg : a.graphs) subs.push_back(sg.get());
      for (auto* s : subs) {
        std::unordered_set<std::string> refs;
        collect_outer_refs(*s, refs);
        for (auto& r : refs) reads[i].push_back(r);
      }
    }
    for (auto& r : reads[i]) {
      if (!defined.count(r)) {
        cg.captures.emplace_back(r, slot(r));
        defined.insert(r);
      }
    }
    for (auto& o : n.outputs)
      if (!o.empty()) defined.insert(o);
    // Reads are resolved; now allocate output slots.
    CompiledNode cn;
    cn.node = &n;
    std::string kernel = n.kernel;
    if (kernel.empty() && fallback) kernel = backend.choose_kernel(n);
    ConstantLookup lookup = [&g](const std::string& name) -> const Tensor* {
      auto it = g.initializers.find(name);
      return it == g.initializers.end() ? nullptr : &it->second;
    };
    const auto t_prep = std::chrono::steady_clock::now();
    auto prepared = backend.prepare(kernel, n, lookup);
    if (!prepared.is_ok()) return prepared.status().with_context(n.where());
    if (const double ms =
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_prep)
                .count();
        ms >= 20)
      KILN_LOG(kVerbose, n.where() << ": prepared (" << kernel << ") in " << ms << " ms");
    cn.kernel = prepared.value();
    cn.fn = backend.resolve(kernel);
    if (!cn.fn && !cn.kernel) {
      if (kernel.empty())
        return unsupported(n.where() + ": no " + backend.name() + " kernel for this operator");
      return Status(StatusCode::kIncompatiblePlan,
                    n.where() + ": kernel '" + kernel + "' is not available in this build of Kiln");
    }
    for (size_t i = 0; i < n.inputs.size(); ++i) {
      cn.in.push_back(n.inputs[i].empty() ? -1 : slot(n.inputs[i]));
      Residency r = backend.input_residency(kernel, n, i);
      // A constant the prepared kernel keeps its own device copy of is not uploaded again.
      if (r == Residency::kDevice && cn.kernel && !n.inputs[i].empty() && lookup(n.inputs[i]) &&
          cn.kernel->owns_constant(i))
        r = Residency::kAny;
      cn.residency.push_back(r);
    }
    for (auto& o : n.outputs) cn.out.push_back(o.empty() ? -1 : slot(o));
    cg.nodes.push_back(std::move(cn));
    for (auto& a : n.attrs) {
      std::vector<const Graph*> subs;
      if (a.g) subs.push_back(a.g.get());
      for (auto& sg : a.graphs) subs.push_back(sg.get());
      for (auto* s : subs) {
        auto sub = std::make_unique<CompiledGraph>();
        Status st = compile_into(*s, backend, fallback, max_batch, *sub);
        if (!st.is_ok()) return st.with_context(n.where() + " subgraph '" + a.name + "'");
        cg.subgraphs.emplace(s, std::move(sub));
      }
    }
  }
  for (auto& o : g.outputs) {
    if (!defined.count(o.name)) cg.captures.emplace_back(o.name, slot(o.name));
    defined.insert(o.name);
    cg.output_slots.push_back(slot(o.name));
  }
  std::vector<std::vector<int>> read_slots(g.nodes.size());
  for (size_t i = 0; i < g.nodes.size(); ++i)
    for (auto& r : reads[i]) read_slots[i].push_back(cg.slot_of[r]);
  plan_side_branches(cg, read_slots, max_batch);
  // Last use of each slot in execution order, to free intermediates early. Graph outputs are kept.
  std::vector<int> pos(g.nodes.size());
  for (size_t k = 0; k < cg.order.size(); ++k) pos[static_cast<size_t>(cg.order[k])] = static_cast<int>(k);
  std::vector<int> last(static_cast<size_t>(cg.num_slots), -1);
  auto use = [&](int s, size_t i) {
    int& l = last[static_cast<size_t>(s)];
    if (l < 0 || pos[i] > pos[static_cast<size_t>(l)]) l = static_cast<int>(i);
  };
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    for (int s : read_slots[i]) use(s, i);
    for (int o : cg.nodes[i].out)
      if (o >= 0) use(o, i);
  }
  for (int s : cg.output_slots) last[static_cast<size_t>(s)] = -2;
  if (backend.is_device()) {
    // Upload each constant a kernel reads on the device, once.
    std::unordered_map<int, const Tensor*> const_of;
    for (auto& [s, t] : cg.constants) const_of[s] = &t;
    for (auto& cn : cg.nodes) {
      for (size_t i = 0; i < cn.in.size(); ++i) {
        if (cn.in[i] < 0 || cn.residency[i] != Residency::kDevice) continue;
        auto it = const_of.find(cn.in[i]);
        if (it == const_of.end() || cg.device_constants.count(cn.in[i])) continue;
        auto up = backend.upload_constant(*it->second);
        if (!up.is_ok()) return up.status().with_context("uploading constant '" + cn.node->inputs[i] + "'");
        cg.device_constants.emplace(cn.in[i], up.value());
      }
    }
  }
  for (int s = 0; s < cg.num_slots; ++s) {
    int l = last[static_cast<size_t>(s)];
    if (l >= 0) cg.nodes[static_cast<size_t>(l)].release.push_back(s);
  }
  // Donatable inputs: a slot read for the last time by this node, once, as a plain input.
  // Never graph inputs (the caller's data), constants (shared by every context of the engine)
  // or captured outer-scope values; never on a node with subgraphs (its bodies read the outer
  // frame's slots); never on device backends (residency copies share the value).
  if (!backend.is_device()) {
    std::vector<char> pinned(static_cast<size_t>(cg.num_slots), 0);
    for (int s : cg.input_slots) pinned[static_cast<size_t>(s)] = 1;
    for (int s : cg.output_slots) pinned[static_cast<size_t>(s)] = 1;
    for (auto& [s, t] : cg.constants) pinned[static_cast<size_t>(s)] = 1;
    for (auto& [name, s] : cg.captures) pinned[static_cast<size_t>(s)] = 1;
    for (size_t ni = 0; ni < cg.nodes.size(); ++ni) {
      CompiledNode& cn = cg.nodes[ni];
      if (has_subgraph(*cn.node)) continue;
      for (size_t i = 0; i < cn.in.size() && i < 64; ++i) {
        const int s = cn.in[i];
        if (s < 0 || pinned[static_cast<size_t>(s)] || last[static_cast<size_t>(s)] != static_cast<int>(ni))
          continue;
        if (std::count(cn.in.begin(), cn.in.end(), s) != 1) continue;
        cn.donatable |= uint64_t{1} << i;
      }
    }
  }
  return Status::ok();
}

const Value* lookup_outer(const Frame* f, const std::string& name) {
  for (; f; f = f->parent) {
    auto it = f->cg->slot_of.find(name);
    if (it != f->cg->slot_of.end()) {
      const Value& v = f->slots[static_cast<size_t>(it->second)];
      if (!v.is_none()) return &v;
    }
  }
  return nullptr;
}

}  // namespace

Result<std::unique_ptr<CompiledGraph>> compile_graph(const Graph& g, const Backend& backend,
                                                     bool fallback_to_reference,
                                                     int64_t max_batch) {
  auto cg = std::make_unique<CompiledGraph>();
  KILN_RETURN_IF_ERROR(compile_into(g, backend, fallback_to_reference, max_batch, *cg));
  return cg;
}

namespace {
// True when `v` is a host tensor whose (owned) storage has no holder but `v`.
bool sole_owner(const Value& v) {
  if (!v.is_tensor()) return false;
  const auto& st = v.tensor.storage();
  return st && st.use_count() == 1 && !st->is_external() && st->device() == Device::kHost &&
         v.tensor.nbytes() > 0;
}

// The value of slot `s` where a kernel wants it, copying (and caching in frame.alt) if needed.
Result<Value> value_at(const CompiledGraph& cg, Frame& frame, OpContext& ctx, int s, Residency want) {
  Value& v = frame.slots[static_cast<size_t>(s)];
  if (want == Residency::kAny || !v.is_tensor()) return v;
  const bool on_dev = v.tensor.on_device();
  if (on_dev == (want == Residency::kDevice)) return v;
  Value& alt = frame.alt[static_cast<size_t>(s)];
  if (alt.is_none()) {
    KILN_ASSIGN_OR_RETURN(alt, cg.backend->transfer(ctx, v, want == Residency::kDevice ? cg.backend->device()
                                                                                      : Device::kHost));
  }
  return alt;
}
}  // namespace

Status run_graph(const CompiledGraph& cg, Frame& frame, uint64_t seed) {
  if (frame.alt.size() != frame.slots.size()) frame.alt.assign(frame.slots.size(), Value());
  for (auto& [s, t] : cg.constants) frame.slots[static_cast<size_t>(s)] = Value(t);
  for (auto& [s, t] : cg.device_constants) frame.alt[static_cast<size_t>(s)] = Value(t);
  for (auto& [name, s] : cg.captures) {
    const Value* v = lookup_outer(frame.parent, name);
    if (!v) return runtime_error("value '" + name + "' used by graph '" + cg.graph->name +
                                 "' is not defined in any enclosing scope");
    frame.slots[static_cast<size_t>(s)] = *v;
  }
  std::vector<Value> ins, outs;
  // A forked side stream is joined before the run returns, whatever happens.
  struct Joiner {
    SideStream* side = nullptr;
    bool forked = false;
    Status join() {
      forked = false;
      return side->join();
    }
    ~Joiner() {
      if (forked) (void)side->join();  // an error is already being returned
    }
  } joiner{frame.side};
  for (int oi : cg.order) {
    const size_t ni = static_cast<size_t>(oi);
    const CompiledNode& cn = cg.nodes[ni];
    if (joiner.forked && cn.join_before) KILN_RETURN_IF_ERROR(joiner.join().with_context(cn.node->where()));
    void* env = frame.device_env;
    if (cn.side && frame.side && !joiner.forked) {
      KILN_ASSIGN_OR_RETURN(env, frame.side->fork());
      joiner.forked = true;
    }
    OpContext ctx{*cn.node, nullptr, seed + ni * 0x9e3779b97f4a7c15ULL, env};
    ins.assign(cn.in.size(), Value());
    for (size_t i = 0; i < cn.in.size(); ++i) {
      if (cn.in[i] < 0) continue;
      if (frame.slots[static_cast<size_t>(cn.in[i])].is_none())
        return runtime_error(cn.node->where() + ": input '" + cn.node->inputs[i] + "' has no value");
      if (!cg.backend->is_device()) {
        Value& sv = frame.slots[static_cast<size_t>(cn.in[i])];
        if (!((cn.donatable >> i) & 1)) {
          ins[i] = sv;
          continue;
        }
        // The slot dies at this node: move the value out, and donate it if nothing else (a view,
        // another slot, the caller) shares its storage. Per run: nothing shared is touched.
        ins[i] = std::move(sv);
        sv = Value();
        if (sole_owner(ins[i])) ctx.donatable |= uint64_t{1} << i;
        continue;
      }
      auto v = value_at(cg, frame, ctx, cn.in[i], cn.residency[i]);
      if (!v.is_ok()) return v.status().with_context(cn.node->where() + " input '" + cn.node->inputs[i] + "'");
      ins[i] = std::move(v.value());
    }
    outs.assign(cn.out.size(), Value());
    ctx.run_subgraph = [&](const Graph& sg, std::vector<Value> sub_in) -> Result<std::vector<Value>> {
      auto it = cg.subgraphs.find(&sg);
      if (it == cg.subgraphs.end()) return internal_error(cn.node->where() + ": subgraph not compiled");
      const CompiledGraph& sc = *it->second;
      if (sub_in.size() != sc.input_slots.size())
        return runtime_error(cn.node->where() + ": subgraph '" + sg.name + "' takes " +
                             std::to_string(sc.input_slots.size()) + " inputs, got " +
                             std::to_string(sub_in.size()));
      Frame child;
      child.cg = &sc;
      child.parent = &frame;
      child.device_env = frame.device_env;
      child.slots.resize(static_cast<size_t>(sc.num_slots));
      for (size_t i = 0; i < sub_in.size(); ++i) child.slots[static_cast<size_t>(sc.input_slots[i])] = std::move(sub_in[i]);
      KILN_RETURN_IF_ERROR(run_graph(sc, child, ctx.seed + 1));
      std::vector<Value> res;
      for (int s : sc.output_slots) res.push_back(child.slots[static_cast<size_t>(s)]);
      return res;
    };
    if (frame.observer) frame.observer->before(ni);
    Status st = cn.kernel ? cn.kernel->run(ctx, ins, outs) : cn.fn(ctx, ins, outs);
    if (frame.observer) frame.observer->after(ni);
    if (!st.is_ok()) {
      if (st.message().rfind("node '", 0) == 0) return st;
      return st.with_context(cn.node->where());
    }
    for (size_t i = 0; i < cn.out.size(); ++i) {
      if (cn.out[i] < 0) continue;
      if (outs[i].is_none())
        return internal_error(cn.node->where() + ": kernel produced no value for output '" +
                              cn.node->outputs[i] + "'");
      frame.slots[static_cast<size_t>(cn.out[i])] = std::move(outs[i]);
      frame.alt[static_cast<size_t>(cn.out[i])] = Value();
    }
    for (int s : cn.release) {
      frame.slots[static_cast<size_t>(s)] = Value();
      frame.alt[static_cast<size_t>(s)] = Value();
    }
  }
  if (joiner.forked) KILN_RETURN_IF_ERROR(joiner.join());
  for (size_t i = 0; i < cg.output_slots.size(); ++i) {
    if (frame.slots[static_cast<size_t>(cg.output_slots[i])].is_none())
      return runtime_error("graph '" + cg.graph->name + "' output '" + cg.graph->outputs[i].name + "' has no value");
  }
  return Status::ok();
}

Result<std::vector<Value>> run_graph_once(const Graph& g, std::vector<Value> inputs, uint64_t seed) {
  KILN_ASSIGN_OR_RETURN(auto cg, compile_graph(g, cpu_backend(), true));
  if (inputs.size() != cg->input_slots.size())
    return invalid_argument("graph takes " + std::to_string(cg->input_slots.size()) + " inputs, got " +
                            std::to_string(inputs.size()));
  Frame f;
  f.cg = cg.get();
  f.slots.resize(static_cast<size_t>(cg->num_slots));
  for (size_t i = 0; i < inputs.size(); ++i) f.slots[static_cast<size_t>(cg->input_slots[i])] = std::move(inputs[i]);
  KILN_RETURN_IF_ERROR(run_graph(*cg, f, seed));
  std::vector<Value> out;
  for (int s : cg->output_slots) out.push_back(f.slots[static_cast<size_t>(s)]);
  return out;
}

}  // namespace kiln
