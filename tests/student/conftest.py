"""The test device for the single-process loss tests.

Unset ``DISTILL_TEST_DEVICE`` (CI): every test runs, on the CPU. Set (``scripts/gpu-check.sh`` sets ``cuda``, its
``--dry-run`` ``cpu``): only the tests that take the ``device`` fixture run, on that device; the others (gloo
torchrun workers, CPU-only checks) are deselected, since CI covers them on the CPU already. A device that is
not there is an error, never a silent skip: the GPU check must not pass without its GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ENV = "DISTILL_TEST_DEVICE"


def _requested() -> str | None:
    return os.environ.get(ENV) or None


@pytest.fixture
def device() -> torch.device:
    """``DISTILL_TEST_DEVICE`` (default cpu) as a torch device."""
    return torch.device(_requested() or "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    requested = _requested()
    if requested is None:
        return
    if torch.device(requested).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"{ENV}={requested}, but torch sees no CUDA device")
    mine = [item for item in items if item.path.parent == config.rootpath / "tests" / "student"]
    off = [item for item in mine if "device" not in getattr(item, "fixturenames", ())]
    if off:
        config.hook.pytest_deselected(items=off)
        dropped = {id(item) for item in off}
        items[:] = [item for item in items if id(item) not in dropped]
