#!/usr/bin/env bash
# mpisage's first contact with a GPU, in one prepared shot (docs/gpu_runbook.md, "The GPU check"): every step has
# its own timeout, a failing step never stops the next, and everything lands under $OUT: report.md (each step's
# outcome and figures) and logs.tar.gz (every log and every run's metrics.h5).
#
#   OUT=DIR bash benchmarks/gpu_check.sh                        on the GPU machine, from the repository root
#   GPU_CHECK_DRY_RUN=1 OUT=DIR bash benchmarks/gpu_check.sh    CPU rehearsal at tiny size (GPU parts skipped)
#   GPU_CHECK_STEPS="env tests" OUT=DIR bash benchmarks/gpu_check.sh    only those steps
#
# Steps, most important first: env (GPU, torch, CUDA, the MPI library mpi4py loads and whether it is CUDA-aware),
# install (offline, from the wheels benchmarks/gpu_wheels.sh put in .whl/), tests (the GPU-only tests, then the
# multi-rank device tests), default (the default job with the S-server on the GPU, staged and direct, bytes against
# a CPU run), align (alignment on the GPU against the CPU), resnet (FSL-SAGE ResNet-18 at the paper's per-client
# setting), gas (GAS with full covariance on the GPU). Data is generated on the spot (mpisage.data.fixtures).
# GPU_CHECK_BUDGET_S (default 420; dry run 560): no command starts past it, and none runs beyond it.
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
: "${OUT:?set OUT to the folder that receives report.md and logs.tar.gz}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
DRY=${GPU_CHECK_DRY_RUN:-0}
STEPS=${GPU_CHECK_STEPS:-"env install tests default align resnet gas"}
RESNET_VARIANTS=${GPU_CHECK_RESNET:-"sserver all"}
BUDGET=${GPU_CHECK_BUDGET_S:-$([[ $DRY == 1 ]] && echo 560 || echo 420)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
LOGS=$WORK/logs RUNS=$WORK/runs DATA=$WORK/data
mkdir -p "$LOGS" "$RUNS" "$DATA"
REPORT=$OUT/report.md
if [[ -z ${PY:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MPIR_CVAR_ENABLE_HEAVY_YIELD=1 OMP_NUM_THREADS=1
# Open MPI, if that is what the machine has: allow root, and more ranks than it counts slots
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1

if [[ $DRY == 1 ]]; then   # every job on the CPU at tiny size; alignment on one thread (a busy machine's cores
  # are shared by every rank, and a multi-threaded alignment there waits for its descheduled threads)
  SSERVER=cpu BIG_RANKS=4 FULL_RANKS=4
  FASHION_N="800 200" CIFAR_N="640 200"
  DEFAULT_SIZE="num_clients=2 dataset.samples_per_client=128 rounds=2 fsl.align_steps=5 fsl.align_threads=1 eval.samples=200"
  RESNET_SIZE="num_clients=4 dataset.samples_per_client=64 batch_size=32 rounds=3 fsl.align_interval=2 fsl.align_steps=5
    fsl.align_threads=1 eval.samples=200"
  RESNET_INTERVAL=2
  GAS_SIZE="gas.covariance=diag num_clients=4 asynchronous.active_clients=2 rounds=2 asynchronous.local_iters=2 eval.samples=200"
  ALIGN_BENCH="--clients 2 --buffers 16 --threads 1 --repeats 1"
  ALIGN_ROUNDS="--ranks 4 --rounds 2 num_clients=2 dataset.samples_per_client=64 eval.samples=200 fsl.align_steps=5
    fsl.align_threads=1"
else
  SSERVER=cuda BIG_RANKS=11 FULL_RANKS=12
  FASHION_N="12000 2000" CIFAR_N="50000 2000"
  DEFAULT_SIZE="rounds=3 eval.samples=1000"
  RESNET_SIZE="rounds=4 fsl.align_interval=3 eval.samples=2000"
  RESNET_INTERVAL=3
  GAS_SIZE="gas.covariance=full rounds=4 asynchronous.local_iters=5 eval.samples=1000"
  ALIGN_BENCH="--clients 10 --buffers 448 --repeats 1"
  ALIGN_ROUNDS="--ranks 12 --rounds 3"   # l = 3: round 0 aligns (100 steps), rounds 1 and 2 do not
fi
FASHION=$DATA/fashion CIFAR=$DATA/cifar10

say() { printf '%s\n' "$*" >> "$REPORT"; }
left() { echo $((BUDGET - SECONDS)); }
# run NAME SECONDS CMD...: CMD under a timeout (cut to the budget left), its output in logs/NAME.log, one report line
run() {
  local name=$1 limit=$2 start rc; shift 2
  if (( $(left) < 15 )); then say "- \`$name\`: SKIPPED (the check's time budget of ${BUDGET} s is spent)"; return 124; fi
  (( limit > $(left) )) && limit=$(left)
  start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local outcome=ok
  (( rc == 124 || rc == 137 )) && outcome="TIMED OUT after ${limit} s" || { (( rc != 0 )) && outcome="FAILED (exit $rc)"; }
  say "- \`$name\`: $outcome, $((SECONDS - start)) s (log: logs/$name.log)"
  (( rc != 0 )) && { say '  ```'; tail -n 8 "$LOGS/$name.log" | sed 's/^/  /' >> "$REPORT"; say '  ```'; }
  return $rc
}
# figures NAME CMD...: a report fragment printed by CMD, pasted into the report (its errors into logs/NAME.log)
figures() {
  local name=$1; shift
  timeout -k 5 60 "$@" >> "$REPORT" 2> "$LOGS/$name.log" || say "- \`$name\`: figures FAILED (log: logs/$name.log)"
}
report_py() { figures "$1" "$PY" benchmarks/gpu_check_report.py "${@:2}"; }
find_mpirun() {
  local beside
  beside=$(dirname "$PY")/mpirun
  if [[ -x $beside ]]; then echo "$beside"; return; fi
  for beside in "$HOME/.local/bin/mpirun" "$(command -v mpirun)" "$(command -v mpiexec)"; do
    [[ -n $beside && -x $beside ]] && { echo "$beside"; return; }
  done
  echo mpirun
}
# job NAME SECONDS RANKS key=value...: python -m mpisage.run into runs/NAME
job() {
  local name=$1 limit=$2 ranks=$3; shift 3
  run "$name" "$limit" "$MPIRUN" -n "$ranks" "$PY" -m mpisage.run "$@" "run_dir=$RUNS/$name"
}
cuda_aware() {   # 1 when the MPI library mpi4py loads says it takes CUDA memory
  "$PY" -c 'from mpisage.runtime.transport import query_mpi_cuda_support as q; print(q())' 2>/dev/null | grep -qx 1
}
fixture() {   # fashion | cifar10: generated once
  local dir=$DATA/$1 sizes=$FASHION_N
  [[ $1 == cifar10 ]] && sizes=$CIFAR_N
  [[ -e $dir ]] || run "data_$1" 120 "$PY" benchmarks/gpu_check_report.py data "$1" "$dir" $sizes
}

step_env() {
  run nvidia_smi 20 nvidia-smi && { say '  ```'; sed 's/^/  /' "$LOGS/nvidia_smi.log" | head -20 >> "$REPORT"; say '  ```'; }
  report_py env_probe env
  say "- mpirun: $(find_mpirun) ($("$(find_mpirun)" --version 2>&1 | grep -m1 -iE 'version|open mpi'))"
  say "- python: $PY; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

step_install() {
  local pip=("$PY" -m pip install --no-index --find-links .whl --disable-pip-version-check)
  if [[ ! -d .whl ]]; then say "- SKIPPED: no .whl/ (run benchmarks/gpu_wheels.sh and carry .whl)"; return 1; fi
  if [[ $DRY == 1 ]]; then   # resolve the wheels for CPython 3.12 without installing anything here
    run install_resolve 120 "${pip[@]}" --dry-run --ignore-installed --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --target "$WORK/target" --no-deps omegaconf pyyaml pytest-mpi mpich mpi4py setuptools wheel
    say "  (dry run: the wheels were resolved for CPython 3.12, nothing installed; mpisage runs from the working tree)"
    return
  fi
  pip_install() {   # the interpreter's environment; else the user's site (a read-only or system Python: PEP 668)
    run "install_$1" 120 "${pip[@]}" "${@:2}" || run "install_$1_user" 120 "${pip[@]}" --user "${@:2}" \
      || run "install_$1_system" 120 "${pip[@]}" --user --break-system-packages "${@:2}"
  }
  "$PY" -c 'import omegaconf' 2>/dev/null && say "- omegaconf: present" || pip_install omegaconf omegaconf
  "$PY" -c 'import pytest_mpi' 2>/dev/null && say "- pytest-mpi: present" || pip_install pytest_mpi pytest-mpi
  if "$PY" -c 'from mpi4py import MPI' 2>/dev/null && [[ $(find_mpirun) != mpirun ]]; then
    say "- MPI: mpi4py loads a library and mpirun exists"
  else
    pip_install mpich --no-deps mpich
    "$PY" -c 'from mpi4py import MPI' 2>/dev/null || pip_install mpi4py --no-deps --force-reinstall mpi4py
    report_py env_probe_after_mpich env
  fi
  # no build isolation: an isolated build would fetch setuptools from an index, and the machine has no network
  pip_install mpisage --no-deps --no-build-isolation -e . || say "  (mpisage runs from the working tree all the same: PYTHONPATH=$REPO)"
}

step_tests() {
  run tests_gpu 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_devices.py tests/test_wire.py --timeout=120
  say "  $(grep -E '[0-9]+ (passed|failed|error)' "$LOGS/tests_gpu.log" | tail -1)"
  grep '^SKIPPED' "$LOGS/tests_gpu.log" | sed 's/^/  - /' >> "$REPORT"
  run tests_mpi_devices 180 "$MPIRUN" -n 4 "$PY" -m pytest -q -p no:cacheprovider -rs --with-mpi -m mpi \
    tests/test_mpi_devices.py --timeout=150 --timeout-method=thread
  grep -E '[0-9]+ (passed|failed|error)' "$LOGS/tests_mpi_devices.log" | sed 's/ in [0-9.]*s//' | sort | uniq -c \
    | sed 's/^ */  - ranks: /' >> "$REPORT"
  grep '^SKIPPED' "$LOGS/tests_mpi_devices.log" | sort -u | sed 's/^/  - /' >> "$REPORT"
}

step_default() {
  fixture fashion
  local common=("dataset.root=$FASHION" checkpoint.interval=0 $DEFAULT_SIZE) runs=()
  job default_cpu 120 "$BIG_RANKS" "${common[@]}" device.sserver=cpu
  if [[ $DRY == 1 ]]; then
    job default_auto 120 "$BIG_RANKS" "${common[@]}" device.sserver=auto && runs+=("$RUNS/default_auto")
    say "- staged and direct: SKIPPED (dry run: no GPU; device.sserver=auto ran on the CPU in their place)"
  else
    job default_staged 120 "$BIG_RANKS" "${common[@]}" device.sserver=cuda device.cuda_aware=no \
      && runs+=("$RUNS/default_staged")
    if cuda_aware; then
      job default_direct 120 "$BIG_RANKS" "${common[@]}" device.sserver=cuda device.cuda_aware=yes \
        && runs+=("$RUNS/default_direct")
    else
      say "- default_direct: SKIPPED (MPIX_Query_cuda_support() is not 1: this MPI library is not CUDA-aware)"
    fi
  fi
  [[ -f $RUNS/default_cpu/metrics.h5 ]] && report_py default_bytes bytes "$RUNS/default_cpu" "${runs[@]}"
}

step_align() {
  local device=$SSERVER
  run align_batched_$device 120 "$PY" benchmarks/batched_alignment.py --device "$device" $ALIGN_BENCH \
    $([[ $DRY == 1 ]] || echo --threads 1)
  [[ $DRY == 1 ]] || run align_batched_cpu 120 "$PY" benchmarks/batched_alignment.py --device cpu $ALIGN_BENCH \
    --threads "$(nproc)"
  for log in "$LOGS"/align_batched_*.log; do say '  ```'; sed 's/^/  /' "$log" | tail -4 >> "$REPORT"; say '  ```'; done
  fixture fashion
  local variants=()   # the GPU first: the CPU's alignment is the slow one, and the budget may end it
  [[ $DRY == 1 ]] && say "- gpu variants of alignment_rounds: SKIPPED (dry run: no GPU)" \
    || variants+=(--variant "gpu_blocking=fsl.align_mode=blocking,device.sserver=cuda")
  variants+=(--variant "cpu_blocking=fsl.align_mode=blocking")   # fsl.align_threads=0: every core while the clients wait
  run align_rounds 200 "$PY" benchmarks/alignment_rounds.py "${variants[@]}" $ALIGN_ROUNDS "dataset.root=$FASHION"
  say '  ```'; grep -E '^\||^FSL' "$LOGS/align_rounds.log" | sed 's/^/  /' >> "$REPORT"; say '  ```'
}

step_resnet() {
  fixture cifar10
  local common=(-c configs/paper/cifar10_resnet18_iid.yaml "dataset.root=$DATA/cifar10" checkpoint.interval=0
                $RESNET_SIZE) runs=()
  # GPU_CHECK_RESNET picks the variants: sserver (clients on CPU cores), all (clients on the GPU too)
  [[ " $RESNET_VARIANTS " == *" sserver "* ]] && job resnet_sserver_$SSERVER 150 "$FULL_RANKS" "${common[@]}" \
    device.sserver=$SSERVER && runs+=("$RUNS/resnet_sserver_$SSERVER")
  if [[ " $RESNET_VARIANTS " != *" all "* ]]; then :
  elif [[ $DRY == 1 ]]; then
    say "- resnet_all_cuda: SKIPPED (dry run: no GPU)"
  else
    job resnet_all_cuda 120 "$FULL_RANKS" "${common[@]}" device.sserver=cuda device.clients=cuda \
      && runs+=("$RUNS/resnet_all_cuda")
  fi
  (( ${#runs[@]} )) && report_py resnet_rounds rounds "$RESNET_INTERVAL" "${runs[@]}"
}

step_gas() {
  fixture fashion
  job gas_$SSERVER 150 "$FULL_RANKS" -c configs/gas_alexnet_fmnist_shard2.yaml "dataset.root=$FASHION" \
    checkpoint.interval=0 device.sserver=$SSERVER $GAS_SIZE && report_py gas_updates updates "$RUNS/gas_$SSERVER"
  [[ $DRY == 1 ]] && say "  (dry run: gas.covariance=diag on the CPU; the GPU run uses gas.covariance=full)"
}

{
  echo "# mpisage GPU check$([[ $DRY == 1 ]] && echo ' (DRY RUN on the CPU, tiny sizes)')"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), steps: $STEPS, budget ${BUDGET} s"
} > "$REPORT"
# the mpirun that goes with the MPI library mpi4py loads; on the PATH for the benchmarks that launch their own jobs
use_mpirun() { MPIRUN=$(find_mpirun); [[ $MPIRUN == */* ]] && export PATH=$(dirname "$MPIRUN"):$PATH; }
use_mpirun
for step in $STEPS; do
  say ""; say "## $step"; say ""
  step_start=$SECONDS
  "step_$step"
  [[ $step == install ]] && use_mpirun
  say ""; say "($step: $((SECONDS - step_start)) s)"
done
say ""; say "Total: $SECONDS s."
# every log and every run's metrics (no checkpoints: checkpoint.interval=0)
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && find runs -name metrics.h5 2>/dev/null) 2>/dev/null
rm -rf "$WORK"
exit 0
