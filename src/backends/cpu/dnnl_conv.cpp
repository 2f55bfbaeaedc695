// oneDNN 2D convolution (f32) for Conv and kiln.FusedConv: bias, residual sum and activation as
// post-ops. NCHW in and out; inside, oneDNN picks its own (blocked) layouts and we reorder at the
// edges. Weights are reordered once per input shape, at first use, and kept. A residual Z the
// executor donates (OpContext::donatable) becomes the output: the sum post-op accumulates into
// Z's buffer instead of a fresh copy of it.
// Tactics: oneDNN offers several implementations per convolution (brgconv, jit, gemm, ...). With
// `kiln_tune_shape` and no `kiln_tactic`, prepare times each (round robin, best of a few runs on
// random data, user-layout reorders included) and reports the fastest as
// "cpu.conv.onednn.<impl>"; with `kiln_tactic` it takes that one without timing, or oneDNN's
// default where this machine lacks it.
// Winograd: where oneDNN offers algorithm::convolution_winograd (3x3, stride 1, no groups or
// dilation; post-ops sum and relu, not clip; AVX-512 only in oneDNN 2.6) its implementations
// are candidates too, as "cpu.conv.onednn.wino.<impl>" (jit_wino_4x3, jit_fp32_wino_2x3: names
// that exist only under winograd, prefixed anyway so that load knows which algorithm to ask
// for). They need oneDNN's blocked activations: reordered at the edges, and timed with them.
// fp32 winograd rounds worse than a direct conv, still small: ~6e-7 (4x3) and ~3e-7 (2x3) of
// the output range per layer against a double-precision reference; ResNet-50 logits stay at
// ~2e-6 of ORT's, as with direct convs (the bench accepts 1e-3), so no shape is excluded. A wino
// tactic this machine cannot build (no AVX-512, another shape) loads as the default direct
// conv. KILN_CPU_WINOGRAD=0: no winograd candidates, and wino tactics load as the default
// direct conv (A/B on one plan).
// Kiln's own Winograd F(4x4, 3x3) (cpu_winograd.h): NHWC in and out, so no reorders, with bias,
// residual and activation in its output transform. For NHWC convs with a 3x3 kernel, stride 1,
// no dilation, one group and pads <= 2 it is one more candidate, "kiln.wino4x3" (tactic
// "cpu.conv.onednn.kiln.wino4x3"), timed with the same harness. Its weights are packed (and,
// where it keeps U, transformed) once per kernel, at its first plan. Where it cannot run (no
// AVX2/AVX-512, another shape, or KILN_CPU_KILN_WINO=0) the tactic loads as oneDNN's default
// direct conv. KILN_CPU_KILN_WINO=force: tuning takes it wherever it applies, untimed (A/B in a
// whole model). Zen 5, 2 threads, ResNet-50 b1 in the model (oneDNN's choice -> Kiln's):
// 56x56x64 0.30 -> 0.17 ms, 28x28x128 0.32 -> 0.15, 14x14x256 0.37 -> 0.26; 7x7x512 ~0.55 either
// way (weight-bandwidth bound; timing decides).
// Kiln's own stride-2 Winograd (WinogradS2Conv, cpu_winograd.h: polyphase, F(4, 2) on the even
// taps): for NHWC 3x3 convs with stride 2, no dilation, one group and pads <= 2 (ResNet v1.5's
// downsampling 3x3s) one more candidate, "kiln.wino4x3s2" (tactic
// "cpu.conv.onednn.kiln.wino4x3s2"), timed with the same harness (its U is 4x the weights: where
// that is 1 MB up it is timed cold, as the others). Where it cannot run (KILN_CPU_KILN_WINO_S2=0,
// another shape, no AVX2) the tactic loads as oneDNN's default; =force: tuning takes it wherever
// it applies, untimed. Zen 5, 2 threads, tuned (brgconv -> Kiln's): ResNet-50 b1 layer2.0.conv2
// 0.46 -> 0.33 ms (layer3.0 / 4.0 stay on brgconv: 0.46 vs 0.55, 0.58 vs 0.67, weights from
// memory); b8 layer2.0 4.1 -> 3.0, layer3.0 3.7 -> 3.5, layer4.0 4.4 -> 4.0. One plan each,
// KILN_CPU_KILN_WINO_S2=0 A/B alternating on a shared machine: b8 117.2-119.3 vs 120.2-122.1 ms
// (3 pairs), b1 14.7-15.1 vs 15.0-15.3 ms (4 pairs).
// Kiln's own 1x1 conv (cpu_conv1x1.h, AVX-512 / AVX2): for NHWC 1x1 convs with no pads and one
// group, Y[N*OH*OW, M] = act(X[N*OH*OW, C] * W^T + bias + Z) with the epilogue in registers,
// weights packed once (at its first plan); strided ones (ResNet's downsampling) gather their
// input rows. One more candidate, "kiln.conv1x1" (tactic "cpu.conv.onednn.kiln.conv1x1"),
// timed with the same harness; where it cannot run it loads as oneDNN's default.
// KILN_CPU_KILN_CONV1X1=0: never (and such tactics load as oneDNN's default: A/B on one plan);
// =force: tuning takes it wherever it applies, untimed. Zen 5, 2 threads, one plan with and
// without: ResNet-50 b8 123 -> 113 ms (the bottleneck expansions with their residual, 26 MB
// each at 56x56: brgconv_1x1 3.4 ms, Kiln's 2.0), b1 and MobileNetV2 b1 unchanged (oneDNN is
// kept for most of their 1x1 convs).
// Timing a conv with a residual: the output starts as a copy of Z, made before the clock starts
// (in a model the executor donates Z: no candidate pays a copy there).
// Timing a conv with big weights (1 MB up, in the layout the candidate reads): each run starts
// with them flushed from the caches, as in a model whose weights outgrow L3 (ResNet-50: ~100 MB,
// so at batch 1 every conv reads its weights from memory). Warm, candidates that differ in how
// they hide that tie, and the choice was a coin toss: Zen 5, 2 threads, ResNet-50 7x7 2048 ->
// 512, cold 0.237 ms (Kiln's 1x1 conv) vs 0.261 (brgconv_1x1), warm both ~0.22. ResNet-50 b1,
// plans tuned cold vs warm (KILN_CPU_TUNE_COLD=0), same binary, 5 alternating pairs on a busy
// machine: 17.27-17.80 vs 17.48-18.38 ms; b8 unchanged within noise.
// Weights in oneDNN's layout live in alloc_weight_floats buffers (cpu_gemm.h): from 2 MB up on
// huge pages, as Kiln's own kernels' packed weights. At batch 1 the weights stream from memory
// at every run (~100 MB for ResNet-50, past L3): Zen 5, 2 threads, KILN_CPU_HUGE_PAGES=0 A/B on
// one plan, layer4's convs 5-12% faster, the whole b1 run ~3%; b8 unchanged.
#include "backends/cpu/cpu_conv1x1.h"
#include "backends/cpu/cpu_gemm.h"
#include "backends/cpu/cpu_kernels.h"
#include "backends/cpu/cpu_parallel.h"
#include "backends/cpu/cpu_small_ops.h"
#include "backends/cpu/cpu_winograd.h"
#include "backends/cpu/weight_pages.h"

#if KILN_WITH_DNNL
#include <malloc.h>

#include <cstdlib>
#include <limits>
#include <new>
#include <cstring>
#include <string>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>
#include <map>
#include <mutex>
#include <unordered_map>

#include <dnnl.hpp>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "base/logging.h"
#include "ops/fused/fused.h"
#include "ops/nn/nn_util.h"

