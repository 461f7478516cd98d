"""From records to backend requests and back: prompts, per-sample seeds, provenance, and the
resumable generate-into-shards loop that `generate`, `eval` and `rlt explain` share.
"""

from __future__ import annotations

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

from potstill.config.sections import GenerationConfig
from potstill.data import ShardWriter
from potstill.data.seeds import sample_seed
from potstill.redact import redact_data
from potstill.teacher.backends import Backend, Generation, Request, Sampling


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
    """What made a sample, stored with it (each sample adds its own seed and index); no
    credential, whatever the backend's description held."""
    return redact_data(
        {
            **backend.describe(),
            "model": model_name,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "max_new_tokens": gen.max_new_tokens,
            "stop": list(gen.stop),
            "system_prompt": gen.system_prompt,
        }
    )


def split_too_long(
    backend: Backend, pairs: list[tuple[Request, dict]], limit: int | None
) -> tuple[list[tuple[Request, dict]], list[dict]]:
    """Requests whose prompt fits, and skipped records (with `drop_reason`) for those that don't."""
    if limit is None:
        return pairs, []
    # the N samples of a record share one prompt: measure it once
    first: dict[str, Request] = {}
    for request, record in pairs:
        first.setdefault(record["id"], request)
    lengths = dict(zip(first, backend.prompt_tokens_many(list(first.values())), strict=True))
    kept, skipped, seen = [], [], set()
    for request, record in pairs:
        length = lengths[record["id"]]
        if record["id"] not in seen:
            seen.add(record["id"])
            if length is not None and length > limit:
                reason = f"prompt_too_long: {length} tokens > {limit}"
                skipped.append({**record, "drop_reason": reason})
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
