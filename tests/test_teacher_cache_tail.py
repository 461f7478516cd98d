"""A T = 1 teacher cache read at T > 1: re-tempering the top k with the tail's stored
log-sum-exp reproduces the dense softened distribution's k + 1 outcomes, through the file format;
old (version 1) caches still read; asking for a temperature the cache cannot give is refused."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potstill.errors import ConfigError
from potstill.losses import forward_kl, sparse_divergence
from potstill.teacher.cache import CacheWriter, open_cache
from potstill.teacher.cache_format import Q8_STEP, Codec, retemper
from potstill.teacher.topk import tail_lse, top_k_rows

V = 320


def meta_for(encoding="delta-q8", k=16, temps=(2.0,)):
    return {
        "teacher": "tiny-teacher",
        "tokenizer_fingerprint": "f" * 64,
        "vocab_size": V,
        "k": k,
        "temperature": 1.0,
        "encoding": encoding,
        "tail_temperatures": list(temps),
    }


def logits_for(seed: int, tokens: int = 6, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(tokens, V, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_retemper_with_the_exact_tail_gives_the_dense_softened_outcomes(temperature):
    logits = logits_for(0).double()
    ids, lps, _ = top_k_rows(logits, 16, temperature=1.0)
    lse = tail_lse(logits, ids, [temperature])[:, 0]
    top_t, tail_t = retemper(lps.numpy(), lse.numpy(), temperature)
    dense = F.log_softmax(logits / temperature, -1)
    want_tail = dense.scatter(-1, ids, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(np.exp(top_t), dense.gather(-1, ids).exp().numpy(), atol=1e-6)
    np.testing.assert_allclose(np.exp(tail_t), want_tail.exp().numpy(), atol=1e-6)


def test_power_law_tail_lse_recovers_its_softened_mass():
    # p_r ∝ r^-1.1 over the ranks: the tail's Σ p^(1/T) is a closed-form sum over ranks > k.
    k, temperature, ranks = 16, 2.0, torch.arange(1, V + 1, dtype=torch.float64)
    log_p = -1.1 * ranks.log()
    log_p = (log_p - log_p.logsumexp(0)).unsqueeze(0)
    ids = torch.arange(k).unsqueeze(0)  # ranks 1..k are ids 0..k-1
    got = float(tail_lse(log_p, ids, [temperature])[0, 0].exp())
    want = float((log_p[0, k:] / temperature).exp().sum())
    assert got == pytest.approx(want, rel=1e-6)
    _, tail_t = retemper(log_p[:, :k].numpy(), np.log([want]), temperature)
    dense = F.log_softmax(log_p / temperature, -1)
    assert float(np.exp(tail_t[0])) == pytest.approx(float(dense[0, k:].exp().sum()), abs=1e-6)


@pytest.mark.parametrize("encoding", ["delta-q8", "packed-f32"])
def test_round_trip_reads_at_one_and_at_the_tail_temperatures(tmp_path, encoding):
    logits = {f"r{i}": logits_for(i, tokens=3 + i) for i in range(3)}
    with CacheWriter(tmp_path, meta_for(encoding, temps=(2.0, 3.0))) as writer:
        for rid, z in logits.items():
            ids, lps, tail = top_k_rows(z, 16, temperature=1.0)
            writer.write(rid, ids, lps, tail, tail_lse(z, ids, [2.0, 3.0]))
    cache = open_cache(tmp_path, teacher="tiny-teacher", vocab_size=V)
    assert cache.temperatures() == [1.0, 2.0, 3.0]
    assert json.loads((tmp_path / "meta.json").read_text())["version"] == 2
    for rid, z in logits.items():
        student = torch.randn(z.shape)
        for temperature in (1.0, 2.0, 3.0):
            top = cache.get(rid, temperature=temperature)
            want = F.log_softmax(z / temperature, -1).gather(-1, top.ids)
            if encoding.endswith("f32"):  # the k + 1 outcomes are the dense ones (f16 tail lse)
                torch.testing.assert_close(top.log_probs.exp(), want.exp(), rtol=0, atol=2e-4)
                exact = sparse_divergence(student, top.ids, want)
                got = sparse_divergence(student, top.ids, top.log_probs)
                torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-4)
            else:  # q8: each log-prob within step/2 (softened by T) and the renormalisation
                err = (top.log_probs - want).abs().max()
                assert err <= Q8_STEP / 2 / temperature + 0.02, (temperature, err)
    with pytest.raises(ConfigError, match=r"reads at temperatures \[1.0, 2.0, 3.0\], not 1.5"):
        cache.get("r0", temperature=1.5)


def test_k_equals_vocab_retempered_is_the_dense_divergence(tmp_path):
    z = logits_for(7, scale=1.0)
    with CacheWriter(tmp_path, meta_for("packed-f32", k=V)) as writer:
        ids, lps, tail = top_k_rows(z, V, temperature=1.0)
        writer.write("all", ids, lps, tail, tail_lse(z, ids, [2.0]))
    top = open_cache(tmp_path).get("all", temperature=2.0)
    student = torch.randn(z.shape)
    want = forward_kl(student / 2.0, F.log_softmax(z / 2.0, -1))
    got = sparse_divergence(student, top.ids, top.log_probs, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_version_1_caches_still_read(tmp_path):
    z = logits_for(3)
    meta = {k: v for k, v in meta_for(temps=()).items() if k != "tail_temperatures"}
    with CacheWriter(tmp_path, meta) as writer:
        writer.write("r", *top_k_rows(z, 16, temperature=1.0))
    # rewrite meta and shard as version 1 wrote them: no tail temperatures, version 1
    meta_path = tmp_path / "meta.json"
    old = json.loads(meta_path.read_text())
    old["version"] = 1
    del old["encoding"]["tail_temperatures"]
    meta_path.write_text(json.dumps(old))
    for shard in tmp_path.glob("shard-*.safetensors"):
        data = shard.read_bytes()
        shard.write_bytes(data.replace(b"potstill-teacher-cache/2", b"potstill-teacher-cache/1"))
    cache = open_cache(tmp_path)
    assert cache.codec == Codec("delta-q8", V, 16)
    assert cache.get("r").ids.shape == (6, 16)
    with pytest.raises(ConfigError, match="tail_temperatures=\\[2.0\\]"):
        cache.get("r", temperature=2.0)


def test_missing_tail_lse_is_refused(tmp_path):
    z = logits_for(4)
    with CacheWriter(tmp_path, meta_for()) as writer, pytest.raises(ValueError, match="tail_lse"):
        writer.write("r", *top_k_rows(z, 16, temperature=1.0))
