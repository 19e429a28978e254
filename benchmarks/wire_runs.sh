#!/usr/bin/env bash
# The wire-format measurements of docs/results.md: the default job (FSL-SAGE, 9 clients, Fashion-MNIST) and
# SplitFed v1 (sl_multi_server, activations and gradients both on the wire), float32 vs bfloat16 vs int8, 3 seeds.
# Seed-major order, so a run cut short still has every setting at the seeds it finished; SEEDS, ALGOS, FORMATS
# choose a subset (finished runs, marked by run_dir/done, are skipped).
#   nohup nice -n 10 bash benchmarks/wire_runs.sh > runs/wire/log.txt 2>&1 &
#   python benchmarks/wire_summary.py runs/wire
set -u
ROUNDS=${ROUNDS:-4}
OUT=${OUT:-runs/wire}
PY=${PY:-python}
MPIRUN=${MPIRUN:-mpirun}
export MPIR_CVAR_ENABLE_HEAVY_YIELD=1 OMP_NUM_THREADS=1
for seed in ${SEEDS:-200 201 202}; do
  for algo in ${ALGOS:-fsl_sage sl_multi_server}; do
    for fmt in ${FORMATS:-float32 bfloat16 int8}; do
      dir="$OUT/$algo/$fmt/seed$seed"
      [ -f "$dir/done" ] && continue
      echo "== $algo $fmt seed $seed ($(date +%T))"
      "$MPIRUN" -n 11 "$PY" -m mpisage.run algorithm=$algo rounds=$ROUNDS seed=$seed \
        wire.activations=$fmt wire.gradients=$fmt run_dir="$dir" checkpoint.interval=1000 && touch "$dir/done"
    done
  done
done
