"""``scripts/gpu-check.sh``: its CPU dry run passes and writes nothing under benchmarks/results; without a GPU the
real run refuses to start, and the loss tests refuse a CUDA device that is not there (never a silent pass)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.support import PYTHON, ROOT, run_bounded, test_env

STEPS = ("loss-tests", "loss-benchmark", "train-benchmark", "train-check", "train-check-merge")


def _results_digest() -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dry_run_passes_every_step_and_leaves_the_results_alone():
    before = _results_digest()
    proc = run_bounded(["bash", "scripts/gpu-check.sh", "--dry-run"], timeout=290)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for name in STEPS:
        assert f"<== [{name}] ok" in proc.stdout, (name, proc.stdout[-6000:])
    assert '"resume_on_cpu_max_rel_diff": 0.0' in proc.stdout  # the CPU resume continued the curve exactly
    assert "gpu-check: all steps passed (dry run" in proc.stdout
    assert _results_digest() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_real_run_refuses_to_start():
    proc = run_bounded(["bash", "scripts/gpu-check.sh"], timeout=60)
    assert proc.returncode == 2
    assert "torch sees no CUDA device" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_loss_tests_refuse_a_missing_cuda_device():
    proc = run_bounded(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/student/test_losses.py"],
        timeout=60,
        env=test_env(DISTILL_TEST_DEVICE="cuda"),
    )
    assert proc.returncode != 0
    assert "DISTILL_TEST_DEVICE=cuda, but torch sees no CUDA device" in proc.stdout
