// Kiln plan file: the contract between builder and runtime.
//
// Layout (all integers little-endian):
//   offset 0   char[8]  magic "KILNPLAN"
//   offset 8   u32      format version (kPlanFormatVersion)
//   offset 12  u32      header size (32)
//   offset 16  u64      payload size in bytes (file size = 32 + payload size)
//   offset 24  u64      checksum of the payload (kiln::Hasher, 64-bit)
//   offset 32  payload:
//     str   kiln version that wrote it ("0.1.0")
//     str   device fingerprint ("cpu:x86_64:avx2", ...)
//     u64   source model hash (model bytes + external data)
//     i64   max batch (0 = as in the model)
//     u8    fp16 requested, u8 fp16 enabled, u64 workspace bytes
//     graph (see below)
//   str  = u32 length + bytes; vectors = u32 count + items.
//   graph = str name; inputs, outputs, value_info: [str name, type]; initializers: [str name, tensor];
//           nodes: [str name, str op_type, str domain, i32 opset, str kernel, [str] inputs, [str] outputs,
//                   [attribute]]
//   type  = u8 kind, i32 dtype, u8 has_shape, [i64 dim value, str dim param], u8 has_elem, (type elem)
//   tensor = i32 dtype, [i64] dims, then for strings [str], else u64 byte count, zero padding up to the
//            next 64-byte file offset, raw bytes (weights are mmap'd in place, zero-copy).
//   attribute = str name, u8 kind, then the kind's payload (f32 | i64 | str | tensor | graph | [f32] |
//               [i64] | [str] | [tensor] | [graph] | [type]).
//
// Version history:
//   1 (Kiln 0.1.0): first format.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "base/file.h"
#include "base/status.h"
#include "ir/graph.h"

namespace kiln {

constexpr uint32_t kPlanFormatVersion = 1;
constexpr size_t kPlanHeaderSize = 32;
constexpr char kPlanMagic[8] = {'K', 'I', 'L', 'N', 'P', 'L', 'A', 'N'};

struct PlanHeader {
  std::string kiln_version;
  std::string device;
  uint64_t model_hash = 0;
  int64_t max_batch = 0;
  bool fp16_requested = false;
  bool fp16_enabled = false;
  uint64_t workspace_bytes = 0;
};

std::vector<uint8_t> write_plan(const PlanHeader& h, const Graph& g);

struct LoadedPlan {
  PlanHeader header;
  Graph graph;
  uint32_t format_version = 0;
  uint64_t size = 0;
};

// Parses a plan. Checks magic, format version, size and checksum before anything else, then the
// Kiln version and (when `expected_device` is non-empty) the device fingerprint. Errors are one
// sentence: kCorruptPlan (damaged/truncated/bad checksum) or kIncompatiblePlan (other version or
// device). Tensor data points into `file` (kept alive).
// `expected_device` == kDeviceOfPlan: `resolver` maps the plan's device string to this
// machine's fingerprint for that kind of device (or fails: e.g. no GPU, no CUDA in this build).
inline constexpr const char kDeviceOfPlan[] = "<device of plan>";
using DeviceResolver = std::function<Result<std::string>(const std::string& plan_device)>;
Result<LoadedPlan> read_plan(std::shared_ptr<MappedFile> file, const std::string& expected_device,
                             const DeviceResolver& resolver = nullptr);

// Plan files that loaded engines mapped from disk (read-only, private file mappings). While one is
// registered, read_plan drops the pages of its checksum pass behind it, and kernels that keep
// their own (packed) copy of a weight drop the weight's pages: they stay readable (the OS reads
// them back from the page cache when touched) but leave this process's resident memory, so a
// plan's weights are not held twice. Register only memory from MappedFile::open (a real mmap),
// unregister before the mapping can go away.
void register_mapped_plan(const MappedFile* file);
void unregister_mapped_plan(const MappedFile* file);
// Drops the pages of [p, p + n) from resident memory when the range lies inside a registered plan
// mapping; anything else (heap memory, in-memory plans) is left alone. Returns the bytes released.
size_t release_plan_pages(const void* p, size_t n);
// Total bytes release_plan_pages has released in this process (tests, diagnostics).
uint64_t released_plan_bytes();

// The fingerprint of this machine for a backend ("cpu" → "cpu:x86_64:avx2").
std::string device_fingerprint(const std::string& backend);

}  // namespace kiln
