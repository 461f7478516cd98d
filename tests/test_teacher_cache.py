"""Offline teacher cache: exact round trips (quantisation within its designed bound), what the stage
stores is the teacher's top k at each target token, kill/resume writes each record once, and every
bad input is one clear error."""

import copy
import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potstill.errors import ConfigError, DataError
from potstill.losses import forward_kl, sparse_divergence
from potstill.models import load_tokenizer
from potstill.teacher.cache import CacheWriter, open_cache, tokenizer_fingerprint
from potstill.teacher.cache_format import ENCODINGS, Q8_STEP, Codec, shard_bytes
from potstill.teacher.topk import top_k_rows

V = 320


def meta_for(encoding="packed-q8", k=16, vocab_size=V, **extra):
    return {
        "teacher": "tiny-teacher",
        "tokenizer_fingerprint": "f" * 64,
        "vocab_size": vocab_size,
        "k": k,
        "temperature": 1.0,
        "encoding": encoding,
        **extra,
    }


def rows(seed: int, tokens: int = 7, k: int = 16, vocab: int = V, scale: float = 4.0):
    """Top-k rows from random logits (as the stage makes them) and the dense log-probs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g) * scale
    ids, lps, tail = top_k_rows(logits, k, temperature=1.0)
    return ids, lps, tail, F.log_softmax(logits, -1)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_round_trip_is_exact_or_within_the_quantisation_bound(tmp_path, encoding):
    written = {f"r{i}": rows(i, tokens=3 + i) for i in range(5)}
    with CacheWriter(tmp_path, meta_for(encoding), shard_size=2) as writer:
        for rid, (ids, lps, tail, _) in written.items():
            writer.write(rid, ids, lps, tail)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    cache = open_cache(tmp_path, teacher="tiny-teacher", vocab_size=V, verify=False)
    assert len(cache) == 5 and "r4" in cache and "nope" not in cache
    cache.max_open_shards = 2  # reads across 3 shards reopen maps instead of holding them all
    cache.verify()
    for rid, (ids, lps, tail, _) in written.items():
        top = cache.get(rid)
        assert top.ids.dtype == torch.int64 and top.log_probs.dtype == torch.float32
        assert (top.log_probs.diff(dim=-1) <= 0).all()  # descending, whatever the id codec
        if encoding.startswith("delta"):  # rows come back sorted by log-prob; ties by id: align
            got, want = top.ids.argsort(-1), ids.argsort(-1)
            top = type(top)(top.ids.gather(-1, got), top.log_probs.gather(-1, got))
            ids, lps = ids.gather(-1, want), lps.gather(-1, want)
        assert torch.equal(top.ids, ids)  # ids are always exact
        if encoding.endswith("f32"):
            assert torch.equal(top.log_probs, lps)
        elif encoding.endswith("f16"):
            torch.testing.assert_close(top.log_probs, lps.half().float(), rtol=0, atol=0)
        else:
            # q8: each probability within step/2 (+ renormalisation) of itself, unless saturated
            kept = (lps.max(-1, keepdim=True).values - lps) < 254.5 * Q8_STEP
            err = (top.log_probs - lps)[kept].abs().max()
            assert err <= Q8_STEP / 2 + 0.02, err
            # the tail the sparse loss sees is the teacher's own (stored), not a rounding leftover
            decoded_tail = torch.log1p(-top.log_probs.exp().sum(-1))
            torch.testing.assert_close(decoded_tail, tail, rtol=2e-3, atol=1e-4)
    assert len(cache._maps) == 2


@pytest.mark.parametrize("encoding", ["packed-f32", "packed-q8", "delta-q8"])
def test_k_equals_vocab_round_trip_gives_the_dense_divergence(tmp_path, encoding):
    ids, lps, tail, dense = rows(0, tokens=5, k=V, scale=1.0)
    assert torch.isneginf(tail).all()  # nothing outside the top V
    with CacheWriter(tmp_path, meta_for(encoding, k=V)) as writer:
        writer.write("all", ids, lps, tail)
    top = open_cache(tmp_path).get("all")
    assert torch.equal(top.ids.sort(-1).values, torch.arange(V).expand(5, V))
    student = torch.randn(5, V)
    want = forward_kl(student, dense)
    got = sparse_divergence(student, top.ids, top.log_probs, tail="bucket")
    tol = 1e-5 if encoding.endswith("f32") else 5e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if encoding.endswith("f32"):
        assert torch.equal(top.log_probs, dense.gather(-1, top.ids))


@pytest.mark.parametrize("ids_codec", ["delta", "packed", "u32"])
def test_ids_survive_the_extremes_of_a_real_vocabulary(ids_codec):
    codec = Codec(f"{ids_codec}-q8", vocab_size=151_936, k=3)
    if ids_codec == "packed":
        assert codec.id_bits == 18 and codec.id_bytes_range(2) == (14, 14)
    ids = np.array([[151_935, 0, 65_536], [16_383, 16_384, 127], [128, 2_097_151 >> 4, 151_934]])
    lps = np.log(np.array([[0.5, 0.2, 0.1], [0.6, 0.3, 0.05], [0.4, 0.4, 0.1]], np.float32))
    tail = np.log(np.array([0.2, 0.05, 0.1], dtype=np.float32))
    data = codec.encode(ids, lps, tail)
    assert codec.fits(3, len(data)) and not codec.fits(3, len(data) + 9)
    got_ids, got_lps = codec.decode(np.frombuffer(data, np.uint8), 3)
    # the teacher's order comes back (ties: by id), each id with its own log-prob
    assert np.array_equal(got_ids[:2], ids[:2]) and set(got_ids[2]) == set(ids[2])
    assert np.abs(got_lps - lps).max() < Q8_STEP / 2 + 0.01
    assert (np.diff(got_lps, axis=1) <= 0).all()
    if ids_codec == "delta":  # sorted gaps: small ids cost one byte, not 18 bits
        assert (
            len(
                Codec("delta-q8", 151_936, 4).encode(
                    [[0, 1, 2, 3]], lps[:1, [0, 0, 1, 2]], tail[:1]
                )
            )
            == 2 + 4 + 4
        )


WORKER = textwrap.dedent(
    """
    import sys, time
    import torch
    from potstill.teacher.cache import CacheWriter
    from potstill.teacher.topk import top_k_rows
    out, n = sys.argv[1], int(sys.argv[2])
    meta = {"teacher": "t", "tokenizer_fingerprint": "f", "vocab_size": 320, "k": 8,
            "temperature": 1.0, "encoding": "packed-q8"}
    with CacheWriter(out, meta, shard_size=4) as writer:
        for i in range(n):
            if f"r{i}" in writer.done_ids:
                continue
            g = torch.Generator().manual_seed(i)
            writer.write(f"r{i}", *top_k_rows(torch.randn(1 + i % 5, 320, generator=g), 8, 1.0))
            time.sleep(0.01)
    """
)


@pytest.mark.parametrize("kill_after", [0.0, 0.15, 0.4])
def test_sigkill_then_rerun_writes_each_record_once(tmp_path, kill_after):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, n = tmp_path / "cache", 120
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)])
    deadline = time.monotonic() + 300  # torch's import takes seconds, minutes on a busy machine
    while not list(out.glob("shard-*.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the worker ended before it was killed"
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(open_cache(out, verify=False))
    assert 0 < partial < n, "the kill fell outside the writing; the test proved nothing"
    subprocess.run([sys.executable, str(script), str(out), str(n)], check=True)
    cache = open_cache(out)  # verify: checksums, finite; duplicates would raise here
    assert sorted(cache.ids()) == sorted(f"r{i}" for i in range(n))
    index_entries = sum(len(json.loads(_header(p)["__metadata__"]["index"])) for p in _shards(out))
    assert index_entries == n
    for i in (0, n // 2, n - 1):  # the content is each record's own, whichever run wrote it
        ids, _, _ = top_k_rows(
            torch.randn(1 + i % 5, 320, generator=torch.Generator().manual_seed(i)), 8, 1.0
        )
        assert torch.equal(cache.get(f"r{i}").ids, ids)


def _shards(path):
    return sorted(path.glob("shard-*.safetensors"))


def _header(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


@pytest.fixture
def small_cache(tmp_path):
    path = tmp_path / "cache"
    with CacheWriter(path, meta_for("packed-f32"), shard_size=2) as writer:
        for i in range(4):
            writer.write(f"r{i}", *rows(i)[:3])
    return path


def test_corrupt_shard_is_named(small_cache):
    shard = _shards(small_cache)[1]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit pattern in the records
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{shard.name}: corrupt shard \(sha256"):
        open_cache(small_cache)
    cache = open_cache(small_cache, verify=False)  # without the full read: each get checks its
    assert cache.get("r2").ids.shape == (7, 16)  # own crc32, so only the damaged record fails
    with pytest.raises(DataError, match=rf"{shard.name}: record 'r3' is corrupt \(crc32\)"):
        cache.get("r3")


def test_truncated_shard_is_named(small_cache):
    shard = _shards(small_cache)[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"{shard.name}: truncated shard"):
        open_cache(small_cache, verify=False)  # a size check: no full read needed
    shard.write_bytes(shard.read_bytes()[:6])
    with pytest.raises(DataError, match=rf"{shard.name}: truncated shard"):
        open_cache(small_cache, verify=False)


def test_nan_log_probs_name_the_record(small_cache):
    codec = Codec("packed-f32", V, 16)
    ids, lps, tail, _ = rows(9)
    lps[2, 3] = float("nan")
    data = codec.encode(ids.numpy(), lps.numpy(), tail.numpy())  # a foreign or buggy writer
    (small_cache / "shard-00007.safetensors").write_bytes(shard_bytes([("bad", 7, data)], {}))
    with pytest.raises(DataError, match=r"record 'bad' holds NaN/\+inf .*target token 2"):
        open_cache(small_cache)
    cache = open_cache(small_cache, verify=False)  # lazily: checked on get
    assert cache.get("r0").ids.shape == (7, 16)
    with pytest.raises(DataError, match="shard-00007.safetensors: record 'bad' holds NaN.*delete"):
        cache.get("bad")
    with (
        CacheWriter(small_cache.parent / "w", meta_for()) as writer,
        pytest.raises(DataError, match="record 'x' holds NaN.*teacher.dtype=float32"),
    ):
        writer.write("x", ids, lps, tail)  # the writer refuses them at the source


def test_wrong_teacher_vocab_and_tokenizer_are_refused(tmp_path, tiny_model_dir, other_vocab_dir):
    tok = load_tokenizer(tiny_model_dir)
    path = tmp_path / "cache"
    with CacheWriter(path, meta_for(tokenizer_fingerprint=tokenizer_fingerprint(tok))) as writer:
        writer.write("r0", *rows(0)[:3])
    assert len(open_cache(path, tokenizer=load_tokenizer(tiny_model_dir), vocab_size=V)) == 1
    with pytest.raises(DataError, match="cache made with another tokenizer"):
        open_cache(path, tokenizer=load_tokenizer(other_vocab_dir))
    with pytest.raises(ConfigError, match="cache made with teacher 'tiny-teacher', not 'big'"):
        open_cache(path, teacher="big")
    with pytest.raises(DataError, match="vocabulary of 320 ids, the student has 151,936"):
        open_cache(path, vocab_size=151_936)
    same = load_tokenizer(tiny_model_dir)
    # a branch no trainer renders (tools) may differ; what the prompts render to may not
    same.chat_template = "{% if tools %}{{ tools }}{% endif %}" + same.chat_template
    assert tokenizer_fingerprint(same) == tokenizer_fingerprint(tok)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_fingerprint(tok) != tokenizer_fingerprint(same)
    with pytest.raises(DataError, match="not a teacher cache"):
        open_cache(tmp_path)


def test_writer_refuses_other_metadata_a_second_writer_and_duplicates(small_cache):
    with pytest.raises(ConfigError, match=r"another k \(16 before, 8 now\)"):
        CacheWriter(small_cache, meta_for("packed-f32", k=8))
    with CacheWriter(small_cache, meta_for("packed-f32")) as writer:
        assert writer.done_ids == {"r0", "r1", "r2", "r3"}
        with pytest.raises(DataError, match="'r1' is already in the teacher cache"):
            writer.write("r1", *rows(1)[:3])
        with pytest.raises(ConfigError, match="another process is writing"):
            CacheWriter(small_cache, meta_for("packed-f32"))
    cache = open_cache(small_cache)
    clone = copy.deepcopy(cache)  # what a DataLoader worker gets: no memory maps carried
    assert not clone._maps and torch.equal(clone.get("r2").ids, cache.get("r2").ids)


# The stage, on a tiny random teacher.
