// Kiln's own NHWC 1x1 convolution (cpu_conv1x1.h; tactic "cpu.conv.onednn.kiln.conv1x1" in
// dnnl_conv.cpp), against a double-precision loop written here: odd channel counts and panel
// tails, partial row tiles, long K, batch 2, strides 2 (odd and even sizes), bias / residual
// (fresh and in place, donated) / Relu / Clip / LeakyRelu, NaN passing through, 1 and 2 threads;
// the kernel directly on every ISA this CPU has (AVX-512, AVX2) in both loop orders, and through
// the CPU backend's conv kernel with its tactic forced. A forced tactic on a conv it cannot do
// (pads) falls back to oneDNN.
// DISABLED_Bench* time it against oneDNN (by hand).
#include <gtest/gtest.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "backends/cpu/cpu_conv1x1.h"
#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_parallel.h"
#include "cpu_test_dnnl.h"
#include "kiln/logger.h"
#include "kiln/runtime.h"
#include "op_test_util.h"
#include "ops/fused/fused.h"

// oneDNN builds only: these kernels are tactics next to oneDNN's (the CUDA machine has no oneDNN).
#if KILN_TEST_HAS_DNNL

using namespace kiln;

namespace {

using test::node;

constexpr char kConv1x1[] = "cpu.conv.onednn.kiln.conv1x1";

Attribute floats_attr(const std::string& name, std::vector<float> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kFloats;
  a.floats = std::move(v);
  return a;
}

bool has_dnnl_conv() {
  Node n = node("probe", "Conv", {"x", "w"}, {"y"});
  return cpu_backend().choose_kernel(n) == "cpu.f32.conv.dnnl";
}

bool kernel_on() {
  const char* e = std::getenv("KILN_CPU_KILN_CONV1X1");
  return cpu::conv1x1_isa_available(cpu::C1Isa::kAuto) && !(e && std::string(e) == "0");
}

using test::uniform;

struct Spec {
  int64_t N = 1, H = 5, W = 7, C = 16, M = 32;
  int64_t stride = 1, pad = 0;
  bool bias = true, residual = false, in_place = false, nan = false;
  fused::Epilogue ep;
};

// y[N, OH, OW, M] = act(conv1x1(x) + b + z), NHWC, in double.
std::vector<double> reference(const Spec& s, const std::vector<float>& x,
                              const std::vector<float>& w, const std::vector<float>& b,
                              const std::vector<float>& z, bool with_act) {
  const int64_t OH = (s.H + 2 * s.pad - 1) / s.stride + 1;
  const int64_t OW = (s.W + 2 * s.pad - 1) / s.stride + 1;
  std::vector<double> y(static_cast<size_t>(s.N * OH * OW * s.M));
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t m = 0; m < s.M; ++m) {
          const int64_t ih = oh * s.stride - s.pad, iw = ow * s.stride - s.pad;
          double acc = s.bias ? b[m] : 0.0;
          if (ih >= 0 && ih < s.H && iw >= 0 && iw < s.W)
            for (int64_t c = 0; c < s.C; ++c)
              acc += double(x[((n * s.H + ih) * s.W + iw) * s.C + c]) * w[m * s.C + c];
          const size_t i = static_cast<size_t>(((n * OH + oh) * OW + ow) * s.M + m);
          if (s.residual) acc += z[i];
          if (with_act) switch (s.ep.kind) {
              case fused::Epilogue::kNone:
                break;
              case fused::Epilogue::kRelu:
                acc = acc < 0 ? 0 : acc;
                break;
              case fused::Epilogue::kClip:
                acc = acc < s.ep.a ? s.ep.a : (acc > s.ep.b ? s.ep.b : acc);
                break;
              case fused::Epilogue::kLeakyRelu:
                acc = acc < 0 ? acc * s.ep.a : acc;
                break;
            }
          y[i] = acc;
        }
  return y;
}

Node conv_node(const Spec& s, const std::string& tactic) {
  std::vector<std::string> in = {"x", "w", s.bias ? "b" : ""};
  if (s.residual) in.push_back("z");
  Node n = node("c", "FusedConv", in, {"y"}, "kiln");
  n.set_attr(test::ints_attr("pads", {s.pad, s.pad, s.pad, s.pad}));
  n.set_attr(test::ints_attr("strides", {s.stride, s.stride}));
  n.set_attr(test::ints_attr("kernel_shape", {1, 1}));
  n.set_attr(test::str_attr("layout", "NHWC"));
  switch (s.ep.kind) {
    case fused::Epilogue::kNone:
      break;
    case fused::Epilogue::kRelu:
      n.set_attr(test::str_attr("activation", "Relu"));
      break;
    case fused::Epilogue::kClip:
      n.set_attr(test::str_attr("activation", "Clip"));
      n.set_attr(floats_attr("activation_params", {s.ep.a, s.ep.b}));
      break;
    case fused::Epilogue::kLeakyRelu:
      n.set_attr(test::str_attr("activation", "LeakyRelu"));
      n.set_attr(floats_attr("activation_params", {s.ep.a}));
      break;
  }
  if (!tactic.empty()) n.set_attr(test::str_attr("kiln_tactic", tactic));
  return n;
}

