// Tensor: a typed, dense, row-major, reference-counted array. Copies share storage (cheap);
// kernels never write into their inputs, except one the executor hands over
// (OpContext::donatable: its storage has no other holder). Value: what flows along a graph edge (tensor,
// sequence of tensors, optional, or nothing for an omitted optional input).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kiln/half.h"
#include "kiln/status.h"
#include "kiln/dtype.h"

namespace kiln {

using Shape = std::vector<int64_t>;

// Largest single tensor Kiln will allocate (bytes); a guard against hostile shapes.
constexpr uint64_t kMaxTensorBytes = uint64_t{1} << 40;

// Element count of a shape; error on negative dims or overflow.
Result<int64_t> checked_numel(const Shape& shape);
std::string shape_str(const Shape& s);  // "[1,3,224,224]"

// Process-wide cap on the bytes held by all owned tensor storage (Storage::allocate); an
// allocation that would pass it fails with kOutOfMemory naming the request and the limit.
// Default: 75% of physical RAM. Thread-safe (atomic counter); `kiln --maxMemory MIB` sets it.
void set_memory_limit(uint64_t bytes);
uint64_t memory_limit();
uint64_t memory_in_use();  // bytes currently held by owned Storage

// Where a tensor's bytes live. Host memory is ordinary (or pinned) RAM; kCuda is device memory
// of the current CUDA device: its data() pointer must never be dereferenced on the host.
enum class Device : uint8_t { kHost = 0, kCuda = 1 };
const char* device_name(Device d);

class Storage {
 public:
  // Zero-initialized, 64-byte aligned.
  // `zero`=false leaves the bytes uninitialized (for outputs a kernel writes in full).
  static Result<std::shared_ptr<Storage>> allocate(size_t bytes, bool zero = true);
  static std::shared_ptr<Storage> allocate_strings(size_t count);
  // Points at memory owned by `keepalive` (an mmap'd model or plan); read-only.
  static std::shared_ptr<Storage> external(const void* data, size_t bytes,
                                           std::shared_ptr<const void> keepalive);
  // Adopts memory from another allocator (device memory, pinned host memory): `release` runs
  // once when the storage dies. Not counted against memory_limit() (its allocator accounts).
  static std::shared_ptr<Storage> adopt(void* data, size_t bytes, Device device,
                                        std::function<void(void*)> release);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool is_external() const { return keepalive_ != nullptr; }
  Device device() const { return device_; }
  std::string* strings() { return strings_.data(); }
  size_t string_count() const { return strings_.size(); }

 private:
  Storage() = default;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool owned_ = false;
  size_t accounted_ = 0;  // bytes counted against memory_limit()
  std::shared_ptr<const void> keepalive_;
  std::vector<std::string> strings_;
  Device device_ = Device::kHost;
  std::function<void(void*)> release_;
};

template <typename T>
constexpr DataType dtype_of();

class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor ("" for strings). Fails on negative dims, overflow or > kMaxTensorBytes.
  static Result<Tensor> create(DataType dtype, const Shape& shape);
  // Same checks and memory accounting, contents uninitialized (numeric types only).
  static Result<Tensor> create_uninitialized(DataType dtype, const Shape& shape);
  // Tensor over external memory kept alive by `keepalive` (zero-copy weights).
  static Tensor external(DataType dtype, const Shape& shape, const void* data,
                         std::shared_ptr<const void> keepalive);
  template <typename T>
  static Tensor from_vector(const Shape& shape, const std::vector<T>& v) {
    Tensor t = create(dtype_of<T>(), shape).value();
    for (size_t i = 0; i < v.size() && i < static_cast<size_t>(t.numel()); ++i) t.data<T>()[i] = v[i];
    return t;
  }
  template <typename T>
  static Tensor scalar(T v) { return from_vector<T>({}, {v}); }
  // A tensor over (part of) an existing storage, starting `offset_bytes` in; the storage must
  // hold the whole tensor. Used by device allocators and zero-copy views.
  static Result<Tensor> view(DataType dtype, const Shape& shape, std::shared_ptr<Storage> storage,
                             size_t offset_bytes = 0);

