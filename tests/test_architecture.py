"""The layers of docs/architecture.md, read from the imports with `ast`: every import (also the
ones inside functions) goes to the same layer or one below, library code never imports a stage or
the CLI, and the module graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "potstill"
LAYERS = (
    ("errors", "paths", "redact", "specs"),
    ("fsutil", "distributed", "config"),
    ("kit", "prompts", "runs", "run_checks", "losses"),
    ("data", "models", "doctor", "memory_plan"),
    ("teacher",),
    ("train", "curate", "eval"),
    ("rlt", "report"),
    ("stages",),
    ("cli", "api", "__main__", "__init__"),
)
"""Lowest first. A module's layer is that of its top-level name under potstill/."""
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def modules(root: Path) -> dict[str, Path]:
    """Dotted name (without the package prefix) -> file, for every module under `root`."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: dict[str, Path], package: str = "potstill") -> set[str]:
    """The project modules `path` imports: `from a.b import c` is a.b.c when c is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        else:
            continue
        for module, name in targets:
            if module != package and not module.startswith(package + "."):
                continue
            inner = module[len(package) + 1 :]
            full = f"{inner}.{name}" if inner and name else (name or inner)
            if full in known:
                found.add(full)
            elif inner in known:
                found.add(inner)
            elif not inner:
                found.add("__init__")
    return found


def layer(module: str) -> int:
    return LAYER_OF[module.split(".")[0]]


def violations(root: Path, package: str = "potstill") -> list[str]:
    """Upward imports, and cycles, in the package at `root`."""
    known = modules(root)
    graph = {m: imports(p, known, package) - {m} for m, p in known.items()}
    problems = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    return problems + [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    unknown = sorted({m.split(".")[0] for m in modules(SRC)} - set(LAYER_OF))
    assert not unknown, f"add {unknown} to LAYERS here and in docs/architecture.md"


def test_imports_run_down_the_layers_without_cycles():
    assert violations(SRC) == []


def test_library_code_never_imports_a_stage_or_the_cli():
    known = modules(SRC)
    upward = [
        f"{m} imports {t}"
        for m, p in known.items()
        if layer(m) < LAYER_OF["stages"]
        for t in imports(p, known)
        if t.split(".")[0] in ("stages", "cli")
    ]
    assert upward == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "potstill" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "potstill"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # a library module reaching up into a stage, inside a function
            {"data/x.py": "def f():\n    from potstill.stages.sft import run_sft\n",
             "stages/sft.py": "run_sft = 1\n"},
            ["data.x (layer 3) imports stages.sft (layer 7)"],
        ),
        (  # two modules of one layer importing each other
            {"train/a.py": "from potstill.train import b\n",
             "train/b.py": "from potstill.train.a import x\n"},
            ["import cycle: train.a -> train.b"],
        ),
        (  # downward only: nothing to report
            {"stages/s.py": "from potstill.data.x import f\n", "data/x.py": "f = 1\n"},
            [],
        ),
    ],
)  # fmt: skip
def test_the_checker_catches_what_it_forbids(tmp_path, files, expected):
    assert violations(_package(tmp_path, files)) == expected
