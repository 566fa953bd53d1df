"""Shards and the catalog: round trips, bad input named by file, catalog queries, snapshots."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog
from storage.codec import topk_kl
from storage.records import TopKRecord
from storage.schema import ShardError, from_planes, plane_rows, to_planes
from storage.settings import StorageSettings
from storage.shards import ShardWriter, read_records, shard_dir
from storage.snapshot import create_snapshot, load_snapshot
from tests.storage.factory import make_record, make_records, teacher_vocab


def edge_records() -> list[TopKRecord]:
    rng = np.random.default_rng(7)
    records = make_records(3, 12, logits=True) + make_records(4, 8, start=50, mode="generate")
    records.append(make_record(rng, 100, 0))  # empty completion
    records.append(make_record(rng, 101, 1, mode="generate"))  # a 1-token sample
    records.append(make_record(rng, 102, 300, width=3))  # long
    fragments = np.array([256, 257, 258, 300, 301, 262], np.int32)  # unicode words and byte fragments
    records.append(make_record(rng, 103, len(fragments), tokens=fragments, logits=True))
    records.append(make_record(rng, 104, 5, width=1))
    sentinel = make_record(rng, 106, 3, width=4)
    sentinel.topk_ids[:, 3] = 7
    sentinel.topk_logprobs[:, 3] = -9999.0  # OpenAI's "not returned": dropped like padding
    records.append(sentinel)
    spelled = make_record(rng, 105, 4, tokens=np.array([256, 300, 301, 262], np.int32))
    spelled.text = "é🙂λx"  # exactly the tokens' bytes (across a split character): stored as null
    records.append(spelled)
    return records


def assert_same(original: TopKRecord, back: TopKRecord, codec: str) -> None:
    """Equal up to the codec's error; entries compared in decreasing-logprob order, sentinels dropped."""
    for name in ("sample_id", "split", "teacher", "mode", "prompt", "text", "params", "created_at"):
        assert getattr(original, name) == getattr(back, name), name
    assert (original.prompt_tokens, original.completion_tokens, original.finish_reason) == (
        back.prompt_tokens,
        back.completion_tokens,
        back.finish_reason,
    )
    assert np.array_equal(original.tokens, back.tokens)
    valid = (original.topk_ids >= 0) & (original.topk_logprobs > -9999)
    k = valid.sum(axis=1)
    back_valid = back.topk_ids >= 0
    assert np.array_equal(back_valid.sum(axis=1), k)
    assert np.array_equal(original.topk_ids[valid], back.topk_ids[back_valid])  # both sorted by logprob
    ref, got = original.topk_logprobs[valid], back.topk_logprobs[back_valid]
    if codec == "q16":
        kl = topk_kl(ref, got, k)
        assert kl.max(initial=0) < 1e-3
    else:
        assert np.allclose(ref, got, atol=1e-3 if codec == "f16" else 0, rtol=1e-3 if codec == "f16" else 0)
    assert (original.topk_logits is None) == (back.topk_logits is None)
    if original.topk_logits is not None:
        assert np.array_equal(original.topk_logits[valid], back.topk_logits[back_valid])


@pytest.mark.parametrize("codec", ["q16", "f16", "f32"])
def test_round_trip(tmp_path, codec):
    records = edge_records()
    settings = StorageSettings(data_dir=tmp_path, shard_max_records=10, logprob_codec=codec)
    with ShardWriter(tmp_path, settings) as writer:
        writer(records, teacher_vocab())
    back = [r for info in writer.written for r in read_records(shard_dir(tmp_path) / info.name)]
    assert len(writer.written) == 3
    stored = pq.read_table(shard_dir(tmp_path) / writer.written[-1].name, columns=["sample_id", "text"])
    text_of = dict(zip(stored["sample_id"].to_pylist(), stored["text"].to_pylist(), strict=True))
    assert text_of[records[-1].sample_id] is None  # spelled by its tokens: not stored twice
    assert text_of[records[-2].sample_id] == records[-2].text
    assert [r.sample_id for r in back] == [r.sample_id for r in records]
    for original, decoded in zip(records, back, strict=True):
        assert_same(original, decoded, codec)


def test_shard_is_self_contained(tmp_path):
    """Each shard carries the bytes of the ids it uses; ids on disk are small shard ranks."""
    with ShardWriter(tmp_path) as writer:
        writer(make_records(1, 5), teacher_vocab())
    path = shard_dir(tmp_path) / writer.written[0].name
    table = pq.read_table(path)
    assert set(table.schema.metadata) >= {b"distill.vocab", b"distill.logprob_codec"}
    ids = from_planes(table["topk_ids"])
    assert ids.min() >= 0 and ids.max() < 400
    assert not path.with_suffix(".parquet.tmp").exists()


