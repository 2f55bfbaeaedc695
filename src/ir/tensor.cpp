#include "ir/tensor.h"

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace kiln {

namespace {
uint64_t default_memory_limit() {
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return uint64_t{8} << 30;
  return static_cast<uint64_t>(pages) / 4 * 3 * static_cast<uint64_t>(page);
}
std::atomic<uint64_t> g_memory_limit{default_memory_limit()};
std::atomic<uint64_t> g_memory_in_use{0};
}  // namespace

void set_memory_limit(uint64_t bytes) { g_memory_limit.store(bytes); }
uint64_t memory_limit() { return g_memory_limit.load(); }
uint64_t memory_in_use() { return g_memory_in_use.load(); }

Result<int64_t> checked_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return invalid_argument("negative dimension in shape " + shape_str(shape));
    if (d != 0 && n > INT64_MAX / d) return invalid_argument("element count of shape " + shape_str(shape) + " overflows 64 bits");
    n *= d;
  }
  return n;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) r += ",";
    r += std::to_string(s[i]);
  }
  return r + "]";
}

Result<std::shared_ptr<Storage>> Storage::allocate(size_t bytes, bool zero) {
  std::shared_ptr<Storage> s(new Storage());
  if (bytes > SIZE_MAX - 63) return out_of_memory("cannot allocate " + std::to_string(bytes) + " bytes");
  size_t alloc = (bytes + 63) / 64 * 64;
  if (alloc == 0) alloc = 64;
  uint64_t limit = g_memory_limit.load();
  uint64_t before = g_memory_in_use.fetch_add(alloc);
  if (alloc > limit || before > limit - alloc) {
    g_memory_in_use.fetch_sub(alloc);
    return out_of_memory("allocation of " + std::to_string(bytes) + " bytes refused: " +
                         std::to_string(before) + " bytes in use, memory limit " +
                         std::to_string(limit) + " bytes (--maxMemory)");
  }
  void* p = std::aligned_alloc(64, alloc);
  if (!p) {
    g_memory_in_use.fetch_sub(alloc);
    return out_of_memory("cannot allocate " + std::to_string(bytes) + " bytes");
  }
  if (zero) std::memset(p, 0, alloc);
  s->data_ = static_cast<uint8_t*>(p);
  s->size_ = bytes;
  s->owned_ = true;
  s->accounted_ = alloc;
  return s;
}

std::shared_ptr<Storage> Storage::allocate_strings(size_t count) {
  std::shared_ptr<Storage> s(new Storage());
  s->strings_.resize(count);
  return s;
}

std::shared_ptr<Storage> Storage::external(const void* data, size_t bytes,
                                           std::shared_ptr<const void> keepalive) {
  std::shared_ptr<Storage> s(new Storage());
  s->data_ = const_cast<uint8_t*>(static_cast<const uint8_t*>(data));
  s->size_ = bytes;
  s->keepalive_ = keepalive ? std::move(keepalive) : std::make_shared<int>(0);
  return s;
}

std::shared_ptr<Storage> Storage::adopt(void* data, size_t bytes, Device device,
                                        std::function<void(void*)> release) {
  std::shared_ptr<Storage> s(new Storage());
  s->data_ = static_cast<uint8_t*>(data);
  s->size_ = bytes;
  s->device_ = device;
  s->release_ = std::move(release);
  return s;
}

const char* device_name(Device d) { return d == Device::kCuda ? "cuda" : "host"; }

Storage::~Storage() {
  if (release_) release_(data_);
  if (owned_) {
    std::free(data_);
    g_memory_in_use.fetch_sub(accounted_);
  }
}

Result<Tensor> Tensor::create(DataType dtype, const Shape& shape) {
  if (dtype == DataType::kUndefined || !dtype_valid(static_cast<int32_t>(dtype)))
    return invalid_argument("cannot create a tensor of undefined type");
  KILN_ASSIGN_OR_RETURN(int64_t n, checked_numel(shape));
  size_t es = dtype_size(dtype);
  if (static_cast<uint64_t>(n) > kMaxTensorBytes / es)
    return out_of_memory("tensor " + std::string(dtype_name(dtype)) + shape_str(shape) +
                         " exceeds the single-tensor limit");
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.numel_ = n;
  if (dtype == DataType::kString) {
    t.storage_ = Storage::allocate_strings(static_cast<size_t>(n));
  } else {
    KILN_ASSIGN_OR_RETURN(t.storage_, Storage::allocate(static_cast<size_t>(n) * es));
  }
  return t;
}

Result<Tensor> Tensor::create_uninitialized(DataType dtype, const Shape& shape) {
  if (dtype == DataType::kString || dtype == DataType::kUndefined) return create(dtype, shape);
  KILN_ASSIGN_OR_RETURN(int64_t n, checked_numel(shape));
  size_t es = dtype_size(dtype);
  if (!dtype_valid(static_cast<int32_t>(dtype)) || static_cast<uint64_t>(n) > kMaxTensorBytes / es)
    return create(dtype, shape);  // reports the error
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.numel_ = n;
  KILN_ASSIGN_OR_RETURN(t.storage_, Storage::allocate(static_cast<size_t>(n) * es, /*zero=*/false));
  return t;
}

