"""`potstill generate`: N samples per record from a teacher, written as resumable shards.

    potstill generate --config configs/generate.yaml --set generation.num_samples=4
    potstill generate --config configs/generate.yaml --shard 0/4     # one of 4 machines
    potstill generate --config configs/generate.yaml --merge         # once all 4 finished

Each sample is a request with a stable key (`{record id}#{k}`) and its own seed derived from the
base seed, the record id and k, so a killed job, rerun, generates exactly the missing samples and
they are the same samples an uninterrupted run would have made. Seeds do not depend on the shard,
so the merged shards (`potstill.data.sharding`) hold the samples one unsharded run makes.
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
from potstill.data.sharding import (
    Shard,
    check_complete,
    copy_records,
    shard_dirs,
    shard_of,
    shard_run_dir,
    written_ids,
)
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
    cfg: GenerateConfig,
    console: Console | None = None,
    *,
    backend: Backend | None = None,
    shard: Shard | None = None,
    merge: bool = False,
) -> dict:
    """Generate every missing sample into `{output_dir}/samples` (a shard: into its own run
    directory under `{output_dir}/shards/`); `merge` copies the finished shards' samples into
    `{output_dir}` instead of generating. Returns the run's counts."""
    from potstill.teacher.factory import make_backend

    console = console or Console(stderr=True)
    gen = cfg.generation
    if shard is not None and merge:
        raise ConfigError("--shard and --merge: merge runs once, after every shard; drop --shard")
    records = read_records(cfg.data.source, limit=cfg.data.limit)
    if not records:
        raise ConfigError(f"data.source: {cfg.data.source} holds no records")
    if merge:
        return merge_generate(cfg, records, console)
    check_settings(gen, console)
    system_prompt = load_prompt(gen.system_prompt) if gen.system_prompt else None
    out = cfg.run.output_dir
    if shard is not None:
        records, out = shard.select(records), shard_run_dir(out, shard)
        console.print(f"shard {shard}: {len(records)} of the records (by id)")
    console.print(f"[bold]{len(records)}[/] records × {gen.num_samples} samples")
    pairs = build_requests(records, gen, system_prompt)
    if pairs:  # an empty shard loads no model
        backend = backend or make_backend(cfg.model, cfg.backend, batch_size=gen.batch_size)
        pairs, skipped = split_too_long(backend, pairs, prompt_limit(backend, gen))
        provenance = provenance_of(backend, cfg.model.name, gen)
    else:
        skipped = []
    with RunDir(out, command="generate", config=cfg, inputs=[cfg.data.source]) as run:
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
            if shard is None:  # samples finished by shards of this output_dir are not redone
                keys = {req.key for req, _ in pairs}
                parts = [d / "samples" for d in shard_dirs(out)[1].values()]
                if copied := copy_records(parts, w, keep=keys.__contains__):
                    console.print(f"{copied} samples taken from the shards under {out}/shards")
            already = sum(1 for req, _ in pairs if req.key in w.done_ids)
            bar = progress.add_task("generating", total=len(pairs), completed=already, speed="")

            def on_result(result: Generation) -> None:
                nonlocal done_samples, done_tokens
                done_samples += 1
                done_tokens += result.completion_tokens
                elapsed = time.perf_counter() - start
                speed = f"{done_samples / elapsed:.2f} samples/s {done_tokens / elapsed:.1f} tok/s"
                progress.update(bar, advance=1, speed=speed)

            if pairs:
                generate_into(backend, pairs, sampling_of(gen), w, provenance, on_result=on_result)
        elapsed = time.perf_counter() - start
        counts = sample_counts(records, samples_dir, len(skipped))
        if done_samples:
            counts["tokens_per_s"] = round(done_tokens / elapsed, 2)
            counts["samples_per_s"] = round(done_samples / elapsed, 3)
        run.count(**counts)
    console.print(
        f"[green]done[/] {counts['samples']} samples in {samples_dir} "
        f"({counts['truncated']} hit max_new_tokens)"
    )
    return counts


def sample_counts(records: list[dict], samples_dir, skipped: int) -> dict:
    written = list(read_shards(samples_dir))
    return {
        "records": len(records),
        "samples": len(written),
        "skipped_prompt_too_long": skipped,
        "completion_tokens": sum(r["completion_tokens"] for r in written),
        "truncated": sum(r["finish_reason"] == "length" for r in written),
    }


def merge_generate(cfg: GenerateConfig, records: list[dict], console: Console) -> dict:
    """Copy the samples of every finished shard into `{output_dir}/samples`; refuse (naming the
    shards to finish) while any sample of the records is missing."""
    out = cfg.run.output_dir
    count, dirs = shard_dirs(out)
    if not count:
        raise ConfigError(
            f"--merge: no shards under {out}/shards; run `potstill generate --shard i/n` for "
            "each i first"
        )
    skipped = [
        r
        for i in sorted(dirs)
        if (dirs[i] / "skipped.jsonl").is_file()
        for r in read_records(dirs[i] / "skipped.jsonl")
    ]
    dropped = {r["id"] for r in skipped}
    expected: dict[int, set[str]] = {}
    for request, record in build_requests(records, cfg.generation, None):
        if record["id"] not in dropped:
            expected.setdefault(shard_of(record["id"], count), set()).add(request.key)
    written = {i: written_ids(d / "samples") for i, d in dirs.items()}
    check_complete(out, count, expected, written, "samples")
    with RunDir(out, command="generate", config=cfg, inputs=[cfg.data.source]) as run:
        with ShardWriter(run.path / "samples", shard_size=1024) as w:
            copied = copy_records([dirs[i] / "samples" for i in sorted(dirs)], w)
        if skipped:
            write_records(run.path / "skipped.jsonl", skipped)
        counts = {**sample_counts(records, run.path / "samples", len(skipped)), "shards": count}
        run.count(**counts)
    console.print(
        f"[green]merged[/] {count} shards: {counts['samples']} samples in {out}/samples "
        f"({copied} new)"
    )
    return counts
