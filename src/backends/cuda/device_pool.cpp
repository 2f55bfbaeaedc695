#include "backends/cuda/device_pool.h"

#include <cuda_runtime_api.h>

#include "backends/cuda/cuda_env.h"

namespace kiln::cuda {

std::shared_ptr<DevicePool> DevicePool::create(int device) {
  return std::shared_ptr<DevicePool>(new DevicePool(device));
}

DevicePool::~DevicePool() {
  for (auto& [size, p] : free_) cudaFree(p);
}

namespace {
size_t round_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes <= (size_t{1} << 20)) return (bytes + 511) / 512 * 512;
  return (bytes + (size_t{1} << 20) - 1) >> 20 << 20;  // 1 MiB granules for big blocks
}
}  // namespace

Result<std::shared_ptr<Storage>> DevicePool::allocate(size_t bytes) {
  if (bytes > kMaxTensorBytes) return out_of_memory("device allocation of " + std::to_string(bytes) + " bytes refused");
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
      return Status(e == cudaErrorMemoryAllocation ? StatusCode::kOutOfMemory : StatusCode::kRuntimeError,
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
  std::shared_ptr<DevicePool> self = shared_from_this();
  return Storage::adopt(p, bytes, Device::kCuda, [self, got](void* q) { self->release(q, got); });
}

void DevicePool::release(void* p, size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  in_use_ -= size;
  free_.emplace(size, p);
}

size_t DevicePool::reserved_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reserved_;
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

}  // namespace kiln::cuda
