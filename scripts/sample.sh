#!/usr/bin/env bash
# README command 1: the seed's sample end to end on the default backend.
# Sets up, builds, makes ResNet-50 v1.5 (opset 17, seeded weights) with three test data sets whose
# references come from ONNX Runtime, builds an engine for batch 3 (cached in samples/cache), runs the
# batch of 3 with --verify --softmax (prints OK), and benchmarks it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh kiln
KILN=${KILN_BUILD_DIR:-build}/kiln
python3 scripts/make_resnet50_sample.py samples --no-bench
M=samples/resnet50
$KILN build --onnx $M/model.onnx --saveEngine samples/resnet50.plan --batch 3
$KILN run --onnx $M/model.onnx --cache samples/cache --batch 3 \
  $M/test_data_set_0/input_0.pb $M/test_data_set_1/input_0.pb $M/test_data_set_2/input_0.pb \
  --verify --softmax
$KILN bench --loadEngine samples/resnet50.plan --batch 3 --warmUp 2 --iterations 10
