// Element types. Numeric values equal ONNX TensorProto.DataType so import is a cast.
// In-memory layout: one element per slot, contiguous row-major. Sub-byte types (INT4, UINT4,
// FLOAT4E2M1) are held unpacked, one byte per element (int4 sign-extended in int8, uint4 in
// uint8, float4 as its 4-bit code in uint8); they are packed only in files. FLOAT8 types hold
// their 8-bit code. STRING tensors hold std::string elements.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace kiln {

enum class DataType : int32_t {
  kUndefined = 0,
  kFloat = 1,
  kUInt8 = 2,
  kInt8 = 3,
  kUInt16 = 4,
  kInt16 = 5,
  kInt32 = 6,
  kInt64 = 7,
  kString = 8,
  kBool = 9,
  kFloat16 = 10,
  kDouble = 11,
  kUInt32 = 12,
  kUInt64 = 13,
  kComplex64 = 14,
  kComplex128 = 15,
  kBFloat16 = 16,
  kFloat8E4M3FN = 17,
  kFloat8E4M3FNUZ = 18,
  kFloat8E5M2 = 19,
  kFloat8E5M2FNUZ = 20,
  kUInt4 = 21,
  kInt4 = 22,
  kFloat4E2M1 = 23,
  kFloat8E8M0 = 24,
  kUInt2 = 25,
  kInt2 = 26,
};

constexpr int kMaxDataType = 26;

// Bytes per element in memory (sub-byte types: 1). 0 for undefined; sizeof(std::string) for strings.
size_t dtype_size(DataType t);
// Bits per element in the ONNX file encoding (4 for int4, 2 for int2...).
int dtype_file_bits(DataType t);
const char* dtype_name(DataType t);  // "float32", "int64", "float16", ...
std::optional<DataType> dtype_from_name(std::string_view name);
bool dtype_valid(int32_t v);
bool is_float(DataType t);    // f16, bf16, f32, f64, float8/float4 kinds
bool is_integer(DataType t);  // signed/unsigned ints incl. 4-bit/2-bit
bool is_signed(DataType t);

}  // namespace kiln