Tensor Tensor::external(DataType dtype, const Shape& shape, const void* data,
                        std::shared_ptr<const void> keepalive) {
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.numel_ = checked_numel(shape).is_ok() ? checked_numel(shape).value() : 0;
  t.storage_ = Storage::external(data, t.nbytes(), std::move(keepalive));
  return t;
}

Result<Tensor> Tensor::view(DataType dtype, const Shape& shape, std::shared_ptr<Storage> storage,
                           size_t offset_bytes) {
  if (dtype == DataType::kUndefined || dtype == DataType::kString || !dtype_valid(static_cast<int32_t>(dtype)))
    return invalid_argument("cannot view storage as a tensor of this type");
  KILN_ASSIGN_OR_RETURN(int64_t n, checked_numel(shape));
  size_t es = dtype_size(dtype);
  if (!storage || offset_bytes % es != 0 || static_cast<uint64_t>(n) > kMaxTensorBytes / es ||
      offset_bytes + static_cast<size_t>(n) * es > storage->size())
    return invalid_argument("tensor view " + std::string(dtype_name(dtype)) + shape_str(shape) +
                            " does not fit its storage");
  Tensor t;
  t.dtype_ = dtype;
  t.shape_ = shape;
  t.numel_ = n;
  t.storage_ = std::move(storage);
  t.offset_ = offset_bytes;
  return t;
}

Result<Tensor> Tensor::reshaped(const Shape& shape) const {
  KILN_ASSIGN_OR_RETURN(int64_t n, checked_numel(shape));
  if (n != numel_)
    return invalid_argument("cannot reshape " + describe() + " to " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::clone() const {
  if (!defined()) return {};
  if (on_device()) return *this;  // device tensors are immutable once written; share
  Tensor t = create(dtype_, shape_).value();
  if (dtype_ == DataType::kString) {
    for (int64_t i = 0; i < numel_; ++i) t.data<std::string>()[i] = data<std::string>()[i];
  } else if (nbytes()) {
    std::memcpy(t.raw_data(), raw_data(), nbytes());
  }
  return t;
}

double Tensor::get_f64(int64_t i) const {
  if (on_device()) return 0.0;  // never dereference device memory on the host
  switch (dtype_) {
    case DataType::kFloat: return data<float>()[i];
    case DataType::kDouble: return data<double>()[i];
    case DataType::kFloat16: return static_cast<float>(data<Half>()[i]);
    case DataType::kBFloat16: return static_cast<float>(data<BFloat16>()[i]);
    case DataType::kInt8: case DataType::kInt4: case DataType::kInt2: return data<int8_t>()[i];
    case DataType::kInt16: return data<int16_t>()[i];
    case DataType::kInt32: return data<int32_t>()[i];
    case DataType::kInt64: return static_cast<double>(data<int64_t>()[i]);
    case DataType::kUInt8: case DataType::kUInt4: case DataType::kUInt2: return data<uint8_t>()[i];
    case DataType::kUInt16: return data<uint16_t>()[i];
    case DataType::kUInt32: return data<uint32_t>()[i];
    case DataType::kUInt64: return static_cast<double>(data<uint64_t>()[i]);
    case DataType::kBool: return data<bool>()[i] ? 1.0 : 0.0;
    default: return 0.0;
  }
}

int64_t Tensor::get_i64(int64_t i) const {
  if (on_device()) return 0;
  switch (dtype_) {
    case DataType::kInt64: return data<int64_t>()[i];
    case DataType::kInt32: return data<int32_t>()[i];
    case DataType::kInt16: return data<int16_t>()[i];
    case DataType::kInt8: case DataType::kInt4: case DataType::kInt2: return data<int8_t>()[i];
    case DataType::kUInt8: case DataType::kUInt4: case DataType::kUInt2: return data<uint8_t>()[i];
    case DataType::kUInt16: return data<uint16_t>()[i];
    case DataType::kUInt32: return data<uint32_t>()[i];
    case DataType::kUInt64: return static_cast<int64_t>(data<uint64_t>()[i]);
    case DataType::kBool: return data<bool>()[i] ? 1 : 0;
    default: return static_cast<int64_t>(get_f64(i));
  }
}

std::vector<int64_t> Tensor::to_i64_vector() const {
  std::vector<int64_t> v(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) v[static_cast<size_t>(i)] = get_i64(i);
  return v;
}

std::string Tensor::describe() const {
  if (!defined()) return "<undefined>";
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + (on_device() ? "@cuda" : "");
}

std::string Value::describe() const {
  switch (kind) {
    case ValueKind::kNone: return "<none>";
    case ValueKind::kTensor: return tensor.describe();
    case ValueKind::kSequence: return "sequence<" + std::string(dtype_name(elem_dtype)) + ">(" + std::to_string(sequence.size()) + ")";
    case ValueKind::kOptional: return optional ? "optional(" + optional->describe() + ")" : "optional(empty)";
  }
  return "?";
}

}  // namespace kiln
