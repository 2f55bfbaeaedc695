// Kiln's own Winograd convolution F(4x4, 3x3) for float32 NHWC activations (the layout of the
// CPU conv chain): 3x3 kernel, stride 1, no dilation, one group, pads 0..2 per side, output
// NHWC, epilogue y = act(conv + bias[k] + Z) fused into the output transform (Z optional, may be
// y itself). No reorders: it reads X and writes Y where they are.
// Weights (OIHW) are packed once, at create(); U = G g G^T is either made once and kept or made
// per call from the packed weights (WinoMode). Work: input transform of 4x4-tile blocks into
// V[36][tiles][C], 36 GEMMs V[xi] * U[xi] per panel of output channels, output transform with
// the epilogue; in tasks on OpenMP's threads (cpu_parallel.h), sized to stay in L2. The
// transforms prefetch the next tile's input pixels and output (and residual) lines
// (KILN_CPU_WINO_PREFETCH=0: not, for A/B runs).
// AVX-512 and AVX2/FMA builds of the same code (cpu_winograd_kernel.inc), chosen at run time.
// Lifetime / threads: one object per conv; run() is const and may run concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>

#include "ops/fused/fused.h"

namespace kiln {
namespace cpu {

enum class WinoIsa { kAuto, kAvx512, kAvx2 };

// How run() gets U = G g G^T. kFused: transformed once (at the first such run) and kept, 4x the
// weights' size; tasks are blocks of tiles, each with its input transform, all the GEMMs and
// the output transform. kStreamed: made per task from the weights (input transform of all
// tiles first, then tasks of output-channel panels, a contiguous run of them per thread, each
// panel's last weight block prefetching the next panel's first); moves a quarter of the bytes,
// which matters when few tiles share each weight and the weights come from memory, as in a
// model's later layers; where its (panel, tile block) tasks are fewer than the threads, each is
// split over rows of the 36 transform positions (each part making its rows of U), the output
// transforms following as tasks of their own (KILN_CPU_WINO_SPLIT=0: not, for A/B runs).
// kAuto: see auto_mode().
enum class WinoMode { kAuto, kFused, kStreamed };

// Whether this CPU can run the kernel with `isa` (kAuto: with any).
bool winograd_isa_available(WinoIsa isa);

class WinogradConv {
 public:
  // w: OIHW [K, C, 3, 3]; bias: K floats or null. Null when the CPU lacks `isa` (kAuto: the best
  // this CPU has), K or C < 1, or out of memory.
  static std::shared_ptr<const WinogradConv> create(const float* w, int64_t K, int64_t C,
                                                    const float* bias, const fused::Epilogue& ep,
                                                    WinoIsa isa = WinoIsa::kAuto);

  // Whether the kernel takes these pads (each in [0, 2]) for an H x W input.
  static bool supports(int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb, int64_t pr);

  // y [N, H+pt+pb-2, W+pl+pr-2, K] = act(conv(x [N, H, W, C]) + bias + z), z of y's shape or
  // null; z == y is allowed (in place). Runs on up to `threads` OpenMP threads. False: out of
  // memory for the scratch buffers, or arguments supports() refuses (nothing written then).
  bool run(const float* x, int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb,
           int64_t pr, const float* z, float* y, int threads,
           WinoMode mode = WinoMode::kAuto) const;

  // What kAuto runs for an output of `tiles` 4x4 tiles (N * ceil(OH / 4) * ceil(OW / 4)):
  // kStreamed for up to kStreamedTiles tiles, or up to twice that when U would exceed
  // kStreamedUBytes (in a model such a U comes from memory on every call), else kFused. Zen 5,
  // 2 threads: ResNet-50 b1 in the model, 14x14x256 (16 tiles, U 9.4 MB) 0.26 ms streamed vs
  // 0.34 ms with U (alone: 0.22 vs 0.19 ms); 28x28x128 (49 tiles, U 2.4 MB) fused 0.14 ms vs
  // 0.16 ms alone; 14x14x256 at N = 8 (128 tiles) fused 1.8 ms vs 2.4 ms (timed among other
  // candidates), 7x7x512 at N = 8 (32 tiles) streamed 2.0 ms vs 2.8 ms.
  // A U over kMaxUBytes is never kept (memory: U is 4x the weights).
  WinoMode auto_mode(int64_t tiles) const;
  static constexpr int64_t kStreamedTiles = 32;
  static constexpr int64_t kStreamedUBytes = 4 << 20;
  static constexpr int64_t kMaxUBytes = 64 << 20;

  // Makes U now where run() would make it at its first call (kFused for this input): so that
  // a plan's first inference does not pay for it. False: out of memory.
  bool prepare(int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb,
               int64_t pr) const;

  // The weights run() reads for an N x H x W input with pads (t, l, b, r) in WinoMode::kAuto:
  // U where it keeps it (made here if not yet), else the packed weights; their size into
  // *bytes. (Tuning flushes them from the caches before timing runs: dnnl_conv.cpp.)
  const float* weights_read(int64_t N, int64_t H, int64_t W, const int64_t pads[4],
                            size_t* bytes) const;

  WinoIsa isa() const { return isa_; }
  ~WinogradConv();
  WinogradConv(const WinogradConv&) = delete;
  WinogradConv& operator=(const WinogradConv&) = delete;

