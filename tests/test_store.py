"""The user-state table's RocksDB options: every partition's store reads through one block cache."""

from __future__ import annotations

import contextlib

import rocksdict

from worker.metrics import sample_memory
from worker.store import SharedCacheOptions


def test_partition_stores_share_one_block_cache_and_the_gauge_counts_it_once(tmp_path) -> None:
    cache = rocksdict.Cache(1 << 20)
    options = SharedCacheOptions(cache, write_buffer_size=1 << 20, max_write_buffer_number=2, bloom_filter_size=10)
    dbs = [options.open(tmp_path / f"p{partition}") for partition in range(3)]
    try:
        for partition, db in enumerate(dbs):
            for user in range(3000):
                db[f"{partition}-{user}".encode()] = bytes(800)
            db.flush()
            for user in range(0, 3000, 3):  # read back through the block cache
                assert db[f"{partition}-{user}".encode()] == bytes(800)
        # Each store reports the one cache: its capacity, and all of its usage (the three stores' blocks).
        assert {db.property_int_value("rocksdb.block-cache-capacity") for db in dbs} == {1 << 20}
        usage = cache.get_usage()
        assert usage > 0.5 * (1 << 20), "the reads did not fill the shared cache"
        assert {db.property_int_value("rocksdb.block-cache-usage") for db in dbs} == {usage}
        parts = sample_memory(dbs, cache)
        assert parts["rocksdb_block_cache"] == usage <= 1 << 20
        assert parts["rocksdb_memtables"] >= 0 and parts["rocksdb_table_readers"] > 0
        # Without the shared cache named, the stores' figures are summed: three times the one cache.
        assert sample_memory(dbs)["rocksdb_block_cache"] == 3 * usage
        # A store closed by a rebalance while the gauges are sampled is left out of the sums.
        dbs[0].close()
        assert sample_memory(dbs)["rocksdb_block_cache"] == 2 * cache.get_usage()
    finally:
        for db in dbs:
            with contextlib.suppress(rocksdict.DbClosedError):
                db.close()
