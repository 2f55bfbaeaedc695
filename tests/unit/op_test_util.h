// Helpers shared by the per-family op tests: attribute constructors, a one-node runner over an
// op's reference evaluation, and the checks the optimized-kernel tests share.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "base/file.h"
#include "ir/graph.h"
#include "kiln/logger.h"
#include "ops/op.h"

namespace kiln::test {

// A float32 tensor of shape s, uniform in [lo, hi).
inline Tensor rand_tensor(std::mt19937& rng, const Shape& s, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::create(DataType::kFloat, s).value();
  std::uniform_real_distribution<float> d(lo, hi);
  for (auto& v : t.span<float>()) v = d(rng);
  return t;
}

// A graph node (opset 17 unless set afterwards).
inline Node node(const std::string& name, const std::string& op, std::vector<std::string> in,
                 std::vector<std::string> out, const std::string& domain = "") {
  Node n;
  n.name = name;
  n.op_type = op;
  n.domain = domain;
  n.opset = 17;
  n.inputs = std::move(in);
  n.outputs = std::move(out);
  return n;
}

inline Attribute int_attr(const std::string& name, int64_t v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInt;
  a.i = v;
  return a;
}
inline Attribute float_attr(const std::string& name, float v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kFloat;
  a.f = v;
  return a;
}
inline Attribute ints_attr(const std::string& name, std::vector<int64_t> v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInts;
  a.ints = std::move(v);
  return a;
}
inline Attribute str_attr(const std::string& name, const std::string& v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kString;
  a.s = v;
  return a;
}
inline Attribute graph_attr(const std::string& name, std::shared_ptr<Graph> g) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kGraph;
  a.g = std::move(g);
  return a;
}

// Runs the default-domain op `op` on `inputs` (kNone = omitted) and returns `nout` outputs.
inline Result<std::vector<Value>> run(const std::string& op, std::vector<Attribute> attrs,
                                      std::vector<Value> inputs, size_t nout = 1) {
  Node node;
  node.name = op + "_test";
  node.op_type = op;
  node.attrs = std::move(attrs);
  const OpDef* def = find_op("", op);
  if (!def) return not_found("op " + op);
  for (size_t i = 0; i < inputs.size(); ++i)
    node.inputs.push_back(inputs[i].is_none() ? "" : "in" + std::to_string(i));
  for (size_t i = 0; i < nout; ++i) node.outputs.push_back("out" + std::to_string(i));
  OpContext ctx{node, nullptr};
  std::vector<Value> outs(nout);
  KILN_RETURN_IF_ERROR(def->eval(ctx, inputs, outs));
  return outs;
}

// A reference fallback that fails: proves an optimized kernel ran, not the reference.
inline Status fail_ref(OpContext& ctx, std::span<const Value>, std::span<Value>) {
  return ctx.fail("the reference kernel ran instead of the optimized one");
}

// max |got - want| / max |want| of two float32 tensors (1e9 on a shape or NaN mismatch).
inline double rel_err(const Tensor& got, const Tensor& want) {
  EXPECT_EQ(got.shape(), want.shape());
  if (got.shape() != want.shape() || got.numel() == 0) return 1e9;
  auto a = got.span<const float>(), b = want.span<const float>();
  double err = 0, range = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return 1e9;
    err = std::max(err, std::fabs(double(a[i]) - b[i]));
    range = std::max(range, std::fabs(double(b[i])));
  }
  return err / range;
}

// A logger that collects verbose messages for the lifetime of the object.
class LogCapture final : public Logger {
 public:
  LogCapture() { set_logger(this); }
  ~LogCapture() override { set_logger(nullptr); }
  void log(Severity, const std::string& m) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += m + "\n";
  }
  Severity min_severity() const override { return Severity::kVerbose; }
  std::string text() const {
    std::lock_guard<std::mutex> lock(mu_);
    return text_;
  }

 private:
  mutable std::mutex mu_;
  std::string text_;
};

// n floats uniform in [lo, hi) from a seeded generator.
inline std::vector<float> uniform(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& f : v) f = d(rng);
  return v;
}

// Rewrites every oneDNN-conv line of the text timing cache at `path` to `tactic`, so that the
// next build with that cache uses it (tests of a forced tactic).
inline Status force_conv_tactic(const std::string& path, const std::string& tactic) {
  auto f = read_file(path);
  if (!f.is_ok()) return f.status();
  const std::string text(f->begin(), f->end());
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t tab = line.rfind('\t');
    if (!line.empty() && line[0] != '#' && tab != std::string::npos &&
        line.find("cpu.conv.onednn.", tab) != std::string::npos)
      line = line.substr(0, tab + 1) + tactic;
    out += line + "\n";
  }
  return write_file(path, out.data(), out.size());
}

// How many layers of `layers` (Engine::describe_layers) carry tactic `tactic`.
inline size_t count_tactic(const std::string& layers, const std::string& tactic) {
  size_t count = 0;
  const std::string tok = "[" + tactic + "]";
  for (size_t at = layers.find(tok); at != std::string::npos; at = layers.find(tok, at + 1)) ++count;
  return count;
}

}  // namespace kiln::test
