// Kiln's fused inverted-residual block (MobileNetV2), float32 NHWC: y = project(dw(expand(x)))
// (+ z), where expand is a 1x1 conv (+ bias, activation), dw a depthwise 3x3 conv (stride 1 or
// 2, pads <= 1, + bias, activation) and project a 1x1 conv (+ bias, residual z, activation).
// Unfused, the expanded and depthwise tensors (up to 4.8 MB at 112x112x96) go through memory;
// here a task is a band of output rows of one image, walked in chunks of a few rows: the input
// rows a chunk needs (with the 3x3 halo; rows the previous chunk expanded are kept, not
// recomputed) are expanded into a per-thread buffer sized for L2, the depthwise conv writes a
// second small buffer, and the projection writes the chunk's output rows once. The 1x1 convs are
// the block's own micro-kernels (cpu_mbconv_kernel.inc: row tiles x panels of 1-4 vectors, one
// thread per call; 24-channel projections on paired pixels), or cpu_conv1x1.h's with
// KILN_CPU_MBCONV_GEMM=0; the depthwise conv is cpu_mbconv_kernel.inc (by channel vector). AVX-512
// and AVX2/FMA builds, chosen at run time. Bands on OpenMP's threads (cpu_parallel.h); only the
// halo rows at band edges are expanded twice. Small images (4 output rows per thread or fewer)
// split the expanded channels instead (run()); with more threads than channel slices, a grid
// of channel groups x row bands whose partial projections are added up after.
// Measured (Zen 5 VM, 2 threads, MobileNetV2, KILN_CPU_MBCONV=0 vs timed, alternating): b8
// 16.1-16.3 -> 14.4-14.6 ms; b1 1.65-1.99 -> 1.69-1.95 ms while the machine ran fast (no gain:
// at b1 the unfused intermediates stay in L2 / L3 and the 1x1 convs are compute bound) and
// 2.23-2.44 -> 2.02-2.12 ms while it ran slow (memory contended). Bench rows in the report.
// Session 9 (own 1x1 kernels, depthwise by channel vector and two rows at once, paired
// 24-channel projections, slice partial sums): every variant on vs off (KILN_CPU_MBCONV_{DW,
// DW2,GEMM,PAIR,SLICESUM}=0), same plan, b1, 2 threads, 5 pairs alternating: median 1.84-1.90
// vs 2.18-2.23 ms (machine contended), min 1.68-1.77 vs 1.97-2.06; earlier, quieter, before
// DW2 / SLICESUM: 1.59-1.64 vs 1.77-1.86. Blocks alone (kiln_unit_tests
// --gtest_also_run_disabled_tests --gtest_filter='*MbBench*'), one thread: 2.90 -> 2.37 ms.
// Lifetime / threads: one object per block; run() is const and may run concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backends/cpu/cpu_conv1x1.h"
#include "ops/fused/fused.h"

namespace kiln {
namespace cpu {

struct MbConvShape {
  int64_t cin = 0, ce = 0, cout = 0;       // input, expanded and output channels
  int stride = 1;                          // of the depthwise conv: 1 or 2 (both axes)
  int64_t pt = 1, pl = 1, pb = 1, pr = 1;  // its pads, each 0 or 1
  fused::Epilogue e1, e2, e3;              // expand, depthwise, project activations
};

// One 1x1 part's weights packed for the block's own micro-kernels (cpu_mbconv_kernel.inc):
// [npan][K][W] with W = nv vectors, zero past N; bias [npan * W] (zeros without one).
struct MbPack {
  float* bp = nullptr;
  float* bias = nullptr;
  int64_t K = 0, N = 0, W = 0, npan = 0;
  int nv = 1, mr = 1;
};

// Which of the kernel's variants run (all on by default; each KILN_CPU_MBCONV_{DW,GEMM,PAIR,
// SLICESUM}=0 turns one off at first use): the depthwise conv by channel vector, the block's
// own 1x1 micro-kernels (else cpu_conv1x1.h's), paired pixels for 24-channel projections,
// per-slice partial projections in channel-slice mode. For tests and A/B runs.
void set_mbconv_variants(bool dw_by_vector, bool own_gemm, bool pair24, bool slice_sum);

class MbConv {
 public:
  // w1 [ce, cin], w2 [ce, 3, 3] (OIHW of [ce, 1, 3, 3]), w3 [cout, ce]; biases null or of ce,
  // ce, cout floats. w1 null (then ce = cin; b1, e1 unused): no expand, the depthwise conv
  // reads x (MobileNetV2's features.1: depthwise 3x3 -> project; fuse_mbconv_blocks makes such
  // blocks with W1, B1 empty). Null when the CPU lacks `isa` (kAuto: the best it has), the shape
  // is out of range, or out of memory.
  static std::shared_ptr<const MbConv> create(const float* w1, const float* b1, const float* w2,
                                              const float* b2, const float* w3, const float* b3,
                                              const MbConvShape& s, C1Isa isa = C1Isa::kAuto);

