#!/usr/bin/env bash
# The CPU RLT experiment of docs/experiments.md, start to end (each step resumes if rerun):
# warm-up -> held-out explanations before GRPO -> GRPO -> held-out explanations after, each set
# scored for the 0.5B student (by explain) and for the 1.5B student (by rlt score).
#   bash scripts/rlt_cpu_experiment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/potstill
NO_SYS=(--set teacher_system_prompt=null --set student_system_prompt=null)
mkdir -p runs/rlt
[[ -f runs/rlt/warmup.jsonl ]] || .venv/bin/python scripts/rlt_warmup_data.py runs/rlt/warmup.jsonl
$P models prepare qwen2.5-coder-1.5b-instruct > /dev/null
$P rlt warmup --config configs/rlt_warmup-cpu.yaml

held_out() {  # $1: teacher, $2: before|after
  $P rlt explain --config configs/rlt_explain-cpu.yaml \
    --set teacher.name="$1" --set run.output_dir="runs/rlt/explain-$2"
  [[ -f "runs/rlt/score-1.5b-$2.jsonl" ]] || $P rlt score --teacher "$1" \
    --student qwen2.5-coder-1.5b-instruct --in "runs/rlt/explain-$2/explanations" \
    --out "runs/rlt/score-1.5b-$2.jsonl" "${NO_SYS[@]}"
}
held_out runs/rlt/warmup/final before
$P rlt train --config configs/rlt_train-cpu.yaml
held_out runs/rlt/train/final after
