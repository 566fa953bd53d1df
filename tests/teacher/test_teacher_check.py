"""Real servers, real processes: ``distill teacher check`` against the local teacher and against a second one
started with ``--simulate-shifted-echo`` (echo scores one position late), collection refusing the shifted
server, an unreachable teacher failing fast with URL and cause, stale ``.tmp`` shards, cleared failures, and
``distill data stats CONFIG`` beside a running collection's catalog lock."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.records import TeacherVocab
from storage.shards import TMP_SUFFIX, ShardWriter, shard_dir
from student.settings import ModelSettings
from teacher.collect import build_record, collect
from teacher.inputs import WorkItem
from teacher.parsing import parse_chat
from teacher.server import READY, server_command
from teacher.settings import LocalTeacherSettings, TeacherSettings
from tests.support import PYTHON, free_port, test_env
from tests.teacher.conftest import PLANTED_KEY, PROMPTS, Teacher
from tests.teacher.test_cli_collect import write_setup
from tests.teacher.test_fragments import load

MODEL = ModelSettings(
    num_layers=1, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, seq_length=256
)


@contextlib.contextmanager
def shifted_server(tokenizer: Path) -> Iterator[str]:
    """A second local teacher process, with the shifted-echo simulation on; yields its base URL."""
    cmd = server_command(LocalTeacherSettings(), random_init=MODEL, tokenizer=tokenizer, seed=7)
    cmd += ["--simulate-shifted-echo", "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(
        cmd,
        env=test_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            match = READY.search(line)
            if match:
                break
            assert time.monotonic() < deadline, "shifted server did not start"
        else:
            pytest.fail(f"shifted server exited with {proc.wait()}")
        yield match.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def distill(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, env=test_env(**env), capture_output=True, text=True, timeout=timeout)


def test_check_and_collect_against_a_shifted_echo_server(teacher: Teacher, tmp_path: Path) -> None:
    good = distill("teacher", "check", teacher.base_url, "--api-key-env", "KEY", KEY=PLANTED_KEY)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"echo scores line up\s+yes", good.stdout) and "verdict: usable" in good.stdout
    assert re.search(r"score: prompt_logprobs\s+ok", good.stdout)
    assert re.search(r"max top-k accepted\s+20", good.stdout)
    assert re.search(r"token ids on request\s+yes", good.stdout)
    assert PLANTED_KEY not in good.stdout + good.stderr
    with shifted_server(teacher.tokenizer_path) as url:
        bad = distill("teacher", "check", url, "--model", "local-teacher")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert re.search(r"echo scores line up\s+NO", bad.stdout) and "one position late" in bad.stdout
        assert "NOT usable" in bad.stdout
        settings = TeacherSettings(mode="score", score_api="echo", top_k=4, concurrency=2, max_retries=0)
        stored = []
        result = collect(
            [WorkItem(prompt=p) for p in PROMPTS[:3]], settings, url, None, set(),
            lambda records, vocab: stored.extend(records), progress=False,
            resolve=teacher.tokenizer.token_bytes,
        )  # fmt: skip
    assert not stored and len(result.failures) == 3
    assert all("ShiftedScoresError" in f.reason and "one position late" in f.reason for f in result.failures)


def test_unreachable_teacher_fails_fast_naming_url_and_cause(teacher: Teacher, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    config = write_setup(tmp_path, teacher, [f"prompt {i}" for i in range(500)], max_retries=5, timeout_s=30)
    started = time.monotonic()
    done = distill("collect", str(config), "--base-url", url, "--no-progress", timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "refused" in done.stderr.lower(), done.stderr
    assert "Traceback" not in done.stderr
    check = distill("teacher", "check", url)
    assert check.returncode == 2 and f"127.0.0.1:{port}" in check.stderr and "refused" in check.stderr.lower()


def test_request_failure_reasons_name_the_url(tmp_path: Path) -> None:
    port = free_port()
    settings = TeacherSettings(mode="score", score_api="echo", token_ids=False, max_retries=0, timeout_s=5)
    result = collect(
        [WorkItem(prompt="x")], settings, f"http://127.0.0.1:{port}/v1", None, set(), lambda r, v: None,
        progress=False,
    )  # fmt: skip
    (failure,) = result.failures
    assert f"127.0.0.1:{port}" in failure.reason and "refused" in failure.reason.lower(), failure.reason


def test_stale_tmp_shards_are_removed_and_named(tmp_path: Path) -> None:
    shards = shard_dir(tmp_path)
    shards.mkdir(parents=True)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = shards / f"{'a' * 32}-{int(gone.stdout)}{TMP_SUFFIX}"  # its writer has exited
    live = shards / f"{'b' * 32}-{os.getppid()}{TMP_SUFFIX}"  # a writer that is still running
    old = shards / f"{'c' * 32}{TMP_SUFFIX}"  # no pid in the name, older than the grace period
    for path in (dead, live, old):
        path.write_bytes(b"PAR1 partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    done = distill("data", "reindex", "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"removed unfinished shard {dead}: its writer (pid {int(gone.stdout)}) is gone" in done.stdout
    assert f"removed unfinished shard {old}: unchanged for 2.0 h" in done.stdout
    assert live.exists() and not dead.exists() and not old.exists()


def test_failures_are_cleared_when_the_sample_is_stored(tmp_path: Path) -> None:
    vocab = TeacherVocab()
    record = build_record(
        parse_chat(load("openai_chat_logprobs.json"), 3), "p", "train", "t", "generate", {}, vocab
    )
    with Catalog(tmp_path) as catalog:
        catalog.record_failures([(record.sample_id, "timeout"), (record.sample_id, "429"), ("other", "500")])
        assert [(k, r) for k, r, _ in catalog.failures()] == [(record.sample_id, "429"), ("other", "500")]
        with ShardWriter(tmp_path, catalog=catalog) as writer:
            writer([record], vocab)
        assert [k for k, _, _ in catalog.failures()] == ["other"]
        catalog.record_failures([(record.sample_id, "late retry failed")])  # already stored: not a failure
        assert [k for k, _, _ in catalog.failures()] == ["other"]


def test_data_stats_takes_the_config_and_reads_beside_a_running_collection(
    teacher: Teacher, tmp_path: Path
) -> None:
    config = write_setup(tmp_path, teacher, ["x"])
    data = tmp_path / "data"
    vocab = TeacherVocab()
    record = build_record(
        parse_chat(load("openai_chat_logprobs.json"), 3), "p", "train", "t", "generate", {}, vocab
    )
    with Catalog(data) as catalog, ShardWriter(data, catalog=catalog) as writer:
        writer([record], vocab)
    holder = subprocess.Popen(  # a collection holds the catalog open for writing
        [PYTHON, "-c", f"from storage.catalog import Catalog; c = Catalog({str(data)!r}); print('held', flush=True); "
         "import time; time.sleep(60)"],
        env=test_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        done = distill("data", "stats", str(config))
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stderr
    assert "in use by another process" in done.stdout and re.search(r"train\s+1\s+3", done.stdout), (
        done.stdout
    )
