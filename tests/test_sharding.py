"""Distributed generation: `--shard i/n` splits records by a hash of their id, each shard is a
resumable run of its own, `--merge` joins them exactly (and refuses while any is unfinished);
several openai endpoints share the requests by record id; vLLM's engine options reach vllm.LLM."""

from __future__ import annotations

import json
import sys
import types

import pytest

from potstill.config import load_config
from potstill.config.sections import BackendConfig, ModelConfig, VLLMConfig
from potstill.data import read_shards, write_records
from potstill.data.sharding import Shard, parse_shard, shard_of
from potstill.errors import ConfigError, DataError
from potstill.eval.results import answers_dir
from potstill.stages.eval import EvalConfig, run_eval
from potstill.stages.generate import GenerateConfig, run_generate
from potstill.teacher.backends import Backend, Request, Sampling

from .conftest import assert_one_line_error, run_cli
from .fake_openai import fake_openai

PINNED = [2, 1, 1, 0]
"""shard_of(id, 4) of r0, r1, r2, q-17 (sha256, first 8 bytes big-endian, mod 4)."""


def test_shard_of_hashes_the_id_not_the_position():
    ids = [f"r{i}" for i in range(400)]
    shards = {i: shard_of(i, 4) for i in ids}
    more = {i: shard_of(i, 4) for i in reversed([*ids, "new-1", "new-2"])}  # order, additions
    assert {i: more[i] for i in ids} == shards
    assert all(60 < list(shards.values()).count(s) < 140 for s in range(4))  # near 100 each
    # Pinned: a record's shard must never change between potstill versions (resumed shards).
    assert [shard_of(i, 4) for i in ("r0", "r1", "r2", "q-17")] == PINNED
    assert Shard(1, 4).select([{"id": i} for i in ids]) == [
        {"id": i} for i in ids if shards[i] == 1
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("3/2", "numbered 0 to 1"),
        ("2/2", "the last is --shard 1/2"),
        ("0/0", "must be >= 1"),
        ("-1/2", "expected i/n"),
        ("a/b", "expected i/n"),
        ("1", "expected i/n"),
    ],
)
def test_bad_shard_is_one_line(text, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_shard(text)
    assert "\n" not in str(info.value)
    assert parse_shard(" 1/2 ") == Shard(1, 2)


def test_bad_shard_through_the_cli_exits_2(tmp_path):
    out = tmp_path / "gen"
    proc = run_cli("generate", "--shard", "3/2", "--set", f"run.output_dir={out}")
    assert_one_line_error(proc, "--shard 3/2", "numbered 0 to 1")
    proc = run_cli("eval", "--shard", "0/2", "--merge", "--set", f"run.output_dir={out}")
    assert_one_line_error(proc, "--shard and --merge")
    assert not out.exists()


def _records(path, n=10):
    rows = [
        {"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)
    ]
    return write_records(path, rows)


def _gen_cfg(model_dir, source, out, *extra):
    return load_config(
        GenerateConfig,
        overrides=[
            f"model.name={model_dir}",
            f"data.source={source}",
            "generation.max_new_tokens=6",
            "generation.num_samples=2",
            "generation.temperature=1.0",
            "generation.system_prompt=null",
            "run.log_with=[]",
            f"run.output_dir={out}",
            *extra,
        ],
    )


def _texts(samples_dir) -> dict[str, str]:
    rows = list(read_shards(samples_dir))
    assert len(rows) == len({r["id"] for r in rows})  # no duplicates
    return {r["id"]: r["completion"] for r in rows}


class NoGeneration(Backend):
    """Fails if asked to generate anything: proves a stage reuses what is on disk."""

    def generate(self, requests, sampling):
        assert not requests, [r.key for r in requests]
        yield from ()


def test_sharded_generate_merges_to_the_unsharded_samples(tiny_model_dir, tmp_path):
    source = _records(tmp_path / "q.jsonl")
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_generate(_gen_cfg(tiny_model_dir, source, whole))
    cfg = _gen_cfg(tiny_model_dir, source, split)
    run_generate(cfg, shard=Shard(0, 2))
    with pytest.raises(DataError, match=r"shard 1/2 misses \d+ .*--shard 1/2") as info:
        run_generate(cfg, merge=True)  # shard 1 has not run: named, nothing merged
    assert "\n" not in str(info.value) and not (split / "samples").exists()
    run_generate(cfg, shard=Shard(1, 2))
    counts = run_generate(cfg, merge=True)
    assert counts["samples"] == 20 and counts["shards"] == 2
    expected = _texts(whole / "samples")
    assert _texts(split / "samples") == expected  # same ids, same seeded samples
    shard_ids = [set(_texts(split / "shards" / f"{i}-of-2" / "samples")) for i in (0, 1)]
    assert not shard_ids[0] & shard_ids[1] and shard_ids[0] | shard_ids[1] == set(expected)
    assert run_generate(cfg, merge=True)["samples"] == 20  # merging again adds nothing
    # An unsharded run over the shards' output_dir takes their samples instead of generating.
    again = tmp_path / "again"
    shutil_copy(split / "shards", again / "shards")
    run_generate(_gen_cfg(tiny_model_dir, source, again), backend=NoGeneration())
    assert _texts(again / "samples") == expected


def shutil_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)


def test_merge_refuses_shards_of_two_splits(tiny_model_dir, tmp_path):
    source = _records(tmp_path / "q.jsonl", n=3)
    cfg = _gen_cfg(tiny_model_dir, source, tmp_path / "gen", "generation.num_samples=1")
    (tmp_path / "gen" / "shards" / "0-of-2").mkdir(parents=True)
    (tmp_path / "gen" / "shards" / "0-of-3").mkdir(parents=True)
    with pytest.raises(ConfigError, match="several splits"):
        run_generate(cfg, merge=True)


def _eval_cfg(model_dir, out, seed=7):
    return load_config(
        EvalConfig,
        None,
        [
            f"models=[{{name: '{model_dir}', label: tiny}}]",
            f"tasks=[{{source: 'rg:basic_arithmetic?size=6&seed={seed}', name: arith}}]",
            "generation.max_new_tokens=4",
            "generation.num_samples=2",
            "generation.temperature=1.0",
            "generation.system_prompt=null",
            "cost.latency_samples=0",
            "ks=[1, 2]",
            "run.log_with=[]",
            f"run.output_dir={out}",
        ],
    )


def test_sharded_eval_merges_to_the_unsharded_result(tiny_model_dir, tmp_path):
    whole = run_eval(_eval_cfg(tiny_model_dir, tmp_path / "whole"))
    cfg = _eval_cfg(tiny_model_dir, tmp_path / "split")
    parts = [run_eval(cfg, shard=Shard(i, 2)) for i in (0, 1)]
    assert sum(p["results"][0]["n"] for p in parts) == 6 and parts[0]["shard"] == "0/2"
    merged = run_eval(cfg, merge=True)
    strip = ("model", "task", "n", "samples", "correct", "accuracy", "pass@k", "maj@k")
    assert [{k: r.get(k) for k in strip} for r in merged["results"]] == [
        {k: r.get(k) for k in strip} for r in whole["results"]
    ]
    answers = {
        r["id"]: r["completion"]
        for r in read_shards(answers_dir(tmp_path / "split", "tiny", "arith"))
    }
    assert answers == {
        r["id"]: r["completion"]
        for r in read_shards(answers_dir(tmp_path / "whole", "tiny", "arith"))
    }
    cost = merged["models"][0]
    assert cost["shards"] == 2 and cost["seconds_per_answer"] > 0 and cost["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "split" / "eval.json").read_text())
    assert saved == merged


def test_a_shard_without_questions_loads_no_model(tiny_model_dir, tmp_path):
    cfg = _eval_cfg(tiny_model_dir, tmp_path / "ev", seed=5)  # all 6 ids hash to shard 1 of 2
    empty = run_eval(cfg, shard=Shard(0, 2))
    assert empty["results"] == [] and not (tmp_path / "ev" / "shards" / "0-of-2" / "cost").exists()
    run_eval(cfg, shard=Shard(1, 2))
    assert run_eval(cfg, merge=True)["results"][0]["n"] == 6


def test_requests_spread_over_endpoints_by_record_id():
    from potstill.teacher.openai_backend import OpenAIBackend

    with fake_openai() as a, fake_openai() as b:
        backend = OpenAIBackend([a.url, b.url], "m", api_key_env=None, concurrency=2)
        requests = [
            Request(key=f"q{i}#{k}", messages=({"role": "user", "content": f"q{i}"},), seed=k)
            for i in range(12)
            for k in range(2)
        ]
        got = {r.key: g for r, g in backend.generate(requests, Sampling(max_new_tokens=4))}
        assert len(got) == 24 and all(g.text.startswith("Answer to: q") for g in got.values())
        to_b = sum(shard_of(f"q{i}", 2) for i in range(12)) * 2  # both samples of a record
        assert (a.requests, b.requests) == (24 - to_b, to_b) and 0 < to_b < 24
        assert backend.describe()["base_url"] == [a.url, b.url]
        assert {backend.endpoint_of(r) for r in requests if r.key.startswith("q3#")} == {
            shard_of("q3", 2)
        }


def test_several_endpoints_in_the_config_and_bad_ones(tmp_path):
    urls = "[http://127.0.0.1:1/v1, http://127.0.0.1:2/v1]"
    cfg = load_config(GenerateConfig, overrides=[f"backend.openai.base_url={urls}"])
    assert cfg.backend.openai.base_url == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    for bad, fragment in (("[http://a/v1, ftp://b]", "'ftp://b'"), ("[]", "empty list")):
        with pytest.raises(ConfigError, match=fragment):
            load_config(GenerateConfig, overrides=[f"backend.openai.base_url={bad}"])


def test_vllm_engine_options_reach_vllm_llm(tiny_model_dir, monkeypatch):
    from potstill.teacher.factory import make_backend

    seen = {}

    class LLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def get_tokenizer(self):
            return None

    fake = types.SimpleNamespace(LLM=LLM, __version__="0.0-fake")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    options = VLLMConfig(tensor_parallel_size=4, gpu_memory_utilization=0.55, max_model_len=4096)
    model = ModelConfig(name=str(tiny_model_dir), dtype="bfloat16")
    make_backend(model, BackendConfig(kind="vllm", vllm=options))
    assert seen["tensor_parallel_size"] == 4
    assert seen["gpu_memory_utilization"] == 0.55
    assert seen["max_model_len"] == 4096
    assert seen["dtype"] == "bfloat16" and seen["model"] == str(tiny_model_dir)
