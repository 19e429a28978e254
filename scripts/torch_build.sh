#!/usr/bin/env bash
# Which torch build scripts/setup.sh installs, decided in one place (and testable with stand-ins on the PATH):
#   bash scripts/torch_build.sh plan        -> "KIND SPEC INDEX_URL" (INDEX_URL "-": pip's configured index)
#   bash scripts/torch_build.sh kind PYTHON -> cpu | cuda | none: the build of the torch PYTHON imports
# KIND: cpu with no NVIDIA GPU (no working `nvidia-smi`, no /proc/driver/nvidia): PyTorch's CPU wheel index (a few
# hundred MB); cuda with one: the configured index (PyPI's Linux torch is the CUDA build, GBs); given when
# TORCH_INDEX_URL is set (it wins, as TORCH_SPEC does for the version).
set -euo pipefail
CPU_INDEX=https://download.pytorch.org/whl/cpu
SPEC=${TORCH_SPEC:-torch==2.13.0}   # pinned: the version the project is tested with
NVIDIA_PROC=${NVIDIA_PROC:-/proc/driver/nvidia}

has_nvidia_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } || [ -d "$NVIDIA_PROC" ]
}

plan() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then echo "given $SPEC $TORCH_INDEX_URL"
  elif has_nvidia_gpu; then echo "cuda $SPEC -"
  else echo "cpu $SPEC $CPU_INDEX"
  fi
}

kind() {   # the installed torch's build
  "$1" -c 'import torch; print("cuda" if torch.version.cuda else "cpu")' 2>/dev/null || echo none
}

case "${1:-plan}" in
  plan) plan ;;
  kind) kind "${2:?kind needs the python to ask}" ;;
  *) echo "usage: $0 plan | kind PYTHON" >&2; exit 2 ;;
esac