namespace kiln {
namespace cpu {

namespace {

using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

// One compiled convolution for one input shape.
struct ConvPlan {
  uint64_t id = 0;  // unique in the process (a key of exec_args)
  dnnl::convolution_forward conv;
  memory::desc src_md, dst_md, user_src_md, user_dst_md;
  std::shared_ptr<float> weights_buf;  // weights' storage (alloc_weight_floats: huge pages)
  memory weights, bias;
  bool reorder_src = false, reorder_dst = false;
  dnnl::reorder src_reorder, dst_reorder, z_reorder;
  memory::dims dst_dims;
  std::string impl;  // oneDNN's implementation name, e.g. "brgconv:avx512_core", or a winograd
                     // one after kWinoPrefix, e.g. "wino.jit_wino_4x3:avx512_core"
  size_t scratch_bytes = 0;
  memory::desc scratch_md;
  // Kiln's Winograd instead of oneDNN (impl kKilnWino): input dims (NHWC) and pads t, l, b, r.
  std::shared_ptr<const WinogradConv> kwino;
  int64_t kw_n = 0, kw_h = 0, kw_w = 0, kw_pads[4] = {0, 0, 0, 0};
  // Kiln's stride-2 winograd (impl kKilnWinoS2): the same input dims and pads as kwino.
  std::shared_ptr<const WinogradS2Conv> kws2;
  // Kiln's 1x1 conv instead of oneDNN (impl kKilnConv1x1): rows N*OH*OW, input geometry.
  std::shared_ptr<const Conv1x1> kc1;
  int64_t kc1_rows = 0;
  Conv1x1::Strided kc1_in;
};

// KILN_CPU_KILN_WINO=0 turns Kiln's own winograd off; =force makes tuning choose it wherever it
// applies, untimed (A/B in a whole model, where timings on their own differ: see the top).
const std::string& kiln_wino_env() {
  static const std::string v = [] {
    const char* e = std::getenv("KILN_CPU_KILN_WINO");
    return std::string(e ? e : "");
  }();
  return v;
}
bool kiln_wino_enabled() {
  return kiln_wino_env() != "0";
}
bool kiln_wino_forced() {
  return kiln_wino_env() == "force";
}

// KILN_CPU_KILN_WINO_S2=0 / =force, as KILN_CPU_KILN_WINO for Kiln's stride-2 winograd.
const std::string& kiln_wino_s2_env() {
  static const std::string v = [] {
    const char* e = std::getenv("KILN_CPU_KILN_WINO_S2");
    return std::string(e ? e : "");
  }();
  return v;
}
bool kiln_wino_s2_enabled() {
  return kiln_wino_s2_env() != "0" && winograd_isa_available(WinoIsa::kAuto);
}
bool kiln_wino_s2_forced() {
  return kiln_wino_s2_env() == "force";
}

// KILN_CPU_KILN_CONV1X1=0 / =force, as KILN_CPU_KILN_WINO for Kiln's 1x1 conv.
const std::string& kiln_conv1x1_env() {
  static const std::string v = [] {
    const char* e = std::getenv("KILN_CPU_KILN_CONV1X1");
    return std::string(e ? e : "");
  }();
  return v;
}
bool kiln_conv1x1_enabled() {
  return kiln_conv1x1_env() != "0" && conv1x1_isa_available(C1Isa::kAuto);
}
bool kiln_conv1x1_forced() {
  return kiln_conv1x1_env() == "force";
}

// KILN_CPU_KILN_IM2COL=0 / =force, as KILN_CPU_KILN_WINO for the im2col form of Kiln's 1x1 conv.
const std::string& kiln_im2col_env() {
  static const std::string v = [] {
    const char* e = std::getenv("KILN_CPU_KILN_IM2COL");
    return std::string(e ? e : "");
  }();
  return v;
}
bool kiln_im2col_enabled() {
  return kiln_im2col_env() != "0" && conv1x1_isa_available(C1Isa::kAuto);
}
bool kiln_im2col_forced() {
  return kiln_im2col_env() == "force";
}

// The im2col form gathers M x (kh kw C) floats per call: up to this many bytes of them.
constexpr int64_t kIm2colMaxBytes = int64_t(16) << 20;

// Candidates of a conv with big weights (kColdTuneBytes up, in the layout each reads) are timed
// with their weights flushed from the caches first (see the top). KILN_CPU_TUNE_COLD=0: all
// timed with warm weights, as before (A/B).
constexpr size_t kColdTuneBytes = size_t(1) << 20;
// Extra resident weight bytes (over the layer's own) past which a conv tactic must win by 10%.
constexpr size_t kBigExtraWeightBytes = size_t(16) << 20;
// Candidates are timed in the context a model gives them (KILN_CPU_TUNE_CONTEXT=0: without, as
// before; A/B): X (and a residual Z) written just before by every thread, each its contiguous
// share, as the layer before leaves them, and the run followed by every thread reading its
// contiguous share of Y, as the layer after starts. A candidate that writes Y by other slabs
// (column panels, a blocked-layout reorder) pays there what it costs the next layer in the
// model. ResNet-50 b1 on 2 Zen 4 threads (plans built with and without, `kiln bench
// --compare`, 16 rounds): 1.1-1.4% faster in 16 of 16 rounds; layer3's 3x3s took Kiln's
// Winograd instead of oneDNN's jit_fp32_wino_2x3 (timed 0.60 vs 0.65 ms alone; in the model
// 0.69-0.82 vs 0.52-0.58, and the 1x1 conv after it 0.61-0.63 vs 0.51).
bool context_tuning() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_TUNE_CONTEXT");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// Copies src to dst (n floats) on `threads` threads, each its contiguous share.
void copy_by_shares(float* dst, const float* src, size_t n, int threads) {
  struct Job {
    float* d;
    const float* s;
    size_t n;
    int64_t parts;
  } job{dst, src, n, threads};
  parallel_tasks_static(
      threads, threads,
      [](void* c, int64_t i) {
        const Job& j = *static_cast<const Job*>(c);
        const size_t b = j.n * static_cast<size_t>(i) / static_cast<size_t>(j.parts);
        const size_t e = j.n * static_cast<size_t>(i + 1) / static_cast<size_t>(j.parts);
        std::memcpy(j.d + b, j.s + b, (e - b) * sizeof(float));
        return true;
      },
      &job);
}

// Reads one float per cache line of p (n floats) on `threads` threads, each its contiguous
// share (each task stores its sum through the task runner's context, so the reads stay).
void read_by_shares(const float* p, size_t n, int threads) {
  struct Job {
    const float* p;
    size_t n;
    std::vector<float> sums;
  } job{p, n, std::vector<float>(static_cast<size_t>(threads), 0.f)};
  parallel_tasks_static(
      threads, threads,
      [](void* c, int64_t i) {
        Job& j = *static_cast<Job*>(c);
        const size_t parts = j.sums.size();
        const size_t b = j.n * static_cast<size_t>(i) / parts;
        const size_t e = j.n * static_cast<size_t>(i + 1) / parts;
        float acc = 0.f;
        for (size_t k = b; k < e; k += 16) acc += j.p[k];
        j.sums[static_cast<size_t>(i)] = acc;
        return true;
      },
      &job);
}

bool cold_weight_tuning() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_TUNE_COLD");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// KILN_CPU_WINOGRAD=0 turns winograd off (see the top).
bool winograd_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("KILN_CPU_WINOGRAD");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

bool act_layout_any() {
  static const bool any = [] {
    const char* e = std::getenv("KILN_DNNL_CONV_LAYOUT");
    return e && std::string(e) == "any";
  }();
  return any;
}

// A convolution's primitive descriptor with the op descriptor it was made from: oneDNN 2.x's
// implementation iterator (next_impl) keeps a pointer to the latter.
struct ConvPd {
  dnnl::convolution_forward::desc desc;
  dnnl::convolution_forward::primitive_desc pd;
  ConvPd(const dnnl::convolution_forward::desc& d, const dnnl::primitive_attr& attr)
      : desc(d), pd(desc, attr, cpu_engine()) {}
  ConvPd(const ConvPd&) = delete;
  ConvPd& operator=(const ConvPd&) = delete;
};

dnnl::reorder make_reorder(const memory::desc& from, const memory::desc& to) {
  const dnnl::engine& eng = cpu_engine();
  return dnnl::reorder(dnnl::reorder::primitive_desc(eng, from, eng, to));
}

constexpr const char kTacticPrefix[] = "cpu.conv.onednn.";
// Prefix of a winograd implementation's name in a tactic (and in ConvPlan::impl).
constexpr const char kWinoPrefix[] = "wino.";

bool is_wino(const std::string& impl) { return impl.rfind(kWinoPrefix, 0) == 0; }

// Kiln's own winograd as an implementation name (cpu_winograd.h).
constexpr const char kKilnWino[] = "kiln.wino4x3";
// Kiln's 1x1 conv as an implementation name (cpu_conv1x1.h).
constexpr const char kKilnConv1x1[] = "kiln.conv1x1";
// Kiln's stride-2 winograd as an implementation name (cpu_winograd.h).
constexpr const char kKilnWinoS2[] = "kiln.wino4x3s2";
// Kiln's 1x1 conv kernel on gathered windows (im2col) as an implementation name.
constexpr const char kKilnIm2col[] = "kiln.im2col";

class DnnlConv final : public Kernel {
 public:
  DnnlConv(const Node& n, Tensor w, Tensor b, bool has_bias, EvalFn ref, fused::Epilogue ep,
           bool residual)
      : w_(std::move(w)), b_(std::move(b)), has_bias_(has_bias), ref_(ref), ep_(ep),
        residual_(residual), nhwc_(n.attr_string("layout", "NCHW") == "NHWC") {
    std::string t = n.attr_string("kiln_tactic");
    if (t.rfind(kTacticPrefix, 0) == 0) {
      impl_ = t.substr(sizeof(kTacticPrefix) - 1);
      tactic_ = t;
    }
  }

  std::string tactic() const override { return tactic_; }