constexpr double kTol = 5e-6;  // max abs error / max |conv + bias + z| (fp32 sums, C <= 1500)

// Runs s through the CPU backend's conv kernel with tactic `tactic` (the reference kernel as
// the fallback fails: an optimized kernel must run), 1 and 2 threads, against the double
// reference. Returns the worst relative error; *log gets the verbose messages.
double check(const Spec& s, const std::string& tactic = kConv1x1, uint32_t seed = 1,
             std::string* log = nullptr) {
  SCOPED_TRACE(::testing::Message()
               << "N=" << s.N << " H=" << s.H << " W=" << s.W << " C=" << s.C << " M=" << s.M
               << " stride=" << s.stride << " pad=" << s.pad << " bias=" << s.bias
               << " res=" << s.residual << " in_place=" << s.in_place
               << " act=" << int(s.ep.kind) << " nan=" << s.nan);
  const int64_t OH = (s.H + 2 * s.pad - 1) / s.stride + 1;
  const int64_t OW = (s.W + 2 * s.pad - 1) / s.stride + 1;
  auto x = uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, seed);
  if (s.nan) x[static_cast<size_t>(s.C) + 1] = std::nanf("");  // pixel 1, channel 1
  const float wr = 1.f / std::sqrt(float(s.C));
  const auto w = uniform(static_cast<size_t>(s.M * s.C), -wr, wr, seed + 1);
  const auto b = uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, seed + 2);
  const size_t yn = static_cast<size_t>(s.N * OH * OW * s.M);
  const auto z = s.residual ? uniform(yn, -1.f, 1.f, seed + 3) : std::vector<float>();
  const auto want = reference(s, x, w, b, z, true);
  double range = 1e-30;
  for (double v : reference(s, x, w, b, z, false))
    if (!std::isnan(v)) range = std::max(range, std::fabs(v));
  Tensor W = Tensor::from_vector<float>({s.M, s.C, 1, 1}, w);
  Tensor B = Tensor::from_vector<float>({s.M}, b);
  auto constants = [&](const std::string& name) -> const Tensor* {
    return name == "w" ? &W : name == "b" && s.bias ? &B : nullptr;
  };
  Node n = conv_node(s, tactic);
  auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
  EXPECT_TRUE(k.is_ok() && k.value());
  if (!k.is_ok() || !k.value()) return 1e9;
  double worst = 0;
  for (int threads : {1, 2}) {
    EXPECT_TRUE(set_cpu_threads(threads).is_ok());
    std::vector<Value> in = {Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.C}, x)), Value(W),
                             s.bias ? Value(B) : Value()};
    if (s.residual) in.push_back(Value(Tensor::from_vector<float>({s.N, OH, OW, s.M}, z)));
    const void* z_data = s.residual ? in[3].tensor.raw_data() : nullptr;
    std::vector<Value> out(1);
    OpContext ctx{n};
    if (s.in_place) ctx.donatable = uint64_t(1) << 3;
    Status st;
    {
      test::LogCapture cap;
      st = k.value()->run(ctx, in, out);
      if (log) *log += cap.text();
    }
    EXPECT_TRUE(st.is_ok()) << st.message();
    if (!st.is_ok() || !out[0].is_tensor()) return 1e9;
    const Tensor& y = out[0].tensor;
    EXPECT_EQ(y.shape(), (Shape{s.N, OH, OW, s.M}));
    if (y.numel() != static_cast<int64_t>(yn)) return 1e9;
    if (s.in_place) {
      EXPECT_EQ(y.raw_data(), z_data) << "the donated residual should hold y";
    }
    const float* yp = y.data<float>();
    double err = 0;
    for (size_t i = 0; i < yn; ++i) {
      if (std::isnan(want[i]) || std::isnan(yp[i])) {
        if (std::isnan(want[i]) != std::isnan(yp[i])) err = 1e30;
        continue;
      }
      err = std::max(err, std::fabs(double(yp[i]) - want[i]));
    }
    err /= range;
    EXPECT_LE(err, kTol) << "threads=" << threads;
    worst = std::max(worst, err);
  }
  EXPECT_TRUE(set_cpu_threads(2).is_ok());
  return worst;
}

