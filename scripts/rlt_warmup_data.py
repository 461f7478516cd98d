"""Warm-up records for the CPU RLT experiment (docs/experiments.md): gsm_symbolic training
questions whose explanation is the worked answer written one step per paragraph.

    python scripts/rlt_warmup_data.py runs/rlt/warmup.jsonl [--size 64] [--seed 100000]

The warm-up teaches the teacher the format (an explanation, then the closing tag); GRPO then
rewards what it writes. Seeds 100000+ stay clear of GRPO's questions (seed 1, 256 of them) and
the held-out ones (seed 50000, 64): reasoning-gym's item i of seed S is seed S + i.
"""

import argparse

from potstill.data import read_records, write_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=100000)
    args = parser.parse_args()
    records = read_records(f"rg:gsm_symbolic?size={args.size}&seed={args.seed}")
    rows = []
    for r in records:
        steps = [line.strip() for line in r["solution"].splitlines() if line.strip()]
        steps = [s for s in steps if not s.startswith("####")]
        rows.append({**r, "explanation": "\n\n".join(steps)})
    write_records(args.out, rows)
    print(f"{len(rows)} warm-up records -> {args.out}")


if __name__ == "__main__":
    main()