  // Times oneDNN's implementations for input shape xs and keeps the fastest (see the top).
  void tune(const Node& n, const Shape& xs) {
    std::vector<std::string> names, families;
    // Candidates: the first (best-ISA) implementation of each family ("jit:avx512_core", not
    // also "jit:avx2"); no reference one. Both are never faster, and would slow the build.
    auto collect = [&](ConvPd& pd, const std::string& prefix) {
      do {
        std::string name = prefix + pd.pd.impl_info_str();
        std::string family = name.substr(0, name.rfind(':'));
        if (name.rfind("ref", 0) != 0 &&
            std::find(families.begin(), families.end(), family) == families.end()) {
          names.push_back(name);
          families.push_back(family);
        }
      } while (pd.pd.next_impl());
    };
    try {
      auto pd = primitive_desc_for(n, xs);
      if (!pd) return;
      collect(*pd, "");
    } catch (const dnnl::error&) {
      return;
    }
    if (winograd_enabled()) {
      try {
        auto pd = primitive_desc_for(n, xs, /*wino=*/true);
        if (pd) collect(*pd, kWinoPrefix);
      } catch (const dnnl::error&) {
        // oneDNN has no winograd for this convolution (shape, post-ops or ISA): not a candidate.
      }
    }
    if (names.empty()) return;
    if (kiln_wino_enabled() && winograd_isa_available(WinoIsa::kAuto) &&
        kiln_wino_geometry(n, xs, nullptr)) {
      if (kiln_wino_forced()) names.clear();
      names.push_back(kKilnWino);
    }
    if (kiln_wino_s2_enabled() && kiln_wino_s2_geometry(n, xs, nullptr)) {
      if (kiln_wino_s2_forced()) names.clear();
      names.push_back(kKilnWinoS2);
    }
    if (kiln_conv1x1_enabled() && kiln_conv1x1_geometry(n, xs, nullptr)) {
      if (kiln_conv1x1_forced()) names.clear();
      names.push_back(kKilnConv1x1);
    }
    if (kiln_im2col_enabled() && kiln_im2col_geometry(n, xs, nullptr)) {
      if (kiln_im2col_forced()) names.clear();
      names.push_back(kKilnIm2col);
    }
    std::string best = names[0];
    std::shared_ptr<const ConvPlan> best_plan;
    std::string log;
    if (names.size() > 1) {
      struct Cand {
        std::string name;
        std::shared_ptr<const ConvPlan> plan;
        double best = -1;
        bool out = false;  // failed, or clearly slower than the best
      };
      std::vector<Cand> cands;
      TuneData td;
      for (const std::string& name : names) {
        auto p = build(n, xs, name);
        if (!p.is_ok() || !p.value() || p.value()->impl != name) {
          log += " " + name + "=unavailable";
          continue;
        }
        Cand c;
        c.name = name;
        c.plan = p.value();
        c.out = time_plan(*c.plan, xs, td) < 0;  // warm-up run (first-touch, caches)
        cands.push_back(std::move(c));
      }
      // Round robin, best run of each: a burst of load on a shared machine then hits every
      // candidate alike rather than whichever is timed during it (winograd ones come last).
      // At least 2 rounds, more (up to 8; small convolutions are noisier) while the fastest's
      // best run times the rounds stays under 4 ms (its best, not its total: runs that a
      // neighbour held up, 8 ms each on this 2-core VM, would otherwise end the rounds after
      // two and leave a coin toss between candidates); from then on, candidates over 2x the
      // fastest stop.
      const Cand* lead = nullptr;
      for (int round = 0; round < 8; ++round) {
        for (Cand& c : cands) {
          if (c.out) continue;
          double s = time_plan(*c.plan, xs, td);
          if (s < 0) {
            c.out = true, c.best = -1;
            continue;
          }
          if (c.best < 0 || s < c.best) c.best = s;
        }
        lead = nullptr;
        for (const Cand& c : cands)
          if (!c.out && (!lead || c.best < lead->best)) lead = &c;
        if (!lead || (round >= 1 && lead->best * (round + 1) >= 0.004)) break;
        if (round >= 1)
          for (Cand& c : cands)
            if (&c != lead && c.best > 2 * lead->best) c.out = true;
      }
      for (const Cand& c : cands)
        log += " " + c.name + "=" +
               (c.best < 0 ? std::string("failed") : std::to_string(c.best * 1e3) + "ms");
      // Kiln's 1x1 conv with a residual and small (warm-timed) weights must win by a margin:
      // at a tie in timing it loses in the model, where its rows come from the layer before on
      // the other core (ResNet-50 b1, 2 threads: layer1/layer2 expansions with their residual,
      // timed equal, ran 0.25-0.265 ms vs brgconv_1x1's 0.23-0.24 in the model). Where it wins
      // by more (b8: 26 MB residuals, 2.0 vs 3.4 ms) it stays. KILN_CPU_KILN_CONV1X1_MARGIN:
      // the margin in percent (default 10; 0: none).
      if (lead && lead->name == kKilnConv1x1 && residual_ &&
          static_cast<size_t>(w_.nbytes()) < kColdTuneBytes) {
        static const double margin = [] {
          const char* e = std::getenv("KILN_CPU_KILN_CONV1X1_MARGIN");
          return std::clamp(e ? std::atof(e) : 10.0, 0.0, 100.0) / 100.0;
        }();
        const Cand* other = nullptr;
        for (const Cand& c : cands)
          if (&c != lead && c.best > 0 && (!other || c.best < other->best)) other = &c;
        if (other && lead->best > (1.0 - margin) * other->best) {
          log += " (" + std::string(kKilnConv1x1) + " within the margin)";
          lead = other;
        }
      }
      // A candidate holding far more than the layer's weights (a Winograd's U, 4x them) must
      // be 10% faster than the fastest that does not. ResNet-50 b8 on 16 Xeon threads took
      // oneDNN's jit_wino_4x3 for layer4's 3x3s (7% faster than Kiln's streamed Winograd) and
      // Kiln's stride-2 Winograd with U kept for layer4.0, 38 MB each: fresh plans peaked at
      // 297-432 MB, ORT at 410; with this rule four fresh plans peaked at 291-324 MB, ~0.3%
      // slower. Only extras from 16 MB up (512 channels): smaller U's pay for themselves.
      if (lead) {
        const size_t wb = static_cast<size_t>(w_.nbytes());
        auto big = [&](const Cand& c) {
          const size_t held = weights_of(*c.plan).n;
          return held > 2 * wb && held - wb >= kBigExtraWeightBytes;
        };
        if (big(*lead)) {
          const Cand* other = nullptr;
          for (const Cand& c : cands)
            if (c.best > 0 && !big(c) && (!other || c.best < other->best)) other = &c;
          if (other && lead->best > 0.9 * other->best) {
            log += " (" + lead->name + ": its weights are too big for its gain)";
            lead = other;
          }
        }
      }
      if (lead) best = lead->name, best_plan = lead->plan;
    }
    if (log.empty()) log = " " + best + " (only one)";
    KILN_LOG(kVerbose, "node '" << n.name << "': oneDNN convolution implementations:" << log
                                << " -> " << best);
    impl_ = best;
    tactic_ = kTacticPrefix + best;
    if (best != kKilnWino) {
      std::lock_guard<std::mutex> lock(kwino_mu_);
      kwino_.reset();  // a timed candidate only: its packed weights (and U) go
    }
    if (best != kKilnConv1x1) {
      std::lock_guard<std::mutex> lock(kwino_mu_);
      kc1_.reset();  // a timed candidate only: its packed weights go
    }
    if (best != kKilnIm2col) {
      std::lock_guard<std::mutex> lock(kwino_mu_);
      kim_.reset();  // a timed candidate only: its packed weights go
    }
    if (best != kKilnWinoS2) {
      std::lock_guard<std::mutex> lock(kwino_mu_);
      kws2_.reset();  // a timed candidate only: its U goes
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (best_plan) plans_[xs] = best_plan;
  }

  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    return run_impl(ctx, in, out, false);
  }
  // run, with Z's storage the caller's to overwrite (run_dnnl_conv_z_owned).
  Status run_z_owned(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const {
    return run_impl(ctx, in, out, true);
  }

 private:
  Status run_impl(OpContext& ctx, std::span<const Value> in, std::span<Value> out,
                  bool z_owned) const {
    const Tensor* X = opt_tensor(in, 0);
    const Tensor* Z = residual_ ? opt_tensor(in, 3) : nullptr;
    if (!X || X->dtype() != DataType::kFloat || X->rank() != 4 || X->dim(nhwc_ ? 3 : 1) != w_.dim(1) * group(ctx) ||
        X->numel() == 0 || (residual_ && (!Z || Z->dtype() != DataType::kFloat)))
      return ref_(ctx, in, out);
    std::shared_ptr<const ConvPlan> p;
    KILN_ASSIGN_OR_RETURN(p, plan_for(ctx.node, *X));
    if (!p) return ref_(ctx, in, out);
    const auto& dd = p->dst_dims;
    Shape ys = nhwc_ ? Shape{dd[0], dd[2], dd[3], dd[1]} : Shape(dd.begin(), dd.end());
    if (Z && Z->shape() != ys) return ref_(ctx, in, out);
    // A residual Z handed over by the executor (it dies here, nothing else holds its storage):
    // accumulate into its buffer instead of copying it into a fresh Y.
    const bool in_place =
        Z && (z_owned || (((ctx.donatable >> 3) & 1) && Z->storage().use_count() == 1));
    Tensor Y;
    if (in_place) {
      Y = *Z;
    } else {
      KILN_ASSIGN_OR_RETURN(Y, new_output(ys));
    }
    try {
      if (!execute(*p, X->data<float>(), Y.data<float>(), Z ? Z->data<float>() : nullptr, in_place,
                   Y.nbytes()))
        return ctx.fail("out of memory for the oneDNN scratchpad");
    } catch (const dnnl::error& e) {
      return ctx.fail(std::string("oneDNN convolution failed: ") + e.what());
    } catch (const std::bad_alloc&) {
      return ctx.fail("out of memory in oneDNN convolution");
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

  static int64_t group(const OpContext& ctx) { return ctx.node.attr_int("group", 1); }

  // The weights plan p reads at every run, in the layout it reads them.
  struct WeightBytes {
    const char* p = nullptr;
    size_t n = 0;
  };
  static WeightBytes weights_of(const ConvPlan& p) {
    WeightBytes r;
    if (p.kc1) {
      r.p = reinterpret_cast<const char*>(p.kc1->packed());
      r.n = static_cast<size_t>(p.kc1->packed_bytes());
    } else if (p.kwino) {
      r.p = reinterpret_cast<const char*>(p.kwino->weights_read(p.kw_n, p.kw_h, p.kw_w,
                                                                 p.kw_pads, &r.n));
    } else if (p.kws2) {
      r.p = reinterpret_cast<const char*>(
          p.kws2->weights_read(p.kw_n, p.kw_h, p.kw_w, p.kw_pads, &r.n));
    } else if (p.weights_buf) {
      r.p = reinterpret_cast<const char*>(p.weights_buf.get());
      r.n = p.weights.get_desc().get_size();
    }
    return r;
  }

  // One run of plan p: X (and Z) in the user layout, into Y. False: no scratchpad memory.
  // Throws dnnl::error.
  bool execute(const ConvPlan& pl, const float* x, float* y, const float* z, bool z_in_y,
               size_t y_bytes) const {
    const ConvPlan* p = &pl;
    if (p->kc1)
      return p->kc1->run(x, p->kc1_rows, z_in_y ? y : z, y, omp_threads(), C1Order::kAuto,
                         &p->kc1_in);
    if (p->kws2) {
      const int64_t* pd = p->kw_pads;
      return p->kws2->run(x, p->kw_n, p->kw_h, p->kw_w, pd[0], pd[1], pd[2], pd[3], z_in_y ? y : z,
                          y, omp_threads());
    }
    if (p->kwino) {
      const int64_t* pd = p->kw_pads;
      return p->kwino->run(x, p->kw_n, p->kw_h, p->kw_w, pd[0], pd[1], pd[2], pd[3], z_in_y ? y : z,
                           y, omp_threads());
    }
    const dnnl::engine& eng = cpu_engine();
    static thread_local dnnl::stream s(eng);
    if (!p->reorder_src && !p->reorder_dst) {
      // The common case (NHWC chain, oneDNN's own layouts): this thread's memory objects and
      // argument map for the plan, made once, pointed at this call's buffers. Making them per
      // call was ~0.5 us of the ~1 us a small conv's call costs beyond its arithmetic (malloc),
      // on every one of MobileNetV2's 52 convs.
      ExecArgs& ea = exec_args(*p);
      if (z && !z_in_y) std::memcpy(y, z, y_bytes);
      uint8_t* scratch = scratch_buffer(p->scratch_bytes);
      if (!scratch && p->scratch_bytes) return false;
      ea.src.set_data_handle(const_cast<float*>(x));
      ea.dst.set_data_handle(y);
      ea.sp.set_data_handle(scratch);
      ea.args[DNNL_ARG_WEIGHTS] = p->weights;
      if (has_bias_) ea.args[DNNL_ARG_BIAS] = p->bias;
      struct Clear {  // also when execute throws
        ExecArgs& ea;
        bool bias;
        ~Clear() {
          ea.args[DNNL_ARG_WEIGHTS] = memory();
          if (bias) ea.args[DNNL_ARG_BIAS] = memory();
        }
      } clear{ea, has_bias_};
      p->conv.execute(s, ea.args);
      s.wait();
      return true;
    }
    memory user_src(p->user_src_md, eng, const_cast<float*>(x));
    memory user_dst(p->user_dst_md, eng, y);
    memory src = user_src, dst = user_dst;
    if (p->reorder_src) {
      src = memory(p->src_md, eng);
      p->src_reorder.execute(s, user_src, src);
    }
    if (p->reorder_dst) dst = memory(p->dst_md, eng);
    if (z) {
      if (p->reorder_dst) {
        memory user_z(p->user_dst_md, eng, const_cast<float*>(z));
        p->z_reorder.execute(s, user_z, dst);
      } else if (!z_in_y) {
        std::memcpy(y, z, y_bytes);
      }
    }
    uint8_t* scratch = scratch_buffer(p->scratch_bytes);
    if (!scratch && p->scratch_bytes) return false;
    memory sp(p->scratch_md, eng, scratch);
    std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src},
                                            {DNNL_ARG_WEIGHTS, p->weights},
                                            {DNNL_ARG_DST, dst},
                                            {DNNL_ARG_SCRATCHPAD, sp}};
    if (has_bias_) args[DNNL_ARG_BIAS] = p->bias;
    p->conv.execute(s, args);
    if (p->reorder_dst) p->dst_reorder.execute(s, dst, user_dst);
    s.wait();
    return true;
  }

  // 64-byte aligned, as kernel outputs are (Kiln's 1x1 conv streams whole lines only there).
  template <class T>
  struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U>&) {}
    T* allocate(size_t n) {
      return static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64)));
    }
    void deallocate(T* p, size_t) { ::operator delete[](p, std::align_val_t(64)); }
    bool operator==(const Aligned64&) const { return true; }
    bool operator!=(const Aligned64&) const { return false; }
  };
  // A thread's memory objects and argument map for plan p (no reorders), pointing at whatever
  // buffers the last call had. Keyed by the plan's unique id (a freed plan's address may come
  // back); at most 512 per thread, all dropped past that.
  struct ExecArgs {
    memory src, dst, sp;
    std::unordered_map<int, memory> args;
  };
  ExecArgs& exec_args(const ConvPlan& p) const {
    thread_local std::unordered_map<uint64_t, ExecArgs> cache;
    auto it = cache.find(p.id);
    if (it != cache.end()) return it->second;
    if (cache.size() >= 512) cache.clear();
    const dnnl::engine& eng = cpu_engine();
    ExecArgs ea;
    ea.src = memory(p.user_src_md, eng, nullptr);
    ea.dst = memory(p.user_dst_md, eng, nullptr);
    ea.sp = memory(p.scratch_md, eng, nullptr);
    // The weights and bias are set per call, and cleared after it: the cache must not keep a
    // dead engine's weights alive.
    ea.args = {{DNNL_ARG_SRC, ea.src},
               {DNNL_ARG_WEIGHTS, memory()},
               {DNNL_ARG_DST, ea.dst},
               {DNNL_ARG_SCRATCHPAD, ea.sp}};
    if (has_bias_) ea.args[DNNL_ARG_BIAS] = memory();
    return cache.emplace(p.id, std::move(ea)).first->second;
  }

  // Buffers for timing runs: random X (and Z), made once per tune().
  struct TuneData {
    std::vector<float, Aligned64<float>> x, y, z;
    std::vector<float, Aligned64<float>> x0;  // X's values, rewritten into x before each run
  };

  // Seconds of one run of plan p (user-layout reorders included) on random data of input shape
  // xs, in a model's context (context_tuning: the reads of Y after it included); -1 on failure.
  double time_plan(const ConvPlan& p, const Shape& xs, TuneData& td) const {
    const auto& dd = p.dst_dims;
    size_t xn = 1, yn = static_cast<size_t>(dd[0] * dd[1] * dd[2] * dd[3]);
    for (int64_t d : xs) xn *= static_cast<size_t>(d);
    // Bound the memory a tuning run may take (1 GiB of activations).
    if (2 * xn + 2 * yn > (size_t(1) << 28)) return -1;
    try {
      if (td.x.size() != xn || td.y.size() != yn) {
        td.x.resize(xn);
        td.y.resize(yn);
        td.z.resize(residual_ ? yn : 0);
        uint32_t r = 0x9e3779b9u;  // xorshift: the values only need to be ordinary floats
        auto fill = [&r](std::vector<float, Aligned64<float>>& v) {
          for (float& f : v) {
            r ^= r << 13, r ^= r >> 17, r ^= r << 5;
            f = static_cast<float>(r >> 8) * (2.f / 16777216.f) - 1.f;
          }
        };
        fill(td.x);
        fill(td.z);
        if (context_tuning()) td.x0 = td.x;
      }
    } catch (const std::bad_alloc&) {
      return -1;
    }
    const float* zp = residual_ ? td.z.data() : nullptr;
    float* y = td.y.data();
    const float* x = td.x.data();
    try {
      // A residual as the executor hands it over in a model: donated, the output in its buffer
      // (the copy, which no candidate pays then, is left out of the timing).
      const int threads = omp_threads();
      if (context_tuning()) {
        copy_by_shares(td.x.data(), td.x0.data(), xn, threads);
        if (zp) copy_by_shares(y, zp, yn, threads);
      } else if (zp) {
        std::memcpy(y, zp, yn * sizeof(float));
      }
      // Big weights start in memory, as in a model whose weights outgrow the caches.
      if (cold_weight_tuning()) {
        const WeightBytes w = weights_of(p);
        if (w.p && w.n >= kColdTuneBytes) evict_from_cache(w.p, w.n);
      }
      using clock = std::chrono::steady_clock;
      auto t0 = clock::now();
      if (!execute(p, x, y, zp ? y : nullptr, zp != nullptr, yn * sizeof(float))) return -1;
      if (context_tuning()) read_by_shares(y, yn, threads);
      return std::chrono::duration<double>(clock::now() - t0).count();
    } catch (const dnnl::error&) {
      return -1;
    } catch (const std::bad_alloc&) {
      return -1;
    }
  }

  Result<std::shared_ptr<const ConvPlan>> plan_for(const Node& n, const Tensor& X) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plans_.find(X.shape());
    if (it != plans_.end()) return it->second;
    std::shared_ptr<const ConvPlan> p;
    KILN_ASSIGN_OR_RETURN(p, build(n, X.shape(), impl_));
    plans_[X.shape()] = p;
    return p;
  }

  // Whether Kiln's winograd can do this conv for NHWC input shape xs; its pads (t, l, b, r)
  // into pads when set.
  bool kiln_wino_geometry(const Node& n, const Shape& xs, int64_t* pads) const {
    if (!nhwc_ || xs.size() != 4 || n.attr_int("group", 1) != 1 || w_.rank() != 4 ||
        w_.dim(2) != 3 || w_.dim(3) != 3 || xs[3] != w_.dim(1) || xs[0] < 1)
      return false;
    auto win = nn::make_window(n, Shape{xs[1], xs[2]}, Shape{3, 3}, false);
    if (!win.is_ok()) return false;
    const nn::Window& w = win.value();
    if (w.nsp != 2 || w.strides[0] != 1 || w.strides[1] != 1 || w.dilations[0] != 1 ||
        w.dilations[1] != 1)
      return false;
    const int64_t pt = w.pad_begin[0], pl = w.pad_begin[1], pb = w.pad_end[0], pr = w.pad_end[1];
    if (!WinogradConv::supports(xs[1], xs[2], pt, pl, pb, pr)) return false;
    if (w.out[0] != xs[1] + pt + pb - 2 || w.out[1] != xs[2] + pl + pr - 2) return false;
    if (pads) pads[0] = pt, pads[1] = pl, pads[2] = pb, pads[3] = pr;
    return true;
  }

  // Whether Kiln's stride-2 winograd can do this conv for NHWC input shape xs; its pads (t, l, b,
  // r) into pads when set.
  // Not for fewer than 16 input or output channels: the transforms then outweigh the GEMMs it
  // saves (MobileNetV2's stem, 224x224x3 -> 32: 0.45 ms vs brgconv's 0.053, Zen 5, 2 threads).
  bool kiln_wino_s2_geometry(const Node& n, const Shape& xs, int64_t* pads) const {
    if (!nhwc_ || xs.size() != 4 || n.attr_int("group", 1) != 1 || w_.rank() != 4 ||
        w_.dim(2) != 3 || w_.dim(3) != 3 || xs[3] != w_.dim(1) || xs[0] < 1 || w_.dim(0) < 16 ||
        w_.dim(1) < 16)
      return false;
    auto win = nn::make_window(n, Shape{xs[1], xs[2]}, Shape{3, 3}, false);
    if (!win.is_ok()) return false;
    const nn::Window& w = win.value();
    if (w.nsp != 2 || w.strides[0] != 2 || w.strides[1] != 2 || w.dilations[0] != 1 ||
        w.dilations[1] != 1)
      return false;
    const int64_t pt = w.pad_begin[0], pl = w.pad_begin[1], pb = w.pad_end[0], pr = w.pad_end[1];
    if (!WinogradS2Conv::supports(xs[1], xs[2], pt, pl, pb, pr)) return false;
    if (w.out[0] != WinogradS2Conv::out_size(xs[1], pt, pb) ||
        w.out[1] != WinogradS2Conv::out_size(xs[2], pl, pr))
      return false;
    if (pads) pads[0] = pt, pads[1] = pl, pads[2] = pb, pads[3] = pr;
    return true;
  }

  // Whether Kiln's 1x1 conv can do this conv for NHWC input shape xs; its strides (sh, sw) and
  // output size (OH, OW) into so when set.
  // Whether the im2col form of Kiln's 1x1 conv takes this conv at input shape xs (NHWC, one
  // group, a kernel other than 1x1, the gathered rows within kIm2colMaxBytes); its window in
  // *win when so.
  bool kiln_im2col_geometry(const Node& n, const Shape& xs, Conv1x1::Strided* win) const {
    if (!nhwc_ || xs.size() != 4 || n.attr_int("group", 1) != 1 || w_.rank() != 4 ||
        (w_.dim(2) == 1 && w_.dim(3) == 1) || xs[3] != w_.dim(1) || xs[0] < 1 || xs[1] < 1 ||
        xs[2] < 1)
      return false;
    if (ep_.kind == fused::Epilogue::kClip && !(ep_.a <= ep_.b)) return false;
    auto wr = nn::make_window(n, Shape{xs[1], xs[2]}, Shape{w_.dim(2), w_.dim(3)}, false);
    if (!wr.is_ok()) return false;
    const nn::Window& w = wr.value();
    if (w.nsp != 2 || w.out[0] < 1 || w.out[1] < 1 || w.pad_begin[0] < 0 || w.pad_begin[1] < 0 ||
        w.strides[0] < 1 || w.strides[1] < 1 || w.dilations[0] < 1 || w.dilations[1] < 1)
      return false;
    const double bytes = 4.0 * double(xs[0]) * double(w.out[0]) * double(w.out[1]) *
                         double(w_.dim(1) * w_.dim(2) * w_.dim(3));
    if (bytes > double(kIm2colMaxBytes)) return false;
    if (win) {
      win->H = xs[1], win->W = xs[2], win->sh = w.strides[0], win->sw = w.strides[1];
      win->kh = w_.dim(2), win->kw = w_.dim(3), win->pt = w.pad_begin[0], win->pl = w.pad_begin[1];
      win->dh = w.dilations[0], win->dw = w.dilations[1], win->OH = w.out[0], win->OW = w.out[1];
    }
    return true;
  }

  bool kiln_conv1x1_geometry(const Node& n, const Shape& xs, int64_t* so) const {
    if (!nhwc_ || xs.size() != 4 || n.attr_int("group", 1) != 1 || w_.rank() != 4 ||
        w_.dim(2) != 1 || w_.dim(3) != 1 || xs[3] != w_.dim(1) || xs[0] < 1 || xs[1] < 1 ||
        xs[2] < 1 || xs[0] * xs[1] * xs[2] > (int64_t(1) << 30))
      return false;
    if (ep_.kind == fused::Epilogue::kClip && !(ep_.a <= ep_.b)) return false;
    auto win = nn::make_window(n, Shape{xs[1], xs[2]}, Shape{1, 1}, false);
    if (!win.is_ok()) return false;
    const nn::Window& w = win.value();
    if (w.nsp != 2 || w.strides[0] < 1 || w.strides[1] < 1 || w.strides[0] > xs[1] ||
        w.strides[1] > xs[2] || w.pad_begin[0] != 0 || w.pad_begin[1] != 0 ||
        w.pad_end[0] != 0 || w.pad_end[1] != 0 ||
        w.out[0] != (xs[1] - 1) / w.strides[0] + 1 || w.out[1] != (xs[2] - 1) / w.strides[1] + 1)
      return false;
    if (so) so[0] = w.strides[0], so[1] = w.strides[1], so[2] = w.out[0], so[3] = w.out[1];
    return true;
  }

  // The convolution's primitive descriptor for input shape xs (oneDNN's first choice), or null
  // when oneDNN cannot do it. Throws dnnl::error.
  // wino: algorithm::convolution_winograd (throws where oneDNN has none for it), which needs
  // oneDNN's own activation layouts.
  std::unique_ptr<ConvPd> primitive_desc_for(
      const Node& n, const Shape& xs, bool wino = false, memory::dims* src_dims_out = nullptr,
      memory::dims* dst_dims_out = nullptr, memory::dims* wdims_out = nullptr,
      memory::desc* b_md_out = nullptr) const {
    const int64_t G = n.attr_int("group", 1);
    if (xs.size() != 4 || G <= 0 || w_.dim(0) % G != 0) return nullptr;
    const int64_t H = xs[nhwc_ ? 1 : 2], Wd = xs[nhwc_ ? 2 : 3];
    Shape in_sp = {H, Wd}, ks = {w_.dim(2), w_.dim(3)};
    auto win = nn::make_window(n, in_sp, ks, false);
    if (!win.is_ok()) return nullptr;  // the reference names the error
    const nn::Window& w = win.value();
    if (w.out[0] <= 0 || w.out[1] <= 0) return nullptr;
    {
      const int64_t N = xs[0], C = xs[nhwc_ ? 3 : 1], M = w_.dim(0);
      if (C != w_.dim(1) * G) return nullptr;
      memory::dims src_dims = {N, C, H, Wd};
      memory::dims dst_dims = {N, M, w.out[0], w.out[1]};
      memory::dims wdims = G == 1 ? memory::dims{M, C, ks[0], ks[1]}
                                  : memory::dims{G, M / G, C / G, ks[0], ks[1]};
      // KILN_DNNL_CONV_LAYOUT=any lets oneDNN pick blocked/NHWC activations (reordered at the
      // edges of every conv, until layouts are chosen per chain); default: plain NCHW.
      const tag act = nhwc_ || wino || act_layout_any() ? tag::any : tag::nchw;
      const auto alg = wino ? dnnl::algorithm::convolution_winograd
                            : dnnl::algorithm::convolution_direct;
      memory::desc src_any(src_dims, dt::f32, act), dst_any(dst_dims, dt::f32, act);
      memory::desc w_any(wdims, dt::f32, tag::any), b_md({M}, dt::f32, tag::a);
      memory::dims strides = {w.strides[0], w.strides[1]};
      memory::dims dil = {w.dilations[0] - 1, w.dilations[1] - 1};
      memory::dims pl = {w.pad_begin[0], w.pad_begin[1]}, pr = {w.pad_end[0], w.pad_end[1]};
      auto desc = has_bias_ ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                              alg, src_any, w_any, b_md, dst_any,
                                                              strides, dil, pl, pr)
                            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference,
                                                              alg, src_any, w_any, dst_any, strides,
                                                              dil, pl, pr);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      dnnl::post_ops po;
      if (residual_) po.append_sum(1.f);
      switch (ep_.kind) {
        case fused::Epilogue::kNone:
          break;
        case fused::Epilogue::kRelu:
          po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
          break;
        case fused::Epilogue::kLeakyRelu:
          po.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, ep_.a, 0.f);
          break;
        case fused::Epilogue::kClip:
          po.append_eltwise(1.f, dnnl::algorithm::eltwise_clip_v2, ep_.a, ep_.b);
          break;
      }
      attr.set_post_ops(po);
      if (src_dims_out) *src_dims_out = src_dims;
      if (dst_dims_out) *dst_dims_out = dst_dims;
      if (wdims_out) *wdims_out = wdims;
      if (b_md_out) *b_md_out = b_md;
      return std::make_unique<ConvPd>(desc, attr);
    }
  }

  // A plan for input shape xs with oneDNN's implementation `impl` (its default when empty or
  // not offered here); null when oneDNN cannot do the convolution (the reference will).
  Result<std::shared_ptr<const ConvPlan>> build(const Node& n, const Shape& xs,
                                                const std::string& impl) const {
    auto p = std::make_shared<ConvPlan>();
    int64_t so[4];
    if (impl == kKilnConv1x1 && kiln_conv1x1_enabled() && kiln_conv1x1_geometry(n, xs, so)) {
      std::shared_ptr<const Conv1x1> k;
      {
        std::lock_guard<std::mutex> lock(kwino_mu_);
        if (!kc1_) {
          kc1_ = Conv1x1::create(w_.data<float>(), w_.dim(0), w_.dim(1),
                                 has_bias_ ? b_.data<float>() : nullptr, ep_);
          if (kc1_) packed_weight_done(w_.raw_data(), w_.nbytes());
        }
        k = kc1_;
      }
      if (k) {
        p->kc1 = k;
        p->impl = kKilnConv1x1;
        p->kc1_rows = xs[0] * so[2] * so[3];
        p->kc1_in.H = xs[1], p->kc1_in.W = xs[2], p->kc1_in.sh = so[0], p->kc1_in.sw = so[1];
        p->dst_dims = {xs[0], w_.dim(0), so[2], so[3]};
        return std::shared_ptr<const ConvPlan>(p);
      }
    }
    Conv1x1::Strided win;
    if (impl == kKilnIm2col && kiln_im2col_enabled() && kiln_im2col_geometry(n, xs, &win)) {
      std::shared_ptr<const Conv1x1> k;
      {
        std::lock_guard<std::mutex> lock(kwino_mu_);
        if (!kim_) {
          // OIHW -> [O][kh][kw][I]: the gathered rows' order.
          const int64_t O = w_.dim(0), I = w_.dim(1), KH = w_.dim(2), KW = w_.dim(3);
          std::vector<float> wr;
          try {
            wr.resize(static_cast<size_t>(O * KH * KW * I));
          } catch (const std::bad_alloc&) {
            return Status(StatusCode::kOutOfMemory, "out of memory for im2col weights");
          }
          const float* src = w_.data<float>();
          for (int64_t o = 0; o < O; ++o)
            for (int64_t i = 0; i < I; ++i)
              for (int64_t a = 0; a < KH; ++a)
                for (int64_t b = 0; b < KW; ++b)
                  wr[static_cast<size_t>(((o * KH + a) * KW + b) * I + i)] =
                      src[((o * I + i) * KH + a) * KW + b];
          kim_ = Conv1x1::create(wr.data(), O, KH * KW * I, has_bias_ ? b_.data<float>() : nullptr,
                                 ep_);
          if (kim_) packed_weight_done(w_.raw_data(), w_.nbytes());
        }
        k = kim_;
      }
      if (k) {
        p->kc1 = k;
        p->impl = kKilnIm2col;
        p->kc1_rows = xs[0] * win.OH * win.OW;
        p->kc1_in = win;
        p->dst_dims = {xs[0], w_.dim(0), win.OH, win.OW};
        return std::shared_ptr<const ConvPlan>(p);
      }
    }
    if (impl == kKilnWinoS2 && kiln_wino_s2_enabled() && kiln_wino_s2_geometry(n, xs, p->kw_pads)) {
      std::shared_ptr<const WinogradS2Conv> k;
      {
        std::lock_guard<std::mutex> lock(kwino_mu_);
        if (!kws2_) {
          kws2_ = WinogradS2Conv::create(w_.data<float>(), w_.dim(0), w_.dim(1),
                                         has_bias_ ? b_.data<float>() : nullptr, ep_);
          if (kws2_) packed_weight_done(w_.raw_data(), w_.nbytes());
        }
        k = kws2_;
      }
      if (k && k->prepare(xs[0], xs[1], xs[2], p->kw_pads)) {
        p->kws2 = k;
        p->impl = kKilnWinoS2;
        p->kw_n = xs[0], p->kw_h = xs[1], p->kw_w = xs[2];
        p->dst_dims = {xs[0], w_.dim(0),
                       WinogradS2Conv::out_size(xs[1], p->kw_pads[0], p->kw_pads[2]),
                       WinogradS2Conv::out_size(xs[2], p->kw_pads[1], p->kw_pads[3])};
        return std::shared_ptr<const ConvPlan>(p);
      }
    }
    if (impl == kKilnWino && kiln_wino_enabled() && kiln_wino_geometry(n, xs, p->kw_pads)) {
      std::shared_ptr<const WinogradConv> k;
      {
        std::lock_guard<std::mutex> lock(kwino_mu_);
        if (!kwino_) {
          kwino_ = WinogradConv::create(w_.data<float>(), w_.dim(0), w_.dim(1),
                                        has_bias_ ? b_.data<float>() : nullptr, ep_);
          if (kwino_) packed_weight_done(w_.raw_data(), w_.nbytes());
        }
        k = kwino_;
      }
      if (k && k->prepare(xs[0], xs[1], xs[2], p->kw_pads[0], p->kw_pads[1], p->kw_pads[2],
                          p->kw_pads[3])) {
        p->kwino = k;
        p->impl = kKilnWino;
        p->kw_n = xs[0], p->kw_h = xs[1], p->kw_w = xs[2];
        p->dst_dims = {xs[0], w_.dim(0), xs[1] + p->kw_pads[0] + p->kw_pads[2] - 2,
                       xs[2] + p->kw_pads[1] + p->kw_pads[3] - 2};
        return std::shared_ptr<const ConvPlan>(p);
      }
    }
    try {
      const dnnl::engine& eng = cpu_engine();
      const int64_t G = n.attr_int("group", 1);
      const tag user = nhwc_ ? tag::nhwc : tag::nchw;
      memory::dims src_dims, wdims;
      memory::desc b_md;
      auto pdp = primitive_desc_for(n, xs, false, &src_dims, &p->dst_dims, &wdims, &b_md);
      if (!pdp) return std::shared_ptr<const ConvPlan>();
      bool wino = false;
      if (is_wino(impl)) {
        // A winograd tactic: oneDNN may have no winograd here (shape, post-ops, ISA, or
        // KILN_CPU_WINOGRAD=0); then the default direct conv below.
        const std::string name = impl.substr(sizeof(kWinoPrefix) - 1);
        std::unique_ptr<ConvPd> wp;
        if (winograd_enabled()) {
          try {
            wp = primitive_desc_for(n, xs, true);
          } catch (const dnnl::error&) {
            wp.reset();
          }
        }
        bool found = false;
        if (wp) {
          do {
            found = wp->pd.impl_info_str() == name;
          } while (!found && wp->pd.next_impl());
        }
        if (found) pdp = std::move(wp), wino = true;
      } else if (!impl.empty()) {
        bool found = false;
        do {
          found = pdp->pd.impl_info_str() == impl;
        } while (!found && pdp->pd.next_impl());
        // Not offered on this machine (a plan or timing cache from another CPU): the default.
        if (!found) pdp = primitive_desc_for(n, xs);
      }
      dnnl::convolution_forward::primitive_desc& pd = pdp->pd;
      static std::atomic<uint64_t> next_id{1};
      p->id = next_id.fetch_add(1);
      p->impl = (wino ? kWinoPrefix : "") + std::string(pd.impl_info_str());
      if (!impl.empty() && p->impl != impl)
        KILN_LOG(kVerbose, "node '" << n.name << "': oneDNN convolution implementation " << impl
                                    << " not available here; using " << p->impl);
      p->conv = dnnl::convolution_forward(pd);
      p->scratch_md = pd.scratchpad_desc();
      p->scratch_bytes = p->scratch_md.get_size();
      p->src_md = pd.src_desc();
      p->dst_md = pd.dst_desc();
      p->user_src_md = memory::desc(src_dims, dt::f32, user);
      p->user_dst_md = memory::desc(p->dst_dims, dt::f32, user);
      p->reorder_src = p->src_md != p->user_src_md;
      p->reorder_dst = p->dst_md != p->user_dst_md;
      if (p->reorder_src) p->src_reorder = make_reorder(p->user_src_md, p->src_md);
      if (p->reorder_dst) {
        p->dst_reorder = make_reorder(p->dst_md, p->user_dst_md);
        if (residual_) p->z_reorder = make_reorder(p->user_dst_md, p->dst_md);
      }
      dnnl::stream s(eng);
      memory user_w(memory::desc(wdims, dt::f32, G == 1 ? tag::oihw : tag::goihw), eng,
                    const_cast<float*>(w_.data<float>()));
      // oneDNN's layout of the weights in our own buffer: from 2 MB up on huge pages, advised
      // before the reorder first touches them (they stream from memory at every run once the
      // model's weights outgrow L3).
      {
        const size_t wn = (pd.weights_desc().get_size() + sizeof(float) - 1) / sizeof(float);
        float* wb = alloc_weight_floats(std::max<size_t>(wn, 1));
        if (!wb) return std::shared_ptr<const ConvPlan>();  // out of memory: the reference
        p->weights_buf = std::shared_ptr<float>(wb, [wn](float* q) {
          free_weight_floats(q, std::max<size_t>(wn, 1));
        });
        p->weights = memory(pd.weights_desc(), eng, wb);
      }
      dnnl::reorder(user_w, p->weights).execute(s, user_w, p->weights);
      if (has_bias_) {
        p->bias = memory(b_md, eng);
        std::memcpy(p->bias.get_data_handle(), b_.data<float>(), b_.nbytes());
      }
      s.wait();
      // The conv reads only its reordered copy now: an mmap'd plan's pages of W are dropped (read
      // back from the file if another input shape needs a new plan).
      packed_weight_done(w_.raw_data(), w_.nbytes());
    } catch (const dnnl::error& e) {
      (void)e;
      return std::shared_ptr<const ConvPlan>();  // oneDNN cannot do it: the reference will
    }
    return std::shared_ptr<const ConvPlan>(p);
  }

  Tensor w_, b_;
  bool has_bias_;
  EvalFn ref_;
  fused::Epilogue ep_;
  bool residual_;
  bool nhwc_;  // X, Z and Y are NHWC tensors (layout chosen per chain by the builder)
  std::string impl_;    // the oneDNN implementation to use; empty: oneDNN's default
  std::string tactic_;  // what tactic() reports
  mutable std::mutex mu_;
  mutable std::map<Shape, std::shared_ptr<const ConvPlan>> plans_;
  mutable std::mutex kwino_mu_;
  mutable std::shared_ptr<const WinogradConv> kwino_;  // Kiln's winograd, made at first use
  mutable std::shared_ptr<const Conv1x1> kc1_;         // Kiln's 1x1 conv, made at first use
  mutable std::shared_ptr<const Conv1x1> kim_;         // its im2col form, likewise
  mutable std::shared_ptr<const WinogradS2Conv> kws2_;  // Kiln's stride-2 winograd, likewise
};

