#!/usr/bin/env bash
# Sets up everything mpisage needs in ./.venv: CPU or GPU torch, MPI (the site's if present, else pip MPICH),
# the package and its test tools, and the Fashion-MNIST data. Idempotent; `make setup` calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # pinned: an unpinned torch drags in GBs of CUDA wheels on CPU machines

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
  $PIP install "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

# MPI: the site's when there is one that mpi4py can load, else pip's MPICH. Judged by loading it, not by finding
# an `mpicc` (one from another virtualenv on the PATH has no library mpi4py can find).
mpi_loads() { "$VENV/bin/python" -c "from mpi4py import MPI" >/dev/null 2>&1; }
if ! mpi_loads; then
  if command -v mpicc >/dev/null 2>&1; then
    echo "[setup] trying mpi4py with the MPI already here: $(command -v mpicc)"
    $PIP install mpi4py
  fi
  if ! mpi_loads; then
    echo "[setup] no MPI library mpi4py can load: installing mpi4py with pip's MPICH"
    $PIP install mpi4py mpich
  fi
  mpi_loads || { echo "[setup] mpi4py still cannot load an MPI library; install one (e.g. pip install mpich)"; exit 1; }
fi

$PIP install -e ".[test,llm]"

# Fashion-MNIST: the Debian package when we can install it, else mpisage downloads it on first use.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "[setup] apt-get could not install dataset-fashion-mnist; mpisage will try to download it"
  fi
fi
# Not fatal: the tests make their own data; `make run` reports a missing dataset with the fix.
"$VENV/bin/python" -m mpisage.data.fetch fashion_mnist \
  || echo "[setup] warning: Fashion-MNIST is not available yet; see the message above for how to get it"
touch "$VENV/.setup-done"
