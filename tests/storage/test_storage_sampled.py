"""Sampled tail targets and the actual token's teacher logprob: storage round trip, the reader's unbiased sparse
targets against a float64 reference, old shards, and the whole path from the real local teacher server (whose
full softmax, computed by an independent process, is the reference the averaged targets must converge to)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.catalog import Catalog
from storage.reader import PackedReader, identity_token_map
from storage.records import TeacherVocab, TopKRecord
from storage.settings import StorageSettings
from storage.shards import ShardWriter, read_records, shard_dir
from storage.snapshot import create_snapshot
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer
from teacher.client import request_params
from teacher.collect import build_record, collect
from teacher.inputs import WorkItem
from teacher.parsing import parse_prompt_logprobs, prompt_samples, with_samples
from teacher.server import local_teacher_server
from teacher.settings import LocalTeacherSettings, TeacherSettings
from tests.storage.factory import make_records, teacher_vocab
from tests.student.worker_inference_tokenizer import train_tokenizer
from tests.support import PYTHON, run_bounded

STUDENT = [data for _, data in teacher_vocab().items()]  # the student shares the teacher's vocabulary
SEQ = 12


def with_extras(records: list[TopKRecord], seed: int, every: int = 1) -> list[TopKRecord]:
    """Give every ``every``-th record token logprobs (NaN on the first position) and 1 to 5 distinct tail
    samples per position (some positions none; ids may repeat top-k ids, which the reader must merge)."""
    rng = np.random.default_rng(seed)
    for i, r in enumerate(records):
        if i % every:
            continue
        n = len(r.tokens)
        r.token_logprobs = rng.uniform(-12, 0, n).astype(np.float32)
        r.token_logprobs[:1] = np.nan
        m = rng.integers(0, 6, n)
        ids = np.full((n, 5), -1, np.int32)
        counts = np.zeros((n, 5), np.int32)
        for p in range(n):
            ids[p, : m[p]] = rng.choice(400, m[p], replace=False)
            counts[p, : m[p]] = rng.integers(1, 4, m[p])
        r.sample_ids, r.sample_counts = ids, counts
    return records


def write(data_dir: Path, records: list[TopKRecord], codec: str = "q16", name: str = "all"):
    with Catalog(data_dir) as catalog:
        settings = StorageSettings(data_dir=data_dir, shard_max_records=4, logprob_codec=codec)
        with ShardWriter(data_dir, settings, catalog=catalog) as writer:
            writer(records, teacher_vocab())
        return create_snapshot(catalog, name)


@pytest.mark.parametrize("codec", ["q16", "f16", "f32"])
def test_sampled_columns_round_trip(tmp_path, codec):
    records = with_extras(make_records(3, 10), seed=1, every=2)
    write(tmp_path, records, codec)
    back = {r.sample_id: r for p in sorted(shard_dir(tmp_path).glob("*.parquet")) for r in read_records(p)}
    assert back.keys() == {r.sample_id for r in records}
    for r in records:
        b = back[r.sample_id]
        if r.token_logprobs is None or np.isnan(r.token_logprobs).all():
            assert b.token_logprobs is None
        else:  # stored as float16
            np.testing.assert_array_equal(
                b.token_logprobs, r.token_logprobs.astype(np.float16).astype(np.float32)
            )
        if r.sample_ids is None or not (r.sample_counts > 0).any():
            assert b.sample_ids is None and b.sample_counts is None
            continue
        width = b.sample_ids.shape[1]
        assert width == (r.sample_counts > 0).sum(axis=1).max()
        np.testing.assert_array_equal(b.sample_ids, r.sample_ids[:, :width])
        np.testing.assert_array_equal(b.sample_counts, r.sample_counts[:, :width])


def reference_targets(record: TopKRecord, position: int) -> dict[int, float]:
    """float64, the obvious way: p_j on the top-k, r · count / S on the samples, merged, normalised."""
    target: dict[int, float] = {}
    top = [(int(t), float(np.exp(np.float64(lp)))) for t, lp in zip(record.topk_ids[position], record.topk_logprobs[position], strict=True) if t >= 0]  # fmt: skip
    rest = max(0.0, 1.0 - sum(p for _, p in top))
    for t, p in top:
        target[t] = target.get(t, 0.0) + p
    if record.sample_ids is not None:
        draws = record.sample_counts[position].sum()
        for t, c in zip(record.sample_ids[position], record.sample_counts[position], strict=True):
            if c > 0:
                target[int(t)] = target.get(int(t), 0.0) + rest * c / draws
    total = sum(target.values())
    return {t: w / total for t, w in target.items()} if total > 0 else {}


def labelled_positions(snapshot) -> list[tuple[TopKRecord | None, int]]:
    """(record, position) of every stream token, in the unshuffled reader's order (score mode only)."""
    stream = []
    for shard in snapshot.shards:
        records = read_records(shard.path)  # the decoded records: the reader's logprobs exactly
        stream += [(records[row], p) for row in shard.rows for p in range(len(records[row].tokens))]
    return stream


