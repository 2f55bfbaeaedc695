// Device memory of one execution context: a caching allocator plus a planned arena.
//
// Pool: blocks freed by tensors go back to a best-fit free list and are reused for later requests
// in stream order (all users of one pool enqueue on one stream), so steady-state inference does
// no cudaMalloc and a CUDA graph captured after a warm-up run finds every block already reserved.
//
// Arena ("memory pattern", runtime/arena_plan.h): the context marks each inference with
// begin_run()/end_run(). The first run's requests and releases are recorded; at its end the pool
// plans offsets in one arena (blocks alive together never share bytes), cudaMallocs that one
// block, returns the recorded run's cached pool blocks to the driver, and serves the requests of
// later runs at their planned offsets. A request the plan cannot serve safely (the run left the
// trace, a block kept alive longer than planned, or one that outlived the recorded run such as an
// output the caller holds) comes from the pool as before. KILN_CUDA_ARENA=0 turns the arena off.
#pragma once
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "kiln/status.h"
#include "kiln/tensor.h"
#include "runtime/arena_plan.h"

namespace kiln::cuda {

struct ArenaStats {
  bool enabled = false;  // arena mode on (KILN_CUDA_ARENA is not "0")
  bool active = false;   // planned and its block allocated: later runs are served from it
  size_t arena_bytes = 0;
  size_t planned_requests = 0;  // requests of the recorded run
  size_t planned_in_arena = 0;  // of which placed in the arena (the rest stay in the pool)
  size_t unshared_bytes = 0;    // what the arena's requests would take without any reuse
  ArenaRunStats last_run;       // the last finished run: requests from the arena / from the pool
};

class DevicePool : public std::enable_shared_from_this<DevicePool> {
 public:
  static std::shared_ptr<DevicePool> create(int device);
  ~DevicePool();
  // Device storage of at least `bytes` (256-byte aligned); returned to the pool (or its arena
  // block marked free) when it dies. Any thread may drop it.
  Result<std::shared_ptr<Storage>> allocate(size_t bytes);
  size_t reserved_bytes() const;  // held from the driver (in use + cached + the arena)
  size_t peak_in_use_bytes() const;
  // Returns the cached blocks to the driver (synchronizes the device; not during capture). The
  // arena is kept.
  void trim();

  // One inference: allocations between begin_run() and end_run() form the run the arena plans
  // (the first run with `may_record`) or serves (every run once the arena exists); allocations
  // outside a run always use the pool. end_run() of the recorded run plans and allocates the
  // arena, then, if `may_free_cached` (no CUDA graph holds pool addresses), waits for `stream`
  // (cudaStream_t) and hands the pool's cached blocks back to the driver: call it outside graph
  // capture; its error is that stream's (a failed kernel). cancel_run(): the run failed; nothing
  // is planned from it.
  void begin_run(bool may_record = true);
  Status end_run(void* stream, bool may_free_cached = true);
  void cancel_run();
  ArenaStats arena_stats() const;
  // Parking (a side stream's window, cuda_context.cpp): while on, storages that die are not
  // returned (to the pool, the arena server or the trace) until parking ends, so no block a
  // kernel on either stream may still use is handed to the other. Any thread may drop storages.
  void set_parking(bool on);

 private:
  explicit DevicePool(int device) : device_(device) {}
  void release(void* p, size_t size);
  // Runs `done` now, or at the end of parking.
  void retire(std::function<void()> done);
  void release_arena(size_t size);
  Status make_arena(const std::vector<ArenaEvent>& trace, void* stream, bool may_free_cached);
  int device_ = 0;
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t reserved_ = 0, in_use_ = 0, peak_ = 0;
  bool parking_ = false;
  std::vector<std::function<void()>> parked_;

  // Arena state (guarded by mu_; the recorder and server lock themselves as well).
  bool arena_enabled_ = false, in_run_ = false, arena_given_up_ = false;
  std::shared_ptr<ArenaRecorder> recorder_;  // set while the first run is recorded
  std::shared_ptr<ArenaServer> server_;      // set once the arena exists
  uint8_t* arena_ = nullptr;
  size_t arena_bytes_ = 0;
  ArenaStats stats_;
  size_t served_runs_ = 0;  // for logging
  bool logged_deviation_ = false;
};

}  // namespace kiln::cuda
