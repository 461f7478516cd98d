"""Readers for every record source, all yielding (location, raw record) pairs.

A source spec is one of:
- `data.jsonl` (one JSON object per line) or `data.parquet`;
- a directory: potstill shards (`part-*.jsonl`), a `datasets` `save_to_disk` folder (add
  `?split=NAME` for a DatasetDict), or a folder of .jsonl / .parquet files;
- `rg:NAME?size=200&seed=1&...`: a reasoning-gym generator (extra keys go to its config;
  `phrasing=wording|words` rewrites its questions, see `potstill.data.rephrase`);
- a mixture, `SOURCE + SOURCE + ...` (a space on each side of the `+`): the records of each in
  turn, e.g. `rg:basic_arithmetic?size=40&seed=1 + rg:gcd?size=20&seed=1`; ids must stay unique
  across the parts (reasoning-gym's hold the task's name).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote_plus

import yaml

from potstill.data.records import validate_record
from potstill.data.rephrase import check_style, rephrase
from potstill.errors import DataError
from potstill.specs import mixture_parts

MAX_PROBLEMS_KEPT = 100
RG_REJECTS = (TypeError, ValueError, AssertionError, KeyError, IndexError, AttributeError)
"""What a reasoning-gym generator raises on settings it cannot use."""


def _split_query(spec: str) -> tuple[str, dict[str, object]]:
    """(base, {key: value}) of `base?k=v&...`; each value is read as YAML (numbers, booleans)."""
    base, _, query = spec.partition("?")
    params = {}
    for field in query.split("&") if query else ():
        key, eq, value = field.partition("=")
        if not key or not eq:
            shown = f"'{field}' has no value" if key else f"'{field}' has no name"
            hint = f"write {key}=VALUE" if key else "write NAME=VALUE, joined by &"
            raise DataError(f"{spec}: query field {shown}; {hint}")
        params[unquote_plus(key)] = _query_value(spec, unquote_plus(key), unquote_plus(value))
    return base, params


def _query_value(spec: str, key: str, value: str) -> object:
    if not value:
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise DataError(
            f"{spec}: cannot read the value of '{key}' ({value!r}); give a number, true/false "
            "or a plain word"
        ) from None


def _check_int(spec: str, params: dict, key: str, low: int | None = None) -> None:
    value = params[key]
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        at_least = f" >= {low}" if low is not None else ""
        raise DataError(f"{spec}: {key} must be an integer{at_least}, got {value!r}")


def iter_source(spec: str | Path) -> Iterator[tuple[str, object]]:
    """Yield (location, raw record) from any source; raise DataError if it can't be read."""
    spec = str(spec)
    parts = mixture_parts(spec)
    if len(parts) > 1:
        for part in parts:
            yield from iter_source(part)
        return
    if spec.startswith("rg:"):
        yield from _iter_reasoning_gym(spec)
        return
    base, params = _split_query(spec)
    path = Path(base).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {path}; check the path (or use rg:NAME?size=N)")
    if path.is_dir():
        yield from _iter_directory(path, params)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        yield from _iter_jsonl(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl or .parquet")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: invalid UTF-8 at byte {exc.start} of the line; "
                    "re-save the file as UTF-8"
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one JSON object"
                ) from None
            except (ValueError, RecursionError) as exc:  # an int over 4300 digits; deep nesting
                deep = isinstance(exc, RecursionError)
                what = "nested too deeply" if deep else "an integer too long to read"
                raise DataError(f"{where}: unreadable JSON ({what}); fix the line") from None
            yield where, record


def _iter_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: unreadable Parquet file ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _iter_directory(path: Path, params: dict) -> Iterator[tuple[str, object]]:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        yield from _iter_hf_datasets(path, params)
        return
    shards = sorted(path.glob("part-*.jsonl"))
    files = shards or sorted([*path.glob("*.jsonl"), *path.glob("*.parquet")])
    if not files:
        raise DataError(f"{path}: no .jsonl or .parquet files (nor a datasets folder) inside")
    for file in files:
        yield from (_iter_parquet(file) if file.suffix == ".parquet" else _iter_jsonl(file))


def _iter_hf_datasets(path: Path, params: dict) -> Iterator[tuple[str, object]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        split = params.get("split")
        if split is None and len(data) == 1:
            split = next(iter(data))
        if split not in data:
            raise DataError(
                f"{path}: a DatasetDict with splits {', '.join(data)}; "
                f"pick one with {path}?split=NAME"
            )
        data = data[split]
    for i, row in enumerate(data):
        yield f"{path}:row {i}", row


def _iter_reasoning_gym(spec: str) -> Iterator[tuple[str, object]]:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    name, params = _split_query(spec)
    name = name.removeprefix("rg:")
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DataError(f"{spec}: unknown reasoning-gym task '{name}'; {hint}see reasoning_gym")
    params.setdefault("seed", 0)
    params.setdefault("size", 100)
    phrasing = params.pop("phrasing", None)  # ours, not the generator's
    if phrasing is not None:
        check_style(spec, phrasing)
    _check_int(spec, params, "size", 0)
    _check_int(spec, params, "seed")
    try:
        dataset = reasoning_gym.create_dataset(name, **params)
    except RG_REJECTS as exc:
        raise DataError(f"{spec}: reasoning-gym rejected the settings ({exc})") from None
    for i, entry in enumerate(_entries(spec, dataset)):
        # JSON round trip: tuples become lists, so the record survives any shard format.
        metadata = json.loads(json.dumps(entry.get("metadata", {}), default=str))
        record = {
            "id": f"rg-{name}-s{params['seed']}-{i}",
            "question": entry["question"],
            "answer": str(entry["answer"]),
            "task": f"rg:{name}",
            "metadata": metadata,
        }
        if metadata.get("answer_cot"):
            record["solution"] = metadata["answer_cot"]
        if phrasing is not None:
            record = rephrase(record, phrasing, i, spec)
        yield f"{spec}#{i}", record


def _entries(spec: str, dataset) -> Iterator[dict]:
    """The dataset's entries: a generator may take a bad setting and fail only as it makes one."""
    entries = iter(dataset)
    while True:
        try:
            entry = next(entries)
        except StopIteration:
            return
        except RG_REJECTS as exc:
            raise DataError(f"{spec}: reasoning-gym rejected the settings ({exc})") from None
        yield entry


def read_records(spec: str | Path, *, limit: int | None = None) -> list[dict]:
    """All records of a source, validated, ids unique; DataError names every problem's place.

    The message is one line (the first problem and a count); `error.problems` lists them all.
    """
    records: list[dict] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for where, raw in iter_source(spec):
        record, found = validate_record(raw, where)
        if record is not None:
            first = seen.setdefault(record["id"], where)
            if first != where:
                found = [f"{where}: duplicate id '{record['id']}' (first at {first})"]
        if found:
            if len(problems) < MAX_PROBLEMS_KEPT:
                problems.extend(found)
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if problems:
        extra = len(problems) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
        raise DataError(problems[0] + more, problems)
    if not records:
        raise DataError(f"{spec}: empty dataset, no records found; check the source")
    return records
