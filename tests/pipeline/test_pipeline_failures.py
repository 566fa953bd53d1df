"""Prompts that fail for good: within ``teacher.max_failed_fraction`` the run completes on what was stored and
reports the failures (summary, report); beyond it, collect fails naming the URL and the causes.

The teacher is a real local server (a seeded random model) behind the real fault proxy, which answers 500 to
every request whose body holds one prompt's marker, so that prompt exhausts the client's retries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer
from teacher.server import local_teacher_server
from teacher.settings import LocalTeacherSettings
from tests.pipeline.test_pipeline_run import distill
from tests.pipeline.tiny_project import TinyProject, make_tiny_project
from tests.teacher.conftest import CORPUS, fault_proxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MARKER = "POISONED_PROMPT_MARKER"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(proxy base URL, teacher tokenizer path): every request holding MARKER gets a 500."""
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = StudentTokenizer.train(CORPUS * 20, vocab_size=290).save(folder / "tokenizer.json")
    model = ModelSettings(
        num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=512
    )
    with (
        local_teacher_server(
            LocalTeacherSettings(), random_init=model, tokenizer=tokenizer, seed=3
        ) as server,
        fault_proxy(server.base_url.removesuffix("/v1"), {"match": {MARKER: "500"}}) as proxy,
    ):
        yield proxy.base_url, tokenizer


def poisoned_project(root: Path) -> TinyProject:
    project = make_tiny_project(root, n_prompts=20)
    lines = project.prompts.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "prompt": f"# {MARKER}\n" + first["prompt"]})
    project.prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return project


def remote_config(project: TinyProject, served: tuple[str, Path], fraction: float) -> Path:
    base_url, tokenizer = served
    return project.config(
        teacher={
            "base_url": base_url,
            "model": "local-teacher",
            "tokenizer_path": str(tokenizer),
            "max_retries": 1,
            "timeout_s": 20.0,
            "max_failed_fraction": fraction,
        }
    )


def test_failing_prompt_within_the_fraction_completes_and_is_reported(
    tmp_path: Path, served: tuple[str, Path]
) -> None:
    project = poisoned_project(tmp_path)
    out = distill("run", str(remote_config(project, served, 0.2)), timeout=540)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "1 of 20 request(s)" in out.stderr and "within teacher.max_failed_fraction" in out.stderr
    (summary_path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed"
    collect = json.loads((Path(summary["stages"]["collect"]["path"]) / "_stage.json").read_text())["info"]
    assert collect["failed"] == 1 and collect["collected"] == 19, collect
    assert sum(collect["failure_reasons"].values()) == 1 and "500" in next(iter(collect["failure_reasons"]))
    report = (summary_path.parent / "report.md").read_text(encoding="utf-8")
    assert "| collection failures | 1 |" in report and "500" in report


def test_failing_prompt_beyond_the_fraction_fails_collect(tmp_path: Path, served: tuple[str, Path]) -> None:
    project = poisoned_project(tmp_path)
    out = distill("run", str(remote_config(project, served, 0.0)), timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-4000:]
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stage collect failed"), error
    assert served[0] in error and "more than teacher.max_failed_fraction = 0" in error and "500" in error
