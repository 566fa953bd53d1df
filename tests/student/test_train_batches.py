"""Packing of pre-tokenized text into batches, the data position, the learning-rate schedule, the training spec."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from student.batches import TokenBatches, TokenCorpus
from student.schedule import lr_at
from student.settings import TrainSettings
from student.train import SpecError, load_spec

SEQ = 8


@pytest.fixture
def corpus() -> TokenCorpus:
    docs = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 41], [50, 51, 52, 53, 54, 55]]
    corpus = TokenCorpus.from_documents(docs)
    n = len(corpus.tokens)
    corpus.topk_ids = np.stack([corpus.tokens + 1000, corpus.tokens + 2000], axis=1).astype(np.int32)
    corpus.topk_logprobs = np.log(np.tile([0.6, 0.3], (n, 1))).astype(np.float32)
    corpus.topk_ids[corpus.doc_starts[:-1]] = -1
    corpus.topk_logprobs[corpus.doc_starts[:-1]] = -np.inf
    return corpus


def test_rows_shift_labels_and_respect_documents(corpus):
    batches = TokenBatches(corpus, SEQ, micro_batch_size=1, seed=0, shuffle=False)
    row = {k: v[0] for k, v in batches.micro_batch(0).items()}
    assert row["tokens"].tolist() == [10, 11, 12, 20, 21, 22, 23, 24]
    assert row["labels"].tolist() == [11, 12, 20, 21, 22, 23, 24, 25]
    assert row["doc_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert row["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 1, 1], "12 -> 20 crosses a document boundary"
    assert row["soft_mask"].tolist() == [True, True, False, True, True, True, True, True]
    # the teacher's top-k of the token that is the label
    assert row["topk_ids"][:, 0].tolist() == [1011, 1012, -1, 1021, 1022, 1023, 1024, 1025]
    assert torch.isinf(row["topk_logprobs"][2]).all()

    second = {k: v[0] for k, v in batches.micro_batch(1).items()}
    assert second["tokens"].tolist() == [25, 26, 27, 28, 29, 30, 40, 41]
    assert second["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 0, 1], "positions restart in each row"
    last = {k: v[0] for k, v in batches.micro_batch(2).items()}
    assert last["tokens"].tolist() == [50, 51, 52, 53, 54, 55, 0, 0]
    assert last["doc_ids"].tolist() == [0, 0, 0, 0, 0, 0, -1, -1]
    assert last["loss_mask"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0], "padding never contributes"


def test_data_parallel_ranks_split_the_global_batch(corpus):
    whole = TokenBatches(corpus, SEQ, micro_batch_size=2, seed=3)
    ranks = [TokenBatches(corpus, SEQ, micro_batch_size=1, seed=3, dp_rank=r, dp_size=2) for r in (0, 1)]
    for index in range(5):  # across epoch boundaries
        joined = torch.cat([r.micro_batch(index)["tokens"] for r in ranks])
        assert torch.equal(joined, whole.micro_batch(index)["tokens"])


def test_data_position_resumes_exactly(corpus):
    first = TokenBatches(corpus, SEQ, micro_batch_size=2, seed=5)
    stream = iter(first)
    seen = [next(stream)["tokens"] for _ in range(3)]
    state = first.state_dict()
    rest = [next(stream)["tokens"] for _ in range(4)]
    resumed = TokenBatches(corpus, SEQ, micro_batch_size=2, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = iter(resumed)
    assert all(torch.equal(next(again)["tokens"], r) for r in rest)
    assert len(seen) == 3 and state == {"position": 3}


def test_corpus_round_trip_and_bad_files(corpus, tmp_path):
    path = corpus.save(tmp_path / "c.npz")
    loaded = TokenCorpus.load(path)
    assert np.array_equal(loaded.tokens, corpus.tokens) and np.array_equal(loaded.topk_ids, corpus.topk_ids)
    np.savez(tmp_path / "bad.npz", tokens=np.arange(5), doc_starts=np.array([0, 3]))
    with pytest.raises(ValueError, match=r"bad\.npz: doc_starts must rise from 0 to len\(tokens\)=5"):
        TokenCorpus.load(tmp_path / "bad.npz")


def test_warmup_then_cosine_to_min_lr():
    s = TrainSettings(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    assert lr_at(0, s) == pytest.approx(1e-4)
    assert lr_at(9, s) == pytest.approx(1e-3)
    assert lr_at(60, s) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, s) == pytest.approx(1e-4)
    lrs = [lr_at(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_spec_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match=r"spec\.json: not valid JSON"):
        load_spec(bad)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    bad.write_text(json.dumps({"tokenizer": str(tokenizer), "train_data": "nowhere.npz", "out_dir": "o"}))
    with pytest.raises(SpecError, match=r"field 'train_data': file nowhere\.npz not found"):
        load_spec(bad)
    bad.write_text(
        json.dumps({"tokenizer": str(tokenizer), "train_data": str(tokenizer), "out_dir": "o", "x": 1})
    )
    with pytest.raises(SpecError, match="field 'x': Extra inputs are not permitted"):
        load_spec(bad)
