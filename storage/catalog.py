"""The DuckDB catalog: an index over the shard files, rebuildable from them alone (``reindex``).

One process owns ``<data_dir>/catalog.duckdb`` (DuckDB locks the file); collectors beside it write shards only,
and the owner registers them with ``sync()`` (also run when the catalog opens, so a shard renamed just before a
crash is never lost nor collected twice). A sample id found in several shards (two collectors raced) is kept
once: every query reads the ``unique_records`` view, which keeps its newest copy (so a record re-collected by
the refresh flow replaces the stale one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from storage.filesystem import DataPath, data_path, default_catalog_dir, file_sizes
from storage.records import TopKRecord
from storage.schema import ShardError
from storage.settings import StorageSettings
from storage.shards import (
    SHARD_SUFFIX,
    TMP_SUFFIX,
    ShardInfo,
    index_rows,
    open_shard,
    remove_stale_temp_files,
    shard_dir,
)

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.duckdb"
_INDEX_COLUMNS = ["topk_k", "sample_id", "split", "teacher", "mode", "params", "created_at"]
_INDEX_COLUMNS += ["prompt_tokens", "completion_tokens", "finish_reason"]

_DDL = """
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, bytes BIGINT, sha256 TEXT, rows INTEGER, tokens BIGINT, codec TEXT,
    registered_at DOUBLE
);
CREATE TABLE IF NOT EXISTS records (
    sample_id TEXT, shard TEXT, row_index INTEGER, split TEXT, teacher TEXT, mode TEXT, params TEXT,
    created_at DOUBLE, prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT,
    n_tokens BIGINT, n_soft BIGINT
);
CREATE TABLE IF NOT EXISTS failures (key TEXT, reason TEXT, recorded_at DOUBLE);
CREATE OR REPLACE VIEW unique_records AS
    SELECT * FROM records
    QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY created_at DESC, shard, row_index) = 1;
"""


@dataclass
class SplitStats:
    samples: int
    tokens: int
    soft_tokens: int


@dataclass
class CatalogStats:
    shards: int
    bytes: int
    tokens: int
    bytes_per_token: float
    splits: dict[str, SplitStats]
    teachers: dict[str, int]
    duplicates: int
    failures: int
    temp_files: int
    missing_shards: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [
            f"shards: {self.shards}  bytes: {self.bytes:,}  tokens: {self.tokens:,}  "
            f"bytes/token: {self.bytes_per_token:.2f}",
            f"{'split':<8}{'samples':>12}{'tokens':>14}{'soft tokens':>14}",
        ]
        for name, s in sorted(self.splits.items()):
            lines.append(f"{name:<8}{s.samples:>12,}{s.tokens:>14,}{s.soft_tokens:>14,}")
        for teacher, n in sorted(self.teachers.items()):
            lines.append(f"teacher {teacher}: {n:,} samples")
        lines.append(
            f"duplicate sample ids: {self.duplicates}  failures: {self.failures}  "
            f"unfinished .tmp files: {self.temp_files}"
        )
        lines += [f"MISSING shard file: {name}" for name in self.missing_shards]
        return "\n".join(lines)


def record_shape(record: TopKRecord) -> tuple:
    """What the catalog knows of a record's content, to tell a re-import of the same data from new data."""
    n_soft = int((record.topk_ids >= 0).any(axis=1).sum()) if record.topk_ids.size else 0
    return (
        record.teacher, params_key(record.params), len(record.tokens), n_soft, record.prompt_tokens, record.completion_tokens, record.finish_reason,
    )  # fmt: skip


def params_key(params: dict[str, Any]) -> str:
    """How request parameters are stored (and matched): canonical JSON, as in the shards."""
    return json.dumps(params, sort_keys=True)


class CatalogLocked(ShardError):
    """Another process (a running collection) holds the DuckDB catalog's lock."""


