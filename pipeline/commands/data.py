"""``distill data stats|reindex|snapshot``: look at and maintain the teacher-data store."""

from __future__ import annotations

import argparse

from pipeline.config import DistillConfig, load_config
from pipeline.errors import UserError
from storage.catalog import CATALOG_FILE, Catalog, CatalogLocked
from storage.records import SPLITS
from storage.schema import ShardError
from storage.settings import StorageSettings
from storage.snapshot import create_snapshot


def _storage(args: argparse.Namespace) -> StorageSettings:
    """The ``[storage]`` settings: the data (a folder or an s3:// URL) and the local catalog index folder."""
    if args.data_dir:
        return StorageSettings(data_dir=args.data_dir)
    config_path = args.config or args.config_option
    config = load_config(config_path) if config_path else DistillConfig()
    return config.storage


def _stats(args: argparse.Namespace) -> int:
    storage = _storage(args)
    data_dir, index = storage.data_dir, storage.index_dir() / CATALOG_FILE
    if not index.is_file():
        raise FileNotFoundError(
            f"{index}: no catalog here (run `distill data reindex --data-dir {data_dir}`)"
        )
    note = None
    try:
        try:
            with Catalog.of(storage, read_only=True) as catalog:
                stats = catalog.stats()
        except CatalogLocked:  # a collection holds the catalog: index the shard files in memory instead
            note = "catalog in use by another process (a running collection?): counted from the shard files"
            with Catalog.of(storage, in_memory=True) as catalog:
                stats = catalog.stats()
    except ShardError as exc:
        raise UserError(str(exc)) from None
    print(stats.render())
    if note:
        print(note)
    return 1 if stats.missing_shards else 0


def _reindex(args: argparse.Namespace) -> int:
    storage = _storage(args)
    data_dir = storage.data_dir
    try:
        with Catalog.of(storage, sync=False) as catalog:
            count = catalog.reindex(progress=True)
            stats = catalog.stats()
    except ShardError as exc:
        raise UserError(str(exc)) from None
    for path, why in catalog.removed_temp:
        print(f"removed unfinished shard {path}: {why}")
    print(f"reindexed {count} shard(s) in {data_dir}")
    print(stats.render())
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    try:
        with Catalog.of(_storage(args)) as catalog:
            snapshot = create_snapshot(
                catalog,
                args.name,
                splits=args.split or None,
                teacher=args.teacher,
                mode=args.mode,
                max_samples=args.max_samples,
            )
    except (ShardError, ValueError) as exc:
        raise UserError(str(exc)) from None
    print(
        f"{snapshot.path}: {snapshot.samples} samples, {snapshot.tokens} tokens, hash {snapshot.content_hash}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="Inspect and maintain the teacher-data store (shards + catalog).")
    actions = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", nargs="?", help="Config file whose storage.data_dir to use.")
        p.add_argument("--data-dir", help="Data folder (default: storage.data_dir of the config).")
        p.add_argument("--config", dest="config_option", help="Same as the positional CONFIG.")

    stats = actions.add_parser("stats", help="Print the catalog summary: shards, samples/tokens per split.")
    common(stats)
    stats.set_defaults(handler=_stats)
    reindex = actions.add_parser("reindex", help="Rebuild the catalog from the shard files alone.")
    common(reindex)
    reindex.set_defaults(handler=_reindex)
    snapshot = actions.add_parser("snapshot", help="Freeze a selection of records as a named snapshot.")
    common(snapshot)
    snapshot.add_argument("name", help="Snapshot name (file snapshots/<name>.json).")
    snapshot.add_argument("--split", action="append", choices=SPLITS, help="Split to include (repeatable).")
    snapshot.add_argument("--teacher", help="Only records of this teacher model.")
    snapshot.add_argument("--mode", choices=["generate", "score"], help="Only records of this mode.")
    snapshot.add_argument("--max-samples", type=int, help="At most this many samples (by sample id).")
    snapshot.set_defaults(handler=_snapshot)
