"""Shards, catalog, snapshots and the reader on object storage: a real SeaweedFS S3 server on loopback."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from storage.catalog import Catalog
from storage.filesystem import RemotePath, data_path
from storage.settings import StorageSettings
from storage.shards import TMP_SUFFIX, ShardWriter, read_records, shard_dir, stale_temp_files
from storage.snapshot import create_snapshot, load_snapshot
from tests.storage.factory import make_records, teacher_vocab
from tests.storage.test_storage_reader import reader
from tests.support import SeaweedS3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _url(s3: SeaweedS3, prefix: str) -> str:
    return f"s3://{s3.bucket}/{prefix}?endpoint={s3.endpoint}&region=us-east-1"


def _files(root) -> list:
    return [p for p in root.rglob("*") if p.is_file()]


def test_shards_snapshot_and_reader_on_s3_match_local(s3, tmp_path):
    records = make_records(seed=3, count=50, max_len=30)
    vocab = teacher_vocab()
    local, index = tmp_path / "local", tmp_path / "index"
    remote = data_path(_url(s3, "run-a"))
    assert isinstance(remote, RemotePath)
    batches = {}
    for where, catalog_dir in ((local, None), (remote, index)):
        settings = StorageSettings(data_dir=str(where), shard_max_records=16)
        with Catalog(where, catalog_dir=catalog_dir) as catalog:
            with ShardWriter(where, settings, catalog) as writer:
                writer.add(records, vocab)
            stats = catalog.stats()
            assert stats.shards == 4 and stats.missing_shards == [] and stats.duplicates == 0
            snap = create_snapshot(catalog, "train-1", splits=["train"])
        batches[str(where)] = list(reader(load_snapshot(snap.path), shuffle=False))
        assert snap.samples == 50
    local_batches, remote_batches = batches.values()
    assert len(local_batches) == len(remote_batches) > 0
    for a, b in zip(local_batches, remote_batches, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())

    # nothing of the data on local disk: only the DuckDB index; the manifest in the bucket names the endpoint
    assert {p.name for p in _files(index)} <= {"catalog.duckdb", "catalog.duckdb.wal"}
    manifest = (remote / "snapshots" / "train-1.json").read_text()
    assert json.loads(manifest)["data_dir"].startswith(f"s3://{s3.bucket}/run-a?endpoint=http://127.0.0.1:")
    assert s3.secret_key not in manifest and s3.access_key not in manifest
    assert s3.secret_key.encode() not in b"".join(p.read_bytes() for p in _files(tmp_path))
    assert sorted(r.sample_id for r in read_records(shard_dir(remote).glob("*.parquet")[0]))

    # the local index is rebuilt from the remote shards alone
    with Catalog(remote, catalog_dir=tmp_path / "rebuilt", sync=False) as catalog:
        assert catalog.reindex() == 4
        assert catalog.stats().splits["train"].samples == 50
        assert create_snapshot(catalog, "train-1", splits=["train"]).content_hash == snap.content_hash


def test_unfinished_temporary_key_is_never_read_and_expires(s3, tmp_path):
    remote = data_path(_url(s3, "run-b"))
    settings = StorageSettings(data_dir=str(remote), shard_max_records=8)
    with (
        Catalog(remote, catalog_dir=tmp_path / "index") as catalog,
        ShardWriter(remote, settings, catalog) as w,
    ):
        w.add(make_records(seed=4, count=8), teacher_vocab())
    # a writer killed between upload and copy leaves its temporary key (the final key never appears)
    leftover = shard_dir(remote) / f"{'0' * 32}-1{TMP_SUFFIX}"
    leftover.write_bytes(b"PAR1 half a shard")
    with Catalog(remote, catalog_dir=tmp_path / "index") as catalog:
        assert catalog.stats().shards == 1 and catalog.stats().temp_files == 1
    # a remote writer may live on another machine: only age makes its key stale, never a pid
    assert stale_temp_files(remote, grace_s=3600.0) == []
    assert [p.name for p, _ in stale_temp_files(remote, grace_s=0.0, now=leftover.stat().st_mtime + 1)] == [
        leftover.name
    ]


def test_bad_s3_location_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown query parameter"):
        StorageSettings(data_dir="s3://bucket/prefix?secret=x")
    with pytest.raises(ValueError, match="s3://bucket"):
        StorageSettings(data_dir="s3:///prefix")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_pipeline_with_data_in_s3(s3, tmp_path):
    """``distill run`` of the whole embedded pipeline (tiny config) with ``storage.data_dir`` in the bucket:
    training and evaluation (torchrun processes) read the shards from S3, only the catalog index stays on local
    disk, and neither a file written nor the run's output holds the secret key."""
    from tests.pipeline.tiny_project import make_tiny_project
    from tests.support import run_bounded, test_env

    project = make_tiny_project(tmp_path / "project", n_prompts=40)
    config = project.config(
        storage={"data_dir": f"s3://{s3.bucket}/tiny", "s3_endpoint": s3.endpoint, "s3_region": "us-east-1"}
    )
    out = run_bounded(["distill", "run", str(config)], timeout=560, env=test_env(**s3.env()))
    assert out.returncode == 0, out.stdout[-4000:]
    assert s3.secret_key not in out.stdout

    remote = data_path(f"s3://{s3.bucket}/tiny?endpoint={s3.endpoint}&region=us-east-1")
    work = tmp_path / "project" / "work"
    collected = json.loads(next(work.glob("collect/*/_stage.json")).read_text())["info"]
    assert collected["failed"] == 0 and collected["collected"] > 0
    assert all(s.startswith(f"s3://{s3.bucket}/tiny/shards/") for s in collected["shards"])
    assert len(shard_dir(remote).glob("*.parquet")) == len(collected["shards"])
    assert len((remote / "snapshots").glob("train-*.json")) == 1
    # training read the snapshot in the bucket: the manifest it was given names the S3 data
    train = json.loads(next(work.glob("snapshot/*/train.json")).read_text())
    assert train["data_dir"].startswith(f"s3://{s3.bucket}/tiny?endpoint=")
    summary = json.loads(next((tmp_path / "project" / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "completed"
    written = _files(tmp_path)
    assert not [p for p in written if p.suffix == ".parquet" or p.name.endswith(TMP_SUFFIX)]
    assert (work / "catalog" / "catalog.duckdb").is_file() and not (tmp_path / "project" / "data").exists()
    leaked = [p for p in written if s3.secret_key.encode() in p.read_bytes()]
    assert leaked == [], f"the secret key was written to {leaked}"