// Transpose of a float32 tensor (rank 2..6, any perm) as a oneDNN reorder: the source is
// described with permuted strides over the output's dims.
class DnnlTranspose final : public Kernel {
 public:
  DnnlTranspose(std::vector<int64_t> perm, EvalFn ref) : perm_(std::move(perm)), ref_(ref) {
    // perm = (0, .., k-1, k+1, .., r-1, k): axis k moved to the end, the others in order.
    const int64_t r = static_cast<int64_t>(perm_.size());
    const int64_t k = perm_.back();
    bool moved = k < r - 1;
    for (int64_t i = 0; i + 1 < r && moved; ++i)
      moved = perm_[static_cast<size_t>(i)] == (i < k ? i : i + 1);
    moved_axis_ = moved ? k : -1;
  }
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* X = opt_tensor(in, 0);
    if (!X || X->dtype() != DataType::kFloat || X->rank() != perm_.size() || X->numel() == 0)
      return ref_(ctx, in, out);
    const Shape& xs = X->shape();
    const size_t r = xs.size();
    memory::dims xstr(r, 1);
    for (size_t i = r - 1; i-- > 0;) xstr[i] = xstr[i + 1] * xs[i + 1];
    Shape ys(r);
    memory::dims sstr(r);
    for (size_t k = 0; k < r; ++k) {
      ys[k] = xs[static_cast<size_t>(perm_[k])];
      sstr[k] = xstr[static_cast<size_t>(perm_[k])];
    }
    memory::dims ystr(r, 1);
    for (size_t i = r - 1; i-- > 0;) ystr[i] = ystr[i + 1] * ys[i + 1];
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(ys));
    // One axis k moved to the end with at most 4 elements (a network's NCHW image to NHWC):
    // Kiln's interleave; oneDNN's reorder takes ~3x as long there.
    if (moved_axis_ >= 0 && xs[static_cast<size_t>(moved_axis_)] <= 4) {
      int64_t outer = 1, inner = 1;
      for (size_t i = 0; i < r; ++i) {
        if (static_cast<int64_t>(i) < moved_axis_) outer *= xs[i];
        if (static_cast<int64_t>(i) > moved_axis_) inner *= xs[i];
      }
      if (transpose_few_to_last(X->data<float>(), Y.data<float>(), outer,
                                xs[static_cast<size_t>(moved_axis_)], inner, omp_threads())) {
        out[0] = Value(std::move(Y));
        return Status::ok();
      }
    }
    try {
      std::shared_ptr<const dnnl::reorder> ro;
      memory::dims yd(ys.begin(), ys.end());
      memory::desc smd(yd, dt::f32, sstr), dmd(yd, dt::f32, ystr);
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = cache_.find(xs);
        if (it == cache_.end())
          it = cache_.emplace(xs, std::make_shared<const dnnl::reorder>(make_reorder(smd, dmd))).first;
        ro = it->second;
      }
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      memory src(smd, eng, const_cast<float*>(X->data<float>())), dst(dmd, eng, Y.data<float>());
      ro->execute(s, src, dst);
      s.wait();
    } catch (const dnnl::error&) {
      return ref_(ctx, in, out);
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  std::vector<int64_t> perm_;
  int64_t moved_axis_ = -1;  // k where perm moves axis k to the end, else -1
  EvalFn ref_;
  mutable std::mutex mu_;
  mutable std::map<Shape, std::shared_ptr<const dnnl::reorder>> cache_;
};

