#include "onnx/tensor_file.h"

#include <cstring>

#include "base/file.h"
#include "onnx/proto.h"

namespace kiln {

namespace {

using onnx::TensorMsg;
using wire::Field;
using wire::Reader;

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

Result<Tensor> tensor_from(const uint8_t* data, size_t size, size_t start, size_t end,
                           std::shared_ptr<const void> keepalive, const std::string& base_dir,
                           std::string* name) {
  TensorMsg m;
  KILN_RETURN_IF_ERROR(onnx::parse_tensor(Reader(data, start, end, "TensorProto"), m));
  if (name) *name = m.name;
  onnx::TensorSource src;
  src.base = data;
  src.size = size;
  src.keepalive = std::move(keepalive);
  src.base_dir = base_dir;
  return onnx::make_tensor(m, src);
}

struct ValueCtx {
  const uint8_t* data;
  size_t size;
  std::shared_ptr<const void> keepalive;
  std::string base_dir;
};

Result<Value> parse_optional(const ValueCtx& c, size_t start, size_t end, int depth);

Result<Value> parse_sequence(const ValueCtx& c, size_t start, size_t end, int depth) {
  Reader r(c.data, start, end, "SequenceProto");
  Field f;
  std::vector<Tensor> items;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 3) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      KILN_ASSIGN_OR_RETURN(Tensor t, tensor_from(c.data, c.size, f.start, f.start + f.len,
                                                  c.keepalive, c.base_dir, nullptr));
      items.push_back(std::move(t));
    } else if (f.num >= 4 && f.num <= 7) {
      return unsupported("SequenceProto: only sequences of tensors are supported (field " +
                         std::to_string(f.num) + " at byte " + std::to_string(f.off) + ")");
    }
  }
  DataType elem = items.empty() ? DataType::kUndefined : items[0].dtype();
  return Value::make_sequence(std::move(items), elem);
}

Result<Value> parse_optional(const ValueCtx& c, size_t start, size_t end, int depth) {
  if (depth > 8) return invalid_model("OptionalProto nests too deeply");
  Reader r(c.data, start, end, "OptionalProto");
  Field f;
  std::shared_ptr<Value> inner;
  while (!r.done()) {
    KILN_RETURN_IF_ERROR(r.next(f));
    if (f.num == 3) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      KILN_ASSIGN_OR_RETURN(Tensor t, tensor_from(c.data, c.size, f.start, f.start + f.len,
                                                  c.keepalive, c.base_dir, nullptr));
      inner = std::make_shared<Value>(std::move(t));
    } else if (f.num == 5) {
      KILN_RETURN_IF_ERROR(r.expect(f, wire::kLen));
      KILN_ASSIGN_OR_RETURN(Value s, parse_sequence(c, f.start, f.start + f.len, depth + 1));
      inner = std::make_shared<Value>(std::move(s));
    } else if (f.num == 4 || f.num == 6 || f.num == 7) {
      return unsupported("OptionalProto: field " + std::to_string(f.num) + " at byte " +
                         std::to_string(f.off) + " (sparse/map/nested optional) is not supported");
    }
  }
  DataType elem = DataType::kUndefined;
  if (inner && inner->is_tensor()) elem = inner->tensor.dtype();
  if (inner && inner->kind == ValueKind::kSequence) elem = inner->elem_dtype;
  return Value::make_optional(std::move(inner), elem);
}

void put_varint(std::vector<uint8_t>& o, uint64_t v) {
  while (v >= 0x80) {
    o.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  o.push_back(static_cast<uint8_t>(v));
}
void put_tag(std::vector<uint8_t>& o, uint32_t num, uint32_t wt) {
  put_varint(o, (uint64_t{num} << 3) | wt);
}
void put_bytes(std::vector<uint8_t>& o, uint32_t num, const void* p, size_t n) {
  put_tag(o, num, wire::kLen);
  put_varint(o, n);
  const uint8_t* b = static_cast<const uint8_t*>(p);
  o.insert(o.end(), b, b + n);
}

// numpy descr <-> DataType
struct NpyType {
  const char* descr;
  DataType dt;
};
constexpr NpyType kNpyTypes[] = {
    {"f4", DataType::kFloat},  {"f8", DataType::kDouble}, {"f2", DataType::kFloat16},
    {"i1", DataType::kInt8},   {"u1", DataType::kUInt8},  {"i2", DataType::kInt16},
    {"u2", DataType::kUInt16}, {"i4", DataType::kInt32},  {"u4", DataType::kUInt32},
    {"i8", DataType::kInt64},  {"u8", DataType::kUInt64}, {"b1", DataType::kBool},
};

// Value text of `'key': value` in a numpy header dict.
bool npy_field(const std::string& h, const std::string& key, std::string& out) {
  size_t p = h.find("'" + key + "'");
  if (p == std::string::npos) return false;
  p = h.find(':', p);
  if (p == std::string::npos) return false;
  ++p;
  while (p < h.size() && h[p] == ' ') ++p;
  if (p >= h.size()) return false;
  size_t e;
  if (h[p] == '\'') {
    e = h.find('\'', p + 1);
    if (e == std::string::npos) return false;
    out = h.substr(p + 1, e - p - 1);
  } else if (h[p] == '(') {
    e = h.find(')', p);
    if (e == std::string::npos) return false;
    out = h.substr(p + 1, e - p - 1);
  } else {
    e = h.find_first_of(",}", p);
    if (e == std::string::npos) return false;
    out = h.substr(p, e - p);
  }
  return true;
}

}  // namespace

