"""One record format through every stage: schema, readers, append-only shards."""

from potstill.data.records import FIELDS, validate_record
from potstill.data.shards import ShardWriter, read_shards, write_records
from potstill.data.sources import iter_source, read_records

__all__ = [
    "FIELDS",
    "ShardWriter",
    "iter_source",
    "read_records",
    "read_shards",
    "validate_record",
    "write_records",
]