// Softmax over one axis of a float32 tensor (oneDNN softmax, in place into a fresh output).
class DnnlSoftmax final : public Kernel {
 public:
  DnnlSoftmax(int64_t axis, EvalFn ref) : axis_(axis), ref_(ref) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* X = opt_tensor(in, 0);
    if (!X || X->dtype() != DataType::kFloat || X->rank() < 1 || X->rank() > 6 || X->numel() == 0)
      return ref_(ctx, in, out);
    const int64_t r = static_cast<int64_t>(X->rank());
    const int64_t axis = axis_ < 0 ? axis_ + r : axis_;
    if (axis < 0 || axis >= r) return ref_(ctx, in, out);
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(X->shape()));
    try {
      std::shared_ptr<const SmPlan> sm;
      memory::dims d(X->shape().begin(), X->shape().end());
      memory::desc md(d, dt::f32, plain_tag(d.size()));
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = cache_.find(X->shape());
        if (it == cache_.end()) {
          dnnl::softmax_forward::desc sd(dnnl::prop_kind::forward_inference, md, static_cast<int>(axis));
          // User scratchpad: the library's shared one races when contexts run concurrently.
          dnnl::primitive_attr attr;
          attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
          dnnl::softmax_forward::primitive_desc pd(sd, attr, cpu_engine());
          it = cache_.emplace(X->shape(), std::make_shared<const SmPlan>(
                                              SmPlan{dnnl::softmax_forward(pd), pd.scratchpad_desc()}))
                   .first;
        }
        sm = it->second;
      }
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      memory src(md, eng, const_cast<float*>(X->data<float>())), dst(md, eng, Y.data<float>());
      const size_t sbytes = sm->scratch_md.get_size();
      uint8_t* scratch = scratch_buffer(sbytes);
      if (!scratch && sbytes) return ctx.fail("out of memory for the oneDNN scratchpad");
      memory sp(sm->scratch_md, eng, scratch);
      sm->sm.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, sp}});
      s.wait();
    } catch (const dnnl::error&) {
      return ref_(ctx, in, out);
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  static tag plain_tag(size_t r) {
    switch (r) {
      case 1: return tag::a;
      case 2: return tag::ab;
      case 3: return tag::abc;
      case 4: return tag::abcd;
      case 5: return tag::abcde;
      default: return tag::abcdef;
    }
  }
  struct SmPlan {
    dnnl::softmax_forward sm;
    memory::desc scratch_md;
  };
  int64_t axis_;
  EvalFn ref_;
  mutable std::mutex mu_;
  mutable std::map<Shape, std::shared_ptr<const SmPlan>> cache_;
};

