#!/usr/bin/env bash
# Run the low-data study's phases (experiments/study/[0-9]_*.yaml, in order) with one worker
# process per core, all sharing one --out folder (cells and pre-training runs are locked, so
# no cell runs twice). Rerun to resume.
#   bash experiments/run_study_parallel.sh runs/study [workers=$(nproc)]
set -euo pipefail
out=${1:?usage: run_study_parallel.sh OUT [WORKERS]}
workers=${2:-$(nproc)}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../.venv/bin/python}
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"  # experiments is a package of the repository root
mkdir -p "$out"
for i in $(seq 1 "$workers"); do
  (
    for phase in "$here"/study/[0-9]_*.yaml; do
      "$python" -m experiments.low_data_study --out "$out" --config "$phase" --threads 1
    done
  ) > "$out/worker-$i.log" 2>&1 &
  sleep 5  # staggered starts: the first worker prepares the data, the others wait on its lock
done
wait
"$python" -m experiments.low_data_study --out "$out" --report-only
