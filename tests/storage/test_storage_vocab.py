"""``TeacherVocab``'s bulk paths (``add_many``, ``table``) against its one-at-a-time ones, and the shard's
vocabulary table built from them."""

import numpy as np
import pytest

from storage.records import TeacherVocab
from storage.schema import decode_vocab, encode_vocab

TOKENS = [
    b"",
    b"a",
    b" the",
    "é".encode(),
    "日本".encode(),
    "🙂".encode()[:2],
    "🙂".encode()[2:],
    b"\x00\xff",
]


def one_by_one(ids: list[int], data: list[bytes]) -> TeacherVocab:
    vocab = TeacherVocab()
    for token_id, token_bytes in zip(ids, data, strict=True):
        vocab.add(token_id, token_bytes)
    return vocab


def test_add_many_round_trips_bytes_including_empty_and_multibyte():
    ids = np.array([5, 0, 17, 3, 2, 40, 41, 9])
    vocab = TeacherVocab()
    vocab.add_many(ids, TOKENS)
    assert len(vocab) == len(TOKENS)
    assert [vocab.bytes_of(int(i)) for i in ids] == TOKENS
    assert vocab.items() == sorted(zip(ids.tolist(), TOKENS, strict=True))
    lengths, data = vocab.table(ids[::-1])
    assert lengths.tolist() == [len(b) for b in TOKENS[::-1]]
    assert data == b"".join(TOKENS[::-1])
    assert vocab.table(np.zeros(0, np.int64))[1] == b""


def test_id_of_after_add_many():
    vocab = TeacherVocab()
    vocab.add_many(np.array([4, 10]), [b"x", "é".encode()])
    assert vocab.id_of("é".encode()) == 10
    assert vocab.id_of(b"new") == 11  # the next id after the largest pinned one
    assert vocab.bytes_of(11) == b"new"


def test_same_bytes_under_two_ids_keep_the_first_for_id_of():
    vocab = TeacherVocab()
    vocab.add_many(np.array([7, 3]), [b"dup", b"dup"])
    reference = one_by_one([7, 3], [b"dup", b"dup"])
    assert vocab.id_of(b"dup") == reference.id_of(b"dup") == 7


@pytest.mark.parametrize(
    ("before", "ids", "data"),
    [
        ({2: b"ab"}, [1, 2], [b"z", b"ac"]),  # a known id, same length, other bytes
        ({2: b"ab"}, [2], [b"abc"]),  # a known id, another length
        ({}, [4, 6, 4], [b"q", b"r", b"s"]),  # twice in the batch
        ({}, [4, 4], [b"", b"s"]),  # twice in the batch, the first empty
    ],
)
def test_add_many_conflict_raises_adds_error_and_adds_nothing(before, ids, data):
    vocab = one_by_one(list(before), list(before.values()))
    reference = one_by_one(list(before), list(before.values()))
    with pytest.raises(ValueError) as expected:
        for token_id, token_bytes in zip(ids, data, strict=True):
            reference.add(token_id, token_bytes)
    with pytest.raises(ValueError) as got:
        vocab.add_many(np.array(ids), data)
    assert "seen with two byte strings" in str(got.value)
    assert str(got.value) == str(expected.value)
    assert vocab.items() == sorted(before.items())
    assert vocab.id_of(b"s") == max([*before, -1]) + 1  # nothing of the batch went in


def test_add_many_accepts_repeats_and_known_ids_with_the_same_bytes():
    vocab = TeacherVocab()
    vocab.add(3, b"c")
    vocab.add_many(np.array([3, 8, 8, 1]), [b"c", b"h", b"h", b""])
    assert vocab.items() == [(1, b""), (3, b"c"), (8, b"h")]


def test_bad_input_is_refused():
    vocab = TeacherVocab()
    with pytest.raises(ValueError, match="negative"):
        vocab.add_many(np.array([1, -1]), [b"a", b"b"])
    with pytest.raises(ValueError, match="negative"):
        vocab.add(-1, b"a")
    with pytest.raises(ValueError, match="2 ids but 1"):
        vocab.add_many(np.array([1, 2]), [b"a"])
    vocab.add(1, b"a")
    for missing in (0, 2, 10**9, -1):
        with pytest.raises(KeyError) as error:
            vocab.table(np.array([1, missing]))
        assert error.value.args == (missing,)


def test_mixed_single_and_bulk_additions_match_one_by_one():
    rng = np.random.default_rng(0)
    pool = [bytes(rng.integers(0, 256, size=int(rng.integers(0, 5)), dtype=np.uint8)) for _ in range(60)]
    vocab, reference = TeacherVocab(), TeacherVocab()
    for step in range(300):
        truth = dict(reference.items())
        ids = rng.integers(0, 300, size=int(rng.integers(0, 12)))
        if step % 3:  # mostly consistent with what is known, sometimes (step % 3 == 0) likely conflicting
            data = [truth.get(int(i), pool[int(rng.integers(len(pool)))]) for i in ids]
        else:
            data = [pool[int(rng.integers(len(pool)))] for _ in ids]
        seen = dict(truth)
        ok = all(seen.setdefault(i, b) == b for i, b in zip(ids.tolist(), data, strict=True))
        if not ok:
            with pytest.raises(ValueError, match="seen with two byte strings"):
                vocab.add_many(ids, data)
        else:
            for token_id, token_bytes in zip(ids.tolist(), data, strict=True):
                reference.add(token_id, token_bytes)
                if step % 2 == 0:
                    vocab.add(token_id, token_bytes)
            if step % 2:
                vocab.add_many(ids, data)
        fresh = pool[int(rng.integers(len(pool)))]
        assert vocab.id_of(fresh) == reference.id_of(fresh)
        assert vocab.items() == reference.items() and len(vocab) == len(reference)
        truth = dict(reference.items())
        known = np.array(sorted(truth), np.int64)
        lengths, blob = vocab.table(known)
        assert blob == b"".join(truth[i] for i in known.tolist())
        assert lengths.tolist() == [len(truth[i]) for i in known.tolist()]


def test_vocab_table_round_trips_through_the_shard_metadata():
    vocab = TeacherVocab()
    ids = np.array([9, 2, 30, 0, 4, 5, 6, 7])
    vocab.add_many(ids, TOKENS)
    order = np.array([30, 0, 9, 7, 2, 6, 5, 4])
    lengths, data = vocab.table(order)
    decoded_ids, table = decode_vocab(encode_vocab(order, lengths, data), "test")
    assert decoded_ids.tolist() == order.tolist()
    assert table.to_pylist() == [vocab.bytes_of(int(i)) for i in order]
