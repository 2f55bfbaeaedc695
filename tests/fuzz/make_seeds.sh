#!/usr/bin/env bash
# Builds the fuzz seed corpora into OUT (one folder per target):
#   fuzz_onnx   every ../shared/onnx-backend-tests/node/*/model.onnx (+ a few whole models)
#   fuzz_tensor small TensorProto files (input_K.pb / output_K.pb under 4 KiB)
#   fuzz_npy    tests/fuzz/seeds/fuzz_npy
#   fuzz_plan   plans that KILN (the CLI) writes for a set of small models
# usage: tests/fuzz/make_seeds.sh KILN OUT
set -euo pipefail
kiln=$(realpath "$1")
out=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
shared=${KILN_SHARED_DIR:-$root/../shared}/onnx-backend-tests
mkdir -p "$out"/{fuzz_onnx,fuzz_tensor,fuzz_npy,fuzz_plan}
cp "$root"/tests/fuzz/seeds/fuzz_npy/* "$out/fuzz_npy/"
if [ -d "$shared/node" ]; then
  for d in "$shared"/node/*/; do
    c=$(basename "$d")
    [ -f "$d/model.onnx" ] && cp "$d/model.onnx" "$out/fuzz_onnx/$c.onnx"
    for f in "$d"/test_data_set_0/*.pb; do
      [ -f "$f" ] && [ "$(stat -c %s "$f")" -lt 4096 ] && cp "$f" "$out/fuzz_tensor/${c}_$(basename "$f")"
    done
  done
  # Plans: a spread of ops (conv, pool, gemm, rnn, control flow, sequences, strings).
  for c in test_relu test_add_bcast test_conv_with_strides_padding test_maxpool_2d_pads \
           test_gemm_all_attributes test_softmax_axis_1 test_lstm_defaults test_batchnorm_epsilon \
           test_gather_0 test_reshape_extended_dims test_if test_loop11 test_range_float_type_positive_delta_expanded \
           test_sequence_insert_at_back test_strnormalizer_export_monday_casesensintive_lower \
           test_cast_FLOAT_to_FLOAT16 test_slice test_concat_2d_axis_0 test_transpose_default \
           test_reduce_sum_default_axes_keepdims_example; do
    [ -f "$shared/node/$c/model.onnx" ] || continue
    "$kiln" build --onnx "$shared/node/$c/model.onnx" --saveEngine "$out/fuzz_plan/$c.plan" \
      >/dev/null 2>&1 || true
  done
fi
for t in fuzz_onnx fuzz_tensor fuzz_npy fuzz_plan; do
  echo "seeds: $t $(ls "$out/$t" | wc -l) files"
done
