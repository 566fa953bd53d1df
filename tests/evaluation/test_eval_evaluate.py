"""student.evaluate: per-token values against a dense float64 reference, a real TP=2 torchrun evaluation of
checkpoints saved at TP=1 and TP=2 against the teacher's own full-vocabulary numbers, the DuckDB rows, and
clear errors for missing or mismatched checkpoints."""

import json
import math

import duckdb
import numpy as np
import pytest
import torch

from pipeline.report import append_eval_results
from student.evaluate import CACHE_BYTES, document_chunks, token_stats
from student.evaluate import main as evaluate_main
from student.heldout import Documents
from student.tokenizer import StudentTokenizer
from tests.evaluation.evalsupport import write_eval_spec


def _dense_reference(logits, vocab, ids, logprobs, labels):
    """Everything from full softmax probabilities with explicit loops over positions (float64 numpy)."""
    z = logits[:, :vocab]
    q = np.exp(z - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    out = {k: [] for k in ("ce", "kl", "soft_ce", "confidence", "correct", "agree")}
    for n in range(len(z)):
        valid = [j for j in range(ids.shape[1]) if ids[n, j] >= 0]
        p_bins = [math.exp(logprobs[n, j]) for j in valid]
        q_bins = [q[n, ids[n, j]] for j in valid]
        p_bins.append(1 - sum(p_bins))
        q_bins.append(1 - sum(q_bins))
        out["kl"].append(sum(a * math.log(a / b) for a, b in zip(p_bins, q_bins, strict=True) if a > 0))
        out["soft_ce"].append(-sum(a * math.log(b) for a, b in zip(p_bins, q_bins, strict=True) if a > 0))
        out["ce"].append(-math.log(q[n, labels[n]]))
        out["confidence"].append(q[n].max())
        out["correct"].append(q[n].argmax() == labels[n])
        teacher_top = ids[n, max(valid, key=lambda j: logprobs[n, j])]
        out["agree"].append(q[n].argmax() == teacher_top)
    return {k: np.array(v) for k, v in out.items()}


def test_token_stats_hand_checked():
    # uniform student over 4 tokens (+ 4 padding columns with large logits that must not count)
    logits = torch.tensor([[0.0] * 4 + [50.0] * 4], dtype=torch.float64)
    batch = {
        "labels": torch.tensor([2]),
        "topk_ids": torch.tensor([[0, 1]]),
        "topk_logprobs": torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64)),
    }
    stats = token_stats(logits, batch, vocab_size=4)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    soft_ce = -(0.5 * math.log(0.25) + 0.3 * math.log(0.25) + 0.2 * math.log(0.5))
    assert float(stats["kl"][0]) == pytest.approx(kl, abs=1e-12)
    assert float(stats["soft_ce"][0]) == pytest.approx(soft_ce, abs=1e-12)
    assert float(stats["ce"][0]) == pytest.approx(math.log(4), abs=1e-12)
    assert float(stats["confidence"][0]) == pytest.approx(0.25, abs=1e-12)


def test_token_stats_against_dense_reference():
    rng = np.random.default_rng(0)
    n, vocab, padded, k = 40, 37, 48, 4
    logits = rng.normal(size=(n, padded)) * 3
    logits[:, vocab:] += 10.0  # padding rows of the vocabulary: excluded from the distribution
    teacher = rng.dirichlet(np.full(vocab, 0.2), size=n)
    rows = np.arange(0, n, 4)
    teacher[rows, logits[rows, :vocab].argmax(-1)] += 5.0  # some rows where teacher and student agree
    teacher /= teacher.sum(-1, keepdims=True)
    ids = np.argsort(-teacher, -1)[:, :k]
    logprobs = np.log(np.take_along_axis(teacher, ids, -1))
    ids[::5, 2:] = -1  # a varying k
    logprobs[::5, 2:] = -np.inf
    labels = rng.integers(0, vocab, n)
    labels[::3] = logits[::3, :vocab].argmax(-1)  # some correct top-1s
    stats = token_stats(
        torch.tensor(logits),
        {
            "labels": torch.tensor(labels),
            "topk_ids": torch.tensor(ids),
            "topk_logprobs": torch.tensor(logprobs),
        },
        vocab_size=vocab,
    )
    reference = _dense_reference(logits, vocab, ids, logprobs, labels)
    for key in ("ce", "kl", "soft_ce", "confidence"):
        np.testing.assert_allclose(stats[key].numpy(), reference[key], atol=1e-10, err_msg=key)
    for key in ("correct", "agree"):
        assert stats[key].numpy().tolist() == reference[key].tolist(), key
    assert reference["correct"].any() and reference["agree"].any()


def _loop_ece(confidence, correct, bins):
    total = 0.0
    for b in range(bins):
        members = [
            i for i, c in enumerate(confidence) if b / bins < c <= (b + 1) / bins or (b == 0 and c == 0)
        ]
        if members:
            gap = abs(np.mean([correct[i] for i in members]) - np.mean([confidence[i] for i in members]))
            total += len(members) / len(confidence) * gap
    return total


