"""A real collector-like writer process for the crash and concurrency tests.

``python -m tests.storage.writer_process DATA_DIR SEED COUNT [--catalog] [--records-per-shard N]``: writes
``make_records(SEED, COUNT)`` (skipping sample ids the catalog already has when it owns the catalog), printing
``flushed <n>`` after each shard.

``WRITER_KILL_AT=<point>:<n>`` makes the process SIGKILL itself while writing shard ``n + 1`` (after ``n``
complete shards), at an exact point of the atomic write: ``tmp`` (the ``.parquet.tmp`` file written and
fsynced, not renamed) or ``renamed`` (renamed to its final name, not yet registered in the catalog). The shard
is written with the same public steps ``ShardWriter.flush`` runs, so the crash tests need no timing luck.
"""

import argparse
import os
import signal
import sys

from storage.catalog import Catalog
from storage.codec import Q16Params
from storage.records import TeacherVocab, TopKRecord
from storage.schema import records_to_table
from storage.settings import StorageSettings
from storage.shards import TMP_SUFFIX, ShardWriter, shard_dir, write_shard, write_table
from tests.storage.factory import make_records, teacher_vocab


def die_while_writing(
    point: str, records: list[TopKRecord], vocab: TeacherVocab, settings: StorageSettings
) -> None:
    """Write one shard of ``records`` up to ``point``, then SIGKILL this process."""
    table = records_to_table(records, vocab, settings.logprob_codec, Q16Params())
    if point == "tmp":
        directory = shard_dir(settings.data_dir)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f"killed{TMP_SUFFIX}"
        write_table(table, tmp, settings)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    elif point == "renamed":
        write_shard(table, settings.data_dir, settings)  # renamed; ShardWriter would register it next
    else:
        raise SystemExit(f"WRITER_KILL_AT: unknown point {point!r} (expected tmp or renamed)")
    print("dying", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


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
    kill_point, _, kill_after = os.environ.get("WRITER_KILL_AT", "").partition(":")
    todo = [r for r in records if r.sample_id not in done]
    for i, record in enumerate(todo):
        if kill_point and len(writer.written) == int(kill_after):
            die_while_writing(kill_point, todo[i : i + args.records_per_shard], vocab, settings)
        before = len(writer.written)
        writer([record], vocab)
        if len(writer.written) > before:
            print(f"flushed {len(writer.written)}", flush=True)
    writer.close()
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