@pytest.mark.parametrize(
    "high",
    [
        "dense",  # every byte plane interleaved
        "sparse",  # a few values past 2**16: the top plane is patched in, not interleaved
        "zero",  # high planes all zero
        "small",  # bytes past the first nearly all zero: one plane, two patched (like q16 code deltas)
    ],
)
def test_byte_planes_round_trip(high):
    rng = np.random.default_rng(3)
    lengths = np.array([0, 5, 1, 997, 20, 0, 13])  # (an entry count that is not a multiple of 8)
    values = rng.integers(0, 1 << 16, size=lengths.sum())
    if high == "dense":
        values = rng.integers(0, 1 << 24, size=lengths.sum())
    elif high == "small":
        values = rng.integers(0, 1 << 8, size=lengths.sum())
        values[[0, 600]] = [300, (1 << 24) - 2]
    elif high == "sparse":
        values[[3, 500, len(values) - 1]] = [(1 << 24) - 1, 1 << 16, 70_000]
    array = to_planes(values, lengths, 3)
    decoded = from_planes(pa.chunked_array([array.slice(0, 3), array.slice(3)]))  # (chunked, offset slices)
    assert decoded.dtype == np.int32
    assert decoded.tolist() == values.tolist()


def write_some(data_dir, catalog=None, seed=1, count=9, **kwargs):
    settings = StorageSettings(data_dir=data_dir, shard_max_records=4)
    with ShardWriter(data_dir, settings, catalog=catalog) as writer:
        writer(make_records(seed, count, start=1000 * seed, **kwargs), teacher_vocab())
    return writer.written


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    (first, second, _) = write_some(tmp_path)
    directory = shard_dir(tmp_path)
    data = (directory / first.name).read_bytes()
    (directory / first.name).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ShardError, match=first.name):
        read_records(directory / first.name)
    with Catalog(tmp_path, sync=False) as catalog, pytest.raises(ShardError, match=first.name):
        catalog.reindex()
    garbage = bytearray((directory / second.name).read_bytes())
    garbage[200:4000] = b"\x07" * 3800  # page data damaged, footer intact
    (directory / second.name).write_bytes(bytes(garbage))
    with pytest.raises(ShardError, match=second.name):
        read_records(directory / second.name)


def test_missing_shard_is_named(tmp_path):
    with Catalog(tmp_path) as catalog:
        written = write_some(tmp_path, catalog)
        snapshot = create_snapshot(catalog, "all")
        gone = shard_dir(tmp_path) / written[1].name
        gone.unlink()
        assert catalog.stats().missing_shards == [str(gone)]
        with pytest.raises(FileNotFoundError, match=written[1].name):
            create_snapshot(catalog, "again")
    with pytest.raises(FileNotFoundError, match=written[1].name):
        read_records(gone)
    from storage.reader import PackedReader, identity_token_map

    with pytest.raises(FileNotFoundError, match=written[1].name):
        PackedReader(snapshot, 8, 1, identity_token_map([bytes([b]) for b in range(256)]))


def test_schema_mismatch_is_named(tmp_path):
    (info, *_) = write_some(tmp_path)
    path = shard_dir(tmp_path) / info.name
    table = pq.read_table(path)
    metadata = table.schema.metadata
    renamed = table.rename_columns([c if c != "topk_ids" else "ids" for c in table.column_names])
    pq.write_table(renamed.replace_schema_metadata(metadata), path)
    with pytest.raises(ShardError, match=rf"{info.name}.*schema mismatch.*topk_ids"):
        read_records(path)
    retyped = table.set_column(
        table.column_names.index("created_at"), "created_at", pa.array([str(x) for x in table["created_at"]])
    )
    pq.write_table(retyped.replace_schema_metadata(metadata), path)
    with pytest.raises(ShardError, match=rf"{info.name}.*created_at.*expected double"):
        read_records(path)
    pq.write_table(pa.table({"x": [1, 2]}), path)  # a Parquet file that is not a shard
    with pytest.raises(ShardError, match=rf"{info.name}: not a distill shard"):
        read_records(path)


