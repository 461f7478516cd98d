"""What a hostile user found on the real CLI, in-process: answers folders two eval labels would
share, settings that made silent nonsense (a max_new_tokens beyond the context, an empty stop
string, an endpoint answering a number), inputs that raised a traceback instead of one line
(rg: queries, devices, checkpoints, wrongly typed record fields, a manifest that is no mapping),
and a kd_ratio schedule that never reached its end. `test_reliability_cli.py` runs the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from potstill.config import load_config
from potstill.config.sections import TrainConfig
from potstill.data import read_records, write_records
from potstill.errors import ConfigError, DataError, ModelError
from potstill.eval.results import answers_dir, folder_clash, slug
from potstill.models import resolve_device
from potstill.runs import RunDir
from potstill.stages.eval import EvalConfig
from potstill.stages.generate import GenerateConfig, run_generate
from potstill.teacher.backends import Request, Sampling
from potstill.teacher.openai_backend import EndpointError, OpenAIBackend
from potstill.train.checkpoint import LoopState, load_checkpoint, save_checkpoint
from potstill.train.kd import DistillHooks
from potstill.train.kd_config import KDRatioConfig

from .fake_openai import fake_openai


def eval_config(*overrides: str) -> EvalConfig:
    return load_config(EvalConfig, None, list(overrides))


# 3. eval: one answers folder per label


def test_labels_that_share_an_answers_folder_are_refused():
    labels = "models=[{name: m, label: student/a}, {name: m, label: student-a}]"
    with pytest.raises(ConfigError) as refused:
        eval_config(labels)
    assert str(refused.value) == (
        "models: labels 'student/a' and 'student-a' share the answers folder 'student-a'; give "
        "labels that stay distinct as folder names (letters, digits, '.', '_', '-'; case ignored)"
    )
    with pytest.raises(ConfigError, match="^models: labels 'Big' and 'big' share the answers"):
        eval_config("models=[{name: m, label: Big}, {name: m, label: big}]")  # a macOS disk
    with pytest.raises(
        ConfigError, match="^tasks: names '..' and 'x' share the answers folder 'x'"
    ):
        eval_config("tasks=[{source: a.jsonl, name: '..'}, {source: b.jsonl, name: x}]")
    kept = eval_config("models=[{name: m, label: student/a}, {name: m, label: student-b}]")
    assert [m.label for m in kept.models] == ["student/a", "student-b"]


def test_no_label_or_task_name_leaves_the_answers_folder(tmp_path):
    assert [slug(s) for s in ("../x", "..", ".", "a/../b", ".hidden", "-x-")] == [
        "x", "x", "x", "a-..-b", "hidden", "x",
    ]  # fmt: skip
    answers = tmp_path / "answers"
    for label in ("../x", "..", ".", "/etc/passwd", "a/../../b"):
        path = answers_dir(tmp_path, label, "..")
        assert path.parent.parent == answers and path.resolve().is_relative_to(answers), label
    assert folder_clash(["a", "b", "A/"]) == ("a", "A/", "a")
    assert folder_clash(["a", "b"]) is None


# 8. settings that made silent nonsense


def test_an_empty_stop_string_is_refused():
    with pytest.raises(ConfigError) as refused:
        load_config(GenerateConfig, None, ["generation.stop=['Answer:', '']"])
    assert str(refused.value) == (
        "generation.stop: an empty string ends every completion at once; drop it"
    )


def test_max_new_tokens_beyond_the_context_is_refused_before_anything_is_written(
    tiny_model_dir, tmp_path
):
    write_records(tmp_path / "q.jsonl", [{"id": "a", "question": "What is 1 + 1?"}])
    settings = [f"model.name={tiny_model_dir}", f"data.source={tmp_path / 'q.jsonl'}",
                "generation.system_prompt=null", f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        run_generate(
            load_config(GenerateConfig, None, [*settings, "generation.max_new_tokens=512"])
        )
    assert str(refused.value) == (
        "generation.max_new_tokens: 512 leaves no room for a prompt in the model's context of 512 "
        "tokens; set it well below 512"
    )
    assert not (tmp_path / "run").exists()
    counts = run_generate(
        load_config(GenerateConfig, None, [*settings, "generation.max_new_tokens=2"])
    )
    assert (counts["samples"], counts["skipped_prompt_too_long"]) == (1, 0)


@pytest.mark.parametrize(
    ("content", "shown"), [(42, "int 42"), (None, "NoneType None"), ([{"x": 1}], "list [{'x': 1}]")]
)
def test_a_message_content_that_is_not_text_is_refused(content, shown):
    with fake_openai() as server:
        server.content = content
        backend = OpenAIBackend(server.url, "fake", api_key_env=None, max_retries=0)
        asked = [Request("r0", ({"role": "user", "content": "1 + 1?"},))]
        with pytest.raises(EndpointError) as refused:
            list(backend.generate(asked, Sampling(max_new_tokens=4)))
    assert str(refused.value) == (
        f"{server.url}/chat/completions answered a message content that is not text ({shown}); "
        "is base_url an OpenAI-compatible chat endpoint?"
    )
    assert server.requests == 1  # refused at once, not retried


# 10. one line instead of a traceback


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("size", "query field 'size' has no value; write size=VALUE"),
        ("size=2&&seed=1", "query field '' has no name; write NAME=VALUE, joined by &"),
        ("size=[1", "cannot read the value of 'size' ('[1'); give a number, true/false or a"),
        ("size=ten", "size must be an integer >= 0, got 'ten'"),
        ("size=1.5", "size must be an integer >= 0, got 1.5"),
        ("size=true", "size must be an integer >= 0, got True"),
        ("size=-3", "size must be an integer >= 0, got -3"),
        ("size=2&seed=x", "seed must be an integer, got 'x'"),
        ("size=2&max_terms=abc", "reasoning-gym rejected the settings ('>=' not supported"),
    ],
)  # fmt: skip
def test_bad_rg_query_strings_name_the_field(query, message):
    spec = f"rg:basic_arithmetic?{query}"
    with pytest.raises(DataError) as refused:
        read_records(spec)
    assert str(refused.value).startswith(f"{spec}: {message}"), str(refused.value)


def test_rg_query_values_still_read_as_yaml():
    records = read_records("rg:basic_arithmetic?size=3&seed=7&max_terms=2")
    assert [r["id"] for r in records] == [f"rg-basic_arithmetic-s7-{i}" for i in range(3)]


def test_unknown_devices_are_refused(monkeypatch):
    for device in ("banana", "meta", "", "cuda:x"):
        with pytest.raises(ModelError) as refused:
            resolve_device(device)
        assert str(refused.value) == (
            f"device '{device}': not a device; use cpu, cuda, cuda:N, mps or auto"
        )
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ModelError) as refused:
        resolve_device("cuda:7")
    assert str(refused.value) == (
        "device 'cuda:7': only 2 CUDA GPUs visible (cuda:0 to cuda:1); pick one of them, or auto"
    )
    assert resolve_device("cuda:1") == "cuda:1"


def test_infinite_epochs_are_refused():
    with pytest.raises(ConfigError, match="^epochs: must be a finite number, got inf$"):
        TrainConfig(epochs=math.inf)


def _trainee(size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(size, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model(torch.ones(size)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


# The limit is set in a child process: in pytest's own process it would also cap the file its
# output goes to (CI writes the log to a file, already past the limit: pytest died of EFBIG).
_FULL_DISK_CHILD = """
import json, resource, signal, sys
from pathlib import Path
import torch
from potstill.train.checkpoint import LoopState, save_checkpoint
root, limit = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Linear(40, 40)  # weights 6.7 kB, optimizer 13 kB, rng 6 kB
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
model(torch.ones(40)).sum().backward()
optimizer.step()
scheduler.step()
save_checkpoint(root, LoopState(step=1), model, optimizer, scheduler)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), as ENOSPC would be
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(root, LoopState(step=2), model, optimizer, scheduler)
except OSError as full:
    print(json.dumps([full.strerror, full.filename]))
