import json

import pytest
from rich.console import Console

from potstill.config import load_config
from potstill.data import read_shards
from potstill.errors import ConfigError
from potstill.sections import QuickstartConfig
from potstill.smoke import run_smoke


def config(model_dir, out, **sets):
    overrides = [
        f"model.name={model_dir}",
        f"run.output_dir={out}",
        "generation.max_new_tokens=4",
        "data.source=rg:basic_arithmetic?size=5&seed=3",
        "generation.batch_size=2",
    ]
    return load_config(
        QuickstartConfig, overrides=overrides + [f"{k}={v}" for k, v in sets.items()]
    )


def test_smoke_run_writes_a_complete_run_directory_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    quiet = Console(file=open("/dev/null", "w"))
    summary = run_smoke(config(tiny_model_dir, out), quiet)
    assert summary["records"] == 5
    assert (out / "config.yaml").is_file() and (out / "logs" / "run.log").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["records"] == 5
    assert manifest["inputs"][0]["generator"].startswith("reasoning-gym==")
    assert manifest["versions"]["torch"].startswith("2.")
    assert manifest["attempts"][0]["status"] == "completed"
    records = list(read_shards(out / "answers"))
    assert sorted(r["id"] for r in records) == [f"rg-basic_arithmetic-s3-{i}#0" for i in range(5)]
    assert all(
        isinstance(r["verified"], bool) and r["teacher"]["max_new_tokens"] == 4 for r in records
    )

    # Rerunning the same command finds everything done: nothing generated again, nothing duplicated.
    again = run_smoke(config(tiny_model_dir, out), quiet)
    assert again["records"] == 5 and again["new_tokens"] == 0
    assert len(list(read_shards(out / "answers"))) == 5
    assert len(json.loads((out / "manifest.json").read_text())["attempts"]) == 2

    with pytest.raises(
        ConfigError,
        match=r"holds a run with another config: generation.max_new_tokens \(4 before, 5 now\)",
    ):
        run_smoke(config(tiny_model_dir, out, **{"generation.max_new_tokens": 5}), quiet)
