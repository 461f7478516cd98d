"""`potstill distill` on bad input: one line, exit 2, nothing written or overwritten."""

import json
import shutil

import pytest
from rich.console import Console

from potstill.data import write_records
from potstill.stages.distill import run_distill

from .conftest import assert_one_line_error, run_cli
from .distill_helpers import cli_args, config, make_teacher_dir, write_cache, write_data


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("distill-errors")
    teacher = make_teacher_dir(root / "teacher")
    data = write_data(root / "data.jsonl", n=6)
    return tiny_model_dir, teacher, data, root


def _fails(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    return assert_one_line_error(proc, *fragments)


def test_teacher_with_another_vocabulary_is_refused_before_training(
    pair, other_vocab_dir, tmp_path
):
    student, _, data, _ = pair
    out = tmp_path / "run"
    proc = run_cli(*cli_args(student, other_vocab_dir, data, out))
    _fails(proc, "teacher and student tokenizers differ")
    assert not out.exists()


@pytest.mark.slow
def test_cache_of_another_teacher_or_tokenizer_is_refused(pair, other_vocab_dir, tmp_path):
    student, teacher, data, root = pair
    cache = write_cache(root / "cache", teacher, config(student, teacher, data, root / "x"), k=4)
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    proc = run_cli(*cli_args(student, other_vocab_dir, data, tmp_path / "a", *offline))
    _fails(proc, "cache made with teacher")
    # A student of another vocabulary / tokenizer than the one the cache was made with.
    proc = run_cli(*cli_args(other_vocab_dir, teacher, data, tmp_path / "b", *offline))
    _fails(proc, str(cache))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_nan_in_cached_log_probs_is_refused(pair, tmp_path):
    student, teacher, data, _ = pair
    cfg = config(student, teacher, data, tmp_path / "x")
    cache = write_cache(tmp_path / "cache", teacher, cfg, k=4, corrupt="r3")
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    proc = run_cli(*cli_args(student, teacher, data, tmp_path / "run", *offline))
    _fails(proc, "'r3'", "NaN")


@pytest.mark.slow
def test_records_missing_from_the_cache_name_the_first(pair, tmp_path):
    student, teacher, data, root = pair
    cache = root / "cache"
    if not cache.exists():
        write_cache(cache, teacher, config(student, teacher, data, root / "x"), k=4)
    more = write_data(tmp_path / "more.jsonl", n=9)  # r6, r7, r8 were never cached
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    proc = run_cli(*cli_args(student, teacher, more, tmp_path / "run", *offline))
    _fails(proc, "no entry for record 'r6'")


@pytest.mark.slow
def test_cache_made_with_other_data_settings_is_refused(pair, tmp_path):
    student, teacher, data, root = pair
    cache = root / "cache"
    if not cache.exists():
        write_cache(cache, teacher, config(student, teacher, data, root / "x"), k=4)
    meta = json.loads((cache / "meta.json").read_text())
    assert "prompt_field" not in meta  # the helper's cache says nothing; lengths still checked
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    longer = ["--set", "data.system_prompt=step_by_step"]  # every prompt grows, targets stay
    proc = run_cli(*cli_args(student, teacher, data, tmp_path / "run", *offline, *longer))
    assert proc.returncode == 0, proc.stderr  # same target tokens: positions still line up
    shorter_cache = tmp_path / "short"
    cfg = config(student, teacher, data, tmp_path / "x", "train.max_seq_len=26")
    write_cache(shorter_cache, teacher, cfg, k=4)
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={shorter_cache}"]
    proc = run_cli(*cli_args(student, teacher, data, tmp_path / "run2", *offline))
    _fails(proc, "cached positions but", "target tokens here")


def test_records_without_target_tokens_are_skipped_and_counted(pair, tmp_path):
    student, teacher, _, _ = pair
    rows = [
        {"id": "long", "question": "What is 1 + 1? " * 40, "completion": "Answer: 2"},
        {"id": "ok", "question": "What is 2 + 2?", "completion": "Answer: 4"},
    ]
    data = write_records(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    cfg = config(student, teacher, data, out, "train.max_seq_len=64", "train.max_steps=1")
    run_distill(cfg, Console(quiet=True))
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["skipped_no_target_tokens"] == 1 and counts["sequences"] == 1


@pytest.mark.slow
def test_resume_with_a_changed_config_names_every_changed_key(pair, tmp_path):
    student, teacher, data, _ = pair
    out = tmp_path / "run"
    assert run_cli(*cli_args(student, teacher, data, out)).returncode == 0
    config_before = (out / "config.yaml").read_text()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    changed = ["--set", "train.lr=0.5", "--set", "loss.temperature=2.0", "--resume"]
    proc = run_cli(*cli_args(student, teacher, data, out, *changed))
    _fails(proc, "loss.temperature (1.0 before, 2.0 now)", "train.lr (0.0001 before, 0.5 now)")
    assert (out / "config.yaml").read_text() == config_before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints


def test_a_section_given_in_part_keeps_the_stage_defaults():
    from potstill.config import load_config
    from potstill.stages.distill import DistillConfig

    cfg = load_config(DistillConfig, overrides=["student.name=my/model", "train.max_steps=3"])
    assert cfg.student.lora is not None and cfg.student.lora.r == 16  # distill's default: LoRA
    assert cfg.train.lr == 1e-4  # distill's default, not TrainConfig's 1e-5
    assert load_config(DistillConfig, overrides=["student.lora=null"]).student.lora is None


def _student_with_template(root, name, template):
    from potstill.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(root / "student-base")
    tokenizer.chat_template = template
    load_model(root / "student-base", device="cpu").save_pretrained(root / name)
    tokenizer.save_pretrained(root / name)
    return root / name


@pytest.mark.slow
def test_student_chat_template_must_build_the_cached_tokens(pair, tmp_path):
    from .conftest import CHATML

    student, teacher, data, root = pair
    cache = write_cache(
        tmp_path / "cache", teacher, config(student, teacher, data, root / "x"), k=4
    )
    shutil.copytree(student, tmp_path / "student-base")
    offline = ["--set", "teacher.mode=offline", "--set", f"teacher.cache={cache}"]
    # A template that differs only where these records never go (like Qwen2.5-Coder 0.5B/1.5B).
    unused = "{% if tools %}tools!{% endif %}" + CHATML
    same = _student_with_template(tmp_path, "same-render", unused)
    proc = run_cli(*cli_args(same, teacher, data, tmp_path / "ok", *offline))
    assert proc.returncode == 0, proc.stderr
    other = _student_with_template(tmp_path, "other-render", CHATML.replace("\n", " "))
    proc = run_cli(*cli_args(other, teacher, data, tmp_path / "bad", *offline))
    _fails(proc, "record 'r0' tokenises differently")