class Catalog:
    """Open (creating if needed) the catalog of ``data_dir``; ``sync`` registers shards written by others.

    ``in_memory``: an index built from the shard files in memory, touching nothing on disk (stats while another
    process holds the catalog's lock). ``catalog_dir``: the local folder of the index (``default_catalog_dir``);
    with ``data_dir`` in object storage the index stays local and is rebuilt from the remote shards."""

    def __init__(
        self,
        data_dir: str | DataPath,
        sync: bool = True,
        read_only: bool = False,
        in_memory: bool = False,
        catalog_dir: str | Path | None = None,
    ) -> None:
        self.data_dir = data_path(data_dir)
        self.catalog_dir = (
            Path(catalog_dir) if catalog_dir is not None else default_catalog_dir(self.data_dir)
        )
        self.path = self.catalog_dir / CATALOG_FILE
        self.in_memory = in_memory
        self.removed_temp: list[tuple[Path, str]] = []  # stale .tmp shards the last sync/reindex removed
        if read_only and not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no catalog (run `distill data reindex` to build one)")
        if not in_memory:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.catalog_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(":memory:" if in_memory else str(self.path), read_only=read_only)
        except duckdb.Error as exc:
            kind = CatalogLocked if "lock" in str(exc).lower() else ShardError
            raise kind(f"{self.path}: cannot open the DuckDB catalog: {exc}") from None
        if not read_only:
            self.con.execute(_DDL)
            if sync:
                self.sync()

    @classmethod
    def of(cls, settings: StorageSettings, **options: bool) -> Catalog:
        """The catalog of a ``[storage]`` config: its data location and its local index folder."""
        return cls(settings.location(), catalog_dir=settings.index_dir(), **options)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- writing -----------------------------------------------------------------------------------------
    def register(self, info: ShardInfo, rows: pa.Table) -> None:
        """Record one complete (already renamed) shard and its rows, in one transaction."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.execute(
                "INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?)",
                [info.name, info.bytes, info.sha256, info.rows, info.tokens, info.codec, time.time()],
            )
            rows = rows.append_column("row_index", pa.array(np.arange(rows.num_rows, dtype=np.int32)))
            self.con.register("_new_rows", rows)
            self.con.execute(
                """INSERT INTO records SELECT sample_id, ?, row_index, split, teacher, mode,
                   params, created_at, prompt_tokens, completion_tokens, finish_reason, n_tokens, n_soft
                   FROM _new_rows""",
                [info.name],
            )
            self.con.unregister("_new_rows")
            # a request that failed before and is stored now is no longer a failure
            self.con.execute(
                "DELETE FROM failures WHERE key IN (SELECT sample_id FROM records WHERE shard = ?)",
                [info.name],
            )
            self.con.execute("COMMIT")
        except BaseException:
            self.con.execute("ROLLBACK")
            raise

    def _register_file(self, path: DataPath) -> None:
        data = path.read_bytes()  # one read (one download from object storage) for the digest and the rows
        parquet = open_shard(path, data)
        try:
            table = parquet.read(columns=_INDEX_COLUMNS)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise ShardError(f"{path}: cannot decode the Parquet data (corrupt shard): {exc}") from None
        codec = parquet.schema_arrow.metadata[b"distill.logprob_codec"].decode()
        rows = index_rows(table)
        info = ShardInfo(
            path.name,
            len(data),
            hashlib.sha256(data).hexdigest(),
            table.num_rows,
            int(rows["n_tokens"].to_numpy().sum()),
            codec,
        )
        self.register(info, rows)

    def shard_files(self) -> list[DataPath]:
        directory = shard_dir(self.data_dir)
        return [directory / name for name in sorted(file_sizes(directory, SHARD_SUFFIX))]

    def sync(self) -> int:
        """Register complete shard files not yet in the catalog (written by other processes); returns how many.
        Unfinished ``.tmp`` shards whose writer is gone (or older than an hour) are removed."""
        if not self.in_memory:
            self.removed_temp = remove_stale_temp_files(self.data_dir)
        known = {name for (name,) in self.con.execute("SELECT name FROM shards").fetchall()}
        new = [p for p in self.shard_files() if p.name not in known]
        for path in new:
            self._register_file(path)
        if new:
            log.info("catalog: registered %d new shard(s)", len(new))
        return len(new)

    def reindex(self, progress: bool = False) -> int:
        """Rebuild the shard and record index from the shard files alone; returns the number of shards."""
        self.removed_temp = remove_stale_temp_files(self.data_dir)
        files = self.shard_files()
        for path in files:  # fail before touching the index, naming the bad file
            open_shard(path)
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute("DELETE FROM records")
        self.con.execute("DELETE FROM shards")
        self.con.execute("COMMIT")
        for path in tqdm(files, desc="reindex", unit="shard", disable=not progress):
            self._register_file(path)
        return len(files)

    def record_failures(self, failures: list[tuple[str, str]]) -> None:
        """Remember requests that failed for good: ``(sample id or prompt hash, reason)``; one row per key (the
        latest reason), and none for a key already stored."""
        if failures:
            now = time.time()
            latest = dict(failures)
            self.con.execute("BEGIN TRANSACTION")
            self.con.executemany("DELETE FROM failures WHERE key = ?", [(k,) for k in latest])
            self.con.executemany(
                "INSERT INTO failures SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM records WHERE sample_id = ?)",
                [(k, r, now, k) for k, r in latest.items()],
            )
            self.con.execute("COMMIT")

    # --- queries -----------------------------------------------------------------------------------------
    def existing_sample_ids(
        self, teacher: str | None = None, params: dict[str, Any] | None = None
    ) -> set[str]:
        """Sample ids already stored (optionally only for this teacher and these request parameters)."""
        query, args = "SELECT DISTINCT sample_id FROM records WHERE 1=1", []
        if teacher is not None:
            query, args = query + " AND teacher = ?", [*args, teacher]
        if params is not None:
            query, args = query + " AND params = ?", [*args, params_key(params)]
        return {sid for (sid,) in self.con.execute(query, args).fetchall()}

    def stale_sample_ids(
        self, max_age_s: float | None = None, teacher: str | None = None, now: float | None = None
    ) -> set[str]:
        """Samples due for a refresh: older than ``max_age_s`` seconds, or written by a teacher other than
        ``teacher`` (a previous teacher version)."""
        clauses, args = [], []
        if max_age_s is not None:
            clauses.append("created_at < ?")
            args.append((time.time() if now is None else now) - max_age_s)
        if teacher is not None:
            clauses.append("teacher <> ?")
            args.append(teacher)
        if not clauses:
            return set()
        rows = self.con.execute(f"SELECT sample_id FROM unique_records WHERE {' OR '.join(clauses)}", args)
        return {sid for (sid,) in rows.fetchall()}

    def stored_shapes(self) -> dict[str, tuple]:
        """sample id -> ``record_shape`` of its newest stored copy."""
        rows = self.con.execute(
            """SELECT sample_id, teacher, params, n_tokens, n_soft, prompt_tokens, completion_tokens,
                      finish_reason FROM unique_records"""
        ).fetchall()
        return {
            sid: (t, p, int(n), int(s), int(pt or 0), int(ct or 0), f) for sid, t, p, n, s, pt, ct, f in rows
        }

    def failures(self) -> list[tuple[str, str, float]]:
        return self.con.execute(
            "SELECT key, reason, recorded_at FROM failures ORDER BY recorded_at"
        ).fetchall()

    def missing_shards(self) -> list[str]:
        """Registered shards whose file is gone or changed size."""
        directory = shard_dir(self.data_dir)
        present = file_sizes(directory, SHARD_SUFFIX)
        rows = self.con.execute("SELECT name, bytes FROM shards ORDER BY name").fetchall()
        return [str(directory / name) for name, size in rows if present.get(name) != size]

    def select(
        self,
        splits: list[str] | None = None,
        teacher: str | None = None,
        mode: str | None = None,
        params: dict[str, Any] | None = None,
        max_samples: int | None = None,
    ) -> list[tuple[str, int, str, int]]:
        """``(shard, row, sample_id, n_tokens)`` of the unique records matching the filters, by shard and row."""
        clauses, args = ["1=1"], []
        if splits is not None:
            clauses.append(f"split IN ({', '.join('?' for _ in splits)})")
            args += list(splits)
        for column, value in (("teacher", teacher), ("mode", mode)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if params is not None:
            clauses.append("params = ?")
            args.append(params_key(params))
        query = (
            f"SELECT shard, row_index, sample_id, n_tokens FROM unique_records WHERE {' AND '.join(clauses)}"
        )
        query += " ORDER BY sample_id" + (f" LIMIT {int(max_samples)}" if max_samples is not None else "")
        rows = self.con.execute(query, args).fetchall()
        return sorted(rows)

    def shard_info(self, name: str) -> ShardInfo:
        row = self.con.execute(
            "SELECT name, bytes, sha256, rows, tokens, codec FROM shards WHERE name = ?", [name]
        ).fetchone()
        if row is None:
            raise KeyError(name)
        return ShardInfo(*row)

    def stats(self) -> CatalogStats:
        shards, size, tokens = self.con.execute(
            "SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(tokens), 0) FROM shards"
        ).fetchone()
        splits = {
            split: SplitStats(int(n), int(t), int(s))
            for split, n, t, s in self.con.execute(
                "SELECT split, count(*), sum(n_tokens), sum(n_soft) FROM unique_records GROUP BY split"
            ).fetchall()
        }
        teachers = dict(
            self.con.execute("SELECT teacher, count(*) FROM unique_records GROUP BY teacher").fetchall()
        )
        (total,) = self.con.execute("SELECT count(*) FROM records").fetchone()
        (failures,) = self.con.execute("SELECT count(*) FROM failures").fetchone()
        temp = len(file_sizes(shard_dir(self.data_dir), TMP_SUFFIX))
        return CatalogStats(
            shards=int(shards),
            bytes=int(size),
            tokens=int(tokens),
            bytes_per_token=size / tokens if tokens else 0.0,
            splits=splits,
            teachers={k: int(v) for k, v in teachers.items()},
            duplicates=int(total) - sum(s.samples for s in splits.values()),
            failures=int(failures),
            temp_files=temp,
            missing_shards=self.missing_shards(),
        )