 private:
  WinogradConv() = default;
  const float* pretransformed() const;  // U, made at the first call; null: out of memory
  WinoIsa isa_ = WinoIsa::kAuto;
  int64_t K_ = 0, C_ = 0, Kp_ = 0, nr_ = 0;  // Kp_: K padded to panels of nr_ columns
  float* wp_ = nullptr;                      // [Kp_ / nr_][C][9][nr_], 64-byte aligned
  float* bias_ = nullptr;                    // [Kp_], zero past K
  mutable std::once_flag u_once_;
  mutable float* u_ = nullptr;  // [36][Kp_ / nr_][C][nr_] (kFused)
  fused::Epilogue ep_;
};

// Winograd for 3x3 convolutions with stride 2 (ResNet v1.5's downsampling 3x3s), NHWC, same
// epilogue and threading as WinogradConv. Polyphase: per direction, output o reads
// x[2o - p + k], k = 0..2; the even taps (k = 0, 2) form a 2-tap correlation over the phase
// x[2o - p + 2i], done as F(4, 2) (5 points per 4 outputs), the odd tap a 1-tap one over
// x[2o - p + 1 + 2i] (4 points, the same weight). In 2D a 4x4 output tile reads a 9x9 patch and
// takes 81 products per input channel (25 + 2 * 20 + 16) instead of 144, with 36 distinct
// transformed weights U (6 per direction: 5 from F(4, 2), 1 for the odd tap), kept like
// WinogradConv's U ([36][K panels][C][nr], 4x the weights) or made per task (Mode). Plane (a, b) of
// the transformed input has 1, 4 or 16 rows per tile (a or b == 5: the 4 odd-phase points).
class WinogradS2Conv {
 public:
  // w: OIHW [K, C, 3, 3]; bias: K floats or null. Null when the CPU lacks `isa`, K or C < 1, or
  // out of memory.
  static std::shared_ptr<const WinogradS2Conv> create(const float* w, int64_t K, int64_t C,
                                                      const float* bias, const fused::Epilogue& ep,
                                                      WinoIsa isa = WinoIsa::kAuto);
  // Whether it takes these pads (each in [0, 2]) for an H x W input, stride 2.
  static bool supports(int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb, int64_t pr);
  // Output size of one spatial dim: (H + pt + pb - 3) / 2 + 1.
  static int64_t out_size(int64_t H, int64_t p0, int64_t p1) { return (H + p0 + p1 - 3) / 2 + 1; }

  // How tasks are cut. kBlock: a task per block of tiles (input transform, all panels' GEMMs
  // and output transforms; V stays in L2, U is read by every block); kPanel: the input transform
  // of all tiles first, then tasks of (panel, tile block), each thread a contiguous run (U read
  // once); kStreamed: as kPanel, with U made per task from the weights (a quarter of the bytes:
  // few tiles, weights from memory). kAuto: see auto_mode(); KILN_CPU_WINO_S2_MODE=block /
  // panel / streamed forces one (A/B runs).
  enum class Mode { kAuto, kBlock, kPanel, kStreamed };
  // By U's bytes per tile: kBlock up to kBlockUPerTile, kStreamed past kStreamedUPerTile, else
  // kPanel. Zen 5, one thread, ResNet-50's stride-2 3x3s, U / packed weights flushed (block /
  // panel / streamed, ms; KilnWinoS2.DISABLED_Bench): N=1 56x56x128 (48 KB per tile) 0.59 /
  // 0.59 / 0.66 (2 threads: 0.34 / 0.55 / 0.69), 28x28x256 (590 KB) 0.94 / 0.74 / 0.86,
  // 14x14x512 (9.4 MB) 1.29 / 1.29 / 1.14; N=8 56x56x128 (6 KB) 4.84 / 5.8 / 6.9, 28x28x256
  // (74 KB) 6.05 / 6.23 / 6.75, 14x14x512 (1.2 MB) 7.7 / 6.0 / 6.9.
  Mode auto_mode(int64_t tiles) const;
  static constexpr double kBlockUPerTile = 256 * 1024;
  static constexpr double kStreamedUPerTile = 2 * 1024 * 1024;
  static int64_t tiles_of(int64_t N, int64_t H, int64_t W, const int64_t pads[4]);
  // Makes U now where run() would make it (kAuto for this input). False: out of memory.
  bool prepare(int64_t N, int64_t H, int64_t W, const int64_t pads[4]) const;

  // y [N, OH, OW, K] = act(conv_s2(x [N, H, W, C]) + bias + z); z may be y (in place) or null.
  // False: out of memory, or arguments supports() refuses (nothing written then).
  bool run(const float* x, int64_t N, int64_t H, int64_t W, int64_t pt, int64_t pl, int64_t pb,
           int64_t pr, const float* z, float* y, int threads, Mode mode = Mode::kAuto) const;

  // The weights run() reads in Mode::kAuto for this input (U, made here if not yet, or the
  // packed weights) and their size into *bytes.
  const float* weights_read(int64_t N, int64_t H, int64_t W, const int64_t pads[4],
                            size_t* bytes) const;
  WinoIsa isa() const { return isa_; }
  ~WinogradS2Conv();
  WinogradS2Conv(const WinogradS2Conv&) = delete;
  WinogradS2Conv& operator=(const WinogradS2Conv&) = delete;

 private:
  WinogradS2Conv() = default;
  WinoIsa isa_ = WinoIsa::kAuto;
  int64_t K_ = 0, C_ = 0, Kp_ = 0, nr_ = 0;
  const float* pretransformed() const;  // U, made at the first call; null: out of memory
  float* wp_ = nullptr;                 // [Kp_ / nr_][C][9][nr_]
  float* bias_ = nullptr;               // [Kp_]
  mutable std::once_flag u_once_;
  mutable float* u_ = nullptr;  // [36][Kp_ / nr_][C][nr_]
  fused::Epilogue ep_;
};

}  // namespace cpu
}  // namespace kiln
