// The arena planner and server behind the CUDA backend's per-context arena (runtime/arena_plan.h),
// and, where a GPU is present, the arena end to end: repeated runs on the CUDA backend (plain, CUDA
// graph, outputs kept on the device across runs) against the CPU backend.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "builder/builder_internal.h"
#include "ir/graph.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "engine_test_util.h"
#include "runtime/arena_plan.h"
#include "runtime/device_context.h"

namespace kiln {
namespace {

constexpr size_t K = kArenaAlign;

// Builds traces by hand: a(bytes) returns the request index, r(i) releases it.
struct TraceBuilder {
  std::vector<ArenaEvent> ev;
  uint32_t n = 0;
  uint32_t a(size_t bytes) {
    ev.push_back({true, n, bytes});
    return n++;
  }
  void r(uint32_t i) { ev.push_back({false, i, 0}); }
};

// Replays a trace against a server; returns per request the offset served (kPool for the pool).
// `skip_release` lists requests whose release is withheld (a caller keeping the tensor).
std::vector<size_t> replay(ArenaServer& s, const std::vector<ArenaEvent>& ev,
                           const std::set<uint32_t>& skip_release = {},
                           std::map<uint32_t, size_t> bytes_override = {}) {
  std::vector<size_t> got;
  std::map<uint32_t, uint32_t> slot_of;
  s.begin_run();
  for (const ArenaEvent& e : ev) {
    if (e.alloc) {
      size_t b = bytes_override.count(e.index) ? bytes_override[e.index] : e.bytes;
      uint32_t slot = 0;
      auto off = s.serve(b, &slot);
      got.push_back(off ? *off : ArenaPlan::kPool);
      if (off) slot_of[e.index] = slot;
    } else if (!skip_release.count(e.index) && slot_of.count(e.index)) {
      s.release(slot_of[e.index]);
    }
  }
  s.end_run();
  return got;
}

// Lifetimes [alloc position, release position) of a trace; never released = end of trace.
void lifetimes(const std::vector<ArenaEvent>& ev, std::vector<size_t>& ta,
               std::vector<size_t>& tf) {
  for (size_t t = 0; t < ev.size(); ++t) {
    if (ev[t].alloc) {
      ta.resize(ev[t].index + 1, 0);
      tf.resize(ev[t].index + 1, ev.size());
      ta[ev[t].index] = t;
    } else {
      tf[ev[t].index] = t;
    }
  }
}

// x0 -> x1 -> x2 -> x3 -> x4 of 4, 1, 3, 2 and 5 blocks: each input dies once the next tensor
// exists.
std::vector<ArenaEvent> chain_trace() {
  TraceBuilder t;
  const size_t sizes[] = {4 * K, 1 * K, 3 * K, 2 * K, 5 * K};
  uint32_t prev = t.a(sizes[0]);
  for (int i = 1; i < 5; ++i) {
    uint32_t cur = t.a(sizes[i]);
    t.r(prev);
    prev = cur;
  }
  t.r(prev);
  return t.ev;
}

TEST(ArenaPlan, ChainReusesMemoryOptimally) {
  ArenaPlan p = plan_arena(chain_trace());
  ASSERT_EQ(p.requests(), 5u);
  EXPECT_EQ(p.arena_requests(), 5u);
  EXPECT_EQ(p.sum_arena_sizes, 15 * K);
  // Optimum = the largest pair alive together = x3 + x4 = 7 blocks.
  EXPECT_EQ(p.arena_bytes, 7 * K);
  EXPECT_LT(p.arena_bytes, p.sum_arena_sizes);
  for (size_t i = 0; i + 1 < 5; ++i) {
    bool disjoint = p.offset[i] + p.size[i] <= p.offset[i + 1] ||
                    p.offset[i + 1] + p.size[i + 1] <= p.offset[i];
    EXPECT_TRUE(disjoint) << i;
  }
}

TEST(ArenaPlan, SimpleExampleAndAlignment) {
  TraceBuilder t;
  uint32_t a = t.a(1000), b = t.a(2000);
  t.r(a);
  uint32_t c = t.a(1);
  t.r(b);
  t.r(c);
  ArenaPlan p = plan_arena(t.ev);
  EXPECT_EQ(p.size[a], 4 * K);
  EXPECT_EQ(p.size[b], 8 * K);
  EXPECT_EQ(p.size[c], K);
  EXPECT_EQ(p.arena_bytes, 12 * K);  // a and b live together; c reuses a's bytes
  EXPECT_EQ(p.offset[c], p.offset[a]);
  for (size_t o : p.offset) EXPECT_EQ(o % K, 0u);
}

TEST(ArenaPlan, BlocksAliveAtRunEndStayInThePool) {
  TraceBuilder t;
  uint32_t in = t.a(10 * K);  // e.g. a graph output the caller keeps
  uint32_t x = t.a(4 * K);
  t.r(x);
  uint32_t out = t.a(2 * K);
  ArenaPlan p = plan_arena(t.ev);
  EXPECT_FALSE(p.in_arena(in));
  EXPECT_FALSE(p.in_arena(out));
  EXPECT_TRUE(p.in_arena(x));
  EXPECT_EQ(p.arena_bytes, 4 * K);
  ArenaServer s(p);
  auto got = replay(s, t.ev);
  EXPECT_EQ(got[in], ArenaPlan::kPool);
  EXPECT_EQ(got[out], ArenaPlan::kPool);
  EXPECT_EQ(got[x], p.offset[x]);
  EXPECT_EQ(s.last_run().from_arena, 1u);
  EXPECT_EQ(s.last_run().from_pool, 2u);
  EXPECT_FALSE(s.last_run().deviated);
}

TEST(ArenaPlan, ManyRequestsPlanTheLargestOnly) {
  // A long loop: more requests than the planner takes; the largest are planned, the rest pooled.
  TraceBuilder t;
  for (size_t i = 0; i < kArenaMaxPlanned + 100; ++i) t.r(t.a((i < 50 ? 2 : 1) * K));
  ArenaPlan p = plan_arena(t.ev);
  EXPECT_EQ(p.arena_requests(), kArenaMaxPlanned);
  for (uint32_t i = 0; i < 50; ++i) EXPECT_TRUE(p.in_arena(i));
  EXPECT_EQ(p.arena_bytes, 2 * K);  // one at a time: all share the same bytes
  ArenaServer s(p);
  auto got = replay(s, t.ev);
  EXPECT_EQ(got, p.offset);
}

TEST(ArenaPlan, EmptyTraceGivesEmptyArena) {
  ArenaPlan p = plan_arena({});
  EXPECT_EQ(p.arena_bytes, 0u);
  ArenaServer s(p);
  auto got = replay(s, {});
  EXPECT_TRUE(got.empty());
  EXPECT_FALSE(s.last_run().deviated);
}

// Random traces: planned blocks with overlapping lifetimes never share bytes (brute force),
// escaping blocks stay in the pool, and an identical run is served entirely by the plan.
TEST(ArenaPlan, RandomTracesAreSafe) {
  std::mt19937 rng(1234);
  int reused = 0, with_escapes = 0;
  for (int tc = 0; tc < 1000; ++tc) {
    TraceBuilder t;
    std::vector<uint32_t> live;
    const int n_req = 1 + static_cast<int>(rng() % 60);
    while (static_cast<int>(t.n) < n_req || (!live.empty() && rng() % 4 != 0)) {
      bool alloc = static_cast<int>(t.n) < n_req && (live.empty() || rng() % 2 == 0);
      if (alloc) {
        size_t bytes = rng() % 3 == 0 ? rng() % (64 * K) : (1 + rng() % 16) * K;
        live.push_back(t.a(bytes));
      } else {
        size_t k = rng() % live.size();
        t.r(live[k]);
        live.erase(live.begin() + static_cast<long>(k));
      }
    }
    ArenaPlan p = plan_arena(t.ev);
    ASSERT_EQ(p.requests(), t.n);
    std::vector<size_t> ta, tf;
    lifetimes(t.ev, ta, tf);
    std::set<uint32_t> escaped(live.begin(), live.end());
    size_t max_live = 0;
    for (size_t time = 0; time < t.ev.size(); ++time) {  // lower bound: bytes alive together
      size_t sum = 0;
      for (uint32_t i = 0; i < t.n; ++i)
        if (p.in_arena(i) && ta[i] <= time && time < tf[i]) sum += p.size[i];
      max_live = std::max(max_live, sum);
    }
    EXPECT_GE(p.arena_bytes, max_live);
    reused += p.arena_bytes < p.sum_arena_sizes;
    with_escapes += !escaped.empty();
    EXPECT_LE(p.arena_bytes, p.sum_arena_sizes);
    for (uint32_t i = 0; i < t.n; ++i) {
      ASSERT_EQ(p.in_arena(i), !escaped.count(i)) << "case " << tc << " request " << i;
      if (!p.in_arena(i)) continue;
      EXPECT_EQ(p.offset[i] % K, 0u);
      EXPECT_LE(p.offset[i] + p.size[i], p.arena_bytes);
      for (uint32_t j = 0; j < t.n; ++j) {
        if (j == i || !p.in_arena(j)) continue;
        const bool mem =
            p.offset[i] < p.offset[j] + p.size[j] && p.offset[j] < p.offset[i] + p.size[i];
        const bool life = ta[i] < tf[j] && ta[j] < tf[i];
        ASSERT_FALSE(mem && life) << "case " << tc << ": requests " << i << " and " << j
                                  << " are alive together and share bytes";
      }
    }
    ArenaServer s(p);
    for (int run = 0; run < 2; ++run) {
      auto got = replay(s, t.ev);
      // The escaped blocks of this replay stay live in the server only if served from the arena,
      // which they are not; so every run is served identically.
      for (uint32_t i = 0; i < t.n; ++i)
        ASSERT_EQ(got[i], p.offset[i]) << "case " << tc << " run " << run;
      EXPECT_EQ(s.last_run().from_arena, p.arena_requests());
      EXPECT_FALSE(s.last_run().deviated);
      EXPECT_EQ(s.live_blocks(), 0u);
    }
  }
  // The generator exercises both reuse and escaping blocks.
  EXPECT_GT(reused, 500);
  EXPECT_GT(with_escapes, 300);
}


TEST(ArenaServer, IdenticalRunsFollowThePlan) {
  auto ev = chain_trace();
  ArenaPlan p = plan_arena(ev);
  ArenaServer s(p);
  for (int run = 0; run < 3; ++run) {
    auto got = replay(s, ev);
    EXPECT_EQ(got, p.offset);
    EXPECT_EQ(s.last_run().requests, 5u);
    EXPECT_EQ(s.last_run().from_arena, 5u);
    EXPECT_EQ(s.last_run().from_pool, 0u);
    EXPECT_EQ(s.last_run().arena_bytes_served, p.sum_arena_sizes);
  }
}

TEST(ArenaServer, SizeMismatchSendsRestOfRunToPool) {
  auto ev = chain_trace();
  ArenaPlan p = plan_arena(ev);
  ArenaServer s(p);
  // Request 2 is bigger than planned: it and everything after come from the pool.
  auto got = replay(s, ev, {}, {{2, 3 * K + 1}});
  EXPECT_EQ(got[0], p.offset[0]);
  EXPECT_EQ(got[1], p.offset[1]);
  for (size_t i = 2; i < 5; ++i) EXPECT_EQ(got[i], ArenaPlan::kPool) << i;
  EXPECT_TRUE(s.last_run().deviated);
  EXPECT_EQ(s.last_run().from_arena, 2u);
  EXPECT_EQ(s.last_run().from_pool, 3u);
  // Smaller is a mismatch as well (the run took another path).
  got = replay(s, ev, {}, {{0, K}});
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(got[i], ArenaPlan::kPool) << i;
  // The next run that matches is served from the arena again.
  got = replay(s, ev);
  EXPECT_EQ(got, p.offset);
  EXPECT_FALSE(s.last_run().deviated);
  // Same size after rounding is not a mismatch.
  got = replay(s, ev, {}, {{1, K - 7}});
  EXPECT_EQ(got, p.offset);
}

TEST(ArenaServer, MoreRequestsThanTraceGoToPool) {
  auto ev = chain_trace();
  ArenaPlan p = plan_arena(ev);
  ArenaServer s(p);
  auto longer = ev;
  longer.push_back({true, 5, K});
  longer.push_back({false, 5, 0});
  auto got = replay(s, longer);
  ASSERT_EQ(got.size(), 6u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(got[i], p.offset[i]);
  EXPECT_EQ(got[5], ArenaPlan::kPool);
  EXPECT_TRUE(s.last_run().deviated);
  // Fewer requests (a CUDA-graph replay allocates nothing) is fine.
  got = replay(s, {});
  EXPECT_FALSE(s.last_run().deviated);
  EXPECT_EQ(s.last_run().requests, 0u);
}

TEST(ArenaServer, BlockKeptAlivePastItsReleaseIsNotReused) {
  auto ev = chain_trace();
  ArenaPlan p = plan_arena(ev);
  ArenaServer s(p);
  // Find the requests whose regions intersect request 0's (they reuse its bytes later).
  std::set<uint32_t> over;
  for (uint32_t j = 1; j < 5; ++j)
    if (p.offset[j] < p.offset[0] + p.size[0] && p.offset[0] < p.offset[j] + p.size[j])
      over.insert(j);
  ASSERT_FALSE(over.empty());
  // Simulate a caller holding request 0's tensor: its release never comes.
  std::vector<size_t> got;
  std::map<uint32_t, uint32_t> slots;
  s.begin_run();
  for (const ArenaEvent& e : ev) {
    if (e.alloc) {
      uint32_t slot = 0;
      auto off = s.serve(e.bytes, &slot);
      got.push_back(off ? *off : ArenaPlan::kPool);
      if (off) slots[e.index] = slot;
    } else if (e.index != 0 && slots.count(e.index)) {
      s.release(slots[e.index]);
    }
  }
  s.end_run();
  EXPECT_FALSE(s.last_run().deviated);
  EXPECT_EQ(got[0], p.offset[0]);
  for (uint32_t i = 1; i < 5; ++i) {
    if (over.count(i))
      EXPECT_EQ(got[i], ArenaPlan::kPool) << i;
    else
      EXPECT_EQ(got[i], p.offset[i]) << i;
  }
  // Still held during the next run: request 0 itself and its overlaps go to the pool.
  got = replay(s, ev);
  EXPECT_EQ(got[0], ArenaPlan::kPool);
  for (uint32_t i : over) EXPECT_EQ(got[i], ArenaPlan::kPool) << i;
  // The caller drops it: back to the plan.
  s.release(slots[0]);
  got = replay(s, ev);
  EXPECT_EQ(got, p.offset);
}

// Whatever the runs do (releases late, early, withheld across runs, other sizes) and even with a
// corrupted plan, the server never lends two intersecting regions at once.
TEST(ArenaServer, NeverLendsIntersectingRegions) {
  std::mt19937 rng(99);
  for (int tc = 0; tc < 300; ++tc) {
    TraceBuilder t;
    std::vector<uint32_t> live;
    const int n_req = 1 + static_cast<int>(rng() % 40);
    while (static_cast<int>(t.n) < n_req || !live.empty()) {
      if (static_cast<int>(t.n) < n_req && (live.empty() || rng() % 2 == 0)) {
        live.push_back(t.a((1 + rng() % 8) * K));
      } else {
        size_t k = rng() % live.size();
        t.r(live[k]);
        live.erase(live.begin() + static_cast<long>(k));
      }
    }
    ArenaPlan p = plan_arena(t.ev);
    if (tc % 3 == 2) {  // corrupt the plan: random offsets, overlapping blocks alive together
      for (auto& o : p.offset)
        if (o != ArenaPlan::kPool) o = (rng() % 8) * K;
    }
    ArenaServer s(p);
    std::map<uint32_t, std::pair<size_t, size_t>> out;  // slot -> [begin, end) lent, any run
    auto check_and_add = [&](uint32_t slot, size_t off) {
      const size_t end = off + p.size[slot];
      for (auto& [other, iv] : out)
        ASSERT_FALSE(off < iv.second && iv.first < end)
            << "case " << tc << ": slot " << slot << " intersects live slot " << other;
      out[slot] = {off, end};
    };
    std::vector<uint32_t> held;  // slots kept across runs
    for (int run = 0; run < 6; ++run) {
      std::map<uint32_t, uint32_t> slot_of;
      std::vector<uint32_t> late;
      s.begin_run();
      for (const ArenaEvent& e : t.ev) {
        if (e.alloc) {
          size_t bytes = rng() % 20 == 0 ? e.bytes + K : e.bytes;
          uint32_t slot = 0;
          if (auto off = s.serve(bytes, &slot)) {
            check_and_add(slot, *off);
            slot_of[e.index] = slot;
          }
        } else if (slot_of.count(e.index)) {
          uint32_t slot = slot_of[e.index];
          int what = static_cast<int>(rng() % 10);
          if (what == 0) {
            held.push_back(slot);  // the caller keeps it
          } else if (what == 1) {
            late.push_back(slot);  // released at the end of the run
          } else {
            out.erase(slot);
            s.release(slot);
          }
        }
        if (!late.empty() && rng() % 4 == 0) {
          out.erase(late.back());
          s.release(late.back());
          late.pop_back();
        }
      }
      for (uint32_t slot : late) {
        out.erase(slot);
        s.release(slot);
      }
      s.end_run();
      if (rng() % 2 == 0) {
        for (uint32_t slot : held) {
          out.erase(slot);
          s.release(slot);
        }
        held.clear();
      }
      EXPECT_EQ(s.live_blocks(), out.size());
    }
  }
}

TEST(ArenaRecorder, RecordsAndIgnoresStaleTickets) {
  ArenaRecorder r;
  EXPECT_EQ(r.on_alloc(100), ArenaRecorder::kNoTicket);  // not recording
  r.begin();
  uint64_t a = r.on_alloc(100), b = r.on_alloc(300);
  r.on_release(a);
  uint64_t c = r.on_alloc(50);
  r.on_release(ArenaRecorder::kNoTicket);
  auto ev = r.finish();
  r.on_release(b);  // after the run: ignored
  ASSERT_EQ(ev.size(), 4u);
  EXPECT_TRUE(ev[0].alloc);
  EXPECT_EQ(ev[1].bytes, 300u);
  EXPECT_FALSE(ev[2].alloc);
  EXPECT_EQ(ev[2].index, 0u);
  EXPECT_EQ(ev[3].index, 2u);
  ArenaPlan p = plan_arena(ev);
  EXPECT_TRUE(p.in_arena(0));
  EXPECT_FALSE(p.in_arena(1));
  EXPECT_FALSE(p.in_arena(2));
  // A second recording: tickets of the first are stale.
  r.begin();
  uint64_t d = r.on_alloc(10);
  r.on_release(c);
  r.on_release(d);
  ev = r.finish();
  ASSERT_EQ(ev.size(), 2u);
  EXPECT_EQ(ev[1].index, 0u);
  EXPECT_FALSE(ev[1].alloc);
}

TEST(ArenaServer, ReleasesFromOtherThreads) {
  // Many blocks alive together, then released by other threads while the next run is served.
  TraceBuilder t;
  std::vector<uint32_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(t.a((1 + i % 5) * K));
  for (uint32_t i : ids) t.r(i);
  ArenaPlan p = plan_arena(t.ev);
  ASSERT_EQ(p.arena_requests(), 64u);
  ArenaServer s(p);
  for (int round = 0; round < 20; ++round) {
    std::vector<uint32_t> slots;
    s.begin_run();
    for (const ArenaEvent& e : t.ev) {
      if (!e.alloc) continue;
      uint32_t slot = 0;
      auto off = s.serve(e.bytes, &slot);
      ASSERT_TRUE(off.has_value());
      slots.push_back(slot);
    }
    s.end_run();
    EXPECT_EQ(s.live_blocks(), 64u);
    std::vector<std::thread> th;
    for (int k = 0; k < 4; ++k)
      th.emplace_back([&, k] {
        for (size_t i = static_cast<size_t>(k); i < slots.size(); i += 4) s.release(slots[i]);
      });
    // Meanwhile this thread runs a partial run: whatever it gets must not be live elsewhere.
    s.begin_run();
    uint32_t slot = 0;
    auto off = s.serve(t.ev[0].bytes, &slot);
    if (off) s.release(slot);
    s.end_run();
    for (auto& x : th) x.join();
    EXPECT_EQ(s.live_blocks(), 0u);
  }
  // Recorder under concurrent releases.
  ArenaRecorder r;
  r.begin();
  std::vector<uint64_t> tickets;
  for (int i = 0; i < 256; ++i) tickets.push_back(r.on_alloc(K));
  std::vector<std::thread> th;
  for (int k = 0; k < 4; ++k)
    th.emplace_back([&, k] {
      for (size_t i = static_cast<size_t>(k); i < tickets.size(); i += 4) r.on_release(tickets[i]);
    });
  for (auto& x : th) x.join();
  auto ev = r.finish();
  EXPECT_EQ(ev.size(), 512u);
  ArenaPlan q = plan_arena(ev);
  EXPECT_EQ(q.arena_requests(), 256u);
  EXPECT_EQ(q.arena_bytes, 256 * K);  // all alive together
}

// ---- On the GPU (skipped without one) ----

std::vector<float> rand_floats(size_t n, uint32_t seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

constexpr int64_t kB = 8, kIn = 64, kHid = 256;

Node make_node(const std::string& op, std::vector<std::string> in, std::string out) {
  Node n;
  n.name = out + "_node";
  n.op_type = op;
  n.inputs = std::move(in);
  n.outputs = {std::move(out)};
  return n;
}

// A residual MLP: blocks whose lifetimes overlap (h1 across h2, x to the end) and two outputs,
// one (z) also feeding nothing, the other after a chain.
Model mlp_model() {
  Model m;
  m.ir_version = 8;
  m.opsets[""] = 17;
  Graph& g = m.graph;
  g.name = "arena_mlp";
  g.inputs.push_back({"x", TypeInfo::tensor(DataType::kFloat, {kB, kIn})});
  g.outputs.push_back({"y", TypeInfo::tensor(DataType::kFloat)});
  g.outputs.push_back({"z", TypeInfo::tensor(DataType::kFloat)});
  g.initializers["w1"] =
      Tensor::from_vector<float>({kIn, kHid}, rand_floats(kIn * kHid, 11, 0.15f));
  g.initializers["b1"] = Tensor::from_vector<float>({kHid}, rand_floats(kHid, 12, 0.1f));
  g.initializers["w2"] =
      Tensor::from_vector<float>({kHid, kHid}, rand_floats(kHid * kHid, 13, 0.08f));
  g.initializers["w3"] =
      Tensor::from_vector<float>({kHid, kIn}, rand_floats(kHid * kIn, 14, 0.08f));
  g.nodes.push_back(make_node("MatMul", {"x", "w1"}, "m1"));
  g.nodes.push_back(make_node("Add", {"m1", "b1"}, "a1"));
  g.nodes.push_back(make_node("Relu", {"a1"}, "h1"));
  g.nodes.push_back(make_node("MatMul", {"h1", "w2"}, "m2"));
  g.nodes.push_back(make_node("Relu", {"m2"}, "h2"));
  g.nodes.push_back(make_node("Add", {"h1", "h2"}, "h3"));
  g.nodes.push_back(make_node("MatMul", {"h3", "w3"}, "h4"));
  g.nodes.push_back(make_node("Add", {"h4", "x"}, "s"));
  g.nodes.push_back(make_node("Softmax", {"s"}, "y"));
  g.nodes.push_back(make_node("Tanh", {"h3"}, "z"));
  return m;
}

std::shared_ptr<Engine> build_mlp(const std::string& device) {
  return test::build_engine(mlp_model(), device);
}

using test::host_floats;

double max_err(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return 1e30;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    worst =
        std::max(worst, std::fabs(double(got[i]) - want[i]) / (1e-3 + std::fabs(double(want[i]))));
  return worst;
}

struct Outs {
  Tensor y, z;
};

Outs run_once(ExecutionContext& ctx, const std::vector<float>& x) {
  Outs o;
  Status st = ctx.set_input("x", Tensor::from_vector<float>({kB, kIn}, x));
  EXPECT_TRUE(st.is_ok()) << st.message();
  st = ctx.enqueue();
  if (st.is_ok()) st = ctx.synchronize();
  EXPECT_TRUE(st.is_ok()) << st.message();
  auto y = ctx.get_output("y");
  auto z = ctx.get_output("z");
  EXPECT_TRUE(y.is_ok() && z.is_ok());
  if (y.is_ok()) o.y = y.value();
  if (z.is_ok()) o.z = z.value();
  return o;
}

TEST(CudaArena, RepeatedRunsMatchTheCpu) {
  const DeviceRuntime* rt = cuda_runtime();
  if (!rt || !rt->fingerprint().is_ok()) GTEST_SKIP() << "no usable CUDA GPU";
  auto cpu = build_mlp("cpu");
  auto gpu = build_mlp("cuda");
  ASSERT_TRUE(cpu && gpu);
  auto cpu_ctx = cpu->create_execution_context();
  ASSERT_TRUE(cpu_ctx.is_ok());
  constexpr double kTol = 2e-3;
  // Modes: 0 plain, 1 CUDA graph, 2 outputs left on the device and kept across later runs,
  // 3 the pool only (KILN_CUDA_ARENA=0) for the memory comparison.
  size_t mem[4] = {};
  for (int mode = 0; mode < 4; ++mode) {
    if (mode == 3) setenv("KILN_CUDA_ARENA", "0", 1);
    auto made = gpu->create_execution_context();
    if (mode == 3) unsetenv("KILN_CUDA_ARENA");
    ASSERT_TRUE(made.is_ok()) << made.status().message();
    ExecutionContext& ctx = *made.value();
    if (mode == 1) {
      ASSERT_TRUE(ctx.set_cuda_graph(true).is_ok());
    }
    struct Held {
      Tensor y, z;
      std::vector<float> want_y, want_z;
    };
    std::vector<Held> held;
    for (int run = 0; run < 6; ++run) {
      // Mode 2: the first run (the recorded one) copies outputs back, so they are planned into
      // the arena; later runs leave them on the device and this test keeps them.
      if (mode == 2 && run == 1) {
        ASSERT_TRUE(ctx.set_outputs_on_device(true).is_ok());
      }
      std::vector<float> x = rand_floats(kB * kIn, 1000u * mode + run, 2.f);
      Outs ref = run_once(*cpu_ctx.value(), x);
      std::vector<float> want_y = host_floats(ref.y), want_z = host_floats(ref.z);
      Outs got = run_once(ctx, x);
      EXPECT_LE(max_err(host_floats(got.y), want_y), kTol) << "mode " << mode << " run " << run;
      EXPECT_LE(max_err(host_floats(got.z), want_z), kTol) << "mode " << mode << " run " << run;
      if (got.y.on_device()) held.push_back({got.y, got.z, want_y, want_z});
    }
    // Outputs the caller kept were not overwritten by the runs after them.
    for (size_t i = 0; i < held.size(); ++i) {
      EXPECT_LE(max_err(host_floats(held[i].y), held[i].want_y), kTol)
          << "held output y of run " << i + 1;
      EXPECT_LE(max_err(host_floats(held[i].z), held[i].want_z), kTol)
          << "held output z of run " << i + 1;
    }
    if (mode == 2) {
      EXPECT_EQ(held.size(), 5u);
    }
    mem[mode] = ctx.device_memory_bytes();
    EXPECT_GT(mem[mode], 0u);
  }
  std::printf(
      "device memory per context: arena %.2f MiB (CUDA graph %.2f MiB), pool only %.2f MiB\n",
      mem[0] / 1048576.0, mem[1] / 1048576.0, mem[3] / 1048576.0);
}

}  // namespace
}  // namespace kiln