def test_reader_sample_targets_and_actual_logprob(tmp_path):
    records = with_extras(make_records(4, 12), seed=2, every=3)
    snapshot = write(tmp_path, records)
    reader = PackedReader(snapshot, SEQ, 2, identity_token_map(STUDENT), shuffle=False, top_k=3)
    stream = labelled_positions(snapshot)
    checked = 0
    for b, batch in enumerate(reader):
        ids, weights = batch["sample_ids"].numpy(), batch["sample_weights"].numpy()
        actual = batch["actual_logprob"].numpy()
        assert ids.shape == weights.shape == (*batch["labels"].shape, 6 + 5) and ids.dtype == np.int64
        for row in range(ids.shape[0]):
            for col in range(SEQ):
                index = (b * 2 + row) * SEQ + col + 1
                if batch["loss_mask"][row, col] == 0:
                    assert (ids[row, col] == -1).all() and (weights[row, col] == 0).all()
                    assert np.isnan(actual[row, col])
                    continue
                record, position = stream[index]
                assert batch["labels"][row, col] == record.tokens[position]
                expected = reference_targets(record, position)
                got = {
                    int(t): float(w) for t, w in zip(ids[row, col], weights[row, col], strict=True) if t >= 0
                }
                assert got.keys() == expected.keys()
                for t, w in expected.items():
                    assert got[t] == pytest.approx(w, abs=2e-6)
                if expected:
                    assert weights[row, col].sum() == pytest.approx(1.0, abs=1e-5)
                    checked += 1
                assert (weights[row, col][ids[row, col] < 0] == 0).all()
                known = record.token_logprobs is not None and not np.isnan(record.token_logprobs[position])
                if known:
                    assert actual[row, col] == np.float16(record.token_logprobs[position]).astype(np.float32)
                else:
                    assert np.isnan(actual[row, col])
    assert checked > 100


def test_shards_without_the_new_columns_still_read(tmp_path):
    """Plain top-k shards (and a format-2 one) read as before, without the new keys; mixed with shards that have
    them, their labels carry no sampled targets and an unknown actual logprob."""
    plain = make_records(5, 8)
    snapshot = write(tmp_path / "plain", plain)
    batch = next(iter(PackedReader(snapshot, SEQ, 2, identity_token_map(STUDENT))))
    assert not {"sample_ids", "sample_weights", "actual_logprob"} & batch.keys()

    path = snapshot.shards[0].path
    before = read_records(path)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"distill.format": b"2"}), path)
    after = read_records(path)
    assert [r.sample_id for r in after] == [r.sample_id for r in before]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert b.token_logprobs is None and b.sample_ids is None

    mixed = make_records(6, 4) + with_extras(make_records(7, 4, start=50), seed=3)
    snapshot = write(tmp_path / "mixed", mixed)
    with_samples = {r.sample_id for r in mixed[4:]}
    reader = PackedReader(snapshot, SEQ, 1, identity_token_map(STUDENT), shuffle=False)
    stream = labelled_positions(snapshot)
    seen = set()
    for b, batch in enumerate(reader):
        for col in np.flatnonzero(batch["loss_mask"][0].numpy()):
            record, _ = stream[b * SEQ + col + 1]
            has = record.sample_id in with_samples
            seen.add(has)
            if not has:
                assert (batch["sample_ids"][0, col] == -1).all()
                assert np.isnan(batch["actual_logprob"][0, col].item())
    assert seen == {True, False}