def test_format_1_shards_still_read(tmp_path):
    """Shards written before format 2 (per-position columns as lists) read back the same; reindex counts them."""
    (info, *_) = write_some(tmp_path)
    path = shard_dir(tmp_path) / info.name
    table = pq.read_table(path)
    old = table.replace_schema_metadata({**table.schema.metadata, b"distill.format": b"1"})
    for name, value_type in (("token_rank", pa.uint8()), ("topk_k", pa.uint16()), ("topk_tail", pa.uint16())):
        values, offsets = plane_rows(table[name])
        lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))
        old = old.set_column(old.column_names.index(name), name, lists)
    legacy = tmp_path / "legacy"
    shard_dir(legacy).mkdir(parents=True)
    pq.write_table(old, shard_dir(legacy) / info.name)
    for new, back in zip(read_records(path), read_records(shard_dir(legacy) / info.name), strict=True):
        assert_same(new, back, "q16")
    with Catalog(legacy) as catalog:
        catalog.reindex()
        stats = catalog.stats()
        assert stats.tokens == info.tokens == sum(s.tokens for s in stats.splits.values())
    future = table.replace_schema_metadata({**table.schema.metadata, b"distill.format": b"9"})
    pq.write_table(future, path)
    with pytest.raises(ShardError, match=rf"{info.name}: shard format '9', this version reads 1 and 2"):
        read_records(path)


def test_catalog_answers_and_reindex_rebuilds_it(tmp_path):
    with Catalog(tmp_path) as catalog:
        write_some(tmp_path, catalog, seed=1, count=9)
        write_some(tmp_path, catalog, seed=2, count=5, split="val", teacher="other-teacher")
        stats = catalog.stats()
        assert stats.splits["train"].samples == 9 and stats.splits["val"].samples == 5
        assert stats.tokens == sum(s.tokens for s in stats.splits.values()) and stats.bytes_per_token > 0
        expected = {r.sample_id for r in make_records(1, 9, start=1000)}
        params = make_records(1, 1, start=1000)[0].params
        assert catalog.existing_sample_ids("tiny-teacher", params) == expected
        assert catalog.existing_sample_ids("tiny-teacher", {"k": 99}) == set()
        assert catalog.stale_sample_ids(teacher="tiny-teacher") == {
            r.sample_id for r in make_records(2, 5, start=2000, split="val", teacher="other-teacher")
        }
        old = [r for r in make_records(1, 9, start=1000) if r.created_at < 1_700_001_004.5]
        assert len(old) == 5
        assert catalog.stale_sample_ids(max_age_s=4.5, now=1_700_001_009.0) == {r.sample_id for r in old}
        catalog.record_failures([("abc", "HTTP 500 after 5 retries"), ("def", "bad JSON")])
        assert [f[:2] for f in catalog.failures()] == [
            ("abc", "HTTP 500 after 5 retries"),
            ("def", "bad JSON"),
        ]
        before = catalog.con.execute("SELECT * FROM records ORDER BY shard, row_index").fetchall()
        catalog.con.execute("DELETE FROM records")  # the index is disposable: rebuild it from the files
        assert catalog.reindex() == 5
        after = catalog.con.execute("SELECT * FROM records ORDER BY shard, row_index").fetchall()
        assert after == before
        assert catalog.stats().failures == 2


def test_snapshot_is_immutable_and_content_hashed(tmp_path):
    with Catalog(tmp_path) as catalog:
        write_some(tmp_path, catalog, seed=1, count=9)
        write_some(tmp_path, catalog, seed=2, count=5, split="val")
        train = create_snapshot(catalog, "train", splits=["train"])
        assert train.samples == 9 and train.tokens == catalog.stats().splits["train"].tokens
        again = create_snapshot(catalog, "train-again", splits=["train"])
        assert again.content_hash == train.content_hash  # same data, same cache key
        assert create_snapshot(catalog, "train", splits=["train"]).content_hash == train.content_hash
        with pytest.raises(FileExistsError, match="immutable"):
            create_snapshot(catalog, "train", splits=["val"])
        write_some(tmp_path, catalog, seed=3, count=2)
        assert create_snapshot(catalog, "train2", splits=["train"]).content_hash != train.content_hash
    loaded = load_snapshot(train.path)
    assert (loaded.content_hash, loaded.samples, loaded.tokens) == (train.content_hash, 9, train.tokens)
    assert [(s.path, s.rows.tolist()) for s in loaded.shards] == [
        (s.path, s.rows.tolist()) for s in train.shards
    ]
    manifest = json.loads(train.path.read_text())
    manifest["selection"]["splits"] = ["val"]
    train.path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="content_hash"):
        load_snapshot(train.path)
