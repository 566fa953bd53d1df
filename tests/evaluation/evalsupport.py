"""Helpers of the evaluation tests: an evaluation spec writer and headless chromium."""

import json
import tempfile
from pathlib import Path

from pipeline.config import EvaluateSettings
from tests.support import run_bounded


def write_eval_spec(tmp: Path, made: Path, models: dict, **overrides) -> Path:
    settings = EvaluateSettings(
        bootstrap_samples=400, micro_batch_size=4, generation_prompts=2, generation_tokens=8, prompt_tokens=16
    ).model_dump()
    spec = {
        **settings,
        "data": str(made / "heldout.npz"),
        "tokenizer": str(made / "tokenizer.json"),
        "models": models,
        "out": str(tmp / "run" / "metrics.json"),
        "tensor_parallel": 2,
        **overrides,
    }
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec))
    return path


def headless(chromium: str, url: str, *action: str) -> str:
    """Run headless chromium on ``url`` with one action (``--dump-dom``, ``--screenshot=PATH``); its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--window-size=1280,2400",
            *action,
            url,
        ]
        result = run_bounded(cmd, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout
