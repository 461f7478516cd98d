"""Where a stage's generation runs: `engine: local` (the configured backend in this process) or
`engine: ray` (the same backend on a pool of Ray actors, `teacher.ray_backend`). `generate`,
`eval` and `rlt explain` open their backend here."""

from __future__ import annotations

from potstill.config.engine import Engine, RayConfig
from potstill.config.sections import BackendConfig, ModelConfig
from potstill.teacher.backends import Backend
from potstill.teacher.factory import make_backend


def open_backend(
    model: ModelConfig, backend: BackendConfig, engine: Engine, ray: RayConfig, *, batch_size: int
) -> Backend:
    """The configured backend, in this process or on `ray.num_workers` Ray actors (Ray is
    imported only then; `close()` stops the actors and the local cluster it started)."""
    if engine == "ray":
        from potstill.teacher.ray_backend import RayBackend

        return RayBackend(model, backend, ray, batch_size=batch_size)
    return make_backend(model, backend, batch_size=batch_size)
