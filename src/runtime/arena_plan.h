// Memory pattern for device allocators ("one arena per execution context", as TensorRT; ONNX
// Runtime calls it a memory pattern). Generic C++, no CUDA, so it is unit-tested on any machine.
//
//   1. ArenaRecorder: during one inference run, records the ordered allocation requests (bytes)
//      and release events. Releases may come from any thread (a tensor the caller drops).
//   2. plan_arena(): from that trace, gives every request released within the run an offset in one
//      arena so that two requests whose lifetimes overlap never overlap in memory. Requests still
//      alive at the end of the run (outputs the caller keeps, long-lived buffers) stay in the pool:
//      the next run would overwrite them in the arena.
//   3. ArenaServer: serves later runs. Request i of a run gets its planned offset only if the run
//      still follows the trace (same request position and size) and no block it lent out and has
//      not got back intersects that region; anything else is answered "use the pool". So a stale
//      or wrong plan costs memory reuse, never correctness.
//
// Everything is defined inline here: the CUDA device pool (library kiln_cuda) uses it and is
// linked after kiln_runtime, so out-of-line definitions in arena_plan.cpp would not resolve there.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace kiln {

constexpr size_t kArenaAlign = 256;
// Larger requests are never planned (no arena could hold them; keeps offset arithmetic exact).
constexpr size_t kArenaMaxRequest = size_t{1} << 48;
// At most this many requests go to the arena, the largest (planning is quadratic in their count);
// smaller ones beyond it stay in the pool. Only runs with many allocations (loops) reach it.
constexpr size_t kArenaMaxPlanned = 8192;

// Bytes rounded up to the arena alignment (0 counts as 1 byte, as allocators do).
inline size_t arena_align(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes > kArenaMaxRequest) return kArenaMaxRequest + kArenaAlign;  // too big to plan
  return (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
}

// One trace event: request `index` was made (alloc, with its byte count) or its block released.
struct ArenaEvent {
  bool alloc = true;
  uint32_t index = 0;
  size_t bytes = 0;  // alloc only
};

// Records the requests of one run. Thread-safe. Tickets name a request of one recording:
// releases of blocks from an earlier recording, or arriving after finish(), are ignored.
class ArenaRecorder {
 public:
  static constexpr uint64_t kNoTicket = 0;

  void begin() {
    std::lock_guard<std::mutex> lock(mu_);
    ++gen_;
    if (gen_ == 0) gen_ = 1;  // 0 would make kNoTicket tickets
    count_ = 0;
    events_.clear();
    recording_ = true;
  }
  bool recording() const {
    std::lock_guard<std::mutex> lock(mu_);
    return recording_;
  }
  // Records the next request; returns the ticket to pass to on_release (kNoTicket when idle).
  uint64_t on_alloc(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!recording_ || count_ == std::numeric_limits<uint32_t>::max()) return kNoTicket;
    const uint32_t i = count_++;
    events_.push_back({true, i, bytes});
    return (static_cast<uint64_t>(gen_) << 32) | i;
  }
  void on_release(uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!recording_ || ticket == kNoTicket || static_cast<uint32_t>(ticket >> 32) != gen_) return;
    events_.push_back({false, static_cast<uint32_t>(ticket), 0});
  }
  // Ends the recording and returns its trace.
  std::vector<ArenaEvent> finish() {
    std::lock_guard<std::mutex> lock(mu_);
    recording_ = false;
    return std::move(events_);
  }

 private:
  mutable std::mutex mu_;
  bool recording_ = false;
  uint32_t gen_ = 0, count_ = 0;
  std::vector<ArenaEvent> events_;
};

struct ArenaPlan {
  static constexpr size_t kPool = std::numeric_limits<size_t>::max();
  // Per request, in request order: its size rounded to kArenaAlign and its arena offset (kPool:
  // served by the pool).
  std::vector<size_t> size, offset;
  size_t arena_bytes = 0;
  size_t sum_arena_sizes = 0;  // what the arena requests would take without any reuse

  size_t requests() const { return size.size(); }
  size_t arena_requests() const {
    size_t n = 0;
    for (size_t o : offset) n += o != kPool;
    return n;
  }
  bool in_arena(size_t i) const { return i < offset.size() && offset[i] != kPool; }
};

