#include "backends/cpu/cpu_parallel.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>

namespace kiln {
namespace cpu {
namespace {

// libgomp's entry points, present when oneDNN's OpenMP runtime is loaded.
struct Omp {
  using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
  using IntFn = int (*)();
  ParallelFn parallel = nullptr;
  IntFn max_threads = nullptr;
  Omp() {
    parallel = reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    max_threads = reinterpret_cast<IntFn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
    if (!parallel || !max_threads) parallel = nullptr;
  }
};

const Omp& omp() {
  static const Omp o;
  return o;
}

struct Job {
  TaskFn task;
  void* ctx;
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
};

void body(void* data) {
  auto* job = static_cast<Job*>(data);
  for (;;) {
    const int64_t i = job->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job->n) break;
    if (!job->task(job->ctx, i)) job->ok.store(false, std::memory_order_relaxed);
  }
}

}  // namespace

int omp_threads() {
  const Omp& o = omp();
  return o.parallel ? std::max(1, o.max_threads()) : 1;
}

bool parallel_tasks(int64_t n, int threads, TaskFn task, void* ctx) {
  Job job;
  job.task = task;
  job.ctx = ctx;
  job.n = n;
  const Omp& o = omp();
  if (!o.parallel || threads <= 1 || n <= 1) {
    body(&job);
  } else {
    o.parallel(&body, &job, static_cast<unsigned>(std::min<int64_t>(threads, n)), 0);
  }
  return job.ok.load();
}

}  // namespace cpu
}  // namespace kiln
