// Concurrency: N threads, each with its own ExecutionContext on one shared Engine, thousands of
// runs in all; every output must be bit-identical to a single-threaded reference run. Meant to be
// run under TSan as well (scripts/ci_reliability.sh). Also: the process-wide memory limit.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/file.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"
#include "kiln/tensor.h"
#include "onnx/tensor_file.h"

using namespace kiln;

namespace {

std::string node_dir(const std::string& c) {
  return std::string(KILN_SHARED_DIR) + "/onnx-backend-tests/node/" + c;
}

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  char* end = nullptr;
  long r = std::strtol(v, &end, 10);
  return (end && *end == 0 && r > 0 && r < 1000000) ? static_cast<int>(r) : dflt;
}

struct Case {
  std::string name;
  std::shared_ptr<Engine> engine;
  std::vector<std::pair<std::string, Tensor>> inputs;
  std::vector<std::vector<uint8_t>> reference;  // output bytes, in engine output order
};

// Runs once on `ctx`; returns the outputs' bytes (empty vector on failure, with `err` set).
std::vector<std::vector<uint8_t>> run_once(ExecutionContext& ctx, const Case& c, std::string* err) {
  std::vector<std::vector<uint8_t>> outs;
  for (auto& [name, t] : c.inputs) {
    Status st = ctx.set_input(name, t);
    if (!st.is_ok()) { *err = st.to_string(); return {}; }
  }
  Status st = ctx.enqueue();
  if (!st.is_ok()) { *err = st.to_string(); return {}; }
  for (auto& d : c.engine->outputs()) {
    auto t = ctx.get_output(d.name);
    if (!t.is_ok()) { *err = t.status().to_string(); return {}; }
    const uint8_t* p = static_cast<const uint8_t*>(t->raw_data());
    outs.emplace_back(p, p + t->nbytes());
  }
  return outs;
}

bool load_case(const std::string& name, Case* c) {
  std::string dir = node_dir(name);
  if (!file_exists(dir + "/model.onnx")) return false;
  auto plan = build_plan_from_onnx(dir + "/model.onnx", BuilderConfig{});
  if (!plan.is_ok()) return false;
  auto engine = Engine::deserialize(plan->data(), plan->size());
  if (!engine.is_ok()) return false;
  c->engine = *engine;
  c->name = name;
  for (size_t k = 0; k < c->engine->inputs().size(); ++k) {
    auto v = read_value_file(dir + "/test_data_set_0/input_" + std::to_string(k) + ".pb", "tensor");
    if (!v.is_ok() || !v->is_tensor()) return false;
    c->inputs.emplace_back(c->engine->inputs()[k].name, v->tensor);
  }
  auto ctx = c->engine->create_execution_context();
  if (!ctx.is_ok()) return false;
  std::string err;
  c->reference = run_once(**ctx, *c, &err);
  return err.empty() && !c->reference.empty();
}

}  // namespace

