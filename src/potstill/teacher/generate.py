"""`potstill generate`: N samples per record from a teacher, written as resumable shards.

    potstill generate --config configs/generate.yaml --set generation.num_samples=4

Each sample is a request with a stable key (`{record id}#{k}`) and its own seed derived from the
base seed, the record id and k, so a killed job, rerun, generates exactly the missing samples and
they are the same samples an uninterrupted run would have made.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from potstill.data import ShardWriter, read_records, read_shards, write_records
from potstill.errors import ConfigError
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.sections import GenerateConfig, GenerationConfig
from potstill.teacher.backends import Backend, Generation, Request, Sampling


def sample_seed(base_seed: int, record_id: str, sample: int) -> int:
    """A per-sample seed that depends on nothing but (base seed, record id, sample index)."""
    digest = hashlib.sha256(f"{base_seed}\0{record_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sampling_of(gen: GenerationConfig) -> Sampling:
    return Sampling(
        max_new_tokens=gen.max_new_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        stop=tuple(gen.stop),
    )


def build_requests(
    records: Iterable[dict], gen: GenerationConfig, system_prompt: str | None
) -> list[tuple[Request, dict]]:
    """One request per (record, sample), paired with its record."""
    pairs = []
    for record in records:
        messages = ({"role": "user", "content": record["question"]},)
        if system_prompt:
            messages = ({"role": "system", "content": system_prompt}, *messages)
        for k in range(gen.num_samples):
            key = f"{record['id']}#{k}"
            seed = sample_seed(gen.seed, record["id"], k)
            pairs.append((Request(key=key, messages=messages, seed=seed), record))
    return pairs


def sample_record(record: dict, request: Request, out: Generation, provenance: dict) -> dict:
    """The input record with the sample and its provenance added (nothing renamed)."""
    sample = int(request.key.rsplit("#", 1)[1])
    return {
        **record,
        "id": request.key,
        "source_id": record.get("source_id", record["id"]),
        "completion": out.text,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "finish_reason": out.finish_reason,
        "teacher": {**provenance, "seed": request.seed, "sample": sample},
    }


def provenance_of(backend: Backend, model_name: str, gen: GenerationConfig) -> dict:
    """What made a sample, stored with it (each sample adds its own seed and index)."""
    return {
        **backend.describe(),
        "model": model_name,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "max_new_tokens": gen.max_new_tokens,
        "stop": list(gen.stop),
        "system_prompt": gen.system_prompt,
    }


def split_too_long(
    backend: Backend, pairs: list[tuple[Request, dict]], limit: int | None
) -> tuple[list[tuple[Request, dict]], list[dict]]:
    """Requests whose prompt fits, and skipped records (with `drop_reason`) for those that don't."""
    if limit is None:
        return pairs, []
    kept, skipped, lengths = [], [], {}
    for request, record in pairs:
        # the N samples of a record share one prompt: measure it once
        if record["id"] not in lengths:
            lengths[record["id"]] = length = backend.prompt_tokens(request)
            if length is not None and length > limit:
                reason = f"prompt_too_long: {length} tokens > {limit}"
                skipped.append({**record, "drop_reason": reason})
        length = lengths[record["id"]]
        if length is None or length <= limit:
            kept.append((request, record))
    return kept, skipped


def prompt_limit(backend: Backend, gen: GenerationConfig) -> int | None:
    if gen.max_prompt_tokens is not None:
        return gen.max_prompt_tokens
    context = backend.context_length
    return None if context is None else max(context - gen.max_new_tokens, 1)


