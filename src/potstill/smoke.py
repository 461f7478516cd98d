"""The main job until the full quickstart lands: a real-model smoke run.

    potstill quickstart [--config configs/quickstart.yaml] [--set run.output_dir=runs/q4 ...]

Prepares an offline model, answers verifiable questions with it, scores each answer with the
task's verifier, and writes everything to a resumable run directory.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from potstill.curate.verifiers import extract_answer, verify
from potstill.data import ShardWriter, read_records, read_shards
from potstill.errors import ConfigError
from potstill.kit import KIT, kit_status
from potstill.models import resolve_model_path
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.sections import BackendConfig, QuickstartConfig
from potstill.teacher.factory import make_backend
from potstill.teacher.generate import (
    build_requests,
    generate_into,
    generation_progress,
    provenance_of,
    sampling_of,
)


def run_smoke(cfg: QuickstartConfig, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    # Validate data and model before the run directory exists: bad input must leave nothing behind.
    if cfg.generation.num_samples != 1:
        raise ConfigError(
            f"generation.num_samples: the smoke run answers each question once, got "
            f"{cfg.generation.num_samples}; set it to 1"
        )
    system_prompt = load_prompt(cfg.generation.system_prompt or "step_by_step")
    records = read_records(cfg.data.source, limit=cfg.data.limit)
    console.print(f"[bold]{len(records)}[/] records from {cfg.data.source}")
    if cfg.model.name in KIT and kit_status(cfg.model.name) != "ready":
        console.print(
            f"preparing offline model [bold]{cfg.model.name}[/] (once, a few minutes) ..."
        )
    resolve_model_path(cfg.model.name)
    with RunDir(
        cfg.run.output_dir, command="quickstart", config=cfg, inputs=[cfg.data.source]
    ) as run:
        return _answer_all(cfg, run, records, system_prompt, console)


def _answer_all(cfg, run, records, system_prompt, console) -> dict:
    """Answer every record not answered yet, score it, write it; then summarise the run."""
    with run.timed("load_model"):
        backend = make_backend(cfg.model, BackendConfig(), batch_size=cfg.generation.batch_size)
    gen = cfg.generation
    pairs = build_requests(records, gen, system_prompt)
    provenance = provenance_of(backend, cfg.model.name, gen)
    answers_dir = run.path / "answers"

    def scored(record: dict) -> dict:
        score = verify(record, record["completion"])
        return {**record, "verified": score >= 1.0, "score": score}

    start, new_tokens = time.perf_counter(), 0
    with (
        ShardWriter(answers_dir, shard_size=gen.batch_size, flush_seconds=5) as writer,
        generation_progress(console) as progress,
    ):
        todo = sum(1 for req, _ in pairs if req.key not in writer.done_ids)
        bar = progress.add_task(
            "answering", total=len(pairs), completed=len(pairs) - todo, speed=""
        )

        def on_result(out) -> None:
            nonlocal new_tokens
            new_tokens += out.completion_tokens
            speed = f"{new_tokens / (time.perf_counter() - start):.1f} tok/s"
            progress.update(bar, advance=1, speed=speed)

        generate_into(
            backend,
            pairs,
            sampling_of(gen),
            writer,
            provenance,
            on_result=on_result,
            transform=scored,
        )
    elapsed = time.perf_counter() - start

    answered = list(read_shards(answers_dir))
    correct = sum(1 for r in answered if r["verified"])
    summary = {
        "records": len(answered),
        "correct": correct,
        "accuracy": correct / len(answered),
        "completion_tokens": sum(r["completion_tokens"] for r in answered),
        "new_tokens": new_tokens,
    }
    if new_tokens:  # a resumed run with nothing left to do keeps the earlier speed
        summary["tokens_per_s"] = round(new_tokens / elapsed, 2)
    run.count(**summary)
    run.manifest["timings"]["generate"] = round(elapsed, 3)
    _print_table(console, answered[:10], summary, cfg.model.name)
    return summary


def _print_table(console: Console, shown: list[dict], summary: dict, model: str) -> None:
    table = Table(title=f"{model}: {summary['correct']}/{summary['records']} correct")
    for col in ("question", "gold", "model's answer", "ok"):
        table.add_column(col, overflow="fold")
    for r in shown:
        table.add_row(
            r["question"][:60],
            r.get("answer", ""),
            extract_answer(r["completion"])[:30],
            "✓" if r["verified"] else "✗",
        )
    console.print(table)