// LayerNormalization over the last axis (float32; scale and optional bias of that axis' size;
// no Mean / InvStdDev outputs) as oneDNN layer normalization.
class DnnlLayerNorm final : public Kernel {
 public:
  DnnlLayerNorm(float eps, EvalFn ref) : eps_(eps), ref_(ref) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* X = opt_tensor(in, 0);
    const Tensor* S = opt_tensor(in, 1);
    const Tensor* B = opt_tensor(in, 2);
    if (!X || !S || X->dtype() != DataType::kFloat || X->rank() < 2 || X->rank() > 5 || X->numel() == 0)
      return ref_(ctx, in, out);
    const int64_t r = static_cast<int64_t>(X->rank());
    int64_t axis = ctx.node.attr_int("axis", -1);
    if (axis < 0) axis += r;
    const int64_t C = X->dim(static_cast<int>(r - 1));
    if (axis != r - 1 || S->dtype() != DataType::kFloat || S->numel() != C ||
        (B && (B->dtype() != DataType::kFloat || B->numel() != C)))
      return ref_(ctx, in, out);
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(X->shape()));
    // Kiln's kernel first: oneDNN 2.6's took 27-47 us per BERT-base LayerNormalization (128 x
    // 768) in the model on 2 Zen 4 cores.
    if (layernorm_last_axis(X->data<float>(), S->data<float>(), B ? B->data<float>() : nullptr,
                            Y.data<float>(), X->numel() / C, C, eps_, omp_threads())) {
      out[0] = Value(std::move(Y));
      return Status::ok();
    }
    try {
      std::shared_ptr<const LnPlan> p;
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto key = std::make_pair(X->shape(), B != nullptr);
        auto it = cache_.find(key);
        if (it == cache_.end()) {
          auto np = std::make_shared<LnPlan>();
          memory::dims d(X->shape().begin(), X->shape().end());
          memory::dims st(d.size(), 1);
          for (size_t i = d.size() - 1; i-- > 0;) st[i] = st[i + 1] * d[i + 1];
          np->md = memory::desc(d, dt::f32, st);
          np->sd = memory::desc({C}, dt::f32, tag::a);
          auto flags = dnnl::normalization_flags::use_scale;
          if (B) flags = flags | dnnl::normalization_flags::use_shift;
          dnnl::layer_normalization_forward::desc ld(dnnl::prop_kind::forward_inference, np->md, eps_, flags);
          dnnl::layer_normalization_forward::primitive_desc pd(ld, cpu_engine());
          np->ln = dnnl::layer_normalization_forward(pd);
          it = cache_.emplace(key, np).first;
        }
        p = it->second;
      }
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      std::unordered_map<int, memory> args = {
          {DNNL_ARG_SRC, memory(p->md, eng, const_cast<float*>(X->data<float>()))},
          {DNNL_ARG_DST, memory(p->md, eng, Y.data<float>())},
          {DNNL_ARG_SCALE, memory(p->sd, eng, const_cast<float*>(S->data<float>()))}};
      if (B) args[DNNL_ARG_SHIFT] = memory(p->sd, eng, const_cast<float*>(B->data<float>()));
      p->ln.execute(s, args);
      s.wait();
    } catch (const dnnl::error&) {
      return ref_(ctx, in, out);
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  struct LnPlan {
    dnnl::layer_normalization_forward ln;
    memory::desc md, sd;
  };
  float eps_;
  EvalFn ref_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<Shape, bool>, std::shared_ptr<const LnPlan>> cache_;
};