std::vector<cpu::C1Isa> isas() {
  std::vector<cpu::C1Isa> v;
  for (cpu::C1Isa i : {cpu::C1Isa::kAvx512, cpu::C1Isa::kAvx2})
    if (cpu::conv1x1_isa_available(i)) v.push_back(i);
  return v;
}

// The kernel itself (no oneDNN): every ISA this CPU has, both loop orders, 1 and 2 threads, a
// fresh output and (with a residual) in place. Returns the worst relative error.
double check_kernel(const Spec& s, uint32_t seed = 1) {
  SCOPED_TRACE(::testing::Message() << "M=" << s.N * s.H * s.W << " C=" << s.C << " M=" << s.M
                                    << " bias=" << s.bias << " res=" << s.residual
                                    << " act=" << int(s.ep.kind));
  const int64_t OH = (s.H - 1) / s.stride + 1, OW = (s.W - 1) / s.stride + 1;
  const int64_t rows = s.N * OH * OW;
  auto x = uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, seed);
  cpu::Conv1x1::Strided st;
  st.H = s.H, st.W = s.W, st.sh = st.sw = s.stride;
  if (s.nan) x[static_cast<size_t>(s.C) + 1] = std::nanf("");
  const float wr = 1.f / std::sqrt(float(s.C));
  const auto w = uniform(static_cast<size_t>(s.M * s.C), -wr, wr, seed + 1);
  const auto b = uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, seed + 2);
  const size_t yn = static_cast<size_t>(rows * s.M);
  const auto z = s.residual ? uniform(yn, -1.f, 1.f, seed + 3) : std::vector<float>();
  const auto want = reference(s, x, w, b, z, true);
  double range = 1e-30;
  for (double v : reference(s, x, w, b, z, false))
    if (!std::isnan(v)) range = std::max(range, std::fabs(v));
  double worst = 0;
  for (cpu::C1Isa isa : isas()) {
    auto k = cpu::Conv1x1::create(w.data(), s.M, s.C, s.bias ? b.data() : nullptr, s.ep, isa);
    EXPECT_TRUE(k);
    if (!k) continue;
    for (cpu::C1Order order : {cpu::C1Order::kRowsOuter, cpu::C1Order::kPanelsOuter})
      for (int threads : {1, 2})
        for (bool in_place : {false, true}) {
          if (in_place && !s.residual) continue;
          std::vector<float> y(yn, std::nanf(""));
          if (in_place) y = z;
          const bool ran = k->run(x.data(), rows, s.residual ? (in_place ? y.data() : z.data())
                                                             : nullptr,
                                  y.data(), threads, order, s.stride > 1 ? &st : nullptr);
          EXPECT_TRUE(ran);
          if (!ran) continue;
          double err = 0;
          for (size_t i = 0; i < yn; ++i) {
            if (std::isnan(want[i]) || std::isnan(y[i])) {
              if (std::isnan(want[i]) != std::isnan(y[i])) err = 1e30;
              continue;
            }
            err = std::max(err, std::fabs(double(y[i]) - want[i]));
          }
          err /= range;
          EXPECT_LE(err, kTol) << (isa == cpu::C1Isa::kAvx512 ? "avx512" : "avx2")
                               << " order=" << int(order) << " threads=" << threads
                               << " in_place=" << in_place;
          worst = std::max(worst, err);
        }
  }
  return worst;
}

}  // namespace

TEST(KilnConv1x1Kernel, ChannelCountsTailsAndRows) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (int64_t C : {1, 3, 16, 17, 64, 100})
    for (int64_t M : {1, 7, 16, 24, 47, 48, 64, 80, 96, 144, 150, 256})
      for (int64_t rows : {1, 5, 13, 50}) {
        Spec s;
        s.H = 1, s.W = rows, s.C = C, s.M = M;
        s.residual = (C + M) % 2 == 0;
        s.ep.kind = fused::Epilogue::kRelu;
        worst = std::max(worst, check_kernel(s));
      }
  std::printf("[ conv1x1  ] kernel, channels / rows: worst rel err %.2e\n", worst);
}

