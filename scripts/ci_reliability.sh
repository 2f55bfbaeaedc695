#!/usr/bin/env bash
# Reliability CI (docs/reliability.md): on every submission, after scripts/build.sh.
#   1. ASan+UBSan build (clang; libraries also carry libFuzzer coverage so the same directory
#      serves the fuzzers): unit tests and the conformance suite (expected-pass list enforced).
#   2. Hostile-input corpus through the ASan `kiln` CLI.
#   3. Fuzz targets: replay regression inputs, then each target for KILN_FUZZ_SECONDS (default
#      50), two at a time; any crash, leak, timeout or over-allocation fails the step.
#   4. TSan build: the concurrency test (N threads, one shared Engine, bit-identical outputs).
# Prints the time of each step. Env: KILN_RELIABILITY_DIR (build dirs prefix, default build),
# KILN_FUZZ_SECONDS, KILN_JOBS (default nproc), KILN_SKIP_TSAN=1, KILN_SKIP_FUZZ=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
prefix=${KILN_RELIABILITY_DIR:-build}
asan=$prefix-asan
tsan=$prefix-tsan
jobs=${KILN_JOBS:-$(nproc)}
fuzz_secs=${KILN_FUZZ_SECONDS:-50}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}

t_all=$(date +%s)
step_start=0
step() { step_start=$(date +%s); echo "=== [reliability] $1"; }
done_step() { echo "=== [reliability] $1: $(( $(date +%s) - step_start ))s"; }

step "configure + build ASan+UBSan ($asan)"
CC=clang CXX=clang++ cmake -S . -B "$asan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" \
  -DKILN_SANITIZE=address,undefined -DKILN_WITH_CUDA=OFF \
  "-DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link -fno-sanitize-recover=undefined" \
  "-DCMAKE_PROJECT_kiln_INCLUDE=$root/tests/fuzz/CMakeLists.txt" >/dev/null
ninja -C "$asan" -j"$jobs" kiln_unit_tests kiln_conformance kiln fuzz_onnx fuzz_tensor fuzz_npy fuzz_plan
done_step "ASan build"

step "unit tests under ASan+UBSan"
"$asan/tests/kiln_unit_tests" --gtest_brief=1
done_step "ASan unit"

step "conformance under ASan+UBSan"
enforce=()
[ -f tests/conformance/expected_pass_cpu.txt ] && enforce=(--enforce tests/conformance/expected_pass_cpu.txt)
"$asan/tests/kiln_conformance" "${enforce[@]}" | tail -5
done_step "ASan conformance"

step "hostile-input corpus (ASan kiln)"
rm -rf "$asan/hostile_work"
python3 tests/hostile/run_hostile.py "$asan/kiln" "$asan/hostile_work" --jobs "$jobs" \
  --json "$asan/hostile.json"
done_step "hostile corpus"

if [ "${KILN_SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzz: seeds + regression replay + ${fuzz_secs}s per target"
  corp=$asan/fuzz_corpus
  rm -rf "$corp" "$asan/fuzz_artifacts"
  mkdir -p "$asan/fuzz_artifacts"
  tests/fuzz/make_seeds.sh "$asan/kiln" "$corp/seeds"
  targets="fuzz_onnx fuzz_tensor fuzz_npy fuzz_plan"
  fuzz_flags=(-dict=tests/fuzz/kiln.dict -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024
              -print_final_stats=1)
  for t in $targets; do
    reg=tests/fuzz/regressions/$t
    if [ -n "$(ls -A "$reg" 2>/dev/null | grep -v README)" ]; then
      "$asan/$t" "${fuzz_flags[@]}" -runs=0 $(ls -d "$reg"/* | grep -v README) >/dev/null 2>"$asan/fuzz_artifacts/$t.replay.log" \
        || { cat "$asan/fuzz_artifacts/$t.replay.log"; echo "regression replay failed: $t"; exit 1; }
    fi
  done
  run_fuzz() {
    local t=$1
    mkdir -p "$corp/$t"
    "$asan/$t" "${fuzz_flags[@]}" -max_total_time="$fuzz_secs" \
      -artifact_prefix="$asan/fuzz_artifacts/$t-" "$corp/$t" "$corp/seeds/$t" \
      "tests/fuzz/regressions/$t" >"$asan/fuzz_artifacts/$t.log" 2>&1
  }
  pids=()
  fail=0
  n=0
  for t in $targets; do
    run_fuzz "$t" & pids+=("$!:$t")
    n=$((n + 1))
    if [ $((n % jobs)) -eq 0 ]; then
      for p in "${pids[@]}"; do wait "${p%%:*}" || { echo "FUZZ FAILURE: ${p#*:}"; tail -60 "$asan/fuzz_artifacts/${p#*:}.log"; fail=1; }; done
      pids=()
    fi
  done
  for p in "${pids[@]}"; do wait "${p%%:*}" || { echo "FUZZ FAILURE: ${p#*:}"; tail -60 "$asan/fuzz_artifacts/${p#*:}.log"; fail=1; }; done
  for t in $targets; do
    echo "  $t: $(grep -o 'stat::number_of_executed_units: [0-9]*' "$asan/fuzz_artifacts/$t.log" | awk '{print $2}') executions"
  done
  [ $fail = 0 ] || { echo "fuzzing found a crash: reproducer in $asan/fuzz_artifacts/"; exit 1; }
  done_step "fuzz"
fi

if [ "${KILN_SKIP_TSAN:-0}" != 1 ]; then
  step "configure + build TSan ($tsan)"
  CC=clang CXX=clang++ cmake -S . -B "$tsan" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" -DKILN_SANITIZE=thread -DKILN_WITH_CUDA=OFF >/dev/null
  ninja -C "$tsan" -j"$jobs" kiln_unit_tests
  done_step "TSan build"
  step "concurrency test under TSan"
  # libgomp (oneDNN's OpenMP runtime) is not TSan-instrumented: its barriers are invisible to
  # TSan and show up as false races inside oneDNN calls, so OpenMP runs single-threaded here.
  # The application-level threads (N contexts on one Engine) are what this step checks.
  OMP_NUM_THREADS=1 "$tsan/tests/kiln_unit_tests" --gtest_filter='Concurrency.*:MemoryLimit.*'
  done_step "TSan concurrency"
fi
echo "=== [reliability] all steps passed in $(( $(date +%s) - t_all ))s"
