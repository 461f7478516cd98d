"""Library chatter off for CLI runs.

A refusal is one `error: ...` line on stderr; a library's notice printed beside it (transformers
on generation flags a model's own generation_config sets, a deprecation about its internals)
makes that two lines and buries the one that matters. `POTSTILL_DEBUG=1` keeps them all.
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = (
    "transformers",
    "peft",
    "accelerate",
    "torch",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
)
VERBOSITY = ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")
"""The HF libraries set their loggers' level from these when they are imported (a user's own
setting wins)."""


def quiet_libraries() -> None:
    """Drop the libraries' warnings and log records below ERROR, for this process and the
    processes it starts."""
    for module in LIBRARIES:
        warnings.filterwarnings("ignore", module=module)
        # Loggers without a handler print through logging's last resort, WARNING and up.
        logging.getLogger(module).setLevel(logging.ERROR)
    for name in VERBOSITY:
        os.environ.setdefault(name, "error")