// Row counts past one tile with a partial last tile of every size (6-row tiles: the last
// 1-5 rows run as their own tiles, or with the full tile before them as 4 + 3 / 4 + 4), and
// row counts whose tiles do not split evenly over the tasks.
TEST(KilnConv1x1Kernel, PartialLastTilesAndUnevenTasks) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (int64_t rows : {7, 8, 9, 10, 11, 12, 13, 14, 49, 55, 196, 785})
    for (int64_t M : {16, 40, 64})
      for (bool res : {false, true}) {
        Spec s;
        s.H = 1, s.W = rows, s.C = rows % 2 ? 33 : 8, s.M = M;
        s.residual = res, s.bias = !res;
        s.ep.kind = fused::Epilogue::kRelu;
        worst = std::max(worst, check_kernel(s, 7));
      }
  std::printf("[ conv1x1  ] kernel, partial last tiles: worst rel err %.2e\n", worst);
}

// x past 2 MB: panels outer runs x's rows in blocks, each over all panels (with small weights:
// a panel per task; with weights past 1 MB: a panel group per thread, over all blocks).
TEST(KilnConv1x1Kernel, PanelsOuterRowBlocks) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  Spec small_w;  // x 4001 x 160 floats (2.6 MB), weights 40 KB
  small_w.H = 1, small_w.W = 4001, small_w.C = 160, small_w.M = 64, small_w.residual = true;
  worst = std::max(worst, check_kernel(small_w, 11));
  Spec big_w;  // x 601 x 1100 floats (2.6 MB), weights 1.1 MB (grouped panels)
  big_w.H = 1, big_w.W = 601, big_w.C = 1100, big_w.M = 256;
  big_w.ep.kind = fused::Epilogue::kRelu;
  worst = std::max(worst, check_kernel(big_w, 12));
  std::printf("[ conv1x1  ] kernel, row blocks: worst rel err %.2e\n", worst);
}

TEST(KilnConv1x1Kernel, LongKManyRowsAndEpilogues) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  std::vector<fused::Epilogue> eps(5);
  eps[1].kind = fused::Epilogue::kRelu;
  eps[2].kind = fused::Epilogue::kClip, eps[2].a = 0.f, eps[2].b = 6.f;
  eps[3].kind = fused::Epilogue::kClip, eps[3].a = -0.3f, eps[3].b = 0.2f;
  eps[4].kind = fused::Epilogue::kLeakyRelu, eps[4].a = 0.1f;
  for (const auto& ep : eps)
    for (bool bias : {false, true})
      for (bool res : {false, true}) {
        Spec s;
        s.N = 2, s.H = 9, s.W = 11, s.C = 40, s.M = 70;
        s.ep = ep, s.bias = bias, s.residual = res;
        worst = std::max(worst, check_kernel(s, 4));
      }
  Spec longk;
  longk.H = 3, longk.W = 5, longk.C = 1500, longk.M = 60, longk.residual = true;
  worst = std::max(worst, check_kernel(longk));
  Spec many;  // many row tiles per task, weights past 1 MB (panels outer by default)
  many.H = 37, many.W = 29, many.C = 300, many.M = 1000;
  worst = std::max(worst, check_kernel(many));
  Spec nan;
  nan.nan = true, nan.ep.kind = fused::Epilogue::kClip, nan.ep.a = 0.f, nan.ep.b = 6.f;
  check_kernel(nan);
  std::printf("[ conv1x1  ] kernel, epilogues / long K / many rows: worst rel err %.2e\n", worst);
}

// An output past 4 MB (the non-temporal threshold), fresh and 64-byte aligned: stored
// non-temporally (unless KILN_CPU_CONV1X1_NT=0); in place (y = z) it is not. Both against the double loop.
TEST(KilnConv1x1Kernel, LargeOutputStreamedStores) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  const int64_t rows = 8 * 56 * 56, C = 12, M = 128;  // y: 12.8 MB
  const auto x = uniform(static_cast<size_t>(rows * C), -1.f, 1.f, 31);
  const auto w = uniform(static_cast<size_t>(M * C), -0.3f, 0.3f, 32);
  const auto b = uniform(static_cast<size_t>(M), -0.5f, 0.5f, 33);
  const auto z = uniform(static_cast<size_t>(rows * M), -1.f, 1.f, 34);
  fused::Epilogue ep;
  ep.kind = fused::Epilogue::kRelu;
  for (cpu::C1Isa isa : isas()) {
    auto k = cpu::Conv1x1::create(w.data(), M, C, b.data(), ep, isa);
    ASSERT_TRUE(k);
    for (bool res : {false, true}) {
      auto yt = Tensor::create(DataType::kFloat, {rows, M});  // 64-byte aligned
      ASSERT_TRUE(yt.is_ok());
      float* y = yt.value().data<float>();
      if (res) std::copy(z.begin(), z.end(), y);
      ASSERT_TRUE(k->run(x.data(), rows, res ? y : nullptr, y, 2));
      double err = 0, range = 1e-30;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t m = 0; m < M; ++m) {
          double acc = b[m] + (res ? z[r * M + m] : 0.0);
          for (int64_t c = 0; c < C; ++c) acc += double(x[r * C + c]) * w[m * C + c];
          range = std::max(range, std::fabs(acc));
          acc = acc < 0 ? 0 : acc;
          err = std::max(err, std::fabs(acc - y[r * M + m]));
        }
      EXPECT_LE(err / range, kTol) << (isa == cpu::C1Isa::kAvx512 ? "avx512" : "avx2")
                                   << " residual=" << res;
    }
  }
}

