#!/usr/bin/env bash
# Installs everything Kiln needs on a fresh Debian 12 machine (idempotent; fast when done):
# C++ toolchain and libraries from apt, the Python test oracles (onnx, onnxruntime, numpy) from pip.
set -euo pipefail

APT_PKGS=(build-essential cmake ninja-build libgtest-dev libdnnl-dev libopenblas-openmp-dev clang libclang-rt-14-dev python3 python3-pip)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[setup] apt-get install ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! python3 -c "import onnx, onnxruntime, numpy" >/dev/null 2>&1; then
  echo "[setup] pip install onnx onnxruntime numpy"
  python3 -m pip install -q onnx onnxruntime numpy 2>/dev/null ||
    python3 -m pip install -q --break-system-packages onnx onnxruntime numpy
fi
echo "[setup] dependencies ready"
