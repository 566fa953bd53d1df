"""A real collector-like writer process for the crash and concurrency tests.

``python -m tests.storage.writer_process DATA_DIR SEED COUNT [--catalog] [--records-per-shard N]``: writes
``make_records(SEED, COUNT)`` (skipping sample ids the catalog already has when it owns the catalog), printing
``flushed <n>`` after each shard.
"""

import argparse
import sys

from storage.catalog import Catalog
from storage.settings import StorageSettings
from storage.shards import ShardWriter
from tests.storage.factory import make_records, teacher_vocab


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("seed", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--catalog", action="store_true")
    parser.add_argument("--records-per-shard", type=int, default=8)
    parser.add_argument("--length", type=int, default=400, help="Tokens per record.")
    args = parser.parse_args()
    catalog = Catalog(args.data_dir) if args.catalog else None
    settings = StorageSettings(data_dir=args.data_dir, shard_max_records=args.records_per_shard)
    done = catalog.existing_sample_ids() if catalog else set()
    records = make_records(args.seed, args.count, start=args.seed * 100_000, max_len=args.length)
    vocab = teacher_vocab()
    writer = ShardWriter(args.data_dir, settings, catalog=catalog)
    for record in records:
        if record.sample_id in done:
            continue
        before = len(writer.written)
        writer([record], vocab)
        if len(writer.written) > before:
            print(f"flushed {len(writer.written)}", flush=True)
    writer.close()
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
