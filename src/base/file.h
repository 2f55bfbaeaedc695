// Read-only memory-mapped files and small file helpers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/status.h"

namespace kiln {

// A read-only mapping of a whole file. Shared so that tensors can point into it zero-copy
// and keep it alive.
class MappedFile {
 public:
  static Result<std::shared_ptr<MappedFile>> open(const std::string& path);
  // Copies bytes into a 64-byte-aligned buffer (tests, in-memory plans) so that aligned offsets
  // stay aligned in memory, as in an mmap.
  static std::shared_ptr<MappedFile> from_bytes(const std::vector<uint8_t>& bytes);
  static std::shared_ptr<MappedFile> from_bytes(const void* data, size_t size);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;
  uint8_t* owned_ = nullptr;  // 64-byte aligned copy (from_bytes)
  std::string path_;
};

Result<std::vector<uint8_t>> read_file(const std::string& path);
Status write_file(const std::string& path, const void* data, size_t n);  // atomic (tmp + rename)
bool file_exists(const std::string& path);
std::string dirname_of(const std::string& path);
std::string join_path(const std::string& a, const std::string& b);

}  // namespace kiln
