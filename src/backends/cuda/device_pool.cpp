#include "backends/cuda/device_pool.h"

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "backends/cuda/cuda_env.h"
#include "base/logging.h"

namespace kiln::cuda {

std::shared_ptr<DevicePool> DevicePool::create(int device) {
  auto pool = std::shared_ptr<DevicePool>(new DevicePool(device));
  const char* knob = std::getenv("KILN_CUDA_ARENA");  // "0": pool only (A/B against the arena)
  pool->arena_enabled_ = !(knob && std::strcmp(knob, "0") == 0);
  return pool;
}

DevicePool::~DevicePool() {
  // Every storage holds the pool alive, so nothing is in use here.
  for (auto& [size, p] : free_) cudaFree(p);
  if (arena_) cudaFree(arena_);
}

namespace {
size_t round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes <= (size_t{1} << 20)) return (bytes + 511) / 512 * 512;
  return (bytes + (size_t{1} << 20) - 1) >> 20 << 20;  // 1 MiB granules for big blocks
}
double mib(size_t b) {
  return static_cast<double>(b) / 1048576.0;
}
}  // namespace

Result<std::shared_ptr<Storage>> DevicePool::allocate(size_t bytes) {
  if (bytes > kMaxTensorBytes)
    return out_of_memory("device allocation of " + std::to_string(bytes) + " bytes refused");
  std::shared_ptr<DevicePool> self = shared_from_this();
  std::shared_ptr<ArenaServer> server;
  std::shared_ptr<ArenaRecorder> recorder;
  uint8_t* arena = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (in_run_) {
      server = server_;
      recorder = recorder_;
      arena = arena_;
    }
  }
  if (server && arena) {
    uint32_t slot = 0;
    if (std::optional<size_t> off = server->serve(bytes, &slot)) {
      const size_t size = server->plan().size[slot];
      {
        std::lock_guard<std::mutex> lock(mu_);
        in_use_ += size;
        if (in_use_ > peak_) peak_ = in_use_;
      }
      // The deleter only marks the block free: the next run reuses it in stream order, as the
      // pool would; the server refuses it while this storage lives.
      return Storage::adopt(arena + *off, bytes, Device::kCuda, [self, server, slot, size](void*) {
        self->retire([self, server, slot, size] {
          server->release(slot);
          self->release_arena(size);
        });
      });
    }
  }

  const size_t size = round_size(bytes);
  void* p = nullptr;
  size_t got = size;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Best fit, but never hand out a block more than twice the request (keeps reuse tight).
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      got = it->first;
      p = it->second;
      free_.erase(it);
    }
  }
  if (!p) {
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free error state
      trim();
      e = cudaMalloc(&p, size);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      return Status(
          e == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kRuntimeError,
          "cannot allocate " + std::to_string(bytes) + " bytes of device memory (" +
              cudaGetErrorString(e) + "; " + std::to_string(free_b >> 20) + " MiB free of " +
              std::to_string(total_b >> 20) + " MiB, this context holds " +
              std::to_string(reserved_bytes() >> 20) + " MiB)");
    }
    std::lock_guard<std::mutex> lock(mu_);
    reserved_ += size;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += got;
    if (in_use_ > peak_) peak_ = in_use_;
  }
  // While the first run is recorded, its requests and releases make the trace the arena plans.
  const uint64_t ticket = recorder ? recorder->on_alloc(bytes) : ArenaRecorder::kNoTicket;
  if (ticket == ArenaRecorder::kNoTicket) recorder.reset();
  return Storage::adopt(p, bytes, Device::kCuda, [self, got, recorder, ticket](void* q) {
    self->retire([self, q, got, recorder, ticket] {
      self->release(q, got);
      if (recorder) recorder->on_release(ticket);
    });
  });
}

void DevicePool::retire(std::function<void()> done) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (parking_) {
      parked_.push_back(std::move(done));
      return;
    }
  }
  done();
}

void DevicePool::set_parking(bool on) {
  std::vector<std::function<void()>> parked;
  {
    std::lock_guard<std::mutex> lock(mu_);
    parking_ = on;
    if (!on) parked.swap(parked_);
  }
  for (auto& f : parked) f();
}

void DevicePool::release(void* p, size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= size;
  free_.emplace(size, p);
}

void DevicePool::release_arena(size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= size;
}

size_t DevicePool::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_ + arena_bytes_;
}

