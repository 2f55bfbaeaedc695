// Kiln's Winograd F(4x4, 3x3) (cpu_winograd.h) on outputs of several MB, where the transforms
// prefetch the next tile's input pixels and output / residual lines (KILN_CPU_WINO_PREFETCH):
// against a direct convolution in double written here, every ISA this CPU has, both modes, 1
// and 2 threads, several images (the next tile in another image), odd spatial sizes, an output
// not 64-byte aligned, K not a multiple of the vector width, residual fresh and in place.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <random>
#include <vector>

#include "backends/cpu/cpu_winograd.h"
#include "ops/fused/fused.h"

using namespace kiln;

namespace {

using cpu::WinogradConv;
using cpu::WinoIsa;

struct Buf {  // 64-byte aligned floats, plus `shift` floats of misalignment when asked
  float* base = nullptr;
  float* p = nullptr;
  explicit Buf(size_t n, size_t shift = 0) {
    base = static_cast<float*>(::operator new[]((n + 16) * sizeof(float), std::align_val_t(64)));
    p = base + shift;
  }
  ~Buf() { ::operator delete[](base, std::align_val_t(64)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

std::vector<float> rnd(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = d(rng);
  return v;
}

struct Case {
  int64_t N, H, W, C, K;
  bool residual;
  size_t shift;  // y misaligned by this many floats (0: 64-byte aligned)
};

// y = relu(conv3x3 pad 1 (x) + b (+ z)), NHWC, in double; *range: max |pre-activation|.
std::vector<double> reference(const Case& s, const std::vector<float>& x,
                              const std::vector<float>& w, const std::vector<float>& b,
                              const std::vector<float>& z, double* range) {
  const int64_t OH = s.H, OW = s.W;
  std::vector<double> y(static_cast<size_t>(s.N * OH * OW * s.K));
  *range = 1e-30;
  std::vector<double> acc(static_cast<size_t>(s.K));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        for (int64_t k = 0; k < s.K; ++k) acc[k] = b[k];
        for (int64_t r = 0; r < 3; ++r)
          for (int64_t q = 0; q < 3; ++q) {
            const int64_t ih = oh + r - 1, iw = ow + q - 1;
            if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
            const float* xp = &x[((n * s.H + ih) * s.W + iw) * s.C];
            for (int64_t k = 0; k < s.K; ++k) {
              const float* wp = &w[(k * s.C) * 9 + r * 3 + q];
              double a = 0;
              for (int64_t c = 0; c < s.C; ++c) a += double(xp[c]) * wp[c * 9];
              acc[k] += a;
            }
          }
        for (int64_t k = 0; k < s.K; ++k) {
          const size_t i = static_cast<size_t>(((n * OH + oh) * OW + ow) * s.K + k);
          double v = acc[k] + (s.residual ? z[i] : 0.0);
          *range = std::max(*range, std::fabs(v));
          y[i] = v < 0 ? 0 : v;
        }
      }
  return y;
}

double check(const Case& s, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "N=" << s.N << " H=" << s.H << " W=" << s.W
                                    << " C=" << s.C << " K=" << s.K << " res=" << s.residual
                                    << " shift=" << s.shift);
  const auto x = rnd(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, seed);
  const float wr = 1.f / std::sqrt(float(9 * s.C));
  const auto w = rnd(static_cast<size_t>(s.K * s.C * 9), -wr, wr, seed + 1);
  const auto b = rnd(static_cast<size_t>(s.K), -0.5f, 0.5f, seed + 2);
  const size_t yn = static_cast<size_t>(s.N * s.H * s.W * s.K);
  const auto z = s.residual ? rnd(yn, -1.f, 1.f, seed + 3) : std::vector<float>();
  double range = 0;
  const auto want = reference(s, x, w, b, z, &range);
  fused::Epilogue ep;
  ep.kind = fused::Epilogue::kRelu;
  double worst = 0;
  for (WinoIsa isa : {WinoIsa::kAvx512, WinoIsa::kAvx2}) {
    if (!cpu::winograd_isa_available(isa)) continue;
    auto k = WinogradConv::create(w.data(), s.K, s.C, b.data(), ep, isa);
    EXPECT_TRUE(k);
    if (!k) continue;
    for (cpu::WinoMode mode : {cpu::WinoMode::kFused, cpu::WinoMode::kStreamed})
      for (int threads : {1, 2})
        for (bool in_place : {false, true}) {
          if (in_place && !s.residual) continue;
          Buf y(yn, s.shift);
          if (in_place) std::memcpy(y.p, z.data(), yn * sizeof(float));
          else std::fill(y.p, y.p + yn, std::nanf(""));
          const float* zp = s.residual ? (in_place ? y.p : z.data()) : nullptr;
          const bool ran = k->run(x.data(), s.N, s.H, s.W, 1, 1, 1, 1, zp, y.p, threads, mode);
          EXPECT_TRUE(ran);
          if (!ran) continue;
          double err = 0;
          for (size_t i = 0; i < yn; ++i) {
            const double e = std::fabs(double(y.p[i]) - want[i]);
            err = std::isnan(e) ? 1e30 : std::max(err, e);
          }
          err /= range;
          EXPECT_LE(err, 1e-5) << (isa == WinoIsa::kAvx512 ? "avx512" : "avx2")
                               << " mode=" << int(mode) << " threads=" << threads
                               << " in_place=" << in_place;
          worst = std::max(worst, err);
        }
  }
  return worst;
}

}  // namespace

TEST(KilnWinoPrefetch, LargeOutputsMatchDirectConv) {
  if (!cpu::winograd_isa_available(WinoIsa::kAuto)) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  // 5.3 MB out, fresh and in place.
  worst = std::max(worst, check({1, 72, 72, 16, 256, true, 0}, 1));
  // 4.6 MB over 3 images with odd sizes: the next tile is often in the next image.
  worst = std::max(worst, check({3, 29, 23, 8, 576, false, 0}, 2));
  // A misaligned output; K not a multiple of 16 (a partial last panel).
  worst = std::max(worst, check({1, 66, 66, 8, 256, false, 4}, 3));
  worst = std::max(worst, check({1, 71, 70, 8, 250, true, 0}, 4));
  std::printf("[ wino pf  ] large outputs: worst rel err %.2e\n", worst);
}
