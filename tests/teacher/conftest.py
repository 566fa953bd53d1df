"""Shared fixtures of the teacher tests: one real local teacher server (a seeded random model behind the real
HTTP API, with a bearer key), a tokenizer whose tokens split multi-byte characters, the fault proxy process, and
helpers to read back a stored dataset."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from storage.records import TopKRecord
from storage.shards import read_records, shard_dir
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer
from teacher.server import RunningServer, local_teacher_server
from teacher.settings import LocalTeacherSettings
from tests.support import PYTHON, test_env

# A key planted in the server; tests grep every output for it.
PLANTED_KEY = "sk-planted-9f8e7d6c5b4a39281706f5e4d3c2b1a0"

CORPUS = [
    "café ☕ naïve résumé — déjà vu, 日本語のテキスト, emoji 🙂🙃, Ünïcödé.",
    "def collect(items):\n    return [item for item in items if item]\n",
    "The quick brown fox jumps over the lazy dog. ",
]
PROMPTS = [
    "café ☕ and 日本語 😀",
    "naïve résumé: déjà vu",
    "def f(x):\n    return x + 1\n",
    "Ünïcödé text 🙂🙃 mixed with ascii",
    "The quick brown fox",
    "emoji 🧪🔬 science",
    "ﬁ ligature and Ω omega",
    "tabs\tand\nnewlines ✓",
]


@dataclass
class Teacher:
    server: RunningServer
    tokenizer: StudentTokenizer
    tokenizer_path: Path

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def origin(self) -> str:
        return self.server.base_url.removesuffix("/v1")


# The teacher's seeded random model (a second server started from it answers identically).
TEACHER_MODEL = ModelSettings(
    num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=256
)
TEACHER_SEED = 7


@pytest.fixture(scope="session")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Teacher]:
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = StudentTokenizer.train(CORPUS * 20, vocab_size=290)
    path = tokenizer.save(folder / "tokenizer.json")
    settings = LocalTeacherSettings(api_key=PLANTED_KEY, max_batch_size=8, batch_wait_ms=2)
    with local_teacher_server(
        settings, random_init=TEACHER_MODEL, tokenizer=path, seed=TEACHER_SEED
    ) as server:
        yield Teacher(server, tokenizer, path)


@dataclass
class Proxy:
    url: str
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict:
        return httpx.get(self.url + "/_proxy/stats", timeout=10).json()


@contextlib.contextmanager
def fault_proxy(upstream: str, plan: dict) -> Iterator[Proxy]:
    """``python -m teacher.fault_proxy`` as a real process in front of ``upstream``."""
    cmd = [
        PYTHON,
        "-m",
        "teacher.fault_proxy",
        "--upstream",
        upstream,
        "--port",
        "0",
        "--plan",
        json.dumps(plan),
    ]
    # stdout carries the one "listening" line; the proxy's log (stderr) is dropped so no pipe can fill up.
    proc = subprocess.Popen(
        cmd,
        env=test_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"fault proxy did not start (exit code {proc.poll()}): {line!r}"
        yield Proxy(match.group(1), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stored_records(data_dir: Path) -> list[TopKRecord]:
    """Every record of every complete shard under ``data_dir``."""
    return [r for shard in sorted(shard_dir(data_dir).glob("*.parquet")) for r in read_records(shard)]


def assert_same_dataset(a: list[TopKRecord], b: list[TopKRecord]) -> None:
    """Same samples, each with the same tokens and top-k (ids are the server's, so comparable directly)."""
    by_id_a = {r.sample_id: r for r in a}
    by_id_b = {r.sample_id: r for r in b}
    assert len(by_id_a) == len(a) and len(by_id_b) == len(b), "duplicate sample ids"
    assert by_id_a.keys() == by_id_b.keys()
    for sid, ra in by_id_a.items():
        rb = by_id_b[sid]
        assert ra.text == rb.text and ra.split == rb.split
        np.testing.assert_array_equal(ra.tokens, rb.tokens)
        np.testing.assert_array_equal(ra.topk_ids, rb.topk_ids)
        np.testing.assert_allclose(ra.topk_logprobs, rb.topk_logprobs, atol=1e-4)
