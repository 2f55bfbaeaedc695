// A caching device-memory allocator, one per execution context. Blocks freed by tensors go back
// to the pool and are reused for later requests in stream order (all users of one pool enqueue
// on one stream), so steady-state inference does no cudaMalloc at all and a CUDA graph captured
// after a warm-up run finds every block it needs already reserved.
#pragma once
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

#include "kiln/status.h"
#include "kiln/tensor.h"

namespace kiln::cuda {

class DevicePool : public std::enable_shared_from_this<DevicePool> {
 public:
  static std::shared_ptr<DevicePool> create(int device);
  ~DevicePool();
  // Device storage of at least `bytes` (256-byte aligned); returned to the pool when it dies.
  Result<std::shared_ptr<Storage>> allocate(size_t bytes);
  size_t reserved_bytes() const;  // held from the driver (in use + cached)
  size_t peak_in_use_bytes() const;
  // Returns the cached blocks to the driver (synchronizes the device; not during capture).
  void trim();

 private:
  explicit DevicePool(int device) : device_(device) {}
  void release(void* p, size_t size);
  int device_ = 0;
  mutable std::mutex mu_;
  std::multimap<size_t, void*> free_;  // size -> block
  size_t reserved_ = 0, in_use_ = 0, peak_ = 0;
};

}  // namespace kiln::cuda
