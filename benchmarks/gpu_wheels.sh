#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine without network (CPython 3.12, manylinux x86-64),
# downloaded here into .whl/ (ignored by git; the check's `carry` brings it along):
#   omegaconf (2.4 vendors its antlr4 runtime, so no antlr4-python3-runtime) and PyYAML, which it needs;
#   pytest-mpi; setuptools and wheel (what pip builds mpisage itself with, offline: `pip install --no-deps -e .`);
#   mpich and mpi4py, installed there only when the machine's mpi4py cannot load an MPI library.
#     bash benchmarks/gpu_wheels.sh            then: du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
download() {   # $1 platforms (comma-separated), then requirements
  local platforms=() p
  for p in ${1//,/ }; do platforms+=(--platform "$p"); done
  shift
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest "$DEST" "$@"
}
# the versions this checkout is tested with (setup.py: omegaconf>=2.4, mpi4py>=4.0)
download any "omegaconf==2.4.0" "pytest-mpi==0.6" "setuptools>=70" "wheel<0.45"   # wheel 0.45+ needs packaging
# pip does not widen a manylinux_2_28 platform to older tags; mpi4py ships manylinux1 wheels
download manylinux_2_28_x86_64,manylinux2014_x86_64,manylinux_2_5_x86_64,manylinux1_x86_64 "PyYAML>=6" "mpich==5.0.2" "mpi4py==4.1.2"
ls -l "$DEST"
du -sh "$DEST"
