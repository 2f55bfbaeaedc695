#include "plan/plan.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "base/hash.h"

namespace kiln {

namespace {

struct MappedPlans {
  std::mutex mu;
  std::vector<const MappedFile*> files;
  std::atomic<uint64_t> released{0};
};

MappedPlans& mapped_plans() {
  static MappedPlans m;
  return m;
}

// The checksum of a mapped plan, a chunk at a time, each chunk's pages dropped once hashed: the
// whole file is never resident at once.
uint64_t hash_payload(const MappedFile& f) {
  const uint8_t* p = f.data() + kPlanHeaderSize;
  const size_t n = f.size() - kPlanHeaderSize;
  constexpr size_t kChunk = size_t{16} << 20;  // a multiple of the 8-byte hash step
  Hasher h;
  for (size_t off = 0; off < n; off += kChunk) {
    const size_t len = std::min(kChunk, n - off);
    h.update(p + off, len);
    release_plan_pages(p + off, len);
  }
  return h.digest();
}

class Writer {
 public:
  std::vector<uint8_t> buf;
  void bytes(const void* p, size_t n) {
    auto* c = static_cast<const uint8_t*>(p);
    buf.insert(buf.end(), c, c + n);
  }
  void u8(uint8_t v) { buf.push_back(v); }
  void u32(uint32_t v) { bytes(&v, 4); }
  void i32(int32_t v) { bytes(&v, 4); }
  void u64(uint64_t v) { bytes(&v, 8); }
  void i64(int64_t v) { bytes(&v, 8); }
  void f32(float v) { bytes(&v, 4); }
  void str(const std::string& s) {
    u32(static_cast<uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  void align(size_t a) {
    while (buf.size() % a) buf.push_back(0);
  }

  void type(const TypeInfo& t) {
    u8(static_cast<uint8_t>(t.kind));
    i32(static_cast<int32_t>(t.dtype));
    u8(t.has_shape);
    u32(static_cast<uint32_t>(t.dims.size()));
    for (auto& d : t.dims) {
      i64(d.value);
      str(d.param);
    }
    u8(t.elem != nullptr);
    if (t.elem) type(*t.elem);
  }
  void tensor(const Tensor& t) {
    i32(static_cast<int32_t>(t.dtype()));
    u32(static_cast<uint32_t>(t.rank()));
    for (auto d : t.shape()) i64(d);
    if (t.dtype() == DataType::kString) {
      for (int64_t i = 0; i < t.numel(); ++i) str(t.data<std::string>()[i]);
      return;
    }
    u64(t.nbytes());
    align(64);
    bytes(t.raw_data(), t.nbytes());
  }
  void attr(const Attribute& a) {
    str(a.name);
    u8(static_cast<uint8_t>(a.kind));
    using K = Attribute::Kind;
    switch (a.kind) {
      case K::kUndefined: break;
      case K::kFloat: f32(a.f); break;
      case K::kInt: i64(a.i); break;
      case K::kString: str(a.s); break;
      case K::kTensor: tensor(a.t); break;
      case K::kGraph: graph(*a.g); break;
      case K::kFloats:
        u32(static_cast<uint32_t>(a.floats.size()));
        for (float f : a.floats) f32(f);
        break;
      case K::kInts:
        u32(static_cast<uint32_t>(a.ints.size()));
        for (auto v : a.ints) i64(v);
        break;
      case K::kStrings:
        u32(static_cast<uint32_t>(a.strings.size()));
        for (auto& s : a.strings) str(s);
        break;
      case K::kTensors:
        u32(static_cast<uint32_t>(a.tensors.size()));
        for (auto& t : a.tensors) tensor(t);
        break;
      case K::kGraphs:
        u32(static_cast<uint32_t>(a.graphs.size()));
        for (auto& g : a.graphs) graph(*g);
        break;
      case K::kTypeProto:
      case K::kTypeProtos:
        u32(static_cast<uint32_t>(a.types.size()));
        for (auto& t : a.types) type(t);
        break;
    }
  }
  void value_infos(const std::vector<ValueInfo>& v) {
    u32(static_cast<uint32_t>(v.size()));
    for (auto& x : v) {
      str(x.name);
      type(x.type);
    }
  }
  void strs(const std::vector<std::string>& v) {
    u32(static_cast<uint32_t>(v.size()));
    for (auto& s : v) str(s);
  }
  void graph(const Graph& g) {
    str(g.name);
    value_infos(g.inputs);
    value_infos(g.outputs);
    value_infos(g.value_info);
    u32(static_cast<uint32_t>(g.initializers.size()));
    for (auto& [name, t] : g.initializers) {
      str(name);
      tensor(t);
    }
    u32(static_cast<uint32_t>(g.nodes.size()));
    for (auto& n : g.nodes) {
      str(n.name);
      str(n.op_type);
      str(n.domain);
      i32(n.opset);
      str(n.kernel);
      strs(n.inputs);
      strs(n.outputs);
      u32(static_cast<uint32_t>(n.attrs.size()));
      for (auto& a : n.attrs) attr(a);
    }
  }
};

class Reader {
 public:
  Reader(std::shared_ptr<MappedFile> f, size_t start) : file_(std::move(f)), pos_(start) {}
  Status err;
  bool ok() const { return err.is_ok(); }

  bool need(size_t n, const char* what) {
    if (!ok()) return false;
    if (n > file_->size() - pos_) {
      err = Status(StatusCode::kCorruptPlan,
                   "plan is damaged: " + std::string(what) + " at byte " + std::to_string(pos_) +
                       " runs past the end of the file (" + std::to_string(file_->size()) + " bytes)");
      return false;
    }
    return true;
  }
  void fail(const std::string& m) {
    if (ok()) err = Status(StatusCode::kCorruptPlan, "plan is damaged: " + m + " at byte " + std::to_string(pos_));
  }
  template <typename T>
  T pod(const char* what) {
    T v{};
    if (!need(sizeof(T), what)) return v;
    std::memcpy(&v, file_->data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  uint8_t u8(const char* w) { return pod<uint8_t>(w); }
  uint32_t u32(const char* w) { return pod<uint32_t>(w); }
  int32_t i32(const char* w) { return pod<int32_t>(w); }
  uint64_t u64(const char* w) { return pod<uint64_t>(w); }
  int64_t i64(const char* w) { return pod<int64_t>(w); }
  float f32(const char* w) { return pod<float>(w); }
  std::string str(const char* w) {
    uint32_t n = u32(w);
    if (!need(n, w)) return {};
    std::string s(reinterpret_cast<const char*>(file_->data() + pos_), n);
    pos_ += n;
    return s;
  }
  // A count of items each at least `min_item` bytes: bounded by the remaining file.
  uint32_t count(const char* w, size_t min_item = 1) {
    uint32_t n = u32(w);
    if (ok() && static_cast<uint64_t>(n) * min_item > file_->size() - pos_) {
      fail(std::string(w) + " count " + std::to_string(n) + " exceeds the file size");
      return 0;
    }
    return n;
  }

  TypeInfo type(int depth = 0) {
    TypeInfo t;
    if (depth > 32) { fail("type nesting too deep"); return t; }
    uint8_t k = u8("type kind");
    if (k > static_cast<uint8_t>(TypeInfo::Kind::kMap)) fail("bad type kind");
    t.kind = static_cast<TypeInfo::Kind>(k);
    t.dtype = static_cast<DataType>(i32("type dtype"));
    t.has_shape = u8("type has_shape");
    uint32_t nd = count("type dims", 12);
    for (uint32_t i = 0; i < nd && ok(); ++i) {
      Dim d;
      d.value = i64("dim");
      d.param = str("dim param");
      t.dims.push_back(std::move(d));
    }
    if (u8("type elem flag")) t.elem = std::make_shared<TypeInfo>(type(depth + 1));
    return t;
  }

  Tensor tensor() {
    const size_t start = pos_;
    int32_t dt = i32("tensor dtype");
    if (ok() && !dtype_valid(dt)) { fail("bad tensor dtype " + std::to_string(dt)); return {}; }
    uint32_t rank = count("tensor rank", 8);
    Shape shape;
    for (uint32_t i = 0; i < rank && ok(); ++i) shape.push_back(i64("tensor dim"));
    if (!ok()) return {};
    auto n = checked_numel(shape);
    if (!n.is_ok()) { fail("bad tensor shape " + shape_str(shape)); return {}; }
    DataType dtype = static_cast<DataType>(dt);
    if (dtype == DataType::kString) {
      if (static_cast<uint64_t>(*n) * 4 > file_->size() - pos_) { fail("string tensor too large"); return {}; }
      auto t = Tensor::create(dtype, shape);
      if (!t.is_ok()) { fail(t.status().message()); return {}; }
      for (int64_t i = 0; i < *n && ok(); ++i) t->data<std::string>()[i] = str("string element");
      return std::move(t).value();
    }
    uint64_t nbytes = u64("tensor byte count");
    if (ok() && nbytes != static_cast<uint64_t>(*n) * dtype_size(dtype)) {
      fail("tensor byte count " + std::to_string(nbytes) + " does not match " + shape_str(shape));
      return {};
    }
    size_t pad = (64 - pos_ % 64) % 64;
    if (!need(pad, "tensor padding")) return {};
    pos_ += pad;
    if (!need(nbytes, "tensor data")) return {};
    // Reading this header mapped the page-cache folio around it (up to 2 MiB of weights) again.
    release_plan_pages(file_->data() + start, pos_ - start + (nbytes ? 1 : 0));
    Tensor t = Tensor::external(dtype, shape, file_->data() + pos_, file_);
    pos_ += nbytes;
    return t;
  }

  Attribute attr(int depth) {
    Attribute a;
    a.name = str("attribute name");
    uint8_t k = u8("attribute kind");
    if (k > static_cast<uint8_t>(Attribute::Kind::kTypeProtos)) { fail("bad attribute kind"); return a; }
    a.kind = static_cast<Attribute::Kind>(k);
    using K = Attribute::Kind;
    switch (a.kind) {
      case K::kUndefined: break;
      case K::kFloat: a.f = f32("float attribute"); break;
      case K::kInt: a.i = i64("int attribute"); break;
      case K::kString: a.s = str("string attribute"); break;
      case K::kTensor: a.t = tensor(); break;
      case K::kGraph: a.g = std::make_shared<Graph>(graph(depth + 1)); break;
      case K::kFloats: {
        uint32_t n = count("floats", 4);
        for (uint32_t i = 0; i < n && ok(); ++i) a.floats.push_back(f32("float"));
        break;
      }
      case K::kInts: {
        uint32_t n = count("ints", 8);
        for (uint32_t i = 0; i < n && ok(); ++i) a.ints.push_back(i64("int"));
        break;
      }
      case K::kStrings: {
        uint32_t n = count("strings", 4);
        for (uint32_t i = 0; i < n && ok(); ++i) a.strings.push_back(str("string"));
        break;
      }
      case K::kTensors: {
        uint32_t n = count("tensors", 8);
        for (uint32_t i = 0; i < n && ok(); ++i) a.tensors.push_back(tensor());
        break;
      }
      case K::kGraphs: {
        uint32_t n = count("graphs", 16);
        for (uint32_t i = 0; i < n && ok(); ++i) a.graphs.push_back(std::make_shared<Graph>(graph(depth + 1)));
        break;
      }
      case K::kTypeProto:
      case K::kTypeProtos: {
        uint32_t n = count("types", 10);
        for (uint32_t i = 0; i < n && ok(); ++i) a.types.push_back(type());
        break;
      }
    }
    return a;
  }

  std::vector<ValueInfo> value_infos(const char* w) {
    std::vector<ValueInfo> v;
    uint32_t n = count(w, 12);
    for (uint32_t i = 0; i < n && ok(); ++i) {
      ValueInfo vi;
      vi.name = str(w);
      vi.type = type();
      v.push_back(std::move(vi));
    }
    return v;
  }
  std::vector<std::string> strs(const char* w) {
    std::vector<std::string> v;
    uint32_t n = count(w, 4);
    for (uint32_t i = 0; i < n && ok(); ++i) v.push_back(str(w));
    return v;
  }

  Graph graph(int depth = 0) {
    Graph g;
    if (depth > 64) { fail("subgraph nesting too deep"); return g; }
    g.name = str("graph name");
    g.inputs = value_infos("graph inputs");
    g.outputs = value_infos("graph outputs");
    g.value_info = value_infos("value_info");
    uint32_t ni = count("initializers", 12);
    for (uint32_t i = 0; i < ni && ok(); ++i) {
      std::string name = str("initializer name");
      g.initializers[name] = tensor();
    }
    uint32_t nn = count("nodes", 32);
    for (uint32_t i = 0; i < nn && ok(); ++i) {
      Node n;
      n.name = str("node name");
      n.op_type = str("node op_type");
      n.domain = str("node domain");
      n.opset = i32("node opset");
      n.kernel = str("node kernel");
      n.inputs = strs("node inputs");
      n.outputs = strs("node outputs");
      uint32_t na = count("node attributes", 6);
      for (uint32_t k = 0; k < na && ok(); ++k) n.attrs.push_back(attr(depth));
      g.nodes.push_back(std::move(n));
    }
    return g;
  }

  size_t pos() const { return pos_; }

 private:
  std::shared_ptr<MappedFile> file_;
  size_t pos_;
};

}  // namespace

std::vector<uint8_t> write_plan(const PlanHeader& h, const Graph& g) {
  Writer w;
  w.bytes(kPlanMagic, 8);
  w.u32(kPlanFormatVersion);
  w.u32(kPlanHeaderSize);
  w.u64(0);  // payload size, patched below
  w.u64(0);  // checksum, patched below
  w.str(h.kiln_version);
  w.str(h.device);
  w.u64(h.model_hash);
  w.i64(h.max_batch);
  w.u8(h.fp16_requested);
  w.u8(h.fp16_enabled);
  w.u64(h.workspace_bytes);
  w.graph(g);
  uint64_t payload = w.buf.size() - kPlanHeaderSize;
  uint64_t sum = hash_bytes(w.buf.data() + kPlanHeaderSize, payload);
  std::memcpy(w.buf.data() + 16, &payload, 8);
  std::memcpy(w.buf.data() + 24, &sum, 8);
  return std::move(w.buf);
}

Result<LoadedPlan> read_plan(std::shared_ptr<MappedFile> file, const std::string& expected_device,
                             const DeviceResolver& resolver) {
  const std::string src = file->path();
  auto corrupt = [&](const std::string& m) {
    return Status(StatusCode::kCorruptPlan, "plan '" + src + "' " + m);
  };
  if (file->size() < kPlanHeaderSize)
    return corrupt("is truncated: " + std::to_string(file->size()) + " bytes, shorter than the 32-byte header");
  if (std::memcmp(file->data(), kPlanMagic, 8) != 0)
    return corrupt("is not a Kiln plan (bad magic bytes)");
  uint32_t version, hsize;
  uint64_t payload, sum;
  std::memcpy(&version, file->data() + 8, 4);
  std::memcpy(&hsize, file->data() + 12, 4);
  std::memcpy(&payload, file->data() + 16, 8);
  std::memcpy(&sum, file->data() + 24, 8);
  if (version != kPlanFormatVersion)
    return Status(StatusCode::kIncompatiblePlan,
                  "plan '" + src + "' has format version " + std::to_string(version) +
                      " but this Kiln (" KILN_VERSION ") reads format version " +
                      std::to_string(kPlanFormatVersion) + "; rebuild it from the model");
  if (hsize != kPlanHeaderSize) return corrupt("has a bad header size");
  if (payload != file->size() - kPlanHeaderSize)
    return corrupt("is truncated or padded: header says " + std::to_string(payload + kPlanHeaderSize) +
                   " bytes, file has " + std::to_string(file->size()));
  // A mapped plan's checksum pass drops the pages behind it (release_plan_pages), and so does
  // the end of parsing (a tensor header's read maps the page-cache folio around it): a loaded
  // plan keeps none of its weights resident until a kernel reads them.
  if (hash_payload(*file) != sum) return corrupt("fails its checksum (the file is damaged)");
  Reader r(file, kPlanHeaderSize);
  LoadedPlan lp;
  lp.format_version = version;
  lp.size = file->size();
  lp.header.kiln_version = r.str("kiln version");
  lp.header.device = r.str("device");
  lp.header.model_hash = r.u64("model hash");
  lp.header.max_batch = r.i64("max batch");
  lp.header.fp16_requested = r.u8("fp16 flag");
  lp.header.fp16_enabled = r.u8("fp16 flag");
  lp.header.workspace_bytes = r.u64("workspace");
  if (!r.ok()) return r.err;
  if (lp.header.kiln_version != KILN_VERSION)
    return Status(StatusCode::kIncompatiblePlan, "plan '" + src + "' was built by Kiln " +
                                                     lp.header.kiln_version + ", this is Kiln " KILN_VERSION
                                                     "; rebuild it from the model");
  std::string expected = expected_device;
  if (expected == kDeviceOfPlan) {
    if (!resolver) return internal_error("read_plan: no device resolver");
    auto e = resolver(lp.header.device);
    if (!e.is_ok()) return e.status().with_context("plan '" + src + "'");
    expected = e.value();
  }
  if (!expected.empty() && lp.header.device != expected)
    return Status(StatusCode::kIncompatiblePlan, "plan '" + src + "' was built for device '" +
                                                     lp.header.device + "' but this device is '" +
                                                     expected + "'; rebuild it on this device");
  lp.graph = r.graph();
  if (!r.ok()) return r.err.with_context("plan '" + src + "'");
  release_plan_pages(file->data(), file->size());
  if (r.pos() != file->size()) return corrupt("has trailing bytes after the graph");
  return lp;
}

void register_mapped_plan(const MappedFile* file) {
  if (!file || !file->data() || !file->size()) return;
  MappedPlans& m = mapped_plans();
  std::lock_guard<std::mutex> lock(m.mu);
  m.files.push_back(file);
}

void unregister_mapped_plan(const MappedFile* file) {
  MappedPlans& m = mapped_plans();
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = std::find(m.files.begin(), m.files.end(), file);
  if (it != m.files.end()) m.files.erase(it);
}

size_t release_plan_pages(const void* p, size_t n) {
  if (!p || !n) return 0;
  MappedPlans& m = mapped_plans();
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(m.mu);
  for (const MappedFile* f : m.files) {
    const auto base = reinterpret_cast<uintptr_t>(f->data());
    if (a < base || a - base > f->size() || n > f->size() - (a - base)) continue;
    // The page cache holds large folios (up to 2 MiB, aligned in the file) and a fault maps the
    // whole folio, so a range is released out to 2 MiB file-offset boundaries (clipped to the
    // mapping): otherwise the folios at its edges would stay mapped. Neighbours released with
    // it are simply read back when touched.
    constexpr uintptr_t kFolio = uintptr_t{2} << 20;
    const uintptr_t off = a - base;
    const uintptr_t lo = off / kFolio * kFolio;
    const uintptr_t hi = std::min<uintptr_t>((off + n + kFolio - 1) / kFolio * kFolio, f->size());
    // A private read-only file mapping never written: MADV_DONTNEED only unmaps the pages, the
    // data comes back from the file on the next access.
    if (madvise(reinterpret_cast<void*>(base + lo), hi - lo, MADV_DONTNEED) != 0) return 0;
    m.released += hi - lo;
    return hi - lo;
  }
  return 0;
}

uint64_t released_plan_bytes() { return mapped_plans().released.load(); }

std::string device_fingerprint(const std::string& backend) {
  if (backend == "cpu") {
    std::string isa = "generic";
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) isa = "avx512";
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = "avx2";
    else isa = "sse";
    return "cpu:x86_64:" + isa;
#else
    return "cpu:generic";
#endif
  }
  return backend;
}

}  // namespace kiln
