"""System prompts and templates, kept out of code and YAML."""

from importlib import resources
from pathlib import Path


def load_prompt(name_or_path: str) -> str:
    """A bundled prompt by name (e.g. "step_by_step") or any text file by path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8").strip()
    bundled = resources.files(__package__) / f"{name_or_path}.txt"
    if bundled.is_file():
        return bundled.read_text(encoding="utf-8").strip()
    from potstill.errors import ConfigError

    raise ConfigError(f"prompt '{name_or_path}' not found: give a .txt file path or a bundled name")
