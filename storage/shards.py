"""Atomic shard files: ``ShardWriter`` (buffer → ``<uuid>.parquet.tmp`` → fsync → rename → catalog) and readers.

On object storage (``data_dir = "s3://..."``) the shard is encoded in memory, uploaded to the temporary key and
copied server-side to its final key (see ``storage.filesystem``); there is no fsync and no pid check of a
temporary key's writer (it may run on another machine): only the grace period removes one.

A crash loses at most the shard in flight: a ``.tmp`` file is never read, and a renamed shard is complete. When
the writer owns a ``Catalog`` it registers each shard after its rename, in one transaction; a shard renamed just
before a crash is picked up by the catalog's ``sync()`` the next time it is opened.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage.codec import Q16Params, segment_starts
from storage.filesystem import DataPath, RemotePath, data_path, parquet_target
from storage.records import TeacherVocab, TopKRecord
from storage.schema import (
    BYTE_SPLIT_COLUMNS,
    METADATA_COLUMNS,
    ShardArrays,
    ShardError,
    arrays_to_records,
    check_schema,
    per_position,
    records_to_table,
    table_to_arrays,
)
from storage.settings import StorageSettings

if TYPE_CHECKING:
    from storage.catalog import Catalog

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
SHARD_SUFFIX = ".parquet"
TMP_SUFFIX = ".parquet.tmp"


@dataclass(frozen=True)
class ShardInfo:
    """What the catalog knows about one complete shard file."""

    name: str  # file name inside <data_dir>/shards (unique: a random uuid, whichever worker wrote it)
    bytes: int
    sha256: str
    rows: int
    tokens: int
    codec: str


def shard_dir(data_dir: str | DataPath) -> DataPath:
    return data_path(data_dir) / SHARD_DIR


def file_sha256(path: str | DataPath) -> str:
    digest = hashlib.sha256()
    with data_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(table: pa.Table, path: Path | pa.NativeFile, settings: StorageSettings) -> None:
    """Write one shard table to ``path`` (a local file or an Arrow stream) with the encodings the format relies on (BYTE_STREAM_SPLIT ints)."""
    compression = None if settings.compression == "none" else settings.compression
    present = set(table.column_names)
    metadata = table.schema.metadata or {}
    table = table.replace_schema_metadata(None)
    # no Arrow schema copy in the footer: it would repeat the vocabulary metadata, base64-encoded; the Parquet
    # logical types restore the same Arrow types
    with pq.ParquetWriter(
        path,
        table.schema,
        compression=compression,
        compression_level=settings.compression_level if compression == "zstd" else None,
        use_dictionary=[c for c in ("split", "teacher", "mode", "params", "finish_reason") if c in present],
        use_byte_stream_split=[
            f"{c}.list.element"
            for c in BYTE_SPLIT_COLUMNS
            if c in present and pa.types.is_list(table.schema.field(c).type)
        ],
        write_statistics=False,
        store_schema=False,
    ) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(metadata)


def _write_remote_shard(
    table: pa.Table, tmp: RemotePath, final: RemotePath, settings: StorageSettings
) -> tuple[str, int]:
    """Encode in memory, upload to the temporary key, copy to the final key; returns its sha256 and size."""
    sink = pa.BufferOutputStream()
    write_table(table, sink, settings)
    data = sink.getvalue().to_pybytes()
    try:
        tmp.write_bytes(data)
        tmp.replace(final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest(), len(data)


def write_shard(
    table: pa.Table, data_dir: str | DataPath, settings: StorageSettings, prefix: str = ""
) -> ShardInfo:
    """Write ``table`` to a temporary name, fsync, rename to ``shards/<prefix><uuid>.parquet``; returns its info.

    ``prefix`` groups the shards of one writer (a collection partition finds its own after a restart)."""
    directory = shard_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}{uuid.uuid4().hex}{SHARD_SUFFIX}"
    # the writer's pid in the temporary name tells a crashed writer's file from a live one (stale_temp_files)
    tmp = directory / f"{name[: -len(SHARD_SUFFIX)]}-{os.getpid()}{TMP_SUFFIX}"
    codec = table.schema.metadata[b"distill.logprob_codec"].decode()
    tokens = int(per_position(table.column("topk_k"))[1][-1])
    if isinstance(directory, RemotePath):
        digest, size = _write_remote_shard(table, tmp, directory / name, settings)
        return ShardInfo(name, size, digest, table.num_rows, tokens, codec)
    try:
        write_table(table, tmp, settings)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return ShardInfo(name, (directory / name).stat().st_size, digest, table.num_rows, tokens, codec)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_temp_files(
    data_dir: str | DataPath, grace_s: float = 3600.0, now: float | None = None
) -> list[tuple[DataPath, str]]:
    """Unfinished ``.tmp`` shards a crashed writer left: ``(path, why)`` for those whose writer process (its pid
    is in the name) is gone, or older than ``grace_s`` seconds; a live writer's file is never listed."""
    directory = shard_dir(data_dir)
    if not directory.is_dir():
        return []
    now = time.time() if now is None else now
    stale = []
    for path in sorted(directory.glob(f"*{TMP_SUFFIX}"), key=str):
        stem = path.name[: -len(TMP_SUFFIX)]
        pid_text = stem.rpartition("-")[2]
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:  # its writer just renamed it
            continue
        local = isinstance(path, Path)  # a remote key's writer may live on another machine
        if (
            local
            and pid_text.isdigit()
            and int(pid_text) != os.getpid()
            and not _process_alive(int(pid_text))
        ):
            stale.append((path, f"its writer (pid {pid_text}) is gone"))
        elif age > grace_s:
            stale.append((path, f"unchanged for {age / 3600:.1f} h"))
    return stale


