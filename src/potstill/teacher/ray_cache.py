"""`engine: ray` for the teacher cache: the teacher runs in a pool of Ray actors, each loading it
once; the driver builds the examples, cuts the batches exactly as the local engine does, and
writes every record's rows itself, in batch order, so the cache holds the local engine's bytes.

    potstill teacher cache --config configs/teacher-cache.yaml --set engine=ray
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from potstill.config.engine import RayConfig
from potstill.config.sections import ModelConfig
from potstill.data.examples import Example
from potstill.teacher.cache_batch import BatchRows, CacheSpec, LocalTeacher
from potstill.teacher.ray_pool import Failed, Pool, PoolWorker


class CacheWorker(PoolWorker):
    """One Ray actor: the teacher, loaded once, run over batches of (record id, example)."""

    def __init__(self, teacher: ModelConfig, spec: CacheSpec):
        self.teacher = LocalTeacher(teacher, spec)

    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def cache(self, batch: list[tuple[str, Example]]) -> BatchRows:
        ((_, rows),) = self.teacher.run([batch])
        return rows


class RayTeacher:
    """The teacher on `ray.num_workers` actors, with `LocalTeacher`'s interface; batches that
    failed every retry are kept in `failed` (their ids and error), not yielded."""

    def __init__(self, teacher: ModelConfig, spec: CacheSpec, ray: RayConfig):
        self.failed: list[Failed] = []
        self.pool = Pool(ray, CacheWorker, teacher, spec)
        try:
            self.vocab_size = self.pool.call(0, "vocab_size")
        except BaseException:
            self.close()
            raise

    def run(
        self, batches: Sequence[Sequence[tuple[str, Example]]]
    ) -> Iterator[tuple[int, BatchRows]]:
        for index, result in self.pool.run("cache", [list(b) for b in batches]):
            if isinstance(result, Failed):
                self.failed.append(result)
            else:
                yield index, result

    def close(self) -> None:
        self.pool.close()  # a second close() does nothing