TEST(Concurrency, SharedEngineBitIdentical) {
  const int threads = env_int("KILN_CONCURRENCY_THREADS", 4);
  const int iters = env_int("KILN_CONCURRENCY_ITERS", 750);
  const char* names[] = {"test_conv_with_strides_padding", "test_gemm_all_attributes",
                         "test_softmax_axis_1",            "test_matmul_2d",
                         "test_maxpool_2d_pads",           "test_batchnorm_epsilon",
                         "test_lstm_defaults",             "test_reduce_mean_default_axes_keepdims_example",
                         "test_layer_normalization_4d_axis3", "test_globalaveragepool",
                         "test_softmax_large_number"};
  std::vector<Case> cases;
  for (const char* n : names) {
    Case c;
    if (load_case(n, &c)) cases.push_back(std::move(c));
  }
  if (cases.empty()) GTEST_SKIP() << "no backend test models under " << KILN_SHARED_DIR;
  ASSERT_GE(cases.size(), 4u) << "most concurrency models failed to build";

  std::atomic<int> runs{0}, mismatches{0}, failures{0};
  std::vector<std::atomic<int>> per_case(cases.size());
  std::vector<std::string> first_error(static_cast<size_t>(threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      // One context per (thread, case), reused across iterations, as an application would.
      std::vector<std::unique_ptr<ExecutionContext>> ctxs;
      for (auto& c : cases) {
        auto ctx = c.engine->create_execution_context();
        if (!ctx.is_ok()) { failures++; return; }
        ctxs.push_back(std::move(*ctx));
      }
      for (int i = 0; i < iters; ++i) {
        // Stagger the order per thread so that different kernels overlap in time.
        size_t k = static_cast<size_t>(i + t) % cases.size();
        std::string err;
        auto outs = run_once(*ctxs[k], cases[k], &err);
        runs++;
        if (!err.empty()) {
          if (failures++ == 0) first_error[static_cast<size_t>(t)] = err;
          continue;
        }
        if (outs != cases[k].reference) {
          mismatches++;
          per_case[k]++;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  std::string errs;
  for (auto& e : first_error) if (!e.empty()) errs += e + "\n";
  EXPECT_EQ(failures.load(), 0) << errs;
  std::string which;
  for (size_t k = 0; k < cases.size(); ++k)
    if (per_case[k]) which += " " + cases[k].name + "=" + std::to_string(per_case[k].load());
  EXPECT_EQ(mismatches.load(), 0) << "outputs differ from the single-threaded reference:" << which;
  EXPECT_EQ(runs.load(), threads * iters);
  std::printf("[concurrency] %d threads x %d runs over %zu engines: %d runs, %d mismatches\n",
              threads, iters, cases.size(), runs.load(), mismatches.load());
}

TEST(Concurrency, ContextsCreatedConcurrently) {
  Case c;
  if (!load_case("test_conv_with_strides_padding", &c)) GTEST_SKIP() << "model missing";
  std::atomic<int> bad{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t) {
    pool.emplace_back([&] {
      for (int i = 0; i < 25; ++i) {
        auto ctx = c.engine->create_execution_context();
        if (!ctx.is_ok()) { bad++; continue; }
        std::string err;
        if (run_once(**ctx, c, &err) != c.reference) bad++;
      }
    });
  }
  for (auto& th : pool) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST(MemoryLimit, RefusesAllocationPastTheLimitAndReleases) {
  const uint64_t saved = memory_limit();
  const uint64_t base = memory_in_use();
  set_memory_limit(base + (uint64_t{4} << 20));
  {
    auto ok = Tensor::create(DataType::kFloat, {512, 1024});  // 2 MiB
    ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
    EXPECT_GE(memory_in_use(), base + (uint64_t{2} << 20));
    auto big = Tensor::create(DataType::kFloat, {1024, 1024});  // 4 MiB more: past the limit
    ASSERT_FALSE(big.is_ok());
    EXPECT_EQ(big.status().code(), StatusCode::kOutOfMemory);
    EXPECT_NE(big.status().to_string().find("4194304"), std::string::npos) << big.status().to_string();
    EXPECT_NE(big.status().to_string().find("limit"), std::string::npos) << big.status().to_string();
  }
  EXPECT_EQ(memory_in_use(), base);  // released by ~Storage
  auto again = Tensor::create(DataType::kFloat, {1024, 1024});
  EXPECT_TRUE(again.is_ok());
  set_memory_limit(saved);
}

TEST(MemoryLimit, HugeShapesAreRefusedWithoutAllocating) {
  auto a = Tensor::create(DataType::kFloat, {int64_t{1} << 62});
  EXPECT_FALSE(a.is_ok());
  auto b = Tensor::create(DataType::kDouble, {int64_t{1} << 31, int64_t{1} << 31, 4});
  EXPECT_FALSE(b.is_ok());
  auto c = Tensor::create(DataType::kFloat, {-1, 4});
  EXPECT_FALSE(c.is_ok());
}
