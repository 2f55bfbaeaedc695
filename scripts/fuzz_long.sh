#!/usr/bin/env bash
# Long local fuzzing (docs/reliability.md): runs the libFuzzer targets of an ASan build
# (scripts/ci_reliability.sh makes one; KILN_FUZZ_BUILD, default build-asan) at low priority,
# KILN_FUZZ_PARALLEL (default 2) targets at a time, each for SECONDS, restarting a target after a
# crash (the reproducer is kept in $KILN_FUZZ_BUILD/fuzz_long/artifacts/) so that executions keep
# accumulating. The corpus persists in $KILN_FUZZ_BUILD/fuzz_long/corpus/<target> across runs.
# At the end prints executions and crashes per target and appends them to fuzz_long/stats.txt.
# usage: scripts/fuzz_long.sh SECONDS [target...]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: scripts/fuzz_long.sh SECONDS [target...]}
shift || true
targets=${*:-fuzz_onnx fuzz_tensor fuzz_npy fuzz_plan}
b=${KILN_FUZZ_BUILD:-build-asan}
par=${KILN_FUZZ_PARALLEL:-2}
w=$b/fuzz_long
mkdir -p "$w/artifacts" "$w/logs"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
[ -d "$w/seeds" ] || tests/fuzz/make_seeds.sh "$b/kiln" "$w/seeds" >/dev/null

fuzz_one() {
  local t=$1 end=$(( $(date +%s) + secs )) runs=0 crashes=0 i=0
  mkdir -p "$w/corpus/$t"
  while [ "$(date +%s)" -lt "$end" ]; do
    local left=$(( end - $(date +%s) )) log="$w/logs/$t.$(date +%s).$i.log"
    i=$((i + 1))
    nice -n 19 "$b/$t" -dict=tests/fuzz/kiln.dict -timeout=10 -rss_limit_mb=2048 \
      -malloc_limit_mb=1024 -max_total_time="$left" -print_final_stats=1 \
      -artifact_prefix="$w/artifacts/$t-" "$w/corpus/$t" "$w/seeds/$t" "tests/fuzz/regressions/$t" \
      >"$log" 2>&1
    local rc=$?
    # Executions: the final stats line, else the last status line ("#123456 ...").
    local n
    n=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{print $2}' | tail -1)
    [ -n "$n" ] || n=$(grep -o '^#[0-9]*' "$log" | tr -d '#' | tail -1)
    runs=$(( runs + ${n:-0} ))
    if [ $rc -ne 0 ]; then
      crashes=$((crashes + 1))
      echo "[fuzz_long] $t: crash (rc $rc), log $log"
      grep -m3 -E 'ERROR|SUMMARY|runtime error|Test unit written' "$log" | sed 's/^/    /'
      [ $crashes -ge 20 ] && break
    fi
  done
  echo "$(date -u +%FT%TZ) $t executions=$runs crashes=$crashes seconds=$secs" | tee -a "$w/stats.txt"
}

n=0
for t in $targets; do
  fuzz_one "$t" &
  n=$((n + 1))
  [ $((n % par)) -eq 0 ] && wait
done
wait