size_t DevicePool::peak_in_use_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_;
}

void DevicePool::trim() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [size, p] : free_) {
    cudaFree(p);
    reserved_ -= size;
  }
  free_.clear();
}

void DevicePool::begin_run(bool may_record) {
  std::lock_guard<std::mutex> lock(mu_);
  in_run_ = true;
  if (!arena_enabled_ || arena_given_up_) return;
  if (server_) {
    server_->begin_run();
    return;
  }
  // No arena yet: record this run (a run that failed before end_run is simply recorded again).
  if (!may_record) return;
  if (!recorder_) recorder_ = std::make_shared<ArenaRecorder>();
  recorder_->begin();
}

void DevicePool::cancel_run() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!in_run_) return;
  in_run_ = false;
  if (server_) stats_.last_run = server_->end_run();
  if (recorder_) {
    recorder_->finish();  // a failed run's trace is not planned; the next run records again
    recorder_.reset();
  }
}

Status DevicePool::end_run(void* stream, bool may_free_cached) {
  std::vector<ArenaEvent> trace;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_run_) return Status::ok();
    in_run_ = false;
    if (server_) {
      stats_.last_run = server_->end_run();
      ++served_runs_;
      if (served_runs_ == 1 || (stats_.last_run.deviated && !logged_deviation_)) {
        logged_deviation_ = logged_deviation_ || stats_.last_run.deviated;
        KILN_LOG(kVerbose, "CUDA arena: run "
                               << served_runs_ + 1 << " took " << stats_.last_run.from_arena
                               << " of " << stats_.last_run.requests << " requests from the arena"
                               << (stats_.last_run.deviated ? " (left the recorded trace)" : ""));
      }
      return Status::ok();
    }
    if (!recorder_) return Status::ok();  // arena off
    trace = recorder_->finish();
    recorder_
        .reset();  // storages of the recorded run still hold it; their releases are ignored now
  }
  return make_arena(trace, stream, may_free_cached);
}

Status DevicePool::make_arena(const std::vector<ArenaEvent>& trace, void* stream,
                              bool may_free_cached) {
  ArenaPlan plan = plan_arena(trace);
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.planned_requests = plan.requests();
    stats_.planned_in_arena = plan.arena_requests();
    stats_.unshared_bytes = plan.sum_arena_sizes;
    stats_.last_run = ArenaRunStats();
    stats_.last_run.requests = stats_.last_run.from_pool = plan.requests();
    if (plan.arena_bytes == 0) {  // nothing freed within the run: nothing to plan
      arena_given_up_ = true;
      return Status::ok();
    }
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, plan.arena_bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not an error: the pool serves as before
    KILN_LOG(kVerbose, "CUDA arena of " << mib(plan.arena_bytes) << " MiB not allocated ("
                                        << cudaGetErrorString(e)
                                        << "); this context keeps its caching pool");
    std::lock_guard<std::mutex> lock(mu_);
    arena_given_up_ = true;
    return Status::ok();
  }
  if (may_free_cached && stream) {
    // The recorded run's blocks sit in the free list, possibly still in use by its queued work:
    // wait for it, then hand them back (the arena replaces them). An error here is the run's.
    // Not when a CUDA graph was captured on pool blocks: its replays keep using them.
    const cudaError_t se = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    if (se == cudaSuccess) trim();
    if (se != cudaSuccess) {
      cudaFree(p);
      std::lock_guard<std::mutex> lock(mu_);
      arena_given_up_ = true;
      return check(se, "running inference on the GPU");
    }
  }
  KILN_LOG(kVerbose, "CUDA arena: " << plan.arena_requests() << " of " << plan.requests()
                                    << " requests per run planned into " << mib(plan.arena_bytes)
                                    << " MiB (unshared " << mib(plan.sum_arena_sizes) << " MiB)");
  std::lock_guard<std::mutex> lock(mu_);
  arena_ = static_cast<uint8_t*>(p);
  arena_bytes_ = plan.arena_bytes;
  stats_.active = true;
  stats_.arena_bytes = plan.arena_bytes;
  server_ = std::make_shared<ArenaServer>(std::move(plan));
  return Status::ok();
}

ArenaStats DevicePool::arena_stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  ArenaStats s = stats_;
  s.enabled = arena_enabled_;
  return s;
}

}  // namespace kiln::cuda