TEST(KilnConv1x1Kernel, Strided) {
  if (isas().empty()) GTEST_SKIP() << "no AVX2/AVX-512";
  double worst = 0;
  for (auto [N, H, W] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 1}, {1, 7, 7}, {2, 8, 6}, {1, 13, 11}, {2, 28, 28}})
    for (int64_t stride : {2, 3})
      for (auto [C, M] : std::vector<std::pair<int64_t, int64_t>>{{16, 40}, {256, 96}}) {
        Spec s;
        s.N = N, s.H = H, s.W = W, s.C = C, s.M = M, s.stride = stride;
        s.residual = C == 16;
        worst = std::max(worst, check_kernel(s));
      }
  std::printf("[ conv1x1  ] kernel, strided: worst rel err %.2e\n", worst);
}

// Every task runs once, in order within a thread's contiguous share; a failing task fails the
// call.
TEST(KilnConv1x1Kernel, StaticTasksRunEachOnce) {
  for (int threads : {1, 2, 3})
    for (int64_t n : {0, 1, 2, 3, 7, 100}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      for (auto& h : hits) h = 0;
      auto fn = [](void* c, int64_t i) {
        (*static_cast<std::vector<std::atomic<int>>*>(c))[static_cast<size_t>(i)]++;
        return i != 5;
      };
      const bool ok = cpu::parallel_tasks_static(n, threads, fn, &hits);
      EXPECT_EQ(ok, n <= 5) << "n=" << n << " threads=" << threads;
      for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<size_t>(i)].load(), 1) << i;
    }
}

// A region with fewer tasks than threads still runs on the whole team: libgomp ends the pool
// threads a smaller team leaves out and starts new ones at the next full region (their
// thread-local scratch then allocated and faulted in again at every model run; 16 Xeon threads,
// MobileNetV2 with 4-task regions: 18 ms a run against 1.4). The threads of a full region after
// a small one are the threads of the full region before it.
TEST(KilnConv1x1Kernel, SmallTaskCountsKeepThePoolThreads) {
  if (cpu::omp_threads() <= 1) GTEST_SKIP() << "no OpenMP runtime loaded";
  const int before = cpu::omp_threads();
  ASSERT_TRUE(set_cpu_threads(4).is_ok());
  struct Seen {
    std::mutex mu;
    std::vector<long> tids;
  };
  auto record = [](void* c, int64_t) {
    auto* s = static_cast<Seen*>(c);
    const long tid = static_cast<long>(syscall(SYS_gettid));
    std::lock_guard<std::mutex> lock(s->mu);
    s->tids.push_back(tid);
    return true;
  };
  auto full = [&] {
    Seen s;
    EXPECT_TRUE(cpu::parallel_tasks_static(4, 4, record, &s));
    std::sort(s.tids.begin(), s.tids.end());
    return s.tids;
  };
  const std::vector<long> first = full();
  ASSERT_EQ(first.size(), 4u);
  for (int round = 0; round < 3; ++round) {
    Seen small;
    EXPECT_TRUE(cpu::parallel_tasks_static(2, 4, record, &small));
    EXPECT_TRUE(cpu::parallel_tasks(2, 4, record, &small));
    EXPECT_EQ(small.tids.size(), 4u);
    EXPECT_EQ(full(), first) << "round " << round << ": the pool's threads were replaced";
  }
  ASSERT_TRUE(set_cpu_threads(before).is_ok());
}