# ---- the real local teacher ---------------------------------------------------------------------------------


@dataclass
class Served:
    base_url: str
    tokenizer_path: Path
    reference: np.ndarray  # log-softmax [len, V] of TEXT, float64, from the independent process
    ids: list[int]


TEXT = "def parse(argv):\n    return argv[1:]\n"
K = 4
DRAWS = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:

    folder = tmp_path_factory.mktemp("sampled")
    tokenizer_path = train_tokenizer(folder / "tokenizer.json")
    model = ModelSettings(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=64
    )
    out, checkpoint = folder / "reference.json", folder / "checkpoint"
    worker = [
        PYTHON,
        "tests/student/worker_inference_run.py",
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer_path),
    ]
    worker += ["--model-json", model.model_dump_json(), "--seed", "3", "--prompts-json", json.dumps([TEXT])]
    done = run_bounded([*worker, "--save-checkpoint", str(checkpoint)], timeout=180)
    assert done.returncode == 0, done.stdout[-4000:]
    logits = np.array(json.loads(out.read_text())["logits"][0], dtype=np.float64)
    m = logits.max(axis=-1, keepdims=True)
    reference = logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))
    with local_teacher_server(LocalTeacherSettings(), checkpoint=checkpoint) as server:
        yield Served(
            server.base_url, tokenizer_path, reference, StudentTokenizer.load(tokenizer_path).encode(TEXT)
        )


def teacher_settings(served: Served, score_api: str, draws: int):

    return TeacherSettings(
        base_url=served.base_url, mode="score", score_api=score_api, top_k=K, samples=draws, max_retries=0
    )


def collect_record(served: Served, score_api: str, draws: int) -> TopKRecord:
    """TEXT through the real collector: client, parser and record builder (its sink keeps the record)."""

    resolve = StudentTokenizer.load(served.tokenizer_path).token_bytes
    got: list[TopKRecord] = []
    result = collect(
        [WorkItem(prompt=TEXT)], teacher_settings(served, score_api, draws), served.base_url, None, set(),
        lambda records, vocab: got.extend(records), progress=False, resolve=resolve,
    )  # fmt: skip
    assert result.collected == 1, result.failures
    return got[0]


def seeded_records(served: Served, seeds: range) -> tuple[list[TopKRecord], TeacherVocab]:
    """TEXT scored once per ``sample_seed`` over plain HTTP (the seed is the request's), parsed by the parser."""

    resolve = StudentTokenizer.load(served.tokenizer_path).token_bytes
    params = request_params(teacher_settings(served, "prompt_logprobs", DRAWS))
    vocab, records = TeacherVocab(), []
    with httpx.Client(base_url=served.base_url, timeout=60) as http:
        for seed in seeds:
            body = {"model": "local-teacher", "prompt": TEXT, "max_tokens": 1, "echo": True, "logprobs": 0}
            body |= {"prompt_logprobs": K, "return_tokens_as_token_ids": True}
            body |= {"return_samples": DRAWS, "sample_seed": seed}
            answer = http.post("/completions", json=body)
            assert answer.status_code == 200, answer.text
            data = answer.json()
            parsed = with_samples(
                parse_prompt_logprobs(data, K, TEXT, resolve), prompt_samples(data, DRAWS, resolve)
            )
            records.append(build_record(parsed, TEXT, "train", "t", "score", {**params, "seed": seed}, vocab))
    return records, vocab


@pytest.mark.slow
@pytest.mark.parametrize("score_api", ["prompt_logprobs", "echo"])
def test_collected_samples_and_actual_logprob(served: Served, score_api: str):
    record = collect_record(served, score_api, DRAWS)
    ref = served.reference
    np.testing.assert_array_equal(record.tokens, served.ids)
    assert np.isnan(record.token_logprobs[0])
    for p in range(1, len(served.ids)):
        row = ref[p - 1]
        assert record.token_logprobs[p] == pytest.approx(row[served.ids[p]], abs=1e-4)
        top = set(record.topk_ids[p][record.topk_ids[p] >= 0].tolist())
        assert top == set(np.argsort(-row)[:K].tolist())
        drawn = record.sample_ids[p][record.sample_counts[p] > 0]
        assert record.sample_counts[p].sum() == DRAWS and not top & set(drawn.tolist())
    assert (record.sample_counts[0] == 0).all()


