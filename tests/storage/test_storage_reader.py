"""PackedReader against a plain-Python reference packer; determinism, data-parallel sharding, exact resume."""

import numpy as np
import pytest

from storage.catalog import Catalog
from storage.reader import PackedReader, identity_token_map
from storage.records import TeacherVocab
from storage.settings import StorageSettings
from storage.shards import ShardWriter, read_records
from storage.snapshot import create_snapshot
from tests.storage.factory import make_record, make_records, teacher_vocab

SEQ = 16
# the student knows every single byte and most teacher words, but not the emoji fragments nor the "w3xx" words
STUDENT = [data for tid, data in teacher_vocab().items() if tid < 300 and tid != 256]


def encode(text: str) -> list[int]:
    return [STUDENT.index(bytes([b])) for b in text.encode()]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(11)
    records = make_records(5, 14, logits=True) + make_records(6, 10, start=100, mode="generate")
    records += [
        make_record(rng, 200, 0),  # empty completion
        make_record(rng, 201, 1, mode="generate"),  # one token
        make_record(rng, 202, 3 * SEQ + 5, width=4),  # longer than a row
        make_record(rng, 203, 6, tokens=np.array([256, 300, 301, 257, 310, 65])),  # unmapped and fragments
    ]
    with Catalog(data_dir) as catalog:
        settings = StorageSettings(data_dir=data_dir, shard_max_records=5)
        with ShardWriter(data_dir, settings, catalog=catalog) as writer:
            writer(records, teacher_vocab())
        return {
            "all": create_snapshot(catalog, "all"),
            "generate": create_snapshot(catalog, "gen", mode="generate"),
        }


@pytest.fixture(scope="module")
def snapshot(snapshots):
    return snapshots["all"]


def spell(data: bytes) -> list[int]:
    """Reference spelling: the whole token if the student has it, else greedy longest prefix."""
    out, i = [], 0
    while i < len(data):
        j = max(j for j in range(i + 1, len(data) + 1) if data[i:j] in STUDENT)
        out.append(STUDENT.index(data[i:j]))
        i = j
    return out


def reference_rows(snapshot, k_max):
    """Pack the snapshot the slow, obvious way (no shuffle, one rank)."""
    vocab = teacher_vocab()
    stream = []  # (token, doc, [(student id, logprob, logit)])
    doc = 0
    for shard in snapshot.shards:
        records = read_records(shard.path)
        for row in shard.rows:
            r = records[row]
            if r.mode == "generate":
                stream += [(t, doc, []) for t in encode(r.prompt)]
            for i, t in enumerate(r.tokens):
                candidates = []
                for j in range(r.topk_ids.shape[1]):
                    tid = int(r.topk_ids[i, j])
                    if tid >= 0 and vocab.bytes_of(tid) in STUDENT:
                        logit = np.nan if r.topk_logits is None else r.topk_logits[i, j]
                        candidates.append((STUDENT.index(vocab.bytes_of(tid)), r.topk_logprobs[i, j], logit))
                pieces = spell(vocab.bytes_of(int(t)))
                stream.append((pieces[0], doc, candidates[:k_max]))
                stream += [(p, doc, []) for p in pieces[1:]]
            doc += 1
    rows = []
    start = 0
    while len(stream) - start >= 2:
        window = stream[start : start + SEQ + 1]
        window += [(0, -1, [])] * (SEQ + 1 - len(window))
        row = {
            key: []
            for key in (
                "tokens",
                "labels",
                "loss_mask",
                "soft_mask",
                "topk_ids",
                "topk_logprobs",
                "topk_logits",
            )
        }
        row["position_ids"], row["doc_ids"] = [], []
        position, doc_index = 0, 0
        for i in range(SEQ):
            (token, d, _), (label, d_next, candidates) = window[i], window[i + 1]
            if i > 0 and d != window[i - 1][1]:
                position, doc_index = 0, doc_index + 1
            same = d >= 0 and d == d_next
            row["tokens"].append(token)
            row["labels"].append(label)
            row["loss_mask"].append(float(same))
            row["soft_mask"].append(same and bool(candidates))
            used = candidates if same else []
            row["topk_ids"].append([c[0] for c in used] + [-1] * (k_max - len(used)))
            row["topk_logprobs"].append([c[1] for c in used] + [-np.inf] * (k_max - len(used)))
            row["topk_logits"].append([c[2] for c in used] + [np.nan] * (k_max - len(used)))
            row["position_ids"].append(position if d >= 0 else 0)
            row["doc_ids"].append(doc_index if d >= 0 else -1)
            position += 1
        rows.append({key: np.array(value) for key, value in row.items()})
        start += SEQ
    return rows