Result<Tensor> decode_tensor_proto(const uint8_t* data, size_t size, std::string* name) {
  return tensor_from(data, size, 0, size, nullptr, "", name);
}

Result<Value> read_value_file(const std::string& path, const std::string& kind_hint) {
  if (ends_with(path, ".npy")) {
    KILN_ASSIGN_OR_RETURN(Tensor t, read_npy(path));
    return Value(std::move(t));
  }
  KILN_ASSIGN_OR_RETURN(auto file, MappedFile::open(path));
  return decode_value(file, kind_hint, dirname_of(path), path);
}

Result<Value> decode_value(std::shared_ptr<MappedFile> file, const std::string& kind_hint,
                           const std::string& base_dir, const std::string& path) {
  ValueCtx c{file->data(), file->size(), file, base_dir};
  auto ctx = [&](Status st) { return st.with_context("'" + path + "'"); };
  if (kind_hint == "tensor" || kind_hint.empty()) {
    auto t = tensor_from(c.data, c.size, 0, c.size, file, c.base_dir, nullptr);
    if (t.is_ok()) return Value(std::move(*t));
    if (!kind_hint.empty()) return ctx(t.status());
    // Not a valid TensorProto: try the container messages.
    auto s = parse_sequence(c, 0, c.size, 0);
    if (s.is_ok()) return s;
    auto o = parse_optional(c, 0, c.size, 0);
    if (o.is_ok()) return o;
    return ctx(t.status());
  }
  if (kind_hint == "sequence") {
    auto s = parse_sequence(c, 0, c.size, 0);
    if (!s.is_ok()) return ctx(s.status());
    return s;
  }
  if (kind_hint == "optional") {
    auto o = parse_optional(c, 0, c.size, 0);
    if (!o.is_ok()) return ctx(o.status());
    return o;
  }
  return invalid_argument("read_value_file: unknown kind hint '" + kind_hint +
                          "' (expected tensor, sequence, optional or empty)");
}

Status write_tensor_pb(const std::string& path, const Tensor& t, const std::string& name) {
  if (!t.defined()) return invalid_argument("write_tensor_pb: undefined tensor");
  std::vector<uint8_t> o;
  if (!t.shape().empty()) {
    std::vector<uint8_t> dims;
    for (int64_t d : t.shape()) put_varint(dims, static_cast<uint64_t>(d));
    put_bytes(o, 1, dims.data(), dims.size());
  }
  put_tag(o, 2, wire::kVarint);
  put_varint(o, static_cast<uint64_t>(t.dtype()));
  if (!name.empty()) put_bytes(o, 8, name.data(), name.size());
  DataType dt = t.dtype();
  size_t n = static_cast<size_t>(t.numel());
  if (dt == DataType::kString) {
    const std::string* s = t.data<std::string>();
    for (size_t i = 0; i < n; ++i) put_bytes(o, 6, s[i].data(), s[i].size());
  } else {
    int bits = dtype_file_bits(dt);
    const uint8_t* src = static_cast<const uint8_t*>(t.raw_data());
    if (bits < 8) {
      size_t per = static_cast<size_t>(8 / bits);
      std::vector<uint8_t> packed((n + per - 1) / per, 0);
      uint8_t mask = static_cast<uint8_t>((1u << bits) - 1);
      for (size_t i = 0; i < n; ++i)
        packed[i / per] |=
            static_cast<uint8_t>((src[i] & mask) << ((i % per) * static_cast<size_t>(bits)));
      put_bytes(o, 9, packed.data(), packed.size());
    } else {
      put_bytes(o, 9, src, t.nbytes());
    }
  }
  return write_file(path, o.data(), o.size());
}

