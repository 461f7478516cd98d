"""sft, distill and the teacher cache train on a trace only under the system prompt it was
generated with (read from the record's `teacher` provenance), or refuse in one line."""

from __future__ import annotations

import pytest

from potstill.config.sections import SFTDataConfig
from potstill.data import write_records
from potstill.data.examples import record_examples
from potstill.errors import DataError

from .conftest import assert_one_line_error, build_tokenizer, run_cli


def _trace(i: int, prompt: str | None) -> dict:
    return {
        "id": f"r{i}",
        "question": f"What is {i} + 1?",
        "completion": f"Answer: {i + 1}",
        "teacher": {"model": "t", "temperature": 0.0, "system_prompt": prompt},
    }


def _built(records, system_prompt, target_field="completion"):
    data = SFTDataConfig(source="x", system_prompt=system_prompt, target_field=target_field)
    return list(record_examples(records, data, build_tokenizer(), 64, where="kept.jsonl"))


def test_the_generation_prompt_is_accepted_by_name_or_by_the_same_text(tmp_path):
    records = [_trace(0, "arithmetic_steps"), _trace(1, "arithmetic_steps")]
    assert len(_built(records, "arithmetic_steps")) == 2
    from potstill.prompts import load_prompt

    same_text = tmp_path / "mine.txt"
    same_text.write_text(load_prompt("arithmetic_steps"))
    built = _built(records, str(same_text))
    assert built[0][1][0] == {"role": "system", "content": load_prompt("arithmetic_steps")}
    assert len(_built([_trace(0, None)], None)) == 1


@pytest.mark.parametrize(
    ("generated", "configured", "hint"),
    [
        ("arithmetic_steps", "step_by_step", "set data.system_prompt=arithmetic_steps"),
        (None, "step_by_step", "set data.system_prompt=null"),
        ("arithmetic_steps", None, "set data.system_prompt=arithmetic_steps"),
    ],
)
def test_another_prompt_than_the_traces_were_generated_with_is_refused(generated, configured, hint):
    records = [_trace(0, generated), _trace(1, generated)]
    with pytest.raises(DataError) as err:
        _built(records, configured)
    assert str(err.value) == (
        f"kept.jsonl: record 'r0' was generated with system prompt {generated!r} but "
        f"data.system_prompt is {configured!r}; {hint} to train with the prompt the traces "
        "were generated with"
    )


def test_targets_that_are_not_traces_are_not_checked():
    records = [{**_trace(0, "arithmetic_steps"), "solution": "1"}]
    assert len(_built(records, "step_by_step", target_field="solution")) == 1


def test_sft_refuses_the_mismatch_in_one_line_before_writing(tiny_model_dir, tmp_path):
    data = write_records(tmp_path / "kept.jsonl", [_trace(i, "arithmetic_steps") for i in range(4)])
    out = tmp_path / "run"
    proc = run_cli(
        "sft", "--set", f"model.name={tiny_model_dir}", "--set", f"data.source={data}",
        "--set", f"run.output_dir={out}",
    )  # fmt: skip
    assert_one_line_error(proc, "record 'r0' was generated with system prompt 'arithmetic_steps'")
    assert not out.exists()
