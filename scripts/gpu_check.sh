#!/usr/bin/env bash
# Builds Kiln's CUDA configuration on a GPU machine and runs the GPU checks. Logs and result files
# go to ${OUT:-/tmp/kiln-gpu}. Steps (default: conformance sample torch profile):
#   conformance  the ONNX suite on the CUDA backend (writes expected_pass_cuda.txt there)
#   cases        extra fp16/bf16 Attention / LayerNorm cases (tests/cuda_cases) on the CUDA backend
#   sample       the ResNet-50 sample, fp32 and fp16, verified against ONNX Runtime references
#   torch        bench/gpu_vs_torch.py: Kiln fp16 vs PyTorch fp16 + CUDA graphs (docs/benchmarks.md)
#   profile      kiln bench --dumpProfile of ResNet-50 (batch 1) and BERT-base (batch 32)
#   attn-ab      the attention fast path vs the general kernel (KILN_CUDA_ATTENTION_GENERAL), BERT b1/b32
#   conv-ab      cuDNN graph API engines vs the legacy conv API / own attention (KILN_CUDNN_GRAPH=0)
#   bench        kiln bench of the ResNet-50 sample at several batch sizes
#
#   scripts/gpu_check.sh [step ...]
#
# cuDNN: KILN_CUDNN_ROOT, else the one in the machine's PyTorch wheel. The ONNX test suite:
# ../shared/onnx-backend-tests, else .gpu/onnx-tests.tar.gz (a tarball of it carried along:
# `tar -C ../shared -czf .gpu/onnx-tests.tar.gz onnx-backend-tests`, .gpu/ git-ignored locally).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-gpu}
mkdir -p "$OUT"
steps=${*:-conformance sample torch profile}
FILTER=${KILN_CONFORMANCE_FILTER:-.*}
CUDNN=${KILN_CUDNN_ROOT:-}
if [ -z "$CUDNN" ]; then
  for c in /opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn /usr/local/cuda; do
    if [ -e "$c/include/cudnn.h" ]; then CUDNN=$c; break; fi
  done
fi
export LD_LIBRARY_PATH=$CUDNN/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BUILD=${KILN_BUILD_DIR:-build-gpu}
NPROC=$(nproc)
t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DKILN_CUDNN_ROOT="$CUDNN" >"$OUT/configure.log" 2>&1 || { tail -30 "$OUT/configure.log"; exit 1; }
if ! ninja -C "$BUILD" -j"$NPROC" kiln kiln_conformance >"$OUT/build.log" 2>&1; then
  grep -E "error|FAILED" "$OUT/build.log" | head -40
  exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

ROOT=../shared/onnx-backend-tests
if [ ! -d "$ROOT" ]; then
  mkdir -p /tmp/kiln-suite && tar -C /tmp/kiln-suite -xzf .gpu/onnx-tests.tar.gz && ROOT=/tmp/kiln-suite/onnx-backend-tests
fi

case " $steps " in *" conformance "*)
  t0=$(date +%s)
  "$BUILD/tests/kiln_conformance" --device cuda -j "$NPROC" --root "$ROOT" -v --timeout 60 --filter "$FILTER" \
    --write-pass "$OUT/expected_pass_cuda.txt" >"$OUT/conformance.log" 2>&1
  echo "conformance (cuda): $(( $(date +%s) - t0 )) s"
  grep -E "^score|^node|^unsupported|^expected" "$OUT/conformance.log" | head -20
  ;;
esac

case " $steps " in *" cases "*)
  # Extra fp16/bf16 Attention and LayerNorm cases (numpy references) for the CUDA fast paths.
  python3 tests/cuda_cases/gen_attention_layernorm.py /tmp/kiln-cuda-cases >"$OUT/cases_gen.log" 2>&1 || tail -5 "$OUT/cases_gen.log"
  "$BUILD/tests/kiln_conformance" --device cuda --root /tmp/kiln-cuda-cases --folders node -v >"$OUT/cases.log" 2>&1
  grep -E "FAIL|^score" "$OUT/cases.log"
  ;;
esac

case " $steps " in *" sample "*)
  S=/tmp/kiln-sample
  python3 scripts/make_resnet50_sample.py "$S" --no-bench >"$OUT/sample_make.log" 2>&1 || tail -5 "$OUT/sample_make.log"
  R=$S/resnet50
  for prec in "" "--fp16"; do
    echo "== ResNet-50 sample on cuda ${prec:-fp32}, batch 3"
    "$BUILD/kiln" run --device cuda $prec --onnx "$R/model.onnx" --batch 3 --timingCache "$OUT/timing.cache" \
      "$R"/test_data_set_{0,1,2}/input_0.pb --verify --softmax 2>&1 | tail -4
  done
  ;;
