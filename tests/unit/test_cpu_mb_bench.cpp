// Timing aid for Kiln's fused inverted-residual block (cpu_mbconv.h), not a test: MobileNetV2's
// blocks 1..17 at batch 1 run as a chain (each block's output the next one's input, as in the
// model), per-block median times printed. Disabled; run with
//   kiln_unit_tests --gtest_also_run_disabled_tests --gtest_filter='*MbBench*'
// KILN_MB_BENCH_THREADS (default 2), KILN_MB_BENCH_ITERS (default 300).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "backends/cpu/cpu_mbconv.h"

using namespace kiln;

namespace {

struct BlockDef {
  int64_t H, cin, ce, cout;
  int stride;
  bool residual;
};

// MobileNetV2 (torchvision) features.1 .. features.17, input height of each; features.1 has
// no expand (ce = cin: the depthwise conv reads x), which the graph pass does not fuse yet.
const BlockDef kBlocks[] = {
    {112, 32, 32, 16, 1, false}, {112, 16, 96, 24, 2, false},  {56, 24, 144, 24, 1, true},
    {56, 24, 144, 32, 2, false}, {28, 32, 192, 32, 1, true},   {28, 32, 192, 32, 1, true},
    {28, 32, 192, 64, 2, false}, {14, 64, 384, 64, 1, true},   {14, 64, 384, 64, 1, true},
    {14, 64, 384, 64, 1, true},  {14, 64, 384, 96, 1, false},  {14, 96, 576, 96, 1, true},
    {14, 96, 576, 96, 1, true},  {14, 96, 576, 160, 2, false}, {7, 160, 960, 160, 1, true},
    {7, 160, 960, 160, 1, true}, {7, 160, 960, 320, 1, false},
};

std::vector<float> rnd(std::mt19937& rng, size_t n, float a) {
  std::uniform_real_distribution<float> u(-a, a);
  std::vector<float> v(n);
  for (float& f : v) f = u(rng);
  return v;
}

}  // namespace