  int64_t out_h(int64_t H) const { return (H + s_.pt + s_.pb - 3) / s_.stride + 1; }
  int64_t out_w(int64_t W) const { return (W + s_.pl + s_.pr - 3) / s_.stride + 1; }
  const MbConvShape& shape() const { return s_; }

  // x [n, H, W, cin] -> y [n, OH, OW, cout] (+ z of y's shape, or null; z must not be y).
  // Runs on up to `threads` OpenMP threads. bands: output-row bands per image (0: as many as
  // the threads need, or channel slices for small images; -1: channel slices); chunk: output
  // rows per chunk (0: sized for L2). False (nothing guaranteed written) on bad arguments or out
  // of memory.
  // Channel slices (small images, where bands would expand many halo rows twice and split few
  // rows unevenly): a task expands and filters one slice of the expanded channels of a whole
  // image into a shared depthwise buffer; then the projection runs on all threads. (With a
  // slice per thread, each task projects its slices into a partial sum; with more threads than
  // slices, the tasks are a grid of channel groups x row bands, also into partial sums.)
  bool run(const float* x, int64_t n, int64_t H, int64_t W, const float* z, float* y, int threads,
           int64_t bands = 0, int64_t chunk = 0) const;

  C1Isa isa() const { return isa_; }
  ~MbConv();
  MbConv(const MbConv&) = delete;
  MbConv& operator=(const MbConv&) = delete;

 private:
  MbConv() = default;
  friend struct MbTask;
  friend struct MbSliceTask;
  friend struct MbProjTask;
  friend struct MbParts;
  friend struct MbSliceSumTask;
  friend struct MbGridTask;
  struct Slice {
    int64_t c0 = 0, c1 = 0;  // expanded channels [c0, c1), c0 a multiple of 16
    std::shared_ptr<const Conv1x1> expand;
  };
  std::vector<Slice> slices_;
  MbConvShape s_;
  C1Isa isa_ = C1Isa::kAuto;
  // cpu_conv1x1.h's kernels, made only with KILN_CPU_MBCONV_GEMM=0 (null otherwise).
  std::shared_ptr<const Conv1x1> expand_, project_;
  bool noexp_ = false;     // no expand (w1 null): the depthwise conv reads x
  int64_t cep_ = 0;        // ce rounded up to the vector width
  float* wd_ = nullptr;    // [9][cep] depthwise weights, zero past ce, 64-byte aligned
  float* bd_ = nullptr;    // [cep] depthwise bias (zeros without one)
  MbPack pe_, pp_;         // expand and project, packed (the block's own 1x1 kernels)
  int64_t slice_pan_ = 0;  // channel slices: expand panels per slice
  float* wp24_ = nullptr;  // 24-channel projections (AVX-512): [ce][48] paired pixels' weights
  float* bp24_ = nullptr;  // and bias [48]
  // Grid shapes (T channel groups, R row bands) picked for (n, H, W, threads): grid_shape costs
  // 1-5 us a call for 16 threads (MobileNetV2 shapes, timed alone on a Zen 4) before the block
  // starts, against ~70 us blocks on 16 Xeon threads, so it runs once per input shape.
  struct GridShape {
    int64_t n, H, W, P, T, R;
  };
  mutable std::mutex grid_mu_;
  mutable std::vector<GridShape> grid_shapes_;
  void grid_for(int64_t n, int64_t H, int64_t W, int64_t P, int64_t* T, int64_t* R) const;
};

}  // namespace cpu
}  // namespace kiln
