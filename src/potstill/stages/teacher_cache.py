"""`potstill teacher cache`: run the teacher once over records, keep its top-k log-probs per target
token, so logit distillation can train without the teacher in memory.

    potstill teacher cache --config configs/teacher-cache.yaml --set k=32
    potstill teacher cache --config configs/teacher-cache.yaml --set engine=ray  # Ray actors

Examples are built exactly as the trainers build them (`build_example`: system prompt + question
through the chat template, then the target and the end-of-turn token, truncated to max_seq_len).
The teacher runs in inference mode on right-padded batches; only the hidden states at positions
that predict a target token go through its lm_head, a chunk of rows at a time. Records with no
target token left after truncation are skipped and counted. Rerunning resumes: cached records are
skipped. With `engine: ray` the teacher runs in Ray actors over the same batches and this process
writes their rows: the same cache, byte for byte (`teacher.ray_cache`); records that failed every
retry are listed in `failed.jsonl`. Reading the cache back: `potstill.teacher.cache.open_cache`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from potstill.config import check
from potstill.config.engine import Engine, RayConfig
from potstill.config.sections import ModelConfig, RunConfig, SFTDataConfig
from potstill.data import read_records
from potstill.data.alignment import target_spans
from potstill.data.examples import record_examples
from potstill.errors import ConfigError, DataError
from potstill.losses.reduce import IGNORE_INDEX
from potstill.prompts import load_prompt
from potstill.runs import RunDir
from potstill.teacher.cache import CacheWriter, open_cache, tokenizer_fingerprint
from potstill.teacher.cache_batch import CacheSpec, LocalTeacher
from potstill.teacher.cache_format import SPANS_UNIT
from potstill.teacher.ray_pool import write_failed

Tensor = torch.Tensor
TAIL_WARNING = 0.05
"""Warn when the top k miss more than this share of the teacher's mass, on average."""


