"""Where the data lives: a local folder (``pathlib.Path``) or an S3 prefix (``RemotePath``), behind one small
path interface, so shards, snapshots and the reader run unchanged on either.

``data_path("s3://bucket/prefix")`` gives a ``RemotePath`` over ``pyarrow.fs.S3FileSystem``. Its endpoint and
region (not secret) travel with it (and in its URL, as ``?endpoint=...&region=...``, which is how a snapshot
manifest names its data for the training processes); the credentials never do: pyarrow takes them from the usual
AWS sources of the process reading (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``~/.aws/credentials``, instance roles), so no file, log or manifest this project writes holds a secret.

Crash safety on S3: an object becomes visible only when its upload completes, but pyarrow completes an upload
when its stream is closed, even after an error midway. So a shard is written to a temporary key
(``*.parquet.tmp``) and then copied server-side to its final key (``RemotePath.replace``: CopyObject + delete):
a reader sees the final key whole or not at all, and a crash leaves at most a temporary key, never read and
removed after a grace period.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_remote(location: str | os.PathLike | RemotePath) -> bool:
    """Whether ``location`` names object storage (an ``s3://`` URL or a ``RemotePath``)."""
    return isinstance(location, RemotePath) or str(location).startswith(S3_SCHEME)


@functools.lru_cache(maxsize=8)
def s3_filesystem(endpoint: str, region: str) -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region in a process; credentials from the AWS environment."""
    options: dict[str, Any] = {"region": region or None, "connect_timeout": 10, "request_timeout": 60}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    return pafs.S3FileSystem(**options)


@dataclass(frozen=True)
class RemotePath:
    """An object key (or key prefix) in an S3 bucket, with the subset of ``pathlib.Path`` storage uses.

    There are no folders in S3: ``mkdir`` does nothing and a prefix ``is_dir`` when a key starts with it."""

    key: str  # "bucket/prefix/..." without the scheme
    endpoint: str = ""
    region: str = ""

    @property
    def fs(self) -> pafs.S3FileSystem:
        return s3_filesystem(self.endpoint, self.region)

    # --- naming ---------------------------------------------------------------------------------------------
    def __truediv__(self, part: str) -> RemotePath:
        return RemotePath(str(PurePosixPath(self.key) / part), self.endpoint, self.region)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def parent(self) -> RemotePath:
        return RemotePath(str(PurePosixPath(self.key).parent), self.endpoint, self.region)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    def url(self) -> str:
        """``s3://key`` plus the endpoint and region as query parameters (never credentials)."""
        pairs = {k: v for k, v in (("endpoint", self.endpoint), ("region", self.region)) if v}
        query = urlencode(pairs, safe=":/")
        return f"{S3_SCHEME}{self.key}" + (f"?{query}" if query else "")

    __str__ = url

    # --- facts ----------------------------------------------------------------------------------------------
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        info = self._info()
        if info.type == pafs.FileType.Directory:
            return True
        return info.type == pafs.FileType.NotFound and bool(self._list(recursive=False, limit=True))

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self}: no such object")
        return SimpleNamespace(st_size=info.size, st_mtime=info.mtime.timestamp() if info.mtime else 0.0)

    def _list(self, recursive: bool, limit: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.key, recursive=recursive, allow_not_found=True)
        try:
            return self.fs.get_file_info(selector)
        except OSError:  # the bucket itself is missing, or the key is an object
            if limit:
                return []
            raise

    def glob(self, pattern: str) -> list[RemotePath]:
        """Objects directly under this prefix whose name matches ``pattern`` (no recursion, no ``**``)."""
        return [
            RemotePath(info.path, self.endpoint, self.region)
            for info in self._list(recursive=False, limit=True)
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(PurePosixPath(info.path).name, pattern)
        ]

    # --- content --------------------------------------------------------------------------------------------
    def open(self, mode: str = "rb"):
        if mode == "rb":
            return self.fs.open_input_file(self.key)
        if mode == "wb":
            return self.fs.open_output_stream(self.key)
        raise ValueError(f"{self}: mode {mode!r} is not supported on object storage (rb, wb)")

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One object, visible only once complete (a single PUT or a completed multipart upload)."""
        with self.open("wb") as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def replace(self, target: RemotePath) -> RemotePath:
        """Server-side copy to ``target`` then delete this key: ``target`` appears whole or not at all."""
        self.fs.move(self.key, target.key)
        return target

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.is_file():
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a key prefix exists as soon as an object is written under it."""


DataPath = Path | RemotePath


def data_path(location: str | os.PathLike | RemotePath, endpoint: str = "", region: str = "") -> DataPath:
    """A local ``Path`` or a ``RemotePath`` for ``location``.

    For an ``s3://bucket/prefix`` URL the endpoint and region come from the URL's query (``endpoint=``,
    ``region=``), else the arguments (the config), else ``AWS_ENDPOINT_URL`` / ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION``; credentials always from the AWS environment (see the module docstring)."""
    if isinstance(location, (Path, RemotePath)):
        return location
    text = os.fspath(location) if not isinstance(location, str) else location
    if not text.startswith(S3_SCHEME):
        return Path(text)
    parts = urlsplit(text)
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ValueError(f"{text}: unknown query parameter(s) {sorted(unknown)} (endpoint, region)")
    key = (parts.netloc + parts.path).rstrip("/")
    if not parts.netloc:
        raise ValueError(f"{text}: an S3 location is s3://bucket[/prefix]")
    endpoint = query.get("endpoint") or endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
    region = (
        query.get("region")
        or region
        or os.environ.get("AWS_REGION", "")
        or os.environ.get("AWS_DEFAULT_REGION", "")
    )
    return RemotePath(key, endpoint, region)


def default_catalog_dir(data_dir: DataPath) -> Path:
    """Where the index of ``data_dir`` lives when not given: beside the shards for a local folder; for object
    storage a per-location folder in the user's cache (``XDG_CACHE_HOME``, else ``~/.cache``)."""
    if isinstance(data_dir, Path):
        return data_dir
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = hashlib.sha256(f"{data_dir.endpoint}|{data_dir.key}".encode()).hexdigest()[:16]
    return cache / "topk-distill" / "catalog" / where


def file_sizes(directory: DataPath, suffix: str) -> dict[str, int]:
    """name -> size of the files directly in ``directory`` whose name ends with ``suffix`` (one listing)."""
    if isinstance(directory, RemotePath):
        return {
            PurePosixPath(info.path).name: info.size
            for info in directory._list(recursive=False, limit=True)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        }
    if not directory.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in directory.iterdir() if p.name.endswith(suffix) and p.is_file()}


def parquet_target(path: DataPath) -> tuple[Any, pafs.FileSystem | None]:
    """``(where, filesystem)`` arguments for pyarrow readers and writers."""
    if isinstance(path, RemotePath):
        return path.key, path.fs
    return str(path), None
