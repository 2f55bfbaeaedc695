// ResNet-50 batch-1 work on the CPU conv tactics (dnnl_conv.cpp, cpu_conv1x1.cpp), against
// double-precision loops written here:
// - Kiln's 1x1 conv with big packed weights (1 MB up) runs panels outer as one contiguous group
//   of panels per thread (each prefetching the next of its group): results on every ISA this
//   CPU has (AVX-512, AVX2), 1, 2 and 3 threads, panel counts the thread count divides and not,
//   fresh output and residual in place.
// - Tuning with big weights times every candidate with its weights flushed from the caches
//   first: a 1x1 and a 3x3 (Winograd candidates: Kiln's keeps U or streams the weights) conv
//   are tuned, report timed candidates, and their chosen kernel matches the reference.
// - Kiln's Winograd in streamed mode runs its (panel, tile block) tasks in a static order, each
//   panel's last weight block prefetching the next panel's first: several panels, tile blocks
//   and input-channel blocks, both ISAs, 1-3 threads, against the reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cpu_test_dnnl.h"

#include "backends/cpu/cpu_conv1x1.h"
#include "backends/cpu/cpu_winograd.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "ops/fused/fused.h"

#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

using test::uniform;

// y[n, oh, ow, m] = relu(sum x[n, ih, iw, c] w[m, c, r, s] + b[m] (+ z)), NHWC, stride 1, pads
// (R - 1) / 2, in double; *range: max |pre-activation|.
std::vector<double> conv_ref(const std::vector<float>& x, int64_t N, int64_t H, int64_t W,
                             int64_t C, const std::vector<float>& w, int64_t M, int64_t R,
                             const std::vector<float>& b, const std::vector<float>* z,
                             double* range) {
  const int64_t p = (R - 1) / 2;
  std::vector<double> y(static_cast<size_t>(N * H * W * M));
  *range = 1e-30;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < H; ++oh)
      for (int64_t ow = 0; ow < W; ++ow)
        for (int64_t m = 0; m < M; ++m) {
          double acc = b[static_cast<size_t>(m)];
          for (int64_t r = 0; r < R; ++r)
            for (int64_t s = 0; s < R; ++s) {
              const int64_t ih = oh - p + r, iw = ow - p + s;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              const float* xp = x.data() + ((n * H + ih) * W + iw) * C;
              const float* wp = w.data() + (m * C) * R * R + r * R + s;
              for (int64_t c = 0; c < C; ++c) acc += double(xp[c]) * wp[c * R * R];
            }
          const size_t i = static_cast<size_t>(((n * H + oh) * W + ow) * M + m);
          if (z) acc += (*z)[i];
          *range = std::max(*range, std::fabs(acc));
          y[i] = acc < 0 ? 0 : acc;
        }
  return y;
}

double max_rel_err(const float* y, const std::vector<double>& want, double range) {
  double err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(y[i])) return 1e30;
    err = std::max(err, std::fabs(double(y[i]) - want[i]));
  }
  return err / range;
}

constexpr double kTol = 5e-6;
constexpr double kWinoTol = 3e-5;  // Winograd (Kiln's or oneDNN's) rounds worse

bool has_dnnl_conv() {
  Node n = test::node("probe", "Conv", {"x", "w"}, {"y"});
  return cpu_backend().choose_kernel(n) == "cpu.f32.conv.dnnl";
}

}  // namespace

