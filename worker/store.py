"""RocksDB options of the user-state table: one block cache for all of a worker's partitions.

Faust opens one RocksDB store per table partition and gives each its own block cache, so a
worker's cache memory is the per-partition size times the partitions it holds, and it moves with
every rebalance. Here every store of the table shares one LRU cache (as Kafka Streams' bounded
memory configuration does): `KSR_ROCKSDB_BLOCK_CACHE_MB` is the worker's whole cache, however
many partitions it holds. The rest is Faust's own rocksdict setup (write buffers, bloom filters,
binary-search index).
"""

from __future__ import annotations

import rocksdict
from faust.stores.rocksdb import RocksDBOptions

__all__ = ["SharedCacheOptions"]


class SharedCacheOptions(RocksDBOptions):
    """Faust's rocksdict options for every partition's store, all reading through `cache`."""

    def __init__(self, cache: rocksdict.Cache, **options) -> None:
        super().__init__(**{**options, "use_rocksdict": True})
        self.cache = cache

    def as_options(self) -> rocksdict.Options:
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        if self.max_open_files is not None:
            options.set_max_open_files(self.max_open_files)
        options.set_write_buffer_size(self.write_buffer_size)
        options.set_target_file_size_base(self.target_file_size_base)
        options.set_max_write_buffer_number(self.max_write_buffer_number)
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, block_based=True)
        table.set_block_cache(self.cache)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        return options