@pytest.mark.slow
def test_tp2_evaluation_matches_the_teachers_own_numbers(evaluated_run, checkpoint_tp1):
    document = json.loads((evaluated_run / "metrics.json").read_text())
    expected = np.load(checkpoint_tp1 / "heldout_expected.npz")
    assert document["models"] == ["soft", "hard", "teacher"]
    held = document["held_out"]
    assert held["documents"] == 12 and held["clusters"] == 12 and held["tokens"] == expected["ce"].size
    for name in ("soft", "hard", "teacher"):
        for key in (
            "ce",
            "perplexity",
            "kl_teacher_student",
            "full_kl_teacher_student",
            "top1_agreement",
            "ece",
        ):
            entry = document[name][key]
            assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], (name, key, entry)
        assert document[name]["held_out_tokens"] == expected["ce"].size

    teacher = document["teacher"]
    # evaluated at TP=2 from a TP=1 checkpoint, against full-vocabulary float64 numbers computed at save time
    assert teacher["ce"]["value"] == pytest.approx(expected["ce"].mean(), abs=1e-5)
    assert teacher["perplexity"]["value"] == pytest.approx(math.exp(expected["ce"].mean()), rel=1e-5)
    assert abs(teacher["kl_teacher_student"]["value"]) < 1e-5  # the data's top-k is this model's own
    assert teacher["top1_agreement"]["value"] == 1.0
    assert teacher["full_kl_teacher_student"]["value"] == 0.0  # the teacher against itself, every position
    assert document["full_vocab"] == {"available": True, "teacher": "teacher", "reason": None}
    # coarsening the vocabulary into top-k + tail bins can only lose divergence (data processing inequality)
    for name in ("soft", "hard"):
        full, bins = (
            document[name]["full_kl_teacher_student"]["value"],
            document[name]["kl_teacher_student"]["value"],
        )
        assert full >= bins - 1e-6 and full > 1e-3, (name, full, bins)
    mass = held["teacher_topk_mass_mean"]["value"]
    assert 0 < mass <= 1 and 0 <= held["actual_in_teacher_topk_rate"]["value"] <= 1
    ece = _loop_ece(expected["confidence"].ravel(), expected["correct"].ravel(), 15)
    assert teacher["ece"]["value"] == pytest.approx(ece, abs=1e-4)

    # other models differ from the teacher, and the paired difference is soft - hard on the same sequences
    assert document["hard"]["kl_teacher_student"]["value"] > 1e-4
    diff = document["differences"]["soft-hard"]
    for key in ("ce", "kl_teacher_student", "top1_agreement"):
        assert diff[key]["value"] == pytest.approx(
            document["soft"][key]["value"] - document["hard"][key]["value"], abs=1e-12
        )
        assert diff[key]["ci_low"] <= diff[key]["value"] <= diff[key]["ci_high"]
    assert "teacher-soft" not in document["differences"]  # differences are between students

    samples = document["generations"]
    assert len(samples) == 2 and all(set(s["outputs"]) == {"soft", "hard", "teacher"} for s in samples)
    assert all(s["prompt"] and s["reference"] is not None for s in samples)
    assert (evaluated_run / "per_cluster.npz").is_file()
    buckets = document["soft"]["by_teacher_mass"]
    assert sum(b["tokens"] for b in buckets) == held["soft_tokens"]


@pytest.mark.slow
def test_eval_results_are_appended_to_duckdb(evaluated_run, tmp_path):
    """Into the storage catalog's own DuckDB file: through the open Catalog's connection, then by path."""
    from storage.catalog import CATALOG_FILE, Catalog

    document = json.loads((evaluated_run / "metrics.json").read_text())
    with Catalog(tmp_path) as catalog:
        assert append_eval_results(catalog.con, "run-a", document) == 3 * 8
        assert append_eval_results(catalog.con, "run-a", document) == 3 * 8  # a run recorded again: replaced
    append_eval_results(tmp_path / CATALOG_FILE, "run-b", document)
    with duckdb.connect(str(tmp_path / CATALOG_FILE), read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, value, ci_low, ci_high FROM eval_results "
            "WHERE model = 'teacher' AND metric = 'ce' ORDER BY run_id"
        ).fetchall()
        total = con.execute("SELECT count(*) FROM eval_results").fetchone()[0]
    assert [r[0] for r in rows] == ["run-a", "run-b"] and total == 2 * 24
    expected = tuple(document["teacher"]["ce"][k] for k in ("value", "ci_low", "ci_high"))
    assert rows[0][1:] == pytest.approx(expected)


