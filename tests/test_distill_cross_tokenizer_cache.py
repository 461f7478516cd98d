"""`potstill distill` across vocabularies from an offline teacher cache made with spans: with a
k covering the whole teacher vocabulary it is the online run, and a cache without spans or
cached from other texts is refused in one line."""

import json

import pytest
from rich.console import Console

from potstill.config import from_dict
from potstill.data import write_records
from potstill.models import load_tokenizer
from potstill.stages.distill import run_distill
from potstill.stages.teacher_cache import TeacherCacheConfig, run_teacher_cache
from potstill.train.loop import read_metrics

from .conftest import assert_one_line_error, run_cli
from .distill_helpers import cli_args, config

ROWS = [
    ("What is 2 + 2? Say zebra.", "Answer: zebra 4"),  # zebra: a many:1 span (unpaired positions)
    ("What is 17 + 25?", "Let's think step by step. 17 + 25 = 42"),
    ("Calculate 5 - 3 - 6.", "The answer is -4, yak."),
    ("question 1 2 3", "xylophone 1 2 3 teacher student"),
]
STEPS = ["train.max_steps=2", "train.grad_accum=1", "loss.kd_ratio.value=0.4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"id": f"r{i}", "question": q, "completion": a} for i, (q, a) in enumerate(ROWS)]
    return write_records(tmp_path_factory.mktemp("xcache") / "data.jsonl", rows)


def make_cache(teacher_dir, data, out, *, spans: bool, k: int | None = None):
    """`potstill teacher cache` of `teacher_dir` on `data`, lossless (u32-f32), by default with
    k = the teacher's whole vocabulary, so its top-k rows are its full distributions."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(teacher_dir).vocab_size
    cfg = {
        "teacher": {"name": str(teacher_dir), "device": "cpu", "dtype": "float32"},
        "data": {"source": str(data), "target_field": "completion", "system_prompt": None},
        "k": k or vocab,
        "encoding": "u32-f32",
        "max_seq_len": 2048,
        "spans": spans,
        "run": {"output_dir": str(out), "log_with": []},
    }
    run_teacher_cache(from_dict(TeacherCacheConfig, cfg), Console(quiet=True))
    return out


@pytest.fixture(scope="module")
def span_cache(other_vocab_dir, data, tmp_path_factory):
    return make_cache(other_vocab_dir, data, tmp_path_factory.mktemp("cache") / "c", spans=True)


def _metrics(out):
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize(
    "cross", ["{loss: uld}", "{loss: hybrid, matched_weight: 0.7, unmatched_weight: 1.3}"]
)
def test_offline_with_spans_and_k_equal_to_vocab_equals_online(
    tiny_model_dir, other_vocab_dir, data, span_cache, tmp_path, cross
):
    steps = [*STEPS, f"loss.cross_tokenizer={cross}"]
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_distill(config(tiny_model_dir, other_vocab_dir, data, online, *steps), Console(quiet=True))
    cfg = config(
        tiny_model_dir, other_vocab_dir, data, offline, *steps, mode="offline", cache=span_cache
    )
    run_distill(cfg, Console(quiet=True))
    expected, got = _metrics(online), _metrics(offline)
    assert 0.5 < expected[1]["aligned"] < 1.0  # some positions have no partner
    assert expected[1]["soft"] > 1e-3
    for step in (1, 2):
        for key in ("loss", "ce", "soft", "aligned", "kd_ratio"):
            assert got[step][key] == pytest.approx(expected[step][key], abs=1e-5), (step, key)
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (online, offline)]
    counts = [m["counts"]["aligned_positions"] for m in manifests]
    assert counts[0] == counts[1] > 0


def test_cache_without_spans_is_refused_naming_the_option(
    tiny_model_dir, other_vocab_dir, data, tmp_path
):
    cache = make_cache(other_vocab_dir, data, tmp_path / "plain", spans=False, k=8)
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    args = cli_args(tiny_model_dir, other_vocab_dir, data, tmp_path / "run", *offline)
    proc = run_cli(*args, "--set", "loss.cross_tokenizer={loss: uld}")
    assert_one_line_error(proc, "no token spans", "--set spans=true")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_record_whose_text_differs_from_the_cached_one_is_refused_by_name(
    tiny_model_dir, other_vocab_dir, data, span_cache, tmp_path
):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[2]["completion"] = rows[2]["completion"].replace("-4", "-5")
    changed = write_records(tmp_path / "changed.jsonl", rows)
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={span_cache}"]
    args = cli_args(tiny_model_dir, other_vocab_dir, changed, tmp_path / "run", *offline)
    proc = run_cli(*args, "--set", "loss.cross_tokenizer={loss: hybrid}")
    assert_one_line_error(proc, "record 'r2'", "another target text")


def test_cached_spans_are_the_teachers_answer_offsets(other_vocab_dir, data, span_cache):
    from potstill.data.alignment import token_offsets
    from potstill.teacher.cache import open_cache

    cache = open_cache(span_cache)
    tokenizer = load_tokenizer(other_vocab_dir)
    end_of_turn = len(tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"])
    for i, (_, answer) in enumerate(ROWS):
        _, offsets = token_offsets(tokenizer, answer, add_special_tokens=False)
        spans = [tuple(row) for row in cache.spans(f"r{i}").tolist()]
        assert spans == offsets + [(-1, -1)] * end_of_turn