def remove_stale_temp_files(data_dir: str | DataPath, grace_s: float = 3600.0) -> list[tuple[DataPath, str]]:
    """Delete what ``stale_temp_files`` lists, logging each with its reason; returns them."""
    removed = []
    for path, why in stale_temp_files(data_dir, grace_s):
        path.unlink(missing_ok=True)
        log.warning("removed unfinished shard %s: %s", path, why)
        removed.append((path, why))
    return removed


def open_shard(path: str | DataPath, data: bytes | None = None) -> pq.ParquetFile:
    """Open a shard file (or its ``data``, already read), with an error naming it when it is missing, not
    Parquet, or not a shard."""
    path = data_path(path)
    if data is None and not path.is_file():
        raise FileNotFoundError(f"{path}: shard file is missing")
    try:
        if data is not None:
            parquet = pq.ParquetFile(pa.BufferReader(data))
        else:
            where, filesystem = parquet_target(path)
            parquet = pq.ParquetFile(where if filesystem is None else filesystem.open_input_file(where))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file (corrupt or truncated): {exc}") from None
    check_schema(parquet.schema_arrow, str(path))
    return parquet


def read_shard_table(path: str | DataPath, columns: list[str] | None = None) -> pa.Table:
    parquet = open_shard(path)
    try:
        return parquet.read(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: cannot decode the Parquet data (corrupt shard): {exc}") from None


def read_shard_arrays(
    path: str | DataPath, rows: np.ndarray | None = None, columns: list[str] | None = None
) -> ShardArrays:
    """Decode a shard (optionally only some rows, in the given order, and some columns) into flat arrays.

    ``columns`` must include the token and top-k columns; metadata columns and logits are optional."""
    parquet = open_shard(path)
    if columns is not None:
        columns = [c for c in columns if c in parquet.schema_arrow.names]
    try:
        table = parquet.read(columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: cannot decode the Parquet data (corrupt shard): {exc}") from None
    if rows is not None and not np.array_equal(rows, np.arange(table.num_rows)):
        table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
    try:
        return table_to_arrays(table, str(path))
    except ShardError:
        raise
    except (pa.ArrowInvalid, ValueError, IndexError) as exc:
        raise ShardError(f"{path}: damaged shard: {exc}") from None


def read_records(path: str | DataPath) -> list[TopKRecord]:
    """The records of one shard, with teacher ids (the inverse of ``ShardWriter``, up to the codec's error)."""
    return arrays_to_records(read_shard_arrays(path))


def index_rows(table: pa.Table) -> pa.Table:
    """Per-row facts the catalog keeps: the metadata columns plus token and soft-target counts."""
    k, offsets = per_position(table.column("topk_k"))
    cumulative = segment_starts((k > 0).astype(np.int64))
    lengths, soft = np.diff(offsets), cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    columns = [c for c in METADATA_COLUMNS if c not in ("prompt", "text")]
    return (
        table.select(columns)
        .append_column("n_tokens", pa.array(lengths))
        .append_column("n_soft", pa.array(soft))
    )


class ShardWriter:
    """Buffers records and writes a shard every ``settings.shard_max_records`` (and on ``close``).

    Usable as the collector's sink: ``writer(records, vocab)``. With a ``catalog`` each shard is registered right
    after its rename; without one (a collector beside the catalog's owner) the owner picks shards up by
    ``Catalog.sync()`` / ``reindex()``.
    """

    def __init__(
        self,
        data_dir: str | DataPath,
        settings: StorageSettings | None = None,
        catalog: Catalog | None = None,
        codec_params: Q16Params | None = None,
        name_prefix: str = "",
    ) -> None:
        self.data_dir = data_path(data_dir)
        self.name_prefix = name_prefix
        self.settings = settings or StorageSettings(data_dir=str(self.data_dir))
        self.catalog = catalog
        self.codec_params = codec_params or Q16Params()
        self.written: list[ShardInfo] = []
        self._buffer: list[TopKRecord] = []
        self._vocab: TeacherVocab | None = None

    def add(self, records: Iterable[TopKRecord], vocab: TeacherVocab) -> None:
        if self._vocab is not None and vocab is not self._vocab and self._buffer:
            self.flush()  # ids of buffered records belong to the previous vocabulary
        self._vocab = vocab
        for record in records:
            self._buffer.append(record)
            if len(self._buffer) >= self.settings.shard_max_records:
                self.flush()

    __call__ = add

    def flush(self) -> ShardInfo | None:
        if not self._buffer:
            return None
        assert self._vocab is not None
        table = records_to_table(self._buffer, self._vocab, self.settings.logprob_codec, self.codec_params)
        info = write_shard(table, self.data_dir, self.settings, self.name_prefix)
        if self.catalog is not None:
            self.catalog.register(info, index_rows(table))
        log.debug("wrote shard %s: %d records, %d bytes", info.name, info.rows, info.bytes)
        self.written.append(info)
        self._buffer = []
        return info

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
