// TensorProto payload -> Tensor: raw_data (zero-copy when aligned), typed fields, sub-byte
// unpacking, external data files and sparse tensors.
#include <climits>
#include <cstdlib>
#include <cstring>

#include "onnx/proto.h"

namespace kiln::onnx {

namespace {

std::string tname(const TensorMsg& t) {
  return "tensor '" + t.name + "' (TensorProto at byte " + std::to_string(t.off) + ")";
}

Status terr(const TensorMsg& t, const std::string& what) {
  return invalid_model(tname(t) + ": " + what);
}

// Bytes the file encoding of `n` elements of `dt` takes (sub-byte types packed).
Result<uint64_t> file_bytes(DataType dt, int64_t n) {
  uint64_t bits = static_cast<uint64_t>(dtype_file_bits(dt));
  uint64_t un = static_cast<uint64_t>(n);
  if (bits && un > UINT64_MAX / bits) return invalid_model("tensor size overflows");
  return (un * bits + 7) / 8;
}

// Unpacks / copies file-encoded bytes into `out` (already created with the right shape).
void decode_bytes(const uint8_t* src, Tensor& out) {
  DataType dt = out.dtype();
  size_t n = static_cast<size_t>(out.numel());
  uint8_t* dst = static_cast<uint8_t*>(out.raw_data());
  int bits = dtype_file_bits(dt);
  if (bits == 4) {
    bool sign = dt == DataType::kInt4;
    for (size_t i = 0; i < n; ++i) {
      uint8_t nib = (src[i / 2] >> ((i % 2) * 4)) & 0xf;
      dst[i] = sign ? static_cast<uint8_t>(static_cast<int8_t>(static_cast<uint8_t>(nib << 4)) >> 4)
                    : nib;
    }
  } else if (bits == 2) {
    bool sign = dt == DataType::kInt2;
    for (size_t i = 0; i < n; ++i) {
      uint8_t v = (src[i / 4] >> ((i % 4) * 2)) & 0x3;
      dst[i] =
          sign ? static_cast<uint8_t>(static_cast<int8_t>(static_cast<uint8_t>(v << 6)) >> 6) : v;
    }
  } else if (dt == DataType::kBool) {
    for (size_t i = 0; i < n; ++i) dst[i] = src[i] != 0;
  } else if (n) {
    std::memcpy(dst, src, out.nbytes());
  }
}

bool needs_decode(DataType dt) {
  return dtype_file_bits(dt) < 8 || dt == DataType::kBool;
}

// Bytes (file-encoded) -> Tensor; zero-copy over `keepalive` when the layout allows.
Result<Tensor> from_bytes(const TensorMsg& t, DataType dt, const Shape& shape, const uint8_t* p,
                          std::shared_ptr<const void> keepalive) {
  size_t es = dtype_size(dt);
  if (keepalive && !needs_decode(dt) && reinterpret_cast<uintptr_t>(p) % es == 0)
    return Tensor::external(dt, shape, p, std::move(keepalive));
  auto r = Tensor::create(dt, shape);
  if (!r.is_ok()) return r.status().with_context(tname(t));
  decode_bytes(p, *r);
  return r;
}

bool path_is_safe(const std::string& loc) {
  if (loc.empty() || loc[0] == '/' || loc[0] == '\\') return false;
  if (loc.size() > 1 && loc[1] == ':') return false;  // C:...
  size_t i = 0;
  while (i <= loc.size()) {
    size_t j = loc.find_first_of("/\\", i);
    if (j == std::string::npos) j = loc.size();
    if (loc.compare(i, j - i, "..") == 0 && j - i == 2) return false;
    i = j + 1;
  }
  return true;
}

Result<uint64_t> parse_u64(const TensorMsg& t, const std::string& key, const std::string& v) {
  if (v.empty() || v.size() > 19)
    return terr(t, "external_data " + key + " '" + v + "' is not a valid number");
  uint64_t x = 0;
  for (char c : v) {
    if (c < '0' || c > '9')
      return terr(t, "external_data " + key + " '" + v + "' is not a valid number");
    x = x * 10 + static_cast<uint64_t>(c - '0');
  }
  return x;
}

Result<Tensor> from_external(const TensorMsg& t, DataType dt, const Shape& shape, uint64_t expect,
                             TensorSource& src) {
  std::string location;
  uint64_t offset = 0, length = 0;
  bool has_length = false;
  for (auto& [k, v] : t.external_data) {
    if (k == "location")
      location = v;
    else if (k == "offset") {
      KILN_ASSIGN_OR_RETURN(offset, parse_u64(t, k, v));
    } else if (k == "length") {
      KILN_ASSIGN_OR_RETURN(length, parse_u64(t, k, v));
      has_length = true;
    }
  }
  if (location.empty()) return terr(t, "external data has no 'location'");
  if (location.find('\0') != std::string::npos || !path_is_safe(location))
    return terr(
        t, "external data location '" + location +
               "' must be a relative path inside the model folder (no absolute path, no '..')");
  if (src.base_dir.empty())
    return terr(t,
                "external data '" + location + "' needs a base folder (ImportOptions::base_dir)");
  std::shared_ptr<MappedFile> file;
  auto it = src.ext_files.find(location);
  if (it != src.ext_files.end()) {
    file = it->second;
  } else {
    std::string path = join_path(src.base_dir, location);
    auto r = MappedFile::open(path);
    if (!r.is_ok()) return r.status().with_context(tname(t) + ": external data");
    file = *r;
    src.ext_files[location] = file;
  }
  uint64_t fsize = file->size();
  if (offset > fsize)
    return terr(t, "external data offset " + std::to_string(offset) + " is past the end of '" +
                       location + "' (" + std::to_string(fsize) + " bytes)");
  if (!has_length) length = fsize - offset;
  if (length > fsize - offset)
    return terr(t, "external data range [" + std::to_string(offset) + ", +" +
                       std::to_string(length) + ") runs past the end of '" + location + "' (" +
                       std::to_string(fsize) + " bytes)");
  if (length != expect)
    return terr(t, "external data length " + std::to_string(length) + " does not match " +
                       std::to_string(expect) + " bytes expected for " + dtype_name(dt) +
                       shape_str(shape));
  if (expect == 0) return Tensor::create(dt, shape);
  return from_bytes(t, dt, shape, file->data() + offset, file);
}

template <typename T, typename Src, typename F>
Status fill(const TensorMsg& t, Tensor& out, const std::vector<Src>& v, F conv) {
  T* d = out.data<T>();
  for (size_t i = 0; i < v.size(); ++i) d[i] = conv(v[i]);
  return Status::ok();
}

}  // namespace

Result<Tensor> make_tensor(const TensorMsg& t, TensorSource& src) {
  if (t.data_type == 0) return terr(t, "data_type is missing");
  DataType dt = static_cast<DataType>(t.data_type);
  Shape shape = t.dims;
  auto nr = checked_numel(shape);
  if (!nr.is_ok()) return nr.status().with_context(tname(t));
  int64_t n = *nr;
  if (static_cast<uint64_t>(n) > kMaxTensorBytes / dtype_size(dt))
    return terr(
        t, std::string(dtype_name(dt)) + shape_str(shape) + " exceeds the single-tensor limit");
  KILN_ASSIGN_OR_RETURN(uint64_t expect, file_bytes(dt, n));

  if (t.data_location == 1) {
    if (dt == DataType::kString) return terr(t, "string tensors cannot use external data");
    return from_external(t, dt, shape, expect, src);
  }
  if (t.has_raw) {
    if (dt == DataType::kString) return terr(t, "string tensors cannot use raw_data");
    if (t.raw_len != expect)
      return terr(t, "raw_data has " + std::to_string(t.raw_len) + " bytes, expected " +
                         std::to_string(expect) + " for " + dtype_name(dt) + shape_str(shape));
    if (t.raw_start > src.size || t.raw_len > src.size - t.raw_start)
      return internal_error(tname(t) + ": raw_data outside the source buffer");
    if (expect == 0) return Tensor::create(dt, shape);
    return from_bytes(t, dt, shape, src.base + t.raw_start, src.keepalive);
  }

  auto count_err = [&](const char* field, size_t have, uint64_t want) {
    return terr(t, std::string(field) + " has " + std::to_string(have) + " values, expected " +
                       std::to_string(want) + " for " + dtype_name(dt) + shape_str(shape));
  };
  uint64_t un = static_cast<uint64_t>(n);
  // Check the value count against the shape before allocating anything from the dims.
  {
    const char* field = "int32_data";
    size_t have = t.int32_data.size();
    uint64_t want = un;
    switch (dt) {
      case DataType::kFloat:
        field = "float_data";
        have = t.float_data.size();
        break;
      case DataType::kDouble:
        field = "double_data";
        have = t.double_data.size();
        break;
      case DataType::kInt64:
        field = "int64_data";
        have = t.int64_data.size();
        break;
      case DataType::kUInt64:
      case DataType::kUInt32:
        field = "uint64_data";
        have = t.uint64_data.size();
        break;
      case DataType::kString:
        field = "string_data";
        have = t.string_data.size();
        break;
      case DataType::kInt4:
      case DataType::kUInt4:
      case DataType::kFloat4E2M1:
      case DataType::kInt2:
      case DataType::kUInt2:
        field = "int32_data (packed)";
        want = expect;
        break;
      case DataType::kComplex64:
      case DataType::kComplex128:
        return unsupported(tname(t) + ": complex tensors need raw_data");
      default:
        break;
    }
    if (have != want) return count_err(field, have, want);
  }
  auto r = Tensor::create(dt, shape);
  if (!r.is_ok()) return r.status().with_context(tname(t));
  Tensor out = std::move(*r);
  switch (dt) {
    case DataType::kFloat:
      if (t.float_data.size() != un) return count_err("float_data", t.float_data.size(), un);
      if (n) std::memcpy(out.raw_data(), t.float_data.data(), out.nbytes());
      return out;
    case DataType::kDouble:
      if (t.double_data.size() != un) return count_err("double_data", t.double_data.size(), un);
      if (n) std::memcpy(out.raw_data(), t.double_data.data(), out.nbytes());
      return out;
    case DataType::kInt64:
      if (t.int64_data.size() != un) return count_err("int64_data", t.int64_data.size(), un);
      if (n) std::memcpy(out.raw_data(), t.int64_data.data(), out.nbytes());
      return out;
    case DataType::kUInt64:
      if (t.uint64_data.size() != un) return count_err("uint64_data", t.uint64_data.size(), un);
      if (n) std::memcpy(out.raw_data(), t.uint64_data.data(), out.nbytes());
      return out;
    case DataType::kUInt32:
      if (t.uint64_data.size() != un) return count_err("uint64_data", t.uint64_data.size(), un);
      (void)fill<uint32_t>(t, out, t.uint64_data,
                           [](uint64_t v) { return static_cast<uint32_t>(v); });
      return out;
    case DataType::kString: {
      if (t.string_data.size() != un) return count_err("string_data", t.string_data.size(), un);
      std::string* d = out.data<std::string>();
      for (size_t i = 0; i < t.string_data.size(); ++i) d[i] = t.string_data[i];
      return out;
    }
    case DataType::kInt32:
    case DataType::kInt16:
    case DataType::kInt8:
    case DataType::kUInt16:
    case DataType::kUInt8:
    case DataType::kBool:
    case DataType::kFloat16:
    case DataType::kBFloat16:
    case DataType::kFloat8E4M3FN:
    case DataType::kFloat8E4M3FNUZ:
    case DataType::kFloat8E5M2:
    case DataType::kFloat8E5M2FNUZ:
    case DataType::kFloat8E8M0: {
      if (t.int32_data.size() != un) return count_err("int32_data", t.int32_data.size(), un);
      size_t es = dtype_size(dt);
      uint8_t* d = static_cast<uint8_t*>(out.raw_data());
      for (size_t i = 0; i < un; ++i) {
        uint32_t v = static_cast<uint32_t>(t.int32_data[i]);
        if (dt == DataType::kBool) v = v != 0;
        std::memcpy(d + i * es, &v, es);  // little-endian: low bytes
      }
      return out;
    }
    case DataType::kInt4:
    case DataType::kUInt4:
    case DataType::kFloat4E2M1:
    case DataType::kInt2:
    case DataType::kUInt2: {
      // int32_data holds one packed byte per value.
      if (t.int32_data.size() != expect)
        return count_err("int32_data (packed)", t.int32_data.size(), expect);
      std::vector<uint8_t> packed(t.int32_data.size());
      for (size_t i = 0; i < packed.size(); ++i) packed[i] = static_cast<uint8_t>(t.int32_data[i]);
      if (n) decode_bytes(packed.data(), out);
      return out;
    }
    case DataType::kUndefined:
    case DataType::kComplex64:
    case DataType::kComplex128:
      break;
  }
  return terr(t, std::string("unsupported data_type ") + dtype_name(dt));
}

Result<Tensor> make_sparse(const SparseTensorMsg& s, TensorSource& src) {
  std::string where = "sparse tensor (SparseTensorProto at byte " + std::to_string(s.off) + ")";
  KILN_ASSIGN_OR_RETURN(Tensor values, make_tensor(s.values, src));
  KILN_ASSIGN_OR_RETURN(Tensor indices, make_tensor(s.indices, src));
  if (values.rank() != 1)
    return invalid_model(where + ": values must be 1-D, got " + values.describe());
  if (indices.dtype() != DataType::kInt64 && indices.dtype() != DataType::kInt32)
    return invalid_model(where + ": indices must be int64, got " + indices.describe());
  // A sparse tensor is tiny in the file but may claim a huge dense shape: cap the densified size.
  constexpr uint64_t kMaxSparseDenseBytes = uint64_t{4} << 30;
  auto dn = checked_numel(s.dims);
  if (!dn.is_ok()) return dn.status().with_context(where);
  if (static_cast<uint64_t>(*dn) > kMaxSparseDenseBytes / dtype_size(values.dtype()))
    return unsupported(where + ": densified size " + shape_str(s.dims) + " exceeds 4 GiB");
  auto r = Tensor::create(values.dtype(), s.dims);
  if (!r.is_ok()) return r.status().with_context(where);
  Tensor out = std::move(*r);
  int64_t nnz = values.numel(), rank = static_cast<int64_t>(s.dims.size()), total = out.numel();
  bool linear = indices.rank() == 1;
  if (linear ? indices.dim(0) != nnz
             : !(indices.rank() == 2 && indices.dim(0) == nnz && indices.dim(1) == rank))
    return invalid_model(where + ": indices " + indices.describe() + " do not match " +
                         std::to_string(nnz) + " values of a rank-" + std::to_string(rank) +
                         " tensor");
  size_t es = dtype_size(values.dtype());
  for (int64_t k = 0; k < nnz; ++k) {
    int64_t lin = 0;
    if (linear) {
      lin = indices.get_i64(k);
    } else {
      for (int64_t d = 0; d < rank; ++d) {
        int64_t ix = indices.get_i64(k * rank + d);
        if (ix < 0 || ix >= s.dims[static_cast<size_t>(d)])
          return invalid_model(where + ": index " + std::to_string(ix) + " out of range in dim " +
                               std::to_string(d));
        lin = lin * s.dims[static_cast<size_t>(d)] + ix;
      }
    }
    if (lin < 0 || lin >= total)
      return invalid_model(where + ": index " + std::to_string(lin) + " out of range for " +
                           std::to_string(total) + " elements");
    if (values.dtype() == DataType::kString)
      out.data<std::string>()[lin] = values.data<std::string>()[k];
    else
      std::memcpy(static_cast<uint8_t*>(out.raw_data()) + static_cast<size_t>(lin) * es,
                  static_cast<const uint8_t*>(values.raw_data()) + static_cast<size_t>(k) * es, es);
  }
  return out;
}

}  // namespace kiln::onnx
