// Canonical forms of the nn2 family (attention, RNNs, losses, spectral, training ops):
//   DFT(input, dft_length?, axis?) attrs inverse, onesided      -- opset 20: axis is input 2
//       (opset 17-19 `axis` attribute, default 1, becomes a constant int64 scalar input).
//   STFT(signal, frame_step, window?, frame_length?) attr onesided  -- opset 17
//   RNN / GRU / LSTM                 -- opset 22 (older opsets: same attributes, layout = 0;
//       opset 1 GRU/LSTM `output_sequence` is dropped: Y is always computed).
//   NegativeLogLikelihoodLoss / SoftmaxCrossEntropyLoss -- opset 13 (12 is identical)
//   Attention -- opset 24 (23 is the same form without nonpad_kv_seqlen)
//   RotaryEmbedding -- opset 23; SwiGLU -- as imported
//   Adagrad / Adam / Momentum (ai.onnx.preview.training) -- version 1
#include "onnx/canonicalize.h"

namespace kiln {

Status canonicalize_nn2(Node& n, int64_t opset, CanonContext& ctx) {
  if (n.domain != "" && n.domain != "ai.onnx") return Status::ok();
  if (n.op_type == "DFT" && opset < 20) {
    if (n.num_inputs() > 2 && !n.inputs[2].empty())
      return invalid_model(n.where() + ": DFT before opset 20 has no axis input");
    const int64_t axis = n.attr_int("axis", 1);
    n.remove_attr("axis");
    if (n.inputs.empty()) return invalid_model(n.where() + ": DFT needs an input");
    n.inputs.resize(3);
    n.inputs[2] = ctx.add_constant(Tensor::scalar<int64_t>(axis), n.name + "_axis");
  } else if ((n.op_type == "GRU" || n.op_type == "LSTM" || n.op_type == "RNN") && opset < 7) {
    n.remove_attr("output_sequence");
  }
  return Status::ok();
}

}  // namespace kiln