"""


@pytest.mark.parametrize(
    ("limit", "file"), [(4_000, "trainable.safetensors"), (10_000, "optimizer.pt")]
)
def test_a_checkpoint_write_on_a_full_disk_names_the_file_and_leaves_no_temp_dir(
    tmp_path, limit, file
):
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path), str(limit)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(child.stdout) == [
        "File too large",
        str(tmp_path / ".tmp-step-000002" / file),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # the last good one


@pytest.mark.parametrize(
    ("file", "corrupt", "message"),
    [
        ("trainable.safetensors", "truncate", "unreadable checkpoint (SafetensorError: "),
        ("optimizer.pt", "truncate", "unreadable checkpoint (RuntimeError: "),
        ("optimizer.pt", "other model", "optimizer.pt: not the state this run's training saves "
         "(ValueError: loaded state dict contains a parameter group that doesn't match"),
        ("optimizer.pt", "other shapes", "optimizer.pt: not the state this run's training saves "
         "(ValueError: state 'exp_avg' has shape (2, 2), its parameter (4, 4))"),
        ("optimizer.pt", "a tensor", "optimizer.pt: not the state this run's training saves "
         "(AttributeError: "),
        ("state.json", "[1, 2]", "unreadable checkpoint (TypeError: "),
        ("state.json", '{"step": "2"}', "unreadable checkpoint (TypeError: state.json: step, "
         "micro_batches and tokens must be integers)"),
        ("rng.pt", "a tensor", "rng.pt: not the state this run's training saves (TypeError: "
         "a Tensor, not the generator states)"),
    ],
)  # fmt: skip
def test_a_broken_checkpoint_is_refused_naming_it(tmp_path, file, corrupt, message):
    model, optimizer, scheduler = _trainee(size=4)
    path = save_checkpoint(tmp_path, LoopState(step=2), model, optimizer, scheduler)
    target = path / file
    if corrupt == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif corrupt == "other model":
        torch.save(torch.optim.AdamW([torch.nn.Parameter(torch.ones(4))]).state_dict(), target)
    elif corrupt == "other shapes":
        torch.save(_trainee(size=2)[1].state_dict(), target)
    elif corrupt == "a tensor":
        torch.save(torch.zeros(3), target)
    else:
        target.write_text(corrupt)
    with pytest.raises(DataError) as refused:
        load_checkpoint(path, *_trainee(size=4, seed=1))
    prefix = f"{path}/" if message.startswith(file) else f"{path}: "
    assert str(refused.value).startswith(prefix + message), str(refused.value)
    assert "\n" not in str(refused.value)


def test_wrongly_typed_fields_stages_read_are_refused(tmp_path):
    def refused(record: dict) -> str:
        write_records(tmp_path / "r.jsonl", [record])
        with pytest.raises(DataError) as error:
            read_records(tmp_path / "r.jsonl")
        return str(error.value)

    where = f"{tmp_path / 'r.jsonl'}:1"
    assert refused({"question": "q", "source_id": [1]}) == (
        f"{where}: field 'source_id' must be a string, got list [1]"
    )  # curate groups samples by it: a list crashed there
    assert refused({"question": "q", "teacher": {"system_prompt": 5}}) == (
        f"{where}: field 'teacher.system_prompt' must be a string or null, got int 5"
    )  # sft compares it with data.system_prompt
    assert refused({"question": 5}) == f"{where}: field 'question' must be a string, got int 5"
    write_records(tmp_path / "ok.jsonl", [{"question": "q", "source_id": 7, "teacher": {}}])
    assert read_records(tmp_path / "ok.jsonl")[0]["source_id"] == "7"


@pytest.mark.parametrize("manifest", ["[1, 2]", '"run"', "{not json", '{"attempts": {}}'])
def test_a_manifest_that_is_not_a_mapping_is_refused_with_nothing_written(tmp_path, manifest):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(manifest)
    with pytest.raises(ConfigError) as refused:
        RunDir(run, command="generate", config=GenerateConfig())
    assert str(refused.value) == (
        f"{run / 'manifest.json'}: not a manifest potstill wrote (it must be a JSON object with "
        "attempts, counts and timings); move it away to start its record afresh (outputs are kept)"
    )
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]


def test_an_old_manifest_without_timings_still_resumes(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "generate", "attempts": []}))
    with RunDir(tmp_path, command="generate", config=GenerateConfig()) as run:
        assert [a["status"] for a in run.manifest["attempts"]] == ["running"]
    assert (run.manifest["counts"], run.manifest["timings"]) == ({}, {})


# 14. the kd_ratio schedule reaches its end


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_schedule_goes_from_start_on_the_first_step_to_end_on_the_last(shape, steps):
    start, end = 0.2, 0.9
    ratio = KDRatioConfig(strategy="schedule", start=start, end=end, shape=shape)
    hooks = DistillHooks(SimpleNamespace(loss=SimpleNamespace(kd_ratio=ratio)), tokenizer=None)
    got = []
    for step in range(steps):  # the loop's `step`: optimizer steps finished before this one
        hooks.before_step(step, steps)
        got.append(hooks.kd_ratio)

    def closed_form(i: int) -> float:
        x = i / (steps - 1) if steps > 1 else 0.0
        eased = x if shape == "linear" else (1 - math.cos(math.pi * x)) / 2
        return start + (end - start) * eased

    assert got == pytest.approx([closed_form(i) for i in range(steps)], abs=1e-12)
    assert got[0] == start
    if steps > 1:
        assert got[-1] == end
