// 64-bit FNV-1a style streaming hash (with a final avalanche); used for plan checksums and
// engine-cache keys. Not cryptographic.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace kiln {

class Hasher {
 public:
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    uint64_t h = h_;
    // Process 8 bytes at a time for speed on large weights.
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t w;
      __builtin_memcpy(&w, p + i, 8);
      h ^= w;
      h *= 0x100000001b3ULL;
      h ^= h >> 29;
    }
    for (; i < n; ++i) {
      h ^= p[i];
      h *= 0x100000001b3ULL;
    }
    h_ = h;
    len_ += n;
  }
  void update(std::string_view s) { update(s.data(), s.size()); }
  void update_u64(uint64_t v) { update(&v, 8); }
  uint64_t digest() const {
    uint64_t h = h_ ^ len_;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
  }
  std::string hex() const;

 private:
  uint64_t h_ = 0xcbf29ce484222325ULL;
  uint64_t len_ = 0;
};

inline uint64_t hash_bytes(const void* d, size_t n) {
  Hasher h;
  h.update(d, n);
  return h.digest();
}

std::string to_hex64(uint64_t v);

}  // namespace kiln
