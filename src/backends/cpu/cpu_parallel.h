// OpenMP's thread pool (the one oneDNN runs on) for Kiln's own CPU kernels: one threading
// model, not two. libgomp's entry points are looked up at run time (as set_cpu_threads does),
// so the kernels need no -fopenmp; without OpenMP the tasks run serially.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {

// The thread count a parallel region gets (omp_get_max_threads; 1 without OpenMP).
int omp_threads();

// Runs task(ctx, i) for every i in [0, n) on up to `threads` OpenMP threads (the caller's
// included). Tasks are taken one at a time from a shared counter: a thread the OS holds back
// (a shared machine) leaves its share to the others instead of holding up the call. False when
// a task returned false (the others still run).
using TaskFn = bool (*)(void* ctx, int64_t i);
bool parallel_tasks(int64_t n, int threads, TaskFn task, void* ctx);

// As parallel_tasks, but thread t of T runs tasks [t n / T, (t + 1) n / T) in order: where
// consecutive tasks write consecutive rows, each thread's share is the contiguous block that
// oneDNN's static split gives the same thread in the next layer, which then reads it from its
// own L2 (with tasks handed out as taken, ResNet-50 b1 layer1.1.conv1 ran 0.21 -> 0.25 ms
// after a Kiln conv). A thread the OS holds back delays the call by its share.
bool parallel_tasks_static(int64_t n, int threads, TaskFn task, void* ctx);

// n floats, 64-byte aligned, uninitialized; null when out of memory. Free with free_floats.
float* alloc_floats(size_t n);
void free_floats(float* p);

// The calling thread's grow-only, 64-byte aligned buffer `slot` (0..4) of at least n floats,
// owned by one kernel family (a kernel may call another's, e.g. the fused inverted-residual
// block runs Kiln's 1x1 conv, so each family has its own slots); null when out of memory.
enum class ScratchOwner : int { kConv1x1 = 0, kMbConv = 1, kWinograd = 2 };
float* thread_scratch(ScratchOwner owner, int slot, size_t n);

}  // namespace cpu
}  // namespace kiln