esac

case " $steps " in *" torch "*)
  python3 bench/gpu_vs_torch.py --kiln "$BUILD/kiln" --work /tmp/kiln-bench 2>&1 | tee "$OUT/gpu_vs_torch.log"
  ;;
esac

# The models of bench/gpu_vs_torch.py (ResNet-50, BERT-base per batch size), exported once.
export_models() {
  W=/tmp/kiln-bench
  mkdir -p "$W"
  [ -f "$W/resnet50.onnx" ] && [ -f "$W/bert_base_b32.onnx" ] && return
  python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu_vs_torch as g; g.resnet('$W'); g.bert('$W')" \
    >"$OUT/export.log" 2>&1 || tail -5 "$OUT/export.log"
}

case " $steps " in *" profile "*)
  # Per-layer GPU profiles (kiln bench --dumpProfile) of ResNet-50 at batch 1 and BERT at 32.
  export_models
  W=/tmp/kiln-bench
  for spec in "resnet50.onnx 1 --batch=1" "bert_base_b1.onnx 1 --workspace=1024" "bert_base_b32.onnx 32 --workspace=1024"; do
    set -- $spec
    echo "== profile $1 fp16 batch $2"
    "$BUILD/kiln" bench --device cuda --fp16 --onnx "$W/$1" $3 --timingCache "$W/timing_prof.cache" \
      --useCudaGraph --warmUp 10 --iterations 50 --dumpProfile >"$OUT/profile_${1%.onnx}_$2.log" 2>&1
    grep -E "GPU compute" "$OUT/profile_${1%.onnx}_$2.log"
    grep -A24 "=== profile" "$OUT/profile_${1%.onnx}_$2.log"
  done
  ;;
esac

case " $steps " in *" conv-ab "*)
  # A/B: cuDNN graph API engines (conv+bias+add+relu fused, SDPA) against the legacy conv API
  # and Kiln's own attention kernels (KILN_CUDNN_GRAPH=0), each with its own timing cache.
  export_models
  W=/tmp/kiln-bench
  for spec in "resnet50.onnx 1" "resnet50.onnx 256" "bert_base_b1.onnx 1" "bert_base_b32.onnx 32"; do
    set -- $spec
    for graph in 1 0; do
      echo "== ${1%.onnx} fp16 batch $2, KILN_CUDNN_GRAPH=$graph"
      extra=""; [ "$1" = resnet50.onnx ] && extra="--batch $2"
      KILN_CUDNN_GRAPH=$graph "$BUILD/kiln" bench --device cuda --fp16 --onnx "$W/$1" $extra \
        --timingCache "$W/timing_ab$graph.cache" --useCudaGraph --noDataTransfers --warmUp 20 --iterations 200 2>&1 \
        | grep -E "engine:|tactics|GPU compute|error"
    done
  done
  echo "== tactics chosen (graph API on):"
  cut -f2 "$W/timing_ab1.cache" | sed 's/@.*//' | sort | uniq -c | sort -rn | head -30
  ;;
esac

case " $steps " in *" attn-ab "*)
  # A/B: the attention fast path (wmma tiles) against the general kernel (KILN_CUDA_ATTENTION_GENERAL).
  export_models
  W=/tmp/kiln-bench
  for b in 1 32; do
    for general in 0 1; do
      echo "== BERT-base fp16 batch $b, KILN_CUDA_ATTENTION_GENERAL=$general"
      KILN_CUDA_ATTENTION_GENERAL=$general "$BUILD/kiln" bench --device cuda --fp16 --onnx "$W/bert_base_b$b.onnx" \
        --timingCache "$W/timing_ab.cache" --useCudaGraph --noDataTransfers --warmUp 20 --iterations 200 2>&1 \
        | grep -E "GPU compute|error"
    done
  done
  ;;
esac

case " $steps " in *" bench "*)
  R=/tmp/kiln-sample/resnet50
  for args in "--batch 1" "--batch 1 --useCudaGraph" "--batch 32 --useCudaGraph" "--batch 32 --useCudaGraph --streams 4" "--batch 256 --noDataTransfers --useCudaGraph"; do
    echo "== kiln bench ResNet-50 fp16 $args"
    "$BUILD/kiln" bench --device cuda --fp16 --onnx "$R/model.onnx" --timingCache "$OUT/timing.cache" $args \
      --warmUp 20 --iterations 200 2>&1 | grep -E "engine|tactics|latency|GPU compute|throughput|error"
  done
  ;;
esac