TEST(KilnConv1x1Kernel, RefusesWhatItCannotDo) {
  std::vector<float> w(16, 0.5f), x(16, 1.f), y(16, 0.f);
  fused::Epilogue bad;
  bad.kind = fused::Epilogue::kClip, bad.a = 1.f, bad.b = 0.f;  // min > max
  EXPECT_FALSE(cpu::Conv1x1::create(w.data(), 4, 4, nullptr, bad));
  EXPECT_FALSE(cpu::Conv1x1::create(w.data(), 0, 4, nullptr, fused::Epilogue()));
  EXPECT_FALSE(cpu::Conv1x1::create(nullptr, 4, 4, nullptr, fused::Epilogue()));
  if (isas().empty()) return;
  auto k = cpu::Conv1x1::create(w.data(), 4, 4, nullptr, fused::Epilogue());
  ASSERT_TRUE(k);
  EXPECT_FALSE(k->run(x.data(), 0, nullptr, y.data(), 1));
  EXPECT_FALSE(k->run(nullptr, 4, nullptr, y.data(), 1));
  cpu::Conv1x1::Strided st;  // 3 x 3 at stride 2: 4 output pixels per image, not 3
  st.H = st.W = 3, st.sh = st.sw = 2;
  EXPECT_FALSE(k->run(x.data(), 3, nullptr, y.data(), 1, cpu::C1Order::kAuto, &st));
}

TEST(KilnConv1x1, ChannelCountsAndTails) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  double worst = 0;
  for (int64_t C : {1, 3, 16, 17, 33, 100})
    for (int64_t M : {1, 5, 47, 48, 49, 97, 130}) {
      Spec s;
      s.C = C, s.M = M;
      worst = std::max(worst, check(s));
    }
  std::printf("[ conv1x1  ] channels: worst rel err %.2e (%s)\n", worst,
              kernel_on() ? "kiln conv1x1" : "oneDNN default");
}

TEST(KilnConv1x1, SpatialSizesBatchAndLongK) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  double worst = 0;
  for (auto [N, H, W] : std::vector<std::array<int64_t, 3>>{
           {1, 1, 1}, {1, 7, 7}, {2, 3, 5}, {1, 13, 11}, {2, 20, 17}, {1, 56, 9}}) {
    Spec s;
    s.N = N, s.H = H, s.W = W, s.C = 24, s.M = 40;
    worst = std::max(worst, check(s));
  }
  Spec longk;  // K > 1024: two K blocks, the tile goes back to y between them
  longk.H = 3, longk.W = 5, longk.C = 1500, longk.M = 60;
  longk.residual = true, longk.ep.kind = fused::Epilogue::kRelu;
  worst = std::max(worst, check(longk));
  longk.in_place = true;
  worst = std::max(worst, check(longk));
  Spec tall;  // rows past one M block
  tall.H = 40, tall.W = 41, tall.C = 600, tall.M = 50;
  worst = std::max(worst, check(tall));
  std::printf("[ conv1x1  ] spatial / long K: worst rel err %.2e\n", worst);
}

TEST(KilnConv1x1, EpilogueBiasResidualActivation) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  double worst = 0;
  std::vector<fused::Epilogue> eps(5);
  eps[1].kind = fused::Epilogue::kRelu;
  eps[2].kind = fused::Epilogue::kClip, eps[2].a = 0.f, eps[2].b = 6.f;
  eps[3].kind = fused::Epilogue::kClip, eps[3].a = -0.3f, eps[3].b = 0.2f;
  eps[4].kind = fused::Epilogue::kLeakyRelu, eps[4].a = 0.1f;
  for (const auto& ep : eps)
    for (bool bias : {false, true})
      for (int res = 0; res < 3; ++res) {
        Spec s;
        s.N = 2, s.H = 7, s.W = 7, s.C = 40, s.M = 70;
        s.ep = ep, s.bias = bias, s.residual = res > 0, s.in_place = res == 2;
        worst = std::max(worst, check(s, kConv1x1, 5));
      }
  std::printf("[ conv1x1  ] epilogues: worst rel err %.2e\n", worst);
}

TEST(KilnConv1x1, NanPassesThroughActivations) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  // (oneDNN's Relu / Clip, which the tactic loads as otherwise, turn NaN into a number.)
  if (!kernel_on()) GTEST_SKIP() << "Kiln's 1x1 conv off or not on this CPU";
  for (auto kind : {fused::Epilogue::kRelu, fused::Epilogue::kClip}) {
    Spec s;
    s.nan = true, s.ep.kind = kind, s.ep.a = 0.f, s.ep.b = 6.f;
    check(s);
  }
}

// A forced conv1x1 tactic on a conv it cannot do (pads) runs oneDNN's default (logged) and
// matches; where it can (stride 1 or 2), it runs (nothing logged).
TEST(KilnConv1x1, UnsupportedGeometryFallsBack) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec padded;
  padded.H = 9, padded.W = 8, padded.pad = 1;
  std::string log;
  check(padded, kConv1x1, 3, &log);
  EXPECT_NE(log.find("implementation kiln.conv1x1 not available here"), std::string::npos) << log;
  if (kernel_on()) {
    for (int64_t stride : {1, 2}) {
      Spec s;
      s.N = 2, s.H = 9, s.W = 8, s.stride = stride, s.residual = true, s.in_place = true;
      s.ep.kind = fused::Epilogue::kRelu;
      log.clear();
      check(s, kConv1x1, 3, &log);
      EXPECT_EQ(log.find("not available"), std::string::npos) << log;
    }
  }
}

