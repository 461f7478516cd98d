"""Teacher cache spans (format version 2): each row's characters of the target text and the
text's hash round trip through the shards, damage is named, and version-1 caches (no spans)
still read and still teach a student of the teacher's vocabulary."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from potstill.errors import DataError
from potstill.stages.distill import run_distill
from potstill.teacher import cache_format, cache_writer
from potstill.teacher.cache import CacheWriter, open_cache
from potstill.teacher.cache_format import SPANS_UNIT, read_shard_header, shard_paths, text_sha256
from potstill.train.loop import read_metrics

from .distill_helpers import config, make_teacher_dir, write_cache, write_data
from .test_teacher_cache import _header, meta_for, rows


def _spans(text: str, tokens: int) -> list[tuple[int, int]]:
    """One span per token over `text` (the last two from outside it, as an end-of-turn)."""
    cuts = np.linspace(0, len(text), tokens - 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts, cuts[1:], strict=False)] + [(-1, -1)] * 2


def _write(path, encoding, texts, shard_size=2):
    with CacheWriter(path, meta_for(encoding, spans=SPANS_UNIT), shard_size=shard_size) as w:
        for i, text in enumerate(texts):
            ids, lps, tail, _ = rows(i, tokens=4 + i)
            w.write(f"r{i}", ids, lps, tail, spans=_spans(text, 4 + i), text=text)


@pytest.mark.parametrize("encoding", ["delta-q8", "u32-f32"])
def test_spans_and_text_hashes_round_trip_across_shards(tmp_path, encoding):
    texts = ["Answer: 4", "Ünïcødé ✓ 3 × 4", "x", "Let's think step by step.", "42"]
    _write(tmp_path, encoding, texts)
    assert len(shard_paths(tmp_path)) == 3
    cache = open_cache(tmp_path)  # verify: both sha256s of every shard
    assert cache.has_spans and cache.meta["version"] == cache_format.VERSION == 2
    for i, text in enumerate(texts):
        assert [tuple(r) for r in cache.spans(f"r{i}").tolist()] == _spans(text, 4 + i)
        assert cache.text_sha256(f"r{i}") == text_sha256(text)
        ids, lps, _, _ = rows(i, tokens=4 + i)
        cached = cache.get(f"r{i}").ids.sort(-1).values  # sorted: q8 ties may swap places
        assert torch.equal(cached, ids.sort(-1).values)  # the rows are untouched by the spans
    with CacheWriter(tmp_path, meta_for(encoding, spans=SPANS_UNIT)) as writer:  # resume
        ids, lps, tail, _ = rows(9, tokens=5)
        writer.write("r9", ids, lps, tail, spans=_spans("more", 5), text="more")
    assert [tuple(r) for r in open_cache(tmp_path).spans("r9").tolist()] == _spans("more", 5)


def test_damaged_spans_are_named_and_bad_spans_never_written(tmp_path):
    _write(tmp_path / "c", "packed-f32", ["Answer: 4", "yak"], shard_size=4)
    shard = shard_paths(tmp_path / "c")[0]
    info = read_shard_header(shard)
    raw = bytearray(shard.read_bytes())
    raw[info.spans_start + 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{shard.name}: corrupt shard \(sha256 of its spans"):
        open_cache(tmp_path / "c")
    with CacheWriter(tmp_path / "w", meta_for(spans=SPANS_UNIT)) as writer:
        ids, lps, tail, _ = rows(0, tokens=4)
        with pytest.raises(DataError, match="record 'a': spans must be 4 .* 3-character text"):
            past_the_end = [(0, 2), (2, 9), (-1, -1), (-1, -1)]
            writer.write("a", ids, lps, tail, spans=past_the_end, text="abc")
        with pytest.raises(DataError, match="record 'b': this cache stores spans"):
            writer.write("b", ids, lps, tail)


def _as_version_1(monkeypatch):
    """Write as the potstill before spans did: format version 1 in meta.json and the shards."""
    monkeypatch.setattr(cache_format, "VERSION", 1)
    monkeypatch.setattr(cache_writer, "VERSION", 1)


def test_version_1_caches_still_read(tmp_path, monkeypatch):
    with monkeypatch.context() as patched:
        _as_version_1(patched)
        with CacheWriter(tmp_path, meta_for("delta-f32"), shard_size=2) as writer:
            for i in range(3):
                writer.write(f"r{i}", *rows(i)[:3])
    assert json.loads((tmp_path / "meta.json").read_text())["version"] == 1
    header = _header(shard_paths(tmp_path)[0])
    assert header["__metadata__"]["format"].endswith("/1") and "spans" not in header
    cache = open_cache(tmp_path)
    assert not cache.has_spans and len(cache) == 3
    assert torch.equal(cache.get("r1").ids, rows(1)[0])
    with CacheWriter(tmp_path, meta_for("delta-f32")) as writer:  # resumed by this potstill
        writer.write("r3", *rows(3)[:3])
    assert len(open_cache(tmp_path)) == 4


def test_a_version_1_cache_teaches_a_student_of_the_teachers_vocabulary(
    tiny_model_dir, tmp_path, monkeypatch
):
    teacher = make_teacher_dir(tmp_path / "teacher")
    data = write_data(tmp_path / "data.jsonl", n=4)
    cfg = config(tiny_model_dir, teacher, data, tmp_path / "run", "train.max_steps=1")
    with monkeypatch.context() as patched:
        _as_version_1(patched)
        cache = write_cache(tmp_path / "cache", teacher, cfg, k=8)
    offline = config(
        tiny_model_dir, teacher, data, tmp_path / "run", "train.max_steps=1",
        mode="offline", cache=cache,
    )  # fmt: skip
    assert run_distill(offline, Console(quiet=True))["step"] == 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[1]["soft"] > 0
