"""Curation: each filter on hand-written samples with real verifiers, the funnel, the stage."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import pytest
from rich.console import Console

from potstill.config import from_dict, load_config
from potstill.curate.filters import (
    check_format,
    check_length,
    dedup_samples,
    drop_solved_by_student,
    solve_rates,
    verify_samples,
)
from potstill.curate.pipeline import STEP_ORDER, CurateConfig, curate_records, run_curate
from potstill.curate.rewrite import FAILED_VERIFICATION, REWRITTEN, rewrite_traces
from potstill.curate.select import select_per_question
from potstill.data import read_records, write_records
from potstill.errors import ConfigError, DataError
from potstill.teacher.backends import Backend, Generation, Request, Sampling

LONG_TRACE = (
    "First we read the question carefully and write down every quantity it gives us. "
    "The farmer has twelve apples in the first basket and nine apples in the second basket. "
    "Adding the two baskets together gives twenty one apples in total before any are sold. "
    "He then sells five apples at the market on Monday morning to a regular customer. "
    "Subtracting five from twenty one leaves sixteen apples. Answer: 16"
)


def sample(id: str, completion: str, *, source_id: str | None = None, **fields) -> dict:
    """A teacher sample of an exact-match question whose answer is 16."""
    record = {"id": id, "question": "How many apples?", "answer": "16", "task": "exact"}
    record["completion"] = completion
    if source_id is not None:
        record["source_id"] = source_id
    return {**record, **fields}


def ids(records: Sequence[dict]) -> list[str]:
    return [r["id"] for r in records]


def reasons(records: Sequence[dict]) -> dict[str, str]:
    return {r["id"]: r["drop_reason"] for r in records}


# --- format, length ---------------------------------------------------------------------------


def test_format_drops_truncated_unclosed_and_missing_pattern():
    records = [
        sample("ok", "<think>add them</think> Answer: 16"),
        sample("cut", "<think>add them</think> Answer: 16", finish_reason="length"),
        sample("open", "<think>add them and then"),
        sample("nested", "<think>a <think>b</think></think> 16"),
        sample("reversed", "</think> a <think> 16"),
        sample("prefilled", "add them</think> Answer: 16"),  # the chat template opened it
        sample("no_tags", "Answer: 16", finish_reason="stop"),
    ]
    kept, dropped = check_format(records)
    assert ids(kept) == ["ok", "prefilled", "no_tags"]
    assert reasons(dropped) == {
        "cut": "truncated",
        "open": "unclosed_tag",
        "nested": "unclosed_tag",
        "reversed": "unclosed_tag",
    }
    assert all("drop_reason" not in r for r in kept)

    kept, dropped = check_format(
        records[:3], drop_truncated=False, tags=[("<answer>", "</answer>")], require=r"Answer:"
    )
    assert ids(kept) == ["ok", "cut"]
    assert reasons(dropped) == {"open": "missing_pattern"}


def test_length_uses_completion_tokens_else_words():
    records = [
        sample("empty", "   "),
        sample("two_words", "Answer: 16"),
        sample("counted", "Answer: 16", completion_tokens=50),
        sample("long", " ".join(["word"] * 30)),
    ]
    kept, dropped = check_length(records, min_tokens=2, max_tokens=40)
    assert ids(kept) == ["two_words", "long"]
    assert reasons(dropped) == {"empty": "too_short", "counted": "too_long"}


# --- verify -------------------------------------------------------------------------------------


def test_verify_with_reasoning_gym_scorer():
    q0, q1, *_ = read_records("rg:basic_arithmetic?size=4&seed=1")
    assert (q0["answer"], q1["answer"]) == ("-4", "3")
    records = [
        {**q0, "id": "right", "completion": "5 - 3 = 2, 2 - 6 = -4. Answer: -4"},
        {**q0, "id": "wrong", "completion": "5 - 3 = 2, 2 + 6 = 8. Answer: 8"},
        {**q1, "id": "silent", "completion": "I would rather not say."},
    ]
    kept, dropped = verify_samples(records)
    assert ids(kept) == ["right"]
    assert kept[0]["verified"] is True and kept[0]["score"] == 1.0
    assert reasons(dropped) == {"wrong": "wrong_answer", "silent": "no_answer"}
    assert all(r["verified"] is False and r["score"] == 0.0 for r in dropped)
    assert {k: v for k, v in kept[0].items() if k not in ("verified", "score")} == records[0]


def test_verify_gsm_symbolic_math_exact_and_regex():
    gsm = read_records("rg:gsm_symbolic?size=1&seed=1")[0]
    half = {"question": "Half of one?", "task": "math"}
    records = [
        {**gsm, "id": "gsm", "completion": f"Step by step ... #### {gsm['answer']}"},
        {**half, "id": "frac_vs_decimal", "answer": "0.5", "completion": r"\boxed{\frac{1}{2}}"},
        {**half, "id": "math_wrong", "answer": "0.5", "completion": r"\boxed{\frac{1}{3}}"},
        sample("exact", "so Answer: 16"),
        {"id": "regex", "question": "A 40s number?", "task": "regex", "answer": r"4\d"},
        {"id": "regex_wrong", "question": "A 40s number?", "task": "regex", "answer": r"4\d"},
    ]
    records[4]["completion"] = "Answer: 42"
    records[5]["completion"] = "Answer: 420"  # fullmatch, not search
    kept, dropped = verify_samples(records)
    assert ids(kept) == ["gsm", "frac_vs_decimal", "exact", "regex"]
    assert reasons(dropped) == {"math_wrong": "wrong_answer", "regex_wrong": "wrong_answer"}

    bad = {"id": "bad", "question": "?", "task": "regex", "answer": "4(", "completion": "4"}
    with pytest.raises(DataError, match=r"record 'bad': answer '4\(' is not a valid regex"):
        verify_samples([bad])


# --- dedup --------------------------------------------------------------------------------------


def test_dedup_exact_and_near_duplicates():
    one_word_changed = LONG_TRACE.replace("regular customer", "loyal customer")
    unrelated = (
        "Let x be the number of apples. Twelve plus nine is twenty one, and a sale of five "
        "leaves sixteen, which we check by adding five back to get twenty one again. Answer: 16"
    )
    records = [
        sample("a", LONG_TRACE, source_id="q"),
        sample("b", "  " + LONG_TRACE.upper() + "\n", source_id="q"),  # case and spaces only
        sample("c", one_word_changed, source_id="q"),
        sample("d", unrelated, source_id="q"),
    ]
    kept, dropped = dedup_samples(records)
    assert ids(kept) == ["a", "d"]
    assert reasons(dropped) == {"b": "duplicate", "c": "near_duplicate"}
    assert [r["duplicate_of"] for r in dropped] == ["a", "a"]

    kept, dropped = dedup_samples(records, near=False)
    assert ids(kept) == ["a", "c", "d"]
    kept, dropped = dedup_samples(records, exact=False, near=False)
    assert ids(kept) == ["a", "b", "c", "d"]


def test_dedup_scope_question_or_all():
    records = [
        sample("q1#0", LONG_TRACE, source_id="q1"),
        sample("q2#0", LONG_TRACE, source_id="q2"),
    ]
    kept, _ = dedup_samples(records)  # default scope: only within a question
    assert ids(kept) == ["q1#0", "q2#0"]
    kept, dropped = dedup_samples(records, scope="all")
    assert ids(kept) == ["q1#0"]
    assert reasons(dropped) == {"q2#0": "duplicate"}


# --- difficulty, select ------------------------------------------------------------------------


def test_difficulty_drops_questions_the_student_solves():
    student = [
        *(sample(f"s1#{i}", f"Answer: {a}", source_id="q1") for i, a in enumerate([16, 16, 16, 3])),
        *(sample(f"s2#{i}", f"Answer: {a}", source_id="q2") for i, a in enumerate([16, 1, 2, 3])),
    ]
    rates = solve_rates(student)
    assert rates == {"q1": 0.75, "q2": 0.25}
    teacher = [
        sample("q1#0", "Answer: 16", source_id="q1"),
        sample("q2#0", "Answer: 16", source_id="q2"),
        sample("q3#0", "Answer: 16", source_id="q3"),  # the student was not sampled on q3
        sample("q1#1", "Answer: 16", source_id="q1"),
    ]
    kept, dropped = drop_solved_by_student(teacher, rates, threshold=0.75)
    assert ids(kept) == ["q2#0", "q3#0"]
    assert reasons(dropped) == {"q1#0": "student_solves", "q1#1": "student_solves"}
    kept, _ = drop_solved_by_student(teacher, rates, threshold=0.8)
    assert len(kept) == 4


def test_select_shortest_keeps_k_per_question_ties_by_id():
    records = [
        sample("q1#0", "x", source_id="q1", completion_tokens=30),
        sample("q1#1", "x", source_id="q1", completion_tokens=10),
        sample("q2#0", "x", source_id="q2", completion_tokens=5),
        sample("q1#2", "x", source_id="q1", completion_tokens=20),
        sample("q1#3", "x", source_id="q1", completion_tokens=10),
    ]
    kept, dropped = select_per_question(records, k=2)
    assert ids(kept) == ["q1#1", "q1#3", "q2#0"]
    assert reasons(dropped) == {"q1#0": "over_k", "q1#2": "over_k"}
    kept, dropped = select_per_question(records, k=None)
    assert ids(kept) == ["q1#1", "q1#3", "q1#2", "q1#0", "q2#0"] and not dropped


def test_select_diverse_is_farthest_first_from_the_shortest():
    base = "add twelve and nine then take away five to get sixteen"
    records = [
        sample("paraphrase", base + " which is the answer", source_id="q"),
        sample("shortest", base, source_id="q"),
        sample(
            "different",
            "count the apples one by one in both of the baskets, then remove the five sold "
            "ones, and the answer is 16",
        ),
        sample("close", base + " so the answer is sixteen", source_id="q"),
    ]
    records[2]["source_id"] = "q"
    kept, dropped = select_per_question(records, k=2, order="diverse")
    assert ids(kept) == ["shortest", "different"]
    assert reasons(dropped) == {"paraphrase": "over_k", "close": "over_k"}
    kept, _ = select_per_question(records, k=2, order="shortest")
    assert ids(kept) == ["shortest", "paraphrase"]
    kept, _ = select_per_question(records, k=None, order="diverse")
    assert ids(kept)[:2] == ["shortest", "different"] and len(kept) == 4


# --- the funnel ---------------------------------------------------------------------------------


def mixed_samples() -> list[dict]:
    """Three questions, ten samples, every drop reason of the default steps at least once."""
    near = LONG_TRACE.replace("regular customer", "loyal customer")
    return [
        sample("q1#0", LONG_TRACE, source_id="q1"),
        sample("q1#1", LONG_TRACE, source_id="q1"),  # duplicate
        sample("q1#2", near, source_id="q1"),  # near duplicate
        sample("q1#3", "<think>so 16", source_id="q1"),  # unclosed tag
        sample("q1#4", "Answer: 16 " + "more " * 3, source_id="q1", finish_reason="length"),
        sample("q2#0", "I do not know.", source_id="q2"),  # no answer
        sample("q2#1", "Answer: 15", source_id="q2"),  # wrong: q2 is teacher-unsolved
        sample("q3#0", "Twelve plus nine minus five: Answer: 16", source_id="q3"),
        sample("q3#1", "Answer: 16", source_id="q3"),
        sample("q3#2", "", source_id="q3"),  # too short
    ]


def check_funnel_adds_up(records, kept, dropped, funnel) -> None:
    assert sorted(ids(kept) + ids(dropped)) == sorted(ids(records))
    assert funnel.input_records == len(records)
    assert funnel.steps[0].records_in == len(records)
    for before, after in zip(funnel.steps, funnel.steps[1:], strict=False):
        assert after.records_in == before.records_out
    for step in funnel.steps:
        assert sum(step.reasons.values()) == step.records_in - step.records_out
        assert step.reasons == {
            reason: sum(
                1 for r in dropped if r["dropped_at"] == step.name and r["drop_reason"] == reason
            )
            for reason in step.reasons
        }
    assert funnel.steps[-1].records_out == len(kept)
    assert sum(funnel.reasons().values()) == len(dropped)


def test_funnel_adds_up_and_reports_unsolved_questions():
    records = mixed_samples()
    cfg = from_dict(CurateConfig, {"select": {"k": 1}})
    kept, dropped, funnel = curate_records(records, cfg)
    check_funnel_adds_up(records, kept, dropped, funnel)
    assert ids(kept) == ["q1#0", "q3#1"]
    assert reasons(dropped) == {
        "q1#3": "unclosed_tag",
        "q1#4": "truncated",
        "q3#2": "too_short",
        "q2#0": "no_answer",
        "q2#1": "wrong_answer",
        "q1#1": "duplicate",
        "q1#2": "near_duplicate",
        "q3#0": "over_k",
    }
    steps = {s.name: s for s in funnel.steps}
    assert list(steps) == [n for n in STEP_ORDER if n not in ("student_solves", "rewrite")]
    unsolved = steps["teacher_unsolved"]
    assert (unsolved.records_in, unsolved.records_out) == (3, 3)
    assert (unsolved.questions_in, unsolved.questions_out) == (3, 2)
    assert unsolved.notes == {"unsolved_questions": 1}
    assert funnel.to_dict()["kept"] == {"records": 2, "questions": 2}


def test_funnel_with_student_samples():
    records = mixed_samples()
    rates = {"q1": 1.0, "q3": 0.5}
    kept, dropped, funnel = curate_records(records, CurateConfig(), student_rates=rates)
    check_funnel_adds_up(records, kept, dropped, funnel)
    assert ids(kept) == ["q3#1", "q3#0"]  # select orders shortest first
    student_step = next(s for s in funnel.steps if s.name == "student_solves")
    assert student_step.reasons == {"student_solves": 1}
    assert (student_step.questions_in, student_step.questions_out) == (2, 1)


# --- run_curate end to end ----------------------------------------------------------------------


def quiet() -> Console:
    return Console(file=io.StringIO(), width=140)


def test_run_curate_writes_kept_dropped_funnel(tmp_path):
    samples = write_records(tmp_path / "samples.jsonl", mixed_samples())
    student = [sample("s#0", "Answer: 16", source_id="q3")]
    student_path = write_records(tmp_path / "student.jsonl", student)
    out = tmp_path / "run"
    cfg = from_dict(
        CurateConfig,
        {
            "data": {"source": str(samples)},
            "student_samples": str(student_path),
            "run": {"output_dir": str(out)},
        },
    )
    console = quiet()
    funnel = run_curate(cfg, console)
    printed = console.file.getvalue()
    assert "teacher_unsolved" in printed and "unsolved_questions: 1" in printed
    kept = read_records(out / "kept.jsonl")
    dropped = read_records(out / "dropped.jsonl")
    assert ids(kept) == ["q1#0"]  # q3 is solved by the student
    assert len(kept) + len(dropped) == 10
    assert {r["id"]: r["dropped_at"] for r in dropped}["q3#1"] == "student_solves"
    on_disk = json.loads((out / "funnel.json").read_text())
    assert on_disk == json.loads(json.dumps(funnel.to_dict()))
    assert on_disk["dropped"]["records"] == 9
    assert on_disk["dropped"]["reasons"]["student_solves"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept_records"] == 1
    assert manifest["attempts"][-1]["status"] == "completed"
    assert (out / "config.yaml").is_file()


def test_run_curate_refuses_bad_input_before_creating_the_run(tmp_path):
    questions = write_records(tmp_path / "questions.jsonl", [{"id": "q1", "question": "2+2?"}])
    out = tmp_path / "run"
    cfg = CurateConfig()
    cfg.data.source, cfg.run.output_dir = str(questions), str(out)
    with pytest.raises(DataError, match=r"record 'q1' has no 'completion'.*potstill generate"):
        run_curate(cfg, quiet())
    assert not out.exists()

    cfg.data.source = str(write_records(tmp_path / "samples.jsonl", mixed_samples()))
    cfg.student_samples = str(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"student_samples: .*missing.jsonl not found"):
        run_curate(cfg, quiet())
    assert not out.exists()


def test_config_validation_and_example_yaml():
    from pathlib import Path

    example = Path(__file__).parent.parent / "configs" / "curate-gsm.yaml"
    cfg = load_config(CurateConfig, example)
    assert cfg.select.k >= 1 and cfg.rewrite.enabled is False
    with pytest.raises(ConfigError, match=r"select.k: must be > 0"):
        from_dict(CurateConfig, {"select": {"k": 0}})
    with pytest.raises(ConfigError, match=r"format.tags: each entry must be an \[open, close\]"):
        from_dict(CurateConfig, {"format": {"tags": [["<think>"]]}})
    with pytest.raises(ConfigError, match=r"rewrite.prompt_file: rewrite is enabled"):
        from_dict(CurateConfig, {"rewrite": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"dedup.scope: 'al' is not one of .*did you mean 'all'"):
        from_dict(CurateConfig, {"dedup": {"scope": "al"}})


# --- rewrite ------------------------------------------------------------------------------------


class FixedTextBackend(Backend):
    """A real (if tiny) backend: answers each request with a fixed text chosen by its key."""

    name = "fixed"

    def __init__(self, texts: dict[str, str]):
        self.texts = texts
        self.requests: list[Request] = []

    def generate(
        self, requests: Sequence[Request], sampling: Sampling
    ) -> Iterator[tuple[Request, Generation]]:
        for request in reversed(requests):  # any order is allowed
            self.requests.append(request)
            text = self.texts[request.key]
            yield request, Generation(text, 10, len(text.split()), "stop")


def test_rewrite_keeps_a_rewrite_only_when_it_still_verifies(tmp_path):
    records = [sample("good", LONG_TRACE), sample("broken", LONG_TRACE, completion_tokens=60)]
    backend = FixedTextBackend({"good": "12 + 9 - 5 = 16. Answer: 16", "broken": "Answer: 15"})
    shards = tmp_path / "rewrite"
    results = rewrite_traces(records, backend, prompt="Restructure.", shard_dir=shards)
    good, broken = results
    assert good["completion"] == "12 + 9 - 5 = 16. Answer: 16"
    assert good["original_completion"] == LONG_TRACE
    assert good["rewrite"]["status"] == REWRITTEN and good["verified"] is True
    assert broken["completion"] == LONG_TRACE and "original_completion" not in broken
    assert broken["rewrite"]["status"] == FAILED_VERIFICATION
    assert broken["rewrite"]["completion"] == "Answer: 15"
    assert broken["completion_tokens"] == 60
    request = next(r for r in backend.requests if r.key == "good")
    assert request.messages == (
        {"role": "system", "content": "Restructure."},
        {"role": "user", "content": LONG_TRACE},
    )

    again = FixedTextBackend({})
    assert rewrite_traces(records, again, prompt="Restructure.", shard_dir=shards) == results
    assert again.requests == []  # resumed from the shards


def test_run_curate_with_rewrite_resumes_without_a_model(tmp_path):
    samples = write_records(tmp_path / "samples.jsonl", mixed_samples())
    prompt = tmp_path / "restructure.txt"
    prompt.write_text("Rewrite the reasoning as a clean derivation.\n")
    cfg = from_dict(
        CurateConfig,
        {
            "data": {"source": str(samples)},
            "select": {"k": 1},
            "rewrite": {"enabled": True, "prompt_file": str(prompt)},
            "run": {"output_dir": str(tmp_path / "run")},
        },
    )
    built: list[FixedTextBackend] = []

    def factory(rewrite_cfg) -> Backend:
        built.append(FixedTextBackend({"q1#0": "Answer: 16", "q3#1": "Answer: 17"}))
        return built[-1]

    funnel = run_curate(cfg, quiet(), backend_factory=factory)
    assert funnel.steps[-1].name == "rewrite"
    assert funnel.steps[-1].notes == {FAILED_VERIFICATION: 1, REWRITTEN: 1}
    kept = {r["id"]: r for r in read_records(tmp_path / "run" / "kept.jsonl")}
    assert kept["q1#0"]["completion"] == "Answer: 16"
    assert kept["q3#1"]["completion"] == "Answer: 16"  # the rewrite broke it: original kept

    run_curate(cfg, quiet(), backend_factory=factory)
    assert len(built) == 1  # the second run found every rewrite in the shards