def reader(snapshot, **kwargs):
    defaults = dict(seq_len=SEQ, micro_batch_size=1, map_vocab=identity_token_map(STUDENT), encode=encode)
    return PackedReader(snapshot, **{**defaults, **kwargs})


def rows_of(batches):
    return [
        {key: value[i].numpy() for key, value in b.items()} for b in batches for i in range(len(b["tokens"]))
    ]


@pytest.mark.parametrize("name", ["all", "generate"])
def test_packing_matches_reference(snapshots, name):
    """Against the reference; "generate" selects some rows of each shard (reads a subset of a shard)."""
    snapshot = snapshots[name]
    assert name == "all" or any(len(s.rows) < 5 for s in snapshot.shards)
    packed = reader(snapshot, shuffle=False)
    rows = rows_of(list(packed))
    expected = reference_rows(snapshot, packed.k)
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert np.array_equal(got[key], value, equal_nan=True), key
    assert packed.coverage.dropped > 0 and (packed.coverage.expanded_tokens > 0 or name != "all")
    assert sum(int(r["soft_mask"].sum()) for r in rows) > 0
    batch = next(iter(reader(snapshot, micro_batch_size=3)))
    dtypes = {key: str(value.dtype) for key, value in batch.items()}
    assert dtypes == {
        "tokens": "torch.int64",
        "labels": "torch.int64",
        "loss_mask": "torch.float32",
        "soft_mask": "torch.bool",
        "topk_ids": "torch.int64",
        "topk_logprobs": "torch.float32",
        "position_ids": "torch.int64",
        "doc_ids": "torch.int64",
        "topk_logits": "torch.float32",
    }
    assert batch["topk_ids"].shape == (3, SEQ, packed.k)


def test_shuffle_is_deterministic_and_keeps_every_token(snapshot):
    first = rows_of(list(reader(snapshot, seed=3, shuffle_window=2)))
    second = rows_of(list(reader(snapshot, seed=3, shuffle_window=2)))
    other = rows_of(list(reader(snapshot, seed=4, shuffle_window=2)))
    plain = rows_of(list(reader(snapshot, shuffle=False)))
    for a, b in zip(first, second, strict=True):
        assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other, strict=False))

    def targets(rows):
        """Every (label, top-k) with a loss: rows overlap by one token, so no label is lost at a row cut."""
        return sorted(
            (int(r["labels"][i]), bool(r["soft_mask"][i]), tuple(r["topk_ids"][i].tolist()))
            for r in rows
            for i in np.flatnonzero(r["loss_mask"])
        )

    assert targets(first) == targets(plain) == targets(other)


