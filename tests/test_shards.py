import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from potstill.data import ShardWriter, read_records, read_shards
from potstill.errors import DataError


def records(n):
    return [{"id": f"r{i}", "question": f"q{i}"} for i in range(n)]


def test_shards_flush_by_size_and_resume(tmp_path):
    with ShardWriter(tmp_path, shard_size=3) as writer:
        for r in records(7):
            writer.write(r)
        assert sorted(p.name for p in tmp_path.glob("part-*")) == [
            "part-00000.jsonl",
            "part-00001.jsonl",
        ]
    assert [r["id"] for r in read_shards(tmp_path)] == [f"r{i}" for i in range(7)]

    again = ShardWriter(tmp_path, shard_size=3)
    assert again.done_ids == {f"r{i}" for i in range(7)}
    with pytest.raises(DataError, match="id 'r3' is already written"):
        again.write({"id": "r3", "question": "q"})
    again.write({"id": "r7", "question": "q7"})
    again.close()
    assert (tmp_path / "part-00003.jsonl").is_file()  # appended, earlier shards untouched
    assert len(read_records(tmp_path)) == 8  # a shard directory is a record source


def test_stale_temp_files_are_ignored_and_removed(tmp_path):
    (tmp_path / ".part-00000.jsonl.tmp-999").write_text('{"id": "half"')
    writer = ShardWriter(tmp_path)
    assert writer.done_ids == set()
    assert not list(tmp_path.glob(".part-*"))


WORKER = textwrap.dedent(
    """
    import sys, time
    from potstill.data import ShardWriter
    out, n = sys.argv[1], int(sys.argv[2])
    with ShardWriter(out, shard_size=4) as writer:
        for i in range(n):
            if f"r{i}" in writer.done_ids:
                continue
            time.sleep(0.01)
            writer.write({"id": f"r{i}", "question": f"q{i}"})
    """
)


@pytest.mark.parametrize("kill_after", [0.3, 0.6, 0.9])
def test_sigkill_then_rerun_loses_and_duplicates_nothing(tmp_path, kill_after):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, n = tmp_path / "out", 150
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n)])
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(read_shards(out)) if out.exists() else []
    assert len(partial) < n, "the worker finished before the kill; the test proved nothing"
    subprocess.run([sys.executable, str(script), str(out), str(n)], check=True)
    ids = [r["id"] for r in read_shards(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))
    assert len(ids) == len(set(ids))
    for shard in out.glob("part-*.jsonl"):  # every shard is whole JSON lines
        for line in shard.read_text().splitlines():
            json.loads(line)


def test_a_burst_after_a_long_wait_lands_in_one_shard(tmp_path):
    """A batch backend returns a whole batch at once after a long wait: it must be written as
    one shard at once, not its first record alone with the rest held until the next batch."""
    import time

    from potstill.data import ShardWriter, read_shards

    with ShardWriter(tmp_path, shard_size=4, flush_seconds=0.05) as writer:
        time.sleep(0.1)
        for i in range(4):
            writer.write({"id": f"a{i}", "question": "q"})
        assert len(list(tmp_path.glob("part-*.jsonl"))) == 1
        assert len(list(read_shards(tmp_path))) == 4


BAD = "caf\udc80"  # a lone surrogate: what the JSON escape "caf\udc80" reads back as


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"id": "bad", "question": BAD}, "field 'question' holds a lone surrogate"),
        ({"id": "bad", "question": "q", "metadata": {"opts": ["a", BAD]}}, "'metadata.opts[1]'"),
        ({"id": "bad", "question": "q", "extra": {BAD: 1}}, "'extra.caf\\udc80' has a lone"),
    ],
)
def test_a_lone_surrogate_is_refused_alone_and_the_batch_is_written(tmp_path, record, field):
    """It used to fail the UTF-8 encode of the whole shard: no record of the batch was ever
    written, on every rerun. Now that record alone is refused, in one line naming it."""
    with ShardWriter(tmp_path, shard_size=4) as writer:
        writer.write({"id": "a", "question": "q"})
        with pytest.raises(DataError) as exc:
            writer.write(record)
        writer.write({"id": "b", "question": "q"})
    message = str(exc.value)
    assert message.startswith(f"record 'bad' cannot be written to {tmp_path}: ")
    assert field in message and "\\udc80 at character 3" in message
    assert "\n" not in message
    message.encode("utf-8")  # printable: the surrogate is shown escaped
    assert [r["id"] for r in read_shards(tmp_path)] == ["a", "b"]
    again = ShardWriter(tmp_path)
    assert again.done_ids == {"a", "b"}  # the refused id is not marked done: a fixed one fits
    again.write({**record, "question": "fixed", "metadata": {}, "extra": {}})
    again.close()
    assert [r["id"] for r in read_shards(tmp_path)] == ["a", "b", "bad"]


def test_a_lone_surrogate_in_the_id_is_named_escaped(tmp_path):
    with ShardWriter(tmp_path) as writer, pytest.raises(DataError) as exc:
        writer.write({"id": "r\udc80", "question": "q"})
    assert str(exc.value).startswith("record 'r\\udc80' cannot be written")
    assert "field 'id' holds a lone surrogate (\\udc80 at character 1)" in str(exc.value)


@pytest.mark.parametrize("name", ["out.jsonl", "out.parquet"])
def test_write_records_refuses_a_lone_surrogate_and_writes_nothing(tmp_path, name):
    from potstill.data import write_records

    rows = [{"id": "a", "question": "q"}, {"id": "bad", "question": "q", "answer": BAD}]
    with pytest.raises(DataError, match=r"record 'bad' cannot .* field 'answer' holds a lone"):
        write_records(tmp_path / name, rows)
    assert not list(tmp_path.iterdir())  # no partial file, no temp file


def test_shard_bytes_are_unchanged(tmp_path):
    """The on-disk format: one JSON object a line, non-ASCII as UTF-8, in write order."""
    rows = [{"id": "r0", "question": "café ✓", "n": 1.5}, {"id": "r1", "question": "q"}]
    with ShardWriter(tmp_path, shard_size=2) as writer:
        for row in rows:
            writer.write(row)
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    assert (tmp_path / "part-00000.jsonl").read_bytes() == expected