// Tuning (kiln_tune_shape) offers the kernel for 1x1 NHWC convs, stride 1 or 2, where this CPU
// runs it.
TEST(KilnConv1x1, TuningOffersItWhereItApplies) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  for (int64_t stride : {1, 2}) {
    Spec s;
    s.H = 14, s.W = 14, s.C = 64, s.M = 96, s.stride = stride;
    s.ep.kind = fused::Epilogue::kClip, s.ep.a = 0.f, s.ep.b = 6.f;
    Node n = conv_node(s, "");
    n.set_attr(test::ints_attr("kiln_tune_shape", {s.N, s.H, s.W, s.C}));
    const auto w = uniform(static_cast<size_t>(s.M * s.C), -0.1f, 0.1f, 9);
    const auto b = uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, 10);
    Tensor W = Tensor::from_vector<float>({s.M, s.C, 1, 1}, w);
    Tensor B = Tensor::from_vector<float>({s.M}, b);
    auto constants = [&](const std::string& name) -> const Tensor* {
      return name == "w" ? &W : name == "b" ? &B : nullptr;
    };
    std::string log;
    {
      test::LogCapture cap;
      auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
      ASSERT_TRUE(k.is_ok() && k.value());
      log = cap.text();
    }
    // Timed ("kiln.conv1x1=<ms>"), or alone under KILN_CPU_KILN_CONV1X1=force.
    const bool offered = log.find("kiln.conv1x1") != std::string::npos;
    EXPECT_EQ(offered, kernel_on()) << log;
  }
}

// Micro benchmark (by hand, OMP_NUM_THREADS=2): MobileNetV2 / ResNet-50 1x1 shapes, oneDNN's
// default vs Kiln's conv1x1, interleaved, median of each. CONV1X1_N: batch (1); CONV1X1_RESIDUAL=1:
// a donated residual; CONV1X1_COLD=1: 64 MB streamed through the caches before each run;
// CONV1X1_ONLY="H,C,M": one shape; CONV1X1_ITERS (50).
TEST(KilnConv1x1, DISABLED_Bench) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  const int iters = std::getenv("CONV1X1_ITERS") ? std::atoi(std::getenv("CONV1X1_ITERS")) : 50;
  const bool residual = std::getenv("CONV1X1_RESIDUAL") != nullptr;
  struct Shp {
    int64_t H, C, M;
  };
  const char* only = std::getenv("CONV1X1_ONLY");  // "H,C,M": that shape alone
  for (Shp sh : std::vector<Shp>{{112, 16, 96},
                                 {56, 24, 144},
                                 {56, 144, 24},
                                 {28, 32, 192},
                                 {28, 192, 32},
                                 {14, 64, 384},
                                 {14, 384, 64},
                                 {14, 96, 576},
                                 {14, 576, 96},
                                 {7, 160, 960},
                                 {7, 960, 160},
                                 {7, 960, 320},
                                 {7, 320, 1280},
                                 {56, 64, 256},
                                 {56, 256, 64},
                                 {56, 256, 128},
                                 {28, 512, 128},
                                 {28, 128, 512},
                                 {14, 1024, 256},
                                 {14, 256, 1024},
                                 {28, 256, 512},
                                 {14, 512, 1024},
                                 {28, 512, 256},
                                 {14, 1024, 512},
                                 {7, 1024, 2048},
                                 {7, 2048, 512},
                                 {7, 512, 2048}}) {
    const std::string name =
        std::to_string(sh.H) + "," + std::to_string(sh.C) + "," + std::to_string(sh.M);
    if (only && name != only) continue;
    Spec s;
    s.N = std::getenv("CONV1X1_N") ? std::atoi(std::getenv("CONV1X1_N")) : 1;
    s.H = s.W = sh.H, s.C = sh.C, s.M = sh.M, s.residual = residual;
    s.ep.kind = fused::Epilogue::kClip, s.ep.a = 0.f, s.ep.b = 6.f;
    const auto w = uniform(static_cast<size_t>(s.M * s.C), -0.1f, 0.1f, 9);
    const auto b = uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, 10);
    Tensor W = Tensor::from_vector<float>({s.M, s.C, 1, 1}, w);
    Tensor B = Tensor::from_vector<float>({s.M}, b);
    Tensor X = Tensor::from_vector<float>(
        {s.N, s.H, s.W, s.C}, uniform(static_cast<size_t>(s.N * s.H * s.W * s.C), -1.f, 1.f, 11));
    const size_t yn = static_cast<size_t>(s.N * s.H * s.W * s.M);
    auto constants = [&](const std::string& name) -> const Tensor* {
      return name == "w" ? &W : name == "b" ? &B : nullptr;
    };
    std::vector<std::string> tactics = {"cpu.conv.onednn.", kConv1x1};
    std::vector<Node> nodes;
    std::vector<std::shared_ptr<const Kernel>> kernels;
    for (const auto& t : tactics) nodes.push_back(conv_node(s, t));
    for (Node& n : nodes) {
      auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
      ASSERT_TRUE(k.is_ok() && k.value());
      kernels.push_back(k.value());
    }
    std::vector<char> trash(std::getenv("CONV1X1_COLD") ? (64 << 20) : 0);
    std::vector<std::vector<double>> times(kernels.size());
    for (int it = -3; it < iters; ++it)
      for (size_t i = 0; i < kernels.size(); ++i) {
        for (size_t j = 0; j < trash.size(); j += 64) trash[j]++;
        if (std::getenv("CONV1X1_COLD_X")) cpu::evict_from_cache(X.data<float>(), X.nbytes());
        OpContext ctx{nodes[i]};
        std::vector<Value> in = {Value(X), Value(W), Value(B)}, out(1);
        if (residual) {  // a fresh Z each run, donated: the conv sums into it in place
          in.push_back(Value(Tensor::from_vector<float>({s.N, s.H, s.W, s.M},
                                                        std::vector<float>(yn, 0.5f))));
          ctx.donatable = uint64_t(1) << 3;
        }
        const auto t0 = std::chrono::steady_clock::now();
        Status st = kernels[i]->run(ctx, in, out);
        const double ms =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e3;
        ASSERT_TRUE(st.is_ok()) << st.message();
        if (it >= 0) times[i].push_back(ms);
      }
    std::printf("[ bench    ] %3ldx%-3ld %4ld->%-4ld:", long(s.H), long(s.W), long(s.C),
                long(s.M));
    for (size_t i = 0; i < kernels.size(); ++i) {
      std::sort(times[i].begin(), times[i].end());
      std::printf("  %s=%.4fms", i == 0 ? "onednn" : "kiln", times[i][times[i].size() / 2]);
    }
    std::printf("\n");
  }
}

