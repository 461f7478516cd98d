"""Experiment trackers (`run.log_with`): each one must be installed, checked when the config is
built. accelerate drops a tracker it cannot import with a warning and trains on: a run asked to
log to W&B would finish with exit code 0 and nothing logged, found out only afterwards."""

from __future__ import annotations

import importlib.metadata
import importlib.util

from potstill.errors import ConfigError

INSTALL = {
    "tensorboard": "pip install tensorboard",
    "wandb": "pip install 'potstill[wandb]'",
    "mlflow": "pip install 'potstill[mlflow]'",
}
"""What installs each tracker accelerate can start."""


def installed(tracker: str) -> bool:
    """Whether accelerate will start `tracker`: the tests it makes itself (a module to import;
    for MLflow the `mlflow` or `mlflow-skinny` distribution, which both provide it)."""
    if importlib.util.find_spec(tracker) is None:
        return False
    if tracker != "mlflow":
        return True
    for distribution in ("mlflow", "mlflow-skinny"):
        try:
            importlib.metadata.distribution(distribution)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def check_trackers(log_with: list[str]) -> None:
    """ConfigError naming the first tracker in `log_with` that is not installed, and the fix."""
    for tracker in log_with:
        if tracker in INSTALL and not installed(tracker):
            raise ConfigError(
                f"log_with: {tracker} is not installed; {INSTALL[tracker]} or drop it from "
                "run.log_with"
            )