// Plans the arena for a complete trace. Lifetime of request i = [position of its alloc event,
// position of its release event) in the trace; a release before a later alloc lets that alloc
// reuse the memory. Requests never released in the trace stay in the pool.
//
// Placement is the classic greedy for this NP-hard packing (offline dynamic storage allocation):
// take requests by size, largest first (ties: earlier alloc first), and put each at the lowest
// offset where it does not intersect any already placed request whose lifetime overlaps its own.
// O(n^2 log n) at plan time for n planned requests (capped by kArenaMaxPlanned).
inline ArenaPlan plan_arena(const std::vector<ArenaEvent>& events) {
  ArenaPlan plan;
  constexpr size_t kNever = std::numeric_limits<size_t>::max();
  std::vector<size_t> t_alloc, t_free;
  for (size_t t = 0; t < events.size(); ++t) {
    const ArenaEvent& e = events[t];
    if (e.alloc) {
      // Requests are numbered in order; a malformed trace (gaps) gets the missing ones as pool.
      if (e.index >= t_alloc.size()) {
        t_alloc.resize(e.index + 1, kNever);
        t_free.resize(e.index + 1, kNever);
        plan.size.resize(e.index + 1, 0);
      }
      if (t_alloc[e.index] != kNever) continue;  // duplicate: keep the first
      t_alloc[e.index] = t;
      plan.size[e.index] = arena_align(e.bytes);
    } else if (e.index < t_alloc.size() && t_alloc[e.index] != kNever &&
               t_free[e.index] == kNever) {
      t_free[e.index] = t;
    }
  }
  const size_t n = plan.size.size();
  plan.offset.assign(n, ArenaPlan::kPool);

  std::vector<uint32_t> order;
  for (size_t i = 0; i < n; ++i)
    if (t_alloc[i] != kNever && t_free[i] != kNever && plan.size[i] <= kArenaMaxRequest)
      order.push_back(static_cast<uint32_t>(i));
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    if (plan.size[a] != plan.size[b]) return plan.size[a] > plan.size[b];
    return t_alloc[a] < t_alloc[b];
  });
  if (order.size() > kArenaMaxPlanned) order.resize(kArenaMaxPlanned);

  std::vector<uint32_t> placed;
  std::vector<std::pair<size_t, size_t>> busy;  // [begin, end) of conflicting placed blocks
  for (uint32_t i : order) {
    busy.clear();
    for (uint32_t j : placed)
      if (t_alloc[i] < t_free[j] && t_alloc[j] < t_free[i])
        busy.emplace_back(plan.offset[j], plan.offset[j] + plan.size[j]);
    std::sort(busy.begin(), busy.end());
    size_t off = 0;
    for (auto& [b, e] : busy) {
      if (off + plan.size[i] <= b) break;  // fits in the gap before this block
      off = std::max(off, e);
    }
    plan.offset[i] = off;
    plan.arena_bytes = std::max(plan.arena_bytes, off + plan.size[i]);
    plan.sum_arena_sizes += plan.size[i];
    placed.push_back(i);
  }

  return plan;
}

// What happened to the requests of one run.
struct ArenaRunStats {
  size_t requests = 0, from_arena = 0, from_pool = 0;
  size_t arena_bytes_served = 0;  // planned sizes of the requests served from the arena
  bool deviated = false;          // the run left the trace (size mismatch or more requests)
};

// Serves runs from a plan. Thread-safe: requests come from the thread running the inference,
// releases from any thread. The blocks it has lent and not yet got back ("live") never intersect,
// so they are kept as disjoint intervals sorted by offset, and "is request i's region free?" is
// one ordered-map lookup: O(log live blocks) per request.
class ArenaServer {
 public:
  explicit ArenaServer(ArenaPlan plan) : plan_(std::move(plan)), lent_(plan_.requests(), 0) {}
  const ArenaPlan& plan() const { return plan_; }

  void begin_run() {
    std::lock_guard<std::mutex> lock(mu_);
    in_run_ = true;
    next_ = 0;
    cur_ = ArenaRunStats();
  }
  // The next request of the run: its arena offset, or nullopt to serve it from the pool. On
  // success `*slot` names the block for release(). Outside a run every request goes to the pool
  // (and is not counted).
  std::optional<size_t> serve(size_t bytes, uint32_t* slot) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_run_) return std::nullopt;
    const size_t i = next_++;
    ++cur_.requests;
    // Leaving the trace (more requests than recorded, or a size the plan did not see) means the
    // run takes another path; positions no longer correspond: the rest of the run uses the pool.
    if (!cur_.deviated && (i >= plan_.requests() || arena_align(bytes) != plan_.size[i]))
      cur_.deviated = true;
    // Region taken: a tensor kept longer than in the trace (or from an earlier run) still holds
    // bytes planned for this request.
    if (cur_.deviated || !plan_.in_arena(i) || !region_free(plan_.offset[i], plan_.size[i])) {
      ++cur_.from_pool;
      return std::nullopt;
    }
    live_.emplace(plan_.offset[i], plan_.offset[i] + plan_.size[i]);
    lent_[i] = 1;
    ++cur_.from_arena;
    cur_.arena_bytes_served += plan_.size[i];
    *slot = static_cast<uint32_t>(i);
    return plan_.offset[i];
  }
  // The block served as `slot` died (any thread, any time, also after its run ended).
  void release(uint32_t slot) {
    std::lock_guard<std::mutex> lock(mu_);
    if (slot >= lent_.size() || !lent_[slot]) return;
    lent_[slot] = 0;
    live_.erase(plan_.offset[slot]);
  }
  ArenaRunStats end_run() {
    std::lock_guard<std::mutex> lock(mu_);
    in_run_ = false;
    last_ = cur_;
    return last_;
  }
  ArenaRunStats last_run() const {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }
  size_t live_blocks() const {
    std::lock_guard<std::mutex> lock(mu_);
    return live_.size();
  }

 private:
  // No live block intersects [off, off + size). Live intervals are disjoint and sorted by start,
  // so their ends are sorted too: only the last one starting before off + size can reach past off.
  bool region_free(size_t off, size_t size) const {
    auto it = live_.lower_bound(off + size);  // first starting at or after our end
    if (it == live_.begin()) return true;
    --it;
    return it->second <= off;
  }

  mutable std::mutex mu_;
  ArenaPlan plan_;
  std::vector<char> lent_;         // per request: its block is out
  std::map<size_t, size_t> live_;  // offset -> end of each block out
  bool in_run_ = false;
  size_t next_ = 0;
  ArenaRunStats cur_, last_;
};

}  // namespace kiln
