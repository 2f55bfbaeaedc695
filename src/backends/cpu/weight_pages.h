// Kernels that keep their own packed copy of a constant weight tell the owner of the weight's
// memory, so that an mmap'd plan's pages are not held twice. The runtime installs the hook (it
// knows which memory is a file mapping: plan/plan.h release_plan_pages); without one, nothing
// is released.
#pragma once
#include <cstddef>

namespace kiln {
namespace cpu {

using WeightPagesHook = size_t (*)(const void* data, size_t bytes);
void set_weight_pages_hook(WeightPagesHook hook);
// Called once a packed copy of [data, data + bytes) exists; returns the bytes released.
size_t packed_weight_done(const void* data, size_t bytes);

}  // namespace cpu
}  // namespace kiln
