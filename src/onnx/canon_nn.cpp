// Opset canonicalization of the nn family. Canonical forms (what kernels in src/ops/nn see):
//  - Softmax / LogSoftmax / Hardmax: opset-13 form (`axis`, default -1). Opset < 13 models get
//    `axis` made explicit (old default 1) plus the int attribute `coerce_2d = 1`: the input is
//    flattened to 2-D at `axis` and normalized over the whole trailing block.
//  - Dropout: opset-12 form, inputs (data, ratio?, training_mode?). Older `ratio` attribute
//    becomes a constant input; `is_test` / `consumed_inputs` are dropped (inference).
//  - Upsample (any opset) -> Resize with inputs (X, "", scales), mode nearest|linear,
//    coordinate_transformation_mode = asymmetric, nearest_mode = floor.
//  - Resize: opset-19 form, inputs (X, roi?, scales?, sizes?). Opset 10 (X, scales) is rewritten
//    to asymmetric / floor like Upsample.
//  - GroupNormalization opset 18 (scale/bias per group) keeps its inputs and gets
//    `per_group_affine = 1`; opset 21 form is per channel.
//  - BatchNormalization: opset-15 form; `spatial`, `is_test`, `consumed_inputs` are dropped
//    (spatial = 0 is unsupported).
//  - RoiAlign opset < 16: coordinate_transformation_mode = output_half_pixel (old behavior).
//  - LpPool: `p` as int (opset 1 had a float). Gemm: legacy `broadcast` attribute dropped.
#include <cmath>

#include "onnx/canonicalize.h"

namespace kiln {

namespace {
void set_input(Node& n, size_t i, const std::string& name) {
  if (n.inputs.size() <= i) n.inputs.resize(i + 1);
  n.inputs[i] = name;
}
void set_str(Node& n, const char* name, const std::string& v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kString;
  a.s = v;
  n.set_attr(a);
}
void set_int(Node& n, const char* name, int64_t v) {
  Attribute a;
  a.name = name;
  a.kind = Attribute::Kind::kInt;
  a.i = v;
  n.set_attr(a);
}
}  // namespace

Status canonicalize_nn(Node& n, int64_t opset, CanonContext& ctx) {
  if (!n.domain.empty() && n.domain != "ai.onnx") return Status::ok();
  const std::string& op = n.op_type;
  if (op == "Softmax" || op == "LogSoftmax" || op == "Hardmax") {
    if (opset < 13) {
      set_int(n, "axis", n.attr_int("axis", 1));
      set_int(n, "coerce_2d", 1);
    }
    return Status::ok();
  }
  if (op == "Dropout") {
    if (opset < 12) {
      if (const Attribute* r = n.attr("ratio")) {
        const float ratio = r->f;
        n.remove_attr("ratio");
        set_input(n, 1, ctx.add_constant(Tensor::scalar<float>(ratio), n.name + "_ratio"));
      }
      n.remove_attr("is_test");
      n.remove_attr("consumed_inputs");
    }
    return Status::ok();
  }
  if (op == "Upsample") {
    std::string mode = n.attr_string("mode", "nearest");
    if (mode == "bilinear") mode = "linear";
    if (mode != "nearest" && mode != "linear")
      return unsupported(n.where() + ": Upsample mode '" + mode + "'");
    if (const Attribute* s = n.attr("scales")) {
      std::vector<float> sc = s->floats;
      n.remove_attr("scales");
      Tensor t = Tensor::from_vector<float>({static_cast<int64_t>(sc.size())}, sc);
      set_input(n, 1, ctx.add_constant(t, n.name + "_scales"));
    }
    if (n.inputs.size() < 2 || n.inputs[1].empty())
      return unsupported(n.where() + ": Upsample without scales");
    const std::string scales = n.inputs[1];
    n.inputs = {n.inputs[0], "", scales};
    n.op_type = "Resize";
    n.remove_attr("height_scale");
    n.remove_attr("width_scale");
    set_str(n, "mode", mode);
    set_str(n, "coordinate_transformation_mode", "asymmetric");
    set_str(n, "nearest_mode", "floor");
    return Status::ok();
  }
  if (op == "Resize") {
    if (opset < 11) {
      if (n.inputs.size() >= 2) {
        const std::string scales = n.inputs[1];
        n.inputs = {n.inputs[0], "", scales};
      }
      set_str(n, "coordinate_transformation_mode", "asymmetric");
      set_str(n, "nearest_mode", "floor");
    }
    return Status::ok();
  }
  if (op == "GroupNormalization") {
    if (opset < 21) set_int(n, "per_group_affine", 1);
    return Status::ok();
  }
  if (op == "BatchNormalization") {
    if (n.has_attr("spatial") && n.attr_int("spatial", 1) == 0)
      return unsupported(n.where() + ": BatchNormalization with spatial = 0");
    n.remove_attr("spatial");
    n.remove_attr("is_test");
    n.remove_attr("consumed_inputs");
    return Status::ok();
  }
  if (op == "LpPool" || op == "GlobalLpPool") {
    if (const Attribute* p = n.attr("p"); p && p->kind == Attribute::Kind::kFloat) {
      const float v = p->f;
      set_int(n, "p", static_cast<int64_t>(std::lround(v)));
    }
    return Status::ok();
  }
  if (op == "RoiAlign") {
    if (opset < 16 && !n.has_attr("coordinate_transformation_mode"))
      set_str(n, "coordinate_transformation_mode", "output_half_pixel");
    return Status::ok();
  }
  if (op == "Gemm") {
    n.remove_attr("broadcast");
    return Status::ok();
  }
  return Status::ok();
}

}  // namespace kiln
