// Helpers shared by tests that build whole engines in process: build a Model for a device and
// copy a float32 output (host or CUDA) back to a vector.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "builder/builder_internal.h"
#include "kiln/builder.h"
#include "kiln/runtime.h"

#if defined(KILN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace kiln::test {

// The engine of `m` built for `device` (fp16 on devices when asked), or nullptr after a test
// failure naming the build or load error.
inline std::shared_ptr<Engine> build_engine(Model m, const std::string& device, bool fp16 = false) {
  BuilderConfig c;
  c.device = device;
  c.fp16 = fp16;
  auto plan = build_plan(m, c, 7);
  EXPECT_TRUE(plan.is_ok()) << plan.status().message();
  if (!plan.is_ok()) return nullptr;
  auto e = Engine::deserialize(plan->data(), plan->size());
  EXPECT_TRUE(e.is_ok()) << e.status().message();
  return e.is_ok() ? e.value() : nullptr;
}

// A float32 tensor's values, copied from the GPU when it lives there.
inline std::vector<float> host_floats(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  if (v.empty()) return v;
  if (!t.on_device()) {
    std::memcpy(v.data(), t.raw_data(), v.size() * sizeof(float));
  } else {
#if defined(KILN_WITH_CUDA)
    EXPECT_EQ(cudaMemcpy(v.data(), t.raw_data(), v.size() * sizeof(float), cudaMemcpyDeviceToHost),
              cudaSuccess);
#else
    ADD_FAILURE() << "a device tensor in a build without CUDA";
#endif
  }
  return v;
}

// One run of context c (one input "x", one output "y") on x; y as floats, or {} after a test
// failure.
inline std::vector<float> run_ctx_xy(ExecutionContext& c, const Tensor& x) {
  Status st = c.set_input("x", x);
  if (st.is_ok()) st = c.enqueue();
  if (st.is_ok()) st = c.synchronize();
  EXPECT_TRUE(st.is_ok()) << st.message();
  if (!st.is_ok()) return {};
  auto y = c.get_output("y");
  EXPECT_TRUE(y.is_ok()) << y.status().message();
  return y.is_ok() ? host_floats(y.value()) : std::vector<float>{};
}

// Runs engine e (one input "x", one output "y") on x in a fresh context; y as floats, or {} after
// a test failure.
inline std::vector<float> run_xy(Engine& e, const Tensor& x) {
  auto ctx = e.create_execution_context();
  EXPECT_TRUE(ctx.is_ok()) << ctx.status().message();
  if (!ctx.is_ok()) return {};
  return run_ctx_xy(*ctx.value(), x);
}

// Worst |got - want| over max(1, max |want|); 1e30 when the sizes differ.
inline double scaled_err(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return 1e30;
  double worst = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    worst = std::max(worst, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  return worst / scale;
}

}  // namespace kiln::test
