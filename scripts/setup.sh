#!/usr/bin/env bash
# Sets up everything mpisage needs in ./.venv: CPU or CUDA torch, MPI (the site's if present, else pip MPICH),
# the package and its test tools, and the Fashion-MNIST data. Idempotent; `make setup` calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null

# torch: the CPU build without an NVIDIA GPU, the CUDA build with one; TORCH_SPEC / TORCH_INDEX_URL override
# (scripts/torch_build.sh decides).
read -r TORCH_KIND TORCH_SPEC TORCH_INDEX < <(bash scripts/torch_build.sh plan)
HAVE=$(bash scripts/torch_build.sh kind "$VENV/bin/python")
if [ "$HAVE" = none ]; then
  INDEX_ARGS=()
  if [ "$TORCH_INDEX" != - ]; then
    # A short probe: where PyTorch's index is out of reach (no network beyond PyPI) fall back at once.
    if [ "$TORCH_KIND" = cpu ] && ! "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$TORCH_INDEX/', timeout=5)" \
        >/dev/null 2>&1; then
      echo "[setup] $TORCH_INDEX cannot be reached: installing $TORCH_SPEC from pip's configured index instead"
    else
      INDEX_ARGS=(--index-url "$TORCH_INDEX")
    fi
  fi
  echo "[setup] installing $TORCH_SPEC ($TORCH_KIND build${INDEX_ARGS[1]:+ from ${INDEX_ARGS[1]}})"
  $PIP install "$TORCH_SPEC" ${INDEX_ARGS[@]+"${INDEX_ARGS[@]}"}
  echo "[setup] got torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null):" \
       "the $(bash scripts/torch_build.sh kind "$VENV/bin/python") build"
elif [ "$TORCH_KIND" != given ] && [ "$HAVE" != "$TORCH_KIND" ]; then
  if [ "$TORCH_KIND" = cpu ]; then
    echo "[setup] note: $VENV holds the CUDA build of torch but this machine has no NVIDIA GPU; to switch to the" \
         "smaller CPU build: $VENV/bin/pip install --force-reinstall $TORCH_SPEC --index-url $TORCH_INDEX"
  else
    echo "[setup] note: $VENV holds the CPU build of torch but this machine has an NVIDIA GPU; to switch to the" \
         "CUDA build (PyPI's Linux torch): $VENV/bin/pip install --force-reinstall $TORCH_SPEC --index-url https://pypi.org/simple"
  fi
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
