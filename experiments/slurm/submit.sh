#!/bin/bash
# Queue a sweep on SLURM: N array tasks (sweep_array.sbatch, one shard each) and the finishing job
# (sweep_finish.sbatch), which starts only once every task has succeeded (--dependency=afterok).
#   export CFG=experiments/paper/rank_sweep.yaml SHARED_CACHE=/shared/$USER/mech OUT=runs/rank_sweep
#   experiments/slurm/submit.sh 8 [more sbatch options, e.g. --account=abc --partition=gpu]
# Watch it with: mech sweep "$CFG" --status --shards 8 --cache "$SHARED_CACHE"
set -euo pipefail

n=${1:-}
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: submit.sh N [sbatch options]: N, the number of shards, is an integer >= 1 (got '${n}')" >&2
  exit 2
fi
shift
: "${CFG:?set CFG to the sweep YAML}"
: "${SHARED_CACHE:?set SHARED_CACHE to a cache on a filesystem every node sees}"
: "${OUT:?set OUT to the table directory}"
export SHARDS=$n
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sbatch=${SBATCH:-sbatch}

array=$("$sbatch" --parsable --array="0-$((n - 1))" "$@" "$here/sweep_array.sbatch")
array=${array%%;*}  # --parsable prints jobid[;cluster]
finish=$("$sbatch" --parsable --dependency="afterok:$array" "$@" "$here/sweep_finish.sbatch")
echo "array job ${array} (${n} shards); finishing job ${finish%%;*} after it"
