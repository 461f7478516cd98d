#!/usr/bin/env bash
# RLT end to end on CPU (docs/experiments.md, "Students taught by RLT explanations"): the same 96
# training questions explained by (i) the GRPO-trained 0.5B teacher, (ii) that teacher before
# GRPO, (iii) the raw worked solutions, (iv) the 1.5B's own verified traces; each fine-tunes the
# 0.5B and the 1.5B student at one budget; every student answers the held-out sets.
#   bash scripts/rlt_students_experiment.sh        (every step resumes when rerun)
#   SIZES=1.5b bash scripts/rlt_students_experiment.sh   (one student size only)
# All in bf16: this CPU has avx512_bf16, where bf16 runs ~4x faster than fp32.
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/potstill
OUT=runs/rlt-students
TRAIN="rg:gsm_symbolic?size=96&seed=200000"  # clear of the warm-up, GRPO and held-out seeds
BF16=(--set model.dtype=bfloat16)
mkdir -p "$OUT"

# The teachers: the format warm-up, then GRPO on the RLT reward (40 steps).
[[ -f runs/rlt/warmup.jsonl ]] || .venv/bin/python scripts/rlt_warmup_data.py runs/rlt/warmup.jsonl
$P rlt warmup --config configs/rlt_warmup-cpu.yaml
$P rlt train --config configs/rlt_train-cpu.yaml

# (i), (ii): one explanation per training question, the teacher shown its worked solution; the
# closed ones are kept, each as the student's thought followed by the solution (the paper's
# student format).
for teacher in grpo:runs/rlt/train/final warmup:runs/rlt/warmup/final; do
  $P rlt explain --config configs/rlt_explain-cpu.yaml --set teacher.name="${teacher#*:}" \
    --set data.source="$TRAIN" --set sampling.batch_size=16 --set score=false \
    --set run.output_dir="$OUT/explain-${teacher%%:*}"
done
# (iv): the 1.5B answers each training question (greedy, step_by_step); verified answers kept.
$P generate --config configs/generate-gsm.yaml --set data.source="$TRAIN" "${BF16[@]}" \
  --set generation.num_samples=1 --set generation.temperature=0.0 \
  --set generation.max_new_tokens=256 --set generation.batch_size=16 \
  --set run.output_dir="$OUT/traces-generate"
$P curate --config configs/curate-gsm.yaml --set data.source="$OUT/traces-generate/samples" \
  --set run.output_dir="$OUT/traces-curate"
# Every student learns to answer the bare question, so the traces are trained without the prompt
# they were written under: sft refuses that for a `completion` (rightly, by default), so the
# text is copied to a field of its own, a choice made on purpose here.
.venv/bin/python -c 'import sys; from potstill.data import read_records, write_records
write_records(sys.argv[2], [{**r, "trace": r["completion"]} for r in read_records(sys.argv[1])])' \
  "$OUT/traces-curate/kept.jsonl" "$OUT/traces.jsonl"

sft() {  # $1: 0.5b|1.5b, $2: source name, $3: records, $4: the field the student learns
  # Every student trains without a system prompt: all answer alike.
  $P sft --config configs/sft-gsm.yaml --set model.name="qwen2.5-coder-$1-instruct" \
    "${BF16[@]}" --set data.source="$3" --set data.target_field="$4" \
    --set data.system_prompt=null --set train.max_steps=12 --set train.micro_batch_size=4 \
    --set train.grad_accum=2 --set train.max_seq_len=512 --set run.output_dir="$OUT/sft-$1-$2"
}
for size in ${SIZES:-0.5b 1.5b}; do
  sft "$size" grpo "$OUT/explain-grpo/explained.jsonl" completion
  sft "$size" warmup "$OUT/explain-warmup/explained.jsonl" completion
  sft "$size" raw "$TRAIN" solution
  sft "$size" traces "$OUT/traces.jsonl" trace
  $P eval --config "configs/eval-rlt-students-$size-cpu.yaml"
done
