#include "onnx/wire.h"

#include <cstring>

namespace kiln::wire {

namespace {
struct FieldNameEntry {
  const char* msg;
  uint32_t num;
  const char* name;
};
constexpr FieldNameEntry kNames[] = {
    {"ModelProto", 1, "ir_version"},
    {"ModelProto", 2, "producer_name"},
    {"ModelProto", 3, "producer_version"},
    {"ModelProto", 4, "domain"},
    {"ModelProto", 5, "model_version"},
    {"ModelProto", 6, "doc_string"},
    {"ModelProto", 7, "graph"},
    {"ModelProto", 8, "opset_import"},
    {"ModelProto", 14, "metadata_props"},
    {"ModelProto", 20, "training_info"},
    {"ModelProto", 25, "functions"},
    {"OperatorSetIdProto", 1, "domain"},
    {"OperatorSetIdProto", 2, "version"},
    {"StringStringEntryProto", 1, "key"},
    {"StringStringEntryProto", 2, "value"},
    {"GraphProto", 1, "node"},
    {"GraphProto", 2, "name"},
    {"GraphProto", 5, "initializer"},
    {"GraphProto", 10, "doc_string"},
    {"GraphProto", 11, "input"},
    {"GraphProto", 12, "output"},
    {"GraphProto", 13, "value_info"},
    {"GraphProto", 14, "quantization_annotation"},
    {"GraphProto", 15, "sparse_initializer"},
    {"GraphProto", 16, "metadata_props"},
    {"NodeProto", 1, "input"},
    {"NodeProto", 2, "output"},
    {"NodeProto", 3, "name"},
    {"NodeProto", 4, "op_type"},
    {"NodeProto", 5, "attribute"},
    {"NodeProto", 6, "doc_string"},
    {"NodeProto", 7, "domain"},
    {"NodeProto", 8, "overload"},
    {"NodeProto", 9, "metadata_props"},
    {"AttributeProto", 1, "name"},
    {"AttributeProto", 2, "f"},
    {"AttributeProto", 3, "i"},
    {"AttributeProto", 4, "s"},
    {"AttributeProto", 5, "t"},
    {"AttributeProto", 6, "g"},
    {"AttributeProto", 7, "floats"},
    {"AttributeProto", 8, "ints"},
    {"AttributeProto", 9, "strings"},
    {"AttributeProto", 10, "tensors"},
    {"AttributeProto", 11, "graphs"},
    {"AttributeProto", 13, "doc_string"},
    {"AttributeProto", 14, "tp"},
    {"AttributeProto", 15, "tps"},
    {"AttributeProto", 20, "type"},
    {"AttributeProto", 21, "ref_attr_name"},
    {"AttributeProto", 22, "sparse_tensor"},
    {"AttributeProto", 23, "sparse_tensors"},
    {"TensorProto", 1, "dims"},
    {"TensorProto", 2, "data_type"},
    {"TensorProto", 3, "segment"},
    {"TensorProto", 4, "float_data"},
    {"TensorProto", 5, "int32_data"},
    {"TensorProto", 6, "string_data"},
    {"TensorProto", 7, "int64_data"},
    {"TensorProto", 8, "name"},
    {"TensorProto", 9, "raw_data"},
    {"TensorProto", 10, "double_data"},
    {"TensorProto", 11, "uint64_data"},
    {"TensorProto", 12, "doc_string"},
    {"TensorProto", 13, "external_data"},
    {"TensorProto", 14, "data_location"},
    {"TensorProto", 16, "metadata_props"},
    {"SparseTensorProto", 1, "values"},
    {"SparseTensorProto", 2, "indices"},
    {"SparseTensorProto", 3, "dims"},
    {"ValueInfoProto", 1, "name"},
    {"ValueInfoProto", 2, "type"},
    {"ValueInfoProto", 3, "doc_string"},
    {"TypeProto", 1, "tensor_type"},
    {"TypeProto", 4, "sequence_type"},
    {"TypeProto", 5, "map_type"},
    {"TypeProto", 6, "denotation"},
    {"TypeProto", 8, "sparse_tensor_type"},
    {"TypeProto", 9, "optional_type"},
    {"TypeProto.Tensor", 1, "elem_type"},
    {"TypeProto.Tensor", 2, "shape"},
    {"TypeProto.Sequence", 1, "elem_type"},
    {"TypeProto.Optional", 1, "elem_type"},
    {"TypeProto.Map", 1, "key_type"},
    {"TypeProto.Map", 2, "value_type"},
    {"TensorShapeProto", 1, "dim"},
    {"TensorShapeProto.Dimension", 1, "dim_value"},
    {"TensorShapeProto.Dimension", 2, "dim_param"},
    {"TensorShapeProto.Dimension", 3, "denotation"},
    {"FunctionProto", 1, "name"},
    {"FunctionProto", 4, "input"},
    {"FunctionProto", 5, "output"},
    {"FunctionProto", 6, "attribute"},
    {"FunctionProto", 7, "node"},
    {"FunctionProto", 8, "doc_string"},
    {"FunctionProto", 9, "opset_import"},
    {"FunctionProto", 10, "domain"},
    {"FunctionProto", 11, "attribute_proto"},
    {"FunctionProto", 12, "value_info"},
    {"FunctionProto", 13, "overload"},
    {"SequenceProto", 1, "name"},
    {"SequenceProto", 2, "elem_type"},
    {"SequenceProto", 3, "tensor_values"},
    {"SequenceProto", 4, "sparse_tensor_values"},
    {"SequenceProto", 5, "sequence_values"},
    {"SequenceProto", 6, "map_values"},
    {"SequenceProto", 7, "optional_values"},
    {"OptionalProto", 1, "name"},
    {"OptionalProto", 2, "elem_type"},
    {"OptionalProto", 3, "tensor_value"},
    {"OptionalProto", 4, "sparse_tensor_value"},
    {"OptionalProto", 5, "sequence_value"},
    {"OptionalProto", 6, "map_value"},
    {"OptionalProto", 7, "optional_value"},
};
}  // namespace

const char* field_name(const char* msg, uint32_t num) {
  for (const auto& e : kNames)
    if (e.num == num && std::strcmp(e.msg, msg) == 0) return e.name;
  return "";
}

Status Reader::err(const Field& f, const std::string& what) const {
  const char* fn = field_name(msg_, f.num);
  std::string s = std::string(msg_);
  if (*fn) s += std::string(".") + fn;
  s += " (field " + std::to_string(f.num) + ") at byte " + std::to_string(f.off) + ": " + what;
  return invalid_model(s);
}

Status Reader::read_varint(size_t& pos, size_t end, uint64_t& v, const Field* f) const {
  v = 0;
  size_t start = pos;
  for (int i = 0; i < 10; ++i) {
    if (pos >= end) {
      std::string what = "truncated varint (buffer ends at byte " + std::to_string(end) + ")";
      if (f) return err(*f, what);
      return invalid_model(std::string(msg_) + " at byte " + std::to_string(start) + ": " + what);
    }
    uint8_t b = base_[pos++];
    if (i == 9 && b > 1) break;
    v |= static_cast<uint64_t>(b & 0x7f) << (7 * i);
    if (!(b & 0x80)) return Status::ok();
  }
  std::string what = "varint longer than 10 bytes";
  if (f) return err(*f, what);
  return invalid_model(std::string(msg_) + " at byte " + std::to_string(start) + ": " + what);
}

Status Reader::next(Field& f) {
  f = Field{};
  f.off = pos_;
  uint64_t tag;
  KILN_RETURN_IF_ERROR(read_varint(pos_, end_, tag, nullptr));
  f.num = static_cast<uint32_t>(tag >> 3);
  f.wt = static_cast<uint32_t>(tag & 7);
  if ((tag >> 3) == 0 || (tag >> 3) > 0x1fffffff)
    return invalid_model(std::string(msg_) + " at byte " + std::to_string(f.off) +
                         ": invalid field number " + std::to_string(tag >> 3));
  switch (f.wt) {
    case kVarint:
      return read_varint(pos_, end_, f.v, &f);
    case kFixed64:
      if (end_ - pos_ < 8)
        return err(f, "fixed64 value runs past the end of the buffer (ends at byte " +
                          std::to_string(end_) + ")");
      std::memcpy(&f.v, base_ + pos_, 8);
      pos_ += 8;
      return Status::ok();
    case kFixed32: {
      if (end_ - pos_ < 4)
        return err(f, "fixed32 value runs past the end of the buffer (ends at byte " +
                          std::to_string(end_) + ")");
      uint32_t v;
      std::memcpy(&v, base_ + pos_, 4);
      f.v = v;
      pos_ += 4;
      return Status::ok();
    }
    case kLen: {
      uint64_t len;
      KILN_RETURN_IF_ERROR(read_varint(pos_, end_, len, &f));
      if (len > end_ - pos_)
        return err(f, "length " + std::to_string(len) + " runs past the end of the buffer (size " +
                          std::to_string(end_) + ")");
      f.start = pos_;
      f.len = static_cast<size_t>(len);
      pos_ += f.len;
      return Status::ok();
    }
    case kStartGroup:
    case kEndGroup:
      return err(f, "groups (wire type " + std::to_string(f.wt) + ") are not supported");
    default:
      return err(f, "invalid wire type " + std::to_string(f.wt));
  }
}

static const char* wt_name(uint32_t wt) {
  switch (wt) {
    case kVarint:
      return "varint";
    case kFixed64:
      return "fixed64";
    case kLen:
      return "length-delimited";
    case kFixed32:
      return "fixed32";
    default:
      return "group";
  }
}

Status Reader::expect(const Field& f, uint32_t wt) const {
  if (f.wt == wt) return Status::ok();
  return err(f, std::string("expected wire type ") + wt_name(wt) + ", got " + wt_name(f.wt));
}

Status Reader::str(const Field& f, std::string& out) const {
  KILN_RETURN_IF_ERROR(expect(f, kLen));
  out.assign(reinterpret_cast<const char*>(base_ + f.start), f.len);
  return Status::ok();
}

Status Reader::i64(const Field& f, int64_t& out) const {
  KILN_RETURN_IF_ERROR(expect(f, kVarint));
  out = static_cast<int64_t>(f.v);
  return Status::ok();
}

Status Reader::varints(const Field& f, std::vector<uint64_t>& out) const {
  if (f.wt == kVarint) {
    out.push_back(f.v);
    return Status::ok();
  }
  if (f.wt != kLen)
    return err(f, std::string("expected varint or packed varints, got ") + wt_name(f.wt));
  size_t n = 0;  // element count = bytes without the continuation bit (bounded by the payload)
  for (size_t i = 0; i < f.len; ++i) n += (base_[f.start + i] & 0x80) == 0;
  out.reserve(out.size() + n);
  size_t pos = f.start, end = f.start + f.len;
  while (pos < end) {
    uint64_t v;
    KILN_RETURN_IF_ERROR(read_varint(pos, end, v, &f));
    out.push_back(v);
  }
  return Status::ok();
}

Status Reader::fixed32s(const Field& f, std::vector<float>& out) const {
  if (f.wt == kFixed32) {
    uint32_t u = static_cast<uint32_t>(f.v);
    float x;
    std::memcpy(&x, &u, 4);
    out.push_back(x);
    return Status::ok();
  }
  if (f.wt != kLen)
    return err(f, std::string("expected fixed32 or packed floats, got ") + wt_name(f.wt));
  if (f.len % 4)
    return err(
        f, "packed float payload of " + std::to_string(f.len) + " bytes is not a multiple of 4");
  if (f.len == 0) return Status::ok();
  size_t n = f.len / 4, old = out.size();
  out.resize(old + n);
  std::memcpy(out.data() + old, base_ + f.start, f.len);
  return Status::ok();
}

Status Reader::fixed64s(const Field& f, std::vector<double>& out) const {
  if (f.wt == kFixed64) {
    double x;
    std::memcpy(&x, &f.v, 8);
    out.push_back(x);
    return Status::ok();
  }
  if (f.wt != kLen)
    return err(f, std::string("expected fixed64 or packed doubles, got ") + wt_name(f.wt));
  if (f.len % 8)
    return err(
        f, "packed double payload of " + std::to_string(f.len) + " bytes is not a multiple of 8");
  if (f.len == 0) return Status::ok();
  size_t n = f.len / 8, old = out.size();
  out.resize(old + n);
  std::memcpy(out.data() + old, base_ + f.start, f.len);
  return Status::ok();
}

}  // namespace kiln::wire