// Big packed weights: the grouped panel order (one group of panels per thread) on 1-3 threads,
// against the reference; counts of panels the thread count divides (grouped) and not (a panel
// per task).
TEST(KilnConv1x1Grouped, BigWeightsMatchReference) {
  if (!cpu::conv1x1_isa_available(cpu::C1Isa::kAuto)) GTEST_SKIP() << "no AVX2/AVX-512";
  struct Case {
    int64_t rows, K, N;
    bool residual;
  };
  // 7x7 2048 -> 512 and 512 -> 2048 (ResNet-50 layer4 at batch 1), 14x14 1024 -> 256, and
  // 1.5 MB of weights in 6 panels (AVX-512) / 3 panels of 48 channels (not divisible by 2).
  for (const Case& cs : {Case{49, 2048, 512, false}, Case{49, 512, 2048, true},
                         Case{196, 1024, 256, false}, Case{23, 1024, 384, true},
                         Case{30, 2048, 144, false}}) {
    SCOPED_TRACE(::testing::Message() << "rows=" << cs.rows << " K=" << cs.K << " N=" << cs.N);
    const auto x = uniform(static_cast<size_t>(cs.rows * cs.K), -1.f, 1.f, 1);
    const float wr = 1.f / std::sqrt(float(cs.K));
    const auto w = uniform(static_cast<size_t>(cs.N * cs.K), -wr, wr, 2);
    const auto b = uniform(static_cast<size_t>(cs.N), -0.5f, 0.5f, 3);
    const size_t yn = static_cast<size_t>(cs.rows * cs.N);
    const auto z = cs.residual ? uniform(yn, -1.f, 1.f, 4) : std::vector<float>();
    double range = 0;
    const auto want = conv_ref(x, 1, cs.rows, 1, cs.K, w, cs.N, 1, b,
                               cs.residual ? &z : nullptr, &range);
    fused::Epilogue ep;
    ep.kind = fused::Epilogue::kRelu;
    for (cpu::C1Isa isa : {cpu::C1Isa::kAvx512, cpu::C1Isa::kAvx2}) {
      if (!cpu::conv1x1_isa_available(isa)) continue;
      auto k = cpu::Conv1x1::create(w.data(), cs.N, cs.K, b.data(), ep, isa);
      ASSERT_TRUE(k);
      EXPECT_GE(k->packed_bytes(), int64_t(1) << 20);
      for (int threads : {1, 2, 3})
        for (bool in_place : {false, true}) {
          if (in_place && !cs.residual) continue;
          std::vector<float> y(yn, std::nanf(""));
          if (in_place) y = z;
          ASSERT_TRUE(k->run(x.data(), cs.rows,
                             cs.residual ? (in_place ? y.data() : z.data()) : nullptr, y.data(),
                             threads, cpu::C1Order::kPanelsOuter));
          EXPECT_LE(max_rel_err(y.data(), want, range), kTol)
              << (isa == cpu::C1Isa::kAvx512 ? "avx512" : "avx2") << " threads=" << threads
              << " in_place=" << in_place;
        }
    }
  }
}

TEST(KilnWinogradStreamed, StaticOrderMatchesReference) {
  if (!cpu::winograd_isa_available(cpu::WinoIsa::kAuto)) GTEST_SKIP() << "no AVX2/AVX-512";
  struct Case {
    int64_t N, H, C, M;
  };
  // 600 input channels: several blocks of U made per task; 100 and 520 output channels: several
  // panels (the last partial); 2 x 40 x 40: several tile blocks.
  for (const Case& cs : {Case{1, 7, 600, 100}, Case{2, 40, 64, 520}, Case{1, 14, 256, 256}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << cs.N << " H=W=" << cs.H << " C=" << cs.C
                                      << " M=" << cs.M);
    const auto x = uniform(static_cast<size_t>(cs.N * cs.H * cs.H * cs.C), -1.f, 1.f, 11);
    const float wr = 1.f / std::sqrt(float(9 * cs.C));
    const auto w = uniform(static_cast<size_t>(cs.M * cs.C * 9), -wr, wr, 12);
    const auto b = uniform(static_cast<size_t>(cs.M), -0.5f, 0.5f, 13);
    double range = 0;
    const auto want = conv_ref(x, cs.N, cs.H, cs.H, cs.C, w, cs.M, 3, b, nullptr, &range);
    fused::Epilogue ep;
    ep.kind = fused::Epilogue::kRelu;
    for (cpu::WinoIsa isa : {cpu::WinoIsa::kAvx512, cpu::WinoIsa::kAvx2}) {
      if (!cpu::winograd_isa_available(isa)) continue;
      auto k = cpu::WinogradConv::create(w.data(), cs.M, cs.C, b.data(), ep, isa);
      ASSERT_TRUE(k);
      for (int threads : {1, 2, 3}) {
        std::vector<float> y(want.size(), std::nanf(""));
        ASSERT_TRUE(k->run(x.data(), cs.N, cs.H, cs.H, 1, 1, 1, 1, nullptr, y.data(), threads,
                           cpu::WinoMode::kStreamed));
        // F(4x4, 3x3) rounds worse than a direct conv: ~1e-5 of the range at C = 256.
        EXPECT_LE(max_rel_err(y.data(), want, range), kWinoTol)
            << (isa == cpu::WinoIsa::kAvx512 ? "avx512" : "avx2") << " threads=" << threads;
      }
    }
  }
}