def generate_into(
    backend: Backend,
    pairs: list[tuple[Request, dict]],
    sampling: Sampling,
    writer: ShardWriter,
    provenance: dict,
    *,
    on_result: Callable[[Generation], None] = lambda out: None,
    transform: Callable[[dict], dict] = lambda record: record,
) -> int:
    """Generate every pair whose key is not in the writer yet; write each as it finishes."""
    todo = [(req, rec) for req, rec in pairs if req.key not in writer.done_ids]
    by_key = {req.key: rec for req, rec in todo}
    new_tokens = 0
    for request, out in backend.generate([req for req, _ in todo], sampling):
        writer.write(transform(sample_record(by_key[request.key], request, out, provenance)))
        new_tokens += out.completion_tokens
        on_result(out)
    return new_tokens


def generation_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[speed]}"),
        console=console,
    )


def check_settings(gen: GenerationConfig, console: Console) -> None:
    if gen.temperature == 0 and gen.num_samples > 1:
        console.print(
            f"[yellow]warning:[/] temperature 0 with num_samples={gen.num_samples}: greedy "
            "samples are identical; set generation.temperature > 0 for distinct samples"
        )


def run_generate(
    cfg: GenerateConfig, console: Console | None = None, *, backend: Backend | None = None
) -> dict:
    """Generate every missing sample into `{output_dir}/samples`; return the run's counts."""
    from potstill.teacher.factory import make_backend

    console = console or Console(stderr=True)
    gen = cfg.generation
    check_settings(gen, console)
    system_prompt = load_prompt(gen.system_prompt) if gen.system_prompt else None
    records = read_records(cfg.data.source, limit=cfg.data.limit)
    if not records:
        raise ConfigError(f"data.source: {cfg.data.source} holds no records")
    console.print(f"[bold]{len(records)}[/] records × {gen.num_samples} samples")
    backend = backend or make_backend(cfg.model, cfg.backend, batch_size=gen.batch_size)
    pairs = build_requests(records, gen, system_prompt)
    pairs, skipped = split_too_long(backend, pairs, prompt_limit(backend, gen))
    provenance = provenance_of(backend, cfg.model.name, gen)
    with RunDir(
        cfg.run.output_dir, command="generate", config=cfg, inputs=[cfg.data.source]
    ) as run:
        if skipped:
            write_records(run.path / "skipped.jsonl", skipped)
            console.print(
                f"[yellow]skipped[/] {len(skipped)} records with prompts over the limit "
                f"(listed in {run.path / 'skipped.jsonl'})"
            )
        samples_dir = run.path / "samples"
        start, done_samples, done_tokens = time.perf_counter(), 0, 0
        with (
            # A batch backend returns a batch in one burst: one shard per batch keeps it on disk
            # at once, instead of one record now and the rest at the next burst.
            ShardWriter(samples_dir, shard_size=gen.batch_size, flush_seconds=10) as w,
            generation_progress(console) as progress,
            run.timed("generate"),
        ):
            already = sum(1 for req, _ in pairs if req.key in w.done_ids)
            bar = progress.add_task("generating", total=len(pairs), completed=already, speed="")

            def on_result(out: Generation) -> None:
                nonlocal done_samples, done_tokens
                done_samples += 1
                done_tokens += out.completion_tokens
                elapsed = time.perf_counter() - start
                speed = f"{done_samples / elapsed:.2f} samples/s {done_tokens / elapsed:.1f} tok/s"
                progress.update(bar, advance=1, speed=speed)

            generate_into(backend, pairs, sampling_of(gen), w, provenance, on_result=on_result)
        elapsed = time.perf_counter() - start
        written = list(read_shards(samples_dir))
        counts = {
            "records": len(records),
            "samples": len(written),
            "skipped_prompt_too_long": len(skipped),
            "completion_tokens": sum(r["completion_tokens"] for r in written),
            "truncated": sum(r["finish_reason"] == "length" for r in written),
        }
        if done_samples:
            counts["tokens_per_s"] = round(done_tokens / elapsed, 2)
            counts["samples_per_s"] = round(done_samples / elapsed, 3)
        run.count(**counts)
    console.print(
        f"[green]done[/] {counts['samples']} samples in {samples_dir} "
        f"({counts['truncated']} hit max_new_tokens)"
    )
    return counts
