// Kiln's own 1x1 convolution for float32 NHWC activations (the layout of the CPU conv chain):
// no pads, one group, so Y[M, N] = act(X[M, K] * W^T + bias + Z) with M = batch * OH * OW
// output pixels, K input and N output channels; epilogue (bias, residual Z, Relu / Clip /
// LeakyRelu) in registers before the one store of each output; Z may be Y itself (in place).
// Strided (ResNet's downsampling 1x1 convs) or windowed (im2col of a k x k conv): the input rows
// are gathered first, in parallel.
// W^T is packed once into panels of up to 4 vectors of output channels (the panel width fits N:
// a 16-channel conv does not pay for 48 columns). A micro-tile keeps MR rows x one panel of Y in
// registers, broadcasting X, loading W rows.
// Two loop orders, per call: with many rows and packed weights of up to 256 KB, a task is a
// block of rows, and each strip of row tiles runs over all panels (X's rows stay in L1, Z and Y
// stream once, contiguously), prefetching the next strip's X and Z; otherwise (few rows: batch
// 1 at 7x7, or big weights) a task is a panel (and a block of rows where panels are few), each
// panel's weights read once; with packed weights of 1 MB up, a contiguous group of panels per
// thread, each panel prefetching the next into L2 (the weights come from memory in a model).
// Tasks on OpenMP's threads (cpu_parallel.h); outputs past 4 MB that are not in place are stored
// non-temporally.
// AVX-512 and AVX2/FMA builds of the same code (cpu_conv1x1_kernel.inc), chosen at run time.
// Lifetime / threads: one object per conv; run() is const and may run concurrently.
#pragma once
#include <cstdint>
#include <memory>

#include "ops/fused/fused.h"

namespace kiln {
namespace cpu {

enum class C1Isa { kAuto, kAvx512, kAvx2 };
// How run() walks rows and panels (kAuto: see the top).
enum class C1Order { kAuto, kRowsOuter, kPanelsOuter };

// Whether this CPU can run the kernel with `isa` (kAuto: with any).
bool conv1x1_isa_available(C1Isa isa);

class Conv1x1 {
 public:
  // w: [N, K] (OIHW of a 1x1 kernel); bias: N floats or null. Null when the CPU lacks `isa`
  // (kAuto: the best it has), N or K < 1, a Clip with min > max, or out of memory.
  static std::shared_ptr<const Conv1x1> create(const float* w, int64_t N, int64_t K,
                                               const float* bias, const fused::Epilogue& ep,
                                               C1Isa isa = C1Isa::kAuto);

  // A strided input: an [images, H, W, K] x read at (oh sh, ow sw) for output pixel (oh, ow),
  // OH = (H - 1) / sh + 1, OW = (W - 1) / sw + 1.
  // With a kh x kw window (im2col; ResNet's strided 3x3 at 7x7): x is [images, H, W, C], C =
  // K / (kh kw), and output pixel (oh, ow) reads x at (oh sh - pt + i dh, ow sw - pl + j dw) for
  // tap (i, j), zeros outside; the gathered row is [kh][kw][C], so w is [N][kh][kw][C]. OH, OW:
  // the output size (given with a window or pads).
  struct Strided {
    int64_t H = 0, W = 0, sh = 1, sw = 1;
    int64_t kh = 1, kw = 1, pt = 0, pl = 0, dh = 1, dw = 1, OH = 0, OW = 0;
    bool windowed() const { return kh != 1 || kw != 1 || pt != 0 || pl != 0; }
  };

  // y [M, N] = act(x [M, K] * w^T + bias + z); z [M, N] or null, may be y. With st, x is
  // strided (M = images * OH * OW). Runs on up to `threads` OpenMP threads. False when M < 1,
  // x / y are null or st is inconsistent (nothing written), or out of memory.
  bool run(const float* x, int64_t M, const float* z, float* y, int threads,
           C1Order order = C1Order::kAuto, const Strided* st = nullptr) const;

  int64_t packed_bytes() const { return static_cast<int64_t>(sizeof(float)) * npan_ * K_ * W_; }
  const float* packed() const { return bp_; }
  C1Isa isa() const { return isa_; }
  ~Conv1x1();
  Conv1x1(const Conv1x1&) = delete;
  Conv1x1& operator=(const Conv1x1&) = delete;

 private:
  Conv1x1() = default;
  C1Isa isa_ = C1Isa::kAuto;
  int64_t N_ = 0, K_ = 0;
  int nv_ = 1, mr_ = 1;        // vectors per panel, rows per micro-tile
  int64_t W_ = 0, npan_ = 0;   // panel width (floats), panels
  float* bp_ = nullptr;        // [npan][K][W], zero past N, 64-byte aligned
  float* bias_ = nullptr;      // [npan * W], zero past N (or null: no bias)
  fused::Epilogue ep_;
};

}  // namespace cpu
}  // namespace kiln