// MaxPool (2D, no Indices output) and GlobalAveragePool of float32 tensors as oneDNN pooling
// (pooling_v2: dilated windows too). NCHW for the ONNX ops; NHWC for kiln.PoolNHWC (the layout
// of the conv chain around it; oneDNN's nhwc pooling reads it as is).
class DnnlPool final : public Kernel {
 public:
  DnnlPool(bool global_avg, bool nhwc, EvalFn ref) : global_avg_(global_avg), nhwc_(nhwc), ref_(ref) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* X = opt_tensor(in, 0);
    if (!X || X->dtype() != DataType::kFloat || X->rank() != 4 || X->numel() == 0)
      return ref_(ctx, in, out);
    std::shared_ptr<const PoolPlan> p;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = cache_.find(X->shape());
      if (it == cache_.end()) it = cache_.emplace(X->shape(), build(ctx.node, *X)).first;
      p = it->second;
    }
    if (!p) return ref_(ctx, in, out);
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(p->ys));
    // NHWC max pooling: Kiln's kernel where it applies (each thread a contiguous run of output
    // rows; oneDNN's ran as slowly on 16 Xeon threads as on 2 Zen 4 cores, ~0.1 ms for
    // ResNet-50's stem pool).
    if (nhwc_ && !global_avg_ &&
        maxpool_nhwc(X->data<float>(), Y.data<float>(), p->ys[0], X->dim(1), X->dim(2), X->dim(3),
                     p->ys[1], p->ys[2], p->win, omp_threads())) {
      out[0] = Value(std::move(Y));
      return Status::ok();
    }
    try {
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      p->pool.execute(s, {{DNNL_ARG_SRC, memory(p->src, eng, const_cast<float*>(X->data<float>()))},
                          {DNNL_ARG_DST, memory(p->dst, eng, Y.data<float>())}});
      s.wait();
    } catch (const dnnl::error&) {
      return ref_(ctx, in, out);
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  struct PoolPlan {
    dnnl::pooling_v2_forward pool;
    memory::desc src, dst;
    Shape ys;
    PoolWindow win;  // NHWC max pooling: maxpool_nhwc's window
  };
  std::shared_ptr<const PoolPlan> build(const Node& n, const Tensor& X) const {
    const Shape& xs = X.shape();
    // Logical (oneDNN) dims N, C, H, W whatever the layout.
    const int64_t N = xs[0], C = xs[nhwc_ ? 3 : 1], H = xs[nhwc_ ? 1 : 2], W = xs[nhwc_ ? 2 : 3];
    memory::dims k, st, dil, pl, pr, od;
    if (global_avg_) {
      k = {H, W};
      st = {1, 1};
      dil = {0, 0};
      pl = {0, 0};
      pr = {0, 0};
      od = {1, 1};
    } else {
      auto win = nn::make_window(n, Shape{H, W}, {}, true);
      if (!win.is_ok()) return nullptr;
      const nn::Window& w = win.value();
      if (w.nsp != 2) return nullptr;
      for (size_t i = 0; i < 2; ++i) {
        const int64_t d = w.dilations.size() == 2 ? w.dilations[i] : 1;
        if (d < 1) return nullptr;
        const int64_t ek = (w.kernel[i] - 1) * d + 1;  // the window's reach
        if (w.out[i] <= 0 || w.pad_begin[i] >= ek) return nullptr;
        k.push_back(w.kernel[i]);
        st.push_back(w.strides[i]);
        dil.push_back(d - 1);  // oneDNN counts the gaps: 0 is a dense window
        pl.push_back(w.pad_begin[i]);
        // ceil_mode windows may reach past the given end padding: pad to what the output needs.
        pr.push_back((w.out[i] - 1) * w.strides[i] + ek - (i == 0 ? H : W) - w.pad_begin[i]);
        od.push_back(w.out[i]);
      }
      // Every window must see at least one input element (oneDNN's and ONNX's empty-window
      // results differ).
      for (size_t i = 0; i < 2; ++i) {
        const int64_t len = i == 0 ? H : W;
        for (int64_t o = 0; o < od[i]; ++o) {
          bool any = false;
          for (int64_t j = 0; j < k[i] && !any; ++j) {
            const int64_t x = o * st[i] - pl[i] + j * (dil[i] + 1);
            any = x >= 0 && x < len;
          }
          if (!any) return nullptr;
        }
      }
    }
    auto p = std::make_shared<PoolPlan>();
    if (nhwc_ && !global_avg_) {
      p->win.kh = k[0], p->win.kw = k[1], p->win.sh = st[0], p->win.sw = st[1];
      p->win.dh = dil[0] + 1, p->win.dw = dil[1] + 1, p->win.pt = pl[0], p->win.pl = pl[1];
    }
    try {
      const tag t = nhwc_ ? tag::nhwc : tag::nchw;
      memory::dims sd = {N, C, H, W}, dd = {N, C, od[0], od[1]};
      p->src = memory::desc(sd, dt::f32, t);
      p->dst = memory::desc(dd, dt::f32, t);
      // GlobalAveragePool's [N, C, 1, 1] is the same in both layouts.
      p->ys = nhwc_ && !global_avg_ ? Shape{N, od[0], od[1], C} : Shape{N, C, od[0], od[1]};
      dnnl::pooling_v2_forward::desc pdsc(dnnl::prop_kind::forward_inference,
                                          global_avg_ ? dnnl::algorithm::pooling_avg_exclude_padding
                                                      : dnnl::algorithm::pooling_max,
                                          p->src, p->dst, st, k, dil, pl, pr);
      p->pool = dnnl::pooling_v2_forward(dnnl::pooling_v2_forward::primitive_desc(pdsc, cpu_engine()));
    } catch (const dnnl::error&) {
      return nullptr;
    }
    return p;
  }
  bool global_avg_, nhwc_;
  EvalFn ref_;
  mutable std::mutex mu_;
  mutable std::map<Shape, std::shared_ptr<const PoolPlan>> cache_;
};