@pytest.mark.slow
def test_sampled_targets_converge_to_teacher_distribution(served: Served, tmp_path):
    """Averaged over many seeded draws, the reader's sampled targets approach the teacher's full softmax (the
    Monte Carlo L1 error shrinks as 1/sqrt(draws)); the top-k alone, renormalised, stays biased."""
    requests = 120
    records, vocab = seeded_records(served, range(requests))
    again, _ = seeded_records(served, range(1))
    np.testing.assert_array_equal(again[0].sample_ids, records[0].sample_ids)  # the seed fixes the draws
    np.testing.assert_array_equal(again[0].sample_counts, records[0].sample_counts)
    assert not np.array_equal(records[1].sample_ids, records[0].sample_ids)
    with Catalog(tmp_path) as catalog:
        with ShardWriter(
            tmp_path,
            StorageSettings(data_dir=tmp_path, shard_max_records=50, logprob_codec="f32"),
            catalog=catalog,
        ) as w:
            w(records, vocab)
        snapshot = create_snapshot(catalog, "all")
    tokenizer = StudentTokenizer.load(served.tokenizer_path)
    tokenizer_bytes = [tokenizer.token_bytes(t) for t in range(served.reference.shape[1])]
    n = len(served.ids)
    reader = PackedReader(snapshot, n, 4, identity_token_map(tokenizer_bytes), shuffle=False)
    total, rows = np.zeros((n - 1, len(tokenizer_bytes))), 0
    for batch in reader:
        ids, weights, mask = (
            batch["sample_ids"].numpy(),
            batch["sample_weights"].numpy(),
            batch["loss_mask"].numpy(),
        )
        for r in np.flatnonzero(mask.sum(axis=1) > 0):
            assert mask[r, : n - 1].all()
            sums = weights[r, : n - 1].sum(axis=1)
            np.testing.assert_allclose(sums, 1.0, atol=1e-5)
            for col in range(n - 1):
                valid = ids[r, col] >= 0
                np.add.at(total[col], ids[r, col][valid], weights[r, col][valid])
            actual = batch["actual_logprob"][r, : n - 1].numpy()
            expected = served.reference[np.arange(n - 1), served.ids[1:]]
            np.testing.assert_allclose(actual, expected, atol=1e-2, rtol=1e-3)  # float16
            rows += 1
    assert rows == requests
    estimate = total / rows
    truth = np.exp(served.reference[: n - 1])
    top = np.argsort(-truth, axis=1)[:, :K]
    in_top = np.zeros(truth.shape, bool)
    np.put_along_axis(in_top, top, True, axis=1)
    # the head is exact (f32 codec: q16's steps, fine for KL, would show on this flat teacher's tiny head
    # probabilities); on the tail each estimate is r · (multinomial frequency of q = p / r over all draws)
    np.testing.assert_allclose(estimate[in_top], truth[in_top], atol=2e-6)
    r = np.where(in_top, 0.0, truth).sum(axis=1, keepdims=True)
    q = truth / r
    sigma = r * np.sqrt(q * (1 - q) / (DRAWS * requests))
    z = ((estimate - truth) / sigma)[~in_top]
    # unbiased: the standardised errors have mean 0 and mean square 1 (sd of the mean square ≈ sqrt(2 / z.size))
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs((z**2).mean() - 1) < 0.15, (z.mean(), (z**2).mean())
    # a biased target fails it: the top-k alone, renormalised (what sampled targets replace). (A random-init
    # teacher is nearly flat, so the test sees a bias only above about 20% of a tail token's probability.)
    head_only = np.where(in_top, truth, 0.0)
    z_biased = ((head_only / head_only.sum(axis=1, keepdims=True) - truth) / sigma)[~in_top]
    assert (z_biased**2).mean() > 2, (z_biased**2).mean()
