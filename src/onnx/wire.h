// Protobuf wire-format reader: bounds-checked, allocation-free, offset-tracking. Every error
// names the message, the field and the absolute byte offset in the buffer.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "base/status.h"

namespace kiln::wire {

enum WireType : uint32_t {
  kVarint = 0,
  kFixed64 = 1,
  kLen = 2,
  kStartGroup = 3,
  kEndGroup = 4,
  kFixed32 = 5
};

// Deepest message nesting accepted (graphs in attributes in nodes in graphs ...).
constexpr int kMaxDepth = 100;

struct Field {
  uint32_t num = 0;
  uint32_t wt = 0;
  uint64_t v = 0;    // varint / fixed value
  size_t off = 0;    // absolute offset of the tag
  size_t start = 0;  // kLen: absolute offset of the payload
  size_t len = 0;    // kLen: payload length
};

// "TensorProto.dims" style name of field `num` of message `msg` ("" when unknown).
const char* field_name(const char* msg, uint32_t num);

class Reader {
 public:
  Reader(const uint8_t* base, size_t begin, size_t end, const char* msg)
      : base_(base), begin_(begin), pos_(begin), end_(end), msg_(msg) {}
  bool done() const { return pos_ >= end_; }
  size_t begin() const { return begin_; }  // absolute offset of the message payload
  const char* msg() const { return msg_; }
  const uint8_t* base() const { return base_; }
  // Reads the next field; kLen payloads are bounds-checked but not read.
  Status next(Field& f);
  // "Msg.name (field N) at byte X: what"
  Status err(const Field& f, const std::string& what) const;
  Status expect(const Field& f, uint32_t wt) const;
  // Reader over a kLen field's payload, for message `msg`.
  Reader sub(const Field& f, const char* msg) const {
    return Reader(base_, f.start, f.start + f.len, msg);
  }
  const uint8_t* payload(const Field& f) const { return base_ + f.start; }
  Status str(const Field& f, std::string& out) const;
  Status i64(const Field& f, int64_t& out) const;  // varint
  // Repeated scalars, packed (kLen) or not; appended to `out`.
  Status varints(const Field& f, std::vector<uint64_t>& out) const;
  Status fixed32s(const Field& f, std::vector<float>& out) const;
  Status fixed64s(const Field& f, std::vector<double>& out) const;

 private:
  Status read_varint(size_t& pos, size_t end, uint64_t& v, const Field* f) const;
  const uint8_t* base_;
  size_t begin_, pos_, end_;
  const char* msg_;
};

}  // namespace kiln::wire