// Add / Sub / Mul / Div of float32 tensors as a oneDNN binary primitive: src1 broadcasts (dims of
// 1, right-aligned); when only src0 would broadcast, Add/Mul swap their operands.
class DnnlBinary final : public Kernel {
 public:
  DnnlBinary(dnnl::algorithm alg, bool commutative, EvalFn ref) : alg_(alg), comm_(commutative), ref_(ref) {}
  Status run(OpContext& ctx, std::span<const Value> in, std::span<Value> out) const override {
    const Tensor* A = opt_tensor(in, 0);
    const Tensor* B = opt_tensor(in, 1);
    if (!A || !B || A->dtype() != DataType::kFloat || B->dtype() != DataType::kFloat || A->numel() == 0 ||
        B->numel() == 0 || A->rank() > 6 || B->rank() > 6 || A->numel() < 4096)
      return ref_(ctx, in, out);  // small tensors: the reference is cheaper than a primitive call
    const size_t r = std::max(A->rank(), B->rank());
    auto padded = [r](const Shape& s) {
      Shape p(r - s.size(), 1);
      p.insert(p.end(), s.begin(), s.end());
      return p;
    };
    Shape as = padded(A->shape()), bs = padded(B->shape());
    auto covers = [](const Shape& big, const Shape& small) {
      for (size_t i = 0; i < big.size(); ++i)
        if (small[i] != big[i] && small[i] != 1) return false;
      return true;
    };
    if (!covers(as, bs)) {
      if (!comm_ || !covers(bs, as)) return ref_(ctx, in, out);
      std::swap(A, B);
      std::swap(as, bs);
    }
    if (r == 0) return ref_(ctx, in, out);
    KILN_ASSIGN_OR_RETURN(Tensor Y, new_output(as));
    try {
      std::shared_ptr<const dnnl::binary> prim;
      auto desc_of = [](const Shape& s) {
        memory::dims d(s.begin(), s.end()), st(s.size(), 1);
        for (size_t i = s.size() - 1; i-- > 0;) st[i] = st[i + 1] * d[i + 1];
        return memory::desc(d, dt::f32, st);
      };
      memory::desc ad = desc_of(as), bd = desc_of(bs);
      {
        std::lock_guard<std::mutex> lock(mu_);
        auto key = std::make_pair(as, bs);
        auto it = cache_.find(key);
        if (it == cache_.end()) {
          dnnl::binary::desc d(alg_, ad, bd, ad);
          it = cache_.emplace(key, std::make_shared<const dnnl::binary>(
                                       dnnl::binary::primitive_desc(d, cpu_engine()))).first;
        }
        prim = it->second;
      }
      const dnnl::engine& eng = cpu_engine();
      dnnl::stream s(eng);
      prim->execute(s, {{DNNL_ARG_SRC_0, memory(ad, eng, const_cast<float*>(A->data<float>()))},
                        {DNNL_ARG_SRC_1, memory(bd, eng, const_cast<float*>(B->data<float>()))},
                        {DNNL_ARG_DST, memory(ad, eng, Y.data<float>())}});
      s.wait();
    } catch (const dnnl::error&) {
      return ref_(ctx, in, out);
    }
    out[0] = Value(std::move(Y));
    return Status::ok();
  }

 private:
  dnnl::algorithm alg_;
  bool comm_;
  EvalFn ref_;
  mutable std::mutex mu_;
  mutable std::map<std::pair<Shape, Shape>, std::shared_ptr<const dnnl::binary>> cache_;
};

}  // namespace

Result<std::shared_ptr<const Kernel>> prepare_dnnl_binary(const Node& n, EvalFn ref) {
  if (n.inputs.size() != 2 || n.outputs.size() != 1) return std::shared_ptr<const Kernel>();
  dnnl::algorithm alg;
  bool comm = false;
  if (n.op_type == "Add") alg = dnnl::algorithm::binary_add, comm = true;
  else if (n.op_type == "Mul") alg = dnnl::algorithm::binary_mul, comm = true;
  else if (n.op_type == "Sub") alg = dnnl::algorithm::binary_sub;
  else if (n.op_type == "Div") alg = dnnl::algorithm::binary_div;
  else return std::shared_ptr<const Kernel>();
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlBinary>(alg, comm, ref));
}

Result<std::shared_ptr<const Kernel>> prepare_dnnl_pool(const Node& n, EvalFn ref) {
  if (n.inputs.size() != 1) return std::shared_ptr<const Kernel>();
  bool nhwc = false;
  std::string op = n.op_type;
  if (n.domain == "kiln" && n.op_type == "PoolNHWC") {
    nhwc = true;
    op = n.attr_string("mode", "");
    if (op != "MaxPool" && op != "GlobalAveragePool") return std::shared_ptr<const Kernel>();
  }
  if (op == "GlobalAveragePool")
    return std::shared_ptr<const Kernel>(std::make_shared<DnnlPool>(true, nhwc, ref));
  for (size_t i = 1; i < n.outputs.size(); ++i)
    if (!n.outputs[i].empty()) return std::shared_ptr<const Kernel>();
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlPool>(false, nhwc, ref));
}

Result<std::shared_ptr<const Kernel>> prepare_dnnl_layernorm(const Node& n, EvalFn ref) {
  for (size_t i = 1; i < n.outputs.size(); ++i)
    if (!n.outputs[i].empty()) return std::shared_ptr<const Kernel>();
  if (n.inputs.size() < 2 || n.inputs.size() > 3) return std::shared_ptr<const Kernel>();
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlLayerNorm>(n.attr_float("epsilon", 1e-5f), ref));
}

Result<std::shared_ptr<const Kernel>> prepare_dnnl_transpose(const Node& n, EvalFn ref) {
  std::vector<int64_t> perm = n.attr_ints("perm");
  if (perm.size() < 2 || perm.size() > 6) return std::shared_ptr<const Kernel>();
  std::vector<bool> seen(perm.size(), false);
  for (int64_t p : perm) {
    if (p < 0 || p >= static_cast<int64_t>(perm.size()) || seen[static_cast<size_t>(p)])
      return std::shared_ptr<const Kernel>();
    seen[static_cast<size_t>(p)] = true;
  }
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlTranspose>(std::move(perm), ref));
}

Result<std::shared_ptr<const Kernel>> prepare_dnnl_softmax(const Node& n, EvalFn ref) {
  if (n.inputs.size() != 1) return std::shared_ptr<const Kernel>();
  return std::shared_ptr<const Kernel>(std::make_shared<DnnlSoftmax>(n.attr_int("axis", -1), ref));
}

// Kernel outputs: 64-byte aligned, not zero-filled (every element is written), and malloc keeps
// freed blocks for reuse instead of returning them to the OS, so steady-state runs don't page-fault.
// TODO(arena): the executor's planned arena replaces this.
Result<Tensor> new_output(const Shape& shape) {
  static const bool tuned = [] {
    mallopt(M_MMAP_THRESHOLD, 512 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    return true;
  }();
  (void)tuned;
  // Counted against the process memory limit (--maxMemory) like every tensor.
  return Tensor::create_uninitialized(DataType::kFloat, shape);
}

// oneDNN scratchpad memory: one grow-only buffer per thread (a run is synchronous on its thread).
uint8_t* scratch_buffer(size_t bytes) {
  thread_local std::unique_ptr<uint8_t[]> buf;
  thread_local size_t cap = 0;
  if (bytes > cap) {
    buf.reset(new (std::nothrow) uint8_t[bytes]);
    cap = buf ? bytes : 0;
  }
  return buf.get();
}

const dnnl::engine& cpu_engine() {
  static const dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

Status run_dnnl_conv_z_owned(const Kernel& k, OpContext& ctx, std::span<const Value> in,
                             std::span<Value> out) {
  if (auto* c = dynamic_cast<const DnnlConv*>(&k)) return c->run_z_owned(ctx, in, out);
  return k.run(ctx, in, out);
}

Result<std::shared_ptr<const Kernel>> prepare_dnnl_conv(const Node& n, const ConstantLookup& constants,
                                                        EvalFn ref) {
  std::shared_ptr<const Kernel> none;
  const bool fused_op = n.op_type == "FusedConv";
  if (n.inputs.size() < 2 || n.inputs.size() > (fused_op ? 4u : 3u)) return none;
  const Tensor* W = constants(n.inputs[1]);
  if (!W || W->dtype() != DataType::kFloat || W->rank() != 4 || W->numel() == 0) return none;
  const Tensor* B = nullptr;
  if (n.has_input(2)) {
    B = constants(n.inputs[2]);
    if (!B || B->dtype() != DataType::kFloat || B->numel() != W->dim(0)) return none;
  }
  fused::Epilogue ep;
  if (fused_op) {
    auto e = fused::read_epilogue(n);
    if (!e.is_ok()) return none;
    ep = e.value();
  }
  bool residual = fused_op && n.has_input(3);
  auto k = std::make_shared<DnnlConv>(n, *W, B ? *B : Tensor(), B != nullptr, ref, ep, residual);
  if (n.has_attr("kiln_tune_shape") && !n.has_attr("kiln_tactic")) {
    std::vector<int64_t> ts = n.attr_ints("kiln_tune_shape");
    bool ok = ts.size() == 4;
    for (int64_t d : ts) ok = ok && d > 0 && d <= (int64_t(1) << 24);
    if (ok) k->tune(n, Shape(ts.begin(), ts.end()));
  }
  return std::shared_ptr<const Kernel>(k);
}

}  // namespace cpu
}  // namespace kiln

#endif  // KILN_WITH_DNNL
