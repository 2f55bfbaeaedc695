// Canonical forms of the control family (newest opset unless noted):
//   If, Loop: opset 16 form (bodies may carry sequences/optionals).
//   Scan: opset 9+ form (num_scan_inputs, scan_input_axes/directions, scan_output_axes/
//     directions). Opset 8 Scan (leading sequence_lens input, batch axis 0 on every input,
//     `directions`) becomes the opset-9 form plus the internal attribute kiln_batched=1 (the
//     kernel scans each batch item separately); a given sequence_lens is unsupported.
//   Sequence*/Optional*/String*/RegexFullMatch/TfIdfVectorizer/random ops: newest form.
//   ai.onnx.ml LabelEncoder: keys_*/values_*/default_* attributes (opsets 2-4 share them);
//     opset 1 (classes_strings) is unsupported.
#include "onnx/canonicalize.h"

namespace kiln {

Status canonicalize_control(Node& n, int64_t opset, CanonContext& ctx) {
  (void)ctx;
  if (n.domain.empty() || n.domain == "ai.onnx") {
    if (n.op_type == "Scan" && opset < 9) {
      if (n.has_input(0))
        return unsupported(n.where() +
                           ": opset-8 Scan with a sequence_lens input is not supported");
      if (!n.inputs.empty()) n.inputs.erase(n.inputs.begin());
      if (const Attribute* d = n.attr("directions")) {
        Attribute a = *d;
        a.name = "scan_input_directions";
        n.remove_attr("directions");
        n.set_attr(a);
      }
      Attribute b;
      b.name = "kiln_batched";
      b.kind = Attribute::Kind::kInt;
      b.i = 1;
      n.set_attr(b);
    }
    return Status::ok();
  }
  if (n.domain == "ai.onnx.ml" && n.op_type == "LabelEncoder" && opset < 2) {
    // Opset 1 (classes_strings, direction chosen by the input's type) is not lowered.
    return unsupported(n.where() + ": LabelEncoder opset 1 (classes_strings) is not supported");
  }
  return Status::ok();
}

}  // namespace kiln