@dataclass
class TeacherCacheConfig:
    """Cache the teacher's top-k log-probs at every target token (offline logit distillation)."""

    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    """The teacher whose distributions are cached (its tokenizer builds the examples)."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Records and how a prompt and target are built from them: keep it equal to the distillation
    run's data section, so both build the same target tokens."""
    k: int = 64
    """Teacher tokens kept per target token (the rest is one tail bucket)."""
    temperature: float = 1.0
    """Softmax temperature of the cached log-probs; distil at the same temperature (or, at
    temperature 1, at one of `tail_temperatures`)."""
    tail_temperatures: list[float] = field(default_factory=list)
    """Distillation temperatures a T = 1 cache can also be read at, re-tempered (2 bytes a token
    each: the tail's log Σ p^(1/T)); e.g. [2.0]. docs/teacher_cache.md has the measured accuracy."""
    encoding: Literal[
        "delta-q8", "delta-f16", "delta-f32",
        "packed-q8", "packed-f16", "packed-f32",
        "u32-q8", "u32-f16", "u32-f32",
    ] = "delta-q8"  # fmt: skip
    """ids: delta (sorted, varint gaps), packed (ceil(log2 V) bits) or u32; log-probs: q8 (uint8
    relative to the top-1, tail stored), f16 or f32. docs/teacher_cache.md has the measured size
    and accuracy of each."""
    max_seq_len: int = 2048
    """Truncate prompt + target to this many tokens (as the trainer's train.max_seq_len)."""
    batch_size: int = 4
    """Records per teacher forward pass."""
    shard_size: int = 256
    """Records per shard file (a kill loses at most the records not yet in a shard)."""
    spans: bool = False
    """Also store each target token's characters in the target text, and the text's sha256
    (8 bytes a token more), so that students with other tokenizers can distil from this cache
    (loss.cross_tokenizer; docs/cross_tokenizer.md). Needs a fast tokenizer."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/teacher-cache"))
    """Run directory: it is also the cache directory (meta.json, shard-*.safetensors)."""
    engine: Engine = "local"
    """local: the teacher runs in this process; ray: in `ray.num_workers` Ray actors, this
    process writing their rows (the same cache; docs/scale_out.md)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """The actor pool of engine: ray."""

    def __post_init__(self):
        check(self.k > 0, f"k: must be > 0, got {self.k}; 32 to 64 is usual")
        check(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")
        check(
            all(t > 0 for t in self.tail_temperatures),
            f"tail_temperatures: each must be > 0, got {self.tail_temperatures}",
        )
        check(
            not self.tail_temperatures or self.temperature == 1.0,
            f"tail_temperatures: re-tempering reads a T = 1 cache; set temperature=1 (now "
            f"{self.temperature}) or tail_temperatures=[]",
        )
        check(self.max_seq_len > 1, f"max_seq_len: must be > 1, got {self.max_seq_len}")
        check(self.batch_size > 0, f"batch_size: must be > 0, got {self.batch_size}")
        check(self.shard_size > 0, f"shard_size: must be > 0, got {self.shard_size}")
        check(
            self.teacher.lora is None,
            "teacher.lora: the teacher is not trained here; remove the lora section",
        )


def _examples(cfg: TeacherCacheConfig, records: list[dict], tokenizer, done: set[str]):
    """(record id, Example, the writer's span arguments: {} or spans and text) for records not
    cached yet, and the count of records skipped for having no target token within
    max_seq_len."""
    data = cfg.data
    todo = [r for r in records if r["id"] not in done]
    pending, skipped = [], 0
    for record, _, example in record_examples(
        todo, data, tokenizer, cfg.max_seq_len, where=data.source
    ):
        if example is None or not any(t != IGNORE_INDEX for t in example.labels[1:]):
            skipped += 1
            continue
        span_args = {}
        if cfg.spans:
            text = record[data.target_field]
            try:
                span_args = {"spans": target_spans(tokenizer, example.labels, text), "text": text}
            except DataError as exc:
                raise DataError(f"{data.source}: record '{record['id']}': {exc}") from None
        pending.append((record["id"], example, span_args))
    return pending, skipped


def cache_meta(cfg: TeacherCacheConfig, tokenizer, vocab_size: int, system: str | None) -> dict:
    data = cfg.data
    return {
        "teacher": cfg.teacher.name,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "tail_temperatures": list(cfg.tail_temperatures),
        "encoding": cfg.encoding,
        "max_seq_len": cfg.max_seq_len,
        "source": data.source,
        "prompt_field": data.prompt_field,
        "target_field": data.target_field,
        "system_prompt": data.system_prompt,
        "system_prompt_sha256": hashlib.sha256(system.encode()).hexdigest() if system else None,
        "rows": "one per t >= 1 with labels[t] != -100 in potstill.data.examples.build_example",
        **({"spans": SPANS_UNIT} if cfg.spans else {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_teacher_cache(cfg: TeacherCacheConfig, console: Console | None = None) -> dict:
    """Cache every record's target tokens; returns the manifest counts."""
    from potstill.models import load_tokenizer

    console = console or Console(stderr=True)
    tcfg = cfg.teacher
    tokenizer = load_tokenizer(tcfg.name, trust_remote_code=tcfg.trust_remote_code)
    # Bad records or a bad prompt name fail here, before the run directory is touched.
    records = read_records(cfg.data.source, limit=cfg.data.limit)
    system = load_prompt(cfg.data.system_prompt) if cfg.data.system_prompt else None
    with RunDir(
        cfg.run.output_dir, command="teacher cache", config=cfg, inputs=[cfg.data.source]
    ) as run:
        if (run.path / "meta.json").is_file():  # resuming: the records done come from the shards
            done = set(open_cache(run.path, verify=False).ids())
        else:
            done = set()
        pending, skipped = _examples(cfg, records, tokenizer, done)
        if not pending and not done:
            raise DataError(
                f"{cfg.data.source}: no record has a target token within max_seq_len="
                f"{cfg.max_seq_len}; raise it"
            )
        console.print(
            f"[bold]{len(records)}[/] records: {len(done)} cached already, {len(pending)} to do, "
            f"{skipped} skipped (no target token within max_seq_len)"
        )
        teacher = open_teacher(cfg, tokenizer)
        try:
            vocab = teacher.vocab_size
            if cfg.k > vocab:
                raise ConfigError(f"k: {cfg.k} is more than the teacher's vocabulary ({vocab})")
            meta = cache_meta(cfg, tokenizer, vocab, system)
            with CacheWriter(run.path, meta, shard_size=cfg.shard_size) as writer:
                tokens, tail_mass, tail_at = _cache_pending(
                    cfg, teacher, pending, writer, run, console
                )
        finally:
            teacher.close()  # a Ray pool stops its actors (and the cluster it started)
        failed = write_failed(run.path, teacher.failed)
        cache = open_cache(run.path, verify=False)
        counts = {
            "records": len(cache),
            "tokens": cache.tokens,
            "bytes": cache.nbytes,
            "bytes_per_token": round(cache.nbytes / max(cache.tokens, 1), 2),
            "skipped_no_target_tokens": skipped,
            "written_this_attempt": writer.written,
        }
        if failed:
            counts["failed"] = failed
        if tokens:  # of the tokens this attempt cached (a finished cache's rerun keeps the last)
            counts["tail_mass_mean"] = round(tail_mass / tokens, 6)
            for t, mass in tail_at.items():  # flat keys: manifest counts are numbers
                counts[f"tail_mass_mean_t{t:g}"] = round(mass / tokens, 6)
        run.count(**counts)
    console.print(
        f"[green]done[/] {counts['records']} records, {counts['tokens']:,} tokens, "
        f"{counts['bytes_per_token']} bytes/token → {run.path}"
    )
    if failed:
        console.print(
            f"[red]failed[/] {failed} records failed every retry (listed in "
            f"{run.path / 'failed.jsonl'}); rerun to cache them"
        )
    warn_tail(cfg, counts, console)
    return counts


def open_teacher(cfg: TeacherCacheConfig, tokenizer):
    """The teacher, in this process or (engine: ray) on a pool of Ray actors."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    spec = CacheSpec(cfg.k, cfg.temperature, tuple(cfg.tail_temperatures), pad)
    if cfg.engine == "ray":
        from potstill.teacher.ray_cache import RayTeacher

        return RayTeacher(cfg.teacher, spec, cfg.ray)
    return LocalTeacher(cfg.teacher, spec)


def warn_tail(cfg: TeacherCacheConfig, counts: dict, console: Console) -> None:
    """Warn for each temperature the cache reads at whose tail holds more than TAIL_WARNING."""
    means = {cfg.temperature: counts.get("tail_mass_mean", 0.0)}
    means.update({t: counts.get(f"tail_mass_mean_t{t:g}", 0.0) for t in cfg.tail_temperatures})
    for temperature, mass in means.items():
        if mass <= TAIL_WARNING:
            continue
        console.print(
            f"[yellow]warning[/] the top {cfg.k} miss {mass:.0%} of the teacher's mass on "
            f"average at temperature {temperature:g}; distilling from this cache sees that mass "
            "as one bucket (its mass exact, its shape the student's): at T=2 on the real pair "
            "that gives a gradient cosine of 0.93-0.96 against the dense teacher at k=64, 0.99 "
            "needs a tail shape this cache does not store (docs/teacher_cache.md): lower the "
            "temperature or distil online"
        )


def _cache_pending(cfg, teacher, pending, writer, run, console):
    """The teacher's top-k rows of every pending record into `writer`, in batches (in this
    process or on Ray actors: the same batches, written in the same order); returns (target
    tokens cached, their summed tail mass, and that mass at each tail temperature)."""
    pending.sort(key=lambda entry: -len(entry[1].input_ids))  # long first: memory peaks early
    parts = [pending[i : i + cfg.batch_size] for i in range(0, len(pending), cfg.batch_size)]
    columns = [TextColumn("teacher cache"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("{task.fields[tokens]:,} tokens"), TimeElapsedColumn()]
    tokens, tail_mass = 0, 0.0
    tail_at = dict.fromkeys(cfg.tail_temperatures, 0.0)
    with (
        run.timed("teacher"),
        Progress(*columns, TimeRemainingColumn(), console=console) as progress,
        torch.inference_mode(),
    ):
        task = progress.add_task("cache", total=len(pending), tokens=0)
        work = [[(record_id, example) for record_id, example, _ in part] for part in parts]
        for index, out in teacher.run(work):
            part = parts[index]
            offset = 0
            for (record_id, _, span_args), n in zip(part, out.rows, strict=True):
                end = offset + n
                writer.write(
                    record_id,
                    out.ids[offset:end],
                    out.log_probs[offset:end],
                    out.log_tail[offset:end],
                    out.lse[offset:end] if out.lse is not None else None,
                    **span_args,
                )
                offset = end
            tokens += offset
            tail_mass += float(out.log_tail.double().exp().sum())
            for column, t in enumerate(tail_at):  # the tail's share of p^(1/t), renormalised
                top = (out.log_probs.double() / t).logsumexp(-1)
                lse_t = out.lse[:, column].double()
                tail_at[t] += float((lse_t - torch.logaddexp(top, lse_t)).exp().sum())
            progress.update(task, advance=len(part), tokens=tokens)
    return tokens, tail_mass, tail_at