TEST(KilnMbBench, DISABLED_MobileNetV2Chain) {
  if (!cpu::conv1x1_isa_available(cpu::C1Isa::kAuto)) GTEST_SKIP();
  const char* te = std::getenv("KILN_MB_BENCH_THREADS");
  const char* ie = std::getenv("KILN_MB_BENCH_ITERS");
  const int threads = te ? std::atoi(te) : 2;
  const int iters = ie ? std::atoi(ie) : 300;
  std::mt19937 rng(5);
  const size_t nb = sizeof(kBlocks) / sizeof(kBlocks[0]);
  std::vector<std::shared_ptr<const cpu::MbConv>> m(nb);
  std::vector<std::vector<float>> act(nb + 1);
  std::vector<std::vector<float>> keep;
  act[0] = rnd(rng, 112 * 112 * 32, 1.f);
  for (size_t i = 0; i < nb; ++i) {
    const BlockDef& d = kBlocks[i];
    cpu::MbConvShape s;
    s.cin = d.cin, s.ce = d.ce, s.cout = d.cout, s.stride = d.stride;
    s.e1.kind = s.e2.kind = fused::Epilogue::kClip;
    s.e1.a = s.e2.a = 0, s.e1.b = s.e2.b = 6;
    for (auto n : {d.ce * d.cin, d.ce, d.ce * 9, d.ce, d.cout * d.ce, d.cout})
      keep.push_back(rnd(rng, static_cast<size_t>(n), 0.2f));
    const size_t k = keep.size() - 6;
    m[i] = cpu::MbConv::create(i == 0 ? nullptr : keep[k].data(), keep[k + 1].data(),
                               keep[k + 2].data(), keep[k + 3].data(), keep[k + 4].data(),
                               keep[k + 5].data(), s);
    ASSERT_TRUE(m[i]);
    const int64_t OH = m[i]->out_h(d.H);
    act[i + 1].assign(static_cast<size_t>(OH * OH * d.cout), 0.f);
  }
  std::vector<std::vector<double>> t(nb);
  const char* oe = std::getenv("KILN_MB_BENCH_ONLY");  // one block (features.N) only
  const size_t only = oe ? static_cast<size_t>(std::atoi(oe)) : 0;
  using clock = std::chrono::steady_clock;
  for (int it = 0; it < iters + 20; ++it) {
    for (size_t i = 0; i < nb; ++i) {
      const BlockDef& d = kBlocks[i];
      if (only && i + 1 != only) {
        t[i].push_back(0);
        continue;
      }
      const auto t0 = clock::now();
      ASSERT_TRUE(m[i]->run(act[i].data(), 1, d.H, d.H, d.residual ? act[i].data() : nullptr,
                            act[i + 1].data(), threads));
      const double dt = std::chrono::duration<double>(clock::now() - t0).count();
      if (it >= 20) t[i].push_back(dt * 1e6);
      // Keep values bounded through the chain.
      if (it == 0)
        for (float& f : act[i + 1]) f = std::clamp(f, -1.f, 1.f);
    }
  }
  double sum = 0;
  for (size_t i = 0; i < nb; ++i) {
    std::sort(t[i].begin(), t[i].end());
    const double med = t[i][t[i].size() / 2];
    sum += med;
    const BlockDef& d = kBlocks[i];
    const int64_t OH = m[i]->out_h(d.H);
    const double macs = (i == 0 ? 0.0 : double(d.H) * d.H * d.cin * d.ce) +
                        double(OH) * OH * d.ce * 9 + double(OH) * OH * d.ce * d.cout;
    std::printf(
        "features.%-2zu H %3ld %3ld->%4ld->%3ld s%d: median %7.1f us  p10 %7.1f  "
        "(%5.1f GFLOP/s)\n",
        i + 1, long(d.H), long(d.cin), long(d.ce), long(d.cout), d.stride, med,
        t[i][t[i].size() / 10], 2 * macs / med * 1e-3);
  }
  std::printf("sum of medians %.1f us (threads %d)\n", sum, threads);
  if (!std::getenv("KILN_MB_BENCH_PARTS")) return;
  // The two 1x1 convs alone, whole image, same threads.
  for (size_t i = 0; i < nb; ++i) {
    const BlockDef& d = kBlocks[i];
    const int64_t OH = m[i]->out_h(d.H);
    fused::Epilogue e;
    e.kind = fused::Epilogue::kClip, e.a = 0, e.b = 6;
    auto w1 = rnd(rng, d.ce * d.cin, 0.2f), w3 = rnd(rng, d.cout * d.ce, 0.2f);
    auto c1 = cpu::Conv1x1::create(w1.data(), d.ce, d.cin, nullptr, e);
    auto c3 = cpu::Conv1x1::create(w3.data(), d.cout, d.ce, nullptr, fused::Epilogue());
    std::vector<float> x = rnd(rng, d.H * d.H * d.cin, 1), E(d.H * d.H * d.ce),
                       D = rnd(rng, OH * OH * d.ce, 1), y(OH * OH * d.cout);
    std::vector<double> t1, t3;
    for (int it = 0; it < iters + 20; ++it) {
      auto t0 = clock::now();
      ASSERT_TRUE(c1->run(x.data(), d.H * d.H, nullptr, E.data(), threads));
      auto ta = clock::now();
      ASSERT_TRUE(c3->run(D.data(), OH * OH, nullptr, y.data(), threads));
      auto tb = clock::now();
      if (it >= 20) {
        t1.push_back(std::chrono::duration<double>(ta - t0).count() * 1e6);
        t3.push_back(std::chrono::duration<double>(tb - ta).count() * 1e6);
      }
    }
    std::sort(t1.begin(), t1.end());
    std::sort(t3.begin(), t3.end());
    const double m1 = t1[t1.size() / 2], m3 = t3[t3.size() / 2];
    std::printf(
        "features.%-2zu expand %7.1f us (%5.1f GFLOP/s)  project %7.1f us (%5.1f GFLOP/s)\n", i + 1,
        m1, 2.0 * d.H * d.H * d.cin * d.ce / m1 * 1e-3, m3,
        2.0 * OH * OH * d.ce * d.cout / m3 * 1e-3);
  }
}
