"""`potstill generate`: N samples per record from a teacher, written as resumable shards.

    potstill generate --config configs/generate.yaml --set generation.num_samples=4
    potstill generate --config configs/generate.yaml --shard 0/4     # one of 4 machines
    potstill generate --config configs/generate.yaml --merge         # once all 4 finished
    potstill generate --config configs/generate.yaml --set engine=ray --set ray.num_workers=4

Each sample is a request with a stable key (`{record id}#{k}`) and its own seed derived from the
base seed, the record id and k, so a killed job, rerun, generates exactly the missing samples and
they are the same samples an uninterrupted run would have made. Seeds do not depend on the shard,
so the merged shards (`potstill.data.sharding`) hold the samples one unsharded run makes. With
`engine: ray` the model runs in a pool of Ray actors and this process writes their samples: the
same files as the local engine (`teacher.ray_backend`); samples that failed every retry are
listed in `failed.jsonl`, and a rerun generates them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console

from potstill.config.engine import Engine, RayConfig
from potstill.config.sections import (
    BackendConfig,
    DataConfig,
    GenerationConfig,
    ModelConfig,
    RunConfig,
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
from potstill.teacher.backends import Backend, Generation
from potstill.teacher.ray_pool import write_failed
from potstill.teacher.requests import (
    build_requests,
    generate_into,
    generation_progress,
    prompt_limit,
    provenance_of,
    sampling_of,
    split_too_long,
)


@dataclass
class GenerateConfig:
    """Teacher generation: N samples per record, written as resumable shards."""

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    backend: BackendConfig = field(default_factory=BackendConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=512, system_prompt="step_by_step")
    )
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/generate"))
    engine: Engine = "local"
    """local: the model runs in this process; ray: in `ray.num_workers` Ray actors, this
    process writing their samples (the same files; docs/scale_out.md)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The actor pool of engine: ray."""


def check_settings(gen: GenerationConfig, console: Console) -> None:
    if gen.temperature == 0 and gen.num_samples > 1:
        console.print(
            f"[yellow]warning:[/] temperature 0 with num_samples={gen.num_samples}: greedy "
            "samples are identical; set generation.temperature > 0 for distinct samples"
        )


def check_context(backend: Backend, gen: GenerationConfig) -> None:
    """Refuse a max_new_tokens that leaves no room for a prompt in the model's context: every
    record would be skipped as too long, and the run would end "done" with 0 samples."""
    context = backend.context_length
    if context is not None and gen.max_new_tokens >= context:
        raise ConfigError(
            f"generation.max_new_tokens: {gen.max_new_tokens} leaves no room for a prompt in "
            f"the model's context of {context} tokens; set it well below {context}"
        )


def open_backend(cfg: GenerateConfig) -> Backend:
    """The configured backend, in this process or (engine: ray) on a pool of Ray actors."""
    from potstill.teacher.engines import open_backend as open_configured

    return open_configured(
        cfg.model, cfg.backend, cfg.engine, cfg.ray, batch_size=cfg.generation.batch_size
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
    owned = backend is None and bool(pairs)  # an empty shard loads no model
    if owned:
        backend = open_backend(cfg)
    try:
        return _generate(cfg, console, backend, shard, records, pairs, out)
    finally:
        if owned:
            backend.close()  # a Ray pool stops its actors (and the cluster it started)


def _generate(cfg, console, backend, shard, records, pairs, out) -> dict:
    gen = cfg.generation
    if pairs:
        check_context(backend, gen)
        pairs, skipped = split_too_long(backend, pairs, prompt_limit(backend, gen))
        provenance = provenance_of(backend, cfg.model.name, gen)
    else:
        skipped, provenance = [], {}
    with RunDir(out, command="generate", config=cfg, inputs=[cfg.data.source]) as run:
        if skipped:
            write_records(run.path / "skipped.jsonl", skipped)
            console.print(
                f"[yellow]skipped[/] {len(skipped)} records with prompts over the limit "
                f"(listed in {run.path / 'skipped.jsonl'})"
            )
        samples_dir = run.path / "samples"
        done_samples, done_tokens, elapsed = _write_samples(
            run, samples_dir, out, shard, pairs, backend, gen, provenance, console
        )
        counts = sample_counts(records, samples_dir, len(skipped))
        if failed := write_failed(run.path, getattr(backend, "failed", [])):
            counts["failed"] = failed
        if done_samples:
            counts["tokens_per_s"] = round(done_tokens / elapsed, 2)
            counts["samples_per_s"] = round(done_samples / elapsed, 3)
        run.count(**counts)
    console.print(
        f"[green]done[/] {counts['samples']} samples in {samples_dir} "
        f"({counts['truncated']} hit max_new_tokens)"
    )
    if failed:
        console.print(
            f"[red]failed[/] {failed} samples failed every retry (listed in "
            f"{out}/failed.jsonl); rerun to generate them"
        )
    return counts


def _write_samples(run, samples_dir, out, shard, pairs, backend, gen, provenance, console):
    """Generate the missing samples into `samples_dir` with a progress bar; returns (samples
    generated now, their completion tokens, seconds)."""
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
    return done_samples, done_tokens, time.perf_counter() - start


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
