#!/usr/bin/env bash
# README command 2: sets up, builds and runs every test: unit, conformance with the expected-pass
# list enforced, CLI end to end, hostile-input corpus; then the reliability jobs (ASan+UBSan unit
# and conformance, short fuzz runs with regression inputs, TSan concurrency test).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir "${KILN_BUILD_DIR:-build}" --output-on-failure
KILN_RELIABILITY_DIR="${KILN_BUILD_DIR:-build}" scripts/ci_reliability.sh
