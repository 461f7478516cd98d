"""The curation pipeline end to end: the funnel adds up, run_curate writes its files, config
validation, and the optional rewrite step (resumable)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import pytest
from rich.console import Console

from potstill.config import from_dict, load_config
from potstill.curate.pipeline import STEP_ORDER, curate_records
from potstill.curate.rewrite import FAILED_VERIFICATION, REWRITTEN, rewrite_traces
from potstill.data import read_records, write_records
from potstill.errors import ConfigError, DataError
from potstill.stages.curate import CurateConfig, run_curate
from potstill.teacher.backends import Backend, Generation, Request, Sampling

from .curate_samples import LONG_TRACE, ids, reasons, sample

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
