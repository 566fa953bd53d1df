"""``distill run`` refuses bad input before any work, and a teacher that cannot be reached fails collect with
the URL and the cause (after the configured retries); every run, failed ones too, writes its summary.json."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runner import run_pipeline
from tests.pipeline.tiny_project import make_tiny_project
from tests.support import PYTHON, ROOT, free_port, test_env


def distill(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_key_fails_before_any_work(tmp_path: Path) -> None:
    project = make_tiny_project(tmp_path, n_prompts=5)
    config = project.config()
    config.write_text(config.read_text().replace("[train]\n", "[train]\nsteps_typo = 3\n"))
    out = distill("run", str(config))
    assert out.returncode == 2
    assert "unknown key 'train.steps_typo'" in out.stderr and str(config) in out.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"local_teacher": {"model": "/nonexistent/teacher"}},
            "local_teacher.model: /nonexistent/teacher not found",
        ),
        (
            {"teacher": {"base_url": "api.example.com/v1"}},
            "teacher.base_url: expected 'local' or an http(s) URL",
        ),
        (
            {"tokenizer": {"path": "/nonexistent/tokenizer.json"}},
            "tokenizer.path: /nonexistent/tokenizer.json",
        ),
        ({"corpus": {"paths": ["/nonexistent/prompts.jsonl"]}}, "corpus.paths: input file /nonexistent"),
        ({"train": {"tensor_parallel": 3}}, "must be divisible by train.tensor_parallel (3)"),
    ],
)
def test_missing_teacher_or_input_fails_before_any_work(
    tmp_path: Path, sections: dict, expected: str
) -> None:
    config = load_config(make_tiny_project(tmp_path, n_prompts=5).config(**sections))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        run_pipeline(config)
    assert not (tmp_path / "work").exists() and not (tmp_path / "runs").exists()


def test_missing_teacher_checkpoint_cli_exit_code(tmp_path: Path) -> None:
    config = make_tiny_project(tmp_path, n_prompts=5).config(local_teacher={"model": str(tmp_path / "gone")})
    out = distill("run", str(config))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"error: local_teacher.model: {tmp_path / 'gone'} not found; expected 'smollm2', 'bootstrap', a .gguf "
        "file, a Hugging Face Llama directory (with config.json) or a student.train checkpoint directory"
    )
    assert not (tmp_path / "work").exists()


def test_unreachable_teacher_fails_collect_with_url_and_cause(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = make_tiny_project(tmp_path, n_prompts=6).config(
        teacher={
            "base_url": url,
            "model": "remote-teacher",
            "token_ids": False,
            "score_api": "echo",
            "max_retries": 1,
            "timeout_s": 5.0,
        }
    )
    out = distill("run", str(config))
    assert out.returncode == 1, out.stdout + out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stage collect failed")
    assert url in error and "after 1 retries" in error and "Connection" in error
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert summary["status"] == "failed"
    assert {k: v["status"] for k, v in summary["stages"].items()} == {
        "prepare_corpus": "ran",
        "tokenizer": "ran",
    }
    assert not list((tmp_path / "work" / "collect").glob("*/_stage.json"))  # no half-written collect output