def test_same_content_in_other_shards_gives_the_same_batches(tmp_path):
    """The collector puts records in shards in the order the teacher answers: the same records split into
    shards another way (and written in another order) must give the same batches for the same seed."""
    records = make_records(21, 24, max_len=30)
    vocab = teacher_vocab()
    batches = []
    for name, order, per_shard in (("a", records, 10), ("b", records[::-1], 7)):
        folder = tmp_path / name
        with Catalog(folder) as catalog:
            settings = StorageSettings(data_dir=folder, shard_max_records=per_shard)
            with ShardWriter(folder, settings, catalog=catalog) as writer:
                writer(order, vocab)
            snap = create_snapshot(catalog, "all")
        assert len(snap.shards) == -(-len(records) // per_shard)
        batches.append(rows_of(list(reader(snap, seed=5, shuffle_window=8))))
    first, second = batches
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.parametrize("dp_size", [2, 3])
def test_data_parallel_ranks_split_the_rows(snapshot, dp_size):
    micro = 2
    single = rows_of(list(reader(snapshot, seed=9, micro_batch_size=1)))
    per_rank = [
        list(reader(snapshot, seed=9, micro_batch_size=micro, dp_rank=r, dp_size=dp_size))
        for r in range(dp_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # every rank sees the same number of batches
    for b in range(len(per_rank[0])):
        for r in range(dp_size):
            rows = rows_of([per_rank[r][b]])
            for i, row in enumerate(rows):
                g = b * micro * dp_size + r * micro + i
                if g < len(single):
                    assert np.array_equal(row["tokens"], single[g]["tokens"])
                    assert np.array_equal(row["topk_logprobs"], single[g]["topk_logprobs"])
                else:  # padding rows of the last batch
                    assert row["loss_mask"].sum() == 0 and (row["doc_ids"] == -1).all()


def test_resume_continues_exactly(snapshot):
    full = list(reader(snapshot, seed=5, micro_batch_size=2, epochs=2))
    first = reader(snapshot, seed=5, micro_batch_size=2, epochs=2)
    iterator = iter(first)
    for _ in range(len(full) // 2 + 1):
        next(iterator)
    state = first.state_dict()
    resumed = reader(snapshot, seed=5, micro_batch_size=2, epochs=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - (len(full) // 2 + 1)
    for a, b in zip(full[-len(rest) :], rest, strict=True):
        assert all(np.array_equal(a[k].numpy(), b[k].numpy(), equal_nan=True) for k in a)
    with pytest.raises(ValueError, match="seed"):
        reader(snapshot, seed=6, micro_batch_size=2, epochs=2).load_state_dict(state)
    # an endless reader keeps going past the epochs
    infinite = iter(reader(snapshot, seed=5, micro_batch_size=2, epochs=None))
    assert len([next(infinite) for _ in range(len(full) + 3)]) == len(full) + 3


def test_teacher_ids_renumbered_between_shards(tmp_path):
    """Two collector runs gave the same teacher id to different tokens: each shard maps by its own bytes."""
    words = [b"alpha", b"beta"]

    def vocab(order):
        v = TeacherVocab()
        for b in range(256):
            v.add(b, bytes([b]))
        for i, word in enumerate(order):
            v.add(256 + i, word)
        return v

    rng = np.random.default_rng(0)
    student = [bytes([b]) for b in range(256)] + [b"beta", b"alpha"]
    with Catalog(tmp_path) as catalog:
        for index, (order, tokens) in enumerate([(words, [256, 257, 256]), (words[::-1], [257, 257, 256])]):
            record = make_record(rng, 500 + index, 3, tokens=np.array(tokens))
            record.topk_ids = np.where(record.topk_ids >= 0, 256 + record.topk_ids % 2, -1).astype(np.int32)
            record.topk_ids[:, 1:] = -1  # (one candidate per position: no duplicate ids)
            record.topk_logprobs[:, 1:] = -np.inf
            with ShardWriter(tmp_path, StorageSettings(data_dir=tmp_path), catalog=catalog) as writer:
                writer([record], vocab(order))
        snapshot = create_snapshot(catalog, "renumbered")
    (batch,) = list(PackedReader(snapshot, 8, 1, identity_token_map(student), shuffle=False))
    tokens, docs = batch["tokens"][0].numpy(), batch["doc_ids"][0].numpy()
    spelled = {tuple(tokens[docs == d].tolist()) for d in (0, 1)}
    # shard one: 256 = alpha (student 257), 257 = beta (256); shard two the other way round
    assert spelled == {(257, 256, 257), (257, 257, 256)}
