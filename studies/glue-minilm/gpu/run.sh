#!/usr/bin/env bash
# The GPU half of the study (RTE and CoLA; SST-2 and STS-B ran on CPU), from the repository root:
#
#   bash studies/glue-minilm/gpu/run.sh [SECONDS] [JOBS]
#
# 1. settings-gpu.yaml: candidate settings on uniform LoRA (at most a third of the time);
# 2. gpu/choose.py: the best candidate per task and budget -> experiment-gpu.yaml (and -gpu2 with the later methods);
# 3. the grid of experiment-gpu.yaml, then of experiment-gpu2.yaml, into the study folder, until the time is up.
# Every sweep resumes: a run the time limit stops is redone by the next `rankwise sweep` of the same file.
set -uo pipefail
budget=${1:-560}
jobs=${2:-3}   # runs side by side on the one GPU: they take turns on it (docs/study.md, "Cost")
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
S=studies/glue-minilm
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

sweep() {  # sweep FILE OUT SECONDS
    local secs=$3
    if (( secs < 20 )); then echo "skip $1: ${secs}s left"; return 0; fi
    echo "== $(date +%T) sweep $1 for at most ${secs}s"
    timeout -s TERM -k 15 "$secs" $PY -m rankwise sweep "$1" --out "$2" --jobs "$jobs" -q
    local rc=$?
    echo "== $(date +%T) exit $rc; finished runs in $2: $(ls "$2"/runs/*/results.json 2>/dev/null | wc -l)"
}

sweep $S/settings-gpu.yaml $S/settings-gpu $(( $(left) * 35 / 100 ))
if ! ls $S/settings-gpu/runs/*/results.json >/dev/null 2>&1; then  # nothing finished: show why, stop here
    find $S/settings-gpu -name '*.log' | head -2 | xargs -r tail -n 40
    exit 1
fi
$PY $S/gpu/choose.py $S/settings-gpu || exit 1
sweep $S/experiment-gpu.yaml $S $(( $(left) - 25 ))
sweep $S/experiment-gpu2.yaml $S $(( $(left) - 25 ))
echo "== done after $(( $(date +%s) - start ))s"
