"""Snapshots: a named, immutable selection of records, written as a JSON manifest.

The manifest lists each shard (file name, size, sha256) with the row ranges selected in it, plus the selection
that produced it. Its ``content_hash`` covers the selection and the exact shard contents but not the name, the
time or the folder, so later stages use it as their cache key: same data, same hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np

from storage.catalog import Catalog
from storage.filesystem import DataPath, data_path
from storage.shards import shard_dir

SNAPSHOT_DIR = "snapshots"
MANIFEST_VERSION = 2  # 2: rows in order_key order


@dataclass(frozen=True)
class ShardSelection:
    path: DataPath
    bytes: int
    sha256: str
    rows: np.ndarray  # int64 row indices, in order_key order

    def check(self) -> None:
        """Fail, naming the file, if the shard is gone or is not the file the snapshot was made from."""
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: shard file of the snapshot is missing")
        size = self.path.stat().st_size
        if size != self.bytes:
            raise ValueError(
                f"{self.path}: shard changed since the snapshot ({size} bytes, expected {self.bytes})"
            )


@dataclass(frozen=True)
class Snapshot:
    name: str
    path: DataPath
    content_hash: str
    selection: dict[str, Any]
    shards: list[ShardSelection]
    samples: int
    tokens: int


def _ranges(rows: list[int]) -> list[list[int]]:
    """Row indices as ``[start, stop)`` runs of consecutive ascending rows (compact in JSON)."""
    runs = []
    for _, group in groupby(enumerate(rows), key=lambda pair: pair[1] - pair[0]):
        items = [row for _, row in group]
        runs.append([items[0], items[-1] + 1])
    return runs


def order_key(prompt: str | None, text: bytes) -> str:
    """The order of records in a snapshot: a hash of the prompt and the bytes of the scored or generated text,
    so it is the same whatever the teacher's name, the time it answered or the shard a record landed in."""
    return hashlib.sha256((prompt or "").encode() + b"\x00" + text).hexdigest()


def shard_order_keys(path: DataPath) -> list[str]:
    """``order_key`` of every row of a shard file (its text: the bytes of its tokens)."""
    from storage.schema import TOKEN_COLUMNS, TOPK_COLUMNS
    from storage.shards import read_shard_arrays

    arrays = read_shard_arrays(path, columns=["prompt", *TOKEN_COLUMNS, *TOPK_COLUMNS])
    prompts = arrays.table.column("prompt").to_pylist()
    pieces, offsets = arrays.vocab_bytes, arrays.row_offsets
    return [
        order_key(prompt, b"".join(pieces[t] for t in arrays.tokens[offsets[r] : offsets[r + 1]]))
        for r, prompt in enumerate(prompts)
    ]


def _by_content(rows: list[tuple], directory: DataPath) -> list[tuple[str, list[tuple]]]:
    """Catalog rows ``(shard, row, sample_id, ...)`` grouped by shard, each shard's rows in ``order_key``
    order and the shards in the order of their first key. Rows within a shard follow the order in which the
    teacher answered and shard names are random: without this the reader's order (training batches, held-out
    order) would change from one collection to the next. Which records share a shard still depends on the
    collector's timing when it writes several shards (evaluation sorts all documents by ``order_key``)."""
    groups: dict[str, list[tuple]] = {}
    for row in rows:
        groups.setdefault(row[0], []).append(row)
    ordered = []
    for shard, group in groups.items():
        keys = shard_order_keys(directory / shard)
        ordered.append((shard, sorted(group, key=lambda r: keys[r[1]]), keys))
    ordered.sort(key=lambda item: item[2][item[1][0][1]])
    return [(shard, group) for shard, group, _ in ordered]


def _expand(runs: list[list[int]]) -> np.ndarray:
    if not runs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in runs])


def _content_hash(version: int, selection: dict[str, Any], shards: list[dict[str, Any]]) -> str:
    payload = {"version": version, "selection": selection, "shards": shards}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def create_snapshot(
    catalog: Catalog,
    name: str,
    splits: list[str] | None = None,
    teacher: str | None = None,
    mode: str | None = None,
    params: dict[str, Any] | None = None,
    max_samples: int | None = None,
) -> Snapshot:
    """Freeze the records matching the filters as ``<data_dir>/snapshots/<name>.json`` (in object storage too:
    the manifest's ``data_dir`` is then the S3 URL with its endpoint and region, never credentials).

    Snapshots are immutable: asking again for an existing name returns it if its content is the same and fails
    otherwise. Every selected shard is checked to be present first.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"snapshot name {name!r}: use a plain file name")
    selection = {
        "splits": splits,
        "teacher": teacher,
        "mode": mode,
        "params": params,
        "max_samples": max_samples,
    }
    rows = catalog.select(splits=splits, teacher=teacher, mode=mode, params=params, max_samples=max_samples)
    shards, samples = [], 0
    directory = shard_dir(catalog.data_dir)
    for shard, group in _by_content(rows, directory):
        indices = [row for _, row, *_ in group]
        info = catalog.shard_info(shard)
        ShardSelection(directory / shard, info.bytes, info.sha256, np.zeros(0)).check()
        shards.append({"name": shard, "bytes": info.bytes, "sha256": info.sha256, "rows": _ranges(indices)})
        samples += len(indices)
    tokens = sum(n for *_, n in rows)
    content_hash = _content_hash(MANIFEST_VERSION, selection, shards)
    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "content_hash": content_hash,
        "created_at": time.time(),
        "data_dir": str(catalog.data_dir.resolve()),
        "selection": selection,
        "samples": samples,
        "tokens": int(tokens),
        "shards": shards,
    }
    path = catalog.data_dir / SNAPSHOT_DIR / f"{name}.json"
    if path.exists() and _version(path) >= MANIFEST_VERSION:
        existing = load_snapshot(path)
        if existing.content_hash != content_hash:
            raise FileExistsError(
                f"{path}: snapshot {name!r} exists with other content (snapshots are immutable; pick a new name)"
            )
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.replace(path)
    return load_snapshot(path)


def _version(path: DataPath) -> int:
    """The manifest version of an existing snapshot (an older one is rewritten in the current order)."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("version", 0))
    except (ValueError, AttributeError):
        return MANIFEST_VERSION


def load_snapshot(path: str | DataPath) -> Snapshot:
    """Read a manifest; shard paths resolve against its ``data_dir`` (or the folder above ``snapshots/``)."""
    path = data_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: snapshot manifest not found")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        data_dir = data_path(manifest["data_dir"])
        local = isinstance(data_dir, Path) and isinstance(path, Path)
        if local and not (data_dir / "shards").is_dir() and path.parent.name == SNAPSHOT_DIR:
            data_dir = path.parent.parent  # the data folder was moved with its snapshots
        shards = [
            ShardSelection(shard_dir(data_dir) / s["name"], int(s["bytes"]), s["sha256"], _expand(s["rows"]))
            for s in manifest["shards"]
        ]
        snapshot = Snapshot(
            name=manifest["name"],
            path=path,
            content_hash=manifest["content_hash"],
            selection=manifest["selection"],
            shards=shards,
            samples=int(manifest["samples"]),
            tokens=int(manifest["tokens"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid snapshot manifest ({type(exc).__name__}: {exc})") from None
    recomputed = _content_hash(
        manifest.get("version", MANIFEST_VERSION),
        manifest["selection"],
        [{k: s[k] for k in ("name", "bytes", "sha256", "rows")} for s in manifest["shards"]],
    )
    if recomputed != snapshot.content_hash:
        raise ValueError(f"{path}: manifest content does not match its content_hash (edited by hand?)")
    return snapshot