Status write_npy(const std::string& path, const Tensor& t) {
  const char* descr = nullptr;
  for (auto& e : kNpyTypes)
    if (e.dt == t.dtype()) descr = e.descr;
  if (!descr)
    return unsupported(std::string("write_npy: no .npy type for ") + dtype_name(t.dtype()));
  std::string shape = "(";
  for (size_t i = 0; i < t.shape().size(); ++i) shape += std::to_string(t.shape()[i]) + ",";
  if (t.shape().size() > 1) shape.pop_back();
  shape += ")";
  char order =
      t.dtype() == DataType::kBool || t.dtype() == DataType::kInt8 || t.dtype() == DataType::kUInt8
          ? '|'
          : '<';
  std::string h = std::string("{'descr': '") + order + descr +
                  "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + h.size() + 1;
  size_t pad = (64 - total % 64) % 64;
  h += std::string(pad, ' ') + "\n";
  std::vector<uint8_t> o = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  o.push_back(static_cast<uint8_t>(h.size() & 0xff));
  o.push_back(static_cast<uint8_t>(h.size() >> 8));
  o.insert(o.end(), h.begin(), h.end());
  const uint8_t* p = static_cast<const uint8_t*>(t.raw_data());
  if (t.nbytes()) o.insert(o.end(), p, p + t.nbytes());
  return write_file(path, o.data(), o.size());
}

Result<Tensor> read_npy(const std::string& path) {
  KILN_ASSIGN_OR_RETURN(auto file, MappedFile::open(path));
  return decode_npy(file->data(), file->size(), path);
}

Result<Tensor> decode_npy(const uint8_t* d, size_t size, const std::string& path) {
  auto bad = [&](const std::string& m) { return invalid_model("'" + path + "': " + m); };
  if (size < 10 || std::memcmp(d, "\x93NUMPY", 6) != 0) return bad("not a .npy file (bad magic)");
  int major = d[6];
  size_t hlen, hstart;
  if (major == 1) {
    hlen = d[8] | (size_t{d[9]} << 8);
    hstart = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) return bad("truncated .npy header");
    hlen = d[8] | (size_t{d[9]} << 8) | (size_t{d[10]} << 16) | (size_t{d[11]} << 24);
    hstart = 12;
  } else {
    return bad("unsupported .npy version " + std::to_string(major));
  }
  if (hlen > size - hstart)
    return bad("header length " + std::to_string(hlen) + " runs past the end of the file");
  std::string h(reinterpret_cast<const char*>(d + hstart), hlen);
  std::string descr, fortran, shape_s;
  if (!npy_field(h, "descr", descr) || !npy_field(h, "fortran_order", fortran) ||
      !npy_field(h, "shape", shape_s))
    return bad("malformed .npy header: " + h);
  if (fortran.find("True") != std::string::npos)
    return unsupported("'" + path +
                       "': Fortran-order .npy arrays are not supported (save in C order)");
  if (descr.size() != 3) return bad("unsupported .npy dtype '" + descr + "'");
  if (descr[0] == '>' && descr.substr(1) != "i1" && descr.substr(1) != "u1" &&
      descr.substr(1) != "b1")
    return unsupported("'" + path + "': big-endian .npy data is not supported");
  DataType dt = DataType::kUndefined;
  for (auto& e : kNpyTypes)
    if (descr.substr(1) == e.descr) dt = e.dt;
  if (dt == DataType::kUndefined)
    return unsupported("'" + path + "': unsupported .npy dtype '" + descr + "'");
  Shape shape;
  size_t i = 0;
  while (i < shape_s.size()) {
    while (i < shape_s.size() && (shape_s[i] == ' ' || shape_s[i] == ',')) ++i;
    if (i >= shape_s.size()) break;
    if (shape_s[i] < '0' || shape_s[i] > '9') return bad("malformed .npy shape (" + shape_s + ")");
    int64_t v = 0;
    while (i < shape_s.size() && shape_s[i] >= '0' && shape_s[i] <= '9') {
      if (v > (INT64_MAX - 9) / 10) return bad("dimension overflows in .npy shape");
      v = v * 10 + (shape_s[i++] - '0');
    }
    if (i < shape_s.size() && shape_s[i] == 'L') ++i;
    shape.push_back(v);
  }
  size_t off = hstart + hlen;
  auto nr = checked_numel(shape);
  if (!nr.is_ok()) return nr.status().with_context("'" + path + "'");
  uint64_t es = dtype_size(dt), n = static_cast<uint64_t>(*nr);
  // Compare with the bytes present before allocating from the header's shape.
  if (n > (size - off) / es || n * es != size - off)
    return bad("data has " + std::to_string(size - off) + " bytes, expected " +
               (n > UINT64_MAX / es ? std::string("more") : std::to_string(n * es)) + " for " +
               dtype_name(dt) + shape_str(shape));
  auto r = Tensor::create(dt, shape);
  if (!r.is_ok()) return r.status().with_context("'" + path + "'");
  Tensor t = std::move(*r);
  if (t.nbytes()) std::memcpy(t.raw_data(), d + off, t.nbytes());
  if (dt == DataType::kBool) {
    uint8_t* b = t.data<uint8_t>();
    for (size_t k = 0; k < t.nbytes(); ++k) b[k] = b[k] != 0;
  }
  return t;
}

}  // namespace kiln