  bool defined() const { return dtype_ != DataType::kUndefined; }
  DataType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_[static_cast<size_t>(i)]; }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  void* raw_data() { return storage_ ? (dtype_ == DataType::kString ? static_cast<void*>(storage_->strings() + offset_) : storage_->data() + offset_) : nullptr; }
  const void* raw_data() const { return const_cast<Tensor*>(this)->raw_data(); }
  template <typename T>
  T* data() { return static_cast<T*>(raw_data()); }
  template <typename T>
  const T* data() const { return static_cast<const T*>(raw_data()); }
  template <typename T>
  std::span<const T> span() const { return {data<T>(), static_cast<size_t>(numel_)}; }
  template <typename T>
  std::span<T> span() { return {data<T>(), static_cast<size_t>(numel_)}; }
  bool is_external() const { return storage_ && storage_->is_external(); }
  // Where the data lives; host-side accessors (data<T>(), get_f64, clone, ...) are for kHost only.
  Device device() const { return storage_ ? storage_->device() : Device::kHost; }
  bool on_device() const { return device() != Device::kHost; }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  // Same storage, new shape (element count must match).
  Result<Tensor> reshaped(const Shape& shape) const;
  // Deep copy into fresh owned storage.
  Tensor clone() const;
  // Element i converted to double / int64 (numeric types only; for attributes, indices, tests).
  double get_f64(int64_t i) const;
  int64_t get_i64(int64_t i) const;
  // All elements as int64 (for shape/axes/index tensors of any integer type).
  std::vector<int64_t> to_i64_vector() const;
  std::string describe() const;  // "float32[1,3,224,224]" ("float32[2,3]@cuda" on a device)

 private:
  DataType dtype_ = DataType::kUndefined;
  Shape shape_;
  int64_t numel_ = 0;
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes into the storage (elements for strings)
};

template <typename T>
constexpr DataType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DataType::kFloat;
  else if constexpr (std::is_same_v<T, double>) return DataType::kDouble;
  else if constexpr (std::is_same_v<T, Half>) return DataType::kFloat16;
  else if constexpr (std::is_same_v<T, BFloat16>) return DataType::kBFloat16;
  else if constexpr (std::is_same_v<T, int8_t>) return DataType::kInt8;
  else if constexpr (std::is_same_v<T, int16_t>) return DataType::kInt16;
  else if constexpr (std::is_same_v<T, int32_t>) return DataType::kInt32;
  else if constexpr (std::is_same_v<T, int64_t>) return DataType::kInt64;
  else if constexpr (std::is_same_v<T, uint8_t>) return DataType::kUInt8;
  else if constexpr (std::is_same_v<T, uint16_t>) return DataType::kUInt16;
  else if constexpr (std::is_same_v<T, uint32_t>) return DataType::kUInt32;
  else if constexpr (std::is_same_v<T, uint64_t>) return DataType::kUInt64;
  else if constexpr (std::is_same_v<T, bool>) return DataType::kBool;
  else if constexpr (std::is_same_v<T, std::string>) return DataType::kString;
  else static_assert(sizeof(T) == 0, "no DataType for this C++ type");
}

enum class ValueKind { kNone, kTensor, kSequence, kOptional };

// What flows along an edge. kNone: an omitted optional input/output.
struct Value {
  ValueKind kind = ValueKind::kNone;
  Tensor tensor;                         // kTensor
  std::vector<Tensor> sequence;          // kSequence
  std::shared_ptr<Value> optional;       // kOptional: nullptr = empty optional
  DataType elem_dtype = DataType::kUndefined;  // element type of a sequence / empty optional

  Value() = default;
  Value(Tensor t) : kind(ValueKind::kTensor), tensor(std::move(t)) {}  // NOLINT(implicit)
  static Value make_sequence(std::vector<Tensor> items, DataType elem) {
    Value v; v.kind = ValueKind::kSequence; v.sequence = std::move(items); v.elem_dtype = elem; return v;
  }
  static Value make_optional(std::shared_ptr<Value> inner, DataType elem = DataType::kUndefined) {
    Value v; v.kind = ValueKind::kOptional; v.optional = std::move(inner); v.elem_dtype = elem; return v;
  }
  bool is_none() const { return kind == ValueKind::kNone; }
  bool is_tensor() const { return kind == ValueKind::kTensor; }
  std::string describe() const;
};

}  // namespace kiln
