"""``distill collect`` as a real process: SIGKILLed midway and re-run, it ends with exactly the fault-free dataset
and does not ask the teacher again for what was stored; the planted API key appears in no output."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from storage.catalog import Catalog
from storage.records import TopKRecord
from storage.shards import TMP_SUFFIX, ShardWriter, shard_dir
from teacher.collect import collect
from teacher.inputs import WorkItem
from tests.support import PYTHON, run_bounded, test_env
from tests.teacher.conftest import (
    PLANTED_KEY,
    PROMPTS,
    Teacher,
    assert_same_dataset,
    fault_proxy,
    stored_records,
)

ITEMS = [f"{p} #{i}" for i in range(3) for p in PROMPTS]  # 24 distinct texts


def write_setup(folder: Path, teacher: Teacher, texts: list[str], **teacher_keys) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inputs = folder / "inputs.jsonl"
    inputs.write_text("".join(json.dumps({"prompt": t}, ensure_ascii=False) + "\n" for t in texts), "utf-8")
    keys = {"model": "local-teacher", "mode": "score", "score_api": "echo", "top_k": 4, "concurrency": 2}
    keys |= {"tokenizer_path": str(teacher.tokenizer_path), **teacher_keys}
    lines = ["[corpus]", 'source = "files"', f"paths = [{json.dumps(str(inputs))}]", "[teacher]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    lines += ["[storage]", f"data_dir = {json.dumps(str(folder / 'data'))}", "shard_max_records = 3"]
    config = folder / "distill.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def distill_collect(config: Path, base_url: str, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-m",
        "pipeline.cli",
        *extra,
        "collect",
        str(config),
        "--base-url",
        base_url,
        "--no-progress",
    ]


def collect_reference(config: Path, teacher: Teacher, data_dir: Path) -> list[TopKRecord]:
    """The fault-free dataset of the same config, collected in this process straight from the server."""
    settings = load_config(config).teacher
    items = [WorkItem(prompt=t) for t in ITEMS]
    with ShardWriter(data_dir) as writer:
        result = collect(
            items, settings, teacher.base_url, PLANTED_KEY, set(), writer,
            progress=False, resolve=teacher.tokenizer.token_bytes,
        )  # fmt: skip
    assert result.collected == len(ITEMS) and not result.failures
    return stored_records(data_dir)


def key_env() -> dict[str, str]:
    return test_env(OPENAI_API_KEY=PLANTED_KEY)


def interrupt_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> str:
    """SIGINT to ``proc``'s group once ``ready()`` (polled), then its output; the process must still run."""
    try:
        deadline = time.monotonic() + 120
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the collector ended before it could be interrupted: {proc.stdout.read()}"
        )
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _foreground_signals() -> None:
    """In the child: SIGINT as a terminal's foreground job has it. A disposition of SIG_IGN is inherited (some
    library in this pytest process may leave it so), and Python installs no KeyboardInterrupt handler then."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_collect(config: Path, base_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        distill_collect(config, base_url), env=key_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_foreground_signals,
    )  # fmt: skip


def assert_interrupted(proc: subprocess.Popen, out: str, data_dir: Path) -> None:
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    assert not [p for p in data_dir.rglob("*") if p.name.endswith(TMP_SUFFIX)], "a half-written file was left"
    assert not list(shard_dir(data_dir).glob("*.parquet")), "nothing was answered, yet a shard was stored"


def test_sigkill_then_rerun_gives_the_fault_free_dataset(teacher: Teacher, tmp_path: Path) -> None:
    config = write_setup(tmp_path / "killed", teacher, ITEMS)
    reference = collect_reference(config, teacher, tmp_path / "reference")
    shards = shard_dir(tmp_path / "killed" / "data")
    with fault_proxy(teacher.origin, {"latency_s": 0.3}) as proxy:
        proc = subprocess.Popen(
            distill_collect(config, proxy.base_url), env=key_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while (
                len(list(shards.glob("*.parquet"))) < 2
                and proc.poll() is None
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            assert proc.poll() is None, "the collector finished before it could be killed"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        asked_first = proxy.stats()["forwarded_prompts"]
    before = stored_records(tmp_path / "killed" / "data")
    stored_texts = {r.text for r in before}
    assert 6 <= len(before) < len(ITEMS) and len(asked_first) < len(ITEMS)

    with fault_proxy(teacher.origin, {}) as proxy:
        rerun = run_bounded(distill_collect(config, proxy.base_url), timeout=180, env=key_env())
        asked_again = proxy.stats()["forwarded_prompts"]
    assert rerun.returncode == 0, rerun.stdout
    assert f"already stored {len(before)}" in rerun.stdout
    # The teacher is asked once for each missing text, and never for a stored one.
    missing = set(ITEMS) - stored_texts - set(asked_again)
    with Catalog(tmp_path / "killed" / "data", sync=False, read_only=True) as catalog:
        in_catalog = len(catalog.existing_sample_ids("local-teacher"))
    assert sorted(asked_again) == sorted(set(ITEMS) - stored_texts), (
        len(before),
        len(stored_texts),
        len(asked_first),
        missing,
        in_catalog,
        rerun.stdout[-3000:],
        sorted(p.name for p in shards.glob("*")),
    )

    after = stored_records(tmp_path / "killed" / "data")
    assert_same_dataset(reference, after)
    with Catalog(tmp_path / "killed" / "data") as catalog:
        assert len(catalog.existing_sample_ids("local-teacher")) == len(ITEMS)


def test_planted_key_never_leaks(teacher: Teacher, tmp_path: Path) -> None:
    texts = [*PROMPTS[:3], "XPOISON always fails"]
    config = write_setup(tmp_path, teacher, texts, max_retries=1)
    with fault_proxy(teacher.origin, {"match": {"XPOISON": "500"}}) as proxy:
        done = run_bounded(distill_collect(config, proxy.base_url, "--verbose"), timeout=180, env=key_env())
    assert done.returncode == 1, done.stdout  # one request failed for good
    assert "failed 1" in done.stdout and "injected 500" in done.stdout
    with Catalog(tmp_path / "data") as catalog:
        (failure,) = catalog.failures()
    assert "injected 500" in failure[1]
    assert PLANTED_KEY not in done.stdout
    assert PLANTED_KEY not in "\n".join(teacher.server.output)
    files = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files) and any(p.suffix == ".duckdb" for p in files)
    for path in files:
        assert PLANTED_KEY.encode() not in path.read_bytes(), path
    # The server does require the planted key: a wrong one is refused (401), and not retried.
    settings = load_config(config).teacher
    denied = collect(
        [WorkItem(prompt="x")], settings, teacher.base_url, "sk-wrong", set(), lambda *_: None, progress=False,
        resolve=teacher.tokenizer.token_bytes,
    )  # fmt: skip
    assert "AuthenticationError" in denied.failures[0].reason and "401" in denied.failures[0].reason


def test_bad_input_line_stops_before_any_request(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"prompt": "fine"}\n{"prompt": "no end"\n', encoding="utf-8")
    config = tmp_path / "distill.toml"
    config.write_text(
        f'[corpus]\nsource = "files"\npaths = [{json.dumps(str(inputs))}]\n'
        f"[storage]\ndata_dir = {json.dumps(str(tmp_path / 'data'))}\n",
        encoding="utf-8",
    )
    # port 9 (discard) would refuse: the run must fail on the input before it connects anywhere
    assert main(["collect", str(config), "--base-url", "http://127.0.0.1:9/v1"]) == 2
    assert f"{inputs}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "data" / "shards").exists()


def test_ctrl_c_stops_collect_and_keeps_what_was_stored(teacher: Teacher, tmp_path: Path) -> None:
    """SIGINT to the process group (what a terminal's Ctrl-C sends) ends the collector promptly with code 130;
    the shards written so far stay complete and listed, and a re-run asks only for the rest."""
    config = write_setup(tmp_path, teacher, ITEMS)
    shards = shard_dir(tmp_path / "data")
    # 1 s per answer: seconds of collection remain after the first shard, even on a loaded machine
    with fault_proxy(teacher.origin, {"latency_s": 1.0}) as proxy:
        proc = start_collect(config, proxy.base_url)
        out = interrupt_when(proc, lambda: bool(list(shards.glob("*.parquet"))))
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    assert PLANTED_KEY not in out
    assert not list(shards.glob(f"*{TMP_SUFFIX}")), "a half-written shard was left behind"
    before = stored_records(tmp_path / "data")
    assert 3 <= len(before) < len(ITEMS)
    with fault_proxy(teacher.origin, {}) as proxy:
        rerun = run_bounded(distill_collect(config, proxy.base_url), timeout=180, env=key_env())
        asked_again = proxy.stats()["forwarded_prompts"]
    assert rerun.returncode == 0, rerun.stdout
    assert sorted(asked_again) == sorted(set(ITEMS) - {r.text for r in before})
    assert len(stored_records(tmp_path / "data")) == len(ITEMS)


def test_ctrl_c_while_connecting_exits_130_without_traceback(teacher: Teacher, tmp_path: Path) -> None:
    """Start-up: the teacher's address accepts the connection but never answers (the probe before fanning out
    is waiting); Ctrl-C then ends the collector with 130 and no traceback."""
    config = write_setup(tmp_path, teacher, ITEMS)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, accepts, never answers
        silent.settimeout(0.05)
        accepted: list[socket.socket] = []

        def connected() -> bool:
            with contextlib.suppress(TimeoutError):
                accepted.append(silent.accept()[0])
            return bool(accepted)

        proc = start_collect(config, f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        out = interrupt_when(proc, connected)
        for conn in accepted:
            conn.close()
    assert_interrupted(proc, out, tmp_path / "data")


def test_ctrl_c_before_the_first_answer_exits_130_without_traceback(teacher: Teacher, tmp_path: Path) -> None:
    """The first requests are in flight (held by the proxy) when Ctrl-C comes: 130, no traceback, no file."""
    config = write_setup(tmp_path, teacher, ITEMS)
    with fault_proxy(teacher.origin, {"latency_s": 60}) as proxy:
        proc = start_collect(config, proxy.base_url)
        out = interrupt_when(proc, lambda: proxy.stats()["posts"] >= 2)
    assert_interrupted(proc, out, tmp_path / "data")
