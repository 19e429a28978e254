# Sourced by slurm/launch.sh and slurm/compare.sbatch: runs a command (srun ..., or the compare tool) in the
# background so that the batch shell can take the time limit's warning, and requeues the job when that warning
# stopped the work before it was done.
#
# The batch scripts ask Slurm for `--signal=B:USR1@300`: five minutes before the time limit SIGUSR1 goes to this
# shell only (B:), which forwards it to the command (srun and mpirun pass it on to every rank; mpisage then
# checkpoints the round in progress, makes it the last one and exits 0). Whether the run is finished is then read
# from its metrics, as `compare --skip-existing` reads it (mpisage.tools.compare.is_complete: all `rounds` done,
# or the paper-figure load reached comm_threshold_mb); the compare tool itself exits 3 when a signal stopped it.
# Not finished -> `scontrol requeue $SLURM_JOB_ID` (the script carries `#SBATCH --requeue`): the same job id,
# hence the same run directory, starts again later with resume=auto and continues from the checkpoint, until the
# run completes. MPISAGE_REQUEUE=0 turns this off (the job then just ends; resubmit with RUN_DIR=... yourself).

SIGNALLED=""
forward_signal() {       # $1: the signal's name; the command's pid is in CHILD
  SIGNALLED=$1
  echo "[slurm] $1 (time limit near): asking the run to checkpoint and stop"
  kill -"$1" "$CHILD" 2>/dev/null || true
}

# run_and_requeue RUN_DIR COMMAND...   (RUN_DIR empty: decide by the command's exit code 3 alone)
run_and_requeue() {
  local run_dir=$1 status=0
  shift
  "$@" &
  CHILD=$!
  trap 'forward_signal USR1' USR1
  trap 'forward_signal TERM' TERM
  # `wait` returns early when a trapped signal arrives: wait again until the command itself has ended.
  while true; do
    status=0
    wait "$CHILD" || status=$?
    kill -0 "$CHILD" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ -z "$SIGNALLED" ]; then
    return "$status"
  fi
  local unfinished=""
  if [ -n "$run_dir" ]; then
    if [ "$status" = 0 ] && ! "${VENV:-.venv}/bin/python" -c \
        'import sys; from mpisage.tools.compare import is_complete; sys.exit(0 if is_complete(sys.argv[1]) else 1)' \
        "$run_dir"; then
      unfinished="the run in $run_dir is checkpointed but not finished"
    fi
  elif [ "$status" = 3 ]; then
    unfinished="the comparison stopped part-way (its runs are checkpointed)"
  fi
  if [ -z "$unfinished" ]; then
    if [ "$status" = 0 ]; then
      echo "[slurm] $SIGNALLED arrived but the work had finished: not requeued"
    else
      echo "[slurm] the work failed (exit code $status; see the messages above): not requeued"
    fi
    return "$status"
  fi
  if [ "${MPISAGE_REQUEUE:-1}" = 0 ]; then
    echo "[slurm] $unfinished; MPISAGE_REQUEUE=0: not requeued (resubmit the same command to continue)"
    return 0
  fi
  echo "[slurm] $unfinished: requeueing job ${SLURM_JOB_ID:-?} (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
  scontrol requeue "${SLURM_JOB_ID:?not inside a Slurm job}"
}