// Tuning a conv with big weights (cold timing): candidates are timed and reported, and the
// kernel it chose matches the reference on 1 and 2 threads. A 1x1 (1 MB) and a 3x3 (5.3 MB;
// Winograd candidates, Kiln's streaming its weights at 7x7 and keeping U at 28x28).
TEST(ColdWeightTuning, BigWeightConvsTunedAndCorrect) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  struct Case {
    int64_t H, C, M, R;
  };
  for (const Case& cs : {Case{7, 1024, 256, 1}, Case{7, 384, 384, 3}, Case{28, 384, 384, 3}}) {
    SCOPED_TRACE(::testing::Message() << "H=W=" << cs.H << " C=" << cs.C << " M=" << cs.M
                                      << " R=" << cs.R);
    const int64_t N = 1, H = cs.H, C = cs.C, M = cs.M, R = cs.R;
    const auto x = uniform(static_cast<size_t>(N * H * H * C), -1.f, 1.f, 5);
    const float wr = 1.f / std::sqrt(float(C * R * R));
    const auto w = uniform(static_cast<size_t>(M * C * R * R), -wr, wr, 6);
    const auto b = uniform(static_cast<size_t>(M), -0.5f, 0.5f, 7);
    double range = 0;
    const auto want = conv_ref(x, N, H, H, C, w, M, R, b, nullptr, &range);
    Tensor Wt = Tensor::from_vector<float>({M, C, R, R}, w);
    Tensor Bt = Tensor::from_vector<float>({M}, b);
    auto constants = [&](const std::string& name) -> const Tensor* {
      return name == "w" ? &Wt : name == "b" ? &Bt : nullptr;
    };
    Node n = test::node("c", "FusedConv", {"x", "w", "b"}, {"y"}, "kiln");
    const int64_t p = (R - 1) / 2;
    n.set_attr(test::ints_attr("pads", {p, p, p, p}));
    n.set_attr(test::ints_attr("strides", {1, 1}));
    n.set_attr(test::ints_attr("kernel_shape", {R, R}));
    n.set_attr(test::str_attr("layout", "NHWC"));
    n.set_attr(test::str_attr("activation", "Relu"));
    n.set_attr(test::ints_attr("kiln_tune_shape", {N, H, H, C}));
    std::string log;
    Result<std::shared_ptr<const Kernel>> k = std::shared_ptr<const Kernel>();
    {
      test::LogCapture cap;
      k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
      log = cap.text();
    }
    ASSERT_TRUE(k.is_ok() && k.value());
    EXPECT_NE(log.find("ms"), std::string::npos) << "candidates timed: " << log;
    const std::string tactic = k.value()->tactic();
    EXPECT_EQ(tactic.rfind("cpu.conv.onednn.", 0), 0u) << tactic;
    for (int threads : {1, 2}) {
      ASSERT_TRUE(set_cpu_threads(threads).is_ok());
      std::vector<Value> in = {Value(Tensor::from_vector<float>({N, H, H, C}, x)), Value(Wt),
                               Value(Bt)};
      std::vector<Value> out(1);
      OpContext ctx{n};
      Status st = k.value()->run(ctx, in, out);
      ASSERT_TRUE(st.is_ok()) << st.message();
      ASSERT_TRUE(out[0].is_tensor());
      const Tensor& y = out[0].tensor;
      ASSERT_EQ(y.shape(), (Shape{N, H, H, M}));
      // Winograd rounds a little worse than a direct conv (dnnl_conv.cpp: ~6e-7 of the range).
      EXPECT_LE(max_rel_err(y.data<float>(), want, range), kWinoTol)
          << "tactic " << tactic << " threads=" << threads;
    }
    EXPECT_TRUE(set_cpu_threads(2).is_ok());
  }
}

#endif  // KILN_TEST_HAS_DNNL
