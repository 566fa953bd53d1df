"""``student.optim.resolve_precision``: which parameter precision each device trains in (the optimizer paths
themselves run in the torchrun tests: test_model_parallel, test_train_resume; the CUDA one in scripts/gpu-check.sh)."""

from __future__ import annotations

import pytest

from student.optim import resolve_precision
from student.settings import TrainSettings


@pytest.mark.parametrize(
    ("precision", "cuda", "expected"),
    [("auto", True, "bf16"), ("auto", False, "fp32"), ("fp32", True, "fp32"), ("fp32", False, "fp32")],
)
def test_precision_per_device(precision, cuda, expected):
    assert resolve_precision(TrainSettings(precision=precision), cuda) == expected


def test_bf16_is_refused_without_cuda_and_kept_with_it():
    assert resolve_precision(TrainSettings(precision="bf16"), cuda=True) == "bf16"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_precision(TrainSettings(precision="bf16"), cuda=False)
