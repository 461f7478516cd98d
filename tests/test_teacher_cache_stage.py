"""`potstill teacher cache` as a stage and a command: the teacher's top-k at each target token,
resume after a kill, bad input, and the tokenizer fingerprint."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from potstill.data import write_records
from potstill.data.examples import build_example
from potstill.errors import ConfigError, DataError
from potstill.losses.reduce import IGNORE_INDEX
from potstill.models import load_model, load_tokenizer
from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache
from potstill.teacher.cache import open_cache, tokenizer_fingerprint

from .conftest import assert_one_line_error, build_tokenizer, run_cli
from .test_teacher_cache import V, _header, _shards

QUESTIONS = ["What is 17 + 25?", "Calculate 5 - 3 - 6.", "question 1 2 3", "teacher student 7"]


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    recs = [
        {"id": f"q{i}", "question": q, "solution": f"Let's think step by step. {i} + {i} = {2 * i}"}
        for i, q in enumerate(QUESTIONS * 2)
    ]
    recs.append({"id": "long", "question": "step " * 200, "solution": "Answer: 42"})
    write_records(path, recs)
    return path


def stage_config(model_dir, records, out, **over):
    cfg = {
        "teacher": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": str(records), "target_field": "solution", "system_prompt": None},
        "k": 8,
        "max_seq_len": 64,
        "batch_size": 3,
        "shard_size": 2,
        "run": {"output_dir": str(out)},
        **over,
    }
    from potstill.config import from_dict

    return from_dict(TeacherCacheConfig, cfg)


def test_stage_caches_the_teachers_top_k_at_each_target_token(
    tiny_model_dir, records_file, tmp_path
):
    out = tmp_path / "run"
    console = Console(file=io.StringIO(), width=200)
    cfg = stage_config(tiny_model_dir, records_file, out, encoding="u32-f32")
    counts = run_teacher_cache(cfg, console)
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir, device="cpu")
    cache = open_cache(out, tokenizer=tok, teacher=str(tiny_model_dir), vocab_size=V)
    assert counts["skipped_no_target_tokens"] == 1 and "long" not in cache
    assert counts["records"] == len(cache) == 8
    assert counts["bytes_per_token"] == pytest.approx(counts["bytes"] / counts["tokens"], abs=0.01)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["tokens"] == cache.tokens == counts["tokens"]
    implied_tail = [1 - cache.get(rid).log_probs.double().exp().sum(-1) for rid in cache.ids()]
    tail_mean = float(torch.cat(implied_tail).mean())
    assert 0 < counts["tail_mass_mean"] == pytest.approx(tail_mean, rel=1e-4, abs=1e-6)
    assert manifest["counts"]["tail_mass_mean"] == counts["tail_mass_mean"]
    # a random tiny teacher is flat: its top 8 of 320 miss most of its mass, and the user is told
    assert counts["tail_mass_mean"] > 0.5
    assert f"miss {counts['tail_mass_mean']:.0%} of the teacher's mass" in console.file.getvalue()
    meta = cache.meta
    assert (meta["k"], meta["max_seq_len"], meta["target_field"]) == (8, 64, "solution")
    for i, q in enumerate(QUESTIONS * 2):
        ex = build_example(
            tok,
            ({"role": "user", "content": q},),
            f"Let's think step by step. {i} + {i} = {2 * i}",
            64,
        )
        with torch.no_grad():  # one unpadded forward: the stage batched and padded
            log_p = F.log_softmax(model(torch.tensor([ex.input_ids])).logits[0], -1)
        at = [t - 1 for t in range(1, len(ex.labels)) if ex.labels[t] != IGNORE_INDEX]
        top = cache.get(f"q{i}")
        assert top.ids.shape == (ex.target_tokens, 8) == (len(at), 8)
        torch.testing.assert_close(top.log_probs, log_p[at].gather(-1, top.ids), atol=1e-5, rtol=0)
        ninth = log_p[at].topk(9, -1).values[:, 8]
        assert (top.log_probs[:, -1] >= ninth - 1e-5).all()  # they are the top 8


def test_stage_rerun_recomputes_only_what_a_kill_lost(tiny_model_dir, records_file, tmp_path):
    out = tmp_path / "run"
    cfg = stage_config(tiny_model_dir, records_file, out)
    run_teacher_cache(cfg)
    shards = _shards(out)
    before = {rid: open_cache(out).get(rid) for rid in open_cache(out).ids()}
    lost = json.loads(_header(shards[-1])["__metadata__"]["index"])
    shards[-1].unlink()  # as if killed before the last shard landed
    counts = run_teacher_cache(cfg)
    assert counts["written_this_attempt"] == len(lost) and counts["records"] == 8
    assert run_teacher_cache(cfg)["written_this_attempt"] == 0
    cache = open_cache(out)
    for rid, top in before.items():
        assert torch.equal(cache.get(rid).ids, top.ids)
        torch.testing.assert_close(cache.get(rid).log_probs, top.log_probs, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_cli_caches_and_bad_input_is_one_line_exit_2(tiny_model_dir, records_file, tmp_path):
    base = [
        "teacher", "cache", "--set", f"teacher.name={tiny_model_dir}",
        "--set", "teacher.device=cpu",
        "--set", f"data.source={records_file}", "--set", "data.target_field=solution",
        "--set", "data.system_prompt=null", "--set", "max_seq_len=64",
    ]  # fmt: skip
    ok = run_cli(*base, "--set", f"run.output_dir={tmp_path / 'run'}")
    assert ok.returncode == 0, ok.stderr
    assert len(open_cache(tmp_path / "run")) == 8
    assert_one_line_error(run_cli(*base, "--set", "k=0"), "k: must be > 0")


def test_stage_errors_say_what_to_fix(tiny_model_dir, records_file, tmp_path):
    cfg = stage_config(
        tiny_model_dir, records_file, tmp_path / "a", data={"source": str(records_file)}
    )  # target_field stays "completion", which these records lack
    with pytest.raises(DataError, match="record 'q0' has no text field 'completion'"):
        run_teacher_cache(cfg)
    cfg = stage_config(tiny_model_dir, records_file, tmp_path / "b", k=1000)
    with pytest.raises(ConfigError, match=r"k: 1000 is more than the teacher's vocabulary \(320\)"):
        run_teacher_cache(cfg)
    cfg = stage_config(tiny_model_dir, records_file, tmp_path / "c", max_seq_len=8)
    with pytest.raises(DataError, match="no record has a target token within max_seq_len=8"):
        run_teacher_cache(cfg)
    with pytest.raises(ConfigError, match="teacher.lora: the teacher is not trained here"):
        stage_config(
            tiny_model_dir, records_file, tmp_path / "d", teacher={"name": "x", "lora": {}}
        )


def test_tiny_tokenizers_fingerprint_is_stable():
    assert tokenizer_fingerprint(build_tokenizer()) == tokenizer_fingerprint(build_tokenizer())


@pytest.mark.slow
def test_the_real_pair_shares_a_fingerprint():
    """Qwen2.5-Coder 0.5B and 1.5B ship chat templates that differ in a tool-call branch only."""
    student = load_tokenizer("qwen2.5-coder-0.5b-instruct")
    teacher = load_tokenizer("qwen2.5-coder-1.5b-instruct")
    assert student.chat_template != teacher.chat_template
    assert tokenizer_fingerprint(student) == tokenizer_fingerprint(teacher)


def test_stage_with_tail_temperatures_reads_re_tempered_and_warns_per_temperature(
    tiny_model_dir, records_file, tmp_path
):
    out = tmp_path / "run"
    console = Console(file=io.StringIO(), width=400)
    cfg = stage_config(tiny_model_dir, records_file, out, tail_temperatures=[2.0])
    counts = run_teacher_cache(cfg, console)
    cache = open_cache(out)
    assert cache.temperatures() == [1.0, 2.0]
    # the reported softened tail is the one the re-tempered rows leave outside the top k
    implied = [1 - cache.get(rid, 2.0).log_probs.double().exp().sum(-1) for rid in cache.ids()]
    mean = float(torch.cat(implied).mean())
    assert counts["tail_mass_mean_t2"] == pytest.approx(mean, rel=2e-3, abs=1e-4)
    assert counts["tail_mass_mean_t2"] > counts["tail_mass_mean"]  # softening fattens the tail
    said = console.file.getvalue()
    assert (
        f"miss {counts['tail_mass_mean_t2']:.0%} of the teacher's mass on average at "
        "temperature 2" in said
    )
    assert "distil online" in said


def test_tail_temperatures_need_a_temperature_1_cache(tiny_model_dir, records_file, tmp_path):
    from potstill.errors import ConfigError

    with pytest.raises(ConfigError, match="tail_temperatures: re-tempering reads a T = 1 cache"):
        stage_config(
            tiny_model_dir, records_file, tmp_path, temperature=2.0, tail_temperatures=[2.0]
        )
