# Sourced by slurm/h100.sbatch and slurm/cpu.sbatch (not submitted itself): stages the data, then starts every
# rank with srun. Inputs: the script's arguments (a config file and key=value overrides, passed on to
# mpisage.run) and DEVICE_ARGS (the device keys the batch script chose). Optional environment:
#   DATA_DIR   the folder to use as dataset.root (holding cifar-10-batches-py/, cifar-100-python/, CINIC-10/ or
#              the Fashion-MNIST files); copied to node-local storage when the node has some (see LOCAL_DIR)
#   LOCAL_DIR  node-local storage to stage DATA_DIR into; default: the first writable of $SLURM_TMPDIR,
#              $TMPDIR and /local; LOCAL_DIR=none reads DATA_DIR in place
#   RUN_DIR    where metrics and checkpoints go; default runs/<job name>-<job id>. Give an earlier job's
#              directory to continue that run (resume=auto takes its newest checkpoint).
#   SRUN_MPI   srun's MPI plug-in; default pmix (Open MPI 4/5, and MPICH built with PMIx). MPICH and Intel MPI
#              built for PMI-2 need SRUN_MPI=pmi2; `srun --mpi=list` shows what the site offers.
#   VENV       the virtual environment; default .venv (build it once on a login node: `bash scripts/setup.sh`;
#              load the site MPI module first, and in the batch script too: mpi4py loads the libmpi it finds
#              when the job runs)
#   MPISAGE_REQUEUE=0  do not requeue the job when the time limit stops the run (see slurm/requeue.sh)
set -euo pipefail
VENV=${VENV:-.venv}
JOB="${SLURM_JOB_NAME:-mpisage}-${SLURM_JOB_ID:-0}"
RUN_DIR=${RUN_DIR:-runs/$JOB}
NODES=${SLURM_NNODES:-1}
THREADS=${SLURM_CPUS_PER_TASK:-1}

# One thread pool per rank, as large as the cores Slurm gave the rank; waiting ranks yield their core.
export OMP_NUM_THREADS=$THREADS
export MPIR_CVAR_ENABLE_HEAVY_YIELD=1 OMPI_MCA_mpi_yield_when_idle=1

DATA_ARGS=()
if [ -n "${DATA_DIR:-}" ]; then
  if [ -z "${LOCAL_DIR:-}" ]; then
    for dir in "${SLURM_TMPDIR:-}" "${TMPDIR:-}" /local; do
      if [ -n "$dir" ] && [ -d "$dir" ] && [ -w "$dir" ]; then LOCAL_DIR=$dir; break; fi
    done
  fi
  if [ -n "${LOCAL_DIR:-}" ] && [ "$LOCAL_DIR" != none ]; then
    # Every node reads its own copy: thousands of small files (CINIC-10) are slow on a shared file system.
    # CINIC-10's decoded cache (made by `python -m mpisage.data.fetch cinic10 $DATA_DIR`) travels with it.
    STAGE="$LOCAL_DIR/mpisage-data-$JOB"
    echo "[slurm] staging $DATA_DIR to $STAGE on $NODES node(s)"
    srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 \
      bash -c 'mkdir -p "$1" && cp -a "$2"/. "$1"/' stage "$STAGE" "$DATA_DIR"
    trap 'srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 rm -rf "$STAGE" || true' EXIT
    DATA_ARGS=("dataset.root=$STAGE")
  else
    DATA_ARGS=("dataset.root=$DATA_DIR")
  fi
fi

echo "[slurm] job $JOB: ${SLURM_NTASKS:-?} ranks on $NODES node(s), $THREADS thread(s) each, run_dir $RUN_DIR"
# srun does not pass --cpus-per-task on from sbatch (Slurm >= 22.05): give it explicitly.
# --gpu-bind=none: every rank of a node sees the node's GPU(s); the device map, not Slurm, decides who uses one.
source slurm/requeue.sh
run_and_requeue "$RUN_DIR" srun --mpi="${SRUN_MPI:-pmix}" --cpus-per-task="$THREADS" ${SRUN_GPU_ARGS:-} \
  "$VENV/bin/python" -m mpisage.run run_dir="$RUN_DIR" resume=auto runtime.torch_threads="$THREADS" \
  "${DEVICE_ARGS[@]}" ${DATA_ARGS[@]+"${DATA_ARGS[@]}"} "$@"   # (empty arrays trip `set -u` before bash 4.4)