// Per-call overhead (by hand): a tiny NHWC 1x1 conv (1x1 pixel, 16 -> 16), oneDNN's default vs
// Kiln's GEMM: what a call costs beyond its arithmetic.
TEST(KilnConv1x1, DISABLED_BenchCallOverhead) {
  if (!has_dnnl_conv()) GTEST_SKIP() << "no oneDNN convolution in this build";
  Spec s;
  s.H = s.W = 1, s.C = s.M = 16;
  const auto w = uniform(static_cast<size_t>(s.M * s.C), -0.1f, 0.1f, 9);
  const auto b = uniform(static_cast<size_t>(s.M), -0.5f, 0.5f, 10);
  Tensor W = Tensor::from_vector<float>({s.M, s.C, 1, 1}, w);
  Tensor B = Tensor::from_vector<float>({s.M}, b);
  Tensor X = Tensor::from_vector<float>({1, 1, 1, s.C}, uniform(16, -1.f, 1.f, 11));
  auto constants = [&](const std::string& name) -> const Tensor* {
    return name == "w" ? &W : name == "b" ? &B : nullptr;
  };
  for (const std::string t : {"cpu.conv.onednn.", kConv1x1}) {
    Node n = conv_node(s, t);
    auto k = cpu::prepare_dnnl_conv(n, constants, &test::fail_ref);
    ASSERT_TRUE(k.is_ok() && k.value());
    std::vector<double> times;
    const int n_it = std::getenv("OVH_ITERS") ? std::atoi(std::getenv("OVH_ITERS")) : 2000;
    for (int it = 0; it < n_it; ++it) {
      OpContext ctx{n};
      std::vector<Value> in = {Value(X), Value(W), Value(B)}, out(1);
      const auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(k.value()->run(ctx, in, out).is_ok());
      times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    std::printf("[ bench    ] call overhead %s: median %.2f us, p10 %.2f us\n", t.c_str(),
                times[times.size() / 2] * 1e6, times[times.size() / 10] * 1e6);
  }
}

#endif  // KILN_TEST_HAS_DNNL
