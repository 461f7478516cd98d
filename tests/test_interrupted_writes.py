"""An interrupt (Ctrl-C, or SIGTERM, which the CLI turns into KeyboardInterrupt) at any line of a
shard writer's flush leaves each record on disk at most once, and a rerun completes the set.

The subprocess suite (test_kill_resume.py) sends signals at random moments; a flush is over in
microseconds, so here a tracer raises the interrupt before each line of it in turn. Both writers
flush through the one `BufferedShards.flush`; the lines walked are its own and those of what it
calls: the format's shard write and bookkeeping, and the atomic write of the file itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from potstill import fsutil
from potstill.data import ShardWriter, read_shards
from potstill.data.shard_buffer import BufferedShards
from potstill.teacher.cache_format import read_shard_header, shard_paths
from potstill.teacher.cache_writer import CacheWriter

IDS = [f"r{i}" for i in range(5)]


def interrupt_at(codes, nth: int):
    """A tracer that raises KeyboardInterrupt before the nth line run in `codes` (all calls)."""
    seen = 0

    def local(frame, event, arg):
        nonlocal seen
        if event == "line":
            seen += 1
            if seen == nth:
                raise KeyboardInterrupt
        return local

    return lambda frame, event, arg: local if frame.f_code in codes else None


def records_writer(path):
    return ShardWriter(path, shard_size=2, flush_seconds=1e9)


def write_record(writer, rid):
    writer.write({"id": rid, "completion": f"text of {rid}"})


def records_on_disk(path):
    return [r["id"] for r in read_shards(path)]


def cache_writer(path):
    return CacheWriter(path, {"vocab_size": 16, "k": 2, "encoding": "u32-f32"}, shard_size=2)


def write_cached(writer, rid):
    ids = np.array([[1, 2], [3, 4]], dtype=np.int64)
    writer.write(rid, ids, np.log(np.array([[0.5, 0.25], [0.6, 0.3]], dtype=np.float32)))


def cached_on_disk(path):
    return [entry[0] for shard in shard_paths(path) for entry in read_shard_header(shard).index]


def flush_codes(writer_class) -> tuple:
    """The code a writer's flush runs: the shared flush, and the format's parts it calls. (The
    cache's meta.json goes through the same atomic write as the writer opens: walked too.)"""
    parts = (writer_class.flush, writer_class._write_shard, writer_class._flushed)
    return (*(f.__code__ for f in parts), fsutil.atomic_write_bytes.__code__)


WRITERS = {
    "records": (records_writer, write_record, records_on_disk, flush_codes(ShardWriter)),
    "cache": (cache_writer, write_cached, cached_on_disk, flush_codes(CacheWriter)),
}


def test_both_writers_flush_through_the_one_shared_flush():
    assert ShardWriter.flush is CacheWriter.flush is BufferedShards.flush


@pytest.mark.parametrize("kind", list(WRITERS))
def test_an_interrupt_at_any_line_of_a_flush_writes_no_record_twice(tmp_path, kind):
    make, write, on_disk, codes = WRITERS[kind]
    nth, interrupted = 0, True
    while interrupted:  # the nth line of the flushes, until a run ends before reaching it
        nth += 1
        path = tmp_path / f"at-{nth}"
        sys.settrace(interrupt_at(codes, nth))
        try:
            with make(path) as writer:
                for rid in IDS:
                    write(writer, rid)
            interrupted = False
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        ids = on_disk(path)
        assert len(ids) == len(set(ids)), f"interrupt before line {nth}: {ids}"
        with make(path) as writer:  # the rerun
            for rid in IDS:
                if rid not in writer.done_ids:
                    write(writer, rid)
        assert sorted(on_disk(path)) == IDS
    assert nth > 10  # it did walk through the flushes' lines