def test_missing_or_mismatched_checkpoint_fails_clearly(checkpoint_tp1, tmp_path, capsys):
    other_tokenizer = tmp_path / "other_tokenizer.json"
    StudentTokenizer.train(["def f(x):\n    return x\n" * 50], vocab_size=280).save(other_tokenizer)
    good = {"checkpoint": str(checkpoint_tp1 / "checkpoint")}
    cases = [
        ({"m": {"checkpoint": str(tmp_path / "nowhere")}}, {}, "model 'm': checkpoint directory"),
        (
            {"m": good},
            {"tokenizer": str(other_tokenizer)},
            "vocabulary of 300 tokens but the evaluation tokenizer has",
        ),
        (
            {"m": good},
            {"tensor_parallel": 3},
            "cannot run at tensor_parallel=3: TP must divide key/value heads = 2",
        ),
    ]
    for models, overrides, message in cases:
        assert evaluate_main([str(write_eval_spec(tmp_path, checkpoint_tp1, models, **overrides))]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # nothing half-written


def test_windows_score_every_label_once_with_its_context():
    """Sliding windows over documents longer than the context: every label exactly once, the first window's
    labels with the document's whole prefix, later ones with at least context - stride tokens before them."""
    from student.heldout import windows

    assert windows(1, 8, 4) == [] and windows(9, 8, 4) == [(0, 0)]  # 8 labels fit one row: no cut
    for n, context, stride in [(40, 8, 4), (33, 16, 5), (100, 10, 10), (12, 8, 1)]:
        scored = []
        for start, first in windows(n, context, stride):
            for p in range(first, min(context, n - 1 - start)):
                label = start + p + 1
                scored.append(label)
                assert p >= min(label - 1, context - stride), (n, context, stride, start, p)
        assert sorted(scored) == list(range(1, n)) and len(scored) == n - 1


def test_held_out_snapshot_documents_follow_content_order_whatever_the_shard_layout(tmp_path):
    """A real snapshot (shards + catalog) written in two different arrival orders and shard splits: the
    held-out documents come back whole (one per record), ordered by a hash of their prompt and text (not
    by arrival, shard or teacher name), identical both times."""
    from storage.catalog import Catalog
    from storage.settings import StorageSettings
    from storage.shards import ShardWriter
    from storage.snapshot import create_snapshot
    from student.heldout import load_documents
    from tests.storage.factory import make_record, teacher_vocab

    tokenizer = StudentTokenizer.train(["the def λx é 日本 🙂 w300 w301" * 20], vocab_size=300)

    def documents(root, order, per_shard):
        rng = np.random.default_rng(5)
        records = [make_record(rng, i, int(rng.integers(8, 40)), split="test") for i in range(10)]
        with Catalog(root) as catalog:
            settings = StorageSettings(data_dir=root, shard_max_records=per_shard)
            with ShardWriter(root, settings, catalog) as writer:
                writer.add([records[i] for i in order], teacher_vocab())
            create_snapshot(catalog, "held-out", splits=["test"])
        return load_documents(root / "snapshots" / "held-out.json", tokenizer), records

    first, records = documents(tmp_path / "a", list(range(10)), 4)
    second, _ = documents(tmp_path / "b", [7, 2, 9, 0, 5, 1, 8, 3, 6, 4], 3)
    from storage.snapshot import order_key

    vocab = dict(teacher_vocab().items())
    text = {r.sample_id: b"".join(vocab[int(t)] for t in r.tokens) for r in records}
    by_content = sorted(records, key=lambda r: order_key(r.prompt, text[r.sample_id]))
    assert first.sample_ids == [r.sample_id for r in by_content] == second.sample_ids
    assert np.array_equal(first.offsets, second.offsets) and np.array_equal(first.tokens, second.tokens)
    assert np.array_equal(first.topk_logprobs, second.topk_logprobs)
    facts = first.label_facts()
    assert facts["hard"].sum() == len(first.tokens) - len(first)  # every token but each document's first


def test_document_chunks_bound_the_full_vocabulary_cache():
    """Chunks of consecutive documents: every document exactly once, at most max_docs per chunk, and at most
    CACHE_BYTES of float64 log-probabilities unless one document alone is longer (a real vocabulary of 49k
    at eight 300-token documents per chunk was killed for memory)."""
    lengths = np.array([300, 10, 250, 400, 5, 5, 5, 900, 60])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    docs = Documents(offsets, np.zeros(offsets[-1], np.int64), np.zeros((offsets[-1], 1), np.int64),
                     np.zeros((offsets[-1], 1), np.float32), [None] * len(lengths))  # fmt: skip
    vocab = CACHE_BYTES // (8 * 700)  # a budget of 700 tokens
    chunks = document_chunks(docs, max_docs=3, vocab_size=vocab)
    assert [i for chunk in chunks for i in chunk] == list(range(len(lengths)))
    assert all(len(chunk) <= 3 for chunk in chunks)
    assert all(sum(lengths[list(chunk)]) <= 700 or len(chunk) == 1 for chunk in chunks)
    assert [list(c) for c in chunks] == [[0, 1, 2], [3, 4, 5], [6], [7], [8]]
