"""``benchmarks/loss.py --quick`` runs our soft CE, megatron-core's hard CE and the naive soft CE side by side and
writes the keys of benchmarks/results/loss.json (figures are not asserted: timing belongs to the benchmark)."""

from __future__ import annotations

import json

import pytest

from tests.support import PYTHON, run_bounded


@pytest.mark.slow
def test_quick_benchmark_writes_every_key(tmp_path):
    out = tmp_path / "loss.json"
    proc = run_bounded([PYTHON, "benchmarks/loss.py", "--quick", "--out", str(out)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True and results["k"] == 20
    for vocab in ("v32k", "v128k"):
        entry = results[vocab]["cpu"]
        for key in ("time_ratio_vs_hard", "mem_ratio_vs_hard", "mem_ratio_vs_naive"):
            assert entry[key] > 0, (vocab, key, entry[key])
        for variant in ("ours", "hard", "naive"):
            figures = entry["variants"][variant]
            # every variant's peak covers at least the logits it created, and it was timed
            assert figures["peak_bytes"] >= entry["logits_bytes"] * 0.9 and figures["time_s"] > 0
        for key in (
            "fused_mem_ratio_vs_hard_head",
            "fused_time_ratio_vs_hard_head",
            "fused_time_ratio_vs_ours_head",
        ):
            assert entry[key] > 0, (vocab, key, entry[key])
        assert all(
            entry["head_variants"][v]["peak_bytes"] > 0 for v in ("head_fused", "head_ours", "head_hard")
        )
    assert "ours/hard time" in proc.stdout and all(
        "targets_met" in results[v]["cpu"] for v in ("v32k", "v128k")
    )
